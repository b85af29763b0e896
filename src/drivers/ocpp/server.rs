//! The WebSocket side: the listening socket, the HTTP upgrade's checks, and one task per
//! connection that only moves frames between its socket and the driver task (`mod.rs`), which
//! owns every session. What a charge point may do is decided in [`admit`] (pure) and in
//! `session.rs`; this file is I/O.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::session::RateLimit;
use super::settings::OcppSettings;

/// The subprotocol of OCPP-J 1.6 (OCPP-J 1.6, 3.1.2).
pub(crate) const SUBPROTOCOL: &str = "ocpp1.6";

/// How long a client may take from its TCP connect to a finished upgrade.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What one connection reads from its socket at a time; a larger message is assembled beyond it.
const READ_BUFFER: usize = 4096;

/// Bytes of our frames one connection may hold unsent (a charger that does not read): then
/// writing fails and the connection closes. Our largest frame is about 1 KiB.
const MAX_WRITE_BUFFER: usize = 64 * 1024;

/// Frames queued to one connection before the driver stops waiting for it (a charger that does
/// not read is closed, not buffered without end).
const OUTGOING_QUEUE: usize = 16;

/// Connection `conn` of the charge point at index `cp` of the settings' list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConnId {
    pub(crate) cp: usize,
    pub(crate) conn: u64,
}

/// From a connection task to the driver task.
#[derive(Debug)]
pub(crate) enum Event {
    Connected {
        id: ConnId,
        outgoing: mpsc::Sender<Outgoing>,
    },
    Text {
        id: ConnId,
        text: String,
    },
    /// A ping: the charger is there, though it said nothing.
    Alive {
        id: ConnId,
    },
    /// More messages than `max_messages_per_sec`; the connection drops the rest.
    OverRate {
        id: ConnId,
    },
    Closed {
        id: ConnId,
        why: String,
    },
}

/// From the driver task to one connection.
#[derive(Debug)]
pub(crate) enum Outgoing {
    Text(String),
    Close(CloseCode, &'static str),
}

/// Why an upgrade was refused: the HTTP status and a body for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) status: StatusCode,
    pub(crate) body: &'static str,
}

/// Which configured charge point an upgrade request is, or why it is refused: an unknown path
/// or id is 404, a wrong or missing password 401 (when one is configured), no `ocpp1.6` among
/// the offered subprotocols 400.
pub(crate) fn admit(settings: &OcppSettings, request: &Request) -> Result<usize, Refusal> {
    let refuse = |status, body| Refusal { status, body };
    let id = request
        .uri()
        .path()
        .strip_prefix(settings.path.as_str())
        .and_then(|rest| rest.strip_prefix('/'))
        .filter(|id| !id.is_empty() && !id.contains('/'))
        .ok_or(refuse(StatusCode::NOT_FOUND, "no such path"))?;
    let cp = settings
        .charge_points
        .iter()
        .position(|c| c.id == id)
        .ok_or(refuse(StatusCode::NOT_FOUND, "unknown charge point"))?;
    if let Some(password) = &settings.charge_points[cp].password {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b64| {
                base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .ok()
            });
        let expected = format!("{id}:{}", password.expose());
        if !given.is_some_and(|given| same_bytes(&given, expected.as_bytes())) {
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                "wrong or missing credentials",
            ));
        }
    }
    let offered = request
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == SUBPROTOCOL);
    if !offered {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "the ocpp1.6 subprotocol is required",
        ));
    }
    Ok(cp)
}

