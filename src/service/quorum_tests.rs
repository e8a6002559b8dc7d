//! M-of-N approvals: pending, distinct approvers, rejection, expiry, and
//! exactly-once execution under concurrent approvals.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::authz::StaticRoles;
use crate::hsm::sim::LocalSimHsm;
use crate::model::{KeyState, ManualClock, Timestamp};
use crate::store::KeyStore;
use crate::store::SledStore;
use crate::store::approvals::{Approval, ApprovalStatus, SensitiveOperation};

fn caller(name: &str) -> Caller {
    Caller::new(name)
}

fn open(dir: &std::path::Path, clock: Arc<ManualClock>, m: u32) -> Kms {
    open_with(dir, clock, m, &["op1", "op2", "op3", "op4"])
}

/// A Kms in `dir` whose operators are `operators` (and `svc` a service).
fn open_with(dir: &std::path::Path, clock: Arc<ManualClock>, m: u32, operators: &[&str]) -> Kms {
    let store = SledStore::open(&dir.join("store")).unwrap();
    open_on(store, dir, clock, m, operators)
}

/// [`open_with`] on a store the test keeps a handle of.
fn open_on(
    store: SledStore,
    dir: &std::path::Path,
    clock: Arc<ManualClock>,
    m: u32,
    operators: &[&str],
) -> Kms {
    let roles = StaticRoles::new(
        operators
            .iter()
            .map(|o| (o.to_string(), Role::Operator))
            .chain([("svc".to_string(), Role::Service)]),
    );
    Kms::new(
        Arc::new(store),
        Arc::new(LocalSimHsm::open(&dir.join("hsm.state"), "quorum-pin").unwrap()),
        Arc::new(roles),
        clock,
        KmsOptions {
            quorum: QuorumOptions::uniform(m),
            ..KmsOptions::default()
        },
    )
}

/// The digest an approver sees in ListApprovals.
fn sha(a: &crate::store::approvals::Approval) -> String {
    super::canonical::operation_sha256(&a.operation)
}

fn pending(e: Error) -> crate::store::approvals::Approval {
    match e {
        Error::ApprovalPending(a) => *a,
        other => panic!("expected a pending approval, got {other:?}"),
    }
}

#[tokio::test]
async fn two_operators_are_needed_and_each_counts_once() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(Timestamp(1_800_000_000_000)));
    let kms = open(dir.path(), Arc::clone(&clock), 2);
    let key = kms
        .create_key(&caller("op1"), CreateKeyInput::default())
        .await
        .unwrap()
        .key
        .id;
    let r = KeyRef::Id(key);

    let a = pending(
        kms.schedule_key_deletion(&caller("op1"), &r, Some(7))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        a.approved_by,
        vec!["op1".to_string()],
        "the proposer counts as one"
    );
    assert_eq!(
        kms.get_key(&caller("op1"), &r).await.unwrap().key.state,
        KeyState::Enabled
    );

    // The proposer cannot approve again; a service cannot approve at all.
    let err = kms
        .approve(&caller("op1"), a.id, &sha(&a))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::FailedPrecondition(m) if m.contains("already approved")),
        "{err:?}"
    );
    assert!(matches!(
        kms.approve(&caller("svc"), a.id, &sha(&a))
            .await
            .unwrap_err(),
        Error::PermissionDenied(_)
    ));

    let done = kms.approve(&caller("op2"), a.id, &sha(&a)).await.unwrap();
    assert_eq!(done.status, ApprovalStatus::Executed, "{done:?}");
    assert_eq!(
        kms.get_key(&caller("op1"), &r).await.unwrap().key.state,
        KeyState::PendingDeletion
    );
    // Closed: no more approvals, and not listed as pending.
    assert!(kms.approve(&caller("op3"), a.id, &sha(&a)).await.is_err());
    assert!(
        kms.list_approvals(&caller("op1"), false)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        kms.list_approvals(&caller("op1"), true)
            .await
            .unwrap()
            .len(),
        1
    );

    // Survives a restart: approvals are durable.
    drop(kms);
    let kms = open(dir.path(), Arc::clone(&clock), 2);
    let again = kms.list_approvals(&caller("op2"), true).await.unwrap();
    assert_eq!(again[0].status, ApprovalStatus::Executed);

    // Cancel needs approvals too; then enabling the DISABLED key does, but
    // enabling an ENABLED key is a no-op that needs none.
    let c = pending(
        kms.cancel_key_deletion(&caller("op2"), &r)
            .await
            .unwrap_err(),
    );
    kms.approve(&caller("op3"), c.id, &sha(&c)).await.unwrap();
    let e = pending(kms.enable_key(&caller("op1"), &r).await.unwrap_err());
    kms.approve(&caller("op4"), e.id, &sha(&e)).await.unwrap();
    assert_eq!(
        kms.enable_key(&caller("op1"), &r).await.unwrap().state,
        KeyState::Enabled
    );
}

