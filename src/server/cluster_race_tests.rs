//! Three in-process cores racing on one PostgreSQL database (issue #17).
//!
//! Each node is what `coffre serve` assembles on a cluster, minus the
//! gRPC front: a [`Kms`] with a `PgStore` pool of its own, a
//! `PgCoordination` of its own (leases judged by the database's clock)
//! and an audit trail of its own, every node on one database and one
//! HSM (the in-process simulator, shared). A [`NodeHsm`] in front of the
//! simulator, one per node, records which node created and destroyed
//! which key object and root key, and can pause to widen a race's window.
//!
//! The races: the scheduler on three nodes at once (the real
//! [`super::tasks::spawn_scheduler`], lease and audit included);
//! CancelKeyDeletion on one node against the destruction on another;
//! rotations of keys of protection level HSM on three nodes at once; and
//! root-key rotations on one node while the others create keys and add
//! versions. Timings are random; the seed is printed
//! (`COFFRE_RACE_SEED` replays it) and `COFFRE_RACE_ROUNDS` lengthens the
//! destroy-against-cancel loop.
//!
//! Like the store's own PostgreSQL tests, each needs PostgreSQL's
//! binaries (`build/needs.rs`): ignored with the reason when the build
//! found none, failing loudly when told they are required.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::audit::{AuditRecord, AuditTrail, AuditTrailOptions, EventFilter};
use crate::authz::{Caller, Role, StaticRoles};
use crate::cluster::postgres::PgCoordination;
use crate::cluster::{Coordination, leases};
use crate::error::Error;
use crate::hsm::sim::LocalSimHsm;
use crate::hsm::{Hsm, HsmError, HsmInfo, HsmWrapped, ObjectSeal};
use crate::model::{
    AccessReason, Clock, EncryptionContext, KeyId, KeyPolicy, KeyRef, KeyState, ManualClock,
    ProtectionLevel, Timestamp, VersionRecord,
};
use crate::secret::SecretBytes;
use crate::service::{CreateKeyInput, Kms, KmsOptions};
use crate::store::postgres::PgStore;
use crate::store::postgres::test_support::{
    TestDatabase, block_on, connector, new_database, open_sealed, require_postgres, test_mac,
};
use crate::store::{KeyFilter, KeyStore, StoreError};

const DAY: Duration = Duration::from_secs(86_400);
const WHY: AccessReason = AccessReason::CustomerInitiatedAccess;
/// Far enough from any real time that a wrong clock shows.
const T0: Timestamp = Timestamp(1_900_000_000_000);
/// The scheduler's lease: long enough never to lapse during a test, so
/// that its holder is one node throughout.
const LEASE_TTL: Duration = Duration::from_secs(10);

fn op() -> Caller {
    Caller::new("op")
}

fn svc() -> Caller {
    Caller::new("svc")
}

fn context() -> EncryptionContext {
    EncryptionContext::new([("tenant".to_string(), "races".to_string())]).unwrap()
}

/// A small generator of random timings (splitmix64), seeded once per
/// test and printed, so that a failing interleaving can be replayed.
struct Random(AtomicU64);

impl Random {
    fn new(test: &str) -> Self {
        let seed = std::env::var("COFFRE_RACE_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                let b = uuid::Uuid::new_v4();
                u64::from_le_bytes(b.as_bytes()[..8].try_into().unwrap())
            });
        eprintln!("{test}: COFFRE_RACE_SEED={seed}");
        Self(AtomicU64::new(seed))
    }

    fn next(&self) -> u64 {
        let mut z = self
            .0
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A duration of 0 to `max_ms` milliseconds.
    fn upto(&self, max_ms: u64) -> Duration {
        Duration::from_millis(self.next() % (max_ms + 1))
    }
}

/// What the HSM saw, across every node.
#[derive(Debug, Default)]
struct Ledger {
    /// Key objects created and not yet destroyed.
    live: BTreeSet<String>,
    /// Every destruction of a key object: (node, name).
    destroyed: Vec<(usize, String)>,
    /// Every root key destroyed: (node, id).
    roots_destroyed: Vec<(usize, u32)>,
    /// What a check made at the moment of a root key's destruction found
    /// wrong (see [`NodeHsm::destroy_root_key`]).
    violations: Vec<String>,
    /// Calls to `wrap`, per node.
    wraps: BTreeMap<usize, u64>,
}

/// One node's view of the shared simulator: every call goes through to
/// it, and the key-object and root-key calls are written down in the
/// shared [`Ledger`]. Pauses (a random 0 to N ms) widen the windows the
/// races are about.
struct NodeHsm {
    node: usize,
    inner: Arc<LocalSimHsm>,
    ledger: Arc<Mutex<Ledger>>,
    random: Arc<Random>,
    /// Before destroying a key object (the scheduler's destruction).
    destroy_pause_ms: AtomicU64,
    /// After wrapping (a version wrapped under a root key that a
    /// rotation retires before the version is stored): one call in four
    /// up to this, the others up to a twentieth of it.
    wrap_pause_ms: AtomicU64,
    /// After creating a key object (two rotations of one key overlap).
    create_pause_ms: AtomicU64,
    /// Key-object destructions this node makes before the next one
    /// hangs for ever (a node stopped mid-destruction); `u64::MAX`: none.
    destroy_hang_after: AtomicU64,
    destroy_calls: AtomicU64,
    /// The database a root key's destruction is checked against.
    database: Option<String>,
}

impl std::fmt::Debug for NodeHsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeHsm")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl NodeHsm {
    async fn pause(&self, max: &AtomicU64) {
        let max = max.load(Ordering::Relaxed);
        if max > 0 {
            tokio::time::sleep(self.random.upto(max)).await;
        }
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap()
    }
}

