//! M-of-N approvals for sensitive operations.
//!
//! When the configuration requires M > 1 approvals for an operation
//! (ScheduleKeyDeletion, CancelKeyDeletion, EnableKey of a disabled key,
//! UpdateKeyPolicy, RetireKeyVersions, RotateRootKey), the request is
//! recorded as a pending approval — the proposer counts as the first
//! approval — and the call answers [`Error::ApprovalPending`] with it. A
//! proposal identical to a pending one (same `operation_sha256`) is refused.
//! Distinct operators approve or reject it; at M approvals it runs, exactly
//! once: approvals are serialized by one lock, and the record goes
//! `PENDING → EXECUTING → EXECUTED|FAILED` durably (a crash while
//! `EXECUTING` leaves it `FAILED`, never re-run). Proposals expire (default
//! 24 h).
//!
//! What an approver approves is the whole operation: an approval presents
//! the `operation_sha256` of the operation it saw (`canonical.rs`), and is
//! refused if it is not the one recorded. At execution:
//!
//! - M is the larger of the M recorded at the proposal and the M configured
//!   now (raising M in the configuration affects open proposals);
//! - only approvers who still have the operator role count;
//! - the key's fingerprint (state, policy, minimum decryption version) is
//!   checked inside the transition, under the write guard, so no concurrent
//!   change slips in between the check and the operation.

use std::collections::BTreeMap;
use std::time::Duration;

use uuid::Uuid;

use super::Kms;
use super::canonical::operation_sha256;
use crate::authz::{Caller, Operation};
use crate::error::{Error, Result};
use crate::model::KeyRef;
use crate::model::{KeyRecord, KeyState};
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

impl Kms {
    /// Records `op` as pending if it needs more than one approval; the
    /// caller then returns [`Error::ApprovalPending`]. `Ok(())`: run it now.
    /// A proposal identical to one still pending is refused, nothing
    /// created.
    pub(super) async fn gate(&self, caller: &Caller, op: SensitiveOperation) -> Result<()> {
        let required = self.quorum.required(op.kind());
        if required <= 1 {
            return Ok(());
        }
        let store = self.approval_store()?;
        let _one_proposal_at_a_time = self.proposal_lock.lock().await;
        let now = self.clock.now();
        let digest = operation_sha256(&op);
        let listing = std::sync::Arc::clone(&store);
        let open = tokio::task::spawn_blocking(move || listing.list())
            .await
            .map_err(|e| Error::Internal(format!("approval task: {e}")))??;
        if let Some(twin) = open.iter().find(|a| {
            a.status == ApprovalStatus::Pending
                && now <= a.expires_at
                && operation_sha256(&a.operation) == digest
        }) {
            return Err(Error::FailedPrecondition(format!(
                "an identical proposal is already pending: approval {} (operation_sha256 {digest}); \
                 approve or reject it instead of proposing again",
                twin.id
            )));
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
        };
        let stored = approval.clone();
        tokio::task::spawn_blocking(move || store.put(&stored))
            .await
            .map_err(|e| Error::Internal(format!("approval task: {e}")))??;
        tracing::warn!(approval_id = %approval.id, operation = %approval.operation.describe(), operation_sha256 = %digest, proposer = %caller.principal, required, "sensitive operation awaits approval");
        Err(Error::ApprovalPending(Box::new(approval)))
    }

    fn approval_store(&self) -> Result<std::sync::Arc<crate::store::approvals::ApprovalStore>> {
        self.approvals
            .clone()
            .ok_or_else(|| Error::Internal("quorum is configured but no approval store is".into()))
    }

    async fn load_approval(&self, id: Uuid) -> Result<Approval> {
        let Some(store) = self.approvals.clone() else {
            return Err(Error::NotFound(format!("approval {id}")));
        };
        tokio::task::spawn_blocking(move || store.get(id))
            .await
            .map_err(|e| Error::Internal(format!("approval task: {e}")))??
            .ok_or_else(|| Error::NotFound(format!("approval {id}")))
    }

    async fn save_approval(&self, approval: &Approval) -> Result<()> {
        let store = self.approval_store()?;
        let a = approval.clone();
        tokio::task::spawn_blocking(move || store.put(&a))
            .await
            .map_err(|e| Error::Internal(format!("approval task: {e}")))??;
        Ok(())
    }

    /// Marks an open proposal past its time as expired.
    fn expire_if_due(&self, approval: &mut Approval) -> bool {
        if approval.status == ApprovalStatus::Pending && self.clock.now() > approval.expires_at {
            approval.status = ApprovalStatus::Expired;
            return true;
        }
        false
    }

    pub async fn list_approvals(
        &self,
        caller: &Caller,
        include_closed: bool,
    ) -> Result<Vec<Approval>> {
        self.authorize(caller, Operation::ListApprovals)?;
        let Some(store) = self.approvals.clone() else {
            return Ok(Vec::new());
        };
        let all = tokio::task::spawn_blocking(move || store.list())
            .await
            .map_err(|e| Error::Internal(format!("approval task: {e}")))??;
        let mut out = Vec::new();
        for mut a in all {
            if self.expire_if_due(&mut a) {
                // Re-read under the lock: an approval may have closed it
                // meanwhile, and its outcome must not be overwritten.
                let _one_at_a_time = self.approval_lock.lock().await;
                let mut fresh = self.load_approval(a.id).await?;
                if self.expire_if_due(&mut fresh) {
                    self.save_approval(&fresh).await?;
                }
                a = fresh;
            }
            if include_closed || a.status == ApprovalStatus::Pending {
                out.push(a);
            }
        }
        Ok(out)
    }