#[tokio::test]
async fn rejection_and_expiry_close_a_proposal() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(Timestamp(1_800_000_000_000)));
    let kms = open(dir.path(), Arc::clone(&clock), 2);
    let key = KeyRef::Id(
        kms.create_key(&caller("op1"), CreateKeyInput::default())
            .await
            .unwrap()
            .key
            .id,
    );

    let a = pending(
        kms.schedule_key_deletion(&caller("op1"), &key, None)
            .await
            .unwrap_err(),
    );
    let rejected = kms.reject(&caller("op2"), a.id).await.unwrap();
    assert_eq!(rejected.status, ApprovalStatus::Rejected);
    assert_eq!(rejected.rejected_by.as_deref(), Some("op2"));
    assert!(
        kms.approve(&caller("op3"), a.id, &sha(&a)).await.is_err(),
        "a rejected proposal never runs"
    );

    let b = pending(
        kms.update_key_policy(
            &caller("op1"),
            &key,
            crate::model::KeyPolicy::granting(["svc".into()]),
        )
        .await
        .unwrap_err(),
    );
    clock.advance(Duration::from_secs(24 * 3600 + 1));
    let err = kms
        .approve(&caller("op2"), b.id, &sha(&b))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::FailedPrecondition(m) if m.contains("expired")),
        "{err:?}"
    );
    let listed = kms.list_approvals(&caller("op1"), true).await.unwrap();
    assert!(
        listed
            .iter()
            .any(|x| x.id == b.id && x.status == ApprovalStatus::Expired)
    );
    let k = kms.get_key(&caller("op1"), &key).await.unwrap().key;
    assert_eq!(k.state, KeyState::Enabled);
    assert!(k.policy.grants.is_empty(), "nothing ran");
    let unknown = kms
        .approve(&caller("op2"), uuid::Uuid::new_v4(), "00")
        .await
        .unwrap_err();
    assert!(matches!(unknown, Error::NotFound(_)), "{unknown:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_approvals_run_the_operation_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(Timestamp(1_800_000_000_000)));
    let kms = Arc::new(open(dir.path(), clock, 2));
    kms.create_key(&caller("op1"), CreateKeyInput::default())
        .await
        .unwrap();
    let before = kms.hsm_info(&caller("op1")).await.unwrap();

    let a = pending(
        kms.rotate_root_key(&caller("op1"), |_| true)
            .await
            .unwrap_err(),
    );
    let digest = sha(&a);
    let tasks: Vec<_> = ["op2", "op3", "op4"]
        .into_iter()
        .map(|who| {
            let kms = Arc::clone(&kms);
            let digest = digest.clone();
            tokio::spawn(async move { kms.approve(&caller(who), a.id, &digest).await })
        })
        .collect();
    let mut executed = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(x) => {
                assert_eq!(x.status, ApprovalStatus::Executed, "{x:?}");
                executed += 1;
            }
            Err(e) => assert!(matches!(e, Error::FailedPrecondition(_)), "{e:?}"),
        }
    }
    assert_eq!(executed, 1, "exactly one approval completed the quorum");
    let after = kms.hsm_info(&caller("op1")).await.unwrap();
    assert_eq!(after.root_key_ids.len(), 1);
    assert_eq!(
        after.current_root_key_id,
        before.current_root_key_id + 1,
        "the root key was rotated once, not more"
    );
}

