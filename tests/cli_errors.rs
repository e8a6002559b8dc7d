//! Issue #16, errors a script or a user can act on, with the real `coffre`
//! binary: `--json` error objects and exit codes, the request id that leads
//! to the audit record, connection failures that say what to do, each
//! message once, periods echoed as given, the server's policy warnings,
//! policies in the proto's JSON names, and empty tables that say so.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::common::binary::{COFFRE, free_port, run, run_json, start_dev, start_dev_with};

const SERVICE: &str = "spiffe://coffre.dev/service";
const OPERATOR: &str = "spiffe://coffre.dev/operator";

/// A client command's exit code, stdout and stderr.
fn run_status(dir: &Path, endpoint: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(COFFRE)
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .args(["--endpoint", endpoint])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The `{"error": {...}}` object a failed `--json` command prints, whose
/// exit status must be `status`.
fn json_error(dir: &Path, endpoint: &str, args: &[&str], status: i32) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let (code, stdout, stderr) = run_status(dir, endpoint, &all);
    assert_eq!(code, Some(status), "coffre {args:?}: {stdout}{stderr}");
    let v: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {stdout:?}"));
    let error = v["error"].clone();
    assert!(error.is_object(), "{v}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    error
}

/// No part of a `: `-joined message appears twice.
fn assert_said_once(message: &str) {
    let parts: Vec<&str> = message.trim().split(": ").collect();
    for (i, p) in parts.iter().enumerate() {
        assert!(
            !parts[i + 1..]
                .iter()
                .any(|q| q.contains(p) || p.contains(q)),
            "{p:?} repeats in {message:?}"
        );
    }
}

/// The audit events of `principal`, as `coffre audit events --json` lists them.
fn events_of(data: &Path, endpoint: &str, principal: &str) -> Vec<Value> {
    let events = run_json(
        data,
        endpoint,
        &[
            "audit",
            "events",
            "--principal",
            principal,
            "--limit",
            "1000",
        ],
    );
    events["events"].as_array().unwrap().clone()
}

#[test]
fn errors_under_json_are_one_object_with_code_and_request_id() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (_server, endpoint) = start_dev(data);
    run_json(data, &endpoint, &["key", "create", "--alias", "errs"]);

    // A refusal by the server: its code, its message, its request id,
    // which the request's audit record holds.
    let denied = ["datakey", "generate", "--key", "errs", "--as", "operator"];
    let error = json_error(data, &endpoint, &denied, 1);
    assert_eq!(error["code"], "PERMISSION_DENIED", "{error}");
    let id = error["request_id"].as_str().unwrap().to_string();
    assert!(!id.is_empty());
    let events = events_of(data, &endpoint, OPERATOR);
    let record = events
        .iter()
        .find(|e| e["request_id"] == id.as_str())
        .unwrap_or_else(|| panic!("no audit record with request id {id}"));
    assert_eq!(record["operation"], "GenerateDataKey", "{record}");

    // The text form on stderr names the request id too, and it is the
    // id of an audit record.
    let (code, stdout, stderr) = run_status(data, &endpoint, &denied);
    assert_eq!(code, Some(1));
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.starts_with("error: permission denied: "), "{stderr}");
    let text_id = stderr
        .split("(request id ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap_or_else(|| panic!("no request id in {stderr:?}"))
        .to_string();
    assert_ne!(text_id, id, "every request has its own id");
    let events = events_of(data, &endpoint, OPERATOR);
    assert!(
        events
            .iter()
            .any(|e| e["request_id"] == text_id.as_str() && e["operation"] == "GenerateDataKey"),
        "no GenerateDataKey record with request id {text_id}"
    );

    // A NOT_FOUND keeps its code.
    let error = json_error(data, &endpoint, &["key", "show", "missing"], 1);
    assert_eq!(error["code"], "NOT_FOUND", "{error}");
    assert!(error["request_id"].is_string(), "{error}");

    // Nothing listens: UNAVAILABLE, no request id, and what to do.
    let nowhere = format!("https://127.0.0.1:{}", free_port());
    let error = json_error(data, &nowhere, &["key", "list"], 1);
    assert_eq!(error["code"], "UNAVAILABLE", "{error}");
    assert!(error["request_id"].is_null(), "{error}");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("is coffre running at {nowhere}?")),
        "{message}"
    );
    assert_said_once(message);

    // A bad flag value, refused before any call: INVALID_ARGUMENT, exit 2.
    let error = json_error(
        data,
        &endpoint,
        &["key", "create", "--rotation-period", "5x"],
        2,
    );
    assert_eq!(error["code"], "INVALID_ARGUMENT", "{error}");
    assert!(error["request_id"].is_null(), "{error}");
    // An unreadable policy file: INVALID_ARGUMENT too.
    let missing = data.join("no-such-policy.json");
    let error = json_error(
        data,
        &endpoint,
        &["key", "create", "--policy", missing.to_str().unwrap()],
        1,
    );
    assert_eq!(error["code"], "INVALID_ARGUMENT", "{error}");
    // The context the command added shows, in JSON and in text.
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("no-such-policy.json"),
        "{error}"
    );
}