    pub async fn reject(&self, caller: &Caller, id: Uuid) -> Result<Approval> {
        self.authorize(caller, Operation::RejectOperation)?;
        let _one_at_a_time = self.approval_lock.lock().await;
        let mut a = self.load_approval(id).await?;
        if self.expire_if_due(&mut a) {
            self.save_approval(&a).await?;
        }
        if a.status != ApprovalStatus::Pending {
            return Err(Error::FailedPrecondition(format!(
                "approval {id} is {:?}: it can no longer be rejected",
                a.status
            )));
        }
        a.status = ApprovalStatus::Rejected;
        a.rejected_by = Some(caller.principal.clone());
        self.save_approval(&a).await?;
        tracing::warn!(approval_id = %id, principal = %caller.principal, "sensitive operation rejected");
        Ok(a)
    }

    /// Adds the caller's approval of the operation whose digest is
    /// `operation_sha256` (what the approver saw); at the required count,
    /// runs the operation (exactly once) and records its outcome.
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
        let _one_at_a_time = self.approval_lock.lock().await;
        let mut a = self.load_approval(id).await?;
        if self.expire_if_due(&mut a) {
            self.save_approval(&a).await?;
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
        if !operation_sha256(&a.operation).eq_ignore_ascii_case(operation_sha256_seen.trim()) {
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
        a.approved_by.push(caller.principal.clone());
        // M may have been raised in the configuration since the proposal.
        a.approvals_required = a
            .approvals_required
            .max(self.quorum.required(a.operation.kind()));
        // Only approvers who are operators now count.
        let lapsed: Vec<&String> = a
            .approved_by
            .iter()
            .filter(|p| {
                self.authz
                    .authorize(&Caller::new(p.as_str()), Operation::ApproveOperation)
                    .is_err()
            })
            .collect();
        let counted = a.approved_by.len().saturating_sub(lapsed.len());
        let reached = u32::try_from(counted).unwrap_or(u32::MAX) >= a.approvals_required;
        if !reached {
            a.result = (!lapsed.is_empty()).then(|| {
                format!(
                    "{counted} of {} approvals count: {} no longer have the operator role",
                    a.approvals_required,
                    lapsed
                        .iter()
                        .map(|p| p.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            });
            self.save_approval(&a).await?;
            tracing::info!(approval_id = %id, principal = %caller.principal, counted, required = a.approvals_required, "approval added");
            return Ok(a);
        }
        a.status = ApprovalStatus::Executing;
        self.save_approval(&a).await?;
        let outcome = self.execute(caller, &a).await;
        match outcome {
            Ok(summary) => {
                a.status = ApprovalStatus::Executed;
                a.result = Some(summary);
            }
            Err(e) => {
                a.status = ApprovalStatus::Failed;
                a.result = Some(e.to_string());
            }
        }
        self.save_approval(&a).await?;
        tracing::warn!(approval_id = %id, status = ?a.status, approved_by = ?a.approved_by, "approved sensitive operation ran");
        Ok(a)
    }

    /// Runs an approved operation (authorization and quorum already done),
    /// if the key is still as it was when proposed: the fingerprint is
    /// checked inside the transition, under the write guard.
    async fn execute(&self, caller: &Caller, approval: &Approval) -> Result<String> {
        let expected = approval.key_fingerprint.as_deref();
        match &approval.operation {
            SensitiveOperation::ScheduleKeyDeletion {
                key_id,
                pending_window_days,
            } => {
                let k = self
                    .exec_schedule_key_deletion(
                        caller,
                        &KeyRef::Id(*key_id),
                        *pending_window_days,
                        expected,
                    )
                    .await?;
                Ok(format!(
                    "key {} is PENDING_DELETION until {}",
                    k.id,
                    k.deletion_at.map(|t| t.to_rfc3339()).unwrap_or_default()
                ))
            }
            SensitiveOperation::CancelKeyDeletion { key_id } => {
                let k = self
                    .exec_cancel_key_deletion(caller, &KeyRef::Id(*key_id), expected)
                    .await?;
                Ok(format!("key {} is {}", k.id, k.state))
            }
            SensitiveOperation::EnableKey { key_id } => {
                let k = self
                    .transition_if(
                        caller,
                        &KeyRef::Id(*key_id),
                        "enabled",
                        expected,
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
                    .await?;
                Ok(format!("key {} is {}", k.id, k.state))
            }
            SensitiveOperation::UpdateKeyPolicy { key_id, policy } => {
                let k = self
                    .exec_update_key_policy(caller, &KeyRef::Id(*key_id), policy.clone(), expected)
                    .await?;
                Ok(format!(
                    "key {} has the policy policy_sha256={}",
                    k.id,
                    super::canonical::policy_sha256(&k.policy)
                ))
            }
            SensitiveOperation::RetireKeyVersions {
                key_id,
                min_decryption_version,
            } => {
                let k = self
                    .exec_retire_key_versions(
                        caller,
                        &KeyRef::Id(*key_id),
                        *min_decryption_version,
                        expected,
                    )
                    .await?;
                Ok(format!(
                    "key {} has min_decryption_version {}",
                    k.id, k.min_decryption_version
                ))
            }
            SensitiveOperation::RotateRootKey => {
                let done = self.exec_rotate_root_key(caller, |_| true).await?;
                Ok(format!(
                    "root key {} is current; {} versions re-wrapped; destroyed {:?}",
                    done.new_root_key_id, done.rewrapped, done.destroyed_root_key_ids
                ))
            }
        }
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
/// proposal (called under the write guard, on the stored record).
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