async fn new_key(kms: &Kms) -> KeyRef {
    KeyRef::Id(
        kms.create_key(&caller("op1"), CreateKeyInput::default())
            .await
            .unwrap()
            .key
            .id,
    )
}

async fn min_of(kms: &Kms, key: &KeyRef) -> u32 {
    kms.get_key(&caller("op1"), key)
        .await
        .unwrap()
        .key
        .min_decryption_version
}

fn policy_for(principal: &str) -> crate::model::KeyPolicy {
    crate::model::KeyPolicy::granting([principal.to_string()])
}

#[tokio::test]
async fn an_approval_needs_the_digest_of_the_operation_it_approves() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(Timestamp(1_800_000_000_000)));
    let store = SledStore::open(&dir.path().join("store")).unwrap();
    let kms = open_on(
        store.clone(),
        dir.path(),
        clock,
        2,
        &["op1", "op2", "op3", "op4"],
    );
    let key = new_key(&kms).await;
    let a = pending(
        kms.update_key_policy(&caller("op1"), &key, policy_for("svc-a"))
            .await
            .unwrap_err(),
    );

    let empty = kms.approve(&caller("op2"), a.id, "").await.unwrap_err();
    assert!(
        matches!(&empty, Error::InvalidArgument(m) if m.contains("operation_sha256 is required")),
        "{empty:?}"
    );
    let other = super::canonical::operation_sha256(&SensitiveOperation::RotateRootKey);
    let stale = kms.approve(&caller("op2"), a.id, &other).await.unwrap_err();
    assert!(
        matches!(&stale, Error::FailedPrecondition(m) if m.contains("changed since you saw it")),
        "{stale:?}"
    );

    // The record is changed behind the approvers' backs (same counts, the
    // grant swapped): the digest they saw no longer matches.
    let seen = sha(&a);
    let text = String::from_utf8(store.read_raw("approvals", a.id.as_bytes()).unwrap()).unwrap();
    store.write_raw(
        "approvals",
        a.id.as_bytes(),
        text.replace("svc-a", "svc-evil").as_bytes(),
    );
    let swapped = kms.approve(&caller("op2"), a.id, &seen).await.unwrap_err();
    assert!(
        matches!(&swapped, Error::FailedPrecondition(m) if m.contains("changed since you saw it")),
        "{swapped:?}"
    );
    // Nothing changed: no approval added, the key's policy as it was.
    let listed = kms.list_approvals(&caller("op1"), false).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].approved_by, vec!["op1".to_string()]);
    assert_eq!(listed[0].status, ApprovalStatus::Pending);
    let k = kms.get_key(&caller("op1"), &key).await.unwrap().key;
    assert!(k.policy.grants.is_empty(), "{:?}", k.policy);

    // The digest of what is there now (seen again) is accepted.
    let now = sha(&listed[0]);
    let done = kms.approve(&caller("op2"), a.id, &now).await.unwrap();
    assert_eq!(done.status, ApprovalStatus::Executed, "{done:?}");
    let k = kms.get_key(&caller("op1"), &key).await.unwrap().key;
    assert_eq!(k.policy.grants[0].principal, "svc-evil");
}

