//! The key lifecycle beyond enable/disable: deletion with a waiting period,
//! destruction, automatic rotation, retirement of old versions.
//!
//! ```text
//! ENABLED ⇄ DISABLED
//!    │  ScheduleKeyDeletion (7–30 days, default 30)
//!    ▼
//! PENDING_DELETION ──CancelKeyDeletion──▶ DISABLED
//!    │  waiting period over (the scheduler)
//!    ▼
//! DESTROYED   (material erased from store and caches; metadata kept)
//! ```
//!
//! Every transition is a compare-and-swap under the core's write guard, so a
//! transition that the scheduler and an operator race for happens once.
//! Time comes from the injected [`crate::model::Clock`].

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::Kms;
use super::quorum::Approved;
use crate::authz::{Caller, Operation};
use crate::error::{Error, Result};
use crate::model::{KeyId, KeyRecord, KeyRef, KeyState, ProtectionLevel, Timestamp};
use crate::store::StoreError;
use crate::store::approvals::SensitiveOperation;

pub const MIN_DELETION_DAYS: u32 = 7;
pub const MAX_DELETION_DAYS: u32 = 30;
pub const DEFAULT_DELETION_DAYS: u32 = 30;
pub const MIN_ROTATION_PERIOD: Duration = Duration::from_secs(86_400);
/// Ten years of 365 days.
pub const MAX_ROTATION_PERIOD: Duration = Duration::from_secs(10 * 365 * 86_400);
const DAY: Duration = Duration::from_secs(86_400);

/// What one scheduler pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SchedulerReport {
    pub rotated: Vec<KeyId>,
    pub destroyed: Vec<KeyId>,
    pub failed: usize,
}

/// Told of each scheduled action once decided, before it takes effect
/// (under the write guard); an error stops the action.
pub trait Announce: Send + Sync {
    /// `action` is `"DestroyKey"` or `"RotateKey"`.
    fn announce(
        &self,
        action: &'static str,
        key: KeyId,
    ) -> impl std::future::Future<Output = Result<()>> + Send;
}

/// Announces nothing (tests, and callers that audit nothing).
struct Silent;

impl Announce for Silent {
    async fn announce(&self, _: &'static str, _: KeyId) -> Result<()> {
        Ok(())
    }
}

fn refuse(record: &KeyRecord, what: &str) -> Error {
    Error::FailedPrecondition(format!(
        "key {} is {}: it cannot {what}",
        record.id, record.state
    ))
}

impl Kms {
    /// Applies `change` to the stored record of `key` under the write guard:
    /// `Ok(None)` from `change` means "already so, nothing to write".
    pub(super) async fn transition(
        &self,
        caller: &Caller,
        key: &KeyRef,
        what: &'static str,
        change: impl FnOnce(&KeyRecord, Timestamp) -> Result<Option<KeyRecord>>,
    ) -> Result<Arc<KeyRecord>> {
        self.transition_if(caller, key, what, None, change).await
    }

    /// [`Self::transition`] of an approved operation (`approved`), or of a
    /// direct one (`None`). An approved one runs only if the stored record
    /// still has the fingerprint its proposal recorded, and its effect and
    /// its approval's outcome are one write
    /// ([`crate::store::KeyStore::swap_approval_and_key`]): of two
    /// approvers completing one approval, on this node or another, one
    /// runs it and the other gets [`crate::store::StoreError::ApprovalConflict`].
    pub(super) async fn transition_if(
        &self,
        caller: &Caller,
        key: &KeyRef,
        what: &'static str,
        approved: Option<&Approved<'_>>,
        change: impl FnOnce(&KeyRecord, Timestamp) -> Result<Option<KeyRecord>>,
    ) -> Result<Arc<KeyRecord>> {
        let id = self.resolve(key).await?.id;
        let guard = self.begin_write().await;
        let current = self.fresh_record(id).await?;
        if let Some(approved) = approved {
            super::quorum::check_fingerprint(&current, approved.fingerprint())?;
        }
        let Some(next) = change(&current, self.clock.now())? else {
            if let Some(approved) = approved {
                let done = approved.executed(&current);
                self.store.swap_approval(approved.current, &done).await?;
            }
            return Ok(self.publish(&guard, current));
        };
        match approved {
            None => self.store.compare_and_swap_key(&current, &next).await?,
            Some(approved) => {
                let done = approved.executed(&next);
                self.store
                    .swap_approval_and_key((approved.current, &done), (&current, &next))
                    .await?;
            }
        }
        tracing::info!(key_id = %id, state = %next.state, principal = %caller.principal, change = what, "key changed");
        Ok(self.publish(&guard, next))
    }

