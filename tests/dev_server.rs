//! `coffre dev` for a newcomer (issue #16), with the real binary:
//! attributes for the dev principals (the README's tenant policy), a busy
//! port or a data directory in use found before anything is created, the
//! quorum banner and approval hints that name `--as operator-2`, and what
//! `coffre bench` says about its audit records and keys.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::common::binary::{COFFRE, Guard, dev_command, run, run_json};

/// The README's tenant policy ("Key policies"), as written there.
const TENANT_POLICY: &str = r#"{
  "grants": [
    { "principal": "spiffe://coffre.dev/service", "operations": ["GenerateDataKey", "Decrypt"] }
  ],
  "required_context": { "tenant": { "equals_caller_attribute": "tenant" } },
  "accepted_reasons": ["CUSTOMER_INITIATED_ACCESS", "PROVIDER_SYSTEM_OPERATION"]
}"#;

/// A policy binding the context key `name` to the caller's attribute `name`.
fn bound_to(name: &str) -> String {
    format!(
        r#"{{
  "grants": [
    {{ "principal": "spiffe://coffre.dev/service", "operations": ["GenerateDataKey", "Decrypt"] }}
  ],
  "required_context": {{ "{name}": {{ "equals_caller_attribute": "{name}" }} }},
  "accepted_reasons": ["CUSTOMER_INITIATED_ACCESS"]
}}"#
    )
}

/// `coffre dev` on `dir` with `extra` arguments: the guard, the endpoint
/// and the whole banner (up to its last line).
fn start_with_banner(dir: &Path, extra: &[&str]) -> (Guard, String, String) {
    let mut cmd = dev_command(dir);
    cmd.args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let guard = Guard(child);
    let mut lines = BufReader::new(stdout).lines();
    let mut banner = String::new();
    let mut endpoint = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("coffre dev is running on ") {
            endpoint = rest.split_whitespace().next().map(str::to_string);
        }
        banner.push_str(&line);
        banner.push('\n');
        if line.starts_with("(with cargo:") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let endpoint = endpoint.unwrap_or_else(|| panic!("no banner:\n{banner}"));
    (guard, endpoint, banner)
}

/// Sets `key`'s policy from `json` (written next to the data directory).
fn set_policy(data: &Path, endpoint: &str, key: &str, json: &str) {
    let file = data.with_extension(format!("{key}.policy.json"));
    std::fs::write(&file, json).unwrap();
    let file = file.to_str().unwrap();
    let (ok, _, stderr) = run(
        data,
        endpoint,
        &["key", "policy", "set", key, "--file", file],
    );
    assert!(ok, "policy set {key}: {stderr}");
}

/// `datakey generate --key KEY --context CONTEXT`: (success, stderr).
fn generate(data: &Path, endpoint: &str, key: &str, context: &str) -> (bool, String) {
    let (ok, _, stderr) = run(
        data,
        endpoint,
        &["datakey", "generate", "--key", key, "--context", context],
    );
    (ok, stderr)
}

fn create_key(data: &Path, endpoint: &str, alias: &str) {
    run_json(data, endpoint, &["key", "create", "--alias", alias]);
}

#[test]
fn the_readme_tenant_policy_works_for_the_dev_service_and_attributes_add_more() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (_server, endpoint, banner) =
        start_with_banner(&data, &["--attribute", "service:team=blue"]);
    assert!(
        banner.contains("service: team=blue, tenant=acme"),
        "the banner shows the attributes:\n{banner}"
    );

    create_key(&data, &endpoint, "demo");
    set_policy(&data, &endpoint, "demo", TENANT_POLICY);
    let (ok, stderr) = generate(&data, &endpoint, "demo", "tenant=acme");
    assert!(ok, "the dev service is tenant acme by default: {stderr}");
    let (ok, stderr) = generate(&data, &endpoint, "demo", "tenant=other");
    assert!(!ok, "another tenant is refused");
    assert!(stderr.contains("permission denied"), "{stderr}");
    assert!(
        stderr.contains("your attribute `tenant` is `acme`, the context says `other`"),
        "{stderr}"
    );

    create_key(&data, &endpoint, "teams");
    set_policy(&data, &endpoint, "teams", &bound_to("team"));
    let (ok, stderr) = generate(&data, &endpoint, "teams", "team=blue");
    assert!(ok, "--attribute service:team=blue: {stderr}");
    let (ok, stderr) = generate(&data, &endpoint, "teams", "team=red");
    assert!(!ok && stderr.contains("is `blue`"), "{stderr}");
}

