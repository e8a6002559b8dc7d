//! coffre's integration tests: one binary made of modules.

// Tests may panic on purpose: a failed expectation is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

// Fixtures: the in-process `TestServer`, clients, and the drivers of the
// real binaries (`common::binary`).
mod common;

// Availability under abuse: idle connections, rate limit first and per
// batch item, coalesced refusals, a batch stopped by an HSM outage.
mod abuse;
// The audit log of a running server: one record per request, before the
// response; fail closed (needs root for chattr: ignored, not run, without
// it unless COFFRE_REQUIRE_ROOT=1); export, list and tail.
mod audit_log;
// Approvals that show what is approved (policy, diff, digest), the digest
// an approver must present, RetireKeyVersions under the quorum, duplicates.
mod approvals_review;
// The offline chain of the audit log: `coffre audit verify` on a log the
// library wrote, clean and edited.
mod audit_verify;
// Issue #15 with the real binary: `audit verify` refuses cut, empty,
// unsigned and non-canonical logs; refusals by alias name the key id;
// `coffre dev` refuses a deleted audit log.
mod audit_cut;
// BatchGenerateDataKey and BatchDecrypt over gRPC.
mod batch;
// No secret in logs (RUST_LOG=trace), errors, audit or metrics of a
// `coffre dev` process.
mod canary;
// The README walkthrough with the real `coffre` binary and its CLI.
mod cli;
// The data commands (encrypt/decrypt/reencrypt, --batch) with the real binary.
mod cli_data;
// Issue #16, CLI errors with the real binary: --json error objects, request
// ids found in the audit log, wrong-PKI and refused connections in words,
// periods as given, policy warnings and proto names, empty tables.
mod cli_errors;
// Issue #19: coffre seal / coffre open with the real binary.
mod cli_seal;
// Issue #16, `coffre dev` with the real binary: --attribute and the
// tenant policy, busy port and data directory in use, quorum hints, bench.
mod dev_server;
// README.md run as written: every sh block, in order, in bash, with the
// real binary; the blocks it cannot run say why in the README.
mod readme;
// Long-running: `coffre dev` SIGKILLed under load and restarted, 20 cycles
// by default (COFFRE_CRASH_CYCLES, COFFRE_CRASH_SEED).
mod crash;
// Issue #15 defaults: ReEncrypt decides before it unwraps, BatchDecrypt's
// per-item record, hsm-sim's loopback refusal.
mod defaults;
// The data-key and key RPCs end to end, in-process server over mTLS.
mod e2e;
// The wrapped-key format v1: golden blobs, Wycheproof, properties, tamper.
mod format;
// The fuzz targets' bodies over their corpora and random inputs (the seed
// writer is #[ignore]d).
mod fuzz_corpora;
// One HSM conformance suite on each backend. Environment-sensitive: the
// SoftHSM2 tests need softhsm2 and opensc, and are ignored (not run) where
// the build did not find them unless COFFRE_REQUIRE_SOFTHSM=1; the hsm-sim
// one needs the hsm-sim binary built.
mod hsm_conformance;
// HSM faults (latency, errors, outage, tamper) injected into the
// in-process simulator.
mod hsm_faults;
// Issue #19, end to end: examples/hosted-store on coffre dev.
mod hosted_store;
// Deletion, retirement, rotation policy and a root-key rotation killed
// midway, through the CLI.
mod lifecycle;
// The metrics page, JSON logs carrying audit request ids, `coffre bench`.
mod observability;
// Identity bound to its role's CA, clientAuth, CN never a URI; CRL
// staleness and rollback (issue #15, H1 and M4).
mod identity;
// Authorization: the RPC × role matrix, key policies, no existence oracle.
mod policy;
// Issue #17: several `coffre serve` nodes on one PostgreSQL database
// (common::cluster): disable propagation within the bound, a node cut
// off by a proxy, a node killed. Needs PostgreSQL 15+.
mod cluster_nodes;
// Issue #17, faults under several nodes: PostgreSQL restarted (fast and
// SIGKILL) under a mixed load, the LISTEN connections killed, a node
// SIGKILLed under load, a request in flight when a node's database
// connection is cut. Needs PostgreSQL 15+.
mod cluster_faults;
// Issue #17, the PostgreSQL store's foundation against private servers
// (common::pg): `coffre store migrate|status`, connection failures in
// words, a standby refused, TLS verify-full, the least-privilege roles;
// leases, the node registry and NOTIFY (`postgres_cluster`).
// Environment-sensitive: needs PostgreSQL 15+, ignored (not run) without
// it unless COFFRE_REQUIRE_POSTGRES=1.
mod postgres_cluster;
// Issue #17, `coffre store copy` from sled into PostgreSQL: keys in every
// state, an approval, data keys wrapped before the copy served after it;
// a store in use and a database not empty refused with nothing changed.
mod postgres_copy;

// Issue #17, PostgreSQL failover with `coffre serve` processes and a
// standby: a promoted synchronous standby holds every acknowledged write
// (the failover time printed), the asynchronous negative control loses the
// writes after a replication cut, and a returning old primary is fenced
// off by its timeline. Needs PostgreSQL 15+.
mod postgres_failover;
mod postgres_roles;
// Issue #17, `coffre serve` on the PostgreSQL store: two nodes, one
// database, one hsm-sim; a database without the schema refused.
mod postgres_serve;
mod postgres_store;
// `coffre serve` and `hsm-sim serve` as separate processes, faults
// included; needs the hsm-sim binary built (`cargo test` at the workspace
// root builds it).
mod processes;
// Issue #16: /healthz and /readyz on the metrics listener, reflection v1alpha.
mod probes;
// Issue #19: the Python client (clients/python) with the real binary (COFFRE_CLIENT_PYTHON).
mod python_client;
// Quorum approvals between two operators, through the CLI.
mod quorum;
// Tests needing the machine (SoftHSM2, root) are not run where it lacks that, and fail when forced.
mod requirements;
// Long-running (about 10 s): the short soak, flat memory under
// `coffre bench`.
mod soak;
// Integrity of what is stored: records edited on disk refused after a
// restart, the MAC key's deletion detected, the one-time migration.
mod store_integrity;
// Environment-sensitive: a full then read-only disk under `coffre dev`;
// needs root, loop devices and e2fsprogs: ignored (not run) without them
// unless COFFRE_REQUIRE_ROOT=1.
mod storage_faults;
// Client certificates at the TLS layer: expiry, CRL, reload (SIGHUP too).
mod tls;
// Issue #18: the AWS XKS proxy API front, driven by botocore's SigV4Auth.
mod xks;
// Issue #18 with the real binaries: coffre serve's [xks], mTLS, HSM faults.
mod xks_serve;
