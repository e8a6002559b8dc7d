//! Conversions between generated messages and domain values, every one of
//! them: `X_from_pb` validates a wire field into a domain value (a bad one is
//! `Error::InvalidArgument`, naming the field), `X_to_pb` writes a domain
//! value to the wire; `key_ref`, `optional_key_ref` and `page_token` parse
//! string fields. Raw fields are validated here, once; the core receives only
//! validated values.

use std::collections::BTreeMap;

use super::pb;
use crate::audit::{AuditRecord, Checkpoint, Outcome};
use crate::error::{Error, Result};
use crate::model::{
    AccessReason, ContextRule, DataKeyOperation, EncryptionContext, Grant, KeyId, KeyPolicy,
    KeyRecord, KeyRef, KeyState, ProtectionLevel, Timestamp, VersionRecord, VersionState,
};

pub fn key_ref(field: &str, raw: &str) -> Result<KeyRef> {
    KeyRef::parse(raw).map_err(|m| {
        if raw.is_empty() {
            invalid(format!("{field} is required"))
        } else {
            invalid(format!("{field}: {m}"))
        }
    })
}

pub fn optional_key_ref(field: &str, raw: &str) -> Result<Option<KeyRef>> {
    if raw.is_empty() {
        Ok(None)
    } else {
        key_ref(field, raw).map(Some)
    }
}

pub fn context_from_pb(raw: BTreeMap<String, String>) -> Result<EncryptionContext> {
    EncryptionContext::from_map(raw).map_err(|e| invalid(e.to_string()))
}

/// Every justification with its wire form: one table, read both ways.
const REASONS: [(AccessReason, pb::AccessReason); 7] = [
    (AccessReason::Unspecified, pb::AccessReason::Unspecified),
    (
        AccessReason::CustomerInitiatedAccess,
        pb::AccessReason::CustomerInitiatedAccess,
    ),
    (
        AccessReason::CustomerInitiatedSupport,
        pb::AccessReason::CustomerInitiatedSupport,
    ),
    (
        AccessReason::ProviderInitiatedService,
        pb::AccessReason::ProviderInitiatedService,
    ),
    (
        AccessReason::ProviderSystemOperation,
        pb::AccessReason::ProviderSystemOperation,
    ),
    (
        AccessReason::ProviderInitiatedReview,
        pb::AccessReason::ProviderInitiatedReview,
    ),
    (
        AccessReason::ThirdPartyDataRequest,
        pb::AccessReason::ThirdPartyDataRequest,
    ),
];

pub fn reason_to_pb(r: AccessReason) -> pb::AccessReason {
    REASONS
        .iter()
        .find(|(ours, _)| *ours == r)
        .map_or(pb::AccessReason::Unspecified, |(_, wire)| *wire)
}

pub fn operation_to_pb(o: DataKeyOperation) -> pb::DataKeyOperation {
    match o {
        DataKeyOperation::GenerateDataKey => pb::DataKeyOperation::GenerateDataKey,
        DataKeyOperation::GenerateDataKeyWithoutPlaintext => {
            pb::DataKeyOperation::GenerateDataKeyWithoutPlaintext
        }
        DataKeyOperation::Encrypt => pb::DataKeyOperation::Encrypt,
        DataKeyOperation::Decrypt => pb::DataKeyOperation::Decrypt,
        DataKeyOperation::ReEncrypt => pb::DataKeyOperation::ReEncrypt,
    }
}

pub fn policy_to_pb(p: &KeyPolicy) -> pb::KeyPolicy {
    pb::KeyPolicy {
        grants: p
            .grants
            .iter()
            .map(|g| pb::Grant {
                principal: g.principal.clone(),
                operations: g
                    .operations
                    .iter()
                    .map(|o| operation_to_pb(*o) as i32)
                    .collect(),
            })
            .collect(),
        required_context: p
            .required_context
            .iter()
            .map(|(k, r)| {
                (
                    k.clone(),
                    pb::ContextRule {
                        values: r.values.iter().cloned().collect(),
                        equals_caller_attribute: r
                            .equals_caller_attribute
                            .clone()
                            .unwrap_or_default(),
                    },
                )
            })
            .collect(),
        accepted_reasons: p
            .accepted_reasons
            .iter()
            .map(|r| reason_to_pb(*r) as i32)
            .collect(),
    }
}

