//! Several nodes on one store (`freshness.rs`): two cores on one sled
//! store and one HSM stand for two nodes; each polls the change feed when
//! the test says so.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;
use std::time::Duration;

use super::freshness::{SharedStore, StaleMode};
use super::*;
use crate::authz::StaticRoles;
use crate::hsm::sim::LocalSimHsm;
use crate::model::{AccessReason, EncryptionContext, KeyPolicy, SystemClock};
use crate::store::SledStore;

const WHY: AccessReason = AccessReason::CustomerInitiatedAccess;

fn context() -> EncryptionContext {
    EncryptionContext::new([("tenant".to_string(), "t1".to_string())]).unwrap()
}

fn node(store: &Arc<dyn KeyStore>, hsm: &Arc<dyn Hsm>, shared: SharedStore) -> Kms {
    let roles = StaticRoles::new([
        ("op".to_string(), Role::Operator),
        ("svc".to_string(), Role::Service),
    ]);
    Kms::new(
        Arc::clone(store),
        Arc::clone(hsm),
        Arc::new(roles),
        Arc::new(SystemClock),
        KmsOptions {
            default_policy: KeyPolicy::granting(["svc".to_string()]),
            ..KmsOptions::default()
        },
    )
    .with_shared_store(shared)
}

fn strict(ms: u64) -> SharedStore {
    SharedStore {
        mode: StaleMode::Strict,
        max_staleness: Duration::from_millis(ms),
    }
}

struct Two {
    _dir: tempfile::TempDir,
    a: Kms,
    b: Kms,
}

fn two_nodes(a: SharedStore, b: SharedStore) -> Two {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn KeyStore> = Arc::new(SledStore::open(&dir.path().join("store")).unwrap());
    let hsm: Arc<dyn Hsm> =
        Arc::new(LocalSimHsm::open(&dir.path().join("hsm.state"), "test-pin-0000").unwrap());
    Two {
        a: node(&store, &hsm, a),
        b: node(&store, &hsm, b),
        _dir: dir,
    }
}

async fn data_key(kms: &Kms, key: &KeyRef) -> Result<DataKeyOutput> {
    kms.generate_data_key(&Caller::new("svc"), key, &context(), WHY, 32, false)
        .await
}

/// A disable acknowledged by one node is refused by the other as soon as
/// the other has polled the feed, even with the key in its cache; before
/// its poll, the other still serves from its cache (which is why the
/// freshness bound exists).
#[tokio::test]
async fn a_disable_on_one_node_is_refused_on_the_other_after_its_poll() {
    let n = two_nodes(strict(60_000), strict(60_000));
    let mut seen =
        n.b.poll_changes(n.b.feed_head().await.unwrap())
            .await
            .unwrap();
    n.a.poll_changes(0).await.unwrap();
    let key = KeyRef::Id(
        n.a.create_key(&Caller::new("op"), CreateKeyInput::default())
            .await
            .unwrap()
            .key
            .id,
    );
    let sealed = data_key(&n.b, &key).await.unwrap();
    n.a.disable_key(&Caller::new("op"), &key).await.unwrap();
    // Cached on B, not yet polled: still served.
    data_key(&n.b, &key).await.unwrap();
    seen = n.b.poll_changes(seen).await.unwrap();
    let err = data_key(&n.b, &key).await.unwrap_err();
    assert!(matches!(err, Error::KeyNotEnabled { .. }), "{err:?}");
    let err =
        n.b.decrypt(
            &Caller::new("svc"),
            &sealed.ciphertext_blob,
            &context(),
            WHY,
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::KeyNotEnabled { .. }), "{err:?}");

    // A re-enable travels the same way; a key created on A is found on B
    // at once after B's poll, though B had just been told it did not exist.
    n.a.enable_key(&Caller::new("op"), &key).await.unwrap();
    n.a.create_key(
        &Caller::new("op"),
        CreateKeyInput {
            alias: Some("made-on-a".into()),
            ..CreateKeyInput::default()
        },
    )
    .await
    .unwrap();
    seen = n.b.poll_changes(seen).await.unwrap();
    data_key(&n.b, &key).await.unwrap();
    data_key(&n.b, &KeyRef::Alias("made-on-a".into()))
        .await
        .unwrap();
    // Create, disable, enable, create: four generations applied.
    assert_eq!(seen, 4);
}

