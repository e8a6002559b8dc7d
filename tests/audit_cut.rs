//! Issue #15 (H3, L1, L9) with the real `coffre` binary: `coffre audit
//! verify` refuses a log cut from the front, an empty log, a log cut before
//! its first checkpoint, a non-canonical line and a log that does not reach
//! a pinned checkpoint; a refusal by alias is recorded under the key's id;
//! `coffre dev` refuses to start after `audit.log` is deleted.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::binary::{COFFRE, dev_command, run, run_json, start_dev};

/// `coffre audit verify FILE --public-key KEY EXTRA...`: (success, stdout,
/// stderr).
fn verify(file: &Path, key: &Path, extra: &[&str]) -> (bool, String, String) {
    let out = Command::new(COFFRE)
        .args(["audit", "verify"])
        .arg(file)
        .arg("--public-key")
        .arg(key)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write_lines(path: &Path, lines: &[&str]) -> PathBuf {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

/// A `coffre dev` log with two signed checkpoints, exported to
/// `out/export.log`: (its lines, the public key file, the file of a
/// checkpoint taken after the export, of a longer log).
fn exported_log(data: &Path, endpoint: &str, out: &Path) -> (Vec<String>, PathBuf, PathBuf) {
    for alias in ["cut/one", "cut/two"] {
        let (ok, _, err) = run(data, endpoint, &["key", "create", "--alias", alias]);
        assert!(ok, "{err}");
    }
    let first = run(data, endpoint, &["audit", "checkpoint", "--json"]);
    assert!(first.0, "{}", first.2);
    for _ in 0..3 {
        let (ok, _, err) = run(data, endpoint, &["datakey", "generate", "--key", "cut/one"]);
        assert!(ok, "{err}");
    }
    let log = out.join("export.log");
    let key = out.join("audit-public-key.pem");
    let (ok, _, err) = run(
        data,
        endpoint,
        &[
            "audit",
            "export",
            "--out",
            log.to_str().unwrap(),
            "--public-key-out",
            key.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    let last = run(data, endpoint, &["audit", "checkpoint", "--json"]);
    assert!(last.0, "{}", last.2);
    let last_file = out.join("last-checkpoint.json");
    std::fs::write(&last_file, &last.1).unwrap();
    let lines: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    (lines, key, last_file)
}

#[test]
fn verify_refuses_cut_empty_unsigned_and_non_canonical_logs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (guard, endpoint) = start_dev(&data);
    let (lines, key, last_checkpoint) = exported_log(&data, &endpoint, dir.path());
    drop(guard);
    let full = dir.path().join("export.log");
    let checkpoints: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].starts_with("{\"checkpoint\""))
        .collect();
    assert!(checkpoints.len() >= 2, "{lines:?}");
    let records = lines.len() - checkpoints.len();

    // The whole export verifies, and says from which seq to which.
    let (ok, stdout, stderr) = verify(&full, &key, &[]);
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("OK: {records} records (seq 1 to {records})")),
        "{stdout}"
    );
    assert!(stdout.contains("fingerprint (SHA-256) "), "{stdout}");
    let json = verify(&full, &key, &["--json"]);
    let report: serde_json::Value = serde_json::from_str(&json.1).unwrap();
    assert_eq!(report["first_seq"], 1);
    assert_eq!(report["last_seq"], records);
    assert!(report["log_id"].is_string(), "{report}");

    // Cut from the front at the first checkpoint: the records before it
    // (the key creations) are gone. Refused, unless anchored logs are
    // accepted; then the anchor is named.
    let first_cp = checkpoints[0];
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let front = write_lines(&dir.path().join("front.log"), &refs[first_cp..]);
    let (ok, stdout, stderr) = verify(&front, &key, &[]);
    assert!(!ok, "a front-cut log must not verify: {stdout}");
    assert!(stderr.contains("does not start at seq 1"), "{stderr}");
    let (ok, stdout, stderr) = verify(&front, &key, &["--allow-anchored"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!(
            "anchored: the log starts from the checkpoint at seq {first_cp}"
        )),
        "{stdout}"
    );

    // Empty.
    let empty = write_lines(&dir.path().join("empty.log"), &[]);
    let (ok, stdout, stderr) = verify(&empty, &key, &[]);
    assert!(!ok, "an empty log must not verify: {stdout}");
    assert!(stderr.contains("no record"), "{stderr}");

    // Cut before its first checkpoint: nothing signed.
    let unsigned = write_lines(&dir.path().join("unsigned.log"), &refs[..first_cp]);
    let (ok, stdout, stderr) = verify(&unsigned, &key, &[]);
    assert!(!ok, "an unsigned log must not verify: {stdout}");
    assert!(stderr.contains("no signed checkpoint"), "{stderr}");
    // A long unsigned tail.
    let tail = write_lines(
        &dir.path().join("tail.log"),
        &refs[..checkpoints[checkpoints.len() - 1]],
    );
    let (ok, stdout, _) = verify(&tail, &key, &["--max-unsigned", "0"]);
    assert!(!ok, "{stdout}");

    // Lines that are not their record's canonical encoding.
    let line = refs[1];
    let variants = [
        (
            "a duplicate key",
            line.replacen(
                "\"principal\":",
                "\"principal\":\"spiffe://coffre.dev/innocent\",\"principal\":",
                1,
            ),
        ),
        (
            "extra whitespace",
            line.replacen("\"seq\":2,", "\"seq\": 2,", 1),
        ),
        (
            "reordered fields",
            line.replacen("{\"seq\":2,\"time\":", "{\"time\":", 1)
                .replacen(",\"request_id\"", ",\"seq\":2,\"request_id\"", 1),
        ),
    ];
    for (what, edited) in variants {
        assert_ne!(edited, line, "{what}");
        let mut tampered = refs.clone();
        tampered[1] = &edited;
        let file = write_lines(&dir.path().join("tampered.log"), &tampered);
        let (ok, stdout, stderr) = verify(&file, &key, &[]);
        assert!(!ok, "{what} must not verify: {stdout}");
        assert!(stderr.contains("line 2"), "{what}: {stderr}");
    }

    // A checkpoint kept from the longer log, against the log cut after its
    // first checkpoint: refused; against the whole export: fine.
    let cut = write_lines(&dir.path().join("cut.log"), &refs[..=first_cp]);
    let pin = last_checkpoint.to_str().unwrap();
    let (ok, stdout, stderr) = verify(&cut, &key, &["--checkpoint", pin]);
    assert!(
        !ok,
        "a log that does not reach the pinned checkpoint: {stdout}"
    );
    assert!(stderr.contains("before the known checkpoint"), "{stderr}");
    let (ok, _, stderr) = verify(&cut, &key, &[]);
    assert!(ok, "the cut log alone is a valid prefix: {stderr}");
}