    pub async fn schedule_key_deletion(
        &self,
        caller: &Caller,
        key: &KeyRef,
        pending_window_days: Option<u32>,
    ) -> Result<Arc<KeyRecord>> {
        self.authorize(caller, Operation::ScheduleKeyDeletion)?;
        let days = pending_window_days.unwrap_or(DEFAULT_DELETION_DAYS);
        if !(MIN_DELETION_DAYS..=MAX_DELETION_DAYS).contains(&days) {
            return Err(Error::InvalidArgument(format!(
                "pending_window_days must be {MIN_DELETION_DAYS} to {MAX_DELETION_DAYS}, got {days}"
            )));
        }
        let id = self.resolve(key).await?.id;
        self.gate(
            caller,
            SensitiveOperation::ScheduleKeyDeletion {
                key_id: id,
                pending_window_days: days,
            },
        )
        .await?;
        self.exec_schedule_key_deletion(caller, &KeyRef::Id(id), days, None)
            .await
    }

    pub(super) async fn exec_schedule_key_deletion(
        &self,
        caller: &Caller,
        key: &KeyRef,
        days: u32,
        approved: Option<&Approved<'_>>,
    ) -> Result<Arc<KeyRecord>> {
        self.transition_if(
            caller,
            key,
            "deletion scheduled",
            approved,
            |current, now| match current.state {
                KeyState::Enabled | KeyState::Disabled => {
                    let mut next = current.clone();
                    next.state = KeyState::PendingDeletion;
                    next.deletion_at = Some(now.plus(DAY * days));
                    Ok(Some(next))
                }
                _ => Err(refuse(current, "be scheduled for deletion")),
            },
        )
        .await
    }

    pub async fn cancel_key_deletion(
        &self,
        caller: &Caller,
        key: &KeyRef,
    ) -> Result<Arc<KeyRecord>> {
        self.authorize(caller, Operation::CancelKeyDeletion)?;
        let id = self.resolve(key).await?.id;
        self.gate(caller, SensitiveOperation::CancelKeyDeletion { key_id: id })
            .await?;
        self.exec_cancel_key_deletion(caller, &KeyRef::Id(id), None)
            .await
    }

    pub(super) async fn exec_cancel_key_deletion(
        &self,
        caller: &Caller,
        key: &KeyRef,
        approved: Option<&Approved<'_>>,
    ) -> Result<Arc<KeyRecord>> {
        let what = "deletion cancelled";
        self.transition_if(caller, key, what, approved, |current, now| {
            if current.state != KeyState::PendingDeletion {
                return Err(refuse(
                    current,
                    "have its deletion cancelled (it is not pending deletion)",
                ));
            }
            // The scheduler committed that it began destroying the key's
            // HSM objects: some may be gone, so it must not come back
            // half-alive. The intent is in the store, so every node sees
            // it, whatever its clock says.
            if let Some(at) = current.destroy_started_at {
                return Err(Error::FailedPrecondition(format!(
                    "the destruction of key {} began at {}: its key objects may already be \
                     destroyed, so the deletion can no longer be cancelled",
                    current.id,
                    at.to_rfc3339()
                )));
            }
            // Once due, the scheduler may begin at any moment: refused
            // too, so that a cancellation never races it.
            if current.protection_level == ProtectionLevel::Hsm
                && current.deletion_at.is_some_and(|t| t <= now)
            {
                return Err(Error::FailedPrecondition(format!(
                    "key {} is held by the HSM and its deletion time has passed: its key objects \
                     may already be destroyed, so the deletion can no longer be cancelled",
                    current.id
                )));
            }
            let mut next = current.clone();
            next.state = KeyState::Disabled;
            next.deletion_at = None;
            Ok(Some(next))
        })
        .await
    }

