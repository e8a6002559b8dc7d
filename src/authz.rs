//! Authorization: who may call what.
//!
//! The transport only authenticates (mTLS → [`Caller::principal`]); the
//! service core asks an [`Authorizer`] before doing anything. Roles come from
//! the server's configuration, never from the caller. Deny by default: a
//! principal without a role may call nothing.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The client certificate's first URI SAN, else its subject CN.
    pub principal: String,
}

impl Caller {
    pub fn new(principal: impl Into<String>) -> Self {
        Self {
            principal: principal.into(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Security officer: key lifecycle. Never data keys.
    Operator,
    /// Hosted service: data-key operations. Never key management.
    Service,
    /// Reads the audit log; nothing else.
    Auditor,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Service => "service",
            Role::Auditor => "auditor",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every operation of the core, for authorization and (later) audit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operation {
    CreateKey,
    GetKey,
    ListKeys,
    RotateKey,
    DisableKey,
    EnableKey,
    GenerateDataKey,
    GenerateDataKeyWithoutPlaintext,
    Encrypt,
    Decrypt,
    ReEncrypt,
    BatchGenerateDataKey,
    BatchDecrypt,
    ScheduleKeyDeletion,
    CancelKeyDeletion,
    SetRotationPolicy,
    RetireKeyVersions,
    GetHsmInfo,
    RotateRootKey,
    UpdateKeyPolicy,
    ListApprovals,
    ApproveOperation,
    RejectOperation,
    ListAuditEvents,
    GetAuditCheckpoint,
    ExportAuditLog,
    TailAuditEvents,
    /// The XKS front (`xks`): AWS KMS asking about, or using, a key.
    XksGetKeyMetadata,
    XksEncrypt,
    XksDecrypt,
    XksGetHealthStatus,
}

impl Operation {
    pub const ALL: [Operation; 31] = [
        Operation::CreateKey,
        Operation::GetKey,
        Operation::ListKeys,
        Operation::RotateKey,
        Operation::DisableKey,
        Operation::EnableKey,
        Operation::GenerateDataKey,
        Operation::GenerateDataKeyWithoutPlaintext,
        Operation::Encrypt,
        Operation::Decrypt,
        Operation::ReEncrypt,
        Operation::BatchGenerateDataKey,
        Operation::BatchDecrypt,
        Operation::ScheduleKeyDeletion,
        Operation::CancelKeyDeletion,
        Operation::SetRotationPolicy,
        Operation::RetireKeyVersions,
        Operation::GetHsmInfo,
        Operation::RotateRootKey,
        Operation::UpdateKeyPolicy,
        Operation::ListApprovals,
        Operation::ApproveOperation,
        Operation::RejectOperation,
        Operation::ListAuditEvents,
        Operation::GetAuditCheckpoint,
        Operation::ExportAuditLog,
        Operation::TailAuditEvents,
        Operation::XksGetKeyMetadata,
        Operation::XksEncrypt,
        Operation::XksDecrypt,
        Operation::XksGetHealthStatus,
    ];

    /// The operation's position in [`Operation::ALL`] (for counters).
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Operation::CreateKey => "CreateKey",
            Operation::GetKey => "GetKey",
            Operation::ListKeys => "ListKeys",
            Operation::RotateKey => "RotateKey",
            Operation::DisableKey => "DisableKey",
            Operation::EnableKey => "EnableKey",
            Operation::GenerateDataKey => "GenerateDataKey",
            Operation::GenerateDataKeyWithoutPlaintext => "GenerateDataKeyWithoutPlaintext",
            Operation::Encrypt => "Encrypt",
            Operation::Decrypt => "Decrypt",
            Operation::ReEncrypt => "ReEncrypt",
            Operation::BatchGenerateDataKey => "BatchGenerateDataKey",
            Operation::BatchDecrypt => "BatchDecrypt",
            Operation::ScheduleKeyDeletion => "ScheduleKeyDeletion",
            Operation::CancelKeyDeletion => "CancelKeyDeletion",
            Operation::SetRotationPolicy => "SetRotationPolicy",
            Operation::RetireKeyVersions => "RetireKeyVersions",
            Operation::GetHsmInfo => "GetHsmInfo",
            Operation::RotateRootKey => "RotateRootKey",
            Operation::UpdateKeyPolicy => "UpdateKeyPolicy",
            Operation::ListApprovals => "ListApprovals",
            Operation::ApproveOperation => "ApproveOperation",
            Operation::RejectOperation => "RejectOperation",
            Operation::ListAuditEvents => "ListEvents",
            Operation::GetAuditCheckpoint => "GetCheckpoint",
            Operation::ExportAuditLog => "ExportLog",
            Operation::TailAuditEvents => "TailEvents",
            Operation::XksGetKeyMetadata => "XksGetKeyMetadata",
            Operation::XksEncrypt => "XksEncrypt",
            Operation::XksDecrypt => "XksDecrypt",
            Operation::XksGetHealthStatus => "XksGetHealthStatus",
        }
    }

    /// The one role allowed to call this operation (separation of duties).
    pub fn required_role(self) -> Role {
        match self {
            Operation::CreateKey
            | Operation::GetKey
            | Operation::ListKeys
            | Operation::RotateKey
            | Operation::DisableKey
            | Operation::EnableKey
            | Operation::ScheduleKeyDeletion
            | Operation::CancelKeyDeletion
            | Operation::SetRotationPolicy
            | Operation::RetireKeyVersions
            | Operation::GetHsmInfo
            | Operation::RotateRootKey
            | Operation::UpdateKeyPolicy
            | Operation::ListApprovals
            | Operation::ApproveOperation
            | Operation::RejectOperation => Role::Operator,
            Operation::GenerateDataKey
            | Operation::GenerateDataKeyWithoutPlaintext
            | Operation::Encrypt
            | Operation::Decrypt
            | Operation::ReEncrypt
            | Operation::BatchGenerateDataKey
            | Operation::BatchDecrypt
            | Operation::XksGetKeyMetadata
            | Operation::XksEncrypt
            | Operation::XksDecrypt
            | Operation::XksGetHealthStatus => Role::Service,
            Operation::ListAuditEvents
            | Operation::GetAuditCheckpoint
            | Operation::ExportAuditLog
            | Operation::TailAuditEvents => Role::Auditor,
        }
    }
}

/// Why a call was refused. The message is safe to return to the caller.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Denied(pub String);

pub trait Authorizer: Send + Sync + fmt::Debug {
    /// The caller's role, if the configuration gives it one.
    fn role_of(&self, caller: &Caller) -> Option<Role>;

    /// An attribute the operator configured for the caller (e.g. its
    /// `tenant`), for policies that bind a context value to it.
    fn attribute(&self, caller: &Caller, name: &str) -> Option<String>;

    /// Allows or refuses `op` for `caller`; on success, the caller's role.
    fn authorize(&self, caller: &Caller, op: Operation) -> Result<Role, Denied> {
        let Some(role) = self.role_of(caller) else {
            return Err(Denied(format!(
                "principal {:?} has no role on this server",
                caller.principal
            )));
        };
        if role == op.required_role() {
            Ok(role)
        } else {
            Err(Denied(format!("role {role} may not call {}", op.name())))
        }
    }
}

/// Roles and attributes from the server configuration: principal → role,
/// principal → {attribute → value}.
#[derive(Clone, Debug, Default)]
pub struct StaticRoles {
    roles: HashMap<String, Role>,
    attributes: HashMap<String, std::collections::BTreeMap<String, String>>,
}

impl StaticRoles {
    pub fn new(roles: impl IntoIterator<Item = (String, Role)>) -> Self {
        Self {
            roles: roles.into_iter().collect(),
            attributes: HashMap::new(),
        }
    }

    pub fn with_attributes(
        mut self,
        attributes: HashMap<String, std::collections::BTreeMap<String, String>>,
    ) -> Self {
        self.attributes = attributes;
        self
    }
}

impl Authorizer for StaticRoles {
    fn role_of(&self, caller: &Caller) -> Option<Role> {
        self.roles.get(&caller.principal).copied()
    }

    fn attribute(&self, caller: &Caller, name: &str) -> Option<String> {
        self.attributes
            .get(&caller.principal)
            .and_then(|a| a.get(name))
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_operation_against_every_role() {
        let authz = StaticRoles::new([
            ("op".to_string(), Role::Operator),
            ("svc".to_string(), Role::Service),
            ("aud".to_string(), Role::Auditor),
        ]);
        // The expected matrix, written out: (operation, operator, service, auditor).
        use Operation::*;
        let expected = [
            (CreateKey, true, false, false),
            (GetKey, true, false, false),
            (ListKeys, true, false, false),
            (RotateKey, true, false, false),
            (DisableKey, true, false, false),
            (EnableKey, true, false, false),
            (GenerateDataKey, false, true, false),
            (GenerateDataKeyWithoutPlaintext, false, true, false),
            (Encrypt, false, true, false),
            (Decrypt, false, true, false),
            (ReEncrypt, false, true, false),
            (BatchGenerateDataKey, false, true, false),
            (BatchDecrypt, false, true, false),
            (ScheduleKeyDeletion, true, false, false),
            (CancelKeyDeletion, true, false, false),
            (SetRotationPolicy, true, false, false),
            (RetireKeyVersions, true, false, false),
            (GetHsmInfo, true, false, false),
            (RotateRootKey, true, false, false),
            (UpdateKeyPolicy, true, false, false),
            (ListApprovals, true, false, false),
            (ApproveOperation, true, false, false),
            (RejectOperation, true, false, false),
            (ListAuditEvents, false, false, true),
            (GetAuditCheckpoint, false, false, true),
            (ExportAuditLog, false, false, true),
            (TailAuditEvents, false, false, true),
            (XksGetKeyMetadata, false, true, false),
            (XksEncrypt, false, true, false),
            (XksDecrypt, false, true, false),
            (XksGetHealthStatus, false, true, false),
        ];
        assert_eq!(expected.len(), Operation::ALL.len());
        for (i, op) in Operation::ALL.iter().enumerate() {
            assert_eq!(op.index(), i, "ALL is in declaration order");
        }
        for (op, operator, service, auditor) in expected {
            assert_eq!(
                authz.authorize(&Caller::new("op"), op).is_ok(),
                operator,
                "{op:?}"
            );
            assert_eq!(
                authz.authorize(&Caller::new("svc"), op).is_ok(),
                service,
                "{op:?}"
            );
            assert_eq!(
                authz.authorize(&Caller::new("aud"), op).is_ok(),
                auditor,
                "{op:?}"
            );
            assert!(authz.authorize(&Caller::new("stranger"), op).is_err());
        }
    }
}