#[test]
fn a_refusal_by_alias_is_recorded_under_the_key_id() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (_guard, endpoint) = start_dev(data);
    let key = run_json(data, &endpoint, &["key", "create", "--alias", "named"]);
    let id = key["key_id"].as_str().unwrap().to_string();
    // Refused by the key's policy (a foreign authority's demand), and by
    // role (an operator may not use data keys): both before the request
    // resolved the alias.
    let refusals = [
        vec![
            "datakey",
            "generate",
            "--key",
            "named",
            "--justification",
            "third-party-data-request",
        ],
        vec!["datakey", "generate", "--key", "named", "--as", "operator"],
    ];
    for args in &refusals {
        let (ok, _, _) = run(data, &endpoint, args);
        assert!(!ok, "{args:?} must be refused");
    }
    let events = run_json(
        data,
        &endpoint,
        &["audit", "events", "--key", &id, "--outcome", "refused"],
    );
    let events = events["events"].as_array().unwrap();
    assert_eq!(events.len(), 2, "{events:?}");
    for e in events {
        assert_eq!(e["key_id"], id.as_str(), "{e}");
        assert_eq!(e["key_name"], "named", "{e}");
        assert_eq!(e["operation"], "GenerateDataKey", "{e}");
    }
    // A request by the id itself carries no key_name.
    let (ok, _, _) = run(
        data,
        &endpoint,
        &["datakey", "generate", "--key", &id, "--as", "operator"],
    );
    assert!(!ok);
    let events = run_json(
        data,
        &endpoint,
        &["audit", "events", "--key", &id, "--outcome", "refused"],
    );
    let last = events["events"].as_array().unwrap().last().unwrap().clone();
    assert!(last.get("key_name").is_none(), "{last}");
}

