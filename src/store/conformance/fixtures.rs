//! The records the suite stores, and small helpers over a [`KeyStore`];
//! public so that a backend's own tests can build the same records.

use std::collections::BTreeMap;

use crate::model::{
    KeyId, KeyPolicy, KeyRecord, KeyState, ProtectionLevel, Timestamp, VersionRecord,
};
use crate::store::{KeyFilter, KeyStore, StoreError};

/// Test id `n`: the id bytes are `n * 97` (wrapping), then zeros, then `n`,
/// so that byte order differs from the order of `n`.
pub fn id(n: u8) -> KeyId {
    let mut b = [0u8; 16];
    let (first, rest) = b.split_at_mut(1);
    first.fill(n.wrapping_mul(97));
    if let Some(last) = rest.last_mut() {
        *last = n;
    }
    KeyId::from_bytes(b)
}

/// An ENABLED key with primary version 1, without a rotation schedule.
pub fn key(id: KeyId, alias: Option<&str>) -> KeyRecord {
    KeyRecord {
        id,
        alias: alias.map(str::to_owned),
        description: "test key".to_owned(),
        state: KeyState::Enabled,
        protection_level: ProtectionLevel::Software,
        created_at: Timestamp(1_700_000_000_000),
        created_by: "tester".to_owned(),
        primary_version: 1,
        min_decryption_version: 1,
        labels: BTreeMap::from([("team".to_owned(), "infra".to_owned())]),
        rotation_period_secs: None,
        next_rotation_at: None,
        deletion_at: None,
        destroyed_at: None,
        destroy_started_at: None,
        policy: KeyPolicy::default(),
    }
}

/// Version `n` of key `id`, wrapped under root key 7: 60 bytes of `n`.
pub fn version(id: KeyId, n: u32) -> VersionRecord {
    VersionRecord {
        key_id: id,
        version: n,
        created_at: Timestamp(1_700_000_000_000 + i64::from(n)),
        hsm_root_key_id: 7,
        wrapped_material: vec![n as u8; 60],
        destroyed_at: None,
        hsm_object: None,
    }
}

/// Rotation as the service does it: `current` with the new primary.
pub async fn rotate(
    store: &dyn KeyStore,
    current: &KeyRecord,
    v: &VersionRecord,
) -> Result<KeyRecord, StoreError> {
    let mut updated = current.clone();
    updated.primary_version = v.version;
    store.add_version(current, &updated, v).await?;
    Ok(updated)
}

/// `current` as [`KeyStore::destroy_key`] wants its tombstone: DESTROYED
/// at `at`, without a deletion time.
pub fn tombstone(current: &KeyRecord, at: i64) -> KeyRecord {
    let mut t = current.clone();
    t.state = KeyState::Destroyed;
    t.deletion_at = None;
    t.destroyed_at = Some(Timestamp(at));
    t
}

/// Everything a store holds about the test ids 0 to 9 (keys, due index,
/// versions and their material), for "nothing changed" checks.
pub async fn snapshot(store: &dyn KeyStore) -> String {
    let mut out = format!(
        "{:?}\n{:?}\n",
        store
            .list_keys(&KeyFilter::default(), None, usize::MAX)
            .await,
        store.due_keys(Timestamp(i64::MAX), usize::MAX).await
    );
    for n in 0..10 {
        let versions = store.list_versions(id(n)).await;
        out.push_str(&format!("{versions:?}\n"));
        for v in versions.iter().flatten() {
            out.push_str(&hex::encode(&v.wrapped_material));
        }
    }
    out
}
