//! How a request ends: a canonical status code, and the one mapping of
//! every core and audit error to a code and a message that is safe to show
//! the caller. Integrity and backend failures get a generic message; their
//! details go to the server log. Fronts translate a [`Failure`] into their
//! wire format and nothing more (`grpc::status` into a `tonic::Status`).

use std::borrow::Cow;

use crate::audit::Outcome;
use crate::error::Error;
use crate::hsm::HsmError;
use crate::store::StoreError;

/// The canonical status codes (google.rpc.Code, the numbers gRPC uses):
/// what audit records (`status_code`), metrics and every front speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Code {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

impl Code {
    /// The name audit records and logs use, e.g. `INVALID_ARGUMENT` (the
    /// table the metrics' `code` label uses too).
    pub fn name(self) -> &'static str {
        crate::metrics::CODE_NAMES
            .get(self as usize)
            .copied()
            .unwrap_or("UNKNOWN")
    }

    /// Refused: the request was not acceptable (validation, authorization,
    /// state, rate). Failed: it was, but coffre could not serve it.
    pub fn outcome(self) -> Outcome {
        match self {
            Code::Ok => Outcome::Allowed,
            Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::ResourceExhausted
            | Code::Unauthenticated
            | Code::Aborted
            | Code::Unimplemented => Outcome::Refused,
            Code::Cancelled
            | Code::Unknown
            | Code::DeadlineExceeded
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss => Outcome::Failed,
        }
    }
}

/// What a front whose wire format names more cases than the status codes
/// (the XKS front) tells apart within one code.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Cause {
    #[default]
    Other,
    /// `INVALID_ARGUMENT`: the ciphertext (or its context) did not
    /// authenticate, as opposed to a malformed request.
    Ciphertext,
    /// `PERMISSION_DENIED`: the caller may use the key, but not for this
    /// operation.
    KeyUsage,
}

/// Why a request did not succeed, as its caller is told: a code and a
/// message that is safe to show.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    code: Code,
    message: Cow<'static, str>,
    cause: Cause,
}

/// What a caller is told while the audit log cannot be written.
const AUDIT_UNWRITABLE: &str =
    "the audit log cannot be written; coffre refuses service until it can";

impl Failure {
    pub fn new(code: Code, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            code,
            message: message.into(),
            cause: Cause::Other,
        }
    }

    fn because(mut self, cause: Cause) -> Self {
        self.cause = cause;
        self
    }

    /// A request without an acceptable identity.
    pub fn unauthenticated(message: &'static str) -> Self {
        Self::new(Code::Unauthenticated, message)
    }

    /// Fail closed: the audit log cannot be written.
    pub fn audit_unwritable() -> Self {
        Self::new(Code::Unavailable, AUDIT_UNWRITABLE)
    }

    pub fn code(&self) -> Code {
        self.code
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn cause(&self) -> Cause {
        self.cause
    }
}

impl From<Error> for Failure {
    fn from(err: Error) -> Self {
        use Code as C;
        match err {
            Error::InvalidArgument(m) => Self::new(C::InvalidArgument, m),
            Error::InvalidCiphertext => Self::new(
                C::InvalidArgument,
                "invalid ciphertext or encryption context",
            )
            .because(Cause::Ciphertext),
            Error::KeyUsage(m) => Self::new(C::PermissionDenied, m).because(Cause::KeyUsage),
            Error::Unsupported(m) => Self::new(C::Unimplemented, m),
            Error::DeadlineExceeded(m) => {
                tracing::warn!(reason = %m, "request past its deadline");
                Self::new(C::DeadlineExceeded, m)
            }
            Error::KeyNotFound(k) => Self::new(C::NotFound, format!("key not found: {k}")),
            Error::PermissionDenied(m) => Self::new(C::PermissionDenied, m),
            e @ Error::KeyNotEnabled { .. } => Self::new(C::FailedPrecondition, e.to_string()),
            e @ Error::NotFresh { .. } => Self::new(C::Unavailable, e.to_string()),
            // The reason (a database error) goes to the log only.
            e @ Error::NotDurable {
                key_id, version, ..
            } => {
                tracing::warn!(error = %e, "a new wrap waits for the database");
                Self::new(
                    C::Unavailable,
                    format!(
                        "version {version} of key {key_id} is not yet confirmed replicated by \
                         the database; retry"
                    ),
                )
            }
            Error::FailedPrecondition(m) => Self::new(C::FailedPrecondition, m),
            Error::AlreadyExists(m) => Self::new(C::AlreadyExists, m),
            Error::ResourceExhausted(m) => Self::new(C::ResourceExhausted, m),
            Error::NotFound(m) => Self::new(C::NotFound, format!("{m} not found")),
            // Fronts turn a pending approval into a response; this is a
            // fallback for an operation whose answer has no place for it.
            e @ Error::ApprovalPending(_) => Self::new(C::FailedPrecondition, e.to_string()),
            Error::Hsm(e) => {
                tracing::error!(error = %e, "HSM failure");
                match e {
                    HsmError::Unavailable(_) => {
                        Self::new(C::Unavailable, "the HSM is unavailable; retry later")
                    }
                    HsmError::Tampered => Self::new(C::Unavailable, "the HSM cannot serve keys"),
                    HsmError::LoginFailed(_) => Self::new(
                        C::Unavailable,
                        "the HSM refused coffre's login; see the server log",
                    ),
                    _ => Self::new(C::Internal, "internal error (HSM); see the server log"),
                }
            }
            Error::Store(e) => {
                tracing::error!(error = %e, "key store failure");
                match e {
                    StoreError::Io(_) => Self::new(C::Unavailable, "the key store is unavailable"),
                    StoreError::Conflict(_) => {
                        Self::new(C::Aborted, "concurrent update of the key; retry")
                    }
                    StoreError::ApprovalConflict(_) => Self::new(
                        C::Aborted,
                        "other operators are changing this approval at the same moment; retry",
                    ),
                    StoreError::RootKeyRetired(_) => Self::new(
                        C::Unavailable,
                        "an HSM root-key rotation is finishing; retry",
                    ),
                    StoreError::IntegrityFailure(_) => Self::new(
                        C::DataLoss,
                        "a stored record failed its integrity check and was refused; see the \
                         server log",
                    ),
                    _ => Self::new(C::Internal, "internal error (store); see the server log"),
                }
            }
            Error::AuditUnwritable(e) => {
                tracing::error!(error = %e, "audit log unavailable: request refused (fail closed)");
                Self::audit_unwritable()
            }
            Error::AuditUnreadable(e) => {
                tracing::error!(error = %e, "reading the audit log failed");
                Self::new(C::Unavailable, "the audit log cannot be read")
            }
            Error::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                Self::new(C::Internal, "internal error; see the server log")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Code;

    #[test]
    fn status_names_follow_the_grpc_code_numbers() {
        for (code, name) in [
            (Code::Ok, "OK"),
            (Code::Cancelled, "CANCELLED"),
            (Code::InvalidArgument, "INVALID_ARGUMENT"),
            (Code::PermissionDenied, "PERMISSION_DENIED"),
            (Code::FailedPrecondition, "FAILED_PRECONDITION"),
            (Code::Unavailable, "UNAVAILABLE"),
            (Code::Unauthenticated, "UNAUTHENTICATED"),
        ] {
            assert_eq!(code.name(), name);
        }
    }
}
