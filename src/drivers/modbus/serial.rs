//! A serial port for Modbus RTU: opened raw (8 data bits, the configured baud rate, parity and
//! stop bits), held exclusively, and driven by tokio's reactor.
//!
//! Why not tokio-serial: it brings 31 crates (mio-serial, serialport and two versions of nix)
//! into a binary with a dependency budget, for what is one `open`, one `tcsetattr` and an
//! [`AsyncFd`] here. Why exclusive: two programs on one RS-485 bus interleave their frames and
//! both read garbage, so a second opener (an installer running `texture-agent discover` while
//! the daemon polls) is refused with a message that says so. `flock` is what makes that hold
//! for root too (TIOCEXCL does not stop a process with CAP_SYS_ADMIN); both are taken.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The baud rates a port may be set to (what termios names and RS-485 devices use), with
/// their termios constants.
const BAUD_RATES: [(u32, libc::speed_t); 9] = [
    (1_200, libc::B1200),
    (2_400, libc::B2400),
    (4_800, libc::B4800),
    (9_600, libc::B9600),
    (19_200, libc::B19200),
    (38_400, libc::B38400),
    (57_600, libc::B57600),
    (115_200, libc::B115200),
    (230_400, libc::B230400),
];

/// `Err` naming the rates there are when `baud` is not one of [`BAUD_RATES`]; the one check
/// for the configuration and for `discover --baud`.
pub(crate) fn check_baud(baud: u32) -> Result<(), String> {
    speed(baud).map(|_| ()).map_err(|_| {
        let rates: Vec<String> = BAUD_RATES.iter().map(|(r, _)| r.to_string()).collect();
        format!("{baud} is not one of {}", rates.join(", "))
    })
}

/// `Err` unless 1 or 2.
pub(crate) fn check_stop_bits(bits: u8) -> Result<(), String> {
    match bits {
        1 | 2 => Ok(()),
        other => Err(format!("expected 1 or 2, found {other}")),
    }
}

/// Serial parity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    /// No parity bit: what most inverters and meters ship with ("8N1").
    #[default]
    None,
    /// The Modbus standard's default ("8E1").
    Even,
    Odd,
}

impl Parity {
    pub(crate) fn parse(text: &str) -> Result<Parity, String> {
        match text {
            "none" => Ok(Parity::None),
            "even" => Ok(Parity::Even),
            "odd" => Ok(Parity::Odd),
            other => Err(format!(
                "{other:?} is not a parity: expected none, even or odd"
            )),
        }
    }

    /// As the configuration spells it.
    fn name(self) -> &'static str {
        match self {
            Parity::None => "none",
            Parity::Even => "even",
            Parity::Odd => "odd",
        }
    }

    fn letter(self) -> char {
        match self {
            Parity::None => 'N',
            Parity::Even => 'E',
            Parity::Odd => 'O',
        }
    }
}

/// How to open one serial port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SerialSettings {
    pub(crate) path: PathBuf,
    pub(crate) baud: u32,
    pub(crate) parity: Parity,
    /// 1 or 2.
    pub(crate) stop_bits: u8,
}

impl SerialSettings {
    /// `/dev/ttyUSB0 9600 8N1`, for logs and errors.
    pub(crate) fn describe(&self) -> String {
        format!(
            "{} {} 8{}{}",
            self.path.display(),
            self.baud,
            self.parity.letter(),
            self.stop_bits
        )
    }

    /// The silence that must separate two frames: 3.5 character times (11 bits each), and
    /// at least 1.75 ms, as the Modbus serial line specification fixes it above 19200 baud.
    pub(crate) fn frame_gap(&self) -> Duration {
        let micros = 3.5 * 11.0 * 1_000_000.0 / f64::from(self.baud.max(1));
        Duration::from_micros(micros.max(1_750.0) as u64)
    }
}

/// An open serial port (closed when dropped, which also releases the lock).
#[derive(Debug)]
pub(crate) struct SerialPort {
    fd: AsyncFd<OwnedFd>,
}

impl SerialPort {
    /// Opens and configures the port; any input waiting on it is discarded (a late answer to
    /// a request from before is not the answer to the next one).
    pub(crate) fn open(settings: &SerialSettings) -> io::Result<SerialPort> {
        let fd = open_raw(&settings.path)?;
        lock(&fd, &settings.path)?;
        configure(&fd, settings)?;
        // SAFETY: `fd` is an open descriptor the AsyncFd takes ownership of; an OwnedFd
        // always returns that same descriptor and closes it only when dropped with it.
        let fd = unsafe { AsyncFd::register(fd) }?;
        Ok(SerialPort { fd })
    }
}

