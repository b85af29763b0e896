//! Finding a SunSpec device's models: the "SunS" marker at a base address, then the chain of
//! model headers (`ID`, `L`) up to the end marker, and decoding the registers of one model.
//!
//! [`Walk`] is the chain walk as a pure state machine: the caller reads the two registers it
//! asks for and feeds them back, so the walk's decisions (where the next header is, when the
//! chain is broken, when it ends) test without a device. Field devices break the rules here:
//! a chain without its end marker, lengths that differ from the definition (E3DC's model 803),
//! chains that run off the register map. The walk keeps every model it found before the
//! problem and says where the problem was.

use super::models::{self, ModelDef, PointDef};
use super::points::{self, Value};

/// The "SunS" marker: 0x5375 0x6E53.
pub(crate) const MARKER: [u16; 2] = [0x5375, 0x6E53];

/// Where devices put the marker when the configuration names no base, in the order tried.
pub(crate) const BASES: [u16; 3] = [40_000, 0, 50_000];

/// The `ID` that ends the chain.
pub(crate) const END: u16 = 0xFFFF;

/// More models than this and the chain is taken as garbage (a real device has a dozen).
pub(crate) const MAX_MODELS: usize = 64;

/// A model in a device's chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ModelHeader {
    pub(crate) id: u16,
    /// The address of its `ID` register.
    pub(crate) address: u16,
    /// Its `L` as the device declares it: registers after `ID` and `L`.
    pub(crate) length: u16,
}

impl ModelHeader {
    pub(crate) fn def(&self) -> Option<&'static ModelDef> {
        models::model(self.id)
    }

    /// Registers to read for the points the agent uses: from `ID` to the end of the last known
    /// point, never beyond the declared length. 0 for a model the agent does not know.
    pub(crate) fn read_len(&self) -> u16 {
        let Some(def) = self.def() else { return 0 };
        let used = def
            .points
            .iter()
            .map(|p| p.offset + p.ty.size())
            .max()
            .unwrap_or(2);
        used.min(self.length.saturating_add(2))
    }
}

/// Why a chain could not be walked to its end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ChainError {
    #[error("model {id} at {address} declares length {length}, which runs past register 65535")]
    Overflow { id: u16, address: u16, length: u16 },
    #[error("more than {MAX_MODELS} models after the marker: the chain is not SunSpec")]
    TooLong,
    #[error(
        "model id 0 at {address}: the chain is broken (a model before it has a wrong length?)"
    )]
    ZeroId { address: u16 },
}

/// The walk from the marker to the end of the chain.
#[derive(Debug, Clone)]
pub(crate) struct Walk {
    next: u16,
    models: Vec<ModelHeader>,
}

/// What the walk needs next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// Read the two registers at this address and [`Walk::feed`] them.
    Read(u16),
    /// The end marker: the chain is complete.
    Done,
}

impl Walk {
    /// A walk for a chain whose marker is at `base` (already checked with [`is_marker`]).
    pub(crate) fn new(base: u16) -> Walk {
        Walk {
            next: base.saturating_add(2),
            models: Vec::new(),
        }
    }

    /// The first step.
    pub(crate) fn start(&self) -> Step {
        Step::Read(self.next)
    }

    /// The header registers (`ID`, `L`) read at the address of the last [`Step::Read`].
    pub(crate) fn feed(&mut self, header: [u16; 2]) -> Result<Step, ChainError> {
        let [id, length] = header;
        let address = self.next;
        if id == END {
            return Ok(Step::Done);
        }
        if id == 0 {
            return Err(ChainError::ZeroId { address });
        }
        if self.models.len() >= MAX_MODELS {
            return Err(ChainError::TooLong);
        }
        let next = address
            .checked_add(2)
            .and_then(|a| a.checked_add(length))
            .ok_or(ChainError::Overflow {
                id,
                address,
                length,
            })?;
        self.models.push(ModelHeader {
            id,
            address,
            length,
        });
        self.next = next;
        Ok(Step::Read(next))
    }

    /// The models found so far, in chain order.
    pub(crate) fn models(&self) -> &[ModelHeader] {
        &self.models
    }

    pub(crate) fn into_models(self) -> Vec<ModelHeader> {
        self.models
    }
}

/// Whether two registers are the "SunS" marker.
pub(crate) fn is_marker(regs: &[u16]) -> bool {
    regs == MARKER
}

/// One model's registers, from its `ID` on ([`ModelHeader::read_len`] of them).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Block {
    pub(crate) header: ModelHeader,
    pub(crate) regs: Vec<u16>,
}

impl Block {
    /// Point `name`, decoded (scale factors not applied); `None` when the model has no such
    /// point, the device's declared length ends before it, it was not read, or it is "not
    /// implemented".
    pub(crate) fn raw(&self, name: &str) -> Option<Value> {
        let def = self.point(name)?;
        if !self.declares(name) {
            return None;
        }
        let start = usize::from(def.offset);
        let end = start + usize::from(def.ty.size());
        points::decode(def.ty, self.regs.get(start..end)?)
    }

    /// Whether the model has point `name` and the device's declared length reaches its end.
    pub(crate) fn declares(&self, name: &str) -> bool {
        self.point(name).is_some_and(|def| {
            u32::from(def.offset) + u32::from(def.ty.size()) <= u32::from(self.header.length) + 2
        })
    }

