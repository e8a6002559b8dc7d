//! `coffre audit verify` with the real binary, on a log written by the audit
//! library: a clean log verifies; an edited one fails, naming the line.

use std::process::Command;

use coffre::audit::{
    AuditEntry, AuditLog, AuditLogOptions, CheckpointPolicy, CheckpointSigner, Outcome,
};

use crate::common::binary::COFFRE;

fn entry(i: u32) -> AuditEntry {
    AuditEntry {
        request_id: format!("req-{i}"),
        principal: "spiffe://coffre.dev/service".into(),
        role: Some("service".into()),
        operation: "GenerateDataKey".into(),
        key_id: Some("0d2b2bb1-8da6-42dc-8b48-8e80421a883d".into()),
        key_name: None,
        key_version: Some(1),
        context_digest: None,
        justification: Some("CUSTOMER_INITIATED_ACCESS".into()),
        context: None,
        detail: None,
        outcome: Outcome::Allowed,
        status_code: "OK".into(),
        items: None,
    }
}

fn verify(log: &std::path::Path, key: &std::path::Path) -> (bool, String, String) {
    let out = Command::new(COFFRE)
        .args(["audit", "verify"])
        .arg(log)
        .arg("--public-key")
        .arg(key)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn verify_a_clean_log_and_name_the_first_bad_record() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("audit.log");
    let (signer, _pkcs8) = CheckpointSigner::generate().unwrap();
    let pem = signer.public_key_pem();
    let key_path = dir.path().join("audit-public-key.pem");
    std::fs::write(&key_path, &pem).unwrap();
    {
        let mut log = AuditLog::open_with(
            &log_path,
            signer,
            AuditLogOptions {
                checkpoints: CheckpointPolicy {
                    every_records: 5,
                    every: std::time::Duration::from_secs(3600),
                },
                ..Default::default()
            },
        )
        .unwrap();
        for i in 0..12 {
            log.append(entry(i)).unwrap();
        }
    }
    let (ok, stdout, stderr) = verify(&log_path, &key_path);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("OK: 12 records"), "{stdout}");

    // Edit one record (its operation), as an insider with the file would.
    let text = std::fs::read_to_string(&log_path).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let target = lines.iter().position(|l| l.contains("\"req-3\"")).unwrap();
    lines[target] = lines[target].replace("GenerateDataKey", "Decrypt");
    let tampered = dir.path().join("tampered.log");
    std::fs::write(&tampered, lines.join("\n") + "\n").unwrap();
    let (ok, _, stderr) = verify(&tampered, &key_path);
    assert!(!ok, "an edited log must not verify");
    assert!(
        stderr.contains(&format!("line {}", target + 1)),
        "names the edited line {}: {stderr}",
        target + 1
    );

    // Another key does not verify the checkpoints.
    let (other, _) = CheckpointSigner::generate().unwrap();
    let other_key = dir.path().join("other.pem");
    std::fs::write(&other_key, other.public_key_pem()).unwrap();
    let (ok, _, stderr) = verify(&log_path, &other_key);
    assert!(!ok, "{stderr}");
}

/// The golden logs of every released format (tests/data/README.md) verify
/// with the binary; the anchored copies only with --allow-anchored.
#[test]
fn golden_logs_of_every_format_verify() {
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    for version in ["v1", "v2"] {
        let key = data.join(format!("audit-{version}-fixture-public-key.pem"));
        let (ok, stdout, stderr) = verify(&data.join(format!("audit-{version}.log")), &key);
        assert!(ok, "{version}: {stdout}{stderr}");
        assert!(stdout.contains("(seq 1 to "), "{version}: {stdout}");
        let log_id = if version == "v1" {
            "no log id"
        } else {
            "log id "
        };
        assert!(stdout.contains(log_id), "{version}: {stdout}");
        let anchored = data.join(format!("audit-{version}-anchored.log"));
        let (ok, _, stderr) = verify(&anchored, &key);
        assert!(
            !ok && stderr.contains("does not start at seq 1"),
            "{version}: {stderr}"
        );
        let out = Command::new(COFFRE)
            .args(["audit", "verify", "--allow-anchored", "--public-key"])
            .arg(&key)
            .arg(&anchored)
            .output()
            .unwrap();
        assert!(out.status.success(), "{version}: {out:?}");
    }
}
