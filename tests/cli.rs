//! The README walkthrough, with the real binary: `coffre dev` in its own
//! process and the CLI commands against it, parsing their `--json` output.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const COFFRE: &str = env!("CARGO_BIN_EXE_coffre");

/// A child process killed when dropped.
#[derive(Debug)]
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `coffre dev` on port 0 and reads its address from the banner.
pub fn start_dev(dir: &Path) -> (Guard, String) {
    start_dev_with(dir, &[])
}

pub fn start_dev_with(dir: &Path, extra: &[&str]) -> (Guard, String) {
    let mut cmd = dev_command(dir);
    cmd.args(extra)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::inherit());
    spawn_dev(cmd)
}

/// `coffre dev --listen 127.0.0.1:0 --data-dir DIR`, to add to.
pub fn dev_command(dir: &Path) -> Command {
    let mut cmd = Command::new(COFFRE);
    cmd.args(["dev", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir);
    cmd
}

/// Spawns a `coffre dev` command and reads its address from the banner.
pub fn spawn_dev(mut cmd: Command) -> (Guard, String) {
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let guard = Guard(child);
    let mut lines = BufReader::new(stdout).lines();
    let deadline = Instant::now() + Duration::from_secs(60);
    let endpoint = loop {
        assert!(Instant::now() < deadline, "coffre dev did not start");
        let line = lines.next().expect("coffre dev exited").unwrap();
        if let Some(rest) = line.strip_prefix("coffre dev is running on ") {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    // Keep draining stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (guard, endpoint)
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

/// Runs a client command; returns (success, stdout, stderr).
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

pub fn run_json(dir: &Path, endpoint: &str, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let (ok, stdout, stderr) = run(dir, endpoint, &all);
    assert!(ok, "coffre {args:?} failed: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

#[test]
fn readme_walkthrough_with_the_real_binaries() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (server, endpoint) = start_dev(data);
    for f in [
        "ca.pem",
        "server.pem",
        "server-key.pem",
        "operator.pem",
        "operator-key.pem",
        "service.pem",
        "service-key.pem",
        "auditor.pem",
        "auditor-key.pem",
    ] {
        assert!(data.join("pki").join(f).is_file(), "pki/{f}");
    }

    let key = run_json(
        data,
        &endpoint,
        &[
            "key",
            "create",
            "--alias",
            "demo",
            "--description",
            "walkthrough",
        ],
    );
    assert_eq!(key["alias"], "demo");
    assert_eq!(key["state"], "ENABLED");
    let key_id = key["key_id"].as_str().unwrap().to_string();

    let dk = run_json(
        data,
        &endpoint,
        &[
            "datakey",
            "generate",
            "--key",
            "demo",
            "--context",
            "tenant=acme",
        ],
    );
    assert_eq!(dk["key_id"], key_id.as_str());
    let plaintext = dk["plaintext"].as_str().unwrap().to_string();
    let blob = dk["ciphertext_blob"].as_str().unwrap().to_string();

    let opened = run_json(
        data,
        &endpoint,
        &["decrypt", "--blob", &blob, "--context", "tenant=acme"],
    );
    assert_eq!(opened["plaintext"], plaintext.as_str());
    assert_eq!(opened["key_version"], 1);

    // A batch of data keys in one request; each opens alone.
    let batch = run_json(
        data,
        &endpoint,
        &[
            "datakey",
            "generate",
            "--key",
            "demo",
            "--context",
            "tenant=acme",
            "--count",
            "3",
        ],
    );
    assert_eq!(batch["key_id"], key_id.as_str());
    let keys = batch["data_keys"].as_array().unwrap();
    assert_eq!(keys.len(), 3);
    let last = &keys[2];
    let opened = run_json(
        data,
        &endpoint,
        &[
            "decrypt",
            "--blob",
            last["ciphertext_blob"].as_str().unwrap(),
            "--context",
            "tenant=acme",
        ],
    );
    assert_eq!(opened["plaintext"], last["plaintext"]);

    let rotated = run_json(data, &endpoint, &["key", "rotate", "demo"]);
    assert_eq!(rotated["primary_version"], 2);
    let opened = run_json(
        data,
        &endpoint,
        &["decrypt", "--blob", &blob, "--context", "tenant=acme"],
    );
    assert_eq!(
        opened["plaintext"],
        plaintext.as_str(),
        "the old blob still decrypts"
    );

    let shown = run_json(data, &endpoint, &["key", "show", "demo"]);
    assert_eq!(shown["versions"].as_array().unwrap().len(), 2);
    let listed = run_json(data, &endpoint, &["key", "list"]);
    assert_eq!(listed["keys"].as_array().unwrap().len(), 1);

    // encrypt / decrypt a small secret through files.
    let secret_path = data.join("secret.txt");
    std::fs::write(&secret_path, b"database password").unwrap();
    let blob_path = data.join("secret.blob");
    let (ok, _, stderr) = run(
        data,
        &endpoint,
        &[
            "encrypt",
            "--key",
            "demo",
            "--in",
            secret_path.to_str().unwrap(),
            "--out",
            blob_path.to_str().unwrap(),
        ],
    );
    assert!(ok, "{stderr}");
    let out_path = data.join("secret.out");
    let (ok, _, stderr) = run(
        data,
        &endpoint,
        &[
            "decrypt",
            "--in",
            blob_path.to_str().unwrap(),
            "--out",
            out_path.to_str().unwrap(),
        ],
    );
    assert!(ok, "{stderr}");
    assert_eq!(std::fs::read(&out_path).unwrap(), b"database password");

    // People get tables; errors are clear and exit non-zero.
    let (ok, stdout, _) = run(data, &endpoint, &["key", "list"]);
    assert!(ok);
    assert!(
        stdout.contains("KEY ID") && stdout.contains("demo"),
        "{stdout}"
    );
    let (ok, _, stderr) = run(
        data,
        &endpoint,
        &["decrypt", "--blob", &blob, "--context", "tenant=evil"],
    );
    assert!(!ok);
    assert!(stderr.contains("invalid argument"), "{stderr}");
    let (ok, _, stderr) = run(data, &endpoint, &["key", "show", "missing"]);
    assert!(!ok);
    assert!(stderr.contains("not found"), "{stderr}");
    let (ok, _, stderr) = run(
        data,
        &endpoint,
        &["key", "disable", "demo", "--as", "service"],
    );
    assert!(!ok);
    assert!(stderr.contains("permission denied"), "{stderr}");

    // Restart with the same directory: the key and its versions are there.
    drop(server);
    let (_server, endpoint) = start_dev(data);
    let opened = run_json(
        data,
        &endpoint,
        &["decrypt", "--blob", &blob, "--context", "tenant=acme"],
    );
    assert_eq!(opened["plaintext"], plaintext.as_str());
    let shown = run_json(data, &endpoint, &["key", "show", &key_id]);
    assert_eq!(shown["primary_version"], 2);
}

/// `coffre dev --preload-keys N` (two store writes here), then `coffre bench
/// --existing-keys`: every key is listed, each has its `CreateKey` audit
/// record, and the bench runs on them without an error.
#[test]
fn dev_preloads_audited_keys_that_the_bench_uses() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let count = coffre::cli::PRELOAD_CHUNK + 3;
    let (guard, endpoint) = start_dev_with(data, &["--preload-keys", &count.to_string()]);

    let listed = run_json(data, &endpoint, &["key", "list", "--all"]);
    let keys = listed["keys"].as_array().unwrap();
    assert_eq!(keys.len(), count);
    let ids: std::collections::BTreeSet<&str> =
        keys.iter().map(|k| k["key_id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), count, "distinct ids");
    for key in [&keys[0], &keys[count / 2], &keys[count - 1]] {
        assert_eq!(key["state"], "ENABLED", "{key}");
        let id = key["key_id"].as_str().unwrap();
        let events = run_json(data, &endpoint, &["audit", "events", "--key", id]);
        let events = events["events"].as_array().unwrap();
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0]["operation"], "CreateKey");
        assert_eq!(events[0]["detail"], "preloaded by coffre dev");
        assert_eq!(events[0]["status_code"], "OK");
    }

    let bench = Command::new(COFFRE)
        .args([
            "bench",
            "--ops",
            "decrypt",
            "--existing-keys",
            "20",
            "--blobs",
            "40",
            "--duration",
            "300ms",
            "--warmup",
            "100ms",
            "--concurrency",
            "4",
            "--connections",
            "1",
            "--json",
            "--endpoint",
            &endpoint,
            "--data-dir",
        ])
        .arg(data)
        .output()
        .unwrap();
    assert!(
        bench.status.success(),
        "{}",
        String::from_utf8_lossy(&bench.stderr)
    );
    let row: Value = serde_json::from_slice(&bench.stdout).unwrap();
    assert_eq!(row["errors"], 0, "{row}");
    assert!(row["requests"].as_u64().unwrap() > 0, "{row}");

    // More keys than the store holds: a clear error, not a silent shortfall.
    let (ok, _, stderr) = run(
        data,
        &endpoint,
        &[
            "bench",
            "--ops",
            "decrypt",
            "--existing-keys",
            "6000",
            "--duration",
            "100ms",
        ],
    );
    assert!(!ok);
    assert!(
        stderr.contains(&format!("lists {count} enabled keys, not 6000")),
        "{stderr}"
    );
    drop(guard);
}

/// `coffre key create --protection-level hsm` on `coffre dev` (the
/// in-process simulator holds the CMK), then data keys through the CLI.
#[test]
fn a_key_held_by_the_hsm_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (_server, endpoint) = start_dev(data);
    let key = run_json(
        data,
        &endpoint,
        &[
            "key",
            "create",
            "--alias",
            "vault",
            "--protection-level",
            "hsm",
        ],
    );
    assert_eq!(key["protection_level"], "HSM");
    let dk = run_json(
        data,
        &endpoint,
        &[
            "datakey",
            "generate",
            "--key",
            "vault",
            "--context",
            "tenant=acme",
        ],
    );
    let blob = dk["ciphertext_blob"].as_str().unwrap().to_string();
    let opened = run_json(
        data,
        &endpoint,
        &["decrypt", "--blob", &blob, "--context", "tenant=acme"],
    );
    assert_eq!(opened["plaintext"], dk["plaintext"]);
    let (ok, _, stderr) = run(
        data,
        &endpoint,
        &["decrypt", "--blob", &blob, "--context", "tenant=other"],
    );
    assert!(!ok);
    assert!(
        stderr.contains("InvalidArgument") || stderr.contains("invalid"),
        "{stderr}"
    );
    let (ok, _, stderr) = run(
        data,
        &endpoint,
        &["key", "create", "--protection-level", "vault"],
    );
    assert!(!ok, "an unknown protection level is refused");
    assert!(
        stderr.contains("software") && stderr.contains("hsm"),
        "{stderr}"
    );
}
