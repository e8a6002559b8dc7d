//! M-of-N approvals: pending, distinct approvers, rejection, expiry, and
//! exactly-once execution under concurrent approvals.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::authz::StaticRoles;
use crate::hsm::sim::LocalSimHsm;
use crate::model::{KeyState, ManualClock, Timestamp};
use crate::store::SledStore;
use crate::store::approvals::{ApprovalStatus, ApprovalStore};

fn caller(name: &str) -> Caller {
    Caller::new(name)
}

fn open(dir: &std::path::Path, clock: Arc<ManualClock>, m: u32) -> Kms {
    let roles = StaticRoles::new([
        ("op1".to_string(), Role::Operator),
        ("op2".to_string(), Role::Operator),
        ("op3".to_string(), Role::Operator),
        ("op4".to_string(), Role::Operator),
        ("svc".to_string(), Role::Service),
    ]);
    Kms::new(
        Arc::new(SledStore::open(&dir.join("store")).unwrap()),
        Arc::new(LocalSimHsm::open(&dir.join("hsm.state"), "quorum-pin").unwrap()),
        Arc::new(roles),
        clock,
        KmsOptions {
            quorum: QuorumOptions::uniform(m),
            ..KmsOptions::default()
        },
    )
    .with_approval_store(ApprovalStore::open(&dir.join("approvals")).unwrap())
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
    let err = kms.approve(&caller("op1"), a.id).await.unwrap_err();
    assert!(
        matches!(&err, Error::FailedPrecondition(m) if m.contains("already approved")),
        "{err:?}"
    );
    assert!(matches!(
        kms.approve(&caller("svc"), a.id).await.unwrap_err(),
        Error::PermissionDenied(_)
    ));

    let done = kms.approve(&caller("op2"), a.id).await.unwrap();
    assert_eq!(done.status, ApprovalStatus::Executed, "{done:?}");
    assert_eq!(
        kms.get_key(&caller("op1"), &r).await.unwrap().key.state,
        KeyState::PendingDeletion
    );
    // Closed: no more approvals, and not listed as pending.
    assert!(kms.approve(&caller("op3"), a.id).await.is_err());
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
    kms.approve(&caller("op3"), c.id).await.unwrap();
    let e = pending(kms.enable_key(&caller("op1"), &r).await.unwrap_err());
    kms.approve(&caller("op4"), e.id).await.unwrap();
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
        kms.approve(&caller("op3"), a.id).await.is_err(),
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
    let err = kms.approve(&caller("op2"), b.id).await.unwrap_err();
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
        .approve(&caller("op2"), uuid::Uuid::new_v4())
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
    let tasks: Vec<_> = ["op2", "op3", "op4"]
        .into_iter()
        .map(|who| {
            let kms = Arc::clone(&kms);
            tokio::spawn(async move { kms.approve(&caller(who), a.id).await })
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
