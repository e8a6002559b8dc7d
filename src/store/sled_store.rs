//! TEMPORARY STUB (replaced by the store branch).
use std::path::Path;

use super::{KeyStore, StoreError};
use crate::model::{KeyId, KeyRecord, VersionRecord};

#[derive(Debug)]
pub struct SledStore;

impl SledStore {
    pub fn open(_: &Path) -> Result<Self, StoreError> {
        Err(StoreError::Io("stub".into()))
    }
}

impl KeyStore for SledStore {
    fn create_key(&self, _: &KeyRecord, _: &VersionRecord) -> Result<(), StoreError> {
        Err(StoreError::Io("stub".into()))
    }
    fn get_key(&self, _: KeyId) -> Result<Option<KeyRecord>, StoreError> {
        Err(StoreError::Io("stub".into()))
    }
    fn key_id_for_alias(&self, _: &str) -> Result<Option<KeyId>, StoreError> {
        Err(StoreError::Io("stub".into()))
    }
    fn list_keys(&self, _: Option<KeyId>, _: usize) -> Result<Vec<KeyRecord>, StoreError> {
        Err(StoreError::Io("stub".into()))
    }
    fn add_version(&self, _: &KeyRecord, _: &VersionRecord) -> Result<KeyRecord, StoreError> {
        Err(StoreError::Io("stub".into()))
    }
    fn get_version(&self, _: KeyId, _: u32) -> Result<Option<VersionRecord>, StoreError> {
        Err(StoreError::Io("stub".into()))
    }
    fn list_versions(&self, _: KeyId) -> Result<Vec<VersionRecord>, StoreError> {
        Err(StoreError::Io("stub".into()))
    }
    fn compare_and_swap_key(&self, _: &KeyRecord, _: &KeyRecord) -> Result<(), StoreError> {
        Err(StoreError::Io("stub".into()))
    }
}
