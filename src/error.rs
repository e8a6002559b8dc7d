//! The core's error type. Structured inside; mapped once, in
//! `pipeline::Failure::from`, to a code and a message that is safe to show
//! the caller.

use crate::hsm::HsmError;
use crate::model::{KeyId, KeyState};
use crate::store::StoreError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request is malformed. The message names what is wrong and is safe
    /// to return.
    #[error("{0}")]
    InvalidArgument(String),
    /// A ciphertext blob failed to parse or authenticate, or the encryption
    /// context does not match. Deliberately says nothing more.
    #[error("invalid ciphertext or encryption context")]
    InvalidCiphertext,
    #[error("key not found: {0}")]
    KeyNotFound(String),
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("key {key_id} is {state}")]
    KeyNotEnabled { key_id: KeyId, state: KeyState },
    #[error("{0}")]
    FailedPrecondition(String),
    /// The caller may use the key, but not for this operation (the XKS
    /// front's `InvalidKeyUsageException`).
    #[error("{0}")]
    KeyUsage(String),
    /// The request did not finish within the front's deadline (the XKS
    /// front answers AWS KMS within its 250 ms).
    #[error("{0}")]
    DeadlineExceeded(String),
    /// Valid, but beyond what coffre supports (a plaintext longer than the
    /// XKS front takes: its `UnsupportedOperationException`).
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// Not a failure: the operation needs more approvals and was recorded
    /// as this pending approval.
    #[error("operation {} awaits {} approvals (approval {})", .0.operation.describe(), .0.approvals_required, .0.id)]
    ApprovalPending(Box<crate::store::approvals::Approval>),
    /// Something other than a key does not exist (an approval).
    #[error("{0} not found")]
    NotFound(String),
    /// The caller's rate limit is exhausted.
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("HSM error: {0}")]
    Hsm(#[from] HsmError),
    #[error("store error: {0}")]
    Store(#[from] StoreError),
    /// The audit log cannot be written (fail closed: the request is
    /// refused).
    #[error("audit log cannot be written: {0}")]
    AuditUnwritable(crate::audit::AuditError),
    /// The audit log cannot be read.
    #[error("audit log cannot be read: {0}")]
    AuditUnreadable(crate::audit::AuditError),
    /// This node shares its store with others and could not confirm, for
    /// longer than the bound, that its cached keys are current (strict
    /// mode): it refuses data keys until it can. Another node may serve.
    #[error(
        "this node could not confirm the state of its keys with the store within {} ms \
         (for {} ms now); retry on another node",
        max_staleness.as_millis(),
        overdue.as_millis()
    )]
    NotFresh {
        max_staleness: std::time::Duration,
        overdue: std::time::Duration,
    },
    /// The key version a new wrap would use was read from a shared store,
    /// and the database has not yet shown that it survives a failover
    /// (the durability barrier, `cluster::barrier`): nothing is wrapped
    /// under it until it does.
    #[error(
        "version {version} of key {key_id} is not yet confirmed replicated by the database \
         ({reason}); retry"
    )]
    NotDurable {
        key_id: KeyId,
        version: u32,
        reason: crate::cluster::BarrierError,
    },
    /// A bug: an invariant did not hold. Details go to the server log only.
    #[error("internal error: {0}")]
    Internal(String),
}
