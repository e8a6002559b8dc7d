//! Checks of the approvals ([`KeyStore::create_approval`] and the
//! compare-and-swaps that follow it): what they store, what they refuse
//! (writing nothing), the atomic approve-and-apply, durability, and races
//! between two handles.

use uuid::Uuid;

use super::fixtures::{id, key, version};
use super::races::{THREADS, race, two_handles};
use super::{Check, StoreFactory, ensure, ok, open, same};
use crate::model::{KeyPolicy, KeyState, Timestamp};
use crate::store::approvals::{Approval, ApprovalStatus, SensitiveOperation};
use crate::store::{KeyStore, StoreError};

pub(super) const APPROVALS: Check = Check {
    name: "create_approval stores an approval and refuses a pending, unexpired twin (returning \
           it) or a taken id; swap_approval is a compare-and-swap; refusals write nothing; \
           approvals survive a reopen",
    run: |f| Box::pin(approvals(f)),
};
pub(super) const APPROVAL_AND_KEY: Check = Check {
    name: "swap_approval_and_key writes the approval and the key together or neither: a stale \
           approval, a stale key, or an approval about another key change nothing",
    run: |f| Box::pin(approval_and_key(f)),
};
pub(super) const APPROVAL_ONE_WINNER: Check = Check {
    name: "two handles: of concurrent approve-and-apply writes from one approval exactly one \
           wins, and of concurrent twin proposals exactly one is stored",
    run: |f| Box::pin(approval_one_winner(f)),
};

/// A pending approval of `op`, created at `at`, open for 1000 ms.
pub fn approval(op: SensitiveOperation, at: i64) -> Approval {
    Approval {
        id: Uuid::new_v4(),
        operation: op,
        proposer: "alice".to_owned(),
        approved_by: vec!["alice".to_owned()],
        approvals_required: 2,
        rejected_by: None,
        status: ApprovalStatus::Pending,
        created_at: Timestamp(at),
        expires_at: Timestamp(at + 1_000),
        result: None,
        key_fingerprint: None,
        key_before: None,
        executor: None,
    }
}

/// `a` with `who`'s approval added, in `status`.
fn approved_by(a: &Approval, who: &str, status: ApprovalStatus) -> Approval {
    let mut next = a.clone();
    next.approved_by.push(who.to_owned());
    next.status = status;
    next
}

async fn listed(store: &dyn KeyStore) -> Result<Vec<Approval>, String> {
    ok("list_approvals", store.list_approvals().await)
}

