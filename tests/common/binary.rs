//! Drivers of the real binaries, each in its own process: `coffre dev` on
//! port 0 (its address read from its banner), the CLI's client commands and
//! their `--json` output, `coffre audit export` then `verify`, and
//! `hsm-sim serve`. Every child is held by a [`Guard`] that kills it when
//! dropped.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `coffre` binary under test (Cargo builds it for the test binary).
pub const COFFRE: &str = env!("CARGO_BIN_EXE_coffre");

/// The PIN of the simulator processes [`start_hsm`] starts, which a
/// `coffre serve` talking to them is given as `COFFRE_HSM_PIN`.
pub const HSM_PIN: &str = "process-test-pin-1234";

/// The first line `coffre dev` prints, followed by its endpoint.
const DEV_BANNER: &str = "coffre dev is running on ";

/// How long a process has to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A child process killed when dropped.
#[derive(Debug)]
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The path of a binary built by this workspace (coffre or hsm-sim), next to
/// the test executable's directory (target/<profile>/).
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build it first (`cargo test` at the workspace root builds every member; \
         or `cargo build -p {name}`)",
        path.display()
    );
    path
}

pub use super::ports::free_port;

/// Runs `cmd` with `stdin` written from a thread (the output may be larger
/// than a pipe holds while the input is still being written); its output.
pub fn run_with_stdin(cmd: &mut Command, stdin: Vec<u8>) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

/// Starts a process and waits for the line starting with `ready_prefix` on
/// its stdout; the rest of that line, trimmed. Stdout is drained afterwards
/// so that the process never blocks on a full pipe; stderr is left as the
/// command has it (inherited unless set).
pub fn spawn_ready(mut cmd: Command, ready_prefix: &str) -> (Guard, String) {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let guard = Guard(child);
    let mut lines = BufReader::new(stdout).lines();
    let deadline = Instant::now() + READY_TIMEOUT;
    let rest = loop {
        assert!(
            Instant::now() < deadline,
            "{program} did not print {ready_prefix:?} within {READY_TIMEOUT:?}"
        );
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("{program} exited before printing {ready_prefix:?}"))
            .unwrap();
        if let Some(rest) = line.strip_prefix(ready_prefix) {
            break rest.trim().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (guard, rest)
}

/// `coffre dev --listen 127.0.0.1:0 --data-dir DIR`, to add to.
pub fn dev_command(dir: &Path) -> Command {
    let mut cmd = Command::new(COFFRE);
    cmd.args(["dev", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir);
    cmd
}

/// Spawns a `coffre dev` command; the endpoint its banner names.
pub fn spawn_dev(cmd: Command) -> (Guard, String) {
    let (guard, banner) = spawn_ready(cmd, DEV_BANNER);
    let endpoint = banner.split_whitespace().next().unwrap().to_string();
    (guard, endpoint)
}

/// Starts `coffre dev` on `dir` (warnings on stderr); its endpoint.
pub fn start_dev(dir: &Path) -> (Guard, String) {
    start_dev_with(dir, &[])
}

/// [`start_dev`] with `extra` arguments.
pub fn start_dev_with(dir: &Path, extra: &[&str]) -> (Guard, String) {
    let mut cmd = dev_command(dir);
    cmd.args(extra)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::inherit());
    spawn_dev(cmd)
}

/// Runs a client command against `endpoint` with the certificates of
/// `dir/pki`; returns (success, stdout, stderr).
pub fn run(dir: &Path, endpoint: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(COFFRE)
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .args(["--endpoint", endpoint])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// [`run`] with `--json`, which must succeed; its output, parsed.
pub fn run_json(dir: &Path, endpoint: &str, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let (ok, stdout, stderr) = run(dir, endpoint, &all);
    assert!(ok, "coffre {args:?} failed: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// `coffre audit export` (which checks what it received against a fresh
/// signed checkpoint) into the parent of `data`, then `coffre audit verify`
/// on the exported file.
pub fn export_and_verify(data: &Path, endpoint: &str) {
    let out = data.join("../export.log");
    let key = data.join("../audit-public-key.pem");
    let export = Command::new(COFFRE)
        .args(["audit", "export", "--out"])
        .arg(&out)
        .arg("--public-key-out")
        .arg(&key)
        .args(["--endpoint", endpoint, "--data-dir"])
        .arg(data)
        .output()
        .unwrap();
    assert!(
        export.status.success(),
        "audit export: {}",
        String::from_utf8_lossy(&export.stderr)
    );
    let verify = Command::new(COFFRE)
        .args(["audit", "verify"])
        .arg(&out)
        .arg("--public-key")
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "audit verify: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
}

/// `hsm-sim fault --endpoint http://127.0.0.1:PORT ARGS…` against a
/// simulator [`start_hsm`] started (e.g. `["set", "--outage"]`, `["clear"]`).
pub fn hsm_fault(port: u16, args: &[&str]) {
    let status = Command::new(workspace_binary("hsm-sim"))
        .args(["fault", "--endpoint", &format!("http://127.0.0.1:{port}")])
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "hsm-sim fault {args:?}");
}

/// Starts `hsm-sim serve` on `port` with its state in `state`, fault
/// injection allowed (for `hsm-sim fault`) and [`HSM_PIN`].
pub fn start_hsm(state: &Path, port: u16) -> Guard {
    let mut cmd = Command::new(workspace_binary("hsm-sim"));
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--state"])
        .arg(state)
        .arg("--allow-fault-injection")
        .env("HSM_SIM_PIN", HSM_PIN)
        .env("RUST_LOG", "warn");
    spawn_ready(cmd, "hsm-sim listening on ").0
}
