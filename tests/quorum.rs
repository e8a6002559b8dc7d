//! Quorum with the real binaries: `coffre dev --quorum 2` issues a second
//! operator certificate; a sensitive command is held until another operator
//! approves it.

use crate::common::binary::{run, run_json, start_dev_with};

#[test]
fn two_person_rule_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (_server, endpoint) = start_dev_with(data, &["--quorum", "2"]);
    for f in [
        "operator.pem",
        "operator-key.pem",
        "operator-2.pem",
        "operator-2-key.pem",
    ] {
        assert!(data.join("pki").join(f).is_file(), "pki/{f}");
    }
    run_json(data, &endpoint, &["key", "create", "--alias", "q"]);

    // Held: the key does not change yet.
    let held = run_json(
        data,
        &endpoint,
        &["key", "schedule-deletion", "q", "--days", "7"],
    );
    let id = held["pending_approval_id"].as_str().unwrap().to_string();
    assert_eq!(
        run_json(data, &endpoint, &["key", "show", "q"])["state"],
        "ENABLED"
    );
    let (ok, stdout, _) = run(data, &endpoint, &["key", "schedule-deletion", "q"]);
    assert!(ok && stdout.contains("coffre approval approve"), "{stdout}");

    let listed = run_json(data, &endpoint, &["approval", "list"]);
    assert_eq!(listed["approvals"].as_array().unwrap().len(), 2);
    // The table shows the digest's prefix; `show` the change and the digest.
    let (ok, table, _) = run(data, &endpoint, &["approval", "list"]);
    assert!(ok && table.contains("DIGEST"), "{table}");
    let shown = run_json(data, &endpoint, &["approval", "show", &id]);
    let digest = shown["operation_sha256"].as_str().unwrap().to_string();
    assert_eq!(digest.len(), 64, "{shown}");
    assert!(table.contains(&digest[..12]), "{table}");
    let (ok, text, _) = run(data, &endpoint, &["approval", "show", &id]);
    assert!(
        ok && text.contains("ENABLED → PENDING_DELETION") && text.contains(&digest),
        "{text}"
    );

    // Without --digest and without a terminal: refused, saying why.
    let (ok, _, stderr) = run(
        data,
        &endpoint,
        &["approval", "approve", &id, "--as", "operator-2"],
    );
    assert!(!ok && stderr.contains("--digest is required"), "{stderr}");
    // The proposer cannot approve their own request.
    let (ok, _, stderr) = run(
        data,
        &endpoint,
        &["approval", "approve", &id, "--digest", &digest],
    );
    assert!(!ok && stderr.contains("already approved"), "{stderr}");
    // A second operator can; the operation runs.
    let approved = run_json(
        data,
        &endpoint,
        &[
            "approval",
            "approve",
            &id,
            "--digest",
            &digest,
            "--as",
            "operator-2",
        ],
    );
    assert_eq!(approved["approvals"][0]["status"], "EXECUTED", "{approved}");
    assert_eq!(
        run_json(data, &endpoint, &["key", "show", "q"])["state"],
        "PENDING_DELETION"
    );

    // The other proposal is rejected and never runs.
    let other = listed["approvals"][1]["approval_id"]
        .as_str()
        .unwrap()
        .to_string();
    let rejected = run_json(
        data,
        &endpoint,
        &["approval", "reject", &other, "--as", "operator-2"],
    );
    assert_eq!(rejected["approvals"][0]["status"], "REJECTED");
    let other_digest = listed["approvals"][1]["operation_sha256"]
        .as_str()
        .unwrap()
        .to_string();
    let (ok, _, stderr) = run(
        data,
        &endpoint,
        &[
            "approval",
            "approve",
            &other,
            "--digest",
            &other_digest,
            "--as",
            "operator-2",
        ],
    );
    assert!(
        !ok && (stderr.contains("REJECTED") || stderr.contains("Rejected")),
        "{stderr}"
    );

    // A service may not see approvals.
    let (ok, _, stderr) = run(data, &endpoint, &["approval", "list", "--as", "service"]);
    assert!(!ok && stderr.contains("permission denied"), "{stderr}");
}