/// A policy from the wire, validated.
pub fn policy_from_pb(raw: pb::KeyPolicy) -> Result<KeyPolicy> {
    let mut grants = Vec::with_capacity(raw.grants.len());
    for g in raw.grants {
        let mut operations = std::collections::BTreeSet::new();
        for o in g.operations {
            let op = match pb::DataKeyOperation::try_from(o) {
                Ok(pb::DataKeyOperation::GenerateDataKey) => DataKeyOperation::GenerateDataKey,
                Ok(pb::DataKeyOperation::GenerateDataKeyWithoutPlaintext) => {
                    DataKeyOperation::GenerateDataKeyWithoutPlaintext
                }
                Ok(pb::DataKeyOperation::Encrypt) => DataKeyOperation::Encrypt,
                Ok(pb::DataKeyOperation::Decrypt) => DataKeyOperation::Decrypt,
                Ok(pb::DataKeyOperation::ReEncrypt) => DataKeyOperation::ReEncrypt,
                _ => {
                    return Err(invalid(format!(
                        "unknown data-key operation {o} in the grant of {:?}",
                        g.principal
                    )));
                }
            };
            operations.insert(op);
        }
        grants.push(Grant {
            principal: g.principal,
            operations,
        });
    }
    let mut accepted_reasons = std::collections::BTreeSet::new();
    for r in raw.accepted_reasons {
        accepted_reasons.insert(reason_from_pb(r)?);
    }
    let required_context = raw
        .required_context
        .into_iter()
        .map(|(k, r)| {
            (
                k,
                ContextRule {
                    values: r.values.into_iter().collect(),
                    equals_caller_attribute: (!r.equals_caller_attribute.is_empty())
                        .then_some(r.equals_caller_attribute),
                },
            )
        })
        .collect();
    let policy = KeyPolicy {
        grants,
        required_context,
        accepted_reasons,
    };
    policy.validate().map_err(invalid)?;
    Ok(policy)
}

/// The justification as the audit record names it before validation: a
/// known reason, or the number of an unknown one.
pub fn reason_note_from_pb(raw: i32) -> std::result::Result<AccessReason, i32> {
    reason_from_pb(raw).map_err(|_| raw)
}

pub fn reason_from_pb(raw: i32) -> Result<AccessReason> {
    REASONS
        .iter()
        .find(|(_, wire)| *wire as i32 == raw)
        .map(|(ours, _)| *ours)
        .ok_or_else(|| invalid(format!("unknown justification {raw}")))
}

pub fn protection_level_from_pb(raw: i32) -> Result<Option<ProtectionLevel>> {
    match pb::ProtectionLevel::try_from(raw) {
        Ok(pb::ProtectionLevel::Unspecified) => Ok(None),
        Ok(pb::ProtectionLevel::Software) => Ok(Some(ProtectionLevel::Software)),
        Ok(pb::ProtectionLevel::Hsm) => Ok(Some(ProtectionLevel::Hsm)),
        Err(_) => Err(invalid(format!("unknown protection_level {raw}"))),
    }
}

pub fn page_token(raw: &str) -> Result<Option<KeyId>> {
    if raw.is_empty() {
        return Ok(None);
    }
    raw.parse::<KeyId>()
        .map(Some)
        .map_err(|_| invalid("invalid page_token"))
}