#[tokio::test]
async fn retiring_versions_is_under_the_quorum_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(Timestamp(1_800_000_000_000)));
    let kms = open(dir.path(), clock, 2);
    let key = new_key(&kms).await;
    kms.rotate_key(&caller("op1"), &key).await.unwrap();
    kms.rotate_key(&caller("op1"), &key).await.unwrap();

    // Raising: held.
    let up = pending(
        kms.retire_key_versions(&caller("op1"), &key, 3)
            .await
            .unwrap_err(),
    );
    assert_eq!(
        min_of(&kms, &key).await,
        1,
        "one operator alone retires nothing"
    );
    assert!(
        up.key_before
            .as_ref()
            .is_some_and(|b| b.min_decryption_version == 1),
        "{up:?}"
    );
    let lines = super::canonical::approval_changes(&up);
    assert!(lines[0].contains("1 → 3"), "{lines:?}");
    kms.approve(&caller("op2"), up.id, &sha(&up)).await.unwrap();
    assert_eq!(min_of(&kms, &key).await, 3);

    // Lowering (retired versions would decrypt again): held too.
    let down = pending(
        kms.retire_key_versions(&caller("op1"), &key, 1)
            .await
            .unwrap_err(),
    );
    assert_eq!(
        min_of(&kms, &key).await,
        3,
        "one operator alone revives nothing"
    );
    assert!(
        super::canonical::approval_changes(&down)[0].contains("decrypt again"),
        "{down:?}"
    );
    // A bad value is refused before any proposal, and so is a no-op.
    assert!(matches!(
        kms.retire_key_versions(&caller("op1"), &key, 4)
            .await
            .unwrap_err(),
        Error::InvalidArgument(_)
    ));
    assert_eq!(
        kms.retire_key_versions(&caller("op1"), &key, 3)
            .await
            .unwrap()
            .min_decryption_version,
        3
    );
    assert_eq!(
        kms.list_approvals(&caller("op1"), false)
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn an_older_retirement_proposal_cannot_undo_a_newer_one() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(Timestamp(1_800_000_000_000)));
    let kms = open(dir.path(), clock, 2);
    let key = new_key(&kms).await;
    kms.rotate_key(&caller("op1"), &key).await.unwrap();
    kms.rotate_key(&caller("op1"), &key).await.unwrap();
    let to3 = pending(
        kms.retire_key_versions(&caller("op1"), &key, 3)
            .await
            .unwrap_err(),
    );
    let to2 = pending(
        kms.retire_key_versions(&caller("op1"), &key, 2)
            .await
            .unwrap_err(),
    );
    kms.approve(&caller("op2"), to3.id, &sha(&to3))
        .await
        .unwrap();
    let late = kms
        .approve(&caller("op2"), to2.id, &sha(&to2))
        .await
        .unwrap();
    assert_eq!(late.status, ApprovalStatus::Failed, "{late:?}");
    assert!(late.result.unwrap().contains("changed"));
    let k = kms.get_key(&caller("op1"), &key).await.unwrap().key;
    assert_eq!(k.min_decryption_version, 3);
}

#[tokio::test]
async fn an_identical_pending_proposal_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(Timestamp(1_800_000_000_000)));
    let kms = open(dir.path(), Arc::clone(&clock), 2);
    let key = new_key(&kms).await;
    let first = pending(
        kms.schedule_key_deletion(&caller("op1"), &key, Some(7))
            .await
            .unwrap_err(),
    );
    // The same operation, by anyone: refused, naming the open one.
    let twin = kms
        .schedule_key_deletion(&caller("op2"), &key, Some(7))
        .await
        .unwrap_err();
    assert!(
        matches!(&twin, Error::FailedPrecondition(m) if m.contains(&first.id.to_string())),
        "{twin:?}"
    );
    assert_eq!(
        kms.list_approvals(&caller("op1"), true)
            .await
            .unwrap()
            .len(),
        1,
        "nothing created"
    );
    // A different parameter is a different operation.
    pending(
        kms.schedule_key_deletion(&caller("op1"), &key, Some(8))
            .await
            .unwrap_err(),
    );
    // Once the first is closed, the same operation may be proposed again.
    kms.reject(&caller("op2"), first.id).await.unwrap();
    pending(
        kms.schedule_key_deletion(&caller("op1"), &key, Some(7))
            .await
            .unwrap_err(),
    );
}

