//! Bytes the broker connection carries, as the kernel counts them (for the monthly data
//! budget, PROTOCOL 14.10).
//!
//! A metered plan bills what crosses the socket: TLS records, MQTT framing, keepalives, the
//! handshake of every reconnect. The MQTT client hides its socket, so the meter finds it: the
//! TCP socket of this process whose peer port is the broker's, and reads the kernel's
//! `TCP_INFO` counters of it (`tcpi_bytes_acked` sent and acknowledged, `tcpi_bytes_received`;
//! Linux 4.2 and later). The counters are cumulative per socket; the meter remembers each
//! socket's last reading by its inode and hands out only what is new, so a reconnect (a new
//! socket) is counted from its first byte. What a connection carries after the meter's last
//! reading and before it closes is missed: at most one reading interval's worth per lost
//! connection. TCP/IP headers and retransmissions are not counted either.

use std::collections::HashMap;
use std::os::fd::RawFd;

/// Offsets in `struct tcp_info` (linux/tcp.h), stable since Linux 4.2.
const BYTES_ACKED: usize = 120;
const BYTES_RECEIVED: usize = 128;
const TCP_INFO_LEN: usize = 136;

#[derive(Debug)]
pub(crate) struct Meter {
    peer_port: u16,
    /// The last reading of each broker socket, by inode: (sent, received).
    seen: HashMap<u64, (u64, u64)>,
    /// Whether the log has been told that this kernel gives no counters.
    told_unavailable: bool,
}

impl Meter {
    pub(crate) fn new(peer_port: u16) -> Meter {
        Meter {
            peer_port,
            seen: HashMap::new(),
            told_unavailable: false,
        }
    }

    /// Bytes (sent, received) on the broker connection since the last call.
    pub(crate) fn take(&mut self) -> (u64, u64) {
        let mut now = HashMap::new();
        let (mut sent, mut received) = (0, 0);
        for (inode, fd) in sockets() {
            if peer_port(fd) != Some(self.peer_port) {
                continue;
            }
            let Some((s, r)) = tcp_counters(fd) else {
                if !self.told_unavailable {
                    self.told_unavailable = true;
                    tracing::warn!(
                        "this kernel gives no TCP byte counters: data usage is not counted"
                    );
                }
                continue;
            };
            // A new socket's sent counter starts at 1: the kernel counts our SYN as a byte sent
            // and acknowledged (the peer's SYN is not counted as received; its FIN is, as 1).
            let (last_s, last_r) = self.seen.get(&inode).copied().unwrap_or((1, 0));
            sent += s.saturating_sub(last_s);
            received += r.saturating_sub(last_r);
            now.insert(inode, (s, r));
        }
        // Sockets that closed are forgotten; their inodes may be reused.
        self.seen = now;
        (sent, received)
    }
}

/// Whether this kernel gives `TCP_INFO` byte counters (Linux 4.2 and later do; user-mode
/// emulators such as qemu-user do not pass the option through).
#[cfg(test)]
fn kernel_counts() -> bool {
    use std::os::fd::AsRawFd;
    std::net::TcpListener::bind("127.0.0.1:0")
        .map(|l| tcp_counters(l.as_raw_fd()).is_some())
        .unwrap_or(false)
}

/// This process's sockets: (inode, fd), from `/proc/self/fd`.
fn sockets() -> Vec<(u64, RawFd)> {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let fd: RawFd = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            let inode = target
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()?;
            Some((inode, fd))
        })
        .collect()
}

/// The peer port of `fd`, if it is a connected IPv4 or IPv6 socket.
fn peer_port(fd: RawFd) -> Option<u16> {
    // SAFETY: a zeroed sockaddr_storage is a valid out-buffer of the size passed.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `addr` and `len` are valid for writes; a stale fd only makes the call fail.
    let rc = unsafe { libc::getpeername(fd, (&raw mut addr).cast(), &mut len) };
    if rc != 0 {
        return None;
    }
    match i32::from(addr.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let v4: &libc::sockaddr_in = unsafe { &*(&raw const addr).cast() };
            Some(u16::from_be(v4.sin_port))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let v6: &libc::sockaddr_in6 = unsafe { &*(&raw const addr).cast() };
            Some(u16::from_be(v6.sin6_port))
        }
        _ => None,
    }
}

/// `tcpi_bytes_acked` and `tcpi_bytes_received` of TCP socket `fd`.
fn tcp_counters(fd: RawFd) -> Option<(u64, u64)> {
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: `info` is valid for `len` bytes of writes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 || (len as usize) < TCP_INFO_LEN {
        return None;
    }
    let at =
        |offset: usize| u64::from_ne_bytes(info[offset..offset + 8].try_into().expect("8 bytes"));
    Some((at(BYTES_ACKED), at(BYTES_RECEIVED)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// The meter counts what a real socket carries, both ways, once; a second socket to the
    /// same port adds its own bytes; a closed one is forgotten.
    #[test]
    fn counts_a_real_sockets_bytes_once_and_a_new_socket_from_zero() {
        if !kernel_counts() {
            eprintln!("TCP_INFO byte counters unavailable (user-mode emulation): not checked");
            return;
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        // The server keeps each connection open until told, so no FIN is counted.
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let mut open = Vec::new();
            for _ in 0..2 {
                let (mut s, _) = listener.accept().unwrap();
                let mut buf = [0u8; 1000];
                s.read_exact(&mut buf).unwrap();
                s.write_all(&[7u8; 300]).unwrap();
                open.push(s);
            }
            done_rx.recv().unwrap();
        });
        let mut meter = Meter::new(port);
        assert_eq!(meter.take(), (0, 0), "no connection yet");
        let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        client.write_all(&[1u8; 1000]).unwrap();
        let mut answer = [0u8; 300];
        client.read_exact(&mut answer).unwrap();
        // The peer's ACK of the last bytes may trail the answer by a moment.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut total = (0, 0);
        while total != (1000, 300) && std::time::Instant::now() < deadline {
            let (s, r) = meter.take();
            total = (total.0 + s, total.1 + r);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(total, (1000, 300));
        assert_eq!(meter.take(), (0, 0), "nothing new");
        drop(client);
        let mut second = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        second.write_all(&[2u8; 1000]).unwrap();
        second.read_exact(&mut answer).unwrap();
        let mut total = (0, 0);
        while total != (1000, 300) && std::time::Instant::now() < deadline {
            let (s, r) = meter.take();
            total = (total.0 + s, total.1 + r);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(total, (1000, 300), "the new socket, from its first byte");
        done_tx.send(()).unwrap();
        server.join().unwrap();
    }
}
