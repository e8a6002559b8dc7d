//! The canonical encodings of a key policy and of a sensitive operation,
//! their SHA-256 digests, and the server-rendered difference an approver
//! reads. One place: the audit records, `ListApprovals` and
//! `ApproveOperation` all use these functions.
//!
//! # Canonical policy, version 1
//!
//! Compact JSON (no whitespace), members in this order, every list sorted
//! by the UTF-8 bytes of its rendered items, strings escaped as JSON does:
//!
//! ```text
//! {"v":1,
//!  "grants":[{"principal":P,"operations":[OP,...]},...],      sorted by principal
//!  "required_context":[{"key":K,"values":[V,...],"equals_caller_attribute":A|null},...],
//!                                                             sorted by key
//!  "accepted_reasons":[R,...]}
//! ```
//!
//! `OP` are API names (`DECRYPT`, `ENCRYPT`, `GENERATE_DATA_KEY`,
//! `GENERATE_DATA_KEY_WITHOUT_PLAINTEXT`, `RE_ENCRYPT`), `R` the
//! `AccessReason` names. `policy_sha256` is the hex SHA-256 of these bytes:
//! an auditor recomputes it from the `policy=` text of an audit record.
//!
//! # Canonical operation, version 1
//!
//! `{"v":1,"kind":KIND,"key_id":UUID,...parameters}` in the order below;
//! `operation_sha256` is the hex SHA-256 of those bytes.
//!
//! ```text
//! ScheduleKeyDeletion  "key_id", "pending_window_days": N
//! CancelKeyDeletion    "key_id"
//! EnableKey            "key_id"
//! UpdateKeyPolicy      "key_id", "policy": <canonical policy>
//! RetireKeyVersions    "key_id", "min_decryption_version": N
//! RotateRootKey        (no key, no parameter)
//! ```
//!
//! Changing either layout means a new `"v"`: a digest an approver saw must
//! keep its meaning.

use std::collections::BTreeSet;

use crate::model::{ContextRule, DataKeyOperation, KeyPolicy};
use crate::store::approvals::{Approval, KeyBefore, SensitiveOperation};

/// The API name of a data-key operation.
pub fn data_key_operation_name(op: DataKeyOperation) -> &'static str {
    match op {
        DataKeyOperation::GenerateDataKey => "GENERATE_DATA_KEY",
        DataKeyOperation::GenerateDataKeyWithoutPlaintext => "GENERATE_DATA_KEY_WITHOUT_PLAINTEXT",
        DataKeyOperation::Encrypt => "ENCRYPT",
        DataKeyOperation::Decrypt => "DECRYPT",
        DataKeyOperation::ReEncrypt => "RE_ENCRYPT",
    }
}

/// A JSON string literal.
fn quote(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// `["a","b"]` from items already sorted as they should appear.
fn list<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    let sorted: BTreeSet<&str> = items.into_iter().collect();
    let inner: Vec<String> = sorted.into_iter().map(quote).collect();
    format!("[{}]", inner.join(","))
}

fn operations(ops: &BTreeSet<DataKeyOperation>) -> String {
    list(ops.iter().map(|o| data_key_operation_name(*o)))
}

fn rule(key: &str, r: &ContextRule) -> String {
    format!(
        "{{\"key\":{},\"values\":{},\"equals_caller_attribute\":{}}}",
        quote(key),
        list(r.values.iter().map(String::as_str)),
        r.equals_caller_attribute
            .as_deref()
            .map_or_else(|| "null".to_string(), quote)
    )
}

