//! The real `hsm-sim` binary: serve on port 0, talk to it over gRPC, drive
//! it with `hsm-sim fault` and `hsm-sim info`, stop it with SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};

use hsm_sim::proto::hsm_client::HsmClient;
use hsm_sim::proto::*;
use tonic::Code;

use crate::PIN;

const BIN: &str = env!("CARGO_BIN_EXE_hsm-sim");

/// Kills the child if a test fails half-way.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cli(args: &[&str]) -> Output {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "hsm-sim {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn spawn(state: &std::path::Path, extra: &[&str]) -> (Guard, String) {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--state"])
        .arg(state)
        .args(["--label", "bin-test"])
        .args(extra)
        .env("HSM_SIM_PIN", PIN)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("hsm-sim listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "{addr}"
    );
    (Guard(child), addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_and_obeys_fault_cli() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("bin.state");
    let (mut guard, addr) = spawn(&state, &["--allow-fault-injection"]);
    let url = format!("http://{addr}");

    let mut hsm = HsmClient::connect(url.clone()).await.unwrap();
    let session = hsm
        .login(LoginRequest { pin: PIN.into() })
        .await
        .unwrap()
        .into_inner()
        .session;
    let wrap = |hsm: &mut HsmClient<_>| {
        let mut hsm: HsmClient<tonic::transport::Channel> = hsm.clone();
        let session = session.clone();
        async move {
            hsm.wrap(WrapRequest {
                session,
                plaintext: b"via binary".to_vec(),
                aad: b"a".to_vec(),
            })
            .await
        }
    };
    let w = wrap(&mut hsm).await.unwrap().into_inner();
    let pt = hsm
        .unwrap(UnwrapRequest {
            session: session.clone(),
            wrapped: w.wrapped,
            aad: b"a".to_vec(),
        })
        .await
        .unwrap()
        .into_inner()
        .plaintext;
    assert_eq!(pt, b"via binary");

    // Outage through the CLI (endpoint without scheme works too).
    cli(&["fault", "--endpoint", &url, "set", "--outage"]);
    assert_eq!(wrap(&mut hsm).await.unwrap_err().code(), Code::Unavailable);
    let out = cli(&["fault", "--endpoint", &addr, "show", "--json"]);
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["outage"], true);
    assert_eq!(shown["tampered"], false);

    cli(&["fault", "--endpoint", &url, "set", "--error-rate", "1.0"]);
    assert_eq!(wrap(&mut hsm).await.unwrap_err().code(), Code::Unavailable);
    cli(&["fault", "--endpoint", &url, "clear"]);
    wrap(&mut hsm).await.unwrap();

    let out = cli(&["info", "--endpoint", &url, "--json"]);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["label"], "bin-test");
    assert_eq!(info["current_root_key_id"], 1);
    assert_eq!(info["root_key_ids"], serde_json::json!([1]));

    // A bad error rate is refused by the CLI.
    let out = Command::new(BIN)
        .args(["fault", "--endpoint", &url, "set", "--error-rate", "3"])
        .output()
        .unwrap();
    assert!(!out.status.success());

    cli(&["fault", "--endpoint", &url, "tamper"]);
    let err = wrap(&mut hsm).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        hsm_sim::status::reason(&err),
        Some(hsm_sim::status::Reason::Tampered)
    );

    // Graceful shutdown on SIGTERM.
    drop(hsm);
    let pid = guard.0.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    let status = guard.0.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
}

/// A listener beyond loopback is refused, with the trust model, before the
/// token is opened or created; `--allow-non-loopback` accepts it. Before the
/// fix hsm-sim only warned and served.
#[test]
fn serve_refuses_a_non_loopback_listener_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s");
    let mut refused = Command::new(BIN)
        .args(["serve", "--listen", "0.0.0.0:0", "--state"])
        .arg(&state)
        .env("HSM_SIM_PIN", PIN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Had it served (the old behaviour) its first stdout line would be
    // "hsm-sim listening on …"; refused, stdout closes at once.
    let stdout = refused.stdout.take().unwrap();
    let mut stderr_pipe = refused.stderr.take().unwrap();
    let mut guard = Guard(refused);
    let mut first = String::new();
    BufReader::new(stdout).read_line(&mut first).unwrap();
    assert_eq!(first, "", "it never listened");
    assert!(!guard.0.wait().unwrap().success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut stderr_pipe, &mut stderr).unwrap();
    for said in [
        "0.0.0.0:0",
        "plain gRPC",
        "tests only",
        "--allow-non-loopback",
    ] {
        assert!(stderr.contains(said), "{said:?} in {stderr}");
    }
    assert!(!state.exists(), "nothing changed");

    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--allow-non-loopback",
            "--state",
        ])
        .arg(&state)
        .env("HSM_SIM_PIN", PIN)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let guard = Guard(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    assert!(
        line.starts_with("hsm-sim listening on 0.0.0.0:"),
        "{line:?}"
    );
    drop(guard);
}

#[test]
fn serve_without_pin_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--state"])
        .arg(dir.path().join("s"))
        .env_remove("HSM_SIM_PIN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("HSM_SIM_PIN"), "{stderr}");
    assert!(out.stdout.is_empty());
    assert!(!dir.path().join("s").exists());
}

#[test]
fn serve_with_wrong_pin_file_fails() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s");
    hsm_sim::Simulator::open(&state, PIN, "x").unwrap();
    let pin_file = dir.path().join("pin");
    std::fs::write(&pin_file, "wrong\n").unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--state"])
        .arg(&state)
        .arg("--pin-file")
        .arg(&pin_file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("wrong PIN"), "{stderr}");
}

#[test]
fn fault_cli_is_refused_without_allow_fault_injection() {
    let dir = tempfile::tempdir().unwrap();
    let (_guard, addr) = spawn(&dir.path().join("s"), &[]);
    for args in [
        &["tamper"][..],
        &["set", "--outage"],
        &["clear"],
        &["show", "--json"],
    ] {
        let out = Command::new(BIN)
            .args(["fault", "--endpoint", &addr])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "hsm-sim fault {args:?} succeeded");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(
                "fault injection is disabled; start hsm-sim with --allow-fault-injection"
            ),
            "{stderr}"
        );
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    let out = cli(&["info", "--endpoint", &addr, "--json"]);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["tampered"], false);
    assert_eq!(info["root_key_ids"], serde_json::json!([1]));
}

#[test]
fn serve_help_documents_allow_fault_injection() {
    let out = cli(&["serve", "--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--allow-fault-injection"), "{help}");
}

fn serve_with_pin_file(dir: &std::path::Path, pin: &[u8]) -> Output {
    let pin_file = dir.join("pin");
    std::fs::write(&pin_file, pin).unwrap();
    Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--state"])
        .arg(dir.join("s"))
        .arg("--pin-file")
        .arg(&pin_file)
        .output()
        .unwrap()
}

#[test]
fn pin_file_must_be_small_utf8() {
    let dir = tempfile::tempdir().unwrap();
    let out = serve_with_pin_file(dir.path(), b"\xff\xfe1234\n");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not UTF-8"), "{stderr}");

    let out = serve_with_pin_file(dir.path(), &vec![b'1'; 5000]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("larger than 4096 bytes"), "{stderr}");
    assert!(!dir.path().join("s").exists());
}
