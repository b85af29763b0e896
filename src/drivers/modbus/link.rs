//! One Modbus link: a single connection to one TCP endpoint, or the one open serial port of an
//! RS-485 bus, shared by every unit id behind it, with every request made one at a time.
//!
//! Why one connection and no pipelining: many inverters accept a single Modbus TCP client
//! (evcc #4954), devices on one bus answer into each other's frames when requests overlap
//! (evcc #17500, #16049), and devices and gateways mix up transaction ids when requests overlap
//! (huawei_solar #1119). Why a fresh connection after every timeout or transport error: a late
//! answer to the timed-out request would otherwise be read as the answer to the next one; the
//! client rejects it on its transaction id and the link stays out of step for good
//! (tokio-modbus #324). On a serial port, reopening discards whatever is in its input queue.
//! An exception response is the device's answer, so it keeps the link.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_modbus::client::{Context, Reader, Writer};
use tokio_modbus::slave::{Slave, SlaveContext};

use super::serial::{SerialPort, SerialSettings};

/// The most registers one Modbus read may ask for (the protocol's own limit is 125).
pub(crate) const MAX_READ: u16 = 125;

/// Where a link goes: one TCP endpoint, or one serial bus (RS-485) with its line settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// Resolved at each connect, so a name works before the network is up.
    Tcp {
        host: String,
        port: u16,
    },
    Serial(SerialSettings),
}

impl Target {
    /// `inverter.local:502` or `/dev/ttyUSB0 9600 8N1`, for logs and errors.
    pub(crate) fn describe(&self) -> String {
        match self {
            Target::Tcp { host, port } if host.contains(':') => format!("[{host}]:{port}"),
            Target::Tcp { host, port } => format!("{host}:{port}"),
            Target::Serial(s) => s.describe(),
        }
    }
}

/// Which write function a device takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WriteMode {
    /// Function 6 for one register, 16 for more: what SunSpec 1.2 (section 6.3) mandates.
    #[default]
    Auto,
    /// Function 6 for each register, for devices that refuse function 16 (Kostal Plenticore
    /// answers it with exception 2 on its control registers: gosunspec #13, evcc PR #31487).
    Single,
    /// Function 16 even for one register, for devices that do not implement function 6
    /// (APsystems ECU-R times out on it: pysunspec2 #104).
    Multiple,
}

/// How a link talks to its devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LinkSettings {
    /// Each request's answer must come within this.
    pub(crate) timeout: Duration,
    /// Some devices drop the first request after a connect (home-assistant/core #50011).
    pub(crate) delay_after_connect: Duration,
    /// The largest read, in registers (1 to [`MAX_READ`]).
    pub(crate) max_read: u16,
    /// The least time from the end of one answer to the next request: some gateways need
    /// 100 ms (home-assistant/core #153707). A serial bus never gets less than its frame gap.
    pub(crate) pause: Duration,
    pub(crate) writes: WriteMode,
}

impl Default for LinkSettings {
    fn default() -> Self {
        LinkSettings {
            timeout: Duration::from_millis(1_000),
            delay_after_connect: Duration::ZERO,
            max_read: MAX_READ,
            pause: Duration::ZERO,
            writes: WriteMode::Auto,
        }
    }
}

/// Why a request failed. `link` names the endpoint or the serial port.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ModbusError {
    /// The endpoint's name does not resolve (yet: DNS may not be up at boot).
    #[error("{link} does not resolve: {problem}")]
    Resolve { link: String, problem: String },
    #[error("cannot connect to {link}: {source}")]
    Connect {
        link: String,
        source: std::io::Error,
    },
    #[error("{link} unit {unit}: no answer within {} ms", timeout.as_millis())]
    Timeout {
        link: String,
        unit: u8,
        timeout: Duration,
    },
    #[error("{link} unit {unit}: {problem}")]
    Transport {
        link: String,
        unit: u8,
        problem: String,
    },
    /// The device answered with a Modbus exception.
    #[error("unit {unit} answered {what} at {address} with Modbus exception {code} ({name})")]
    Exception {
        unit: u8,
        what: &'static str,
        address: u16,
        code: u8,
        name: String,
    },
}

impl ModbusError {
    /// The device answered, with an exception: the link itself is fine.
    pub(crate) fn is_exception(&self) -> bool {
        matches!(self, ModbusError::Exception { .. })
    }

    /// The device answered that it is busy: Modbus exception 5 (acknowledge: working on it) or
    /// 6 (server device busy). It is there, and may answer the next round.
    pub(crate) fn is_busy(&self) -> bool {
        matches!(self, ModbusError::Exception { code: 5 | 6, .. })
    }

    /// The endpoint cannot be reached at all, so no unit behind it can.
    pub(crate) fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ModbusError::Resolve { .. } | ModbusError::Connect { .. }
        )
    }
}

/// One physical link and the one connection to it (a TCP connection or the open serial port),
/// made on first use.
pub(crate) struct Link {
    target: Target,
    name: String,
    settings: LinkSettings,
    context: Option<Context>,
    /// When the last answer (or failure) came, for the pause before the next request.
    last: Option<Instant>,
}

impl Link {
    pub(crate) fn new(target: Target, settings: LinkSettings) -> Link {
        Link {
            name: target.describe(),
            target,
            settings,
            context: None,
            last: None,
        }
    }

    /// The least time between an answer and the next request on this link.
    fn pause(&self) -> Duration {
        match &self.target {
            Target::Serial(s) => self.settings.pause.max(s.frame_gap()),
            Target::Tcp { .. } => self.settings.pause,
        }
    }

