//! The local control socket: how `texture-agent pair` talks to the running daemon.
//!
//! A Unix stream socket in the runtime directory, mode 0600 inside a 0700 directory, so only the
//! agent's own user (and root) can start a pairing session: being able to pair is being able to
//! hand the gateway to a new owner. The protocol is JSON lines: one request from the client, then
//! a stream of [`ControlEvent`]s until the session ends (docs/PROTOCOL.md, "Control socket").

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

pub const SOCKET_FILE: &str = "control.sock";
/// Longest request line accepted.
const MAX_REQUEST: u64 = 1024;

pub fn socket_path(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join(SOCKET_FILE)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ControlRequest {
    /// Start a pairing session and stream its progress.
    Pair,
}

/// Progress of a pairing session, as streamed to the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum ControlEvent {
    /// The code to enter on the Connect page, and a URI for the QR code.
    #[serde(rename_all = "camelCase")]
    Code {
        code: String,
        device_id: String,
        expires_at: u64,
        qr_uri: String,
    },
    /// Still waiting for the platform's binding.
    #[serde(rename_all = "camelCase")]
    Waiting {
        remaining_secs: u64,
        link: String,
    },
    /// A binding arrived but was refused; the session goes on.
    Rejected {
        reason: String,
    },
    #[serde(rename_all = "camelCase")]
    Paired {
        reference_id: String,
        version: u64,
    },
    Expired,
    Error {
        message: String,
    },
}

impl ControlEvent {
    /// Whether the session is over after this event.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            ControlEvent::Paired { .. } | ControlEvent::Expired | ControlEvent::Error { .. }
        )
    }
}

/// A request from a client, with the channel its events go back on.
pub struct ControlCall {
    pub request: ControlRequest,
    pub events: mpsc::Sender<ControlEvent>,
}

/// Binds the socket (replacing a stale one) with owner-only permissions.
pub fn bind(runtime_dir: &Path) -> std::io::Result<UnixListener> {
    let path = socket_path(runtime_dir);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Accepts clients forever, forwarding each request to the dispatcher.
pub async fn serve(listener: UnixListener, calls: mpsc::Sender<ControlCall>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(handle(stream, calls.clone()));
    }
}

async fn handle(stream: UnixStream, calls: mpsc::Sender<ControlCall>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST));
    if reader.read_line(&mut line).await.is_err() {
        return;
    }
    let (tx, mut rx) = mpsc::channel(8);
    match serde_json::from_str::<ControlRequest>(line.trim()) {
        Ok(request) => {
            if calls
                .send(ControlCall {
                    request,
                    events: tx,
                })
                .await
                .is_err()
            {
                return;
            }
        }
        Err(e) => {
            let _ = tx
                .send(ControlEvent::Error {
                    message: format!("bad request: {e}"),
                })
                .await;
        }
    }
    while let Some(event) = rx.recv().await {
        let mut text = serde_json::to_string(&event).expect("events serialise");
        text.push('\n');
        if write.write_all(text.as_bytes()).await.is_err() || event.is_final() {
            return;
        }
    }
}
