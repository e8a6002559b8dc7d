//! The fuzz targets' bodies (`coffre::fuzzing`, run for hours by cargo-fuzz
//! from `fuzz/`) replayed on stable Rust in `cargo test`: over every file of
//! the seed corpora and of the regression inputs (`fuzz/corpus/<target>/`,
//! `fuzz/regressions/<target>/`), then over random inputs and random
//! mutations of the seeds.
//!
//! The seeds are written by `write_fuzz_seeds` (ignored; run it again when
//! the formats change): the golden v1 blobs, their contexts, requests as
//! tonic would decode them, and an audit log with checkpoints.

use std::path::{Path, PathBuf};

use proptest::prelude::*;

use crate::common::REASON;

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 5] = [
    ("blob_parse", coffre::fuzzing::blob_parse),
    ("context", coffre::fuzzing::context),
    ("audit_verify", coffre::fuzzing::audit_verify),
    ("request_mapping", coffre::fuzzing::request_mapping),
    ("message_parse", coffre::fuzzing::message_parse),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<_> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    out.sort();
    out
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let seeds: Vec<Vec<u8>> = files(&fuzz_dir().join("corpus").join(target))
        .into_iter()
        .map(|(_, b)| b)
        .collect();
    assert!(
        seeds.len() >= 3,
        "fuzz/corpus/{target} holds {} seeds; run write_fuzz_seeds",
        seeds.len()
    );
    seeds
}

#[test]
fn every_seed_and_regression_input_passes() {
    for (name, target) in TARGETS {
        let mut inputs = files(&fuzz_dir().join("corpus").join(name));
        assert!(inputs.len() >= 3, "fuzz/corpus/{name} is (nearly) empty");
        inputs.extend(files(&fuzz_dir().join("regressions").join(name)));
        for (path, bytes) in inputs {
            let outcome = std::panic::catch_unwind(|| target(&bytes));
            assert!(outcome.is_ok(), "{name} failed on {}", path.display());
        }
    }
}