#[async_trait]
impl Hsm for NodeHsm {
    fn is_secure(&self) -> bool {
        false
    }

    async fn info(&self) -> Result<HsmInfo, HsmError> {
        self.inner.info().await
    }

    async fn generate_random(&self, len: usize) -> Result<SecretBytes, HsmError> {
        self.inner.generate_random(len).await
    }

    async fn wrap(&self, plaintext: &[u8], aad: &[u8]) -> Result<HsmWrapped, HsmError> {
        let wrapped = self.inner.wrap(plaintext, aad).await;
        *self.ledger().wraps.entry(self.node).or_default() += 1;
        // One wrap in four is slow (long enough to span a rotation), the
        // others quick: a slow one wrapped again is then likely quick.
        let long = self.wrap_pause_ms.load(Ordering::Relaxed);
        if long > 0 {
            let max = if self.random.next() % 4 == 0 {
                long
            } else {
                long / 20
            };
            tokio::time::sleep(self.random.upto(max)).await;
        }
        wrapped
    }

    async fn unwrap(&self, wrapped: &[u8], aad: &[u8]) -> Result<SecretBytes, HsmError> {
        self.inner.unwrap(wrapped, aad).await
    }

    async fn rotate_root_key(&self) -> Result<u32, HsmError> {
        self.inner.rotate_root_key().await
    }

    /// Checks first, in the database, that the fence retired the root key
    /// and that no live version is wrapped under it: what is found wrong
    /// goes to the ledger's violations (the destruction itself goes on, as
    /// the HSM would).
    async fn destroy_root_key(&self, root_key_id: u32) -> Result<(), HsmError> {
        if let Some(url) = &self.database {
            let db = connector(url).connect().await.unwrap();
            // The column's encoding (records.rs: the u32's bits as an int4).
            let id = root_key_id as i32;
            let live: i64 = db
                .query_one(
                    "SELECT count(*) FROM key_versions \
                     WHERE NOT destroyed AND NOT in_hsm AND hsm_root_key_id = $1",
                    &[&id],
                )
                .await
                .unwrap()
                .get(0);
            let state: Option<String> = db
                .query_opt("SELECT state FROM root_keys WHERE id = $1", &[&id])
                .await
                .unwrap()
                .map(|r| r.get(0));
            if live != 0 || state.as_deref() != Some("RETIRED") {
                self.ledger().violations.push(format!(
                    "root key {root_key_id} destroyed with {live} live versions under it, \
                     fence row {state:?}"
                ));
            }
        }
        let done = self.inner.destroy_root_key(root_key_id).await;
        if done.is_ok() {
            self.ledger().roots_destroyed.push((self.node, root_key_id));
        }
        done
    }

    fn supports_key_objects(&self) -> bool {
        true
    }

    async fn create_key_object(&self, name: &str) -> Result<(), HsmError> {
        self.inner.create_key_object(name).await?;
        self.ledger().live.insert(name.to_owned());
        self.pause(&self.create_pause_ms).await;
        Ok(())
    }

    async fn seal_with_object(
        &self,
        seal: ObjectSeal<'_>,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        self.inner.seal_with_object(seal, plaintext).await
    }

    async fn open_with_object(
        &self,
        seal: ObjectSeal<'_>,
        sealed: &[u8],
    ) -> Result<SecretBytes, HsmError> {
        self.inner.open_with_object(seal, sealed).await
    }

    async fn destroy_key_object(&self, name: &str) -> Result<(), HsmError> {
        if self.destroy_calls.fetch_add(1, Ordering::SeqCst)
            >= self.destroy_hang_after.load(Ordering::SeqCst)
        {
            std::future::pending::<()>().await;
        }
        self.pause(&self.destroy_pause_ms).await;
        self.inner.destroy_key_object(name).await?;
        let mut ledger = self.ledger();
        ledger.live.remove(name);
        ledger.destroyed.push((self.node, name.to_owned()));
        Ok(())
    }
}

/// One node: its core, its leases, its HSM view and its audit trail.
struct Node {
    index: usize,
    kms: Arc<Kms>,
    coordination: Arc<PgCoordination>,
    hsm: Arc<NodeHsm>,
    trail: Arc<AuditTrail>,
}

impl Node {
    fn id(&self) -> String {
        format!("node-{}", self.index)
    }

    /// What the scheduler of this node recorded in its audit log:
    /// (operation, key id, detail).
    fn scheduler_records(&self) -> Vec<(String, String, String)> {
        let filter = EventFilter {
            principal: Some("coffre/scheduler".into()),
            ..EventFilter::default()
        };
        let page = self.trail.list_events(&filter, 0, 100_000).unwrap();
        page.records
            .into_iter()
            .map(|r: AuditRecord| {
                (
                    r.operation,
                    r.key_id.unwrap_or_default(),
                    r.detail.unwrap_or_default(),
                )
            })
            .collect()
    }
}

/// Several nodes on one fresh database and one simulated HSM.
struct Cluster {
    nodes: Vec<Node>,
    /// The test's own handle on the database: it reads what the nodes
    /// wrote, bypassing every node's caches.
    store: Arc<PgStore>,
    sim: Arc<LocalSimHsm>,
    ledger: Arc<Mutex<Ledger>>,
    random: Arc<Random>,
    url: String,
    dir: tempfile::TempDir,
    // Dropped last: the database goes once every pool has.
    _db: TestDatabase,
}

fn roles() -> Arc<StaticRoles> {
    Arc::new(StaticRoles::new([
        ("op".to_string(), Role::Operator),
        ("svc".to_string(), Role::Service),
    ]))
}