    /// Sets (or, with `None`, clears) the automatic rotation period; the next
    /// rotation is due one period from now.
    pub async fn set_rotation_policy(
        &self,
        caller: &Caller,
        key: &KeyRef,
        period: Option<Duration>,
    ) -> Result<Arc<KeyRecord>> {
        self.authorize(caller, Operation::SetRotationPolicy)?;
        if let Some(p) = period {
            check_rotation_period(p)?;
        }
        self.transition(caller, key, "rotation policy set", |current, now| {
            if !matches!(current.state, KeyState::Enabled | KeyState::Disabled) {
                return Err(refuse(current, "have a rotation policy"));
            }
            let mut next = current.clone();
            next.rotation_period_secs = period.map(|p| p.as_secs());
            next.next_rotation_at = period.map(|p| now.plus(p));
            Ok(Some(next))
        })
        .await
    }

    /// Replaces the key's policy (validated first).
    pub async fn update_key_policy(
        &self,
        caller: &Caller,
        key: &KeyRef,
        policy: crate::model::KeyPolicy,
    ) -> Result<Arc<KeyRecord>> {
        self.authorize(caller, Operation::UpdateKeyPolicy)?;
        policy.validate().map_err(Error::InvalidArgument)?;
        let id = self.resolve(key).await?.id;
        self.gate(
            caller,
            SensitiveOperation::UpdateKeyPolicy {
                key_id: id,
                policy: policy.clone(),
            },
        )
        .await?;
        self.exec_update_key_policy(caller, &KeyRef::Id(id), policy, None)
            .await
    }

    pub(super) async fn exec_update_key_policy(
        &self,
        caller: &Caller,
        key: &KeyRef,
        policy: crate::model::KeyPolicy,
        approved: Option<&Approved<'_>>,
    ) -> Result<Arc<KeyRecord>> {
        let what = "policy updated";
        self.transition_if(caller, key, what, approved, move |current, _| {
            if current.state == KeyState::Destroyed {
                return Err(refuse(current, "have its policy changed"));
            }
            if current.policy == policy {
                return Ok(None);
            }
            let mut next = current.clone();
            next.policy = policy;
            Ok(Some(next))
        })
        .await
    }

    /// Versions below `min` stop decrypting (and come back if `min` is
    /// lowered again, while the key is not destroyed). Sensitive both ways:
    /// under the quorum, raising `min` could make data unreadable at once
    /// and lowering it revives versions retired on purpose.
    pub async fn retire_key_versions(
        &self,
        caller: &Caller,
        key: &KeyRef,
        min: u32,
    ) -> Result<Arc<KeyRecord>> {
        self.authorize(caller, Operation::RetireKeyVersions)?;
        let id = self.resolve(key).await?.id;
        // A bad or no-op request is answered before any proposal.
        let current = self.fresh_record(id).await?;
        let Some(_) = retire(&current, min)? else {
            return Ok(Arc::new(current));
        };
        self.gate(
            caller,
            SensitiveOperation::RetireKeyVersions {
                key_id: id,
                min_decryption_version: min,
            },
        )
        .await?;
        self.exec_retire_key_versions(caller, &KeyRef::Id(id), min, None)
            .await
    }

    pub(super) async fn exec_retire_key_versions(
        &self,
        caller: &Caller,
        key: &KeyRef,
        min: u32,
        approved: Option<&Approved<'_>>,
    ) -> Result<Arc<KeyRecord>> {
        let what = "versions retired";
        self.transition_if(caller, key, what, approved, |current, _| {
            retire(current, min)
        })
        .await
    }

