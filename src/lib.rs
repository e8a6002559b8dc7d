//! coffre: a key management service for a sovereign cloud.
//!
//! Hosted services call coffre over gRPC to generate, wrap, unwrap and re-wrap
//! the data keys that encrypt their data (envelope encryption). The customer
//! master keys (CMKs) that wrap those data keys never leave coffre and its
//! HSM: what a hosted provider holds is ciphertext.
//!
//! Map of the crate (ARCHITECTURE.md has the whole of it, with the
//! invariants each part keeps). Dependencies point one way: fronts →
//! pipeline → core → seams ← backends, with [`server`] assembling them.
//!
//! - [`grpc`]: the gRPC front, the only module that knows tonic:
//!   authentication from the client certificate, wire conversions, one file
//!   per service.
//! - [`xks`]: the AWS XKS proxy API front, being built (issue #18): the
//!   wire layouts so far.
//! - [`pipeline`]: what happens to every request, whatever its front:
//!   request id, fail-closed audit record, the core, errors mapped once.
//! - [`service`]: the core ([`service::Kms`]): authorization, key lifecycle,
//!   data keys, quorum approvals, the caches, the audit log's read side.
//! - [`authz`]: callers, roles, operations, the `Authorizer` seam.
//! - [`hsm`], [`store`]: the `Hsm` and `KeyStore` seams, their backends and
//!   the conformance suites every backend passes (the store's backends:
//!   sled, embedded, and PostgreSQL, shared by several nodes).
//! - [`cluster`]: coordination of several nodes sharing one store
//!   (leases, node registry, the change feed's wake-up).
//! - [`audit`]: the tamper-evident audit log (records, hash chain, signed
//!   checkpoints, the offline verifier).
//! - [`envelope`], [`crypto`]: the wrapped-key format v1 and its
//!   cryptography.
//! - [`model`], [`secret`], [`error`]: domain types, secret bytes, the core's
//!   error.
//! - [`server`]: the composition root (store, HSM, authorizer, TLS, audit,
//!   tasks → a running server) and the data directory's layout.
//! - [`config`]: `coffre serve`'s configuration, validated once.
//! - [`pki`]: the dev PKI and principals from certificates.
//! - [`metrics`]: Prometheus counters in atomics and their listener.
//! - [`hardening`], [`fsutil`]: process hardening at start; whole-file
//!   writes.
//! - [`cli`]: the `coffre` command: argument parsing, client calls,
//!   printing, and `coffre bench`.

#![forbid(unsafe_code)]

pub mod audit;
pub mod authz;
pub mod cli;
pub mod cluster;
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
pub mod server;
pub mod service;
pub mod store;
pub mod xks;

pub use error::{Error, Result};
