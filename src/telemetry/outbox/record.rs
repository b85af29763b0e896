//! The framing of one record in a segment file: a header, then the payload.
//!
//! `len: u32 LE | crc32(seq ‖ payload): u32 LE | seq: u64 LE | payload`. The CRC covers the
//! sequence number as well as the payload, so a damaged number is caught like a damaged payload;
//! the length comes first so a reader knows how much to read before it can check anything.

use std::io::{self, Read};

use super::{OutboxError, Record};

/// Bytes of a record header: length, CRC and sequence number.
pub const HEADER_BYTES: u64 = 16;
/// Largest payload accepted (a single sample is a few hundred bytes).
pub const MAX_RECORD_BYTES: usize = 64 * 1024;

/// Appends the record `seq` with `payload` to `buf`, framed as [`read_record`] reads it.
pub(super) fn encode(buf: &mut Vec<u8>, seq: u64, payload: &[u8]) {
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&crc(seq, payload).to_le_bytes());
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(payload);
}

/// The checksum of record `seq`: CRC-32 of its number (little-endian) and then its payload.
fn crc(seq: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Reads the next record from `r`. `Ok(None)` at a clean end; an error for a torn or bad record
/// ([`OutboxError::Torn`], [`OutboxError::TooLarge`], [`OutboxError::Checksum`]) or a failed read.
///
/// The record's `epoch` is not in its framing: it is the epoch of the segment that holds it.
pub(super) fn read_record(r: &mut impl Read, epoch: u64) -> Result<Option<Record>, OutboxError> {
    let mut header = [0u8; HEADER_BYTES as usize];
    let mut got = 0;
    while got < header.len() {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(OutboxError::Torn),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(OutboxError::Read(e)),
        }
    }
    let len = u32::from_le_bytes(header[0..4].try_into().unwrap()) as usize;
    let sum = u32::from_le_bytes(header[4..8].try_into().unwrap());
    let seq = u64::from_le_bytes(header[8..16].try_into().unwrap());
    if len > MAX_RECORD_BYTES {
        return Err(OutboxError::TooLarge(len));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => OutboxError::Torn,
        _ => OutboxError::Read(e),
    })?;
    if crc(seq, &payload) != sum {
        return Err(OutboxError::Checksum { seq });
    }
    Ok(Some(Record {
        epoch,
        seq,
        payload,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_damaged_record_is_named_by_what_is_wrong_with_it() {
        let record = |seq: u64, payload: &[u8]| {
            let mut r = (payload.len() as u32).to_le_bytes().to_vec();
            r.extend_from_slice(&crc(seq, payload).to_le_bytes());
            r.extend_from_slice(&seq.to_le_bytes());
            r.extend_from_slice(payload);
            r
        };
        let good = record(7, b"{}");
        assert_eq!(
            read_record(&mut &good[..], 3).unwrap(),
            Some(Record {
                epoch: 3,
                seq: 7,
                payload: b"{}".to_vec()
            })
        );
        assert!(matches!(read_record(&mut &[][..], 3), Ok(None)));
        for cut in [3, HEADER_BYTES as usize + 1] {
            assert!(
                matches!(read_record(&mut &good[..cut], 3), Err(OutboxError::Torn)),
                "cut at {cut}"
            );
        }
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(
            read_record(&mut &flipped[..], 3),
            Err(OutboxError::Checksum { seq: 7 })
        ));
        let mut huge = good.clone();
        huge[0..4].copy_from_slice(&(MAX_RECORD_BYTES as u32 + 1).to_le_bytes());
        assert!(matches!(
            read_record(&mut &huge[..], 3),
            Err(OutboxError::TooLarge(n)) if n == MAX_RECORD_BYTES + 1
        ));
    }

    #[test]
    fn encoded_records_read_back_in_order() {
        let mut buf = Vec::new();
        encode(&mut buf, 7, b"{}");
        encode(&mut buf, 8, b"");
        assert_eq!(buf.len() as u64, 2 * HEADER_BYTES + 2);
        let mut r = &buf[..];
        for (seq, payload) in [(7, &b"{}"[..]), (8, &b""[..])] {
            let record = Record {
                epoch: 1,
                seq,
                payload: payload.to_vec(),
            };
            assert_eq!(read_record(&mut r, 1).unwrap(), Some(record));
        }
        assert!(matches!(read_record(&mut r, 1), Ok(None)));
    }
}
