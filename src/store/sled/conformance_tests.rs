//! The store conformance suite ([`crate::store::conformance`]) on
//! [`SledStore`] with its records sealed (as the server runs it): every
//! check, the model-based test, and a broken store that the suite must
//! fail.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;

use proptest::prelude::*;
use tempfile::TempDir;

use super::SledStore;
use super::generations::generation_dirs;
use super::test_support::{block_on, live_path};
use crate::model::{KeyId, KeyRecord, Timestamp, VersionRecord};
use crate::store::conformance::{self, OpenStore, StoreFactory, model};
use crate::store::integrity::{IntegrityState, RECORD_MAC_KEY_LEN, RecordMac};
use crate::store::{KeyFilter, KeyStore, StoreError, VersionCounts, WrappedSecret};

/// Stores in temporary directories, sealed under a fixed test key.
struct SledFactory;

const TEST_KEY: [u8; RECORD_MAC_KEY_LEN] = [0x5a; RECORD_MAC_KEY_LEN];

/// Opens the store in `dir` and installs [`TEST_KEY`], migrating a new
/// store and expecting a reopened one to be sealed already.
async fn open_sealed(dir: &std::path::Path, new: bool) -> Result<SledStore, StoreError> {
    let store = SledStore::open(dir)?;
    let mac = Arc::new(RecordMac::new(&TEST_KEY)?);
    match store.install_integrity(&mac, new).await? {
        IntegrityState::Migrated { .. } if new => Ok(store),
        IntegrityState::Sealed if !new => Ok(store),
        other => Err(StoreError::Corrupt(format!(
            "installing the integrity key gave {other:?}"
        ))),
    }
}

/// One open store. A second handle is another `Arc` of it: a second
/// `SledStore::open` of the directory is refused by its lock.
struct OpenSled {
    dir: TempDir,
    store: Option<Arc<SledStore>>,
}

#[async_trait::async_trait]
impl StoreFactory for SledFactory {
    async fn open(&self) -> Result<Box<dyn OpenStore>, StoreError> {
        let dir = tempfile::tempdir().map_err(|e| StoreError::Io(e.to_string()))?;
        let store = open_sealed(dir.path(), true).await?;
        Ok(Box::new(OpenSled {
            dir,
            store: Some(Arc::new(store)),
        }))
    }
}

#[async_trait::async_trait]
impl OpenStore for OpenSled {
    fn handle(&self) -> Arc<dyn KeyStore> {
        self.store.clone().expect("the store is open")
    }

    async fn second_handle(&self) -> Result<Arc<dyn KeyStore>, StoreError> {
        Ok(self.handle())
    }

    async fn reopen(&mut self) -> Result<(), StoreError> {
        let store = self.store.take().expect("the store is open");
        if Arc::strong_count(&store) > 1 {
            self.store = Some(store);
            return Err(StoreError::Io(
                "reopen while another handle is in use".to_owned(),
            ));
        }
        drop(store);
        self.store = Some(Arc::new(open_sealed(self.dir.path(), false).await?));
        Ok(())
    }

    async fn reopen_under_integrity_key(&mut self, mac: &Arc<RecordMac>) -> Result<(), StoreError> {
        drop(self.store.take());
        let store = SledStore::open(self.dir.path())?;
        match store.install_integrity(mac, false).await? {
            IntegrityState::Sealed => {
                self.store = Some(Arc::new(store));
                Ok(())
            }
            other => Err(StoreError::Corrupt(format!("installing gave {other:?}"))),
        }
    }

    fn check_compacted(&self) -> Result<(), String> {
        let live = live_path(self.dir.path());
        for name in generation_dirs(self.dir.path()).map_err(|e| e.to_string())? {
            let path = self.dir.path().join(&name);
            if path != live {
                return Err(format!("{name} is left beside the live {}", live.display()));
            }
        }
        Ok(())
    }
}

#[test]
fn the_conformance_suite_passes_on_sled() {
    let mut seen = Vec::new();
    let result = block_on(conformance::run(&SledFactory, |c| seen.push(c.to_owned())));
    if let Err(failure) = result {
        panic!("{failure}");
    }
    let names: Vec<&str> = conformance::CHECKS.iter().map(|c| c.name).collect();
    assert_eq!(seen, names);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn behaves_like_the_model(ops in model::ops()) {
        block_on(model::run(&SledFactory, &ops))?;
    }
}

/// A sled store with one wrong answer: its compare-and-swap does not
/// compare, it swaps from whatever is stored.
#[derive(Debug)]
struct SwapsWithoutComparing(SledStore);

