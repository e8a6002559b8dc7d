//! Core tests with the real backends (simulated HSM in-process, sled), wrapped
//! in counters to check what touches the HSM and the store.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;

use super::*;
use crate::authz::StaticRoles;
use crate::hsm::sim::LocalSimHsm;
use crate::hsm::{HsmError, HsmInfo, HsmWrapped};
use crate::model::{
    AccessReason, EncryptionContext, KeyState, SystemClock, Timestamp, VersionRecord,
};
use crate::secret::SecretBytes;
use crate::store::{KeyFilter, SledStore, StoreError, VersionCounts};

#[derive(Debug)]
struct CountingHsm {
    inner: LocalSimHsm,
    calls: AtomicUsize,
}

#[async_trait]
impl Hsm for CountingHsm {
    fn is_secure(&self) -> bool {
        self.inner.is_secure()
    }
    async fn info(&self) -> Result<HsmInfo, HsmError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.info().await
    }
    async fn generate_random(&self, len: usize) -> Result<SecretBytes, HsmError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.generate_random(len).await
    }
    async fn wrap(&self, plaintext: &[u8], aad: &[u8]) -> Result<HsmWrapped, HsmError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.wrap(plaintext, aad).await
    }
    async fn unwrap(&self, wrapped: &[u8], aad: &[u8]) -> Result<SecretBytes, HsmError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.unwrap(wrapped, aad).await
    }
    async fn rotate_root_key(&self) -> Result<u32, HsmError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.rotate_root_key().await
    }
    async fn destroy_root_key(&self, id: u32) -> Result<(), HsmError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.destroy_root_key(id).await
    }
}

type Pause = (
    std::sync::mpsc::SyncSender<()>,
    std::sync::mpsc::Receiver<()>,
);

#[derive(Debug)]
struct CountingStore {
    inner: SledStore,
    calls: AtomicUsize,
    /// When set, the next `get_key` says it is paused, then waits to resume.
    pause_next_get: std::sync::Mutex<Option<Pause>>,
    /// When set, the next `swap_secret` or `put_secret` first stores this
    /// secret, as a writer racing it would.
    put_before_next_swap: std::sync::Mutex<Option<(String, crate::store::WrappedSecret)>>,
    /// When set, the next `create_keys` or `add_version` first runs this
    /// (another node's change landing between the core's wrap and its
    /// write).
    before_next_write: std::sync::Mutex<Option<Hook>>,
}

/// A future run inside a store call (see `before_next_write`).
struct Hook(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>);

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hook")
    }
}

impl CountingStore {
    async fn run_before_write(&self) {
        let hook = self.before_next_write.lock().unwrap().take();
        if let Some(Hook(hook)) = hook {
            hook.await;
        }
    }
}

