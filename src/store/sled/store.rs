//! [`SledStore`]: the async [`KeyStore`] over the blocking [`SledEngine`].
//!
//! sled's calls block (a transaction, then `fsync`s), so each method runs
//! on tokio's blocking pool. A blocking task, once started, runs to its end
//! even when the future awaiting it is dropped: a change handed to the
//! store completes (or fails) as a whole, whoever still waits for it —
//! the contract [`KeyStore`] asks of every backend.

use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use uuid::Uuid;

use super::SledEngine;
use crate::model::{KeyId, KeyRecord, Timestamp, VersionRecord};
use crate::store::approvals::Approval;
use crate::store::integrity::{IntegrityState, RecordMac};
use crate::store::{ChangePage, KeyFilter, KeyStore, StoreError, VersionCounts, WrappedSecret};

/// The sled-backed [`KeyStore`]: a handle on one open [`SledEngine`].
///
/// It dereferences to the engine, whose methods are the same calls made
/// blocking, for tools and tests that run outside the async runtime (a
/// migration at start, an offline copy).
#[derive(Debug, Clone)]
pub struct SledStore {
    engine: Arc<SledEngine>,
}

impl SledStore {
    /// Opens (creating if needed) the store in `dir` ([`SledEngine::open`]).
    /// Blocking: call it at start, or from the blocking pool.
    pub fn open(dir: &Path) -> Result<SledStore, StoreError> {
        Ok(SledStore {
            engine: Arc::new(SledEngine::open(dir)?),
        })
    }

    /// Runs `call` on the engine, on the blocking pool.
    async fn run<T, F>(&self, call: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&SledEngine) -> Result<T, StoreError> + Send + 'static,
    {
        let engine = Arc::clone(&self.engine);
        tokio::task::spawn_blocking(move || call(&engine))
            .await
            .map_err(|e| StoreError::Io(format!("the store's task failed: {e}")))?
    }
}

impl Deref for SledStore {
    type Target = SledEngine;

    fn deref(&self) -> &SledEngine {
        &self.engine
    }
}

#[async_trait]
impl KeyStore for SledStore {
    async fn create_keys(&self, keys: &[(&KeyRecord, &VersionRecord)]) -> Result<(), StoreError> {
        let owned: Vec<(KeyRecord, VersionRecord)> = keys
            .iter()
            .map(|(k, v)| ((*k).clone(), (*v).clone()))
            .collect();
        self.run(move |e| {
            let pairs: Vec<(&KeyRecord, &VersionRecord)> =
                owned.iter().map(|(k, v)| (k, v)).collect();
            e.create_keys(&pairs)
        })
        .await
    }

    async fn get_key(&self, id: KeyId) -> Result<Option<KeyRecord>, StoreError> {
        self.run(move |e| e.get_key(id)).await
    }

    async fn key_id_for_alias(&self, alias: &str) -> Result<Option<KeyId>, StoreError> {
        let alias = alias.to_owned();
        self.run(move |e| e.key_id_for_alias(&alias)).await
    }

    async fn list_keys(
        &self,
        filter: &KeyFilter,
        start_after: Option<KeyId>,
        limit: usize,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        let filter = filter.clone();
        self.run(move |e| e.list_keys(&filter, start_after, limit))
            .await
    }

    async fn due_keys(&self, now: Timestamp, limit: usize) -> Result<Vec<KeyRecord>, StoreError> {
        self.run(move |e| e.due_keys(now, limit)).await
    }

    async fn add_version(
        &self,
        current: &KeyRecord,
        updated: &KeyRecord,
        version: &VersionRecord,
    ) -> Result<(), StoreError> {
        let (current, updated, version) = (current.clone(), updated.clone(), version.clone());
        self.run(move |e| e.add_version(&current, &updated, &version))
            .await
    }

    async fn get_version(
        &self,
        id: KeyId,
        version: u32,
    ) -> Result<Option<VersionRecord>, StoreError> {
        self.run(move |e| e.get_version(id, version)).await
    }

    async fn list_versions(&self, id: KeyId) -> Result<Vec<VersionRecord>, StoreError> {
        self.run(move |e| e.list_versions(id)).await
    }

    async fn compare_and_swap_key(
        &self,
        current: &KeyRecord,
        new: &KeyRecord,
    ) -> Result<(), StoreError> {
        let (current, new) = (current.clone(), new.clone());
        self.run(move |e| e.compare_and_swap_key(&current, &new))
            .await
    }

