//! M-of-N approvals for sensitive operations.
//!
//! When the configuration requires M > 1 approvals for an operation
//! (ScheduleKeyDeletion, CancelKeyDeletion, EnableKey of a disabled key,
//! UpdateKeyPolicy, RetireKeyVersions, RotateRootKey), the request is
//! recorded as a pending approval — the proposer counts as the first
//! approval — and the call answers [`Error::ApprovalPending`] with it. A
//! proposal identical to a pending one (same `operation_sha256`) is refused.
//! Distinct operators approve or reject it; at M approvals it runs, exactly
//! once, whichever node each approver reaches: approvals live in the key
//! store, and every change of one is a compare-and-swap there (no process
//! lock). An operation on a key and its approval's outcome are one atomic
//! write (`PENDING → EXECUTED|FAILED`, with the key's change); a root-key
//! rotation, which runs for minutes, goes `PENDING → EXECUTING →
//! EXECUTED|FAILED` (a crash while `EXECUTING` leaves it `FAILED`, never
//! re-run). Proposals expire (default 24 h).
//!
//! What an approver approves is the whole operation: an approval presents
//! the `operation_sha256` of the operation it saw (`canonical.rs`), and is
//! refused if it is not the one recorded. At execution:
//!
//! - M is the larger of the M recorded at the proposal and the M configured
//!   now (raising M in the configuration affects open proposals);
//! - only approvers who still have the operator role count;
//! - the key's fingerprint (state, policy, minimum decryption version) is
//!   checked on the stored record, and the write is a compare-and-swap from
//!   that record, so no concurrent change slips in between the check and
//!   the operation.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::Kms;
use super::canonical::operation_sha256;
use crate::authz::{Caller, Operation};
use crate::error::{Error, Result};
use crate::model::KeyRef;
use crate::model::{KeyRecord, KeyState};
use crate::store::StoreError;
use crate::store::approvals::{
    Approval, ApprovalStatus, KeyBefore, SensitiveKind, SensitiveOperation,
};

/// How many approvals each sensitive operation needs (1: none beyond the
/// request itself), and how long a proposal stays open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuorumOptions {
    pub approvals_required: BTreeMap<SensitiveKind, u32>,
    pub expiry: Duration,
}

impl Default for QuorumOptions {
    fn default() -> Self {
        Self {
            approvals_required: BTreeMap::new(),
            expiry: Duration::from_secs(24 * 3600),
        }
    }
}

impl QuorumOptions {
    /// The same M for every sensitive operation.
    pub fn uniform(m: u32) -> Self {
        Self {
            approvals_required: SensitiveKind::ALL.into_iter().map(|k| (k, m)).collect(),
            ..Self::default()
        }
    }

    pub fn required(&self, kind: SensitiveKind) -> u32 {
        self.approvals_required
            .get(&kind)
            .copied()
            .unwrap_or(1)
            .max(1)
    }
}

/// How many times an approver decides again after losing a race for an
/// approval (another approver changed it first) before giving up.
const APPROVAL_ATTEMPTS: usize = 8;

/// An approved operation on a key as it runs: the approval as stored
/// (`current`) and with its approvals counted (`next`). The operation's
/// effect and `next` as EXECUTED are written together
/// ([`crate::store::KeyStore::swap_approval_and_key`]).
pub(super) struct Approved<'a> {
    pub(super) current: &'a Approval,
    pub(super) next: &'a Approval,
    /// The result the approval records, from the key after the operation.
    pub(super) summary: fn(&KeyRecord) -> String,
}

impl Approved<'_> {
    /// The fingerprint the key must still have (see `key_fingerprint`).
    pub(super) fn fingerprint(&self) -> Option<&str> {
        self.current.key_fingerprint.as_deref()
    }

    /// `next`, EXECUTED, with the result `key` gives.
    pub(super) fn executed(&self, key: &KeyRecord) -> Approval {
        let mut done = self.next.clone();
        done.status = ApprovalStatus::Executed;
        done.result = Some((self.summary)(key));
        done
    }
}

fn twin_refusal(twin: &Approval, digest: &str) -> Error {
    Error::FailedPrecondition(format!(
        "an identical proposal is already pending: approval {} (operation_sha256 {digest}); \
         approve or reject it instead of proposing again",
        twin.id
    ))
}