/// Strict mode: a node whose last successful poll was sent longer ago
/// than the bound refuses every data key (UNAVAILABLE) and is not ready,
/// before its first poll too; a successful poll makes it serve again.
#[tokio::test]
async fn a_stale_node_refuses_data_keys_until_it_polls_again() {
    let n = two_nodes(strict(60_000), strict(150));
    n.a.poll_changes(0).await.unwrap();
    let key = KeyRef::Id(
        n.a.create_key(&Caller::new("op"), CreateKeyInput::default())
            .await
            .unwrap()
            .key
            .id,
    );
    let err = data_key(&n.b, &key).await.unwrap_err();
    assert!(
        matches!(err, Error::NotFresh { .. }),
        "before any poll: {err:?}"
    );
    let seen = n.b.poll_changes(0).await.unwrap();
    data_key(&n.b, &key).await.unwrap();
    n.b.check_ready().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let err = data_key(&n.b, &key).await.unwrap_err();
    assert!(matches!(err, Error::NotFresh { .. }), "{err:?}");
    assert!(err.to_string().contains("retry on another node"), "{err}");
    let err = n.b.check_ready().await.unwrap_err();
    assert!(matches!(err, Error::NotFresh { .. }), "{err:?}");
    // The refusal names no key: an unknown one gets the same.
    let err = data_key(&n.b, &KeyRef::Alias("no-such-key".into()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFresh { .. }), "{err:?}");
    n.b.poll_changes(seen).await.unwrap();
    data_key(&n.b, &key).await.unwrap();
    let (stale, overdue) = n.b.staleness().unwrap();
    assert_eq!(stale, 3, "the stale requests are counted");
    assert_eq!(overdue, 0.0);
}

/// Available mode: a stale node keeps serving from its caches (counted),
/// and stays ready.
#[tokio::test]
async fn available_mode_serves_while_stale() {
    let available = SharedStore {
        mode: StaleMode::Available,
        max_staleness: Duration::from_millis(50),
    };
    let n = two_nodes(strict(60_000), available);
    n.a.poll_changes(0).await.unwrap();
    let key = KeyRef::Id(
        n.a.create_key(&Caller::new("op"), CreateKeyInput::default())
            .await
            .unwrap()
            .key
            .id,
    );
    n.b.poll_changes(0).await.unwrap();
    tokio::time::sleep(Duration::from_millis(80)).await;
    data_key(&n.b, &key).await.unwrap();
    n.b.check_ready().await.unwrap();
    assert_eq!(n.b.staleness().unwrap().0, 1);
}

/// A freshness lease is never moved back by a slower, older poll, and a
/// failed poll does not extend it.
#[tokio::test]
async fn a_failed_poll_does_not_extend_freshness() {
    let n = two_nodes(strict(60_000), strict(100));
    let seen = n.b.poll_changes(0).await.unwrap();
    assert!(n.b.is_fresh());
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(!n.b.is_fresh());
    // A poll from beyond the feed's end succeeds and applies nothing.
    assert_eq!(n.b.poll_changes(seen).await.unwrap(), seen);
    assert!(n.b.is_fresh());
}

/// Leases kept in memory, as a database would keep them for two nodes:
/// one holder per name until released.
#[derive(Debug, Default)]
struct Leases {
    held: std::sync::Mutex<std::collections::HashMap<String, String>>,
}