impl Cluster {
    /// `clocks.len()` nodes, node `i` on clock `clocks[i]`.
    async fn start(test: &str, clocks: Vec<Arc<dyn Clock>>) -> Cluster {
        let db = new_database().await;
        let url = db.url.clone();
        let store = Arc::new(open_sealed(&url, &test_mac(), true).await.unwrap());
        let dir = tempfile::tempdir().unwrap();
        let sim = Arc::new(LocalSimHsm::open(&dir.path().join("hsm.state"), "race-pin-0").unwrap());
        let mut cluster = Cluster {
            nodes: Vec::new(),
            store,
            sim,
            ledger: Arc::default(),
            random: Arc::new(Random::new(test)),
            url,
            dir,
            _db: db,
        };
        for (index, clock) in clocks.into_iter().enumerate() {
            let node = cluster.node(index, clock).await;
            cluster.nodes.push(node);
        }
        cluster
    }

    fn hsm(&self, node: usize) -> Arc<NodeHsm> {
        Arc::new(NodeHsm {
            node,
            inner: Arc::clone(&self.sim),
            ledger: Arc::clone(&self.ledger),
            random: Arc::clone(&self.random),
            destroy_pause_ms: AtomicU64::new(0),
            wrap_pause_ms: AtomicU64::new(0),
            create_pause_ms: AtomicU64::new(0),
            destroy_hang_after: AtomicU64::new(u64::MAX),
            destroy_calls: AtomicU64::new(0),
            database: Some(self.url.clone()),
        })
    }

    /// A core as `coffre serve` builds it on the cluster: its own pool,
    /// its own coordination, the audit secret from the store (made by the
    /// first node), its own audit log.
    async fn node(&self, index: usize, clock: Arc<dyn Clock>) -> Node {
        let store = Arc::new(open_sealed(&self.url, &test_mac(), false).await.unwrap());
        let coordination = Arc::new(PgCoordination::new(
            connector(&self.url),
            format!("node-{index}"),
            uuid::Uuid::new_v4(),
        ));
        // Registered before it serves, as `coffre serve` does: the
        // registry row is what a barrier commits to.
        coordination.heartbeat(None).await.unwrap();
        let hsm = self.hsm(index);
        let kms = Kms::new(
            store,
            Arc::clone(&hsm) as Arc<dyn Hsm>,
            roles(),
            clock,
            KmsOptions {
                default_policy: KeyPolicy::granting(["svc".to_string()]),
                ..KmsOptions::default()
            },
        )
        .with_coordination(Arc::clone(&coordination) as Arc<dyn Coordination>);
        let keys = kms.audit_keys().await.unwrap();
        let trail = AuditTrail::open(
            &self.dir.path().join(format!("audit-{index}.log")),
            keys,
            AuditTrailOptions::default(),
        )
        .unwrap();
        Node {
            index,
            kms: Arc::new(kms),
            coordination,
            hsm,
            trail: Arc::new(trail),
        }
    }

    /// A core that has seen nothing yet (empty caches) on the test's
    /// store handle: what it decrypts, it unwraps from the store.
    fn verifier(&self) -> Kms {
        Kms::new(
            Arc::clone(&self.store) as Arc<dyn KeyStore>,
            self.hsm(99) as Arc<dyn Hsm>,
            roles(),
            Arc::new(ManualClock::new(T0)),
            KmsOptions::default(),
        )
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap()
    }

    /// Every key in the store.
    async fn all_keys(&self) -> Vec<crate::model::KeyRecord> {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let page = self
                .store
                .list_keys(&KeyFilter::default(), after, 500)
                .await
                .unwrap();
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            out.extend(page);
        }
        out
    }

    /// Every version of every key.
    async fn all_versions(&self) -> Vec<VersionRecord> {
        let mut out = Vec::new();
        for key in self.all_keys().await {
            out.extend(self.store.list_versions(key.id).await.unwrap());
        }
        out
    }

    /// The HSM objects `id`'s versions name.
    async fn objects_of(&self, id: KeyId) -> Vec<String> {
        self.store
            .list_versions(id)
            .await
            .unwrap()
            .into_iter()
            .filter_map(|v| v.hsm_object)
            .collect()
    }

    /// No key object is orphaned and none is gone while referenced: the
    /// objects alive in the HSM are exactly those a live version names.
    async fn check_objects(&self) {
        let referenced: BTreeSet<String> = self
            .all_versions()
            .await
            .into_iter()
            .filter(|v| v.destroyed_at.is_none())
            .filter_map(|v| v.hsm_object)
            .collect();
        let live = self.ledger().live.clone();
        let gone: Vec<_> = referenced.difference(&live).collect();
        let orphans: Vec<_> = live.difference(&referenced).collect();
        assert!(
            gone.is_empty(),
            "live versions name destroyed objects: {gone:?}"
        );
        assert!(orphans.is_empty(), "orphaned HSM objects: {orphans:?}");
    }
}

async fn create(node: &Node, level: ProtectionLevel, rotation: Option<Duration>) -> KeyId {
    node.kms
        .create_key(
            &op(),
            CreateKeyInput {
                protection_level: Some(level),
                rotation_period: rotation,
                ..CreateKeyInput::default()
            },
        )
        .await
        .unwrap()
        .key
        .id
}

/// A data key under `key`'s primary version: (version, blob).
async fn seal(node: &Node, key: KeyId) -> Result<(u32, Vec<u8>), Error> {
    let out = node
        .kms
        .generate_data_key(&svc(), &KeyRef::Id(key), &context(), WHY, 32, false)
        .await?;
    Ok((out.key_version, out.ciphertext_blob))
}

/// Opens `blob` on `kms`; the version it was made under.
async fn open(kms: &Kms, blob: &[u8]) -> Result<u32, Error> {
    Ok(kms
        .decrypt(&svc(), blob, &context(), WHY, None)
        .await?
        .key_version)
}

