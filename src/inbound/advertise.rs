//! When the capabilities message (docs/PROTOCOL.md 13) goes out.
//!
//! The message is the largest thing the gateway publishes on its own: 3 KB for one battery,
//! most of it the commands' input schemas. At start-up the link connects and the drivers
//! report their first devices within the same second, and each used to publish it: twice
//! within a second, once with no devices. So a reason to publish (a CONNACK, a change of the
//! device list) only *schedules* it, [`SETTLE`] later, and every reason until then rides on
//! the same message; and a message identical to the one already published on this connection
//! is not sent again. Every new connection publishes it once, since a broker that lost its
//! retained messages (a restart, another node of a cluster) must get it back.
//!
//! Pure: the router feeds it events and instants and publishes what [`Advertiser::fire`]
//! returns.

use std::time::Duration;

use tokio::time::Instant;

/// How long a reason to publish waits for the others that follow it.
pub(crate) const SETTLE: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub(crate) struct Advertiser {
    due: Option<Instant>,
    /// What was published last, and on which connection (the link's connect count): keyed by
    /// the connection rather than cleared on a CONNACK, so a message published on a new
    /// connection just before the router hears of the CONNACK still counts for it.
    sent: Option<(u64, Vec<u8>)>,
}

impl Advertiser {
    /// A CONNACK: the new connection needs the message (unless it already had it).
    pub(crate) fn connected(&mut self, now: Instant) {
        self.schedule(now);
    }

    /// The device list (or a device's type or availability) changed.
    pub(crate) fn devices_changed(&mut self, now: Instant) {
        self.schedule(now);
    }

    /// A reason that comes while one is pending does not postpone it: the message goes out
    /// at most [`SETTLE`] after the first.
    fn schedule(&mut self, now: Instant) {
        self.due.get_or_insert(now + SETTLE);
    }

    /// When [`Advertiser::fire`] is next due, if anything is pending.
    pub(crate) fn due(&self) -> Option<Instant> {
        self.due
    }

    /// At the deadline, with the message as it stands and the connection the link is on
    /// (`None` while it is down): what to publish, if anything. Nothing while the link is down
    /// (the next CONNACK schedules it again) or when this connection already has this very
    /// message.
    pub(crate) fn fire(&mut self, message: Vec<u8>, connection: Option<u64>) -> Option<Vec<u8>> {
        self.due = None;
        let connection = connection?;
        if self
            .sent
            .as_ref()
            .is_some_and(|(on, sent)| *on == connection && *sent == message)
        {
            return None;
        }
        self.sent = Some((connection, message.clone()));
        Some(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connack_and_the_first_devices_within_a_second_are_one_message() {
        let t0 = Instant::now();
        let mut a = Advertiser::default();
        assert_eq!(a.due(), None);
        a.connected(t0);
        a.devices_changed(t0 + Duration::from_millis(300));
        a.devices_changed(t0 + Duration::from_millis(900));
        assert_eq!(a.due(), Some(t0 + SETTLE), "not postponed by later reasons");
        assert_eq!(
            a.fire(b"two devices".to_vec(), Some(1)),
            Some(b"two devices".to_vec())
        );
        assert_eq!(a.due(), None);
    }

    #[test]
    fn the_same_message_is_not_sent_twice_on_a_connection_but_once_on_every_new_one() {
        let t0 = Instant::now();
        let mut a = Advertiser::default();
        a.connected(t0);
        assert!(a.fire(b"m".to_vec(), Some(1)).is_some());
        a.devices_changed(t0);
        assert_eq!(a.fire(b"m".to_vec(), Some(1)), None, "unchanged");
        a.devices_changed(t0);
        assert!(a.fire(b"m2".to_vec(), Some(1)).is_some(), "changed");
        a.connected(t0);
        assert_eq!(
            a.fire(b"m2".to_vec(), Some(2)),
            Some(b"m2".to_vec()),
            "new connection"
        );
    }

    #[test]
    fn a_message_sent_on_a_new_connection_before_its_connack_is_heard_is_not_repeated() {
        let t0 = Instant::now();
        let mut a = Advertiser::default();
        a.devices_changed(t0);
        // The timer fires with the link already on connection 2...
        assert!(a.fire(b"m".to_vec(), Some(2)).is_some());
        // ...and then the router hears of that CONNACK.
        a.connected(t0);
        assert_eq!(a.fire(b"m".to_vec(), Some(2)), None);
    }

    #[test]
    fn nothing_is_published_while_the_link_is_down() {
        let t0 = Instant::now();
        let mut a = Advertiser::default();
        a.devices_changed(t0);
        assert_eq!(a.fire(b"m".to_vec(), None), None);
        a.connected(t0);
        assert_eq!(a.fire(b"m".to_vec(), Some(1)), Some(b"m".to_vec()));
    }
}