pub fn timestamp_to_pb(t: Timestamp) -> prost_types::Timestamp {
    let millis = t.as_millis();
    prost_types::Timestamp {
        seconds: millis.div_euclid(1000),
        // 0..=999_000_000: always fits.
        nanos: i32::try_from(millis.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

/// An optional protobuf duration: whole seconds, non-negative.
pub fn duration_from_pb(
    field: &str,
    raw: Option<prost_types::Duration>,
) -> Result<Option<std::time::Duration>> {
    let Some(d) = raw else { return Ok(None) };
    if d.seconds < 0 || d.nanos != 0 {
        return Err(invalid(format!(
            "{field} must be a whole, positive number of seconds"
        )));
    }
    Ok(Some(std::time::Duration::from_secs(
        d.seconds.unsigned_abs(),
    )))
}

pub fn state_filter_from_pb(raw: i32) -> Result<Option<KeyState>> {
    match pb::KeyState::try_from(raw) {
        Ok(pb::KeyState::Unspecified) => Ok(None),
        Ok(pb::KeyState::Enabled) => Ok(Some(KeyState::Enabled)),
        Ok(pb::KeyState::Disabled) => Ok(Some(KeyState::Disabled)),
        Ok(pb::KeyState::PendingDeletion) => Ok(Some(KeyState::PendingDeletion)),
        Ok(pb::KeyState::Destroyed) => Ok(Some(KeyState::Destroyed)),
        Err(_) => Err(invalid(format!("unknown state {raw}"))),
    }
}

fn state_to_pb(s: KeyState) -> pb::KeyState {
    match s {
        KeyState::Enabled => pb::KeyState::Enabled,
        KeyState::Disabled => pb::KeyState::Disabled,
        KeyState::PendingDeletion => pb::KeyState::PendingDeletion,
        KeyState::Destroyed => pb::KeyState::Destroyed,
    }
}

pub fn key_to_pb(k: &KeyRecord) -> pb::KeyMetadata {
    pb::KeyMetadata {
        key_id: k.id.to_string(),
        alias: k.alias.clone().unwrap_or_default(),
        description: k.description.clone(),
        state: state_to_pb(k.state).into(),
        protection_level: match k.protection_level {
            ProtectionLevel::Software => pb::ProtectionLevel::Software,
            ProtectionLevel::Hsm => pb::ProtectionLevel::Hsm,
        }
        .into(),
        create_time: Some(timestamp_to_pb(k.created_at)),
        created_by: k.created_by.clone(),
        primary_version: k.primary_version,
        min_decryption_version: k.min_decryption_version,
        labels: k.labels.clone(),
        rotation_period: k.rotation_period_secs.map(|s| prost_types::Duration {
            seconds: i64::try_from(s).unwrap_or(i64::MAX),
            nanos: 0,
        }),
        next_rotation_time: k.next_rotation_at.map(timestamp_to_pb),
        deletion_time: k.deletion_at.map(timestamp_to_pb),
        destroy_time: k.destroyed_at.map(timestamp_to_pb),
        policy: Some(policy_to_pb(&k.policy)),
    }
}

pub fn version_to_pb(key: &KeyRecord, v: &VersionRecord) -> pb::KeyVersion {
    pb::KeyVersion {
        version: v.version,
        create_time: Some(timestamp_to_pb(v.created_at)),
        hsm_root_key_id: v.hsm_root_key_id,
        state: match v.state(key) {
            VersionState::Enabled => pb::KeyVersionState::VersionEnabled,
            VersionState::Retired => pb::KeyVersionState::VersionRetired,
            VersionState::Destroyed => pb::KeyVersionState::VersionDestroyed,
        }
        .into(),
        destroy_time: v.destroyed_at.map(timestamp_to_pb),
    }
}

/// A malformed field: the message names it.
fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidArgument(message.into())
}

/// An approval as approvers see it: the whole operation (its digest, for
/// a policy change the proposed and the current policy) and the difference
/// it makes, rendered by the core (`service::canonical`).
pub fn approval_to_pb(a: &crate::store::approvals::Approval) -> pb::Approval {
    use crate::service::canonical;
    use crate::store::approvals::{ApprovalStatus as S, SensitiveOperation};
    let proposed_policy = match &a.operation {
        SensitiveOperation::UpdateKeyPolicy { policy, .. } => Some(policy_to_pb(policy)),
        _ => None,
    };
    let current_policy = match (&a.operation, &a.key_before) {
        (SensitiveOperation::UpdateKeyPolicy { .. }, Some(before)) => {
            Some(policy_to_pb(&before.policy))
        }
        _ => None,
    };
    pb::Approval {
        operation_sha256: canonical::operation_sha256(&a.operation),
        proposed_policy,
        current_policy,
        changes: canonical::approval_changes(a),
        approval_id: a.id.to_string(),
        operation: a.operation.describe(),
        key_id: a
            .operation
            .key_id()
            .map(|k| k.to_string())
            .unwrap_or_default(),
        proposer: a.proposer.clone(),
        approved_by: a.approved_by.clone(),
        approvals_required: a.approvals_required,
        status: match a.status {
            S::Pending => pb::ApprovalStatus::ApprovalPending,
            S::Executing => pb::ApprovalStatus::ApprovalExecuting,
            S::Executed => pb::ApprovalStatus::ApprovalExecuted,
            S::Rejected => pb::ApprovalStatus::ApprovalRejected,
            S::Expired => pb::ApprovalStatus::ApprovalExpired,
            S::Failed => pb::ApprovalStatus::ApprovalFailed,
        }
        .into(),
        create_time: Some(timestamp_to_pb(a.created_at)),
        expire_time: Some(timestamp_to_pb(a.expires_at)),
        rejected_by: a.rejected_by.clone().unwrap_or_default(),
        result: a.result.clone().unwrap_or_default(),
    }
}

pub fn progress_to_pb(p: &crate::service::RootRotationProgress) -> pb::RotateRootKeyProgress {
    pb::RotateRootKeyProgress {
        old_root_key_ids_count: u32::try_from(p.old_root_key_ids.len()).unwrap_or(u32::MAX),
        new_root_key_id: p.new_root_key_id,
        rewrapped: p.rewrapped,
        remaining: p.remaining,
        done: p.done,
        destroyed_root_key_ids: p.destroyed_root_key_ids.clone(),
        resumed: p.resumed,
        pending_approval_id: String::new(),
    }
}

fn outcome_to_pb(o: Outcome) -> pb::AuditOutcome {
    match o {
        Outcome::Allowed => pb::AuditOutcome::Allowed,
        Outcome::Refused => pb::AuditOutcome::Refused,
        Outcome::Failed => pb::AuditOutcome::Failed,
    }
}

pub fn outcome_from_pb(raw: i32) -> Result<Option<Outcome>> {
    match pb::AuditOutcome::try_from(raw) {
        Ok(pb::AuditOutcome::Unspecified) => Ok(None),
        Ok(pb::AuditOutcome::Allowed) => Ok(Some(Outcome::Allowed)),
        Ok(pb::AuditOutcome::Refused) => Ok(Some(Outcome::Refused)),
        Ok(pb::AuditOutcome::Failed) => Ok(Some(Outcome::Failed)),
        Err(_) => Err(invalid(format!("unknown outcome {raw}"))),
    }
}

/// An optional protobuf timestamp, to the millisecond.
pub fn time_from_pb(field: &str, t: Option<prost_types::Timestamp>) -> Result<Option<Timestamp>> {
    let Some(t) = t else { return Ok(None) };
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(invalid(format!("{field}: invalid timestamp")));
    }
    t.seconds
        .checked_mul(1000)
        .and_then(|ms| ms.checked_add(i64::from(t.nanos / 1_000_000)))
        .map(|ms| Some(Timestamp(ms)))
        .ok_or_else(|| invalid(format!("{field}: timestamp out of range")))
}

pub fn event_to_pb(r: AuditRecord) -> pb::AuditEvent {
    let json = serde_json::to_string(&r).unwrap_or_default();
    pb::AuditEvent {
        seq: r.seq,
        time: Some(timestamp_to_pb(r.time)),
        request_id: r.request_id,
        principal: r.principal,
        role: r.role.unwrap_or_default(),
        operation: r.operation,
        key_id: r.key_id.unwrap_or_default(),
        key_version: r.key_version,
        context_digest: r.context_digest.unwrap_or_default(),
        justification: r.justification.unwrap_or_default(),
        context: r.context.unwrap_or_default(),
        detail: r.detail.unwrap_or_default(),
        outcome: outcome_to_pb(r.outcome).into(),
        status_code: r.status_code,
        prev_hash: r.prev_hash,
        hash: r.hash,
        json,
    }
}

pub fn checkpoint_to_pb(c: Checkpoint) -> pb::AuditCheckpoint {
    // The checkpoint's log line, canonical (what `coffre audit verify
    // --checkpoint` reads back).
    let json = c.to_line().unwrap_or_default();
    pb::AuditCheckpoint {
        seq: c.seq,
        head_hash: c.head_hash,
        time: Some(timestamp_to_pb(c.time)),
        signature: c.signature,
        json,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails to compile when a reason is added without its row in
    /// [`REASONS`] being thought of.
    fn row_of(r: AccessReason) -> usize {
        match r {
            AccessReason::Unspecified => 0,
            AccessReason::CustomerInitiatedAccess => 1,
            AccessReason::CustomerInitiatedSupport => 2,
            AccessReason::ProviderInitiatedService => 3,
            AccessReason::ProviderSystemOperation => 4,
            AccessReason::ProviderInitiatedReview => 5,
            AccessReason::ThirdPartyDataRequest => 6,
        }
    }

    #[test]
    fn every_reason_crosses_the_wire_both_ways_under_its_name() {
        for (i, (ours, wire)) in REASONS.iter().enumerate() {
            assert_eq!(row_of(*ours), i);
            assert_eq!(reason_to_pb(*ours), *wire);
            assert_eq!(reason_from_pb(*wire as i32).ok(), Some(*ours));
            assert_eq!(ours.name(), wire.as_str_name());
        }
        assert!(reason_from_pb(7).is_err());
        assert_eq!(reason_note_from_pb(42), Err(42));
    }
}
