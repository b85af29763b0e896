//! Pairing codes: short, typable, and never sent anywhere in clear.
//!
//! A code is 12 characters of Crockford base32 (60 bits from the OS CSPRNG), shown as
//! `XXXX-XXXX-XXXX`. Crockford's alphabet has no I, L, O or U, and reading treats `I`/`L` as `1` and
//! `O` as `0`, so the usual transcription slips still match.
//!
//! Over MQTT the device sends only a *commitment*: SHA-256 over a domain tag, the device id and
//! the normalised code. The platform recomputes it from what the user typed and echoes it in the
//! signed owner binding, which proves the binding answers *this* pairing session on *this* device.
//! A broker that sees the commitment could try codes offline; 60 bits make that about 2^60
//! SHA-256 evaluations, far beyond what fits in the code's 10-minute life even on a GPU farm
//! (docs/SECURITY.md has the arithmetic). The platform's Connect page must rate-limit guesses.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};

const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// Characters in a code (5 bits each).
pub const CODE_LEN: usize = 12;
/// Domain separation for the commitment hash.
pub const COMMITMENT_TAG: &[u8] = b"texture-pairing-v1";

/// A freshly generated pairing code.
#[derive(Clone, PartialEq, Eq)]
pub struct PairingCode(String);

impl std::fmt::Debug for PairingCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Codes are short-lived secrets: keep them out of debug output and logs.
        f.write_str("PairingCode(<redacted>)")
    }
}

impl PairingCode {
    pub fn generate() -> PairingCode {
        let mut bytes = [0u8; CODE_LEN];
        getrandom::fill(&mut bytes).expect("operating system RNG");
        PairingCode(
            bytes
                .iter()
                .map(|b| ALPHABET[(b & 31) as usize] as char)
                .collect(),
        )
    }

    /// The code as shown to people: `XXXX-XXXX-XXXX`.
    pub fn display(&self) -> String {
        format!("{}-{}-{}", &self.0[..4], &self.0[4..8], &self.0[8..])
    }

    pub fn commitment(&self, device_id: &str) -> String {
        commitment(device_id, &self.0).expect("generated codes are valid")
    }
}

/// Normalises what a person typed: case, separators and Crockford's look-alikes.
pub fn normalise(typed: &str) -> Option<String> {
    let mut out = String::with_capacity(CODE_LEN);
    for c in typed.chars() {
        let c = match c.to_ascii_uppercase() {
            '-' | ' ' => continue,
            'I' | 'L' => '1',
            'O' => '0',
            c => c,
        };
        if !ALPHABET.contains(&(c as u8)) || !c.is_ascii() {
            return None;
        }
        out.push(c);
    }
    (out.len() == CODE_LEN).then_some(out)
}

/// The commitment for `code` as typed (normalised first); `None` if it is not a valid code.
///
/// `base64url(SHA-256("texture-pairing-v1" || 0x00 || device_id || 0x00 || code))`.
pub fn commitment(device_id: &str, typed_code: &str) -> Option<String> {
    let code = normalise(typed_code)?;
    let mut h = Sha256::new();
    h.update(COMMITMENT_TAG);
    h.update([0]);
    h.update(device_id.as_bytes());
    h.update([0]);
    h.update(code.as_bytes());
    Some(URL_SAFE_NO_PAD.encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_carry_sixty_bits_and_display_in_three_groups() {
        let code = PairingCode::generate();
        let shown = code.display();
        assert_eq!(shown.len(), 14);
        assert_eq!((&shown[4..5], &shown[9..10]), ("-", "-"));
        assert_eq!(normalise(&shown).unwrap().len(), CODE_LEN);
        assert_ne!(PairingCode::generate(), PairingCode::generate());
    }

    #[test]
    fn transcription_slips_still_match() {
        let c = commitment("gw-1", "AB1C-D0EF-GH23").unwrap();
        assert_eq!(commitment("gw-1", "abic doef gh23"), Some(c.clone()));
        assert_eq!(commitment("gw-1", "ABLC-DOEF-GH23"), Some(c.clone()));
        assert_ne!(commitment("gw-2", "AB1C-D0EF-GH23"), Some(c));
        assert_eq!(commitment("gw-1", "ABU"), None);
        assert_eq!(commitment("gw-1", "UUUU-UUUU-UUUU"), None);
    }

    #[test]
    fn the_code_never_appears_in_debug_output() {
        let code = PairingCode::generate();
        assert!(!format!("{code:?}").contains(&code.0));
    }
}
