//! A unit's SunSpec models, found and read over a [`Link`]: the marker at the configured
//! base or at each of [`BASES`], the chain walk ([`Walk`]), then every model the agent knows.
//!
//! What a field device gets wrong is reported, not fatal, as long as something was found: a
//! chain without an end marker, a broken chain, a model that refuses to be read. Only a unit
//! that never shows the marker, or a link that does not answer, is an error.

use super::link::{Link, ModbusError};
use crate::drivers::sunspec::chain::{self, Block, Common, ModelHeader, Step, Walk, BASES};

/// What was found behind one unit id.
#[derive(Debug, Clone)]
pub(crate) struct Discovered {
    /// Where the "SunS" marker is.
    pub(crate) base: u16,
    pub(crate) common: Common,
    /// Every model in the chain, known or not, in chain order.
    pub(crate) models: Vec<ModelHeader>,
    /// The registers of every known model that could be read.
    pub(crate) blocks: Vec<Block>,
    /// What went wrong on the way, for people (`texture-agent discover`, the log).
    pub(crate) problems: Vec<String>,
}

/// Why nothing was found.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DiscoverError {
    #[error("unit {unit}: no SunSpec marker (\"SunS\") at {}", list(tried))]
    NoMarker { unit: u8, tried: Vec<u16> },
    #[error(transparent)]
    Link(#[from] ModbusError),
}

fn list(addresses: &[u16]) -> String {
    let all: Vec<String> = addresses.iter().map(u16::to_string).collect();
    all.join(", ")
}

/// Finds and reads unit `unit`'s models; `base` overrides the usual base addresses.
pub(crate) async fn discover(
    link: &mut Link,
    unit: u8,
    base: Option<u16>,
) -> Result<Discovered, DiscoverError> {
    let tried: Vec<u16> = match base {
        Some(b) => vec![b],
        None => BASES.to_vec(),
    };
    let mut found = None;
    for &at in &tried {
        match link.read(unit, at, 2).await {
            Ok(regs) if chain::is_marker(&regs) => {
                found = Some(at);
                break;
            }
            // Not here: another value, or an address the device does not have.
            Ok(_) => {}
            Err(e) if e.is_exception() => {}
            Err(e) => return Err(e.into()),
        }
    }
    let Some(base) = found else {
        return Err(DiscoverError::NoMarker { unit, tried });
    };
    let mut problems = Vec::new();
    let mut walk = Walk::new(base);
    let mut step = walk.start();
    while let Step::Read(at) = step {
        let header = match link.read(unit, at, 2).await {
            Ok(regs) => [regs[0], regs[1]],
            Err(e) if e.is_exception() && !walk.models().is_empty() => {
                problems.push(format!(
                    "no end marker: the chain ends at {at}, where the device has no registers"
                ));
                break;
            }
            Err(e) if e.is_exception() => {
                problems.push(format!(
                    "the first model header at {at} cannot be read: {e}"
                ));
                break;
            }
            Err(e) => return Err(e.into()),
        };
        match walk.feed(header) {
            Ok(next) => step = next,
            Err(e) => {
                problems.push(e.to_string());
                break;
            }
        }
    }
    let models = walk.into_models();
    let mut blocks = Vec::new();
    for header in &models {
        let len = header.read_len();
        if len == 0 {
            continue;
        }
        if let Some(def) = header.def() {
            if header.length != def.length {
                problems.push(format!(
                    "model {} at {} declares length {}, its definition {}",
                    header.id, header.address, header.length, def.length
                ));
            }
        }
        match link.read(unit, header.address, len).await {
            Ok(regs) => blocks.push(Block {
                header: *header,
                regs,
            }),
            Err(e) if e.is_exception() => {
                problems.push(format!("model {} at {}: {e}", header.id, header.address));
            }
            Err(e) => return Err(e.into()),
        }
    }
    let common = blocks
        .iter()
        .find(|b| b.header.id == 1)
        .map(Common::from_block)
        .unwrap_or_default();
    if !models.iter().any(|m| m.id == 1) {
        problems.push("no common model (1): no manufacturer or serial number".into());
    }
    Ok(Discovered {
        base,
        common,
        models,
        blocks,
        problems,
    })
}