/// The canonical encoding of `policy` (version 1, see the module docs).
pub fn canonical_policy(policy: &KeyPolicy) -> String {
    let mut grants: Vec<(&str, String)> = policy
        .grants
        .iter()
        .map(|g| {
            (
                g.principal.as_str(),
                format!(
                    "{{\"principal\":{},\"operations\":{}}}",
                    quote(&g.principal),
                    operations(&g.operations)
                ),
            )
        })
        .collect();
    grants.sort();
    let grants: Vec<String> = grants.into_iter().map(|(_, g)| g).collect();
    // A BTreeMap iterates in key order (UTF-8 bytes).
    let rules: Vec<String> = policy
        .required_context
        .iter()
        .map(|(k, r)| rule(k, r))
        .collect();
    format!(
        "{{\"v\":1,\"grants\":[{}],\"required_context\":[{}],\"accepted_reasons\":{}}}",
        grants.join(","),
        rules.join(","),
        list(policy.accepted_reasons.iter().map(|r| r.name()))
    )
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

/// Hex SHA-256 of [`canonical_policy`].
pub fn policy_sha256(policy: &KeyPolicy) -> String {
    sha256_hex(canonical_policy(policy).as_bytes())
}

/// The canonical encoding of a sensitive operation (version 1).
pub fn canonical_operation(op: &SensitiveOperation) -> String {
    let kind = quote(op.kind().name());
    match op {
        SensitiveOperation::ScheduleKeyDeletion {
            key_id,
            pending_window_days,
        } => format!(
            "{{\"v\":1,\"kind\":{kind},\"key_id\":\"{key_id}\",\"pending_window_days\":{pending_window_days}}}"
        ),
        SensitiveOperation::CancelKeyDeletion { key_id }
        | SensitiveOperation::EnableKey { key_id } => {
            format!("{{\"v\":1,\"kind\":{kind},\"key_id\":\"{key_id}\"}}")
        }
        SensitiveOperation::UpdateKeyPolicy { key_id, policy } => format!(
            "{{\"v\":1,\"kind\":{kind},\"key_id\":\"{key_id}\",\"policy\":{}}}",
            canonical_policy(policy)
        ),
        SensitiveOperation::RetireKeyVersions {
            key_id,
            min_decryption_version,
        } => format!(
            "{{\"v\":1,\"kind\":{kind},\"key_id\":\"{key_id}\",\"min_decryption_version\":{min_decryption_version}}}"
        ),
        SensitiveOperation::RotateRootKey => format!("{{\"v\":1,\"kind\":{kind}}}"),
    }
}

/// Hex SHA-256 of [`canonical_operation`]: what an approver presents.
pub fn operation_sha256(op: &SensitiveOperation) -> String {
    sha256_hex(canonical_operation(op).as_bytes())
}

/// `policy_sha256=<hex> policy=<canonical>`: what an audit record says of a
/// policy (it holds no secret).
pub fn policy_audit(policy: &KeyPolicy) -> String {
    format!(
        "policy_sha256={} policy={}",
        policy_sha256(policy),
        canonical_policy(policy)
    )
}

/// What an audit record says of a sensitive operation: its kind and digest
/// and, for a policy change, the policy's digest and the policy itself.
pub fn operation_audit(op: &SensitiveOperation) -> String {
    let mut out = format!(
        "operation={} operation_sha256={}",
        op.kind().name(),
        operation_sha256(op)
    );
    match op {
        SensitiveOperation::UpdateKeyPolicy { policy, .. } => {
            out.push(' ');
            out.push_str(&policy_audit(policy));
        }
        _ => out.push_str(&format!(" canonical={}", canonical_operation(op))),
    }
    out
}

fn rule_text(r: &ContextRule) -> String {
    let values = if r.values.is_empty() {
        "any value".to_string()
    } else {
        format!(
            "one of [{}]",
            r.values.iter().cloned().collect::<Vec<_>>().join(", ")
        )
    };
    match &r.equals_caller_attribute {
        Some(a) => format!("{values}, equal to the caller's attribute {a:?}"),
        None => values,
    }
}

fn ops_text(ops: &BTreeSet<DataKeyOperation>) -> String {
    let names: BTreeSet<&str> = ops.iter().map(|o| data_key_operation_name(*o)).collect();
    names.into_iter().collect::<Vec<_>>().join(", ")
}

/// One line per difference from `before` to `after`: `+` added, `-`
/// removed, `~` changed.
pub fn policy_changes(before: &KeyPolicy, after: &KeyPolicy) -> Vec<String> {
    let mut out = Vec::new();
    let grants = |p: &KeyPolicy| {
        p.grants
            .iter()
            .map(|g| (g.principal.clone(), g.operations.clone()))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let (old, new) = (grants(before), grants(after));
    for (principal, ops) in &old {
        match new.get(principal) {
            None => out.push(format!(
                "- grant {principal:?}: {} (removed)",
                ops_text(ops)
            )),
            Some(n) if n != ops => out.push(format!(
                "~ grant {principal:?}: {} → {}",
                ops_text(ops),
                ops_text(n)
            )),
            Some(_) => {}
        }
    }
    for (principal, ops) in &new {
        if !old.contains_key(principal) {
            out.push(format!("+ grant {principal:?}: {} (new)", ops_text(ops)));
        }
    }
    for (key, r) in &before.required_context {
        match after.required_context.get(key) {
            None => out.push(format!(
                "- context rule {key:?}: {} (removed)",
                rule_text(r)
            )),
            Some(n) if n != r => out.push(format!(
                "~ context rule {key:?}: {} → {}",
                rule_text(r),
                rule_text(n)
            )),
            Some(_) => {}
        }
    }
    for (key, r) in &after.required_context {
        if !before.required_context.contains_key(key) {
            out.push(format!("+ context rule {key:?}: {} (new)", rule_text(r)));
        }
    }
    for r in before.accepted_reasons.difference(&after.accepted_reasons) {
        out.push(format!(
            "- accepted reason {} (no longer accepted)",
            r.name()
        ));
    }
    for r in after.accepted_reasons.difference(&before.accepted_reasons) {
        out.push(format!("+ accepted reason {} (newly accepted)", r.name()));
    }
    out
}

/// What an approval's operation changes, one line each, relative to the key
/// as it was when proposed (when the approval recorded it).
pub fn approval_changes(approval: &Approval) -> Vec<String> {
    let before: Option<&KeyBefore> = approval.key_before.as_ref();
    let state = |to: &str| match before {
        Some(b) => format!("state: {} → {to}", b.state),
        None => format!("state: → {to}"),
    };
    match &approval.operation {
        SensitiveOperation::ScheduleKeyDeletion {
            pending_window_days,
            ..
        } => vec![format!(
            "{} (destroyed {pending_window_days} days after the last approval)",
            state("PENDING_DELETION")
        )],
        SensitiveOperation::CancelKeyDeletion { .. } => vec![state("DISABLED")],
        SensitiveOperation::EnableKey { .. } => vec![state("ENABLED")],
        SensitiveOperation::UpdateKeyPolicy { policy, .. } => match before {
            Some(b) => {
                let lines = policy_changes(&b.policy, policy);
                if lines.is_empty() {
                    vec!["policy: no change".to_string()]
                } else {
                    lines
                }
            }
            None => vec![format!(
                "policy: replaced by {} (the policy before was not recorded)",
                canonical_policy(policy)
            )],
        },
        SensitiveOperation::RetireKeyVersions {
            min_decryption_version: to,
            ..
        } => {
            let to = *to;
            match before {
                Some(b) if b.min_decryption_version < to => vec![format!(
                    "min_decryption_version: {} → {to} (versions {} to {} stop decrypting)",
                    b.min_decryption_version,
                    b.min_decryption_version,
                    to.saturating_sub(1)
                )],
                Some(b) if b.min_decryption_version > to => vec![format!(
                    "min_decryption_version: {} → {to} (retired versions {to} to {} decrypt again)",
                    b.min_decryption_version,
                    b.min_decryption_version.saturating_sub(1)
                )],
                Some(b) => vec![format!(
                    "min_decryption_version: {} → {to} (no change)",
                    b.min_decryption_version
                )],
                None => vec![format!("min_decryption_version: → {to}")],
            }
        }
        SensitiveOperation::RotateRootKey => vec![
            "HSM root key: a new one; every CMK version re-wrapped under it; the old one destroyed"
                .to_string(),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AccessReason, Grant, KeyId};

    fn policy() -> KeyPolicy {
        KeyPolicy {
            // Deliberately out of order: the encoding sorts.
            grants: vec![
                Grant {
                    principal: "spiffe://b/svc".into(),
                    operations: [DataKeyOperation::Decrypt, DataKeyOperation::Encrypt]
                        .into_iter()
                        .collect(),
                },
                Grant {
                    principal: "spiffe://a/svc".into(),
                    operations: [DataKeyOperation::GenerateDataKey].into_iter().collect(),
                },
            ],
            required_context: [
                (
                    "tenant".to_string(),
                    ContextRule {
                        values: BTreeSet::new(),
                        equals_caller_attribute: Some("tenant".into()),
                    },
                ),
                (
                    "app".to_string(),
                    ContextRule {
                        values: ["y".to_string(), "x\"q".to_string()].into_iter().collect(),
                        equals_caller_attribute: None,
                    },
                ),
            ]
            .into_iter()
            .collect(),
            accepted_reasons: [
                AccessReason::ProviderSystemOperation,
                AccessReason::CustomerInitiatedAccess,
            ]
            .into_iter()
            .collect(),
        }
    }

    /// The golden encoding: if this test has to change, the format needs a
    /// new version number.
    #[test]
    fn canonical_policy_golden() {
        let text = canonical_policy(&policy());
        assert_eq!(
            text,
            concat!(
                r#"{"v":1,"grants":["#,
                r#"{"principal":"spiffe://a/svc","operations":["GENERATE_DATA_KEY"]},"#,
                r#"{"principal":"spiffe://b/svc","operations":["DECRYPT","ENCRYPT"]}],"#,
                r#""required_context":["#,
                r#"{"key":"app","values":["x\"q","y"],"equals_caller_attribute":null},"#,
                r#"{"key":"tenant","values":[],"equals_caller_attribute":"tenant"}],"#,
                r#""accepted_reasons":["CUSTOMER_INITIATED_ACCESS","PROVIDER_SYSTEM_OPERATION"]}"#
            )
        );
        // It is JSON, and its digest is the SHA-256 of exactly these bytes.
        serde_json::from_str::<serde_json::Value>(&text).unwrap();
        assert_eq!(
            policy_sha256(&policy()),
            hex::encode(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()))
        );
        assert_eq!(
            policy_sha256(&policy()),
            "c22adc5061df888aedd4f94285dd932763b93f7cbcb432ca56453ca90865d052",
            "the digest of the golden policy"
        );
    }

    #[test]
    fn grant_order_does_not_change_the_digest_but_a_swapped_principal_does() {
        let p = policy();
        let mut reordered = p.clone();
        reordered.grants.reverse();
        assert_eq!(policy_sha256(&p), policy_sha256(&reordered));
        let mut swapped = p.clone();
        swapped.grants[0].principal = "spiffe://evil/svc".into();
        assert_ne!(policy_sha256(&p), policy_sha256(&swapped));
        // Same counts, different content: the diff names it.
        let lines = policy_changes(&p, &swapped);
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("- grant \"spiffe://b/svc\"")),
            "{lines:?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("+ grant \"spiffe://evil/svc\"")),
            "{lines:?}"
        );
    }

    #[test]
    fn canonical_operation_golden() {
        let key_id: KeyId = "6f1c0e3a-2b4d-4c5e-8f70-91a2b3c4d5e6".parse().unwrap();
        let op = SensitiveOperation::RetireKeyVersions {
            key_id,
            min_decryption_version: 3,
        };
        assert_eq!(
            canonical_operation(&op),
            r#"{"v":1,"kind":"RetireKeyVersions","key_id":"6f1c0e3a-2b4d-4c5e-8f70-91a2b3c4d5e6","min_decryption_version":3}"#
        );
        assert_eq!(
            canonical_operation(&SensitiveOperation::RotateRootKey),
            r#"{"v":1,"kind":"RotateRootKey"}"#
        );
        let lower = SensitiveOperation::RetireKeyVersions {
            key_id,
            min_decryption_version: 1,
        };
        assert_ne!(operation_sha256(&op), operation_sha256(&lower));
        let policy_op = SensitiveOperation::UpdateKeyPolicy {
            key_id,
            policy: policy(),
        };
        assert_eq!(
            canonical_operation(&policy_op),
            format!(
                r#"{{"v":1,"kind":"UpdateKeyPolicy","key_id":"{key_id}","policy":{}}}"#,
                canonical_policy(&policy())
            )
        );
    }

    #[test]
    fn reasons_and_rules_are_diffed() {
        let p = policy();
        let mut q = p.clone();
        q.accepted_reasons
            .insert(AccessReason::ThirdPartyDataRequest);
        q.accepted_reasons
            .remove(&AccessReason::ProviderSystemOperation);
        q.required_context.remove("tenant");
        q.required_context
            .insert("region".into(), ContextRule::default());
        let lines = policy_changes(&p, &q);
        assert_eq!(
            lines,
            vec![
                "- context rule \"tenant\": any value, equal to the caller's attribute \"tenant\" (removed)",
                "+ context rule \"region\": any value (new)",
                "- accepted reason PROVIDER_SYSTEM_OPERATION (no longer accepted)",
                "+ accepted reason THIRD_PARTY_DATA_REQUEST (newly accepted)",
            ]
        );
        assert!(policy_changes(&p, &p).is_empty());
    }
}