async fn approvals(f: &dyn StoreFactory) -> Result<(), String> {
    let (mut s, store) = open(f).await?;
    let enable = SensitiveOperation::EnableKey { key_id: id(1) };
    let a = approval(enable.clone(), 100);
    same(
        "create_approval of a new proposal",
        ok(
            "create_approval",
            store.create_approval(&a, Timestamp(100)).await,
        )?,
        None,
    )?;
    same(
        "get_approval",
        ok("get_approval", store.get_approval(a.id).await)?,
        Some(a.clone()),
    )?;
    same(
        "get_approval of an unknown id",
        ok("get_approval", store.get_approval(Uuid::new_v4()).await)?,
        None,
    )?;

    // A twin: same operation, pending, not expired.
    let twin = approval(enable.clone(), 200);
    same(
        "create_approval of a twin returns the pending one",
        ok(
            "create_approval",
            store.create_approval(&twin, Timestamp(1_100)).await,
        )?,
        Some(a.clone()),
    )?;
    same(
        "after a refused twin",
        listed(&*store).await?,
        vec![a.clone()],
    )?;
    let rotate = approval(SensitiveOperation::RotateRootKey, 5);
    same(
        "create_approval of another operation",
        ok(
            "create_approval",
            store.create_approval(&rotate, Timestamp(5)).await,
        )?,
        None,
    )?;
    same(
        "list_approvals, oldest first",
        listed(&*store).await?,
        vec![rotate.clone(), a.clone()],
    )?;
    let mut same_id = approval(SensitiveOperation::CancelKeyDeletion { key_id: id(9) }, 7);
    same_id.id = a.id;
    refused!(
        "create_approval of a taken id",
        store.create_approval(&same_id, Timestamp(7)).await,
        StoreError::ApprovalExists(i) if *i == a.id
    )?;

    // Past its expiry, or no longer pending, it is no twin.
    let later = approval(enable.clone(), 1_200);
    same(
        "create_approval once the pending one has expired",
        ok(
            "create_approval",
            store.create_approval(&later, Timestamp(1_101)).await,
        )?,
        None,
    )?;

    // Compare-and-swap.
    let second = approved_by(&a, "bob", ApprovalStatus::Pending);
    ok("swap_approval", store.swap_approval(&a, &second).await)?;
    same(
        "the swapped approval",
        ok("get_approval", store.get_approval(a.id).await)?,
        Some(second.clone()),
    )?;
    let stale = approved_by(&a, "carol", ApprovalStatus::Rejected);
    refused!(
        "swap_approval from a stale approval",
        store.swap_approval(&a, &stale).await,
        StoreError::ApprovalConflict(i) if *i == a.id
    )?;
    let unknown = approval(enable.clone(), 9);
    refused!(
        "swap_approval of an unknown approval",
        store.swap_approval(&unknown, &unknown).await,
        StoreError::NoSuchApproval(_)
    )?;
    let mut moved = second.clone();
    moved.operation = SensitiveOperation::CancelKeyDeletion { key_id: id(1) };
    refused!(
        "swap_approval changing the operation",
        store.swap_approval(&second, &moved).await,
        StoreError::Corrupt(_)
    )?;
    let mut other_proposer = second.clone();
    other_proposer.proposer = "mallory".to_owned();
    refused!(
        "swap_approval changing the proposer",
        store.swap_approval(&second, &other_proposer).await,
        StoreError::Corrupt(_)
    )?;
    same(
        "after refused swaps",
        ok("get_approval", store.get_approval(a.id).await)?,
        Some(second.clone()),
    )?;

    let before = listed(&*store).await?;
    drop(store);
    ok("reopen", s.reopen().await)?;
    let store = s.handle();
    same("approvals after a reopen", listed(&*store).await?, before)
}

async fn approval_and_key(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, store) = open(f).await?;
    let k = key(id(1), Some("approved"));
    ok("create_key", store.create_key(&k, &version(k.id, 1)).await)?;
    let mut disabled = k.clone();
    disabled.state = KeyState::Disabled;
    ok(
        "compare_and_swap_key",
        store.compare_and_swap_key(&k, &disabled).await,
    )?;
    let a = approval(SensitiveOperation::EnableKey { key_id: k.id }, 10);
    ok(
        "create_approval",
        store.create_approval(&a, Timestamp(10)).await,
    )?;
    let done = approved_by(&a, "bob", ApprovalStatus::Executed);
    let enabled = k.clone();

    // A stale key: nothing written.
    refused!(
        "swap_approval_and_key from a stale key",
        store
            .swap_approval_and_key((&a, &done), (&k, &enabled))
            .await,
        StoreError::Conflict(_)
    )?;
    same(
        "the approval after a stale key",
        ok("get_approval", store.get_approval(a.id).await)?,
        Some(a.clone()),
    )?;
    // A stale approval: nothing written.
    let stale = approved_by(&a, "carol", ApprovalStatus::Pending);
    refused!(
        "swap_approval_and_key from a stale approval",
        store
            .swap_approval_and_key((&stale, &done), (&disabled, &enabled))
            .await,
        StoreError::ApprovalConflict(_)
    )?;
    same(
        "the key after a stale approval",
        ok("get_key", store.get_key(k.id).await)?,
        Some(disabled.clone()),
    )?;
    // An approval about another key: refused before anything.
    let other = key(id(2), None);
    ok(
        "create_key",
        store.create_key(&other, &version(other.id, 1)).await,
    )?;
    let mut other_changed = other.clone();
    other_changed.policy = KeyPolicy::granting(["svc".to_owned()]);
    refused!(
        "swap_approval_and_key of an approval about another key",
        store
            .swap_approval_and_key((&a, &done), (&other, &other_changed))
            .await,
        StoreError::Corrupt(_)
    )?;
    same(
        "the other key",
        ok("get_key", store.get_key(other.id).await)?,
        Some(other.clone()),
    )?;
    // Both current: both written.
    ok(
        "swap_approval_and_key",
        store
            .swap_approval_and_key((&a, &done), (&disabled, &enabled))
            .await,
    )?;
    same(
        "the approval",
        ok("get_approval", store.get_approval(a.id).await)?,
        Some(done.clone()),
    )?;
    same(
        "the key",
        ok("get_key", store.get_key(k.id).await)?,
        Some(enabled),
    )
}

