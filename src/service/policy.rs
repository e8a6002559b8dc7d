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
use crate::model::{AccessReason, DataKeyOperation, EncryptionContext, KeyPolicy, KeyRecord};

/// The one answer for "no such key" and "not yours": identical messages.
pub(super) fn no_access(key_named: &dyn std::fmt::Display) -> Error {
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
        Operation::Encrypt | Operation::XksEncrypt => DataKeyOperation::Encrypt,
        Operation::Decrypt | Operation::XksDecrypt => DataKeyOperation::Decrypt,
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

/// Why a policy refused a use (before it is turned into a message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// No grant for this principal and operation.
    NoGrant,
    /// The justification is not accepted.
    Reason,
    /// A context rule does not hold; the message says which.
    Context(String),
}

/// The policy decision, as a pure function of its inputs: steps 1 to 3 of
/// the module docs. `attribute` looks up the caller's configured attributes.
pub(super) fn evaluate(
    policy: &KeyPolicy,
    principal: &str,
    attribute: impl Fn(&str) -> Option<String>,
    op: DataKeyOperation,
    reason: AccessReason,
    context: &EncryptionContext,
) -> Result<(), Refusal> {
    let granted = policy
        .grants
        .iter()
        .any(|g| g.principal == principal && g.operations.contains(&op));
    if !granted {
        return Err(Refusal::NoGrant);
    }
    if !policy.accepted_reasons.contains(&reason) {
        return Err(Refusal::Reason);
    }
    for (name, rule) in &policy.required_context {
        let Some(value) = context.entries().get(name) else {
            return Err(Refusal::Context(format!(
                "requires the encryption context key {name:?}"
            )));
        };
        if !rule.values.is_empty() && !rule.values.contains(value) {
            return Err(Refusal::Context(format!(
                "does not allow this value of the encryption context key {name:?}"
            )));
        }
        if let Some(attr) = &rule.equals_caller_attribute {
            // The caller's own attribute and its own context value only:
            // nothing here is another principal's or the key's secret.
            match attribute(attr) {
                None => {
                    return Err(Refusal::Context(format!(
                        "requires the encryption context value of {name:?} to equal your \
                         attribute `{attr}`, and you have no attribute `{attr}` (the server's \
                         configuration gives attributes: [attributes] in coffre serve, \
                         --attribute in coffre dev)",
                        attr = attr.escape_debug()
                    )));
                }
                Some(mine) if mine != *value => {
                    return Err(Refusal::Context(format!(
                        "requires the encryption context value of {name:?} to equal your \
                         attribute `{attr}`: your attribute `{attr}` is `{mine}`, the context \
                         says `{value}`",
                        attr = attr.escape_debug(),
                        mine = mine.escape_debug(),
                        value = value.escape_debug()
                    )));
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

impl Kms {
    /// Steps 1 to 3 above for `record` (which the caller named as
    /// `key_named`), with the refusal logged and turned into an error.
    pub(super) fn check_policy(
        &self,
        caller: &Caller,
        record: &KeyRecord,
        key_named: &dyn std::fmt::Display,
        op: Operation,
        reason: AccessReason,
        context: &EncryptionContext,
    ) -> Result<()> {
        let Some(dop) = data_key_operation(op) else {
            return Err(no_access(key_named));
        };
        let outcome = evaluate(
            &record.policy,
            &caller.principal,
            |name| self.authz.attribute(caller, name),
            dop,
            reason,
            context,
        );
        match outcome {
            Ok(()) => Ok(()),
            Err(Refusal::NoGrant) => {
                tracing::warn!(principal = %caller.principal, key = %key_named, operation = op.name(), "refused: no grant (or no such key)");
                Err(no_access(key_named))
            }
            Err(Refusal::Reason) => {
                tracing::warn!(principal = %caller.principal, key_id = %record.id, operation = op.name(), justification = reason_name(reason), "refused justification");
                Err(Error::PermissionDenied(format!(
                    "the justification {} is not accepted by the policy of key {}",
                    reason_name(reason),
                    record.id
                )))
            }
            Err(Refusal::Context(why)) => {
                tracing::warn!(principal = %caller.principal, key_id = %record.id, operation = op.name(), reason = %why, "refused by a context rule");
                Err(Error::PermissionDenied(format!(
                    "the policy of key {} {why}",
                    record.id
                )))
            }
        }
    }
}

impl Kms {
    /// What in `policy` will not work as written, judged against the roles
    /// and attributes this server is configured with: a grant naming a
    /// principal no role knows (a typo leaves a key nobody can use), or one
    /// whose role may not use data keys, or a context rule bound to an
    /// attribute a grantee does not have. Advice for the operator who sets
    /// the policy (`CreateKey`, `UpdateKeyPolicy`): the policy is accepted
    /// all the same, since roles may be configured later. Empty when the
    /// policy has nothing to say. Only a caller who may set policies hears
    /// them (they tell which principals have a role).
    pub fn policy_warnings(&self, caller: &Caller, policy: &KeyPolicy) -> Result<Vec<String>> {
        self.authorize(caller, Operation::UpdateKeyPolicy)?;
        let mut warnings = Vec::new();
        for grant in &policy.grants {
            let grantee = Caller::new(grant.principal.clone());
            match self.authz.role_of(&grantee) {
                None => warnings.push(format!(
                    "the grant to {:?} names a principal no role on this server knows: \
                     nobody can use it (a typo? the configured principals are in [roles])",
                    grant.principal
                )),
                Some(role) if role != crate::authz::Role::Service => warnings.push(format!(
                    "the grant to {:?} has no effect: its role is {role}, and only the \
                     service role may use data keys",
                    grant.principal
                )),
                Some(_) => {
                    for (context_key, rule) in &policy.required_context {
                        let Some(attribute) = &rule.equals_caller_attribute else {
                            continue;
                        };
                        if self.authz.attribute(&grantee, attribute).is_none() {
                            warnings.push(format!(
                                "{:?} has no attribute {attribute:?} on this server: the rule \
                                 on context key {context_key:?} will refuse every request it makes",
                                grant.principal
                            ));
                        }
                    }
                }
            }
        }
        Ok(warnings)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::{ContextRule, Grant};

    fn ctx(pairs: &[(&str, &str)]) -> EncryptionContext {
        EncryptionContext::new(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string()))).unwrap()
    }

    fn policy() -> KeyPolicy {
        KeyPolicy {
            grants: vec![Grant {
                principal: "svc".into(),
                operations: [DataKeyOperation::Decrypt].into_iter().collect(),
            }],
            required_context: BTreeMap::from([
                (
                    "tenant".to_string(),
                    ContextRule {
                        values: Default::default(),
                        equals_caller_attribute: Some("tenant".into()),
                    },
                ),
                (
                    "class".to_string(),
                    ContextRule {
                        values: ["public".to_string(), "internal".to_string()]
                            .into_iter()
                            .collect(),
                        equals_caller_attribute: None,
                    },
                ),
            ]),
            ..KeyPolicy::default()
        }
    }

    fn attrs(name: &str) -> Option<String> {
        (name == "tenant").then(|| "acme".to_string())
    }

    const OK_REASON: AccessReason = AccessReason::CustomerInitiatedAccess;

    #[test]
    fn allowed_when_every_rule_holds() {
        let c = ctx(&[("tenant", "acme"), ("class", "internal"), ("extra", "x")]);
        assert_eq!(
            evaluate(
                &policy(),
                "svc",
                attrs,
                DataKeyOperation::Decrypt,
                OK_REASON,
                &c
            ),
            Ok(())
        );
    }

    #[test]
    fn grants_are_per_principal_and_operation() {
        let c = ctx(&[("tenant", "acme"), ("class", "public")]);
        let p = policy();
        assert_eq!(
            evaluate(&p, "other", attrs, DataKeyOperation::Decrypt, OK_REASON, &c),
            Err(Refusal::NoGrant)
        );
        assert_eq!(
            evaluate(&p, "svc", attrs, DataKeyOperation::Encrypt, OK_REASON, &c),
            Err(Refusal::NoGrant)
        );
        assert_eq!(
            evaluate(
                &KeyPolicy::default(),
                "svc",
                attrs,
                DataKeyOperation::Decrypt,
                OK_REASON,
                &c
            ),
            Err(Refusal::NoGrant),
            "deny by default"
        );
    }

    #[test]
    fn the_default_reasons_refuse_foreign_demands_and_silence() {
        let c = ctx(&[("tenant", "acme"), ("class", "public")]);
        for reason in [
            AccessReason::ThirdPartyDataRequest,
            AccessReason::Unspecified,
        ] {
            assert_eq!(
                evaluate(
                    &policy(),
                    "svc",
                    attrs,
                    DataKeyOperation::Decrypt,
                    reason,
                    &c
                ),
                Err(Refusal::Reason)
            );
        }
        for reason in [
            AccessReason::CustomerInitiatedAccess,
            AccessReason::CustomerInitiatedSupport,
            AccessReason::ProviderInitiatedService,
            AccessReason::ProviderSystemOperation,
            AccessReason::ProviderInitiatedReview,
        ] {
            assert_eq!(
                evaluate(
                    &policy(),
                    "svc",
                    attrs,
                    DataKeyOperation::Decrypt,
                    reason,
                    &c
                ),
                Ok(())
            );
        }
    }

    #[test]
    fn context_rules_and_identity_binding() {
        let p = policy();
        let refused = |c: &EncryptionContext| {
            matches!(
                evaluate(&p, "svc", attrs, DataKeyOperation::Decrypt, OK_REASON, c),
                Err(Refusal::Context(_))
            )
        };
        assert!(refused(&ctx(&[("class", "public")])), "tenant missing");
        assert!(
            refused(&ctx(&[("tenant", "globex"), ("class", "public")])),
            "another tenant"
        );
        assert!(
            refused(&ctx(&[("tenant", "acme"), ("class", "secret")])),
            "value not allowed"
        );
        assert!(refused(&ctx(&[("tenant", "acme")])), "class missing");
        // A caller without the attribute never matches.
        assert!(matches!(
            evaluate(
                &p,
                "svc",
                |_| None,
                DataKeyOperation::Decrypt,
                OK_REASON,
                &ctx(&[("tenant", ""), ("class", "public")])
            ),
            Err(Refusal::Context(_))
        ));
    }

    #[test]
    fn a_missing_attribute_reads_apart_from_a_different_one() {
        let p = policy();
        let c = ctx(&[("tenant", "globex"), ("class", "public")]);
        let Err(Refusal::Context(none)) = evaluate(
            &p,
            "svc",
            |_| None,
            DataKeyOperation::Decrypt,
            OK_REASON,
            &c,
        ) else {
            panic!("a caller without the attribute is refused");
        };
        assert!(none.contains("you have no attribute `tenant`"), "{none}");
        let Err(Refusal::Context(other)) =
            evaluate(&p, "svc", attrs, DataKeyOperation::Decrypt, OK_REASON, &c)
        else {
            panic!("another tenant is refused");
        };
        assert!(
            other.contains("your attribute `tenant` is `acme`, the context says `globex`"),
            "{other}"
        );
        assert!(!other.contains("you have no attribute"), "{other}");
    }
}
