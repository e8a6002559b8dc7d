//! The storage seam: [`KeyStore`] and its backends.
//!
//! A store holds key metadata, CMK versions (material only in HSM-wrapped
//! form) and the alias index. Every mutating call returns only once the change
//! is durable: a change that was acknowledged survives a crash or power cut.
//!
//! Calls are blocking; the service core runs them off the async runtime
//! (`spawn_blocking`) and never on the cached data-key path.

use std::fmt;

use crate::model::{KeyId, KeyRecord, VersionRecord};

pub mod sled_store;
pub use sled_store::SledStore;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("a key with id {0} already exists")]
    KeyExists(KeyId),
    #[error("the alias {0:?} is already taken")]
    AliasTaken(String),
    #[error("no key with id {0}")]
    NoSuchKey(KeyId),
    /// A compare-and-swap lost a race, or a version was not the next one.
    #[error("conflicting concurrent update of key {0}")]
    Conflict(KeyId),
    /// A stored record does not decode: corruption or an incompatible version.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The storage layer failed (I/O error, disk full, read-only medium).
    #[error("storage failure: {0}")]
    Io(String),
}

pub trait KeyStore: Send + Sync + fmt::Debug {
    /// Creates a key with its first version, atomically: either the key, its
    /// version and its alias all exist afterwards, or none does.
    /// `key.primary_version` must equal `first_version.version` and
    /// `first_version.key_id` must equal `key.id`; otherwise
    /// [`StoreError::Corrupt`] (the record would be inconsistent) and nothing
    /// is written. [`StoreError::KeyExists`] / [`StoreError::AliasTaken`]
    /// also leave the store unchanged.
    fn create_key(&self, key: &KeyRecord, first_version: &VersionRecord) -> Result<(), StoreError>;

    fn get_key(&self, id: KeyId) -> Result<Option<KeyRecord>, StoreError>;

    fn key_id_for_alias(&self, alias: &str) -> Result<Option<KeyId>, StoreError>;

    /// At most `limit` keys in ascending order of their 16 id bytes, starting
    /// strictly after `start_after`.
    fn list_keys(
        &self,
        start_after: Option<KeyId>,
        limit: usize,
    ) -> Result<Vec<KeyRecord>, StoreError>;

    /// Adds `version` (which must be `current.primary_version + 1`) and makes
    /// it the primary version, atomically, if the stored key still equals
    /// `current`; otherwise [`StoreError::Conflict`] (also when the number is
    /// wrong or the version already exists). [`StoreError::NoSuchKey`] if the
    /// key is gone, [`StoreError::Corrupt`] if `version.key_id != current.id`.
    /// Returns the new record (`current` with the new primary version).
    fn add_version(
        &self,
        current: &KeyRecord,
        version: &VersionRecord,
    ) -> Result<KeyRecord, StoreError>;

    fn get_version(&self, id: KeyId, version: u32) -> Result<Option<VersionRecord>, StoreError>;

    /// Every version of a key, in ascending order.
    fn list_versions(&self, id: KeyId) -> Result<Vec<VersionRecord>, StoreError>;

    /// Replaces the stored record `current` with `new` if the stored one
    /// still equals `current`; otherwise [`StoreError::Conflict`]
    /// ([`StoreError::NoSuchKey`] if it is gone). `new` must keep the id, the
    /// alias and the primary version of `current` (rotation goes through
    /// [`KeyStore::add_version`]); otherwise [`StoreError::Corrupt`] and
    /// nothing is written.
    fn compare_and_swap_key(&self, current: &KeyRecord, new: &KeyRecord) -> Result<(), StoreError>;
}