#[async_trait::async_trait]
impl KeyStore for SwapsWithoutComparing {
    async fn compare_and_swap_key(
        &self,
        current: &KeyRecord,
        new: &KeyRecord,
    ) -> Result<(), StoreError> {
        match self.0.get_key(current.id).await? {
            Some(stored) => self.0.compare_and_swap_key(&stored, new).await,
            None => Err(StoreError::NoSuchKey(current.id)),
        }
    }
    async fn create_keys(&self, keys: &[(&KeyRecord, &VersionRecord)]) -> Result<(), StoreError> {
        self.0.create_keys(keys).await
    }
    async fn get_key(&self, id: KeyId) -> Result<Option<KeyRecord>, StoreError> {
        self.0.get_key(id).await
    }
    async fn key_id_for_alias(&self, alias: &str) -> Result<Option<KeyId>, StoreError> {
        self.0.key_id_for_alias(alias).await
    }
    async fn list_keys(
        &self,
        filter: &KeyFilter,
        start_after: Option<KeyId>,
        limit: usize,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        self.0.list_keys(filter, start_after, limit).await
    }
    async fn due_keys(&self, now: Timestamp, limit: usize) -> Result<Vec<KeyRecord>, StoreError> {
        self.0.due_keys(now, limit).await
    }
    async fn add_version(
        &self,
        current: &KeyRecord,
        updated: &KeyRecord,
        version: &VersionRecord,
    ) -> Result<(), StoreError> {
        self.0.add_version(current, updated, version).await
    }
    async fn get_version(
        &self,
        id: KeyId,
        version: u32,
    ) -> Result<Option<VersionRecord>, StoreError> {
        self.0.get_version(id, version).await
    }
    async fn list_versions(&self, id: KeyId) -> Result<Vec<VersionRecord>, StoreError> {
        self.0.list_versions(id).await
    }
    async fn destroy_key(
        &self,
        current: &KeyRecord,
        tombstone: &KeyRecord,
    ) -> Result<(), StoreError> {
        self.0.destroy_key(current, tombstone).await
    }
    async fn rewrap_version(
        &self,
        current: &VersionRecord,
        new: &VersionRecord,
    ) -> Result<(), StoreError> {
        self.0.rewrap_version(current, new).await
    }
    async fn versions_not_under_root(
        &self,
        root_key_id: u32,
        start_after: Option<(KeyId, u32)>,
        limit: usize,
    ) -> Result<Vec<VersionRecord>, StoreError> {
        self.0
            .versions_not_under_root(root_key_id, start_after, limit)
            .await
    }
    async fn count_versions(&self, root_key_id: u32) -> Result<VersionCounts, StoreError> {
        self.0.count_versions(root_key_id).await
    }
    async fn compact(&self) -> Result<(), StoreError> {
        self.0.compact().await
    }
    async fn fence_root_keys(&self, current: u32, retire: &[u32]) -> Result<u64, StoreError> {
        self.0.fence_root_keys(current, retire).await
    }
    async fn get_secret(&self, name: &str) -> Result<Option<WrappedSecret>, StoreError> {
        self.0.get_secret(name).await
    }
    async fn put_secret(&self, name: &str, secret: &WrappedSecret) -> Result<(), StoreError> {
        self.0.put_secret(name, secret).await
    }
    async fn create_secret(
        &self,
        name: &str,
        secret: &WrappedSecret,
    ) -> Result<WrappedSecret, StoreError> {
        self.0.create_secret(name, secret).await
    }
    async fn swap_secret(
        &self,
        name: &str,
        current: &WrappedSecret,
        new: &WrappedSecret,
    ) -> Result<bool, StoreError> {
        self.0.swap_secret(name, current, new).await
    }
    async fn list_secrets(&self) -> Result<Vec<(String, WrappedSecret)>, StoreError> {
        self.0.list_secrets().await
    }
    async fn create_approval(
        &self,
        approval: &crate::store::approvals::Approval,
        now: Timestamp,
    ) -> Result<Option<crate::store::approvals::Approval>, StoreError> {
        self.0.create_approval(approval, now).await
    }
    async fn get_approval(
        &self,
        id: uuid::Uuid,
    ) -> Result<Option<crate::store::approvals::Approval>, StoreError> {
        self.0.get_approval(id).await
    }
    async fn list_approvals(&self) -> Result<Vec<crate::store::approvals::Approval>, StoreError> {
        self.0.list_approvals().await
    }
    async fn swap_approval(
        &self,
        current: &crate::store::approvals::Approval,
        new: &crate::store::approvals::Approval,
    ) -> Result<(), StoreError> {
        self.0.swap_approval(current, new).await
    }
    async fn swap_approval_and_key(
        &self,
        approval: (
            &crate::store::approvals::Approval,
            &crate::store::approvals::Approval,
        ),
        key: (&KeyRecord, &KeyRecord),
    ) -> Result<(), StoreError> {
        self.0.swap_approval_and_key(approval, key).await
    }
    async fn changes_since(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<crate::store::ChangePage, StoreError> {
        self.0.changes_since(after, limit).await
    }
}

struct BrokenFactory;

struct OpenBroken {
    _dir: TempDir,
    store: Arc<SwapsWithoutComparing>,
}

#[async_trait::async_trait]
impl StoreFactory for BrokenFactory {
    async fn open(&self) -> Result<Box<dyn OpenStore>, StoreError> {
        let dir = tempfile::tempdir().map_err(|e| StoreError::Io(e.to_string()))?;
        let store = SwapsWithoutComparing(open_sealed(dir.path(), true).await?);
        Ok(Box::new(OpenBroken {
            _dir: dir,
            store: Arc::new(store),
        }))
    }
}

#[async_trait::async_trait]
impl OpenStore for OpenBroken {
    fn handle(&self) -> Arc<dyn KeyStore> {
        self.store.clone()
    }
    async fn second_handle(&self) -> Result<Arc<dyn KeyStore>, StoreError> {
        Ok(self.store.clone())
    }
    async fn reopen(&mut self) -> Result<(), StoreError> {
        Err(StoreError::Io(
            "not needed by the checks that fail first".to_owned(),
        ))
    }
}

#[test]
fn the_suite_fails_a_store_whose_compare_and_swap_does_not_compare() {
    let failure = block_on(conformance::run(&BrokenFactory, |_| {})).unwrap_err();
    let expected = conformance::CHECKS
        .iter()
        .find(|c| c.name.starts_with("compare_and_swap_key"))
        .unwrap();
    assert_eq!(failure.check, expected.name, "{failure}");
    assert!(failure.detail.contains("stale"), "{failure}");
}
