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

    // The proposer cannot approve their own request.
    let (ok, _, stderr) = run(data, &endpoint, &["approval", "approve", &id]);
    assert!(!ok && stderr.contains("already approved"), "{stderr}");
    // A second operator can; the operation runs.
    let approved = run_json(
        data,
        &endpoint,
        &["approval", "approve", &id, "--as", "operator-2"],
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
    let (ok, _, stderr) = run(
        data,
        &endpoint,
        &["approval", "approve", &other, "--as", "operator-2"],
    );
    assert!(
        !ok && (stderr.contains("REJECTED") || stderr.contains("Rejected")),
        "{stderr}"
    );

    // A service may not see approvals.
    let (ok, _, stderr) = run(data, &endpoint, &["approval", "list", "--as", "service"]);
    assert!(!ok && stderr.contains("permission denied"), "{stderr}");
}
