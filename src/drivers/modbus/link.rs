//! One Modbus TCP link: a single connection to one endpoint, shared by every unit id behind it,
//! with every request made one at a time.
//!
//! Why one connection and no pipelining: many inverters accept a single Modbus TCP client
//! (evcc #4954), and devices and gateways mix up transaction ids when requests overlap
//! (huawei_solar #1119). Why a fresh connection after every timeout or transport error: a late
//! answer to the timed-out request would otherwise be read as the answer to the next one; the
//! client rejects it on its transaction id and the link stays out of step for good
//! (tokio-modbus #324). An exception response is the device's answer, so it keeps the link.

use std::net::SocketAddr;
use std::time::Duration;

use tokio_modbus::client::{Context, Reader, Writer};
use tokio_modbus::slave::{Slave, SlaveContext};

/// The most registers one Modbus read may ask for (the protocol's own limit is 125).
pub(crate) const MAX_READ: u16 = 125;

/// How a link talks to its devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LinkSettings {
    /// Each request's answer must come within this.
    pub(crate) timeout: Duration,
    /// Some devices drop the first request after a connect (home-assistant/core #50011).
    pub(crate) delay_after_connect: Duration,
    /// The largest read, in registers (1 to [`MAX_READ`]).
    pub(crate) max_read: u16,
}

impl Default for LinkSettings {
    fn default() -> Self {
        LinkSettings {
            timeout: Duration::from_millis(1_000),
            delay_after_connect: Duration::ZERO,
            max_read: MAX_READ,
        }
    }
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ModbusError {
    /// The endpoint's name does not resolve (yet: DNS may not be up at boot).
    #[error("{endpoint} does not resolve: {problem}")]
    Resolve { endpoint: String, problem: String },
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{addr} unit {unit}: no answer within {} ms", timeout.as_millis())]
    Timeout {
        addr: SocketAddr,
        unit: u8,
        timeout: Duration,
    },
    #[error("{addr} unit {unit}: {problem}")]
    Transport {
        addr: SocketAddr,
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

    /// The endpoint cannot be reached at all, so no unit behind it can.
    pub(crate) fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ModbusError::Resolve { .. } | ModbusError::Connect { .. }
        )
    }
}

/// A Modbus TCP endpoint and the one connection to it, made on first use.
pub(crate) struct TcpLink {
    addr: SocketAddr,
    settings: LinkSettings,
    context: Option<Context>,
}

impl TcpLink {
    pub(crate) fn new(addr: SocketAddr, settings: LinkSettings) -> TcpLink {
        TcpLink {
            addr,
            settings,
            context: None,
        }
    }

    async fn context(&mut self, unit: u8) -> Result<&mut Context, ModbusError> {
        if self.context.is_none() {
            let addr = self.addr;
            let connect = tokio_modbus::client::tcp::connect_slave(addr, Slave(unit));
            let context = match tokio::time::timeout(self.settings.timeout, connect).await {
                Ok(Ok(context)) => context,
                Ok(Err(source)) => return Err(ModbusError::Connect { addr, source }),
                Err(_) => {
                    let source = std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "no connection within {} ms",
                            self.settings.timeout.as_millis()
                        ),
                    );
                    return Err(ModbusError::Connect { addr, source });
                }
            };
            if !self.settings.delay_after_connect.is_zero() {
                tokio::time::sleep(self.settings.delay_after_connect).await;
            }
            self.context = Some(context);
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
                    addr: self.addr,
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

    /// Writes `regs` to `unit` from `address`: function 16, or function 6 for one register,
    /// or for each when `single` (devices that refuse function 16, evcc PR #31487).
    pub(crate) async fn write(
        &mut self,
        unit: u8,
        address: u16,
        regs: &[u16],
        single: bool,
    ) -> Result<(), ModbusError> {
        let timeout = self.settings.timeout;
        if single || regs.len() == 1 {
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
        let addr = self.addr;
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
                    addr,
                    unit,
                    problem: e.to_string(),
                })
            }
            Err(_) => {
                self.disconnect();
                Err(ModbusError::Timeout {
                    addr,
                    unit,
                    timeout: self.settings.timeout,
                })
            }
        }
    }
}