/// 1. The scheduler on three nodes at once, as `coffre serve` runs it
///    ([`super::tasks::spawn_scheduler`]: a pass only under the lease,
///    each action audited before and after): every due key is destroyed
///    once, every due rotation made once, by the lease holder alone; its
///    HSM objects are destroyed once; no node other than the holder
///    audits anything, and the holder audits each action twice ("about
///    to", then done), with nothing failed in between.
#[test]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
fn three_schedulers_act_once_under_the_lease() {
    require_postgres();
    block_on(async {
        let clock = Arc::new(ManualClock::new(T0));
        let clocks: Vec<Arc<dyn Clock>> = (0..3).map(|_| Arc::clone(&clock) as _).collect();
        let c = Cluster::start("three_schedulers_act_once_under_the_lease", clocks).await;
        for n in &c.nodes {
            n.hsm.destroy_pause_ms.store(3, Ordering::Relaxed);
        }

        // 24 keys due for destruction (every other one held by the HSM,
        // with two objects each), made and scheduled on varying nodes, and
        // 4 keys due for rotation (2 held by the HSM).
        let mut doomed = Vec::new();
        for i in 0..24usize {
            let level = if i % 2 == 0 {
                ProtectionLevel::Hsm
            } else {
                ProtectionLevel::Software
            };
            let id = create(&c.nodes[i % 3], level, None).await;
            c.nodes[(i + 1) % 3]
                .kms
                .rotate_key(&op(), &KeyRef::Id(id))
                .await
                .unwrap();
            c.nodes[(i + 2) % 3]
                .kms
                .schedule_key_deletion(&op(), &KeyRef::Id(id), Some(7))
                .await
                .unwrap();
            doomed.push(id);
        }
        let mut rotating = Vec::new();
        for i in 0..4usize {
            let level = if i % 2 == 0 {
                ProtectionLevel::Hsm
            } else {
                ProtectionLevel::Software
            };
            rotating.push(create(&c.nodes[i % 3], level, Some(DAY)).await);
        }
        let doomed_objects: BTreeSet<String> = {
            let mut names = BTreeSet::new();
            for id in &doomed {
                for v in c.store.list_versions(*id).await.unwrap() {
                    names.extend(v.hsm_object);
                }
            }
            names
        };
        assert_eq!(doomed_objects.len(), 24, "12 HSM keys of 2 versions");
        clock.advance(DAY * 8);

        let schedulers: Vec<_> = c
            .nodes
            .iter()
            .map(|n| {
                super::tasks::spawn_scheduler(
                    Arc::clone(&n.kms),
                    Arc::clone(&n.trail),
                    Duration::from_millis(10),
                    Arc::clone(&n.coordination) as Arc<dyn Coordination>,
                    LEASE_TTL,
                )
            })
            .collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let keys = c.all_keys().await;
            let destroyed = keys
                .iter()
                .filter(|k| k.state == KeyState::Destroyed)
                .count();
            let rotated = keys
                .iter()
                .filter(|k| rotating.contains(&k.id) && k.primary_version > 1)
                .count();
            if destroyed == doomed.len() && rotated == rotating.len() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "after 60 s: {destroyed} destroyed, {rotated} rotated"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // More passes on every node: nothing is left to do, nothing is
        // done again.
        tokio::time::sleep(Duration::from_millis(300)).await;
        for s in &schedulers {
            s.abort();
        }
        for s in schedulers {
            let _ = s.await;
        }

        // One holder throughout; the others never took the lease.
        let leases = c.nodes[0].coordination.leases().await.unwrap();
        let lease = leases
            .iter()
            .find(|l| l.name == leases::SCHEDULER)
            .expect("the scheduler's lease");
        assert_eq!(lease.token, 1, "one holder, never another: {lease:?}");
        let holder = c
            .nodes
            .iter()
            .find(|n| n.id() == lease.holder)
            .expect("the holder is one of the nodes");

        for id in &doomed {
            let key = c.store.get_key(*id).await.unwrap().unwrap();
            assert_eq!(key.state, KeyState::Destroyed, "{key:?}");
            for v in c.store.list_versions(*id).await.unwrap() {
                assert!(v.destroyed_at.is_some() && v.wrapped_material.is_empty());
            }
        }
        for id in &rotating {
            let key = c.store.get_key(*id).await.unwrap().unwrap();
            assert_eq!(key.primary_version, 2, "rotated once: {key:?}");
            let numbers: Vec<u32> = c
                .store
                .list_versions(*id)
                .await
                .unwrap()
                .iter()
                .map(|v| v.version)
                .collect();
            assert_eq!(numbers, vec![1, 2]);
        }

        // The HSM: each doomed object destroyed once, by the holder.
        {
            let ledger = c.ledger();
            let mut times: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
            for (node, name) in &ledger.destroyed {
                times.entry(name.as_str()).or_default().push(*node);
            }
            for name in &doomed_objects {
                assert_eq!(
                    times.get(name.as_str()),
                    Some(&vec![holder.index]),
                    "object {name} destroyed by nodes {:?} (holder node-{})",
                    times.get(name.as_str()),
                    holder.index
                );
            }
            assert_eq!(ledger.destroyed.len(), doomed_objects.len());
        }
        c.check_objects().await;

        // The audit logs: the holder's records each action twice, in
        // order, and the other nodes none.
        for n in &c.nodes {
            let records = n.scheduler_records();
            if n.index != holder.index {
                assert!(
                    records.is_empty(),
                    "{} audited scheduled actions without the lease: {records:?}",
                    n.id()
                );
                continue;
            }
            let mut per_key: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
            for (operation, key, detail) in records {
                per_key.entry(key).or_default().push((operation, detail));
            }
            let expected = |ids: &[KeyId], operation: &str, about: &str| {
                for id in ids {
                    assert_eq!(
                        per_key.get(&id.to_string()),
                        Some(&vec![
                            (operation.to_string(), about.to_string()),
                            (operation.to_string(), "scheduled".to_string()),
                        ]),
                        "the audit of {operation} {id}"
                    );
                }
            };
            expected(
                &doomed,
                "DestroyKey",
                "destroying: the waiting period is over",
            );
            expected(
                &rotating,
                "RotateKey",
                "rotating: the rotation period is over",
            );
            assert_eq!(per_key.len(), doomed.len() + rotating.len());
        }
    });
}