fn open_raw(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))?;
    // SAFETY: a valid NUL-terminated path; the returned descriptor is owned below.
    let raw = unsafe {
        libc::open(
            c_path.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor this function just opened and nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn lock(fd: &OwnedFd, path: &Path) -> io::Result<()> {
    // SAFETY: plain syscalls on a descriptor we own.
    if unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!(
                    "{} is in use by another program (the texture-agent service? two programs \
                     on one bus garble each other's frames)",
                    path.display()
                ),
            ));
        }
        return Err(e);
    }
    // SAFETY: as above; TIOCEXCL takes no argument.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCEXCL) } != 0 {
        let e = io::Error::last_os_error();
        // Not a terminal: a path that is no serial port.
        if e.raw_os_error() == Some(libc::ENOTTY) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a serial port", path.display()),
            ));
        }
        return Err(e);
    }
    Ok(())
}

fn speed(baud: u32) -> io::Result<libc::speed_t> {
    BAUD_RATES
        .iter()
        .find(|(rate, _)| *rate == baud)
        .map(|(_, speed)| *speed)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{baud} is not a baud rate this port can be set to"),
            )
        })
}

/// The line bits that make a frame: data bits, parity and stop bits.
const FRAME_BITS: libc::tcflag_t = libc::CSIZE | libc::PARENB | libc::PARODD | libc::CSTOPB;

fn configure(fd: &OwnedFd, s: &SerialSettings) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    let check = |r: libc::c_int| {
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    let rate = speed(s.baud)?;
    // SAFETY: termios is plain data; every call gets a valid descriptor and pointer.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        check(libc::tcgetattr(raw, &mut t))?;
        libc::cfmakeraw(&mut t);
        t.c_cflag &= !(FRAME_BITS | libc::CRTSCTS);
        t.c_cflag |= libc::CS8 | libc::CLOCAL | libc::CREAD;
        match s.parity {
            Parity::None => {}
            Parity::Even => t.c_cflag |= libc::PARENB,
            Parity::Odd => t.c_cflag |= libc::PARENB | libc::PARODD,
        }
        if s.stop_bits == 2 {
            t.c_cflag |= libc::CSTOPB;
        }
        t.c_iflag &= !(libc::IXON | libc::IXOFF | libc::IXANY);
        // Non-blocking reads through the reactor, with no inter-byte timer. VMIN 1, not 0: with
        // VMIN and VTIME both 0 the tty driver answers an empty read with 0 bytes instead of
        // EAGAIN, so readiness is never cleared and the reader spins until the answer comes
        // (measured: 0.08 s of CPU per minute polling two units every 5 s). With VMIN 1 and
        // O_NONBLOCK an empty read is EAGAIN, and 0 bytes is a real end: a hangup.
        t.c_cc[libc::VMIN] = 1;
        t.c_cc[libc::VTIME] = 0;
        check(libc::cfsetispeed(&mut t, rate))?;
        check(libc::cfsetospeed(&mut t, rate))?;
        // What tcsetattr returns says little: POSIX lets it succeed when any one change took,
        // and glibc fails it with EINVAL when none did (a port already at the right speed whose
        // driver ignores parity, such as a pty opened a second time), while musl does not check
        // at all. What counts is what the port now does, so that is read back and compared.
        if libc::tcsetattr(raw, libc::TCSANOW, &t) != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
        }
        let mut now: libc::termios = std::mem::zeroed();
        check(libc::tcgetattr(raw, &mut now))?;
        // A pseudo-terminal has no line: its driver keeps no parity or stop bits, and its speed
        // means nothing. Anything else must run as configured, or its frames are garbage.
        if !is_pty(fd)? {
            let took = (libc::cfgetospeed(&now), now.c_cflag & FRAME_BITS);
            if let Some(missing) = untaken((rate, t.c_cflag & FRAME_BITS), took, s) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{} did not take {missing}: its driver does not support it, or it is \
                         no RS-485 adapter",
                        s.path.display()
                    ),
                ));
            }
        }
        check(libc::tcflush(raw, libc::TCIOFLUSH))?;
    }
    Ok(())
}

/// Of the speed and frame bits asked for (`wanted`), the first the port did not take (`took`),
/// named as an installer configured it.
fn untaken(
    wanted: (libc::speed_t, libc::tcflag_t),
    took: (libc::speed_t, libc::tcflag_t),
    s: &SerialSettings,
) -> Option<String> {
    if wanted.0 != took.0 {
        return Some(format!("{} baud", s.baud));
    }
    let differs = |bits: libc::tcflag_t| wanted.1 & bits != took.1 & bits;
    if differs(libc::PARENB | libc::PARODD) {
        return Some(format!("parity {}", s.parity.name()));
    }
    if differs(libc::CSTOPB) {
        return Some(format!("{} stop bits", s.stop_bits));
    }
    if differs(libc::CSIZE) {
        return Some("8 data bits".into());
    }
    None
}