impl Kms {
    /// Records `op` as pending if it needs more than one approval; the
    /// caller then returns [`Error::ApprovalPending`]. `Ok(())`: run it now.
    /// A proposal identical to one still pending is refused, nothing
    /// created: the store refuses a pending twin atomically
    /// ([`crate::store::KeyStore::create_approval`]), whichever node made it.
    pub(super) async fn gate(&self, caller: &Caller, op: SensitiveOperation) -> Result<()> {
        let required = self.quorum.required(op.kind());
        if required <= 1 {
            return Ok(());
        }
        let now = self.clock.now();
        let digest = operation_sha256(&op);
        // The store compares operations as stored; this also catches one
        // that differs only where the canonical form does not (the order
        // of a policy's grants, say).
        let open = self.store.list_approvals().await?;
        if let Some(twin) = open.iter().find(|a| {
            a.status == ApprovalStatus::Pending
                && now <= a.expires_at
                && operation_sha256(&a.operation) == digest
        }) {
            return Err(twin_refusal(twin, &digest));
        }
        let (key_fingerprint, key_before) = match op.key_id() {
            Some(id) => {
                let record = self.fresh_record(id).await?;
                (Some(fingerprint(&record)), Some(before(&record)))
            }
            None => (None, None),
        };
        let approval = Approval {
            id: Uuid::new_v4(),
            operation: op,
            proposer: caller.principal.clone(),
            approved_by: vec![caller.principal.clone()],
            approvals_required: required,
            rejected_by: None,
            status: ApprovalStatus::Pending,
            created_at: now,
            expires_at: now.plus(self.quorum.expiry),
            result: None,
            key_fingerprint,
            key_before,
            executor: None,
        };
        if let Some(twin) = self.store.create_approval(&approval, now).await? {
            return Err(twin_refusal(&twin, &digest));
        }
        tracing::warn!(approval_id = %approval.id, operation = %approval.operation.describe(), operation_sha256 = %digest, proposer = %caller.principal, required, "sensitive operation awaits approval");
        Err(Error::ApprovalPending(Box::new(approval)))
    }