/// Compares without stopping at the first difference, so the time taken does not tell how
/// much of a guessed password was right.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Accepts connections until the driver task drops `events`. At most `2 × charge points + 4`
/// sockets are open at once (each configured charger, a replacement connecting while its old
/// socket is still open, and a few that are being refused); more are closed at once.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    settings: Arc<OcppSettings>,
    events: mpsc::Sender<Event>,
) {
    let sockets = Arc::new(Semaphore::new(2 * settings.charge_points.len() + 4));
    let mut next_conn = 0u64;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, say: wait instead of spinning.
                tracing::warn!(driver = %settings.name, error = %e, "ocpp: accept failed");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        if events.is_closed() {
            return;
        }
        let Ok(permit) = sockets.clone().try_acquire_owned() else {
            tracing::warn!(driver = %settings.name, %peer, "ocpp: too many connections; closed");
            continue;
        };
        next_conn += 1;
        let (settings, events, conn) = (settings.clone(), events.clone(), next_conn);
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => connection(stream, peer, conn, settings, events).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => connection(stream, peer, conn, settings, events).await,
                        // A charger set to ws:// on a wss:// port, or not trusting our
                        // certificate: the installer needs to see it.
                        Ok(Err(e)) => tracing::warn!(driver = %settings.name, %peer,
                            error = %e, "ocpp: TLS handshake failed"),
                        Err(_) => tracing::warn!(driver = %settings.name, %peer,
                            "ocpp: TLS handshake timed out"),
                    }
                }
            }
            drop(permit);
        });
    }
}

/// One socket: the upgrade, then frames both ways until either side closes.
async fn connection<S>(
    stream: S,
    peer: std::net::SocketAddr,
    conn: u64,
    settings: Arc<OcppSettings>,
    events: mpsc::Sender<Event>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut admitted = None;
    // The result type is tungstenite's `Callback`'s, not ours to shrink.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, mut response: Response| match admit(&settings, request) {
        Ok(cp) => {
            admitted = Some(cp);
            response.headers_mut().insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static(SUBPROTOCOL),
            );
            Ok(response)
        }
        Err(refusal) => {
            tracing::warn!(driver = %settings.name, %peer, path = request.uri().path(),
                    status = refusal.status.as_u16(), "ocpp: upgrade refused: {}", refusal.body);
            let mut response = ErrorResponse::new(Some(refusal.body.to_owned()));
            *response.status_mut() = refusal.status;
            if refusal.status == StatusCode::UNAUTHORIZED {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"ocpp\""),
                );
            }
            Err(response)
        }
    };
    // tungstenite's defaults buffer 128 KiB each way per connection, which on a gateway is
    // most of its heap for two chargers; OCPP frames are a few hundred bytes, sent one at a time.
    let config = WebSocketConfig::default()
        .max_message_size(Some(settings.max_message_bytes))
        .max_frame_size(Some(settings.max_message_bytes))
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(MAX_WRITE_BUFFER);
    let upgrade = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config));
    let mut ws = match tokio::time::timeout(HANDSHAKE_TIMEOUT, upgrade).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            tracing::debug!(driver = %settings.name, %peer, error = %e, "ocpp: no upgrade");
            return;
        }
        Err(_) => {
            tracing::debug!(driver = %settings.name, %peer, "ocpp: upgrade timed out");
            return;
        }
    };
    let Some(cp) = admitted else { return };
    let id = ConnId { cp, conn };
    let (outgoing, mut to_send) = mpsc::channel(OUTGOING_QUEUE);
    if events
        .send(Event::Connected { id, outgoing })
        .await
        .is_err()
    {
        return;
    }
    let mut rate = RateLimit::new(settings.max_messages_per_sec, std::time::Instant::now());
    let mut over_rate = false;
    let why = loop {
        tokio::select! {
            out = to_send.recv() => match out {
                Some(Outgoing::Text(text)) => {
                    if let Err(e) = ws.send(Message::text(text)).await {
                        break format!("send failed: {e}");
                    }
                }
                Some(Outgoing::Close(code, reason)) => {
                    close(&mut ws, Some(CloseFrame { code, reason: reason.into() })).await;
                    break format!("closed by the central system: {reason}");
                }
                None => {
                    close(&mut ws, None).await;
                    break "the driver stopped".to_owned();
                }
            },
            incoming = ws.next() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    if over_rate {
                        // Dropped: the driver's close is on its way behind the answers.
                        continue;
                    }
                    if !super::frame::is_answer(&text) && !rate.admit(std::time::Instant::now()) {
                        // The driver closes the connection (1008) once the frames admitted
                        // before this one are answered, so their answers are not lost.
                        over_rate = true;
                        if events.send(Event::OverRate { id }).await.is_err() {
                            break "the driver stopped".to_owned();
                        }
                        continue;
                    }
                    let text = text.as_str().to_owned();
                    if events.send(Event::Text { id, text }).await.is_err() {
                        break "the driver stopped".to_owned();
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {
                    // tungstenite queues the pong itself; it goes out with the next write.
                    let _ = ws.flush().await;
                    if events.send(Event::Alive { id }).await.is_err() {
                        break "the driver stopped".to_owned();
                    }
                }
                Some(Ok(Message::Binary(_))) => {
                    close(&mut ws, Some(CloseFrame {
                        code: CloseCode::Unsupported,
                        reason: "OCPP-J uses text frames".into(),
                    })).await;
                    break "a binary frame".to_owned();
                }
                Some(Ok(Message::Close(frame))) => {
                    break format!("closed by the charge point ({})",
                        frame.map_or("no code".to_owned(), |f| u16::from(f.code).to_string()));
                }
                Some(Ok(Message::Frame(_))) => {}
                Some(Err(WsError::Capacity(e))) => {
                    close(&mut ws, Some(CloseFrame {
                        code: CloseCode::Size,
                        reason: "message too big".into(),
                    })).await;
                    break format!("oversized: {e}");
                }
                Some(Err(e)) => break format!("connection error: {e}"),
                None => break "connection closed".to_owned(),
            },
        }
    };
    let _ = events.send(Event::Closed { id, why }).await;
}

