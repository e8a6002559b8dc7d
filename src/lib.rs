//! coffre: a key management service for a sovereign cloud.
//!
//! Hosted services call coffre over gRPC to generate, wrap, unwrap and re-wrap
//! the data keys that encrypt their data (envelope encryption). The customer
//! master keys (CMKs) that wrap those data keys never leave coffre and its
//! HSM: what a hosted provider holds is ciphertext.
//!
//! Map of the crate (see ARCHITECTURE.md), dependencies pointing one way:
//! transport → service core → traits ← backends.
//!
//! - [`grpc`]: the only module that knows tonic. Authenticates callers (mTLS),
//!   converts messages to domain types, maps [`Error`] to statuses.
//! - [`service`]: the core. Authorization, key lifecycle, data-key operations,
//!   the CMK cache.
//! - [`hsm`], [`store`]: the seams (`Hsm`, `KeyStore`) and their backends.
//! - [`envelope`], [`crypto`]: the wrapped-key format v1 and its cryptography.
//! - [`secret`], [`model`], [`error`]: shared types.
//! - [`audit`]: the tamper-evident audit log (hash chain, signed checkpoints,
//!   offline verifier). Not yet wired into the server.
//! - [`cli`]: the `coffre` command (dev, serve, and the operator client).

#![forbid(unsafe_code)]

pub mod audit;
pub mod authz;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod envelope;
pub mod error;
pub mod fsutil;
#[doc(hidden)]
pub mod fuzzing;
pub mod grpc;
pub mod hardening;
pub mod hsm;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod pki;
pub mod secret;
pub mod service;
pub mod store;

pub use error::{Error, Result};