#[tokio::test]
async fn m_raised_in_the_configuration_applies_to_open_proposals() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(Timestamp(1_800_000_000_000)));
    let kms = open(dir.path(), Arc::clone(&clock), 2);
    let key = new_key(&kms).await;
    let a = pending(
        kms.schedule_key_deletion(&caller("op1"), &key, Some(7))
            .await
            .unwrap_err(),
    );
    drop(kms);
    let kms = open(dir.path(), Arc::clone(&clock), 3);
    let after = kms.approve(&caller("op2"), a.id, &sha(&a)).await.unwrap();
    assert_eq!(after.status, ApprovalStatus::Pending, "{after:?}");
    assert_eq!(after.approvals_required, 3);
    let k = kms.get_key(&caller("op1"), &key).await.unwrap().key;
    assert_eq!(k.state, KeyState::Enabled);
    let done = kms.approve(&caller("op3"), a.id, &sha(&a)).await.unwrap();
    assert_eq!(done.status, ApprovalStatus::Executed, "{done:?}");
}

#[tokio::test]
async fn approvals_of_former_operators_do_not_count() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(Timestamp(1_800_000_000_000)));
    let kms = open(dir.path(), Arc::clone(&clock), 2);
    let key = new_key(&kms).await;
    let a = pending(
        kms.schedule_key_deletion(&caller("op1"), &key, Some(7))
            .await
            .unwrap_err(),
    );
    // op1 (the proposer) loses the operator role.
    drop(kms);
    let kms = open_with(dir.path(), Arc::clone(&clock), 2, &["op2", "op3"]);
    let after = kms.approve(&caller("op2"), a.id, &sha(&a)).await.unwrap();
    assert_eq!(after.status, ApprovalStatus::Pending, "{after:?}");
    assert!(
        after.result.as_deref().is_some_and(|r| r.contains("op1")),
        "{after:?}"
    );
    let k = kms.get_key(&caller("op2"), &key).await.unwrap().key;
    assert_eq!(
        k.state,
        KeyState::Enabled,
        "one current operator is not two"
    );
    let done = kms.approve(&caller("op3"), a.id, &sha(&a)).await.unwrap();
    assert_eq!(done.status, ApprovalStatus::Executed, "{done:?}");
}

#[tokio::test]
async fn the_scheduler_announces_a_destruction_before_it_and_stops_if_it_cannot() {
    use crate::model::KeyId;
    struct Refuse;
    impl super::Announce for Refuse {
        async fn announce(&self, _: &'static str, _: KeyId) -> Result<()> {
            Err(Error::Internal("audit log down".into()))
        }
    }
    /// Sees the key still pending deletion when told.
    struct Watch<'a>(&'a Kms, std::sync::Mutex<Vec<(String, KeyState)>>);
    impl super::Announce for Watch<'_> {
        async fn announce(&self, action: &'static str, id: KeyId) -> Result<()> {
            let state = self.0.fresh_record(id).await?.state;
            self.1.lock().unwrap().push((action.to_string(), state));
            Ok(())
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(Timestamp(1_800_000_000_000)));
    let kms = open(dir.path(), Arc::clone(&clock), 1);
    let key = new_key(&kms).await;
    kms.schedule_key_deletion(&caller("op1"), &key, Some(7))
        .await
        .unwrap();
    clock.advance(Duration::from_secs(8 * 86_400));

    let refused = kms.run_scheduler_announcing(&Refuse).await;
    assert!(refused.destroyed.is_empty(), "{refused:?}");
    assert_eq!(refused.failed, 1);
    let k = kms.get_key(&caller("op1"), &key).await.unwrap().key;
    assert_eq!(
        k.state,
        KeyState::PendingDeletion,
        "not destroyed unannounced"
    );

    let watch = Watch(&kms, std::sync::Mutex::new(Vec::new()));
    let done = kms.run_scheduler_announcing(&watch).await;
    assert_eq!(done.destroyed.len(), 1, "{done:?}");
    assert_eq!(
        *watch.1.lock().unwrap(),
        vec![("DestroyKey".to_string(), KeyState::PendingDeletion)]
    );
    let k = kms.get_key(&caller("op1"), &key).await.unwrap().key;
    assert_eq!(k.state, KeyState::Destroyed);
}

