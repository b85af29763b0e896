//! Who owns this gateway: the paired end user's reference id.
//!
//! Until the Connect-flow pairing exchange exists, the owner is a stored value
//! (`owner.json` in the state directory, `{"referenceId": "..."}`) written at install time or by
//! tests. Scoped keys match only this owner; with no owner, every scoped key gets 403.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::storage::{self, StorageError};

pub const OWNER_FILE: &str = "owner.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Owner {
    #[serde(rename = "referenceId")]
    pub reference_id: String,
}

pub fn load_owner(state_dir: &Path) -> Result<Option<Owner>, StorageError> {
    storage::read_json(&state_dir.join(OWNER_FILE))
}

pub fn store_owner(state_dir: &Path, owner: &Owner) -> Result<(), StorageError> {
    storage::write_json(&state_dir.join(OWNER_FILE), owner, 0o600)
}
