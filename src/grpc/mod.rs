//! The gRPC front: the only module that knows tonic and the generated
//! types. It authenticates callers (mTLS, always on, [`auth`]), converts
//! messages into validated domain values ([`convert`]) and sends every
//! request through the transport-neutral [`crate::pipeline`]
//! ([`api::GrpcApi::handle`]), which calls the core, maps its errors once
//! and writes the audit record; [`status`] puts the reply on the wire.

mod api;
mod auth;
pub(crate) mod convert;
mod redact;
mod server;
mod services;
mod status;
mod tls;

pub use api::GrpcApi;
pub use auth::principal_of;
pub use server::{MAX_CONNECTION_AGE, ServerLimits, serve};
pub use status::{REQUEST_ID_HEADER, status};
pub use tls::{
    ClientAuth, ClientCaPems, DEFAULT_CRL_RELOAD_INTERVAL, IdentityBinding, PreparedTls, ServerTls,
};

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
