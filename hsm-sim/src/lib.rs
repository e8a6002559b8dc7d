//! hsm-sim: a simulated network HSM, **for testing only**.
//!
//! It knows nothing of its clients. A token holds AES-256 root keys that
//! never leave it; clients log in with the PIN and get a session, then wrap
//! and unwrap opaque material under the current root key, generate random
//! bytes, rotate and destroy root keys. Test harnesses inject faults
//! (latency, random errors, outage) and trigger a tamper response.
//!
//! Map:
//! - [`Simulator`] (`simulator.rs`): the token, usable in-process.
//! - [`format`](mod@format): the wrapped-blob format, version 1.
//! - `state.rs`: the state file, sealed under a PIN-derived key (PBKDF2 +
//!   AES-256-GCM), written crash-safely.
//! - [`server`]: the gRPC services; the fault-injection service is refused
//!   unless [`server::ServerOptions::allow_fault_injection`] is set.
//! - [`status`]: errors on the wire, both ways: [`SimError`] → status with a
//!   typed [`status::Reason`] in its metadata, and the reason read back by
//!   clients.
//! - [`proto`]: generated types, clients and servers, for clients.
//! - the `hsm-sim` binary (`main.rs`): `serve`, `fault`, `info`.
//!
//! Not a security boundary: root keys live in this process's memory, and the
//! gRPC server speaks plain TCP without TLS. The binary binds loopback by
//! default; do not expose it on a network.

#![forbid(unsafe_code)]

mod error;
pub mod format;
pub mod proto;
pub mod server;
mod simulator;
mod state;
pub mod status;

pub use error::SimError;
pub use simulator::{
    Faults, LOGIN_BACKOFF, MAX_RANDOM_LEN, MAX_SEAL_LEN, MAX_SESSIONS, ObjectSeal, SessionId,
    SimInfo, Simulator,
};
pub use state::{MAX_OBJECT_NAME_LEN, PBKDF2_ITERATIONS};
