//! The binary's own checks, without coffre (the story with coffre is the
//! root crate's `tests/hosted_store.rs`, which runs this binary: having a
//! test here is also what makes `cargo test` build it).

#![allow(clippy::unwrap_used)]

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_hosted-store");

#[test]
fn it_says_what_it_is_and_refuses_a_missing_certificate() {
    let help = Command::new(BIN).arg("--help").output().unwrap();
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("sealed under a key held by coffre"));

    let dir = std::env::temp_dir().join(format!("hosted-store-test-{}", std::process::id()));
    let out = Command::new(BIN)
        .args([
            "--key",
            "k",
            "--ca",
            "/nonexistent/ca.pem",
            "--cert",
            "c",
            "--cert-key",
            "k",
        ])
        .arg("--storage")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("reading /nonexistent/ca.pem"), "{err}");
    assert!(!dir.exists(), "nothing is created before coffre is reached");
}
