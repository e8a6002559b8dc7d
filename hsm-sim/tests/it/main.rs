//! hsm-sim integration tests: one binary, one module per area.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod binary;
mod grpc;
mod simulator;

use std::path::PathBuf;

use hsm_sim::{SessionId, Simulator};

pub const PIN: &str = "1234-test-pin";

/// A fresh token in a temporary directory (kept alive by the returned guard).
pub fn token() -> (tempfile::TempDir, PathBuf, Simulator) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token.state");
    let sim = Simulator::open(&path, PIN, "test-token").unwrap();
    (dir, path, sim)
}

pub async fn login(sim: &Simulator) -> SessionId {
    sim.login(PIN).await.unwrap()
}