    /// One pass of the scheduler: destroys keys whose waiting period is
    /// over and rotates keys whose rotation is due, at `clock.now()`.
    ///
    /// Exactly once: each action is a compare-and-swap that also moves the
    /// key's due time, in one durable write; a pass that crashes before the
    /// write left the key due (it is done by the next pass, after restart),
    /// one that crashes after it left the key not due (it is not done twice).
    /// Rewrites the store's files ([`crate::store::KeyStore::compact`]):
    /// after a bulk load, so that the store starts without the garbage of
    /// its many writes. Reads and writes wait meanwhile.
    pub async fn compact_store(&self) -> Result<()> {
        self.store.compact().await.map_err(Error::from)
    }

    pub async fn run_scheduler_once(&self) -> SchedulerReport {
        self.run_scheduler_announcing(&Silent).await
    }

    /// [`Self::run_scheduler_once`], calling `announce(action, key)` under
    /// the write guard once an action is decided and before it takes effect
    /// (`"DestroyKey"`, `"RotateKey"`): the server records it in the audit
    /// log there. If `announce` fails, the action is not taken (the key
    /// stays due for the next pass).
    pub async fn run_scheduler_announcing(&self, announce: &impl Announce) -> SchedulerReport {
        let mut report = SchedulerReport::default();
        let now = self.clock.now();
        // Bounded batches; a key that keeps failing does not block the others.
        let mut attempts = 0usize;
        loop {
            let due = match self.store.due_keys(now, 64).await.map_err(Error::from) {
                Ok(due) => due,
                Err(e) => {
                    tracing::error!(error = %e, "scheduler: cannot read due keys");
                    report.failed += 1;
                    return report;
                }
            };
            let batch = due.len();
            let mut progressed = false;
            for key in due {
                attempts += 1;
                let (outcome, done_list) = match key.state {
                    KeyState::PendingDeletion => (
                        self.destroy_due(key.id, now, announce).await,
                        &mut report.destroyed,
                    ),
                    KeyState::Enabled => (
                        self.rotate_due(key.id, now, announce).await,
                        &mut report.rotated,
                    ),
                    _ => continue,
                };
                match outcome {
                    Ok(done) => {
                        if done {
                            done_list.push(key.id);
                        }
                        progressed |= done;
                    }
                    // The key changed between this pass's read and its
                    // write (a deletion cancelled, another node's scheduler
                    // first): the store kept the other change, nothing
                    // failed. A key still due is taken again next pass.
                    Err(Error::Store(StoreError::Conflict(_))) => {
                        tracing::info!(key_id = %key.id, "scheduler: the key changed meanwhile; left as it now is");
                    }
                    Err(e) => {
                        tracing::error!(key_id = %key.id, error = %e, "scheduler: action failed; retried next pass");
                        report.failed += 1;
                    }
                }
            }
            if batch < 64 || !progressed || attempts > 100_000 {
                break;
            }
        }
        // Erase destroyed material from the store's files too (sled keeps
        // overwritten data in its log until rewritten). Also on the first
        // pass after a start if any key is destroyed — a crash may have come
        // between a destruction and its compaction — and after a failed one.
        let first_pass = !self.started_compaction_check.swap(true, Ordering::SeqCst);
        let mut compact =
            !report.destroyed.is_empty() || self.compaction_due.swap(false, Ordering::SeqCst);
        if first_pass && !compact {
            let filter = crate::store::KeyFilter {
                state: Some(KeyState::Destroyed),
                alias_prefix: None,
            };
            compact = self
                .store
                .list_keys(&filter, None, 1)
                .await
                .map_or(true, |keys| !keys.is_empty());
        }
        if compact {
            if let Err(e) = self.store.compact().await.map_err(Error::from) {
                tracing::error!(error = %e, "compaction after destruction failed; retried on the next pass");
                self.compaction_due.store(true, Ordering::SeqCst);
                report.failed += 1;
            }
        }
        report
    }