/// How one round of destroy-against-cancel ended.
#[derive(Debug, Default)]
struct Outcomes {
    /// The cancellation won: the key is DISABLED, its material intact.
    cancelled: u32,
    /// The cancellation came once the destruction had committed its
    /// intent (DESTROYING) and was refused for it.
    refused_destroying: u32,
    /// The cancellation came after the tombstone.
    refused_destroyed: u32,
    /// The cancellation read the key before the scheduler's write and
    /// lost the compare-and-swap to it (a retry meets one of the above).
    conflicted: u32,
}

/// 2. CancelKeyDeletion on one node while another node's scheduler
///    destroys, many times with random timing: one or the other, never
///    both. The cancelling node's clock is a day behind the key's
///    deletion time (clock skew between nodes), so its own "already due"
///    check does not refuse: only the DESTROYING intent in the store
///    stands between the two. A cancelled key is never destroyed (all its
///    objects alive, a data key made before still opens); a destroyed key
///    lost all its objects; a DISABLED key without its objects is the bug
///    this is about.
#[test]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
fn destruction_against_cancel_ends_one_way_or_the_other() {
    require_postgres();
    let rounds: u32 = std::env::var("COFFRE_RACE_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(40);
    block_on(async {
        // Node 0 cancels, a day before the deletion time by its clock;
        // nodes 1 and 2 run the scheduler, a day after it by theirs.
        let behind = Arc::new(ManualClock::new(T0));
        let ahead = Arc::new(ManualClock::new(T0.plus(DAY * 8)));
        let clocks: Vec<Arc<dyn Clock>> = vec![
            Arc::clone(&behind) as _,
            Arc::clone(&ahead) as _,
            Arc::clone(&ahead) as _,
        ];
        let c = Cluster::start(
            "destruction_against_cancel_ends_one_way_or_the_other",
            clocks,
        )
        .await;
        for n in &c.nodes[1..] {
            n.hsm.destroy_pause_ms.store(8, Ordering::Relaxed);
        }
        let verifier = c.verifier();
        let mut seen = Outcomes::default();
        for round in 0..rounds {
            let level = if round % 4 == 3 {
                ProtectionLevel::Software
            } else {
                ProtectionLevel::Hsm
            };
            let canceller = &c.nodes[0];
            let id = create(canceller, level, None).await;
            canceller
                .kms
                .rotate_key(&op(), &KeyRef::Id(id))
                .await
                .unwrap();
            let (_, blob) = seal(canceller, id).await.unwrap();
            canceller
                .kms
                .schedule_key_deletion(&op(), &KeyRef::Id(id), Some(7))
                .await
                .unwrap();
            let objects = c.objects_of(id).await;

            // Both scheduler nodes try (the lease lets one act); the
            // cancellation comes 0 to 30 ms later. A pass commits its
            // DESTROYING step within a few milliseconds, so one round in
            // three cancels at once, or the cancel would seldom win.
            let wait = if round % 3 == 0 {
                Duration::ZERO
            } else {
                c.random.upto(30)
            };
            let passes: Vec<_> = c.nodes[1..]
                .iter()
                .map(|n| {
                    let (kms, coordination) = (Arc::clone(&n.kms), Arc::clone(&n.coordination));
                    tokio::spawn(async move {
                        match coordination.acquire(leases::SCHEDULER, LEASE_TTL).await {
                            Ok(Some(_)) => Some(kms.run_scheduler_once().await),
                            _ => None,
                        }
                    })
                })
                .collect();
            let cancel = {
                let kms = Arc::clone(&canceller.kms);
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    kms.cancel_key_deletion(&op(), &KeyRef::Id(id)).await
                })
            };
            let cancel = cancel.await.unwrap();
            let mut acted = 0;
            for p in passes {
                if let Some(report) = p.await.unwrap() {
                    acted += 1;
                    assert!(
                        report.destroyed.is_empty() || report.destroyed == vec![id],
                        "{report:?}"
                    );
                }
            }
            assert_eq!(acted, 1, "one scheduler pass per round (the lease)");

            let key = c.store.get_key(id).await.unwrap().unwrap();
            let destroyed: Vec<String> = {
                let ledger = c.ledger();
                ledger
                    .destroyed
                    .iter()
                    .filter(|(_, name)| objects.contains(name))
                    .map(|(_, name)| name.clone())
                    .collect()
            };
            let what = format!(
                "round {round} ({level:?}, cancel after {wait:?}): cancel {cancel:?}, key {:?} \
                 (destroy started {:?}), objects destroyed {destroyed:?} of {objects:?}",
                key.state, key.destroy_started_at
            );
            match &cancel {
                Ok(_) => {
                    assert_eq!(key.state, KeyState::Disabled, "{what}");
                    assert_eq!(key.destroy_started_at, None, "{what}");
                    assert!(destroyed.is_empty(), "a cancelled key lost objects: {what}");
                    // Still whole: enabled again, its data key opens on a
                    // core that caches nothing.
                    canceller
                        .kms
                        .enable_key(&op(), &KeyRef::Id(id))
                        .await
                        .unwrap();
                    assert_eq!(open(&verifier, &blob).await.unwrap(), 2, "{what}");
                    seen.cancelled += 1;
                }
                Err(
                    refused
                    @ (Error::FailedPrecondition(_) | Error::Store(StoreError::Conflict(_))),
                ) => {
                    assert_eq!(key.state, KeyState::Destroyed, "{what}");
                    let mut all = destroyed.clone();
                    all.sort();
                    let mut expected = objects.clone();
                    expected.sort();
                    assert_eq!(all, expected, "each object destroyed once: {what}");
                    assert!(open(&verifier, &blob).await.is_err(), "{what}");
                    match refused {
                        Error::FailedPrecondition(m) if m.contains("destruction of key") => {
                            seen.refused_destroying += 1
                        }
                        Error::FailedPrecondition(m) => {
                            assert!(m.contains("DESTROYED"), "{what}");
                            seen.refused_destroyed += 1;
                        }
                        _ => seen.conflicted += 1,
                    }
                }
                Err(e) => panic!("unexpected error {e:?}: {what}"),
            }
        }
        c.check_objects().await;
        eprintln!("destruction against cancel, {rounds} rounds: {seen:?}");
        assert!(
            seen.cancelled > 0
                && seen.refused_destroying + seen.refused_destroyed + seen.conflicted > 0,
            "both outcomes should occur over {rounds} rounds: {seen:?}"
        );
    });
}

