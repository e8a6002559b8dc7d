//! Per-key policy evaluation for data-key operations.
//!
//! Order matters, so that a caller learns nothing about a key it may not use:
//! 1. the key must exist **and** the caller must hold a grant for the
//!    operation — both failures give the same `PERMISSION_DENIED` answer
//!    (no existence oracle);
//! 2. the justification must be one the policy accepts;
//! 3. every context rule must hold (present, allowed value, equal to the
//!    caller's configured attribute);
//! 4. only then is the key's state checked (`FAILED_PRECONDITION`).

use super::Kms;
use crate::authz::{Caller, Operation};
use crate::error::{Error, Result};
use crate::model::{AccessReason, DataKeyOperation, EncryptionContext, KeyRecord};

/// The one answer for "no such key" and "not yours": identical messages.
pub(super) fn no_access(key_named: &str) -> Error {
    Error::PermissionDenied(format!(
        "key {key_named} does not exist or you are not allowed to use it"
    ))
}

pub(super) fn data_key_operation(op: Operation) -> Option<DataKeyOperation> {
    Some(match op {
        Operation::GenerateDataKey => DataKeyOperation::GenerateDataKey,
        Operation::GenerateDataKeyWithoutPlaintext => {
            DataKeyOperation::GenerateDataKeyWithoutPlaintext
        }
        Operation::Encrypt => DataKeyOperation::Encrypt,
        Operation::Decrypt => DataKeyOperation::Decrypt,
        Operation::ReEncrypt => DataKeyOperation::ReEncrypt,
        _ => return None,
    })
}

fn reason_name(r: AccessReason) -> &'static str {
    match r {
        AccessReason::Unspecified => "ACCESS_REASON_UNSPECIFIED",
        AccessReason::CustomerInitiatedAccess => "CUSTOMER_INITIATED_ACCESS",
        AccessReason::CustomerInitiatedSupport => "CUSTOMER_INITIATED_SUPPORT",
        AccessReason::ProviderInitiatedService => "PROVIDER_INITIATED_SERVICE",
        AccessReason::ProviderSystemOperation => "PROVIDER_SYSTEM_OPERATION",
        AccessReason::ProviderInitiatedReview => "PROVIDER_INITIATED_REVIEW",
        AccessReason::ThirdPartyDataRequest => "THIRD_PARTY_DATA_REQUEST",
    }
}

impl Kms {
    /// Steps 1 to 3 above for `record` (which the caller named as
    /// `key_named`).
    pub(super) fn check_policy(
        &self,
        caller: &Caller,
        record: &KeyRecord,
        key_named: &str,
        op: Operation,
        reason: AccessReason,
        context: &EncryptionContext,
    ) -> Result<()> {
        let policy = &record.policy;
        let granted = data_key_operation(op).is_some_and(|dop| {
            policy
                .grants
                .iter()
                .any(|g| g.principal == caller.principal && g.operations.contains(&dop))
        });
        if !granted {
            tracing::warn!(principal = %caller.principal, key = key_named, operation = op.name(), "refused: no grant (or no such key)");
            return Err(no_access(key_named));
        }
        if !policy.accepted_reasons.contains(&reason) {
            tracing::warn!(principal = %caller.principal, key_id = %record.id, operation = op.name(), justification = reason_name(reason), "refused justification");
            return Err(Error::PermissionDenied(format!(
                "the justification {} is not accepted by the policy of key {}",
                reason_name(reason),
                record.id
            )));
        }
        for (name, rule) in &policy.required_context {
            let Some(value) = context.entries().get(name) else {
                return Err(self.context_refusal(
                    caller,
                    record,
                    op,
                    format!(
                        "the policy of key {} requires the encryption context key {name:?}",
                        record.id
                    ),
                ));
            };
            if !rule.values.is_empty() && !rule.values.contains(value) {
                return Err(self.context_refusal(caller, record, op, format!(
                    "the encryption context value of {name:?} is not allowed by the policy of key {}",
                    record.id
                )));
            }
            if let Some(attribute) = &rule.equals_caller_attribute {
                let own = self.authz.attribute(caller, attribute);
                if own.as_deref() != Some(value.as_str()) {
                    return Err(self.context_refusal(caller, record, op, format!(
                        "the encryption context value of {name:?} must equal your {attribute:?} attribute (policy of key {})",
                        record.id
                    )));
                }
            }
        }
        Ok(())
    }

    fn context_refusal(
        &self,
        caller: &Caller,
        record: &KeyRecord,
        op: Operation,
        msg: String,
    ) -> Error {
        tracing::warn!(principal = %caller.principal, key_id = %record.id, operation = op.name(), reason = %msg, "refused by context rule");
        Error::PermissionDenied(msg)
    }
}