    /// Point `name` as a number with its scale factor applied.
    pub(crate) fn number(&self, name: &str) -> Option<f64> {
        let def = self.point(name)?;
        let raw = self.raw(name)?.number();
        match def.sf {
            Some(sf) => points::scaled(raw, self.raw(sf).and_then(|v| v.number())),
            None => raw,
        }
    }

    pub(crate) fn text(&self, name: &str) -> Option<String> {
        match self.raw(name)? {
            Value::Text(t) => Some(t),
            Value::Number(_) => None,
        }
    }

    /// The definition of point `name` in this block's model.
    pub(crate) fn point(&self, name: &str) -> Option<&'static PointDef> {
        self.header.def()?.point(name)
    }
}

/// Manufacturer, model, version and serial number, from the common model (1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Common {
    pub(crate) manufacturer: Option<String>,
    pub(crate) model: Option<String>,
    pub(crate) version: Option<String>,
    pub(crate) serial: Option<String>,
}

impl Common {
    pub(crate) fn from_block(block: &Block) -> Common {
        Common {
            manufacturer: block.text("Mn"),
            model: block.text("Md"),
            version: block.text("Vr"),
            serial: block.text("SN"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The models found: `(id, address, length)`.
    type Found = Vec<(u16, u16, u16)>;

    /// Walks the chain stored in `regs` (register `base + i` is `regs[i]`) as the driver does.
    fn walk(base: u16, regs: &[u16]) -> (Found, Result<(), ChainError>) {
        assert!(is_marker(&regs[..2]));
        let mut w = Walk::new(base);
        let mut step = w.start();
        let result = loop {
            match step {
                Step::Done => break Ok(()),
                Step::Read(at) => {
                    let i = usize::from(at - base);
                    let header = [regs[i], regs.get(i + 1).copied().unwrap_or(0)];
                    match w.feed(header) {
                        Ok(s) => step = s,
                        Err(e) => break Err(e),
                    }
                }
            }
        };
        let found = w
            .models()
            .iter()
            .map(|m| (m.id, m.address, m.length))
            .collect();
        (found, result)
    }

    fn chain(models: &[(u16, u16)], end: bool) -> Vec<u16> {
        let mut regs = MARKER.to_vec();
        for &(id, len) in models {
            regs.push(id);
            regs.push(len);
            regs.extend(std::iter::repeat_n(0x1234, usize::from(len)));
        }
        if end {
            regs.extend([END, 0]);
        }
        regs
    }

    #[test]
    fn the_chain_is_walked_from_the_marker_to_the_end_marker() {
        let regs = chain(&[(1, 66), (103, 50), (123, 24)], true);
        let (found, result) = walk(40_000, &regs);
        assert_eq!(result, Ok(()));
        assert_eq!(
            found,
            vec![(1, 40_002, 66), (103, 40_070, 50), (123, 40_122, 24)]
        );
    }

    #[test]
    fn a_broken_chain_keeps_the_models_before_the_break_and_says_where() {
        // Model 103 declares 40 registers but holds 50: the next "header" is inside its data,
        // here a zero.
        let mut regs = chain(&[(1, 66), (103, 50)], true);
        regs[2 + 68 + 1] = 40;
        for r in &mut regs[2 + 68 + 2..] {
            *r = 0;
        }
        let (found, result) = walk(40_000, &regs);
        assert_eq!(found, vec![(1, 40_002, 66), (103, 40_070, 40)]);
        assert_eq!(result, Err(ChainError::ZeroId { address: 40_112 }));

        let regs = chain(&[(1, 66), (64_000, 65_000)], false);
        let (found, result) = walk(40_000, &regs);
        assert_eq!(found.len(), 1);
        assert_eq!(
            result,
            Err(ChainError::Overflow {
                id: 64_000,
                address: 40_070,
                length: 65_000
            })
        );
    }

    #[test]
    fn a_chain_of_garbage_ends_after_max_models() {
        let models: Vec<(u16, u16)> = (0..70).map(|i| (900 + i, 1)).collect();
        let (found, result) = walk(0, &chain(&models, true));
        assert_eq!(found.len(), MAX_MODELS);
        assert_eq!(result, Err(ChainError::TooLong));
    }

    #[test]
    fn points_beyond_the_declared_length_are_absent_and_scale_factors_apply() {
        // A common model that ends before its DA (offset 66): DA is absent, the rest is there.
        // (Devices with 65 registers, no pad, still have DA.)
        let mut regs = vec![1, 64];
        regs.extend(std::iter::repeat_n(0, 64));
        regs[2] = u16::from_be_bytes(*b"Tx");
        let header = ModelHeader {
            id: 1,
            address: 40_002,
            length: 64,
        };
        let block = Block { header, regs };
        assert_eq!(block.text("Mn").as_deref(), Some("Tx"));
        assert_eq!(block.number("DA"), None);
        assert_eq!(header.read_len(), 66);

        let mut regs = vec![0xFFFF; 52];
        regs[..2].copy_from_slice(&[103, 50]);
        regs[14] = 4521; // W
        regs[15] = (-1i16) as u16; // W_SF
        regs[2] = 1234; // A, with A_SF not implemented
        regs[6] = 0x8000;
        let block = Block {
            header: ModelHeader {
                id: 103,
                address: 40_070,
                length: 50,
            },
            regs,
        };
        assert_eq!(block.number("W"), Some(452.1));
        assert_eq!(
            block.number("A"),
            None,
            "its scale factor is not implemented"
        );
        assert_eq!(block.number("Hz"), None, "0xFFFF: not implemented");
    }
}