    async fn destroy_key(
        &self,
        current: &KeyRecord,
        tombstone: &KeyRecord,
    ) -> Result<(), StoreError> {
        let (current, tombstone) = (current.clone(), tombstone.clone());
        self.run(move |e| e.destroy_key(&current, &tombstone)).await
    }

    async fn rewrap_version(
        &self,
        current: &VersionRecord,
        new: &VersionRecord,
    ) -> Result<(), StoreError> {
        let (current, new) = (current.clone(), new.clone());
        self.run(move |e| e.rewrap_version(&current, &new)).await
    }

    async fn versions_not_under_root(
        &self,
        root_key_id: u32,
        start_after: Option<(KeyId, u32)>,
        limit: usize,
    ) -> Result<Vec<VersionRecord>, StoreError> {
        self.run(move |e| e.versions_not_under_root(root_key_id, start_after, limit))
            .await
    }

    async fn count_versions(&self, root_key_id: u32) -> Result<VersionCounts, StoreError> {
        self.run(move |e| e.count_versions(root_key_id)).await
    }

    async fn compact(&self) -> Result<(), StoreError> {
        self.run(|e| e.compact()).await
    }

    async fn get_secret(&self, name: &str) -> Result<Option<WrappedSecret>, StoreError> {
        let name = name.to_owned();
        self.run(move |e| e.get_secret(&name)).await
    }

    async fn put_secret(&self, name: &str, secret: &WrappedSecret) -> Result<(), StoreError> {
        let (name, secret) = (name.to_owned(), secret.clone());
        self.run(move |e| e.put_secret(&name, &secret)).await
    }

    async fn create_secret(
        &self,
        name: &str,
        secret: &WrappedSecret,
    ) -> Result<WrappedSecret, StoreError> {
        let (name, secret) = (name.to_owned(), secret.clone());
        self.run(move |e| e.create_secret(&name, &secret)).await
    }

    async fn swap_secret(
        &self,
        name: &str,
        current: &WrappedSecret,
        new: &WrappedSecret,
    ) -> Result<bool, StoreError> {
        let (name, current, new) = (name.to_owned(), current.clone(), new.clone());
        self.run(move |e| e.swap_secret(&name, &current, &new))
            .await
    }

    async fn fence_root_keys(&self, current: u32, retire: &[u32]) -> Result<u64, StoreError> {
        let retire = retire.to_vec();
        self.run(move |e| e.fence_root_keys(current, &retire)).await
    }

    async fn list_secrets(&self) -> Result<Vec<(String, WrappedSecret)>, StoreError> {
        self.run(|e| e.list_secrets()).await
    }

    async fn create_approval(
        &self,
        approval: &Approval,
        now: Timestamp,
    ) -> Result<Option<Approval>, StoreError> {
        let approval = approval.clone();
        self.run(move |e| e.create_approval(&approval, now)).await
    }

    async fn get_approval(&self, id: Uuid) -> Result<Option<Approval>, StoreError> {
        self.run(move |e| e.get_approval(id)).await
    }

    async fn list_approvals(&self) -> Result<Vec<Approval>, StoreError> {
        self.run(|e| e.list_approvals()).await
    }

    async fn swap_approval(&self, current: &Approval, new: &Approval) -> Result<(), StoreError> {
        let (current, new) = (current.clone(), new.clone());
        self.run(move |e| e.swap_approval(&current, &new)).await
    }

    async fn swap_approval_and_key(
        &self,
        (current, new): (&Approval, &Approval),
        (key, next): (&KeyRecord, &KeyRecord),
    ) -> Result<(), StoreError> {
        let (current, new, key, next) = (current.clone(), new.clone(), key.clone(), next.clone());
        self.run(move |e| e.swap_approval_and_key((&current, &new), (&key, &next)))
            .await
    }

    async fn changes_since(&self, after: u64, limit: usize) -> Result<ChangePage, StoreError> {
        self.run(move |e| e.changes_since(after, limit)).await
    }

    async fn install_integrity(
        &self,
        mac: &Arc<RecordMac>,
        migrate: bool,
    ) -> Result<IntegrityState, StoreError> {
        let mac = Arc::clone(mac);
        self.run(move |e| e.install_integrity(&mac, migrate)).await
    }
}
