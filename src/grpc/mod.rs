//! The gRPC transport: the only module that knows tonic and the generated
//! types. It authenticates callers (mTLS, always on), converts messages into
//! validated domain values, calls the core, and maps [`crate::Error`] to a
//! status once ([`status`]).

mod audit;
mod auth;
pub(crate) mod convert;
mod redact;
mod server;
mod services;
mod tls;

pub use audit::REQUEST_ID_HEADER;
pub use auth::principal_of;
pub use server::serve;
pub use tls::{ClientAuth, DEFAULT_CRL_RELOAD_INTERVAL, PreparedTls, ServerTls};

/// The generated protobuf and tonic code of `coffre.v1`.
#[allow(
    clippy::all,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_debug_implementations
)]
pub mod pb {
    tonic::include_proto!("coffre.v1");

    /// Encoded descriptors, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/coffre_descriptor.bin"));
}

use tonic::Status;

use crate::error::Error;
use crate::hsm::HsmError;
use crate::store::StoreError;

/// Maps a core error to the status the caller sees. Integrity and backend
/// failures get a generic message; their details go to the server log.
pub fn status(err: Error) -> Status {
    match err {
        Error::InvalidArgument(m) => Status::invalid_argument(m),
        Error::InvalidCiphertext => {
            Status::invalid_argument("invalid ciphertext or encryption context")
        }
        Error::KeyNotFound(k) => Status::not_found(format!("key not found: {k}")),
        Error::PermissionDenied(m) => Status::permission_denied(m),
        e @ Error::KeyNotEnabled { .. } => Status::failed_precondition(e.to_string()),
        Error::FailedPrecondition(m) => Status::failed_precondition(m),
        Error::AlreadyExists(m) => Status::already_exists(m),
        Error::ResourceExhausted(m) => Status::resource_exhausted(m),
        Error::NotFound(m) => Status::not_found(format!("{m} not found")),
        // Handlers turn a pending approval into a response; this is a
        // fallback for an RPC that has no field for it.
        e @ Error::ApprovalPending(_) => Status::failed_precondition(e.to_string()),
        Error::Hsm(e) => {
            tracing::error!(error = %e, "HSM failure");
            match e {
                HsmError::Unavailable(_) => {
                    Status::unavailable("the HSM is unavailable; retry later")
                }
                HsmError::Tampered => Status::unavailable("the HSM cannot serve keys"),
                HsmError::LoginFailed(_) => {
                    Status::unavailable("the HSM refused coffre's login; see the server log")
                }
                _ => Status::internal("internal error (HSM); see the server log"),
            }
        }
        Error::Store(e) => {
            tracing::error!(error = %e, "key store failure");
            match e {
                StoreError::Io(_) => Status::unavailable("the key store is unavailable"),
                StoreError::Conflict(_) => Status::aborted("concurrent update of the key; retry"),
                _ => Status::internal("internal error (store); see the server log"),
            }
        }
        Error::Internal(m) => {
            tracing::error!(error = %m, "internal error");
            Status::internal("internal error; see the server log")
        }
    }
}