    /// Destroys `id` if it is still pending deletion and due at `now`.
    async fn destroy_due(
        &self,
        id: KeyId,
        now: Timestamp,
        announce: &impl Announce,
    ) -> Result<bool> {
        let guard = self.begin_write().await;
        let current = self.fresh_record(id).await?;
        let due = current.state == KeyState::PendingDeletion
            && current.deletion_at.is_some_and(|t| t <= now);
        if !due {
            return Ok(false);
        }
        announce.announce("DestroyKey", id).await?;
        let mut current = current;
        if current.protection_level == ProtectionLevel::Hsm {
            // The intent first, durable: from then on no cancellation (on
            // any node) can bring the key back while its objects go, and
            // an interrupted destruction is resumed from here.
            if current.destroy_started_at.is_none() {
                let mut started = current.clone();
                started.destroy_started_at = Some(now);
                let (from, to) = (current, started.clone());
                self.store.compare_and_swap_key(&from, &to).await?;
                current = started.clone();
                self.publish(&guard, started);
            }
            // Then the key objects: if the HSM fails, the key stays
            // PENDING_DELETION (unusable) and the next pass tries again;
            // destroying an object twice is harmless. By the names the
            // versions record (each attempt's own).
            let versions = self.store.list_versions(id).await?;
            for name in versions.iter().filter_map(|v| v.hsm_object.as_deref()) {
                self.hsm.destroy_key_object(name).await?;
            }
        }
        let mut tombstone = current.clone();
        tombstone.state = KeyState::Destroyed;
        tombstone.deletion_at = None;
        tombstone.next_rotation_at = None;
        tombstone.destroy_started_at = None;
        tombstone.destroyed_at = Some(now);
        let stored = tombstone.clone();
        self.store.destroy_key(&current, &stored).await?;
        // The material leaves the caches too (zeroized once no request holds it).
        self.materials.remove_where(|(key, _)| *key == id);
        self.publish(&guard, tombstone);
        tracing::warn!(key_id = %id, "key destroyed: its material is erased");
        Ok(true)
    }

    /// Rotates `id` if it is still enabled and its rotation is due at `now`;
    /// the next rotation moves to the first period boundary after `now`.
    async fn rotate_due(
        &self,
        id: KeyId,
        now: Timestamp,
        announce: &impl Announce,
    ) -> Result<bool> {
        let guard = self.begin_write().await;
        let current = self.fresh_record(id).await?;
        let (Some(due_at), Some(period)) = (current.next_rotation_at, current.rotation_period_secs)
        else {
            return Ok(false);
        };
        if current.state != KeyState::Enabled || due_at > now {
            return Ok(false);
        }
        let period_ms = i64::try_from(period.saturating_mul(1000))
            .unwrap_or(i64::MAX)
            .max(1);
        // Missed periods (the server was down) give one rotation, not a burst.
        let behind = (now.0 - due_at.0) / period_ms + 1;
        let next_at = Timestamp(due_at.0.saturating_add(behind.saturating_mul(period_ms)));
        announce.announce("RotateKey", id).await?;
        let updated = self
            .add_primary_version(&guard, current, |next| {
                next.next_rotation_at = Some(next_at)
            })
            .await?;
        tracing::info!(key_id = %id, version = updated.primary_version, next_rotation = %next_at.to_rfc3339(), "key rotated automatically");
        Ok(true)
    }
}

/// `current` with `min_decryption_version` set to `min`; `None`: it
/// already is.
fn retire(current: &KeyRecord, min: u32) -> Result<Option<KeyRecord>> {
    if !matches!(current.state, KeyState::Enabled | KeyState::Disabled) {
        return Err(refuse(current, "have versions retired"));
    }
    if min == 0 || min > current.primary_version {
        return Err(Error::InvalidArgument(format!(
            "min_decryption_version must be 1 to the primary version {}, got {min}",
            current.primary_version
        )));
    }
    if current.min_decryption_version == min {
        return Ok(None);
    }
    let mut next = current.clone();
    next.min_decryption_version = min;
    Ok(Some(next))
}

pub fn check_rotation_period(p: Duration) -> Result<()> {
    if p < MIN_ROTATION_PERIOD || p > MAX_ROTATION_PERIOD {
        return Err(Error::InvalidArgument(format!(
            "rotation_period must be 1 day to 10 years, got {} s",
            p.as_secs()
        )));
    }
    Ok(())
}