    async fn load_approval(&self, id: Uuid) -> Result<Approval> {
        self.store
            .get_approval(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("approval {id}")))
    }

    /// `approval` marked expired if it is an open proposal past its time.
    fn expired(&self, approval: &Approval) -> Option<Approval> {
        (approval.status == ApprovalStatus::Pending && self.clock.now() > approval.expires_at).then(
            || {
                let mut a = approval.clone();
                a.status = ApprovalStatus::Expired;
                a
            },
        )
    }

    /// The stored approval `id`, marked expired first if it is past its
    /// time (by compare-and-swap: an approver who closed it meanwhile
    /// wins, and its outcome is what is returned).
    async fn current_approval(&self, id: Uuid) -> Result<Approval> {
        for _ in 0..APPROVAL_ATTEMPTS {
            let a = self.load_approval(id).await?;
            let Some(expired) = self.expired(&a) else {
                return Ok(a);
            };
            match self.store.swap_approval(&a, &expired).await {
                Ok(()) => return Ok(expired),
                Err(StoreError::ApprovalConflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::ApprovalConflict(id).into())
    }

    pub async fn list_approvals(
        &self,
        caller: &Caller,
        include_closed: bool,
    ) -> Result<Vec<Approval>> {
        self.authorize(caller, Operation::ListApprovals)?;
        let mut out = Vec::new();
        for mut a in self.store.list_approvals().await? {
            if self.expired(&a).is_some() {
                a = self.current_approval(a.id).await?;
            }
            if include_closed || a.status == ApprovalStatus::Pending {
                out.push(a);
            }
        }
        Ok(out)
    }

    pub async fn reject(&self, caller: &Caller, id: Uuid) -> Result<Approval> {
        self.authorize(caller, Operation::RejectOperation)?;
        for _ in 0..APPROVAL_ATTEMPTS {
            let a = self.current_approval(id).await?;
            if a.status != ApprovalStatus::Pending {
                return Err(Error::FailedPrecondition(format!(
                    "approval {id} is {:?}: it can no longer be rejected",
                    a.status
                )));
            }
            let mut rejected = a.clone();
            rejected.status = ApprovalStatus::Rejected;
            rejected.rejected_by = Some(caller.principal.clone());
            match self.store.swap_approval(&a, &rejected).await {
                Ok(()) => {
                    tracing::warn!(approval_id = %id, principal = %caller.principal, "sensitive operation rejected");
                    return Ok(rejected);
                }
                Err(StoreError::ApprovalConflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::ApprovalConflict(id).into())
    }

    /// Adds the caller's approval of the operation whose digest is
    /// `operation_sha256` (what the approver saw); at the required count,
    /// runs the operation (exactly once) and records its outcome.
    ///
    /// No lock: every step is a compare-and-swap of the approval in the
    /// store. An approver who loses a race (another approval, a rejection,
    /// the operation run by another approver, on any node) reads the
    /// approval again and decides again.
    pub async fn approve(
        &self,
        caller: &Caller,
        id: Uuid,
        operation_sha256_seen: &str,
    ) -> Result<Approval> {
        self.authorize(caller, Operation::ApproveOperation)?;
        if operation_sha256_seen.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "operation_sha256 is required: the digest of the operation you approve, as \
                 ListApprovals or `coffre approval show {id}` gives it"
            )));
        }
        for _ in 0..APPROVAL_ATTEMPTS {
            let a = self.current_approval(id).await?;
            let next = self.counted(caller, &a, operation_sha256_seen)?;
            let outcome = if next.status == ApprovalStatus::Executing {
                self.run_approved(caller, &a, next).await
            } else {
                match self.store.swap_approval(&a, &next).await {
                    Ok(()) => {
                        tracing::info!(approval_id = %id, principal = %caller.principal, required = next.approvals_required, "approval added");
                        Ok(next)
                    }
                    Err(e) => Err(e.into()),
                }
            };
            match outcome {
                Err(Error::Store(StoreError::ApprovalConflict(_))) => continue,
                other => return other,
            }
        }
        Err(StoreError::ApprovalConflict(id).into())
    }

    /// `a` with the caller's approval added and counted: EXECUTING once
    /// the count is reached (not stored yet), or why it is refused.
    fn counted(&self, caller: &Caller, a: &Approval, seen: &str) -> Result<Approval> {
        let id = a.id;
        if a.status == ApprovalStatus::Expired {
            return Err(Error::FailedPrecondition(format!(
                "approval {id} expired at {}",
                a.expires_at.to_rfc3339()
            )));
        }
        if a.status != ApprovalStatus::Pending {
            return Err(Error::FailedPrecondition(format!(
                "approval {id} is {:?}: it can no longer be approved",
                a.status
            )));
        }
        if !operation_sha256(&a.operation).eq_ignore_ascii_case(seen.trim()) {
            tracing::warn!(approval_id = %id, principal = %caller.principal, "approval refused: the operation is not the one the approver saw");
            return Err(Error::FailedPrecondition(format!(
                "approval {id}: the operation changed since you saw it (its operation_sha256 is not \
                 the one you sent); nothing was approved — review it again with \
                 `coffre approval show {id}`"
            )));
        }
        if a.approved_by.contains(&caller.principal) {
            return Err(Error::FailedPrecondition(format!(
                "{} has already approved {id}: approvals must come from distinct operators",
                caller.principal
            )));
        }
        let mut next = a.clone();
        next.approved_by.push(caller.principal.clone());
        // M may have been raised in the configuration since the proposal.
        next.approvals_required = next
            .approvals_required
            .max(self.quorum.required(next.operation.kind()));
        // Only approvers who are operators now count.
        let lapsed: Vec<&String> = next
            .approved_by
            .iter()
            .filter(|p| {
                self.authz
                    .authorize(&Caller::new(p.as_str()), Operation::ApproveOperation)
                    .is_err()
            })
            .collect();
        let counted = next.approved_by.len().saturating_sub(lapsed.len());
        if u32::try_from(counted).unwrap_or(u32::MAX) >= next.approvals_required {
            next.status = ApprovalStatus::Executing;
            next.result = None;
        } else {
            next.result = (!lapsed.is_empty()).then(|| {
                format!(
                    "{counted} of {} approvals count: {} no longer have the operator role",
                    next.approvals_required,
                    lapsed
                        .iter()
                        .map(|p| p.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            });
        }
        Ok(next)
    }

    /// Runs the operation of `current`, whose approvals `next` reached the
    /// count, and returns the approval closed (EXECUTED, or FAILED with
    /// why). [`StoreError::ApprovalConflict`] (another approver changed
    /// `current` first: nothing ran) is returned as an error, for
    /// [`Kms::approve`] to decide again.
    async fn run_approved(
        &self,
        caller: &Caller,
        current: &Approval,
        next: Approval,
    ) -> Result<Approval> {
        let id = current.id;
        if next.operation == SensitiveOperation::RotateRootKey {
            return self.run_approved_root_rotation(caller, current, next).await;
        }
        // A key operation: its effect and the approval's outcome are one
        // write, so there is no EXECUTING state in the store.
        let approved = Approved {
            current,
            next: &next,
            summary: summary_of(&next.operation),
        };
        match self.execute_on_key(caller, &approved).await {
            Ok(record) => {
                let done = approved.executed(&record);
                tracing::warn!(approval_id = %id, status = ?done.status, approved_by = ?done.approved_by, "approved sensitive operation ran");
                Ok(done)
            }
            Err(Error::Store(StoreError::ApprovalConflict(c))) => {
                Err(StoreError::ApprovalConflict(c).into())
            }
            Err(e) => {
                let mut failed = next.clone();
                failed.status = ApprovalStatus::Failed;
                failed.result = Some(e.to_string());
                self.store.swap_approval(current, &failed).await?;
                tracing::warn!(approval_id = %id, error = %e, approved_by = ?failed.approved_by, "approved sensitive operation failed");
                Ok(failed)
            }
        }
    }

    /// RotateRootKey, approved: it runs for minutes and has HSM side
    /// effects, so it cannot share a write with its approval. The approval
    /// goes EXECUTING (naming this process) by compare-and-swap, which
    /// only one approver wins; then the rotation runs; then the outcome is
    /// recorded. A crash in between leaves it EXECUTING, and a later start
    /// marks it FAILED ("interrupted"), never running it again.
    async fn run_approved_root_rotation(
        &self,
        caller: &Caller,
        current: &Approval,
        mut next: Approval,
    ) -> Result<Approval> {
        next.status = ApprovalStatus::Executing;
        next.executor = Some(self.incarnation.to_string());
        self.store.swap_approval(current, &next).await?;
        let mut closed = next.clone();
        match self.exec_rotate_root_key(caller, |_| true).await {
            Ok(done) => {
                closed.status = ApprovalStatus::Executed;
                closed.result = Some(format!(
                    "root key {} is current; {} versions re-wrapped; destroyed {:?}",
                    done.new_root_key_id, done.rewrapped, done.destroyed_root_key_ids
                ));
            }
            Err(e) => {
                closed.status = ApprovalStatus::Failed;
                closed.result = Some(e.to_string());
            }
        }
        self.store.swap_approval(&next, &closed).await?;
        tracing::warn!(approval_id = %current.id, status = ?closed.status, approved_by = ?closed.approved_by, "approved sensitive operation ran");
        Ok(closed)
    }

    /// Runs an approved operation on a key (authorization and quorum
    /// already done), if the key is still as it was when proposed.
    async fn execute_on_key(
        &self,
        caller: &Caller,
        approved: &Approved<'_>,
    ) -> Result<Arc<KeyRecord>> {
        let some = Some(approved);
        match &approved.current.operation {
            SensitiveOperation::ScheduleKeyDeletion {
                key_id,
                pending_window_days,
            } => {
                self.exec_schedule_key_deletion(
                    caller,
                    &KeyRef::Id(*key_id),
                    *pending_window_days,
                    some,
                )
                .await
            }
            SensitiveOperation::CancelKeyDeletion { key_id } => {
                self.exec_cancel_key_deletion(caller, &KeyRef::Id(*key_id), some)
                    .await
            }
            SensitiveOperation::EnableKey { key_id } => {
                self.transition_if(
                    caller,
                    &KeyRef::Id(*key_id),
                    "enabled",
                    some,
                    |current, _| match current.state {
                        KeyState::Enabled => Ok(None),
                        KeyState::Disabled => {
                            let mut next = current.clone();
                            next.state = KeyState::Enabled;
                            Ok(Some(next))
                        }
                        state => Err(Error::FailedPrecondition(format!(
                            "key {} is {state}: it cannot become ENABLED",
                            current.id
                        ))),
                    },
                )
                .await
            }
            SensitiveOperation::UpdateKeyPolicy { key_id, policy } => {
                self.exec_update_key_policy(caller, &KeyRef::Id(*key_id), policy.clone(), some)
                    .await
            }
            SensitiveOperation::RetireKeyVersions {
                key_id,
                min_decryption_version,
            } => {
                self.exec_retire_key_versions(
                    caller,
                    &KeyRef::Id(*key_id),
                    *min_decryption_version,
                    some,
                )
                .await
            }
            SensitiveOperation::RotateRootKey => Err(Error::Internal(
                "RotateRootKey is not an operation on a key".into(),
            )),
        }
    }

    /// Approvals a crash left EXECUTING (a root-key rotation) become
    /// FAILED ("interrupted"): never run again, and the operator sees that
    /// the outcome must be checked. Called once at start. On a store shared
    /// by several nodes, only those of a process that is gone may be
    /// failed; that needs the cluster's node registry, so today it fails
    /// those of every other process, which is right for one node.
    pub async fn fail_interrupted_approvals(&self) -> Result<u64> {
        let mut failed = 0;
        for a in self.store.list_approvals().await? {
            let ours = a.executor.as_deref() == Some(self.incarnation.to_string().as_str());
            if a.status != ApprovalStatus::Executing || ours {
                continue;
            }
            let mut closed = a.clone();
            closed.status = ApprovalStatus::Failed;
            closed.result = Some(
                "interrupted by a restart while executing; check the outcome before proposing again"
                    .into(),
            );
            match self.store.swap_approval(&a, &closed).await {
                Ok(()) => failed += 1,
                Err(StoreError::ApprovalConflict(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(failed)
    }
}

/// What an executed approval records as its result, per operation, from
/// the key after it.
fn summary_of(op: &SensitiveOperation) -> fn(&KeyRecord) -> String {
    match op {
        SensitiveOperation::ScheduleKeyDeletion { .. } => |k| {
            format!(
                "key {} is PENDING_DELETION until {}",
                k.id,
                k.deletion_at.map(|t| t.to_rfc3339()).unwrap_or_default()
            )
        },
        SensitiveOperation::UpdateKeyPolicy { .. } => |k| {
            format!(
                "key {} has the policy policy_sha256={}",
                k.id,
                super::canonical::policy_sha256(&k.policy)
            )
        },
        SensitiveOperation::RetireKeyVersions { .. } => |k| {
            format!(
                "key {} has min_decryption_version {}",
                k.id, k.min_decryption_version
            )
        },
        SensitiveOperation::CancelKeyDeletion { .. }
        | SensitiveOperation::EnableKey { .. }
        | SensitiveOperation::RotateRootKey => |k| format!("key {} is {}", k.id, k.state),
    }
}

/// The key as a proposal about it records it.
fn before(record: &KeyRecord) -> KeyBefore {
    KeyBefore {
        state: record.state,
        policy: record.policy.clone(),
        min_decryption_version: record.min_decryption_version,
        primary_version: record.primary_version,
    }
}

/// A digest of what an approval about a key depends on: its state, policy
/// and minimum decryption version (`v2:`; approvals recorded before carry
/// the `v1` digest of state and policy only, still honoured).
fn fingerprint(record: &KeyRecord) -> String {
    let material =
        serde_json::to_vec(&(&record.state, &record.policy, record.min_decryption_version))
            .unwrap_or_default();
    format!(
        "v2:{}",
        hex::encode(ring::digest::digest(&ring::digest::SHA256, &material))
    )
}

fn fingerprint_v1(record: &KeyRecord) -> String {
    let material = serde_json::to_vec(&(&record.state, &record.policy)).unwrap_or_default();
    hex::encode(ring::digest::digest(&ring::digest::SHA256, &material))
}

/// Refuses to run an approved operation on a key that changed since the
/// proposal (called on the stored record, which the write then compares
/// against).
pub(super) fn check_fingerprint(record: &KeyRecord, expected: Option<&str>) -> Result<()> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let now = if expected.starts_with("v2:") {
        fingerprint(record)
    } else {
        fingerprint_v1(record)
    };
    if now != expected {
        return Err(Error::FailedPrecondition(format!(
            "key {} changed (state, policy or minimum decryption version) since the proposal; \
             propose again",
            record.id
        )));
    }
    Ok(())
}

pub fn parse_approval_id(raw: &str) -> Result<Uuid> {
    Uuid::try_parse(raw).map_err(|_| Error::InvalidArgument(format!("invalid approval id {raw:?}")))
}
