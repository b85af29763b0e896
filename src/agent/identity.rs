//! The device's own Ed25519 key pair, made on first start.
//!
//! The public key is reported to the platform with every pairing request, so the platform can
//! tie the owner binding to this physical gateway. The secret seed is written atomically with
//! mode 0600 in the state directory and never logged.

use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ed25519_dalek::SigningKey;

use crate::storage::{self, StorageError};

pub const KEY_FILE: &str = "device-key";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{path}: not a device key (expected 32 bytes of unpadded base64url)")]
    Corrupt { path: String },
}

/// A fresh Ed25519 key from the operating system's CSPRNG.
pub fn generate_key() -> SigningKey {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).expect("operating system RNG");
    SigningKey::from_bytes(&seed)
}

/// Loads the device key, generating and storing one on first use.
pub fn load_or_create(state_dir: &Path) -> Result<SigningKey, IdentityError> {
    let path = state_dir.join(KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let seed: [u8; 32] = URL_SAFE_NO_PAD
                .decode(text.trim())
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| IdentityError::Corrupt {
                    path: path.display().to_string(),
                })?;
            Ok(SigningKey::from_bytes(&seed))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = generate_key();
            let text = format!("{}\n", URL_SAFE_NO_PAD.encode(key.to_bytes()));
            storage::write_atomic(&path, text.as_bytes(), 0o600)?;
            tracing::info!(public_key = %public_key(&key), "device key generated");
            Ok(key)
        }
        Err(source) => Err(StorageError::Io { path, source }.into()),
    }
}

/// The public half, unpadded base64url.
pub fn public_key(key: &SigningKey) -> String {
    crate::inbound::auth::jws::public_key_to_base64(&key.verifying_key())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn key_is_created_once_with_owner_only_mode() {
        let d = tempfile::tempdir().unwrap();
        let a = load_or_create(d.path()).unwrap();
        let b = load_or_create(d.path()).unwrap();
        assert_eq!(a.to_bytes(), b.to_bytes());
        let mode = std::fs::metadata(d.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_corrupt_key_file_is_an_error_not_a_new_identity() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(KEY_FILE), "garbage").unwrap();
        assert!(matches!(
            load_or_create(d.path()),
            Err(IdentityError::Corrupt { .. })
        ));
    }
}
