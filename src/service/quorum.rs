//! M-of-N approvals for sensitive operations.
//!
//! When the configuration requires M > 1 approvals for an operation
//! (ScheduleKeyDeletion, CancelKeyDeletion, EnableKey of a disabled key,
//! UpdateKeyPolicy, RotateRootKey), the request is recorded as a pending
//! approval — the proposer counts as the first approval — and the call
//! answers [`Error::ApprovalPending`] with it. Distinct operators approve or
//! reject it; at M approvals it runs, exactly once: approvals are serialized
//! by one lock, and the record goes `PENDING → EXECUTING → EXECUTED|FAILED`
//! durably (a crash while `EXECUTING` leaves it `FAILED`, never re-run).
//! Proposals expire (default 24 h).

use std::collections::BTreeMap;
use std::time::Duration;

use uuid::Uuid;

use super::Kms;
use crate::authz::{Caller, Operation};
use crate::error::{Error, Result};
use crate::model::KeyRef;
use crate::store::approvals::{Approval, ApprovalStatus, SensitiveKind, SensitiveOperation};

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
    pub(super) async fn gate(&self, caller: &Caller, op: SensitiveOperation) -> Result<()> {
        let required = self.quorum.required(op.kind());
        if required <= 1 {
            return Ok(());
        }
        let store = self.approval_store()?;
        let now = self.clock.now();
        let key_fingerprint = match op.key_id() {
            Some(id) => Some(fingerprint(&self.fresh_record(id).await?)),
            None => None,
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
        };
        let stored = approval.clone();
        let store_dir = store;
        tokio::task::spawn_blocking(move || store_dir.put(&stored))
            .await
            .map_err(|e| Error::Internal(format!("approval task: {e}")))??;
        tracing::warn!(approval_id = %approval.id, operation = %approval.operation.describe(), proposer = %caller.principal, required, "sensitive operation awaits approval");
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

    /// Adds the caller's approval; at the required count, runs the
    /// operation (exactly once) and records its outcome.
    pub async fn approve(&self, caller: &Caller, id: Uuid) -> Result<Approval> {
        self.authorize(caller, Operation::ApproveOperation)?;
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
        if a.approved_by.contains(&caller.principal) {
            return Err(Error::FailedPrecondition(format!(
                "{} has already approved {id}: approvals must come from distinct operators",
                caller.principal
            )));
        }
        a.approved_by.push(caller.principal.clone());
        let reached =
            u32::try_from(a.approved_by.len()).unwrap_or(u32::MAX) >= a.approvals_required;
        if !reached {
            self.save_approval(&a).await?;
            tracing::info!(approval_id = %id, principal = %caller.principal, "approval added");
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
    /// if the key is still as it was when proposed.
    async fn execute(&self, caller: &Caller, approval: &Approval) -> Result<String> {
        let op = &approval.operation;
        if let (Some(id), Some(expected)) = (op.key_id(), &approval.key_fingerprint) {
            if fingerprint(&self.fresh_record(id).await?) != *expected {
                return Err(Error::FailedPrecondition(format!(
                    "key {id} changed (state or policy) since the proposal; propose again"
                )));
            }
        }
        match op {
            SensitiveOperation::ScheduleKeyDeletion {
                key_id,
                pending_window_days,
            } => {
                let k = self
                    .exec_schedule_key_deletion(caller, &KeyRef::Id(*key_id), *pending_window_days)
                    .await?;
                Ok(format!(
                    "key {} is PENDING_DELETION until {}",
                    k.id,
                    k.deletion_at.map(|t| t.to_rfc3339()).unwrap_or_default()
                ))
            }
            SensitiveOperation::CancelKeyDeletion { key_id } => {
                let k = self
                    .exec_cancel_key_deletion(caller, &KeyRef::Id(*key_id))
                    .await?;
                Ok(format!("key {} is {}", k.id, k.state))
            }
            SensitiveOperation::EnableKey { key_id } => {
                let k = self
                    .change_state(
                        caller,
                        &KeyRef::Id(*key_id),
                        crate::model::KeyState::Enabled,
                    )
                    .await?;
                Ok(format!("key {} is {}", k.id, k.state))
            }
            SensitiveOperation::UpdateKeyPolicy { key_id, policy } => {
                let k = self
                    .exec_update_key_policy(caller, &KeyRef::Id(*key_id), policy.clone())
                    .await?;
                Ok(format!(
                    "key {} has a new policy ({} grants)",
                    k.id,
                    k.policy.grants.len()
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

/// A digest of what an approval about a key depends on: its state and
/// policy.
fn fingerprint(record: &crate::model::KeyRecord) -> String {
    let material = serde_json::to_vec(&(&record.state, &record.policy)).unwrap_or_default();
    hex::encode(ring::digest::digest(&ring::digest::SHA256, &material))
}

pub fn parse_approval_id(raw: &str) -> Result<Uuid> {
    Uuid::try_parse(raw).map_err(|_| Error::InvalidArgument(format!("invalid approval id {raw:?}")))
}
