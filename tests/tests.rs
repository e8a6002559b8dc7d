//! coffre's integration tests: one binary made of modules.

// Tests may panic on purpose: a failed expectation is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

mod audit_log;
mod audit_verify;
mod batch;
mod canary;
mod cli;
mod crash;
mod e2e;
mod format;
mod fuzz_corpora;
mod hsm_conformance;
mod hsm_faults;
mod lifecycle;
mod observability;
mod policy;
mod processes;
mod quorum;
mod soak;
mod storage_faults;
mod tls;