/// 3. Keys of protection level HSM rotated on three nodes at once, many
///    times: of the rotations that overlap on one version, one wins and
///    the others are refused as a conflict. No version is lost (every
///    data key made under a version that won opens afterwards, on a core
///    that caches nothing), the versions are 1 to the primary without a
///    gap, each names an object of its own that the HSM still holds, and
///    the losers' objects are gone (no orphan).
#[test]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
fn hsm_level_rotations_on_three_nodes_lose_no_version() {
    require_postgres();
    block_on(async {
        let clock = Arc::new(ManualClock::new(T0));
        let clocks: Vec<Arc<dyn Clock>> = (0..3).map(|_| Arc::clone(&clock) as _).collect();
        let c = Cluster::start("hsm_level_rotations_on_three_nodes_lose_no_version", clocks).await;
        for n in &c.nodes {
            n.hsm.create_pause_ms.store(4, Ordering::Relaxed);
        }
        let keys: Vec<KeyId> = {
            let mut keys = Vec::new();
            for i in 0..3 {
                keys.push(create(&c.nodes[i], ProtectionLevel::Hsm, None).await);
            }
            keys
        };
        const ROUNDS: usize = 15;
        let workers: Vec<_> = c
            .nodes
            .iter()
            .map(|n| {
                let kms = Arc::clone(&n.kms);
                let keys = keys.clone();
                tokio::spawn(async move {
                    let mut won = Vec::new();
                    let mut lost = 0u32;
                    for _ in 0..ROUNDS {
                        for id in &keys {
                            match kms.rotate_key(&op(), &KeyRef::Id(*id)).await {
                                Ok(record) => {
                                    let out = kms
                                        .generate_data_key(
                                            &svc(),
                                            &KeyRef::Id(*id),
                                            &context(),
                                            WHY,
                                            32,
                                            false,
                                        )
                                        .await
                                        .unwrap();
                                    won.push((
                                        *id,
                                        record.primary_version,
                                        out.key_version,
                                        out.ciphertext_blob,
                                    ));
                                }
                                Err(Error::Store(StoreError::Conflict(k))) if k == *id => lost += 1,
                                Err(e) => panic!("rotating {id}: {e:?}"),
                            }
                        }
                    }
                    (won, lost)
                })
            })
            .collect();
        let mut won = Vec::new();
        let mut lost = 0;
        for w in workers {
            let (w, l) = w.await.unwrap();
            won.extend(w);
            lost += l;
        }
        eprintln!(
            "HSM-level rotations: {} won, {lost} lost to another node",
            won.len()
        );
        assert!(
            lost > 0,
            "no two rotations overlapped: the race was not run"
        );

        let verifier = c.verifier();
        for id in &keys {
            let key = c.store.get_key(*id).await.unwrap().unwrap();
            let wins = won.iter().filter(|(k, ..)| k == id).count();
            assert_eq!(
                key.primary_version as usize,
                1 + wins,
                "every acknowledged rotation is a version of key {id}"
            );
            let versions = c.store.list_versions(*id).await.unwrap();
            let numbers: Vec<u32> = versions.iter().map(|v| v.version).collect();
            assert_eq!(numbers, (1..=key.primary_version).collect::<Vec<_>>());
            let mut claimed: Vec<u32> = won
                .iter()
                .filter(|(k, ..)| k == id)
                .map(|(_, v, ..)| *v)
                .collect();
            claimed.sort_unstable();
            assert_eq!(
                claimed,
                (2..=key.primary_version).collect::<Vec<_>>(),
                "each version won by one rotation"
            );
            let names: BTreeSet<_> = versions
                .iter()
                .filter_map(|v| v.hsm_object.clone())
                .collect();
            assert_eq!(names.len(), versions.len(), "an object of its own each");
        }
        for (id, version, sealed_under, blob) in &won {
            // A data key made right after a rotation is under that
            // version, or a later one another node made meanwhile.
            assert!(sealed_under >= version);
            assert_eq!(
                open(&verifier, blob).await.unwrap(),
                *sealed_under,
                "a data key of {id} v{sealed_under}"
            );
        }
        c.check_objects().await;
        let ledger = c.ledger();
        assert!(
            ledger.destroyed.len() as u32 >= lost,
            "each loser destroyed its object: {} destroyed, {lost} lost",
            ledger.destroyed.len()
        );
    });
}