#[derive(Debug)]
struct NodeLeases {
    node: String,
    leases: Arc<Leases>,
    /// The durability barrier, as a database's acknowledgements would
    /// drive it: a forced barrier is acknowledged at once, or held until
    /// [`Acks::release`] while `acks.holding`.
    barrier: Arc<crate::cluster::barrier::Barrier>,
    acks: Arc<Acks>,
    /// The database's lineage: a test bumps it for a promotion.
    lineage: Arc<std::sync::atomic::AtomicU64>,
    /// Barriers forced by a wrap.
    forced: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default)]
struct Acks {
    holding: std::sync::atomic::AtomicBool,
    held: std::sync::Mutex<Vec<crate::cluster::barrier::Started>>,
}

impl NodeLeases {
    fn new(node: &str, leases: &Arc<Leases>) -> Self {
        Self {
            node: node.into(),
            leases: Arc::clone(leases),
            barrier: Arc::default(),
            acks: Arc::default(),
            lineage: Arc::default(),
            forced: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl NodeLeases {
    fn lineage(&self) -> u64 {
        self.lineage.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl NodeLeases {
    /// The held commits are acknowledged (under the lineage in force
    /// now), and later ones at once.
    fn release_acks(&self) {
        self.acks
            .holding
            .store(false, std::sync::atomic::Ordering::SeqCst);
        for started in self.acks.held.lock().unwrap().drain(..) {
            self.barrier.finish(started, Ok(()), self.lineage());
        }
    }
}

#[async_trait::async_trait]
impl crate::cluster::Coordination for NodeLeases {
    fn node_id(&self) -> &str {
        &self.node
    }
    fn render_metrics(&self, _out: &mut String) {}
    fn read_mark(&self) -> crate::cluster::ReadMark {
        self.barrier.mark(self.lineage())
    }
    fn durable_ticket(&self, mark: crate::cluster::ReadMark) -> crate::cluster::DurableTicket {
        self.barrier.ticket(mark)
    }
    fn durability(&self, ticket: crate::cluster::DurableTicket) -> crate::cluster::Durability {
        self.barrier.durability(ticket, self.lineage())
    }
    async fn wait_durable(
        &self,
        ticket: crate::cluster::DurableTicket,
        timeout: Duration,
    ) -> Result<(), crate::cluster::BarrierError> {
        let start = || {
            self.forced
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let started = self.barrier.begin_forced(self.lineage());
            if self.acks.holding.load(std::sync::atomic::Ordering::SeqCst) {
                self.acks.held.lock().unwrap().push(started);
            } else {
                self.barrier.finish(started, Ok(()), self.lineage());
            }
        };
        self.barrier
            .wait(ticket, timeout, || self.lineage(), start)
            .await
    }
    async fn acquire(
        &self,
        name: &str,
        ttl: Duration,
    ) -> Result<Option<crate::cluster::Lease>, crate::cluster::CoordinationError> {
        let mut held = self.leases.held.lock().unwrap();
        let holder = held
            .entry(name.to_owned())
            .or_insert_with(|| self.node.clone());
        Ok((*holder == self.node).then(|| crate::cluster::Lease {
            name: name.to_owned(),
            token: 1,
            valid_until: std::time::Instant::now() + ttl,
        }))
    }
    async fn release(
        &self,
        lease: &crate::cluster::Lease,
    ) -> Result<(), crate::cluster::CoordinationError> {
        self.leases.held.lock().unwrap().remove(&lease.name);
        Ok(())
    }
    async fn heartbeat(
        &self,
        _freshness: Option<crate::cluster::FreshnessReport>,
    ) -> Result<(), crate::cluster::CoordinationError> {
        Ok(())
    }
    async fn nodes(
        &self,
    ) -> Result<Vec<crate::cluster::NodeStatus>, crate::cluster::CoordinationError> {
        Ok(Vec::new())
    }
    async fn leases(
        &self,
    ) -> Result<Vec<crate::cluster::LeaseStatus>, crate::cluster::CoordinationError> {
        Ok(Vec::new())
    }
    async fn wait_for_changes(&self, timeout: Duration) {
        tokio::time::sleep(timeout).await;
    }
    async fn publish_checkpoints(
        &self,
        _batch: &[crate::audit::PublishedCheckpoint],
    ) -> Result<(), crate::cluster::CoordinationError> {
        Ok(())
    }
    async fn latest_heads(
        &self,
    ) -> Result<crate::cluster::ClusterHeads, crate::cluster::CoordinationError> {
        Ok(crate::cluster::ClusterHeads::default())
    }
    async fn append_digest(
        &self,
        _digest: &crate::audit::Digest,
    ) -> Result<bool, crate::cluster::CoordinationError> {
        Ok(false)
    }
    async fn digests_since(
        &self,
        _after_n: u64,
        _limit: usize,
    ) -> Result<Vec<crate::audit::Digest>, crate::cluster::CoordinationError> {
        Ok(Vec::new())
    }
}

/// A root-key rotation runs on one node at a time: while one node holds
/// the root-rotation lease, the other's rotation is refused and the HSM
/// gets no second new root key; once released, the other may rotate.
#[tokio::test]
async fn a_root_key_rotation_runs_on_one_node_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn KeyStore> = Arc::new(SledStore::open(&dir.path().join("store")).unwrap());
    let hsm: Arc<dyn Hsm> =
        Arc::new(LocalSimHsm::open(&dir.path().join("hsm.state"), "test-pin-0000").unwrap());
    let leases = Arc::new(Leases::default());
    let on = |name: &str| {
        node(&store, &hsm, strict(60_000))
            .with_coordination(Arc::new(NodeLeases::new(name, &leases)))
    };
    let (a, b) = (on("a"), on("b"));
    a.create_key(&Caller::new("op"), CreateKeyInput::default())
        .await
        .unwrap();
    let before = hsm.info().await.unwrap();
    // A takes the lease (as its rotation would), then B tries.
    let held = NodeLeases::new("a", &leases);
    let lease = crate::cluster::Coordination::acquire(
        &held,
        crate::cluster::leases::ROOT_ROTATION,
        Duration::from_secs(60),
    )
    .await
    .unwrap()
    .unwrap();
    let err = b
        .rotate_root_key(&Caller::new("op"), |_| true)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::FailedPrecondition(m) if m.contains("another node is rotating")),
        "{err:?}"
    );
    assert_eq!(hsm.info().await.unwrap(), before, "no new root key");
    // A, the holder, rotates; then it lets go and B may.
    let done = a
        .rotate_root_key(&Caller::new("op"), |_| true)
        .await
        .unwrap();
    assert!(done.done);
    crate::cluster::Coordination::release(&held, &lease)
        .await
        .unwrap();
    let again = b
        .rotate_root_key(&Caller::new("op"), |_| true)
        .await
        .unwrap();
    assert!(again.done);
    assert_eq!(
        hsm.info().await.unwrap().root_key_ids,
        vec![again.new_root_key_id]
    );
}

/// Two nodes on one store: `a` alone, `b` under a [`NodeLeases`]
/// coordination whose barrier and lineage the test drives (its bound
/// `b_bound_ms`), and a key `a` made.
struct Watched {
    _dir: tempfile::TempDir,
    a: Kms,
    b: Kms,
    coordination: Arc<NodeLeases>,
    key: KeyRef,
    id: KeyId,
}

async fn watched(b_bound_ms: u64) -> Watched {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn KeyStore> = Arc::new(SledStore::open(&dir.path().join("store")).unwrap());
    let hsm: Arc<dyn Hsm> =
        Arc::new(LocalSimHsm::open(&dir.path().join("hsm.state"), "test-pin-0000").unwrap());
    let leases = Arc::new(Leases::default());
    let coordination = Arc::new(NodeLeases::new("b", &leases));
    let a = node(&store, &hsm, strict(60_000));
    let b = node(&store, &hsm, strict(b_bound_ms)).with_coordination(coordination.clone());
    let id = a
        .create_key(&Caller::new("op"), CreateKeyInput::default())
        .await
        .unwrap()
        .key
        .id;
    Watched {
        _dir: dir,
        a,
        b,
        coordination,
        key: KeyRef::Id(id),
        id,
    }
}

/// The durability barrier on the wrap path: a version another node wrote
/// (or this one) is not wrapped under until a commit of this node's begun
/// after the version was read is acknowledged; unwraps under it need no
/// barrier. While the database acknowledges nothing (its wait for the
/// standbys hangs), the wrap is refused UNAVAILABLE after the bound; once
/// it acknowledges, the same request succeeds, with no second barrier.
#[tokio::test]
async fn a_new_version_is_wrapped_under_only_once_a_barrier_covers_it() {
    let Watched {
        _dir,
        a,
        b,
        coordination,
        key,
        ..
    } = watched(300).await;
    let op = Caller::new("op");
    let mut seen = b.poll_changes(0).await.unwrap();
    let v1 = data_key(&b, &key).await.unwrap();
    assert_eq!(v1.key_version, 1);
    assert_eq!(
        b.unconfirmed.len(),
        0,
        "the wrap's barrier covered version 1"
    );

    // A rotates; B learns of it, and its database stops acknowledging.
    a.rotate_key(&op, &key).await.unwrap();
    seen = b.poll_changes(seen).await.unwrap();
    coordination
        .acks
        .holding
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let err = data_key(&b, &key).await.unwrap_err();
    match &err {
        Error::NotDurable {
            version: 2,
            reason: crate::cluster::BarrierError::TimedOut(_),
            ..
        } => {}
        other => panic!("expected NotDurable for version 2, got {other:?}"),
    }
    assert_eq!(
        crate::pipeline::Failure::from(err).code(),
        crate::pipeline::Code::Unavailable
    );
    // Unwraps go on, under the old version and the new one alike.
    seen = b.poll_changes(seen).await.unwrap();
    let opened = b
        .decrypt(
            &Caller::new("svc"),
            &v1.ciphertext_blob,
            &context(),
            WHY,
            None,
        )
        .await
        .unwrap();
    assert_eq!(opened.key_version, 1);
    a.poll_changes(0).await.unwrap();
    let under_v2 = a
        .generate_data_key(&Caller::new("svc"), &key, &context(), WHY, 32, false)
        .await
        .unwrap();
    assert_eq!(under_v2.key_version, 2);
    assert_eq!(
        b.decrypt(
            &Caller::new("svc"),
            &under_v2.ciphertext_blob,
            &context(),
            WHY,
            None
        )
        .await
        .unwrap()
        .key_version,
        2
    );

    // The hung commit is acknowledged: the wrap goes through.
    coordination.release_acks();
    seen = b.poll_changes(seen).await.unwrap();
    let v2 = data_key(&b, &key).await.unwrap();
    assert_eq!(v2.key_version, 2);

    // Its own writes too: a rotation on B waits for a barrier begun after
    // its commit returned.
    coordination
        .acks
        .holding
        .store(true, std::sync::atomic::Ordering::SeqCst);
    b.rotate_key(&op, &key).await.unwrap();
    b.poll_changes(seen).await.unwrap();
    assert!(matches!(
        data_key(&b, &key).await.unwrap_err(),
        Error::NotDurable { version: 3, .. }
    ));
    coordination.release_acks();
    b.poll_changes(seen).await.unwrap();
    assert_eq!(data_key(&b, &key).await.unwrap().key_version, 3);
}

/// After a promotion that lost commits (asynchronous replication), the
/// new primary issues the lost generations again for other changes: a
/// node whose watermark came from the lost history would skip them, and
/// keep serving a key disabled on the new primary. A rise of the
/// database's lineage, or a feed head behind the watermark, makes the
/// node drop every cache and follow the feed from the new head.
#[tokio::test]
async fn a_node_follows_the_new_history_after_a_promotion() {
    let Watched {
        _dir,
        a,
        b,
        coordination,
        key,
        ..
    } = watched(60_000).await;
    let op = Caller::new("op");
    let seen = b.poll_changes(0).await.unwrap();
    data_key(&b, &key).await.unwrap();

    // The disable takes generation `seen + 1`, which B had already
    // applied in the old history (a commit lost with the old primary).
    a.disable_key(&op, &key).await.unwrap();
    let lost_watermark = seen + 1;
    assert_eq!(
        b.poll_changes(lost_watermark).await.unwrap(),
        lost_watermark
    );
    data_key(&b, &key)
        .await
        .expect("the premise: from the lost history's watermark, the disable is skipped");

    // B's connections saw the promotion (the timeline rose).
    coordination
        .lineage
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        b.poll_changes(lost_watermark).await.unwrap(),
        seen + 1,
        "followed from the new history's head"
    );
    let err = data_key(&b, &key).await.unwrap_err();
    assert!(matches!(err, Error::KeyNotEnabled { .. }), "{err:?}");
    assert!(b.is_fresh());

    // A head behind the watermark (a restore that kept the timeline) is
    // a new history too.
    a.enable_key(&op, &key).await.unwrap();
    assert_eq!(b.poll_changes(seen + 10).await.unwrap(), seen + 2);
    data_key(&b, &key).await.unwrap();
    // And from there on the feed is followed as before.
    a.disable_key(&op, &key).await.unwrap();
    assert_eq!(b.poll_changes(seen + 2).await.unwrap(), seen + 3);
    let err = data_key(&b, &key).await.unwrap_err();
    assert!(matches!(err, Error::KeyNotEnabled { .. }), "{err:?}");
}

/// A version read shortly before a promotion, and not yet covered by a
/// barrier, may be one the promoted standby never received: after the
/// rise, the sweep drops the caches' copy (and keeps the entry until a
/// wrap replaces it), so that nothing read before the rise is wrapped
/// under; read again from the new history and covered there by a barrier
/// of its own, the version serves.
#[tokio::test]
async fn a_version_read_before_a_promotion_is_read_again_before_a_wrap() {
    let Watched {
        _dir,
        a,
        b,
        coordination,
        key,
        id,
    } = watched(300).await;
    let op = Caller::new("op");
    a.rotate_key(&op, &key).await.unwrap();
    let seen = b.poll_changes(0).await.unwrap();
    // B reads version 2 while its database acknowledges nothing.
    coordination
        .acks
        .holding
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(matches!(
        data_key(&b, &key).await.unwrap_err(),
        Error::NotDurable { version: 2, .. }
    ));
    assert_eq!(b.unconfirmed.len(), 1);
    assert!(b.materials.get(&(id, 2)).is_some(), "version 2 is cached");

    // The promotion: the held commit is acknowledged, but on the new
    // timeline, which does not cover what was read before it.
    coordination
        .lineage
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    coordination.release_acks();
    let seen = b.poll_changes(seen).await.unwrap();
    assert!(
        b.materials.get(&(id, 2)).is_none(),
        "what was read before the rise is dropped"
    );
    assert_eq!(
        b.unconfirmed.len(),
        1,
        "the lost entry stays for the next wrap"
    );
    // The next wrap reads version 2 again, from the new history, and
    // waits for a barrier of that history.
    let forced = coordination
        .forced
        .load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(data_key(&b, &key).await.unwrap().key_version, 2);
    assert_eq!(
        coordination
            .forced
            .load(std::sync::atomic::Ordering::SeqCst),
        forced + 1,
        "the wrap forced a barrier of its own"
    );
    b.poll_changes(seen).await.unwrap();
    assert_eq!(b.unconfirmed.len(), 0);
}