#[test]
fn a_server_of_another_data_directory_is_named_with_what_to_do() {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    let (_server_a, endpoint_a) = start_dev(&a);
    // b's PKI, from a server started once and stopped.
    drop(start_dev(&b));

    let (code, _, stderr) = run_status(&b, &endpoint_a, &["key", "list"]);
    assert_eq!(code, Some(1), "{stderr}");
    let ca = b.join("pki").join("ca.pem");
    assert!(
        stderr.contains(&format!(
            "the server at {endpoint_a} presented a certificate not signed by {}",
            ca.display()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("--data-dir"), "{stderr}");
    assert!(stderr.contains("--endpoint"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert_said_once(stderr.trim().trim_start_matches("error: "));

    // The right CA but a client certificate of b's: the server refuses it.
    let cert = b.join("pki").join("operator.pem");
    let key = b.join("pki").join("operator-key.pem");
    let (code, _, stderr) = run_status(
        &a,
        &endpoint_a,
        &[
            "key",
            "list",
            "--cert",
            cert.to_str().unwrap(),
            "--cert-key",
            key.to_str().unwrap(),
        ],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "refused this client's certificate {}",
            cert.display()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("--cert"), "{stderr}");
    assert_said_once(stderr.trim().trim_start_matches("error: "));

    // Connection refused, in words, once.
    let nowhere = format!("https://127.0.0.1:{}", free_port());
    let (code, _, stderr) = run_status(&a, &nowhere, &["key", "list"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("is coffre running at {nowhere}?")),
        "{stderr}"
    );
    assert_said_once(stderr.trim().trim_start_matches("error: "));
}

#[test]
fn periods_are_echoed_in_the_units_given() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (_server, endpoint) = start_dev(data);

    let (ok, stdout, stderr) = run(
        data,
        &endpoint,
        &[
            "key",
            "create",
            "--alias",
            "p1",
            "--rotation-period",
            "2160h",
        ],
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("rotation          every 2160h"), "{stdout}");
    let key = run_json(
        data,
        &endpoint,
        &["key", "set-rotation", "p1", "--period", "13w"],
    );
    assert_eq!(key["rotation_period"], "13w", "{key}");
    assert_eq!(key["rotation_period_secs"], 13 * 7 * 86_400);

    let (ok, _, stderr) = run(
        data,
        &endpoint,
        &["key", "set-rotation", "p1", "--period", "20y"],
    );
    assert!(!ok);
    assert!(stderr.contains("--period 20y"), "{stderr}");
    assert!(stderr.contains("1 day to 10 years"), "{stderr}");
    assert!(!stderr.contains(" s"), "{stderr}");

    let (ok, stdout, stderr) = run(
        data,
        &endpoint,
        &["key", "schedule-deletion", "p1", "--days", "7"],
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("(in 7 days;"), "{stdout}");
}

/// A policy file in the proto's JSON spelling, granting `principal`.
fn proto_policy(dir: &Path, name: &str, principal: &str) -> String {
    let path = dir.join(name);
    let policy = serde_json::json!({
        "grants": [{
            "principal": principal,
            "operations": ["GENERATE_DATA_KEY", "DECRYPT"],
        }],
        "requiredContext": { "tenant": { "values": ["acme"] } },
        "acceptedReasons": ["CUSTOMER_INITIATED_ACCESS"],
    });
    std::fs::write(&path, policy.to_string()).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn policies_warn_of_unknown_principals_and_read_proto_names() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (_server, endpoint) = start_dev(data);
    let typo = "spiffe://coffre.dev/servcie";
    let good = proto_policy(dir.path(), "good.json", SERVICE);
    let bad = proto_policy(dir.path(), "bad.json", typo);

    // A known principal: no warning; the proto names were read.
    let (ok, stdout, stderr) = run(
        data,
        &endpoint,
        &["key", "create", "--alias", "w1", "--policy", &good],
    );
    assert!(ok, "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
    assert!(stdout.contains("w1"), "{stdout}");
    let (ok, shown, stderr) = run(data, &endpoint, &["key", "policy", "show", "w1"]);
    assert!(ok, "{stderr}");
    let shown: Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(
        shown["grants"][0]["operations"],
        serde_json::json!(["GenerateDataKey", "Decrypt"]),
        "{shown}"
    );
    assert_eq!(
        shown["accepted_reasons"],
        serde_json::json!(["CUSTOMER_INITIATED_ACCESS"])
    );
    assert_eq!(shown["required_context"]["tenant"]["values"][0], "acme");
    // The service may use it as granted.
    run_json(
        data,
        &endpoint,
        &[
            "datakey",
            "generate",
            "--key",
            "w1",
            "--context",
            "tenant=acme",
            "--justification",
            "customer-initiated-access",
        ],
    );

    // A typo: a warning on stderr naming it, and in the JSON answer.
    let (ok, _, stderr) = run(
        data,
        &endpoint,
        &["key", "policy", "set", "w1", "--file", &bad],
    );
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("warning:") && stderr.contains(typo) && stderr.contains("no role"),
        "{stderr}"
    );
    let key = run_json(
        data,
        &endpoint,
        &["key", "create", "--alias", "w2", "--policy", &bad],
    );
    let warnings = key["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 1, "{key}");
    assert!(warnings[0].as_str().unwrap().contains(typo), "{key}");
    let key = run_json(
        data,
        &endpoint,
        &["key", "policy", "set", "w2", "--file", &good],
    );
    assert!(key.get("warnings").is_none(), "{key}");
    // An operator's grant has no effect: said too.
    let operator = proto_policy(dir.path(), "operator.json", OPERATOR);
    let (ok, _, stderr) = run(
        data,
        &endpoint,
        &["key", "policy", "set", "w2", "--file", &operator],
    );
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("warning:") && stderr.contains("its role is operator"),
        "{stderr}"
    );
    // A context rule bound to an attribute the grantee lacks (the dev
    // service has tenant=acme, no region) refuses every request: said too.
    let bound = dir.path().join("bound.json");
    let policy = serde_json::json!({
        "grants": [{ "principal": SERVICE, "operations": ["Decrypt"] }],
        "required_context": { "region": { "equals_caller_attribute": "region" } },
    });
    std::fs::write(&bound, policy.to_string()).unwrap();
    let key = run_json(
        data,
        &endpoint,
        &[
            "key",
            "policy",
            "set",
            "w2",
            "--file",
            bound.to_str().unwrap(),
        ],
    );
    let warnings = key["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 1, "{key}");
    assert!(
        warnings[0]
            .as_str()
            .unwrap()
            .contains("has no attribute \"region\""),
        "{key}"
    );
}

#[test]
fn a_pending_policy_update_carries_its_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (_server, endpoint) = start_dev_with(data, &["--quorum", "2"]);
    run_json(data, &endpoint, &["key", "create", "--alias", "q1"]);
    let typo = "spiffe://coffre.dev/srvice";
    let bad = proto_policy(dir.path(), "bad.json", typo);
    let args = ["key", "policy", "set", "q1", "--file", &bad, "--json"];
    let (code, stdout, stderr) = run_status(data, &endpoint, &args);
    assert_eq!(code, Some(0), "{stderr}");
    let pending: Value = serde_json::from_str(&stdout).unwrap();
    assert!(pending["pending_approval_id"].is_string(), "{pending}");
    let warnings = pending["warnings"].as_array().unwrap();
    assert!(warnings[0].as_str().unwrap().contains(typo), "{pending}");
    assert!(
        stderr.contains("warning:") && stderr.contains(typo),
        "{stderr}"
    );
    // A known principal: pending, no warning.
    let good = proto_policy(dir.path(), "good.json", SERVICE);
    let (code, stdout, stderr) = run_status(
        data,
        &endpoint,
        &["key", "policy", "set", "q1", "--file", &good],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("pending"), "{stdout}");
    assert!(!stderr.contains("warning"), "{stderr}");
}

#[test]
fn empty_lists_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (_server, endpoint) = start_dev(data);
    let (ok, stdout, stderr) = run(data, &endpoint, &["key", "list"]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim(), "no keys match", "{stdout}");
    let (ok, stdout, stderr) = run(data, &endpoint, &["approval", "list"]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim(), "no approvals match", "{stdout}");
    let (ok, stdout, stderr) = run(
        data,
        &endpoint,
        &[
            "audit",
            "events",
            "--principal",
            "spiffe://coffre.dev/nobody",
        ],
    );
    assert!(ok, "{stderr}");
    assert!(stdout.trim().starts_with("no events match"), "{stdout}");

    // A long alias is cut in the table, whole in --json.
    let alias = format!("app/{}", "x".repeat(60));
    run_json(data, &endpoint, &["key", "create", "--alias", &alias]);
    let (ok, stdout, _) = run(data, &endpoint, &["key", "list"]);
    assert!(ok);
    assert!(!stdout.contains(&alias), "{stdout}");
    assert!(
        stdout.contains("app/xxx") && stdout.contains('…'),
        "{stdout}"
    );
    let listed = run_json(data, &endpoint, &["key", "list"]);
    assert_eq!(listed["keys"][0]["alias"], alias.as_str());
    // Not a terminal: no ANSI escape anywhere.
    assert!(!stdout.contains('\u{1b}'), "{stdout:?}");
}
