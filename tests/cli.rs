//! The README walkthrough, with the real binary: `coffre dev` in its own
//! process and the CLI commands against it, parsing their `--json` output.

use std::process::Command;

use serde_json::Value;

use crate::common::binary::{COFFRE, run, run_json, start_dev, start_dev_with};

// `hsm_conformance` still calls it by this path.

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
    let count = coffre::server::dev::PRELOAD_CHUNK + 3;
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