/// Whether `fd` is the terminal end of a pseudo-terminal (Unix 98 pty, majors 136 to 143).
fn is_pty(fd: &OwnedFd) -> io::Result<bool> {
    // SAFETY: fstat fills a plain struct for a descriptor we own.
    let st = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd.as_raw_fd(), &mut st) != 0 {
            return Err(io::Error::last_os_error());
        }
        st
    };
    Ok((136..=143).contains(&libc::major(st.st_rdev)))
}

impl AsyncRead for SerialPort {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let result = guard.try_io(|fd| {
                // SAFETY: reading into the caller's initialised buffer, at most its length.
                let n = unsafe {
                    libc::read(
                        fd.as_fd().as_raw_fd(),
                        unfilled.as_mut_ptr().cast(),
                        unfilled.len(),
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match result {
                // 0 bytes (an end of file: the line hung up, or the adapter is gone) is
                // returned as such; the link then closes the port and opens it again.
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for SerialPort {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            let result = guard.try_io(|fd| {
                // SAFETY: writing from the caller's buffer, at most its length.
                let n = unsafe {
                    libc::write(fd.as_fd().as_raw_fd(), data.as_ptr().cast(), data.len())
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match result {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written bytes are in the kernel's queue; the line drains them at its own pace.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frame_gap_is_three_and_a_half_characters_and_at_least_1750_us() {
        let at = |baud| SerialSettings {
            path: "/dev/null".into(),
            baud,
            parity: Parity::None,
            stop_bits: 1,
        };
        assert_eq!(at(9_600).frame_gap(), Duration::from_micros(4_010));
        assert_eq!(at(1_200).frame_gap(), Duration::from_micros(32_083));
        assert_eq!(at(115_200).frame_gap(), Duration::from_micros(1_750));
        assert_eq!(at(19_200).describe(), "/dev/null 19200 8N1");
    }

    #[test]
    fn a_setting_the_port_did_not_take_is_named_as_configured() {
        let s = SerialSettings {
            path: "/dev/ttyUSB0".into(),
            baud: 19_200,
            parity: Parity::Odd,
            stop_bits: 2,
        };
        let frame = libc::CS8 | libc::PARENB | libc::PARODD | libc::CSTOPB;
        let wanted = (libc::B19200, frame);
        assert_eq!(untaken(wanted, wanted, &s), None);
        assert_eq!(
            untaken(wanted, (libc::B9600, frame), &s).as_deref(),
            Some("19200 baud")
        );
        assert_eq!(
            untaken(wanted, (libc::B19200, libc::CS8 | libc::CSTOPB), &s).as_deref(),
            Some("parity odd")
        );
        assert_eq!(
            untaken(wanted, (libc::B19200, frame & !libc::CSTOPB), &s).as_deref(),
            Some("2 stop bits")
        );
        assert_eq!(
            untaken(wanted, (libc::B19200, frame & !libc::CSIZE | libc::CS7), &s).as_deref(),
            Some("8 data bits")
        );
    }

    /// A pty takes no parity; opening it twice in a row, as the link does after a timeout, must
    /// work even where glibc's tcsetattr then reports that nothing changed.
    #[test]
    fn a_pty_opens_again_with_parity_it_cannot_keep() {
        // SAFETY: posix_openpt/grantpt/unlockpt/ptsname on a descriptor owned below.
        let (master, path) = unsafe {
            let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
            assert!(m >= 0, "{}", io::Error::last_os_error());
            assert_eq!(libc::grantpt(m), 0);
            assert_eq!(libc::unlockpt(m), 0);
            let name = std::ffi::CStr::from_ptr(libc::ptsname(m));
            (
                OwnedFd::from_raw_fd(m),
                PathBuf::from(name.to_str().unwrap()),
            )
        };
        let settings = SerialSettings {
            path,
            baud: 115_200,
            parity: Parity::Even,
            stop_bits: 1,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            for _ in 0..3 {
                drop(SerialPort::open(&settings).expect("open the pty"));
            }
        });
        drop(master);
    }

    #[test]
    fn a_path_that_is_no_serial_port_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain");
        std::fs::write(&file, b"").unwrap();
        let settings = SerialSettings {
            path: file.clone(),
            baud: 9_600,
            parity: Parity::Even,
            stop_bits: 1,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let e = rt.block_on(async { SerialPort::open(&settings).unwrap_err() });
        assert_eq!(
            e.to_string(),
            format!("{} is not a serial port", file.display())
        );
        let e = rt.block_on(async {
            SerialPort::open(&SerialSettings {
                path: dir.path().join("absent"),
                ..settings.clone()
            })
            .unwrap_err()
        });
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