/// A seed with a few bytes overwritten, inserted or cut: inputs near the
/// valid ones, where parsers break.
fn mutate(seed: &[u8], edits: &[(usize, u8, u8)]) -> Vec<u8> {
    let mut out = seed.to_vec();
    for &(at, op, byte) in edits {
        let i = if out.is_empty() { 0 } else { at % out.len() };
        match op % 4 {
            0 if !out.is_empty() => out[i] = byte,
            1 => out.insert(i, byte),
            2 if !out.is_empty() => {
                out.remove(i);
            }
            _ => out.truncate(i),
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn random_inputs(which in 0..TARGETS.len(), data in prop::collection::vec(any::<u8>(), 0..700)) {
        let (_, target) = TARGETS[which];
        target(&data);
    }

    #[test]
    fn mutated_seeds(
        which in 0..TARGETS.len(),
        pick in any::<usize>(),
        edits in prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..6),
    ) {
        let (name, target) = TARGETS[which];
        let seeds = seeds(name);
        let seed = &seeds[pick % seeds.len()];
        target(&mutate(seed, &edits));
    }
}

/// Writes the seed corpora (run by hand: `cargo test --test tests
/// write_fuzz_seeds -- --ignored`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes fuzz/corpus; run by hand when the formats change"]
async fn write_fuzz_seeds() {
    use coffre::grpc::pb;
    use prost::Message;

    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden-v1.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let sealed: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sealed-v1.json"),
        )
        .unwrap(),
    )
    .unwrap();
    for (i, v) in sealed["vectors"].as_array().unwrap().iter().enumerate() {
        let message = hex::decode(v["message"].as_str().unwrap()).unwrap();
        write("message_parse", &format!("golden-{i}"), &message);
    }
    let mut blobs = Vec::new();
    for v in golden["vectors"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        let blob = hex::decode(v["blob"].as_str().unwrap()).unwrap();
        write("blob_parse", &format!("golden-{name}"), &blob);
        let context: Vec<String> = v["context"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(k, v)| [k.clone(), v.as_str().unwrap().to_string()])
            .collect();
        write(
            "context",
            &format!("golden-{name}"),
            context.join("\0").as_bytes(),
        );
        blobs.push((blob, v["context"].clone()));
    }
    write(
        "context",
        "many",
        "a\0b\0c\0d\0tenant\0acme\0table\0orders".as_bytes(),
    );

    let ctx = |value: &serde_json::Value| -> std::collections::BTreeMap<String, String> {
        value
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect()
    };
    let tagged = |tag: u8, message: &dyn Fn(&mut Vec<u8>)| {
        let mut out = vec![tag];
        message(&mut out);
        out
    };
    for (i, (blob, context)) in blobs.iter().enumerate().take(2) {
        let decrypt = pb::DecryptRequest {
            ciphertext_blob: blob.clone(),
            encryption_context: ctx(context),
            justification: REASON,
            key_id: String::new(),
        };
        write(
            "request_mapping",
            &format!("decrypt-{i}"),
            &tagged(0, &|out| decrypt.encode(out).unwrap()),
        );
        let batch = pb::BatchDecryptRequest {
            items: vec![pb::BatchDecryptItem {
                ciphertext_blob: blob.clone(),
                encryption_context: ctx(context),
                key_id: "alias/orders".into(),
            }],
            justification: REASON,
        };
        write(
            "request_mapping",
            &format!("batch-decrypt-{i}"),
            &tagged(4, &|out| batch.encode(out).unwrap()),
        );
    }
    let generate = pb::GenerateDataKeyRequest {
        key_id: "alias/orders".into(),
        encryption_context: ctx(&serde_json::json!({"tenant": "acme"})),
        justification: REASON,
        number_of_bytes: 32,
    };
    write(
        "request_mapping",
        "generate",
        &tagged(1, &|out| generate.encode(out).unwrap()),
    );
    let policy = pb::KeyPolicy {
        grants: vec![pb::Grant {
            principal: "spiffe://coffre.dev/service".into(),
            operations: vec![
                pb::DataKeyOperation::GenerateDataKey as i32,
                pb::DataKeyOperation::Decrypt as i32,
            ],
        }],
        ..Default::default()
    };
    let create = pb::CreateKeyRequest {
        alias: "orders".into(),
        description: "seed".into(),
        rotation_period: Some(prost_types::Duration {
            seconds: 90 * 86_400,
            nanos: 0,
        }),
        policy: Some(policy.clone()),
        ..Default::default()
    };
    write(
        "request_mapping",
        "create",
        &tagged(2, &|out| create.encode(out).unwrap()),
    );
    let list = pb::ListKeysRequest {
        page_size: 10,
        page_token: "e1993aaf-1c57-5407-75e1-7f18cf48fc9c".into(),
        state: pb::KeyState::Enabled as i32,
        alias_prefix: "app/".into(),
    };
    write(
        "request_mapping",
        "list",
        &tagged(3, &|out| list.encode(out).unwrap()),
    );
    let update = pb::UpdateKeyPolicyRequest {
        key_id: "orders".into(),
        policy: Some(policy),
    };
    write(
        "request_mapping",
        "update-policy",
        &tagged(5, &|out| update.encode(out).unwrap()),
    );

    // An audit log with records and checkpoints, from a real server.
    let server = crate::common::TestServer::start().await;
    server.create_key("seed").await;
    let dir = server.data_dir().to_path_buf();
    let log_path = dir.join("audit.log");
    let mut audit =
        pb::audit_service_client::AuditServiceClient::new(server.channel("auditor").await);
    audit
        .get_checkpoint(pb::GetCheckpointRequest {})
        .await
        .unwrap();
    server.create_key("seed-2").await;
    audit
        .get_checkpoint(pb::GetCheckpointRequest {})
        .await
        .unwrap();
    let log = std::fs::read(&log_path).unwrap();
    server.stop().await;
    write("audit_verify", "log", &log);
    let lines: Vec<&[u8]> = log.split(|b| *b == b'\n').collect();
    write("audit_verify", "first-line", lines[0]);
    write(
        "audit_verify",
        "last-lines",
        &lines[lines.len().saturating_sub(3)..].concat(),
    );
}
