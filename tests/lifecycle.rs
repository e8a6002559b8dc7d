//! The key lifecycle through the real binaries: deletion scheduling, version
//! retirement, rotation policy, list filters, and an HSM root-key rotation
//! killed midway (SIGKILL) and resumed.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use coffre::grpc::pb::{self, data_key_service_client::DataKeyServiceClient};
use serde_json::Value;

use crate::common::binary::{COFFRE, run, run_json, start_dev};
use crate::common::clients::Clients;
use crate::common::{REASON, channel_as, ctx};

#[test]
fn lifecycle_commands_from_the_cli() {
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
            "app/one",
            "--rotation-period",
            "90d",
        ],
    );
    assert_eq!(key["rotation_period_secs"], 90 * 86_400);
    assert!(key["next_rotation"].is_string());
    run_json(data, &endpoint, &["key", "create", "--alias", "app/two"]);
    run_json(
        data,
        &endpoint,
        &["key", "create", "--alias", "other/three"],
    );

    let pending = run_json(
        data,
        &endpoint,
        &["key", "schedule-deletion", "app/two", "--days", "7"],
    );
    assert_eq!(pending["state"], "PENDING_DELETION");
    assert!(pending["deletion"].is_string());
    let (ok, _, stderr) = run(
        data,
        &endpoint,
        &["key", "schedule-deletion", "app/one", "--days", "3"],
    );
    assert!(!ok && stderr.contains("7 to 30"), "{stderr}");
    let (ok, _, stderr) = run(data, &endpoint, &["key", "enable", "app/two"]);
    assert!(!ok && stderr.contains("PENDING_DELETION"), "{stderr}");

    // Filters: by state, by alias prefix, both.
    let by_state = run_json(
        data,
        &endpoint,
        &["key", "list", "--state", "pending-deletion"],
    );
    let aliases: Vec<&str> = by_state["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["alias"].as_str().unwrap())
        .collect();
    assert_eq!(aliases, vec!["app/two"]);
    let by_prefix = run_json(data, &endpoint, &["key", "list", "--alias-prefix", "app/"]);
    assert_eq!(by_prefix["keys"].as_array().unwrap().len(), 2);
    let both = run_json(
        data,
        &endpoint,
        &[
            "key",
            "list",
            "--alias-prefix",
            "app/",
            "--state",
            "enabled",
        ],
    );
    assert_eq!(both["keys"].as_array().unwrap().len(), 1);
    // Paging with filters: one per page, every key once.
    let first = run_json(
        data,
        &endpoint,
        &["key", "list", "--alias-prefix", "app/", "--page-size", "1"],
    );
    let token = first["next_page_token"].as_str().unwrap().to_string();
    assert!(!token.is_empty());
    let second = run_json(
        data,
        &endpoint,
        &[
            "key",
            "list",
            "--alias-prefix",
            "app/",
            "--page-size",
            "1",
            "--page-token",
            &token,
        ],
    );
    assert_ne!(first["keys"][0]["key_id"], second["keys"][0]["key_id"]);

    let cancelled = run_json(data, &endpoint, &["key", "cancel-deletion", "app/two"]);
    assert_eq!(cancelled["state"], "DISABLED");

    // Versions and retirement.
    run_json(data, &endpoint, &["key", "rotate", "app/one"]);
    let retired = run_json(
        data,
        &endpoint,
        &["key", "retire-versions", "app/one", "--below", "2"],
    );
    assert_eq!(retired["min_decryption_version"], 2);
    let versions = run_json(data, &endpoint, &["key", "versions", "app/one"]);
    let states: Vec<&str> = versions["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, vec!["RETIRED", "ENABLED"]);
    let (ok, stdout, _) = run(data, &endpoint, &["key", "versions", "app/one"]);
    assert!(ok && stdout.contains("RETIRED"), "{stdout}");

    let policy = run_json(
        data,
        &endpoint,
        &["key", "set-rotation", "app/one", "--off"],
    );
    assert!(policy.get("rotation_period_secs").is_none());
    let (ok, _, stderr) = run(
        data,
        &endpoint,
        &["key", "set-rotation", "app/one", "--period", "1h"],
    );
    assert!(!ok && stderr.contains("1 day to 10 years"), "{stderr}");

    let info = run_json(data, &endpoint, &["hsm", "info"]);
    assert_eq!(info["root_key_ids"].as_array().unwrap().len(), 1);
    assert_eq!(info["secure"], false);
}

#[test]
fn root_key_rotation_survives_sigkill_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_path_buf();
    let (server, endpoint) = start_dev(&data);
    let pki = data.join("pki");

    // Enough versions that the rotation takes a while.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let blobs: Vec<(Vec<u8>, Vec<u8>)> = runtime.block_on(async {
        let mut clients = Clients::connect(&endpoint, &pki).await;
        let mut blobs = Vec::new();
        for _ in 0..300 {
            let (_, out) = clients.key_with_data_key("", &[("k", "v")]).await.unwrap();
            blobs.push((out.ciphertext_blob, out.plaintext));
        }
        blobs
    });

    // Start the rotation; SIGKILL the server once it has re-wrapped some.
    let mut cli = Command::new(COFFRE)
        .args(["hsm", "rotate-root", "--json", "--data-dir"])
        .arg(&data)
        .args(["--endpoint", &endpoint])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(cli.stdout.take().unwrap()).lines();
    let first_root = loop {
        let line = lines.next().expect("progress before the end").unwrap();
        let p: Value = serde_json::from_str(&line).unwrap();
        assert_ne!(p["done"], true, "the rotation finished before the kill");
        if p["rewrapped"].as_u64().unwrap() > 0 {
            break p["new_root_key_id"].as_u64().unwrap();
        }
    };
    drop(server); // SIGKILL
    let status = cli.wait().unwrap();
    assert!(
        !status.success(),
        "the interrupted rotation reports failure"
    );

    // Restart on the same directory and run it again: it resumes.
    let (_server, endpoint) = start_dev(&data);
    let info = run_json(&data, &endpoint, &["hsm", "info"]);
    assert_eq!(
        info["root_key_ids"].as_array().unwrap().len(),
        2,
        "old root kept: {info}"
    );
    let (ok, stdout, stderr) = run(&data, &endpoint, &["hsm", "rotate-root", "--json"]);
    assert!(ok, "{stderr}");
    let last: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["done"], true);
    assert_eq!(last["resumed"], true);
    assert_eq!(last["new_root_key_id"].as_u64().unwrap(), first_root);
    let info = run_json(&data, &endpoint, &["hsm", "info"]);
    assert_eq!(info["root_key_ids"], serde_json::json!([first_root]));

    // Every blob issued before still decrypts (the restarted server unwraps
    // every CMK version under the new root key).
    runtime.block_on(async {
        let mut data_keys = DataKeyServiceClient::new(channel_as(&endpoint, &pki, "service").await);
        for (blob, plaintext) in &blobs {
            let out = data_keys
                .decrypt(pb::DecryptRequest {
                    ciphertext_blob: blob.clone(),
                    encryption_context: ctx(&[("k", "v")]),
                    justification: REASON,
                    key_id: String::new(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(&out.plaintext, plaintext);
        }
    });
}