/// 4. Root-key rotations on node 0 while nodes 1 and 2 create keys, add
///    versions and make data keys, their wraps slowed (a version wrapped
///    under the root key that was current, stored after a rotation
///    retired it: the store refuses it and the node wraps it again).
///    Afterwards no live version and no secret is under a retired root
///    key, the HSM holds the current root key alone, every data key opens
///    on a core that caches nothing, and each old root key was destroyed
///    only once the database's fence had retired it with nothing live
///    under it (checked at that moment, by the HSM).
#[test]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
fn root_rotation_against_key_creation_leaves_nothing_under_a_retired_root() {
    require_postgres();
    block_on(async {
        let clock = Arc::new(ManualClock::new(T0));
        let clocks: Vec<Arc<dyn Clock>> = (0..3).map(|_| Arc::clone(&clock) as _).collect();
        let c = Cluster::start(
            "root_rotation_against_key_creation_leaves_nothing_under_a_retired_root",
            clocks,
        )
        .await;
        for n in &c.nodes[1..] {
            n.hsm.wrap_pause_ms.store(300, Ordering::Relaxed);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = c.nodes[1..]
            .iter()
            .map(|n| {
                let kms = Arc::clone(&n.kms);
                let stop = Arc::clone(&stop);
                tokio::spawn(async move {
                    let mut blobs = Vec::new();
                    let mut mine: Vec<KeyId> = Vec::new();
                    let (mut made, mut refused) = (0u64, 0u64);
                    while !stop.load(Ordering::Relaxed) {
                        // A write whose material was wrapped again and
                        // again under root keys retired before it landed
                        // is refused, storing nothing (back-to-back
                        // rotations): allowed, and counted.
                        match kms.create_key(&op(), CreateKeyInput::default()).await {
                            Ok(view) => {
                                made += 1;
                                mine.push(view.key.id);
                            }
                            Err(Error::Store(StoreError::RootKeyRetired(_))) => refused += 1,
                            Err(e) => panic!("creating a key: {e:?}"),
                        }
                        let (Some(&id), Some(&older)) = (mine.last(), mine.get(mine.len() / 2))
                        else {
                            continue;
                        };
                        // And a version on an older key of this node.
                        match kms.rotate_key(&op(), &KeyRef::Id(older)).await {
                            Ok(_) => made += 1,
                            Err(Error::Store(StoreError::RootKeyRetired(_))) => refused += 1,
                            Err(e) => panic!("rotating a key: {e:?}"),
                        }
                        for key in [id, older] {
                            let out = kms
                                .generate_data_key(
                                    &svc(),
                                    &KeyRef::Id(key),
                                    &context(),
                                    WHY,
                                    32,
                                    false,
                                )
                                .await
                                .unwrap();
                            blobs.push((key, out.key_version, out.ciphertext_blob));
                        }
                    }
                    (blobs, made, refused)
                })
            })
            .collect();

        const ROTATIONS: usize = 8;
        let rotator = &c.nodes[0];
        let mut old_roots = BTreeSet::new();
        let mut reruns = 0;
        for _ in 0..ROTATIONS {
            tokio::time::sleep(c.random.upto(200)).await;
            let done = loop {
                match rotator.kms.rotate_root_key(&op(), |_| true).await {
                    Ok(done) => break done,
                    // A version stored under the old root key after the
                    // re-wrap pass: the rotation says so and is run again.
                    Err(Error::FailedPrecondition(m)) if m.contains("still wrapped") => reruns += 1,
                    // AuthenticationFailed: a stored version is under a
                    // root key the HSM destroyed (lost).
                    Err(e) => panic!("root rotation: {e:?}"),
                }
            };
            assert!(done.done, "{done:?}");
            old_roots.extend(done.destroyed_root_key_ids);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.store(true, Ordering::Relaxed);
        let mut blobs = Vec::new();
        let (mut made, mut refused) = (0, 0);
        for w in writers {
            let (b, m, r) = w.await.unwrap();
            blobs.extend(b);
            made += m;
            refused += r;
        }

        let info = c.sim.info().await.unwrap();
        assert_eq!(
            info.root_key_ids,
            vec![info.current_root_key_id],
            "the HSM holds the current root key alone"
        );
        assert_eq!(old_roots.len(), ROTATIONS, "{old_roots:?}");
        let versions = c.all_versions().await;
        let under_old: Vec<_> = versions
            .iter()
            .filter(|v| v.destroyed_at.is_none() && v.hsm_root_key_id != info.current_root_key_id)
            .map(|v| (v.key_id, v.version, v.hsm_root_key_id))
            .collect();
        assert!(
            under_old.is_empty(),
            "versions under a retired root: {under_old:?}"
        );
        for (name, secret) in c.store.list_secrets().await.unwrap() {
            assert_eq!(secret.hsm_root_key_id, info.current_root_key_id, "{name}");
        }
        assert_eq!(versions.len() as u64, made, "every version made is stored");
        let verifier = c.verifier();
        for (key, version, blob) in &blobs {
            assert_eq!(
                open(&verifier, blob).await.unwrap(),
                *version,
                "a data key of {key}"
            );
        }
        // The audit secret was re-wrapped too: a new node still reads it.
        c.node(3, Arc::new(ManualClock::new(T0))).await;
        let ledger = c.ledger();
        assert!(ledger.violations.is_empty(), "{:?}", ledger.violations);
        let wraps: u64 = ledger
            .wraps
            .iter()
            .filter(|(node, _)| **node != 0 && **node != 99)
            .map(|(_, n)| n)
            .sum();
        eprintln!(
            "root rotation against creation: {ROTATIONS} rotations ({reruns} run again: a \
             version stored under the old root key after the re-wrap pass), {made} versions \
             made by nodes 1 and 2 with {wraps} wraps ({} wrapped again after the fence \
             refused them, {refused} writes refused after their last attempt), {} data keys opened",
            wraps.saturating_sub(made),
            blobs.len()
        );
    });
}

/// 5. The scheduler's lease passes to another node in the middle of a
///    destruction: node 1 commits the DESTROYING step and destroys the
///    first of the key's HSM objects, then stops (its pass cut off, as
///    by a SIGKILL; its lease left to run out). While node 1's lease
///    runs, node 2 is refused it; once it has run out, node 2's pass
///    finishes the destruction: the key is DESTROYED, every object is
///    gone (one destroyed twice at most, which is harmless), the
///    cancellation is refused from the DESTROYING step on, and no data
///    key made under the key opens.
#[test]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
fn a_destruction_cut_off_with_its_node_is_finished_by_the_next_lease_holder() {
    require_postgres();
    block_on(async {
        let behind = Arc::new(ManualClock::new(T0));
        let ahead = Arc::new(ManualClock::new(T0.plus(DAY * 8)));
        let clocks: Vec<Arc<dyn Clock>> = vec![
            Arc::clone(&behind) as _,
            Arc::clone(&ahead) as _,
            Arc::clone(&ahead) as _,
        ];
        let c = Cluster::start(
            "a_destruction_cut_off_with_its_node_is_finished_by_the_next_lease_holder",
            clocks,
        )
        .await;
        let owner = &c.nodes[0];
        let id = create(owner, ProtectionLevel::Hsm, None).await;
        for _ in 0..2 {
            owner.kms.rotate_key(&op(), &KeyRef::Id(id)).await.unwrap();
        }
        let (_, blob) = seal(owner, id).await.unwrap();
        owner
            .kms
            .schedule_key_deletion(&op(), &KeyRef::Id(id), Some(7))
            .await
            .unwrap();
        let objects: BTreeSet<String> = c.objects_of(id).await.into_iter().collect();
        assert_eq!(objects.len(), 3, "three versions, three objects");

        // Node 1 takes a short lease and starts; its HSM is slow from the
        // second destruction on, and the pass is cut off while it waits.
        let (first, second) = (&c.nodes[1], &c.nodes[2]);
        let short = Duration::from_secs(2);
        let lease = first
            .coordination
            .acquire(leases::SCHEDULER, short)
            .await
            .unwrap()
            .expect("the lease is free");
        first.hsm.destroy_hang_after.store(1, Ordering::SeqCst);
        let pass = {
            let kms = Arc::clone(&first.kms);
            tokio::spawn(async move { kms.run_scheduler_once().await })
        };
        let destroyed_by_first = |c: &Cluster| {
            c.ledger()
                .destroyed
                .iter()
                .filter(|(node, name)| *node == 1 && objects.contains(name))
                .count()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while first.hsm.destroy_calls.load(Ordering::SeqCst) < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "node 1 did not reach its second destruction"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        pass.abort();
        assert!(pass.await.unwrap_err().is_cancelled());
        assert_eq!(
            destroyed_by_first(&c),
            1,
            "node 1 was cut off after its first object"
        );
        let key = c.store.get_key(id).await.unwrap().unwrap();
        assert_eq!(key.state, KeyState::PendingDeletion);
        assert!(
            key.destroy_started_at.is_some(),
            "the DESTROYING step is committed"
        );
        // Cancelling is refused from the DESTROYING step on, on any node.
        let refused = owner
            .kms
            .cancel_key_deletion(&op(), &KeyRef::Id(id))
            .await
            .unwrap_err();
        assert!(
            matches!(&refused, Error::FailedPrecondition(m) if m.contains("destruction of key")),
            "{refused:?}"
        );

        // Node 2 waits for the lease: refused while node 1's runs.
        assert!(
            second
                .coordination
                .acquire(leases::SCHEDULER, LEASE_TTL)
                .await
                .unwrap()
                .is_none(),
            "node 2 took the scheduler's lease while node 1 held it"
        );
        tokio::time::sleep(
            lease
                .valid_until
                .saturating_duration_since(std::time::Instant::now())
                + Duration::from_millis(200),
        )
        .await;
        let mut taken = None;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while taken.is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "node 2 never got the lease that node 1 left to run out"
            );
            taken = second
                .coordination
                .acquire(leases::SCHEDULER, LEASE_TTL)
                .await
                .unwrap();
            if taken.is_none() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let report = second.kms.run_scheduler_once().await;
        assert_eq!(report.destroyed, vec![id], "{report:?}");
        assert_eq!(report.failed, 0, "{report:?}");

        let key = c.store.get_key(id).await.unwrap().unwrap();
        assert_eq!(key.state, KeyState::Destroyed);
        let (first_count, second_count) = {
            let ledger = c.ledger();
            let by_second: BTreeSet<&String> = ledger
                .destroyed
                .iter()
                .filter(|(node, name)| *node == 2 && objects.contains(name))
                .map(|(_, name)| name)
                .collect();
            let by_first: BTreeSet<&String> = ledger
                .destroyed
                .iter()
                .filter(|(node, name)| *node == 1 && objects.contains(name))
                .map(|(_, name)| name)
                .collect();
            let all: BTreeSet<&String> = by_first.union(&by_second).copied().collect();
            assert_eq!(all, objects.iter().collect(), "every object destroyed");
            assert!(
                objects.iter().all(|o| !ledger.live.contains(o)),
                "no object of the key left in the HSM"
            );
            for name in &objects {
                let times = ledger.destroyed.iter().filter(|(_, n)| n == name).count();
                assert!(times <= 2, "{name} destroyed {times} times");
            }
            (by_first.len(), by_second.len())
        };
        assert!(open(&c.verifier(), &blob).await.is_err());
        c.check_objects().await;
        eprintln!(
            "lease hand-over mid-destruction: node 1 destroyed {first_count} of {} objects \
             before it stopped, node 2 destroyed {second_count}",
            objects.len()
        );
    });
}
