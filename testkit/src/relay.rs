//! A TCP relay on 127.0.0.1 that counts the bytes crossing it: the gateway's socket as the
//! network sees it. Everything the agent and the broker exchange through it is TCP payload
//! (TLS records, MQTT framing, PUBACKs, keepalives), so its counts are what a metered link
//! bills, less the TCP/IP headers. [`ByteRelay::cut`] drops every connection at once, as a
//! link that goes away does, and [`ByteRelay::refuse`] keeps it away: while set, every new
//! connection is closed as soon as it is accepted, before anything reaches the broker.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A relay from an ephemeral port to `127.0.0.1:<target>`.
pub struct ByteRelay {
    /// Where clients connect.
    pub port: u16,
    counts: Arc<Counts>,
    /// Both halves of every connection, so `cut` can shut them down.
    open: Arc<Mutex<Vec<TcpStream>>>,
}

#[derive(Default)]
struct Counts {
    /// Client to target (the gateway's upload).
    up: AtomicU64,
    /// Target to client.
    down: AtomicU64,
    connections: AtomicU64,
    refusing: AtomicBool,
}

impl ByteRelay {
    pub fn start(target: u16) -> ByteRelay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let counts = Arc::new(Counts::default());
        let open = Arc::new(Mutex::new(Vec::new()));
        let (c, o) = (counts.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if c.refusing.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                c.connections.fetch_add(1, Ordering::SeqCst);
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut open = o.lock().unwrap();
                    open.push(client.try_clone().unwrap());
                    open.push(server.try_clone().unwrap());
                }
                pump(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    c.clone(),
                    true,
                );
                pump(server, client, c.clone(), false);
            }
        });
        ByteRelay { port, counts, open }
    }

    /// Bytes (up, down) since the start or the last [`ByteRelay::reset`].
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.counts.up.load(Ordering::SeqCst),
            self.counts.down.load(Ordering::SeqCst),
        )
    }

    pub fn reset(&self) {
        self.counts.up.store(0, Ordering::SeqCst);
        self.counts.down.store(0, Ordering::SeqCst);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.counts.connections.load(Ordering::SeqCst)
    }

    /// While `refusing`, new connections are closed at once (the link stays down); open ones
    /// are left as they are (see [`ByteRelay::cut`]).
    pub fn refuse(&self, refusing: bool) {
        self.counts.refusing.store(refusing, Ordering::SeqCst);
    }

    /// Drops every open connection, both ways.
    pub fn cut(&self) {
        for stream in self.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

/// Copies `from` to `to` on a thread of its own, counting, until either side ends.
fn pump(mut from: TcpStream, mut to: TcpStream, counts: Arc<Counts>, up: bool) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
            let counter = if up { &counts.up } else { &counts.down };
            counter.fetch_add(n as u64, Ordering::SeqCst);
        }
        let _ = to.shutdown(Shutdown::Write);
        let _ = from.shutdown(Shutdown::Read);
    });
}