/// Two cores on one store and one HSM, as two nodes of a cluster are
/// (operators op1 to op4, M = `m`).
fn two_nodes(dir: &std::path::Path, clock: Arc<ManualClock>, m: u32) -> [Arc<Kms>; 2] {
    let store: Arc<dyn KeyStore> = Arc::new(SledStore::open(&dir.join("store")).unwrap());
    let hsm: Arc<dyn crate::hsm::Hsm> =
        Arc::new(LocalSimHsm::open(&dir.join("hsm.state"), "quorum-pin").unwrap());
    let node = || {
        let roles = StaticRoles::new(
            ["op1", "op2", "op3", "op4"]
                .iter()
                .map(|o| (o.to_string(), Role::Operator)),
        );
        Arc::new(Kms::new(
            Arc::clone(&store),
            Arc::clone(&hsm),
            Arc::new(roles),
            Arc::clone(&clock) as Arc<dyn crate::model::Clock>,
            KmsOptions {
                quorum: QuorumOptions::uniform(m),
                ..KmsOptions::default()
            },
        ))
    };
    [node(), node()]
}

/// The approvals of `a` by `who`, each on the node of its index (mod 2),
/// all at once; how many executed it (the others are refused).
async fn approve_on_both(nodes: &[Arc<Kms>; 2], a: &Approval, who: &[&'static str]) -> usize {
    let digest = sha(a);
    let tasks: Vec<_> = who
        .iter()
        .enumerate()
        .map(|(i, who)| {
            let kms = Arc::clone(&nodes[i % 2]);
            let (digest, id, who) = (digest.clone(), a.id, *who);
            tokio::spawn(async move { kms.approve(&caller(who), id, &digest).await })
        })
        .collect();
    let mut executed = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(x) => {
                assert_eq!(x.status, ApprovalStatus::Executed, "{x:?}");
                executed += 1;
            }
            Err(e) => assert!(
                matches!(&e, Error::FailedPrecondition(m) if m.contains("no longer be approved")),
                "{e:?}"
            ),
        }
    }
    executed
}

/// Exactly once without any lock of the process: the M-th approvals of
/// one proposal arrive at once on two cores sharing the store, and the
/// root key is rotated once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn approvals_racing_on_two_nodes_rotate_the_root_key_once() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(Timestamp(1_800_000_000_000)));
    let nodes = two_nodes(dir.path(), clock, 2);
    nodes[0]
        .create_key(&caller("op1"), CreateKeyInput::default())
        .await
        .unwrap();
    let before = nodes[0].hsm_info(&caller("op1")).await.unwrap();
    let a = pending(
        nodes[1]
            .rotate_root_key(&caller("op1"), |_| true)
            .await
            .unwrap_err(),
    );
    let executed = approve_on_both(&nodes, &a, &["op2", "op3", "op4"]).await;
    assert_eq!(executed, 1, "exactly one approval completed the quorum");
    let after = nodes[1].hsm_info(&caller("op1")).await.unwrap();
    assert_eq!(after.root_key_ids, vec![before.current_root_key_id + 1]);
    let stored = nodes[0].store.get_approval(a.id).await.unwrap().unwrap();
    assert_eq!(stored.status, ApprovalStatus::Executed, "{stored:?}");
    assert_eq!(stored.approved_by.len(), 2, "{stored:?}");
}