async fn approval_one_winner(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, handles) = two_handles(f).await?;
    let [a, _] = &handles;
    for round in 0..8u8 {
        let k = key(id(round), None);
        ok("create_key", a.create_key(&k, &version(k.id, 1)).await)?;
        let op = SensitiveOperation::UpdateKeyPolicy {
            key_id: k.id,
            policy: KeyPolicy::granting(["svc".to_owned()]),
        };
        let proposal = approval(op.clone(), 10);
        ok(
            "create_approval",
            a.create_approval(&proposal, Timestamp(10)).await,
        )?;
        let (k, proposal) = (&k, &proposal);
        // Each task completes the approval with a change of its own.
        let results = race(&handles, move |store, t| async move {
            let done = approved_by(proposal, &format!("approver-{t}"), ApprovalStatus::Executed);
            let mut changed = k.clone();
            changed.description = format!("changed by task {t}");
            let outcome = store
                .swap_approval_and_key((proposal, &done), (k, &changed))
                .await;
            (done, changed, outcome)
        })
        .await?;
        let winners: Vec<_> = results.iter().filter(|(_, _, r)| r.is_ok()).collect();
        let [(done, changed, _)] = winners.as_slice() else {
            return Err(format!(
                "round {round}: {} winners of {}",
                winners.len(),
                2 * THREADS
            ));
        };
        for (_, _, r) in &results {
            ensure(
                matches!(
                    r,
                    Ok(()) | Err(StoreError::ApprovalConflict(_) | StoreError::Conflict(_))
                ),
                || format!("round {round}: a loser got {r:?}"),
            )?;
        }
        for store in &handles {
            same(
                "the approval",
                ok("get_approval", store.get_approval(proposal.id).await)?.as_ref(),
                Some(done),
            )?;
            same(
                "the key",
                ok("get_key", store.get_key(k.id).await)?.as_ref(),
                Some(changed),
            )?;
        }

        // Twin proposals made at once: one is stored, the others get it.
        let twin_op = SensitiveOperation::ScheduleKeyDeletion {
            key_id: k.id,
            pending_window_days: 7,
        };
        let twin_op = &twin_op;
        let results = race(&handles, move |store, _| async move {
            let mine = approval(twin_op.clone(), 20);
            let outcome = store.create_approval(&mine, Timestamp(20)).await;
            (mine, outcome)
        })
        .await?;
        let stored: Vec<_> = results
            .iter()
            .filter(|(_, r)| matches!(r, Ok(None)))
            .map(|(mine, _)| mine)
            .collect();
        let [winner] = stored.as_slice() else {
            return Err(format!(
                "round {round}: {} twin proposals stored: {results:?}",
                stored.len()
            ));
        };
        for (_, r) in &results {
            ensure(
                matches!(r, Ok(None)) || matches!(r, Ok(Some(t)) if t == *winner),
                || format!("round {round}: a twin proposal got {r:?}"),
            )?;
        }
        let pending: Vec<Approval> = ok("list_approvals", a.list_approvals().await)?
            .into_iter()
            .filter(|p| p.operation == *twin_op)
            .collect();
        same(
            "the stored twin proposals",
            pending,
            vec![(*winner).clone()],
        )?;
    }
    Ok(())
}