#[test]
fn a_rule_on_an_attribute_the_caller_lacks_says_so_and_an_explicit_tenant_replaces_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (_server, endpoint, banner) =
        start_with_banner(&data, &["--attribute", "service:tenant=globex"]);
    assert!(banner.contains("service: tenant=globex"), "{banner}");
    assert!(
        !banner.contains("tenant=acme"),
        "the examples use the service's tenant too: {banner}"
    );

    create_key(&data, &endpoint, "regional");
    set_policy(&data, &endpoint, "regional", &bound_to("region"));
    let (ok, stderr) = generate(&data, &endpoint, "regional", "region=eu");
    assert!(!ok);
    assert!(stderr.contains("permission denied"), "{stderr}");
    assert!(
        stderr.contains("you have no attribute `region`"),
        "{stderr}"
    );
    assert!(!stderr.contains("the context says"), "{stderr}");

    create_key(&data, &endpoint, "demo");
    set_policy(&data, &endpoint, "demo", TENANT_POLICY);
    assert!(generate(&data, &endpoint, "demo", "tenant=globex").0);
    let (ok, stderr) = generate(&data, &endpoint, "demo", "tenant=acme");
    assert!(!ok && stderr.contains("is `globex`"), "{stderr}");
}

/// `coffre dev ARGS` expected to fail: its stderr.
fn dev_fails(args: &[&str], data: &Path) -> String {
    let out = Command::new(COFFRE)
        .arg("dev")
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(!out.status.success(), "coffre dev {args:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_busy_port_is_found_before_the_data_directory_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let fresh: PathBuf = dir.path().join("new");

    let stderr = dev_fails(&["--listen", &addr], &fresh);
    assert!(
        stderr.contains(&format!(
            "{addr} is in use — is another coffre dev running?"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("--listen"), "{stderr}");
    assert!(!fresh.exists(), "nothing is created for a busy port");

    let stderr = dev_fails(
        &["--listen", "127.0.0.1:0", "--metrics-listen", &addr],
        &fresh,
    );
    assert!(stderr.contains(&format!("{addr} is in use")), "{stderr}");
    assert!(stderr.contains("--metrics-listen"), "{stderr}");
    assert!(
        !fresh.exists(),
        "nothing is created for a busy metrics port"
    );
}

#[test]
fn a_second_dev_on_the_same_data_directory_is_told_who_has_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (first, _endpoint, _) = start_with_banner(&data, &[]);
    let before = std::fs::read(data.join("audit.log")).unwrap_or_default();
    let stderr = dev_fails(&["--listen", "127.0.0.1:0"], &data);
    assert!(
        stderr.contains(&format!(
            "{} is in use by another coffre process (pid {}); stop it or give another --data-dir",
            data.display(),
            first.0.id()
        )),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(data.join("audit.log")).unwrap_or_default(),
        before,
        "the second start wrote nothing"
    );
}

#[test]
fn the_quorum_banner_and_the_hint_name_the_second_operator() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (_server, endpoint, banner) = start_with_banner(&data, &["--quorum", "2"]);
    assert!(banner.contains("operator-2.pem"), "{banner}");
    assert!(banner.contains("--as operator-2"), "{banner}");

    create_key(&data, &endpoint, "q");
    let (ok, stdout, stderr) = run(&data, &endpoint, &["key", "schedule-deletion", "q"]);
    assert!(ok, "{stderr}");
    // The hint is a command to run as it stands.
    let approve = stdout
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("coffre approval approve "))
        .unwrap_or_else(|| panic!("no approve command in\n{stdout}"));
    assert!(approve.contains("--as operator-2"), "{approve}");
    let digest = approve
        .split_whitespace()
        .skip_while(|w| *w != "--digest")
        .nth(1)
        .unwrap();
    assert_eq!(digest.len(), 64, "the digest itself: {approve}");
    let words: Vec<&str> = approve.split_whitespace().skip(1).collect();
    let out = Command::new(COFFRE).args(&words).output().unwrap();
    assert!(
        out.status.success(),
        "{approve}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        run_json(&data, &endpoint, &["key", "show", "q"])["state"],
        "PENDING_DELETION"
    );

    // RetireKeyVersions is held too, and says so (it printed the unchanged
    // key before).
    create_key(&data, &endpoint, "r");
    run_json(&data, &endpoint, &["key", "rotate", "r"]);
    let (ok, stdout, stderr) = run(
        &data,
        &endpoint,
        &["key", "retire-versions", "r", "--below", "2"],
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("it is pending as"), "{stdout}");
    assert!(stdout.contains("--as operator-2"), "{stdout}");
}