/// Runs `coffre dev` on `data` until it prints its banner (it started) or
/// exits (refused): (started, its standard error so far).
fn try_start_dev(data: &Path, extra: &[&str]) -> (bool, String) {
    let mut cmd = dev_command(data);
    cmd.args(extra);
    let err = data.join("../dev-stderr.txt");
    let mut child = cmd
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.starts_with("coffre dev is running on ") {
                let _ = tx.send(());
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let started = loop {
        if rx.recv_timeout(Duration::from_millis(100)).is_ok() {
            break true;
        }
        if child.try_wait().unwrap().is_some() {
            break false;
        }
        assert!(
            Instant::now() < deadline,
            "coffre dev neither started nor exited"
        );
    };
    let _ = child.kill();
    let _ = child.wait();
    (started, std::fs::read_to_string(&err).unwrap_or_default())
}

#[test]
fn coffre_dev_refuses_to_start_after_its_audit_log_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    {
        let (_guard, endpoint) = start_dev(&data);
        for alias in ["hw/one", "hw/two"] {
            let (ok, _, err) = run(&data, &endpoint, &["key", "create", "--alias", alias]);
            assert!(ok, "{err}");
            let (ok, _, err) = run(&data, &endpoint, &["audit", "checkpoint"]);
            assert!(ok, "{err}");
        }
    }
    // Intact: it starts again.
    let (started, stderr) = try_start_dev(&data, &[]);
    assert!(started, "{stderr}");
    // Deleted: a new chain would start silently; it refuses instead, and
    // says what to do if the log cannot be restored.
    let log = data.join("audit.log");
    std::fs::remove_file(&log).unwrap();
    let (started, stderr) = try_start_dev(&data, &[]);
    assert!(!started, "coffre dev started on a deleted audit log");
    assert!(stderr.contains("is behind the last checkpoint"), "{stderr}");
    assert!(stderr.contains("restore"), "{stderr}");
    assert!(stderr.contains("--accept-audit-log-loss"), "{stderr}");
    assert!(!log.exists() || std::fs::read(&log).unwrap().is_empty());

    // Truly lost: the operator accepts the loss for one start. The new log
    // begins with the record of that decision, naming the lost checkpoint,
    // and is signed at once (the process is killed right after its banner).
    let (started, stderr) = try_start_dev(&data, &["--accept-audit-log-loss"]);
    assert!(started, "{stderr}");
    let text = std::fs::read_to_string(&log).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["seq"], 1, "{first}");
    assert_eq!(first["operation"], "AcceptAuditLogLoss", "{first}");
    assert_eq!(first["principal"], "coffre/operator-override", "{first}");
    let detail = first["detail"].as_str().unwrap();
    assert!(detail.contains("checkpoint at seq "), "{detail}");
    let (ok, out, err) = verify(&log, &data.join("audit-public-key.pem"), &[]);
    assert!(ok, "{out}{err}");
    // The mark now follows the new log: the next start needs no flag.
    let (started, stderr) = try_start_dev(&data, &[]);
    assert!(started, "{stderr}");
    // The flag was one start's decision: a second loss is refused again.
    std::fs::remove_file(&log).unwrap();
    let (started, stderr) = try_start_dev(&data, &[]);
    assert!(!started, "{stderr}");
}