/// An approved key operation and its approval's outcome are one write:
/// of approvals racing on two nodes, one applies the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn approvals_racing_on_two_nodes_apply_a_key_change_once() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(Timestamp(1_800_000_000_000)));
    let nodes = two_nodes(dir.path(), clock, 2);
    for round in 0..4 {
        let key = new_key(&nodes[0]).await;
        let policy = policy_for(&format!("svc-{round}"));
        let a = pending(
            nodes[round % 2]
                .update_key_policy(&caller("op1"), &key, policy.clone())
                .await
                .unwrap_err(),
        );
        let executed = approve_on_both(&nodes, &a, &["op2", "op3", "op4", "op2"]).await;
        assert_eq!(executed, 1, "round {round}");
        let stored = nodes[1].store.get_approval(a.id).await.unwrap().unwrap();
        assert_eq!(stored.status, ApprovalStatus::Executed, "{stored:?}");
        assert_eq!(stored.approved_by.len(), 2, "{stored:?}");
        for node in &nodes {
            let k = node.fresh_record(stored.operation.key_id().unwrap()).await;
            assert_eq!(k.unwrap().policy, policy);
        }
    }
}

/// Identical proposals made at once on two nodes: one is recorded, the
/// other is refused and names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identical_proposals_on_two_nodes_open_one_approval() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(Timestamp(1_800_000_000_000)));
    let nodes = two_nodes(dir.path(), clock, 2);
    let key = new_key(&nodes[0]).await;
    let proposals: Vec<_> = (0..4)
        .map(|i| {
            let (kms, key) = (Arc::clone(&nodes[i % 2]), key.clone());
            tokio::spawn(async move {
                kms.schedule_key_deletion(&caller("op1"), &key, Some(7))
                    .await
            })
        })
        .collect();
    let mut opened = Vec::new();
    for p in proposals {
        match p.await.unwrap() {
            Err(Error::ApprovalPending(a)) => opened.push(a.id),
            Err(Error::FailedPrecondition(m)) => {
                assert!(m.contains("identical proposal is already pending"), "{m}")
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(opened.len(), 1, "{opened:?}");
    let all = nodes[1].list_approvals(&caller("op1"), true).await.unwrap();
    assert_eq!(all.iter().map(|a| a.id).collect::<Vec<_>>(), opened);
}

/// An execution a crash interrupted is failed by the next start, never
/// run again; one this process runs is left alone.
#[tokio::test]
async fn an_interrupted_execution_fails_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(Timestamp(1_800_000_000_000)));
    let [kms, _] = two_nodes(dir.path(), clock, 2);
    let a = pending(
        kms.rotate_root_key(&caller("op1"), |_| true)
            .await
            .unwrap_err(),
    );
    let mut executing = a.clone();
    executing.approved_by.push("op2".into());
    executing.status = ApprovalStatus::Executing;
    executing.executor = Some(kms.incarnation.to_string());
    kms.store.swap_approval(&a, &executing).await.unwrap();
    assert_eq!(
        kms.fail_interrupted_approvals().await.unwrap(),
        0,
        "its own"
    );

    // The process is gone: a new one (another incarnation) starts.
    let restarted = open_on_store(&kms);
    assert_eq!(restarted.fail_interrupted_approvals().await.unwrap(), 1);
    let failed = restarted.store.get_approval(a.id).await.unwrap().unwrap();
    assert_eq!(failed.status, ApprovalStatus::Failed);
    assert!(failed.result.unwrap().contains("interrupted"));
    let err = restarted
        .approve(&caller("op3"), a.id, &sha(&a))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::FailedPrecondition(m) if m.contains("Failed")),
        "{err:?}"
    );
}

/// Another core on `kms`'s store and HSM (a restarted process).
fn open_on_store(kms: &Kms) -> Kms {
    Kms::new(
        Arc::clone(&kms.store),
        Arc::clone(&kms.hsm),
        Arc::new(StaticRoles::new(
            ["op1", "op2", "op3"]
                .iter()
                .map(|o| (o.to_string(), Role::Operator)),
        )),
        Arc::new(ManualClock::new(Timestamp(1_800_000_000_000))),
        KmsOptions {
            quorum: QuorumOptions::uniform(2),
            ..KmsOptions::default()
        },
    )
}