/// How long a closed connection waits for the charger's own close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Sends a close frame and reads on until the charger answers it (or [`CLOSE_TIMEOUT`]): a
/// socket dropped with the charger's frames still unread is reset by the kernel, and the
/// charger would see 1006 instead of the close code that says why.
async fn close<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, frame: Option<CloseFrame>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if ws.close(frame).await.is_err() {
        return;
    }
    let drain = async {
        while let Some(Ok(message)) = ws.next().await {
            if message.is_close() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::ocpp::settings::tests::settings;

    fn request(path: &str, headers: &[(&str, &str)]) -> Request {
        let mut builder = Request::builder().uri(path);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(()).unwrap()
    }

    fn basic(user_password: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(user_password)
        )
    }

    #[test]
    fn only_a_configured_id_on_the_path_with_its_password_and_ocpp1_6_is_admitted() {
        let s = settings();
        let good = basic("CP-1:correct-horse");
        let proto = ("sec-websocket-protocol", "ocpp2.0.1, ocpp1.6");
        let status = |path: &str, headers: &[(&str, &str)]| {
            admit(&s, &request(path, headers)).map_err(|r| r.status.as_u16())
        };
        assert_eq!(
            status("/ocpp/CP-1", &[("authorization", &good), proto]),
            Ok(0)
        );
        assert_eq!(
            status("/ocpp/CP-2", &[("authorization", &good), proto]),
            Err(404)
        );
        assert_eq!(
            status("/other/CP-1", &[("authorization", &good), proto]),
            Err(404)
        );
        assert_eq!(
            status("/ocpp/CP-1/x", &[("authorization", &good), proto]),
            Err(404)
        );
        assert_eq!(
            status("/ocpp/", &[("authorization", &good), proto]),
            Err(404)
        );
        assert_eq!(status("/ocpp/CP-1", &[proto]), Err(401));
        let wrong = basic("CP-1:correct-horsf");
        assert_eq!(
            status("/ocpp/CP-1", &[("authorization", &wrong), proto]),
            Err(401)
        );
        let other_user = basic("CP-2:correct-horse");
        assert_eq!(
            status("/ocpp/CP-1", &[("authorization", &other_user), proto]),
            Err(401)
        );
        assert_eq!(status("/ocpp/CP-1", &[("authorization", &good)]), Err(400));
        let v201 = ("sec-websocket-protocol", "ocpp2.0.1");
        assert_eq!(
            status("/ocpp/CP-1", &[("authorization", &good), v201]),
            Err(400)
        );
    }

    #[test]
    fn without_a_password_no_credentials_are_asked_for() {
        let mut s = settings();
        s.charge_points[0].password = None;
        let r = request("/ocpp/CP-1", &[("sec-websocket-protocol", "ocpp1.6")]);
        assert_eq!(admit(&s, &r), Ok(0));
    }
}