impl CountingStore {
    fn count(&self) {
        self.calls.fetch_add(1, Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl KeyStore for CountingStore {
    async fn get_secret(
        &self,
        name: &str,
    ) -> Result<Option<crate::store::WrappedSecret>, StoreError> {
        self.count();
        self.inner.get_secret(name).await
    }
    async fn put_secret(
        &self,
        name: &str,
        s: &crate::store::WrappedSecret,
    ) -> Result<(), StoreError> {
        self.count();
        let racing = self.put_before_next_swap.lock().unwrap().take();
        if let Some((n, racing)) = racing {
            self.inner.put_secret(&n, &racing).await?;
        }
        self.inner.put_secret(name, s).await
    }
    async fn create_secret(
        &self,
        name: &str,
        s: &crate::store::WrappedSecret,
    ) -> Result<crate::store::WrappedSecret, StoreError> {
        self.count();
        self.inner.create_secret(name, s).await
    }
    async fn swap_secret(
        &self,
        name: &str,
        current: &crate::store::WrappedSecret,
        new: &crate::store::WrappedSecret,
    ) -> Result<bool, StoreError> {
        self.count();
        let racing = self.put_before_next_swap.lock().unwrap().take();
        if let Some((n, s)) = racing {
            self.inner.put_secret(&n, &s).await?;
        }
        self.inner.swap_secret(name, current, new).await
    }
    async fn list_secrets(&self) -> Result<Vec<(String, crate::store::WrappedSecret)>, StoreError> {
        self.count();
        self.inner.list_secrets().await
    }
    async fn create_keys(&self, keys: &[(&KeyRecord, &VersionRecord)]) -> Result<(), StoreError> {
        self.count();
        self.run_before_write().await;
        self.inner.create_keys(keys).await
    }
    async fn get_key(&self, id: KeyId) -> Result<Option<KeyRecord>, StoreError> {
        self.count();
        let pause = self.pause_next_get.lock().unwrap().take();
        let read = self.inner.get_key(id).await;
        if let Some((paused, resume)) = pause {
            tokio::task::spawn_blocking(move || {
                paused.send(()).unwrap();
                resume.recv().unwrap();
            })
            .await
            .unwrap();
        }
        read
    }
    async fn key_id_for_alias(&self, alias: &str) -> Result<Option<KeyId>, StoreError> {
        self.count();
        self.inner.key_id_for_alias(alias).await
    }
    async fn list_keys(
        &self,
        filter: &KeyFilter,
        after: Option<KeyId>,
        limit: usize,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        self.count();
        self.inner.list_keys(filter, after, limit).await
    }
    async fn due_keys(&self, now: Timestamp, limit: usize) -> Result<Vec<KeyRecord>, StoreError> {
        self.count();
        self.inner.due_keys(now, limit).await
    }
    async fn add_version(
        &self,
        c: &KeyRecord,
        u: &KeyRecord,
        v: &VersionRecord,
    ) -> Result<(), StoreError> {
        self.count();
        self.run_before_write().await;
        self.inner.add_version(c, u, v).await
    }
    async fn get_version(&self, id: KeyId, v: u32) -> Result<Option<VersionRecord>, StoreError> {
        self.count();
        self.inner.get_version(id, v).await
    }
    async fn list_versions(&self, id: KeyId) -> Result<Vec<VersionRecord>, StoreError> {
        self.count();
        self.inner.list_versions(id).await
    }
    async fn compare_and_swap_key(&self, c: &KeyRecord, n: &KeyRecord) -> Result<(), StoreError> {
        self.count();
        self.inner.compare_and_swap_key(c, n).await
    }
    async fn destroy_key(&self, c: &KeyRecord, t: &KeyRecord) -> Result<(), StoreError> {
        self.count();
        self.inner.destroy_key(c, t).await
    }
    async fn rewrap_version(&self, c: &VersionRecord, n: &VersionRecord) -> Result<(), StoreError> {
        self.count();
        self.inner.rewrap_version(c, n).await
    }
    async fn versions_not_under_root(
        &self,
        root: u32,
        after: Option<(KeyId, u32)>,
        limit: usize,
    ) -> Result<Vec<VersionRecord>, StoreError> {
        self.count();
        self.inner.versions_not_under_root(root, after, limit).await
    }
    async fn count_versions(&self, root: u32) -> Result<VersionCounts, StoreError> {
        self.count();
        self.inner.count_versions(root).await
    }
    async fn compact(&self) -> Result<(), StoreError> {
        self.count();
        self.inner.compact().await
    }
    async fn fence_root_keys(&self, current: u32, retire: &[u32]) -> Result<u64, StoreError> {
        self.count();
        self.inner.fence_root_keys(current, retire).await
    }
    async fn create_approval(
        &self,
        approval: &crate::store::approvals::Approval,
        now: Timestamp,
    ) -> Result<Option<crate::store::approvals::Approval>, StoreError> {
        self.count();
        self.inner.create_approval(approval, now).await
    }
    async fn get_approval(
        &self,
        id: uuid::Uuid,
    ) -> Result<Option<crate::store::approvals::Approval>, StoreError> {
        self.count();
        self.inner.get_approval(id).await
    }
    async fn list_approvals(&self) -> Result<Vec<crate::store::approvals::Approval>, StoreError> {
        self.count();
        self.inner.list_approvals().await
    }
    async fn swap_approval(
        &self,
        current: &crate::store::approvals::Approval,
        new: &crate::store::approvals::Approval,
    ) -> Result<(), StoreError> {
        self.count();
        self.inner.swap_approval(current, new).await
    }
    async fn swap_approval_and_key(
        &self,
        approval: (
            &crate::store::approvals::Approval,
            &crate::store::approvals::Approval,
        ),
        key: (&KeyRecord, &KeyRecord),
    ) -> Result<(), StoreError> {
        self.count();
        self.inner.swap_approval_and_key(approval, key).await
    }
    async fn changes_since(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<crate::store::ChangePage, StoreError> {
        self.count();
        self.inner.changes_since(after, limit).await
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    kms: Kms,
    hsm: Arc<CountingHsm>,
    store: Arc<CountingStore>,
}

fn fixture(mut options: KmsOptions) -> Fixture {
    options.default_policy = crate::model::KeyPolicy::granting(["svc".to_string()]);
    let dir = tempfile::tempdir().unwrap();
    let hsm = Arc::new(CountingHsm {
        inner: LocalSimHsm::open(&dir.path().join("hsm.state"), "test-pin-0000").unwrap(),
        calls: AtomicUsize::new(0),
    });
    let store = Arc::new(CountingStore {
        inner: SledStore::open(&dir.path().join("store")).unwrap(),
        calls: AtomicUsize::new(0),
        pause_next_get: std::sync::Mutex::new(None),
        put_before_next_swap: std::sync::Mutex::new(None),
        before_next_write: std::sync::Mutex::new(None),
    });
    let roles = StaticRoles::new([
        ("op".to_string(), Role::Operator),
        ("svc".to_string(), Role::Service),
    ]);
    let kms = Kms::new(
        Arc::clone(&store) as Arc<dyn KeyStore>,
        Arc::clone(&hsm) as Arc<dyn Hsm>,
        Arc::new(roles),
        Arc::new(SystemClock),
        options,
    );
    Fixture {
        _dir: dir,
        kms,
        hsm,
        store,
    }
}

fn op() -> Caller {
    Caller::new("op")
}
fn svc() -> Caller {
    Caller::new("svc")
}
fn context() -> EncryptionContext {
    EncryptionContext::new([("tenant".to_string(), "t1".to_string())]).unwrap()
}
const WHY: AccessReason = AccessReason::CustomerInitiatedAccess;

#[tokio::test]
async fn a_cached_request_does_no_store_or_hsm_io() {
    let f = fixture(KmsOptions::default());
    let key = f
        .kms
        .create_key(&op(), CreateKeyInput::default())
        .await
        .unwrap();
    let key_ref = KeyRef::Id(key.key.id);
    let first = f
        .kms
        .generate_data_key(&svc(), &key_ref, &context(), WHY, 32, true)
        .await
        .unwrap();

    let (hsm_before, store_before) = (
        f.hsm.calls.load(Ordering::SeqCst),
        f.store.calls.load(Ordering::SeqCst),
    );
    for _ in 0..20 {
        let out = f
            .kms
            .generate_data_key(&svc(), &key_ref, &context(), WHY, 32, true)
            .await
            .unwrap();
        let opened = f
            .kms
            .decrypt(&svc(), &out.ciphertext_blob, &context(), WHY, None)
            .await
            .unwrap();
        assert_eq!(opened.plaintext.expose(), out.plaintext.unwrap().expose());
    }
    f.kms
        .decrypt(
            &svc(),
            &first.ciphertext_blob,
            &context(),
            WHY,
            Some(&key_ref),
        )
        .await
        .unwrap();
    assert_eq!(
        f.hsm.calls.load(Ordering::SeqCst),
        hsm_before,
        "no HSM call"
    );
    assert_eq!(
        f.store.calls.load(Ordering::SeqCst),
        store_before,
        "no store call"
    );
}

#[tokio::test]
async fn evicted_versions_are_unwrapped_again_by_the_hsm() {
    let f = fixture(KmsOptions {
        key_cache_capacity: 2,
        material_cache_capacity: 2,
        ..KmsOptions::default()
    });
    let mut blobs = Vec::new();
    for _ in 0..5 {
        let key = f
            .kms
            .create_key(&op(), CreateKeyInput::default())
            .await
            .unwrap();
        let out = f
            .kms
            .generate_data_key(&svc(), &KeyRef::Id(key.key.id), &context(), WHY, 16, true)
            .await
            .unwrap();
        blobs.push((out.ciphertext_blob, out.plaintext.unwrap()));
    }
    assert!(
        f.kms.materials.len() <= 2 && f.kms.keys.len() <= 2,
        "bounded"
    );
    let before = f.hsm.calls.load(Ordering::SeqCst);
    for (blob, plaintext) in &blobs {
        let opened = f
            .kms
            .decrypt(&svc(), blob, &context(), WHY, None)
            .await
            .unwrap();
        assert_eq!(opened.plaintext.expose(), plaintext.expose());
    }
    assert!(
        f.hsm.calls.load(Ordering::SeqCst) > before,
        "evicted versions came back through the HSM"
    );
}

#[tokio::test]
async fn disable_takes_effect_on_cached_keys() {
    let f = fixture(KmsOptions::default());
    let key = f
        .kms
        .create_key(&op(), CreateKeyInput::default())
        .await
        .unwrap();
    let r = KeyRef::Id(key.key.id);
    let out = f
        .kms
        .generate_data_key(&svc(), &r, &context(), WHY, 32, false)
        .await
        .unwrap();
    let disabled = f.kms.disable_key(&op(), &r).await.unwrap();
    assert_eq!(disabled.state, KeyState::Disabled);
    let err = f
        .kms
        .decrypt(&svc(), &out.ciphertext_blob, &context(), WHY, None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::KeyNotEnabled {
                state: KeyState::Disabled,
                ..
            }
        ),
        "{err:?}"
    );
    let err = f
        .kms
        .generate_data_key(&svc(), &r, &context(), WHY, 32, true)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::KeyNotEnabled { .. }), "{err:?}");
    // Idempotent, and the transition back works.
    assert_eq!(
        f.kms.disable_key(&op(), &r).await.unwrap().state,
        KeyState::Disabled
    );
    assert_eq!(
        f.kms.enable_key(&op(), &r).await.unwrap().state,
        KeyState::Enabled
    );
    f.kms
        .decrypt(&svc(), &out.ciphertext_blob, &context(), WHY, None)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_rotations_each_add_one_version() {
    let f = Arc::new(fixture(KmsOptions::default()));
    let key = f
        .kms
        .create_key(&op(), CreateKeyInput::default())
        .await
        .unwrap();
    let id = key.key.id;
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let f = Arc::clone(&f);
            tokio::spawn(async move { f.kms.rotate_key(&op(), &KeyRef::Id(id)).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let view = f.kms.get_key(&op(), &KeyRef::Id(id)).await.unwrap();
    assert_eq!(view.key.primary_version, 9);
    let versions: Vec<u32> = view.versions.iter().map(|v| v.version).collect();
    assert_eq!(versions, (1..=9).collect::<Vec<_>>());
}

/// `CountingHsm` does not pass the key-object methods on, so it is a backend
/// without protection level HSM.
#[tokio::test]
async fn hsm_protection_level_is_refused_by_a_backend_without_key_objects() {
    let f = fixture(KmsOptions::default());
    let err = f
        .kms
        .create_key(
            &op(),
            CreateKeyInput {
                protection_level: Some(crate::model::ProtectionLevel::Hsm),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    let page = f
        .kms
        .list_keys(&op(), crate::store::KeyFilter::default(), None, 10)
        .await
        .unwrap();
    assert!(page.keys.is_empty());
}

#[tokio::test]
async fn a_batch_of_keys_is_checked_whole_then_created_in_one_store_write() {
    let f = fixture(KmsOptions::default());
    async fn list(f: &Fixture) -> Vec<KeyRecord> {
        f.kms
            .list_keys(&op(), crate::store::KeyFilter::default(), None, 1000)
            .await
            .unwrap()
            .keys
    }
    let good = || CreateKeyInput::default();
    let refusals = [
        (svc(), vec![good()], "PermissionDenied"),
        (op(), vec![], "InvalidArgument"),
        (
            op(),
            (0..=super::keys::MAX_CREATE_BATCH)
                .map(|_| good())
                .collect(),
            "InvalidArgument",
        ),
        (
            op(),
            vec![
                good(),
                CreateKeyInput {
                    alias: Some("not an alias!".into()),
                    ..Default::default()
                },
            ],
            "key 1 of the batch",
        ),
    ];
    for (caller, inputs, expected) in refusals {
        let hsm_before = f.hsm.calls.load(Ordering::SeqCst);
        let err = f.kms.create_keys(&caller, inputs).await.unwrap_err();
        assert!(format!("{err:?}").contains(expected), "{expected}: {err:?}");
        assert_eq!(
            f.hsm.calls.load(Ordering::SeqCst),
            hsm_before,
            "no HSM call"
        );
        assert!(list(&f).await.is_empty(), "nothing created");
    }

    // An alias clash with a stored key refuses the whole batch.
    f.kms
        .create_key(
            &op(),
            CreateKeyInput {
                alias: Some("taken".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let clash = vec![
        good(),
        CreateKeyInput {
            alias: Some("taken".into()),
            ..Default::default()
        },
    ];
    let err = f.kms.create_keys(&op(), clash).await.unwrap_err();
    assert!(matches!(err, Error::AlreadyExists(_)), "{err:?}");
    assert_eq!(list(&f).await.len(), 1);

    let store_before = f.store.calls.load(Ordering::SeqCst);
    let created = f
        .kms
        .create_keys(&op(), (0..50).map(|_| good()).collect())
        .await
        .unwrap();
    assert_eq!(
        f.store.calls.load(Ordering::SeqCst) - store_before,
        1,
        "one store write for the batch"
    );
    assert_eq!(created.len(), 50);
    assert_eq!(list(&f).await.len(), 51);
    assert_eq!(f.kms.materials.len(), 1, "a batch is not cached");
    for view in &created {
        assert_eq!(view.key.created_by, "op");
        let out = f
            .kms
            .generate_data_key(&svc(), &KeyRef::Id(view.key.id), &context(), WHY, 32, true)
            .await
            .unwrap();
        let plain = f
            .kms
            .decrypt(&svc(), &out.ciphertext_blob, &context(), WHY, None)
            .await
            .unwrap();
        assert_eq!(plain.plaintext.expose(), out.plaintext.unwrap().expose());
    }
}

/// A reader that loaded a key before a DisableKey and finishes after it must
/// not put the stale ENABLED record back into the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_cannot_undo_a_disable() {
    let f = Arc::new(fixture(KmsOptions {
        key_cache_capacity: 1,
        material_cache_capacity: 10,
        ..KmsOptions::default()
    }));
    let a = f
        .kms
        .create_key(&op(), CreateKeyInput::default())
        .await
        .unwrap()
        .key
        .id;
    // A second key evicts the first from the one-entry record cache.
    f.kms
        .create_key(&op(), CreateKeyInput::default())
        .await
        .unwrap();
    assert!(f.kms.keys.get(&a).is_none());

    let (paused_tx, paused_rx) = std::sync::mpsc::sync_channel(1);
    let (resume_tx, resume_rx) = std::sync::mpsc::sync_channel(1);
    *f.store.pause_next_get.lock().unwrap() = Some((paused_tx, resume_rx));
    let slow = {
        let f = Arc::clone(&f);
        tokio::spawn(async move {
            f.kms
                .generate_data_key(&svc(), &KeyRef::Id(a), &context(), WHY, 32, false)
                .await
        })
    };
    // The slow request has read ENABLED and is paused; now disable the key.
    tokio::task::spawn_blocking(move || paused_rx.recv().unwrap())
        .await
        .unwrap();
    f.kms.disable_key(&op(), &KeyRef::Id(a)).await.unwrap();
    resume_tx.send(()).unwrap();
    // It overlapped the disable, so it may succeed itself...
    slow.await.unwrap().unwrap();
    // ...but every request after the disable is refused.
    for _ in 0..3 {
        let err = f
            .kms
            .generate_data_key(&svc(), &KeyRef::Id(a), &context(), WHY, 32, false)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::KeyNotEnabled { .. }), "{err:?}");
    }
}

/// L4 and M3: "no such key" is cached, so a refusal for a key that does not
/// exist does the same work as one for a key the caller may not use — no
/// store read once the first lookup is cached — and a key created with
/// that alias is found at once.
#[tokio::test]
async fn an_unknown_key_costs_what_a_forbidden_one_costs() {
    let f = fixture(KmsOptions::default());
    f.kms
        .create_key(
            &op(),
            CreateKeyInput {
                alias: Some("forbidden".into()),
                policy: Some(crate::model::KeyPolicy::granting([
                    "someone-else".to_string()
                ])),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let refuse = async |name: &str| {
        let key = KeyRef::parse(name).unwrap();
        f.kms
            .generate_data_key(&svc(), &key, &context(), WHY, 32, true)
            .await
            .unwrap_err()
    };
    let unknown_id = KeyId::new_random().to_string();
    let names = ["forbidden", "no-such-alias", unknown_id.as_str()];
    // The first lookup of each may read the store.
    for name in names {
        refuse(name).await;
    }
    for name in names {
        let before = f.store.calls.load(Ordering::SeqCst);
        for _ in 0..10 {
            let err = refuse(name).await;
            assert!(
                matches!(err, Error::PermissionDenied(_) | Error::KeyNotFound(_)),
                "{err:?}"
            );
        }
        assert_eq!(
            f.store.calls.load(Ordering::SeqCst),
            before,
            "{name}: refusals read the store"
        );
    }
    // Created now: found at once, not "missing" for the rest of the TTL.
    f.kms
        .create_key(
            &op(),
            CreateKeyInput {
                alias: Some("no-such-alias".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let key = KeyRef::parse("no-such-alias").unwrap();
    f.kms
        .generate_data_key(&svc(), &key, &context(), WHY, 32, true)
        .await
        .unwrap();
}

/// The audit record's lookup of an alias (`Kms::key_id_for_audit`, for a
/// request refused before the core resolved it) shares the negative cache:
/// a stream of refusals naming an alias that does not exist reads the store
/// once, and a key created with that alias is named at once.
#[tokio::test]
async fn the_audit_lookup_of_an_unknown_alias_reads_the_store_once() {
    let f = fixture(KmsOptions::default());
    assert_eq!(f.kms.key_id_for_audit("no-such-alias").await, None);
    let before = f.store.calls.load(Ordering::SeqCst);
    for _ in 0..10 {
        assert_eq!(f.kms.key_id_for_audit("no-such-alias").await, None);
    }
    assert_eq!(
        f.store.calls.load(Ordering::SeqCst),
        before,
        "refusals of an unknown alias read the store"
    );
    let created = f
        .kms
        .create_key(
            &op(),
            CreateKeyInput {
                alias: Some("no-such-alias".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        f.kms.key_id_for_audit("no-such-alias").await,
        Some(created.key.id)
    );
}

/// Two cores starting at once on one empty store (two nodes' first start)
/// end with one audit key, and both sign with it: the secret is created
/// if absent, and the loser uses the winner's (several-nodes design, 1.2).
#[tokio::test]
async fn two_first_starts_end_with_one_audit_key() {
    for round in 0..8 {
        let f = fixture(KmsOptions::default());
        let other = Kms::new(
            Arc::clone(&f.store) as Arc<dyn KeyStore>,
            Arc::clone(&f.hsm) as Arc<dyn Hsm>,
            Arc::new(StaticRoles::new([("op".to_string(), Role::Operator)])),
            Arc::new(SystemClock),
            KmsOptions::default(),
        );
        let (a, b) = tokio::join!(f.kms.audit_keys(), other.audit_keys());
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(
            a.signer.public_key(),
            b.signer.public_key(),
            "round {round}: two audit keys"
        );
        let stored = f.kms.audit_keys().await.unwrap();
        assert_eq!(stored.signer.public_key(), a.signer.public_key());
    }
}

/// A root-key rotation re-wraps the service secrets by compare-and-swap: a
/// newer audit high-water mark stored while the old one was being
/// re-wrapped is kept, not replaced by the re-wrapped older one (review of
/// #15: the mark must never go back).
#[tokio::test]
async fn a_rotation_never_puts_back_an_older_audit_mark() {
    let f = fixture(KmsOptions::default());
    f.kms
        .put_audit_mark(super::audit_keys::AUDIT_MARK_NAME, b"checkpoint 1")
        .await
        .unwrap();
    let next_root = f.hsm.rotate_root_key().await.unwrap();
    // The newer mark, stored (under the new root key, as any write now
    // is) while the rotation re-wraps the older one.
    let aad = crate::model::secret_wrap_aad(super::audit_keys::AUDIT_MARK_NAME);
    let newer = f.hsm.wrap(b"checkpoint 2", &aad).await.unwrap();
    assert_eq!(newer.root_key_id, next_root);
    *f.store.put_before_next_swap.lock().unwrap() = Some((
        super::audit_keys::AUDIT_MARK_NAME.to_string(),
        crate::store::WrappedSecret {
            hsm_root_key_id: newer.root_key_id,
            wrapped: newer.blob,
        },
    ));
    f.kms.rewrap_secrets(next_root).await.unwrap();
    let mark = f
        .kms
        .audit_mark(super::audit_keys::AUDIT_MARK_NAME)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(mark.expose(), b"checkpoint 2", "the older mark came back");
}

/// A root-key rotation on another node retires the root key a new version
/// was wrapped under, between the core's wrap and its store write: the
/// store refuses the version (the fence), and the core wraps it again
/// under the current root key, for a new key and for a rotation alike.
/// Nothing is ever stored under the retired root key, and the data keys
/// open.
#[tokio::test]
async fn a_version_wrapped_under_a_root_key_retired_meanwhile_is_wrapped_again() {
    let f = fixture(KmsOptions::default());
    let first = f.hsm.info().await.unwrap().current_root_key_id;

    // CreateKey: the other node rotates the HSM and fences the old root.
    let (hsm, store) = (Arc::clone(&f.hsm), f.store.inner.clone());
    *f.store.before_next_write.lock().unwrap() = Some(Hook(Box::pin(async move {
        let next = hsm.rotate_root_key().await.unwrap();
        assert_eq!(store.fence_root_keys(next, &[first]).await.unwrap(), 0);
    })));
    let created = f
        .kms
        .create_key(&op(), CreateKeyInput::default())
        .await
        .unwrap();
    let second = f.hsm.info().await.unwrap().current_root_key_id;
    assert_ne!(second, first);
    let v1 = created.versions[0].clone();
    assert_eq!(
        v1.hsm_root_key_id, second,
        "wrapped again under the current root"
    );
    let key = KeyRef::Id(created.key.id);
    let sealed = f
        .kms
        .generate_data_key(&svc(), &key, &context(), WHY, 32, false)
        .await
        .unwrap();

    // RotateKey: again, the other node moves everything to a third root
    // (re-wrapping version 1) and fences the second.
    let (hsm, store) = (Arc::clone(&f.hsm), f.store.inner.clone());
    *f.store.before_next_write.lock().unwrap() = Some(Hook(Box::pin(async move {
        let third = hsm.rotate_root_key().await.unwrap();
        let aad = crate::model::cmk_wrap_aad(v1.key_id, v1.version);
        let clear = hsm.unwrap(&v1.wrapped_material, &aad).await.unwrap();
        let wrapped = hsm.wrap(clear.expose(), &aad).await.unwrap();
        let mut moved = v1.clone();
        moved.hsm_root_key_id = wrapped.root_key_id;
        moved.wrapped_material = wrapped.blob;
        store.rewrap_version(&v1, &moved).await.unwrap();
        assert_eq!(store.fence_root_keys(third, &[second]).await.unwrap(), 0);
    })));
    f.kms.rotate_key(&op(), &key).await.unwrap();
    let third = f.hsm.info().await.unwrap().current_root_key_id;
    let versions = f.store.inner.list_versions(created.key.id).await.unwrap();
    assert_eq!(versions.len(), 2);
    for v in &versions {
        assert_eq!(v.hsm_root_key_id, third, "{v:?}");
    }
    // Both versions open, from the store (caches cleared by a new core).
    let fresh = Kms::new(
        Arc::clone(&f.store) as Arc<dyn KeyStore>,
        Arc::clone(&f.hsm) as Arc<dyn Hsm>,
        Arc::new(StaticRoles::new([("svc".to_string(), Role::Service)])),
        Arc::new(SystemClock),
        KmsOptions::default(),
    );
    fresh
        .decrypt(&svc(), &sealed.ciphertext_blob, &context(), WHY, None)
        .await
        .unwrap();
    fresh
        .generate_data_key(&svc(), &key, &context(), WHY, 32, false)
        .await
        .unwrap();
}

/// The cluster form of `a_slow_reader_cannot_undo_a_disable`: on node B, a
/// request that read the key ENABLED from the store before node A disabled
/// it, and that wants to cache it after B's poll applied the disable, does
/// not cache it: the poll's apply is a write for B's caches (the epoch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_cannot_undo_a_disable_made_on_another_node() {
    use super::freshness::{SharedStore, StaleMode};
    let f = Arc::new(fixture(KmsOptions::default()));
    let shared = SharedStore {
        mode: StaleMode::Strict,
        max_staleness: std::time::Duration::from_secs(60),
    };
    let node = |store: Arc<dyn KeyStore>| {
        Kms::new(
            store,
            Arc::clone(&f.hsm) as Arc<dyn Hsm>,
            Arc::new(StaticRoles::new([
                ("op".to_string(), Role::Operator),
                ("svc".to_string(), Role::Service),
            ])),
            Arc::new(SystemClock),
            KmsOptions {
                default_policy: crate::model::KeyPolicy::granting(["svc".to_string()]),
                ..KmsOptions::default()
            },
        )
        .with_shared_store(shared)
    };
    // A writes to the store directly; B reads through the counting store.
    let a = node(Arc::new(f.store.inner.clone()));
    let b = Arc::new(node(Arc::clone(&f.store) as Arc<dyn KeyStore>));
    let seen = b.poll_changes(0).await.unwrap();
    let id = a
        .create_key(&op(), CreateKeyInput::default())
        .await
        .unwrap()
        .key
        .id;
    let seen = b.poll_changes(seen).await.unwrap();

    let (paused_tx, paused_rx) = std::sync::mpsc::sync_channel(1);
    let (resume_tx, resume_rx) = std::sync::mpsc::sync_channel(1);
    *f.store.pause_next_get.lock().unwrap() = Some((paused_tx, resume_rx));
    let slow = {
        let b = Arc::clone(&b);
        tokio::spawn(async move {
            b.generate_data_key(&svc(), &KeyRef::Id(id), &context(), WHY, 32, false)
                .await
        })
    };
    // B's slow request has read ENABLED and is paused; A disables, B polls.
    tokio::task::spawn_blocking(move || paused_rx.recv().unwrap())
        .await
        .unwrap();
    a.disable_key(&op(), &KeyRef::Id(id)).await.unwrap();
    b.poll_changes(seen).await.unwrap();
    resume_tx.send(()).unwrap();
    // It overlapped the disable, so it may succeed itself...
    slow.await.unwrap().unwrap();
    // ...but every request on B after its poll is refused.
    for _ in 0..3 {
        let err = b
            .generate_data_key(&svc(), &KeyRef::Id(id), &context(), WHY, 32, false)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::KeyNotEnabled { .. }), "{err:?}");
    }
}

/// A poll of the change feed does not wait for this node's own writers:
/// a local write held inside its key change (here paused on its store
/// read; in production an HSM call or a slow commit) must not hold the
/// poll, or the node's freshness lapses under write load and strict mode
/// refuses data keys. The change the poll carries is applied meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_does_not_wait_for_a_local_write_in_progress() {
    use super::freshness::{SharedStore, StaleMode};
    let f = Arc::new(fixture(KmsOptions::default()));
    let shared = SharedStore {
        mode: StaleMode::Strict,
        max_staleness: std::time::Duration::from_secs(60),
    };
    let node = |store: Arc<dyn KeyStore>| {
        Kms::new(
            store,
            Arc::clone(&f.hsm) as Arc<dyn Hsm>,
            Arc::new(StaticRoles::new([
                ("op".to_string(), Role::Operator),
                ("svc".to_string(), Role::Service),
            ])),
            Arc::new(SystemClock),
            KmsOptions {
                default_policy: crate::model::KeyPolicy::granting(["svc".to_string()]),
                ..KmsOptions::default()
            },
        )
        .with_shared_store(shared)
    };
    let a = node(Arc::new(f.store.inner.clone()));
    let b = Arc::new(node(Arc::clone(&f.store) as Arc<dyn KeyStore>));
    let seen = b.poll_changes(0).await.unwrap();
    let remote = a
        .create_key(&op(), CreateKeyInput::default())
        .await
        .unwrap()
        .key
        .id;
    // B's own key: cached below (the poll forgets it), so that B's write
    // reads the store only once it holds its write guard.
    let local = b
        .create_key(&op(), CreateKeyInput::default())
        .await
        .unwrap()
        .key
        .id;
    let seen = b.poll_changes(seen).await.unwrap();
    for id in [remote, local] {
        b.generate_data_key(&svc(), &KeyRef::Id(id), &context(), WHY, 32, false)
            .await
            .unwrap();
    }

    let (paused_tx, paused_rx) = std::sync::mpsc::sync_channel(1);
    let (resume_tx, resume_rx) = std::sync::mpsc::sync_channel(1);
    *f.store.pause_next_get.lock().unwrap() = Some((paused_tx, resume_rx));
    let write = {
        let b = Arc::clone(&b);
        tokio::spawn(async move { b.disable_key(&op(), &KeyRef::Id(local)).await })
    };
    tokio::task::spawn_blocking(move || paused_rx.recv().unwrap())
        .await
        .unwrap();
    // B's write holds its guard; A disables its key; B's poll goes through.
    a.disable_key(&op(), &KeyRef::Id(remote)).await.unwrap();
    let polled =
        tokio::time::timeout(std::time::Duration::from_secs(5), b.poll_changes(seen)).await;
    resume_tx.send(()).unwrap();
    assert!(
        polled.is_ok(),
        "the poll waited for the local write to finish"
    );
    polled.unwrap().unwrap();
    let err = b
        .generate_data_key(&svc(), &KeyRef::Id(remote), &context(), WHY, 32, false)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::KeyNotEnabled { .. }), "{err:?}");
    write.await.unwrap().unwrap();
    let err = b
        .generate_data_key(&svc(), &KeyRef::Id(local), &context(), WHY, 32, false)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::KeyNotEnabled { .. }), "{err:?}");
}