#[test]
fn bench_says_where_its_audit_records_go_and_labels_its_keys() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (_server, endpoint, _) = start_with_banner(&data, &[]);
    let bench = |extra: &[&str]| {
        let out = Command::new(COFFRE)
            .args([
                "bench",
                "--ops",
                "generate",
                "--duration",
                "300ms",
                "--warmup",
                "100ms",
                "--concurrency",
                "2",
                "--connections",
                "1",
                "--json",
                "--endpoint",
                &endpoint,
                "--data-dir",
            ])
            .arg(&data)
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "coffre bench: {stderr}");
        stderr
    };
    let stderr = bench(&[]);
    let log = data.join("audit.log").display().to_string();
    assert!(
        stderr.contains(&format!("one audit record in {log}")),
        "before the run: {stderr}"
    );
    assert!(stderr.contains("that is about"), "an estimate: {stderr}");
    let wrote = stderr
        .lines()
        .find_map(|l| l.strip_prefix("audit: this run wrote "))
        .unwrap_or_else(|| panic!("no count after the run: {stderr}"));
    let count: u64 = wrote.split_whitespace().next().unwrap().parse().unwrap();
    assert!(count > 0 && wrote.contains(&log), "{wrote}");
    assert!(stderr.contains("--alias-prefix bench/"), "{stderr}");

    let listed = run_json(
        &data,
        &endpoint,
        &["key", "list", "--alias-prefix", "bench/"],
    );
    let keys = listed["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1, "{listed}");

    // --cleanup schedules the deletion of the keys it made.
    let stderr = bench(&["--cleanup"]);
    assert!(stderr.contains("is scheduled in 7 days"), "{stderr}");
    let listed = run_json(
        &data,
        &endpoint,
        &[
            "key",
            "list",
            "--alias-prefix",
            "bench/",
            "--state",
            "pending-deletion",
        ],
    );
    assert_eq!(listed["keys"].as_array().unwrap().len(), 1, "{listed}");
}

#[test]
fn a_store_held_by_another_process_is_named_as_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    drop(start_with_banner(&data, &[]));
    // Another process (this one, for the test) holds the store's own
    // lock, as a `coffre serve` on the same directory would.
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(data.join("store/LOCK"))
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while fs2::FileExt::try_lock_exclusive(&lock).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the killed dev's lock"
        );
        std::thread::yield_now();
    }
    let stderr = dev_fails(&["--listen", "127.0.0.1:0"], &data);
    assert!(
        stderr.contains(&format!(
            "error: {} is in use by another coffre process; stop it or give another --data-dir",
            data.display()
        )),
        "{stderr}"
    );
}