    async fn context(&mut self, unit: u8) -> Result<&mut Context, ModbusError> {
        if self.context.is_none() {
            let target = self.target.clone();
            let timeout = self.settings.timeout;
            let context = match connect(&target, self.name.clone(), timeout, unit).await {
                Ok(context) => context,
                Err(e) => {
                    self.last = Some(Instant::now());
                    return Err(e);
                }
            };
            if !self.settings.delay_after_connect.is_zero() {
                tokio::time::sleep(self.settings.delay_after_connect).await;
            }
            self.context = Some(context);
        }
        if let Some(last) = self.last {
            tokio::time::sleep_until(last + self.pause()).await;
        }
        let context = self.context.as_mut().expect("connected above");
        context.set_slave(Slave(unit));
        Ok(context)
    }

    /// Drops the connection (the next request connects again).
    pub(crate) fn disconnect(&mut self) {
        self.context = None;
    }

    /// Reads `count` holding registers of `unit` from `address`, in reads of at most
    /// `max_read` registers.
    pub(crate) async fn read(
        &mut self,
        unit: u8,
        address: u16,
        count: u16,
    ) -> Result<Vec<u16>, ModbusError> {
        let mut regs = Vec::with_capacity(usize::from(count));
        let mut at = address;
        let end = u32::from(address) + u32::from(count);
        while u32::from(at) < end {
            let n = (end - u32::from(at)).min(u32::from(self.settings.max_read.max(1))) as u16;
            let timeout = self.settings.timeout;
            let context = self.context(unit).await?;
            let answer = tokio::time::timeout(timeout, context.read_holding_registers(at, n)).await;
            let chunk = self.settle(unit, "a read", at, answer)?;
            if chunk.len() != usize::from(n) {
                self.disconnect();
                return Err(ModbusError::Transport {
                    link: self.name.clone(),
                    unit,
                    problem: format!("asked for {n} registers at {at}, got {}", chunk.len()),
                });
            }
            regs.extend(chunk);
            at = at.saturating_add(n);
            if at == u16::MAX && u32::from(at) < end {
                break;
            }
        }
        Ok(regs)
    }

    /// Writes `regs` to `unit` from `address` with the function the link's [`WriteMode`] says.
    pub(crate) async fn write(
        &mut self,
        unit: u8,
        address: u16,
        regs: &[u16],
    ) -> Result<(), ModbusError> {
        let timeout = self.settings.timeout;
        let single = match self.settings.writes {
            WriteMode::Auto => regs.len() == 1,
            WriteMode::Single => true,
            WriteMode::Multiple => false,
        };
        if single {
            for (i, &word) in regs.iter().enumerate() {
                let at = address.saturating_add(i as u16);
                let context = self.context(unit).await?;
                let answer =
                    tokio::time::timeout(timeout, context.write_single_register(at, word)).await;
                self.settle(unit, "a write", at, answer)?;
            }
            return Ok(());
        }
        let context = self.context(unit).await?;
        let answer =
            tokio::time::timeout(timeout, context.write_multiple_registers(address, regs)).await;
        self.settle(unit, "a write", address, answer)
    }

    /// The outcome of one request; a timeout or a transport error drops the connection.
    fn settle<T>(
        &mut self,
        unit: u8,
        what: &'static str,
        address: u16,
        answer: Result<tokio_modbus::Result<T>, tokio::time::error::Elapsed>,
    ) -> Result<T, ModbusError> {
        self.last = Some(Instant::now());
        let link = self.name.clone();
        match answer {
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(code))) => Err(ModbusError::Exception {
                unit,
                what,
                address,
                code: u8::from(code),
                name: code.to_string(),
            }),
            Ok(Err(e)) => {
                self.disconnect();
                Err(ModbusError::Transport {
                    link,
                    unit,
                    problem: e.to_string(),
                })
            }
            Err(_) => {
                self.disconnect();
                Err(ModbusError::Timeout {
                    link,
                    unit,
                    timeout: self.settings.timeout,
                })
            }
        }
    }
}

/// A connection to `target` (named `link` in errors) for `unit`: TCP connected within `timeout`,
/// or the serial port opened. A free function, so no `&Link` (whose context is not `Sync`) is
/// held across its awaits.
async fn connect(
    target: &Target,
    link: String,
    timeout: Duration,
    unit: u8,
) -> Result<Context, ModbusError> {
    let timed_out = || {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no connection within {} ms", timeout.as_millis()),
        )
    };
    match target {
        Target::Tcp { host, port } => {
            let unresolved = |problem: String| ModbusError::Resolve {
                link: link.clone(),
                problem,
            };
            let addr = tokio::net::lookup_host((host.as_str(), *port))
                .await
                .map_err(|e| unresolved(e.to_string()))?
                .next()
                .ok_or_else(|| unresolved("no address".into()))?;
            let connect = tokio_modbus::client::tcp::connect_slave(addr, Slave(unit));
            match tokio::time::timeout(timeout, connect).await {
                Ok(Ok(context)) => Ok(context),
                Ok(Err(source)) => Err(ModbusError::Connect { link, source }),
                Err(_) => Err(ModbusError::Connect {
                    link,
                    source: timed_out(),
                }),
            }
        }
        Target::Serial(settings) => match SerialPort::open(settings) {
            Ok(port) => Ok(tokio_modbus::client::rtu::attach_slave(port, Slave(unit))),
            Err(source) => Err(ModbusError::Connect { link, source }),
        },
    }
}
