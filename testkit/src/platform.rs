//! The platform's side of a test: [`texture_agent::sim::peer::PlatformPeer`], the simulator's own
//! MQTT peer, with its messages kept in an inbox that tests wait on.

use std::time::Duration;

use texture_agent::link::topics::Topics;
use texture_agent::model::clock::system_secs;
use texture_agent::sim::peer::{Inbox, PeerOptions, PlatformPeer};
use texture_agent::sim::platform::{ApiKey, AttestedCommand, PlatformSigner};

use crate::mosquitto::{Mosquitto, PLATFORM_CLIENT};
use crate::pki::Pki;

pub use texture_agent::sim::peer::Seen;

/// An MQTT client playing the platform, authenticated with its own client certificate.
pub struct Peer {
    peer: PlatformPeer,
    inbox: Inbox,
}

impl Peer {
    /// Connects as `client_id` (certificate CN) and subscribes to `subscriptions`.
    pub async fn connect(pki: &Pki, port: u16, client_id: &str, subscriptions: &[&str]) -> Peer {
        Self::connect_with(pki, port, client_id, subscriptions, true).await
    }

    /// With `clean_session = false` the broker keeps the subscriptions and queues messages
    /// while the peer is away (see [`crate::Mosquitto::start_with`]).
    pub async fn connect_with(
        pki: &Pki,
        port: u16,
        client_id: &str,
        subscriptions: &[&str],
        clean_session: bool,
    ) -> Peer {
        let mut options = PeerOptions::new(
            client_id,
            port,
            &pki.ca.cert_path(),
            pki.ca.client(client_id),
        );
        options.subscriptions = subscriptions.iter().map(|s| s.to_string()).collect();
        options.clean_session = clean_session;
        options.keep_alive = Duration::from_secs(5);
        options.queue = 64;
        let (peer, inbox) = PlatformPeer::connect_inbox(options)
            .await
            .expect("peer connected and subscribed");
        Peer { peer, inbox }
    }

    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>, retain: bool) {
        self.peer.publish(topic, payload, retain).await.unwrap();
    }

    /// Waits for the next message on `topic` that satisfies `pred`, skipping others.
    pub async fn expect(
        &mut self,
        topic: &str,
        timeout: Duration,
        pred: impl Fn(&Seen) -> bool,
    ) -> Seen {
        self.inbox
            .expect(topic, timeout, pred)
            .await
            .unwrap_or_else(|| panic!("no matching message on {topic} within {timeout:?}"))
    }

    /// Forgets every message on `topic` received so far, so that the next [`Peer::expect`] on
    /// it sees only later ones.
    pub fn forget(&mut self, topic: &str) {
        self.inbox.forget(topic);
    }

    /// Collects everything that arrives on `topic` during `window`.
    pub async fn collect(&mut self, topic: &str, window: Duration) -> Vec<Seen> {
        self.inbox.collect(topic, window).await
    }

    /// The replies to a burst: collects `gateway`'s replies until each of `ids` has one, or
    /// `within` has passed, and counts them by `"<type> <status>"`. Panics on a reply that is
    /// not for one of `ids` or repeats one, and on a 503 without `retryAfter` 1 (PROTOCOL 7.1).
    /// Returns the counts; `ids` is left holding the commands never answered.
    pub async fn burst_replies(
        &mut self,
        gateway: &str,
        ids: &mut std::collections::BTreeSet<String>,
        within: Duration,
    ) -> std::collections::BTreeMap<String, usize> {
        let replies = device_topic(gateway, "replies");
        let mut kinds = std::collections::BTreeMap::new();
        let deadline = std::time::Instant::now() + within;
        while !ids.is_empty() && std::time::Instant::now() < deadline {
            for m in self.collect(&replies, Duration::from_millis(500)).await {
                let r = m.json();
                let id = r["commandId"].as_str().unwrap_or_default().to_owned();
                assert!(
                    ids.remove(&id),
                    "one reply per command, and only for ours: {r}"
                );
                if r["status"] == 503 {
                    assert_eq!(r["retryAfter"], 1, "{r}");
                }
                *kinds
                    .entry(format!(
                        "{} {}",
                        r["type"].as_str().unwrap_or("?"),
                        r["status"]
                    ))
                    .or_default() += 1;
            }
        }
        kinds
    }

    /// Publishes `command` on its gateway's commands topic, attested by `signer` for the server
    /// key `key-server` of `workspace`, issued now and valid for 300 s.
    pub async fn send_server_command(
        &self,
        signer: &PlatformSigner,
        workspace: &str,
        command: AttestedCommand<'_>,
    ) {
        let key = ApiKey::server("key-server", workspace);
        let topic = device_topic(command.gateway, "commands");
        let claims = signer.claims(&key, command, system_secs(), 300);
        self.publish(&topic, signer.attest(&claims).into_bytes(), false)
            .await;
    }

    /// The reply to command `id` on `gateway`'s replies topic (which the peer subscribes to).
    pub async fn reply(&mut self, gateway: &str, id: &str, timeout: Duration) -> serde_json::Value {
        self.expect(&device_topic(gateway, "replies"), timeout, |m| {
            m.json()["commandId"] == id
        })
        .await
        .json()
    }
}

/// The device topics, as the agent lays them out.
pub fn device_topic(device_id: &str, leaf: &str) -> String {
    format!("texture/v1/devices/{device_id}/{leaf}")
}

/// The platform's side of a test: a peer subscribed to `subscriptions` that has published
/// `signer`'s trust bundle (version 1, valid for an hour), retained.
pub async fn platform_peer(
    pki: &Pki,
    port: u16,
    signer: &PlatformSigner,
    subscriptions: &[&str],
) -> Peer {
    let peer = Peer::connect(pki, port, PLATFORM_CLIENT, subscriptions).await;
    let now = system_secs();
    peer.publish(
        &Topics::trust_bundle(),
        signer.trust_bundle(1, now, now + 3_600, &[]),
        true,
    )
    .await;
    peer
}

/// What most end-to-end tests start from: a PKI, a private mosquitto, and the platform on it
/// (`signer`'s trust bundle published, a peer subscribed to the test's topics). Tests take it
/// apart: `let Testbed { pki, broker, signer, mut peer } = Testbed::start(..).await;`.
pub struct Testbed {
    pub pki: Pki,
    pub broker: Mosquitto,
    pub signer: PlatformSigner,
    pub peer: Peer,
}

impl Testbed {
    pub async fn start(signer: PlatformSigner, subscriptions: &[&str]) -> Testbed {
        let pki = Pki::new();
        let broker = Mosquitto::start(&pki);
        let peer = platform_peer(&pki, broker.port, &signer, subscriptions).await;
        Testbed {
            pki,
            broker,
            signer,
            peer,
        }
    }
}
