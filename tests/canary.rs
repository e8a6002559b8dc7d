//! Secret hygiene: `coffre dev` (the real binary) under `RUST_LOG=trace`,
//! driven through the happy paths and through every error path a client can
//! reach, must not let a secret out. The secrets: every data key it handed
//! out, a caller secret wrapped with Encrypt, and every CMK version (read
//! back from the store and unwrapped by the simulated HSM after the run).
//! Searched for as lowercase and uppercase hex, standard and URL-safe base64
//! (with and without padding) and Rust's `Debug` of a byte slice, in: every
//! log line, every error message a client received, every audit record and
//! the metrics page.

use std::net::SocketAddr;
use std::process::Stdio;

use base64::Engine;
use coffre::grpc::pb::{self, data_key_service_client::DataKeyServiceClient};
use coffre::hsm::Hsm;
use coffre::store::KeyStore;

use crate::common::binary::{dev_command, free_port, spawn_dev};
use crate::common::clients::Clients;
use crate::common::{REASON, channel_as, ctx};

/// Every way a secret could be printed.
fn encodings(secret: &[u8]) -> Vec<String> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let debug = format!("{:?}", &secret[..secret.len().min(8)]);
    vec![
        hex::encode(secret),
        hex::encode_upper(secret),
        STANDARD.encode(secret),
        STANDARD_NO_PAD.encode(secret),
        URL_SAFE.encode(secret),
        URL_SAFE_NO_PAD.encode(secret),
        // `[12, 200, 7, …` without the closing bracket.
        debug.trim_end_matches(']').to_string(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_logs_errors_audit_or_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log_path = dir.path().join("server.log");
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut cmd = dev_command(&data);
    cmd.args(["--metrics-listen", &metrics.to_string()])
        .env("RUST_LOG", "trace")
        .stderr(Stdio::from(std::fs::File::create(&log_path).unwrap()));
    let (guard, endpoint) = spawn_dev(cmd);
    let pki = data.join("pki");
    let mut clients = Clients::connect(&endpoint, &pki).await;
    let mut as_operator = DataKeyServiceClient::new(channel_as(&endpoint, &pki, "operator").await);

    let mut secrets: Vec<Vec<u8>> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    let note = |r: Result<(), tonic::Status>, errors: &mut Vec<String>| {
        if let Err(s) = r {
            errors.push(format!("{:?} {} {:?}", s.code(), s.message(), s.metadata()));
        }
    };

    for alias in ["canary/a", "canary/b"] {
        clients.create_key(alias).await.unwrap();
    }
    let Clients {
        mut keys,
        data: mut svc,
    } = clients;
    let context = ctx(&[("tenant", "acme")]);
    let mut blobs = Vec::new();
    for n in [16, 32, 64] {
        let dk = svc
            .generate_data_key(pb::GenerateDataKeyRequest {
                key_id: "canary/a".into(),
                encryption_context: context.clone(),
                justification: REASON,
                number_of_bytes: n,
            })
            .await
            .unwrap()
            .into_inner();
        secrets.push(dk.plaintext.clone());
        blobs.push(dk.ciphertext_blob);
    }
    let batch = svc
        .batch_generate_data_key(pb::BatchGenerateDataKeyRequest {
            key_id: "canary/b".into(),
            encryption_context: context.clone(),
            justification: REASON,
            number_of_bytes: 32,
            count: 5,
            without_plaintext: false,
        })
        .await
        .unwrap()
        .into_inner();
    for item in batch.data_keys {
        secrets.push(item.plaintext);
        blobs.push(item.ciphertext_blob);
    }
    let caller_secret: Vec<u8> = (0..48u8).map(|i| i.wrapping_mul(37) ^ 0xa5).collect();
    secrets.push(caller_secret.clone());
    let wrapped = svc
        .encrypt(pb::EncryptRequest {
            key_id: "canary/a".into(),
            plaintext: caller_secret.clone(),
            encryption_context: context.clone(),
            justification: REASON,
        })
        .await
        .unwrap()
        .into_inner()
        .ciphertext_blob;
    let decrypt =
        |blob: &[u8], context: &std::collections::BTreeMap<String, String>| pb::DecryptRequest {
            ciphertext_blob: blob.to_vec(),
            encryption_context: context.clone(),
            justification: REASON,
            key_id: String::new(),
        };
    let opened = svc.decrypt(decrypt(&wrapped, &context)).await.unwrap();
    assert_eq!(opened.into_inner().plaintext, caller_secret);

    // Error paths, each with secrets in or near the request.
    let wrong = ctx(&[("tenant", "other")]);
    for blob in blobs.iter().chain([&wrapped]) {
        note(
            svc.decrypt(decrypt(blob, &wrong)).await.map(drop),
            &mut errors,
        );
        let mut tampered = blob.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        note(
            svc.decrypt(decrypt(&tampered, &context)).await.map(drop),
            &mut errors,
        );
        note(
            svc.decrypt(decrypt(&blob[..blob.len() - 3], &context))
                .await
                .map(drop),
            &mut errors,
        );
        note(
            as_operator.decrypt(decrypt(blob, &context)).await.map(drop),
            &mut errors,
        );
        note(
            svc.re_encrypt(pb::ReEncryptRequest {
                ciphertext_blob: blob.clone(),
                source_encryption_context: wrong.clone(),
                destination_key_id: "canary/b".into(),
                justification: REASON,
                ..Default::default()
            })
            .await
            .map(drop),
            &mut errors,
        );
    }
    // A secret sent where it does not belong: too long, wrong key, no key.
    let mut too_long = caller_secret.repeat(100);
    too_long.truncate(4097);
    for (key, plaintext) in [
        ("canary/a", too_long),
        ("no-such-key", caller_secret.clone()),
        ("", caller_secret.clone()),
    ] {
        note(
            svc.encrypt(pb::EncryptRequest {
                key_id: key.into(),
                plaintext,
                encryption_context: context.clone(),
                justification: REASON,
            })
            .await
            .map(drop),
            &mut errors,
        );
    }
    note(
        svc.generate_data_key(pb::GenerateDataKeyRequest {
            key_id: "canary/a".into(),
            encryption_context: context.clone(),
            justification: REASON,
            number_of_bytes: 4096,
        })
        .await
        .map(drop),
        &mut errors,
    );
    keys.disable_key(pb::DisableKeyRequest {
        key_id: "canary/b".into(),
    })
    .await
    .unwrap();
    note(
        svc.decrypt(decrypt(&blobs[4], &context)).await.map(drop),
        &mut errors,
    );
    note(
        svc.batch_decrypt(pb::BatchDecryptRequest {
            items: blobs
                .iter()
                .map(|b| pb::BatchDecryptItem {
                    ciphertext_blob: b.clone(),
                    encryption_context: wrong.clone(),
                    key_id: String::new(),
                })
                .collect(),
            justification: REASON,
        })
        .await
        .map(|r| {
            for item in r.into_inner().results {
                if let Some(e) = item.error {
                    errors.push(format!("{} {}", e.code, e.message));
                }
            }
        }),
        &mut errors,
    );
    assert!(errors.len() >= 40, "the error paths ran: {}", errors.len());

    let (_, metrics_page) = crate::observability::http_get(metrics, "/metrics");
    drop(guard);

    // The CMK versions, read back from the store and unwrapped by the HSM.
    let store =
        coffre::store::SledStore::open(&coffre::server::DataDir::new(&data).store()).unwrap();
    let pin = std::fs::read_to_string(coffre::server::DataDir::new(&data).hsm_pin()).unwrap();
    let hsm = coffre::hsm::sim::LocalSimHsm::open(
        &coffre::server::DataDir::new(&data).hsm_state(),
        pin.trim(),
    )
    .unwrap();
    // The store's records are sealed: its MAC key, unwrapped by the HSM,
    // is one more secret that must appear nowhere.
    let name = coffre::store::integrity::STORE_INTEGRITY_SECRET_NAME;
    let sealed = store.get_secret(name).await.unwrap().unwrap();
    let mac_key = hsm
        .unwrap(&sealed.wrapped, &coffre::model::secret_wrap_aad(name))
        .await
        .unwrap();
    let mac =
        std::sync::Arc::new(coffre::store::integrity::RecordMac::new(mac_key.expose()).unwrap());
    store.install_integrity(&mac, false).await.unwrap();
    let listed = store
        .list_keys(&coffre::store::KeyFilter::default(), None, 100)
        .await
        .unwrap();
    assert_eq!(listed.len(), 2);
    for key in listed {
        for v in store.list_versions(key.id).await.unwrap() {
            let cmk = hsm
                .unwrap(
                    &v.wrapped_material,
                    &coffre::model::cmk_wrap_aad(key.id, v.version),
                )
                .await
                .unwrap();
            secrets.push(cmk.expose().to_vec());
        }
    }
    assert_eq!(secrets.len(), 3 + 5 + 1 + 2);
    secrets.push(mac_key.expose().to_vec());

    let log = std::fs::read_to_string(&log_path).unwrap();
    let audit = std::fs::read_to_string(data.join("audit.log")).unwrap();
    // The run was logged at trace level and audited: the haystacks are real.
    assert!(
        log.lines().count() > 200,
        "{} log lines",
        log.lines().count()
    );
    assert!(log.contains("TRACE"), "RUST_LOG=trace took effect");
    assert!(audit.lines().count() >= 40);
    assert!(metrics_page.contains("coffre_requests_total"));
    let errors = errors.join("\n");
    for (name, haystack) in [
        ("server log", &log),
        ("client errors", &errors),
        ("audit log", &audit),
        ("metrics", &metrics_page),
    ] {
        for secret in &secrets {
            for needle in encodings(secret) {
                assert!(
                    !haystack.contains(&needle),
                    "a secret of {} bytes appears in the {name} as {needle:?}",
                    secret.len()
                );
            }
        }
    }
}

/// The search itself finds a secret where one is: the needles match their
/// own encodings in a line of text (so the test above cannot pass by
/// searching for the wrong thing).
#[test]
fn the_needles_find_what_they_look_for() {
    let secret: Vec<u8> = (0..32u8).collect();
    let line = format!(
        "x={} y={:?} z={}",
        hex::encode(&secret),
        secret,
        base64::engine::general_purpose::STANDARD.encode(&secret)
    );
    let needles = encodings(&secret);
    // Lowercase hex, standard base64 with and without padding, Debug.
    for i in [0, 2, 3, 6] {
        assert!(line.contains(&needles[i]), "{:?} not found", needles[i]);
    }
    assert!(
        !line.contains(&needles[1]),
        "uppercase hex is not in the line"
    );
}

/// Worker tasks that panic while holding secrets — formatting them, or
/// unwrapping a result that holds one — leave panic messages without the
/// secret: the secret types' `Debug` is redacted all the way up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panics_in_worker_tasks_print_no_secret() {
    use coffre::secret::{CmkMaterial, SecretBytes};
    use coffre::service::DataKeyOutput;

    let data_key: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(91) ^ 0x3c).collect();
    let cmk_bytes: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(53) ^ 0xc3).collect();
    let mut tasks = Vec::new();
    {
        let secret = SecretBytes::new(data_key.clone());
        tasks.push(tokio::spawn(async move {
            panic!("a worker failed while holding {secret:?}");
        }));
    }
    {
        let cmk = CmkMaterial::from_slice(&cmk_bytes).unwrap();
        tasks.push(tokio::spawn(async move {
            let r: Result<CmkMaterial, &str> = std::hint::black_box(Ok(cmk));
            r.unwrap_err();
        }));
    }
    {
        let output = DataKeyOutput {
            plaintext: Some(SecretBytes::new(data_key.clone())),
            ciphertext_blob: vec![1, 2, 3],
            key_id: coffre::model::KeyId::new_random(),
            key_version: 1,
        };
        tasks.push(tokio::spawn(async move {
            let r: Result<(), DataKeyOutput> = std::hint::black_box(Err(output));
            r.expect("the data key could not be delivered");
        }));
    }
    let mut messages = Vec::new();
    for task in tasks {
        let err = task.await.unwrap_err();
        assert!(err.is_panic());
        let payload = err.into_panic();
        let message = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap();
        messages.push(message);
    }
    assert_eq!(messages.len(), 3);
    for message in &messages {
        for secret in [&data_key, &cmk_bytes] {
            for needle in encodings(secret) {
                assert!(!message.contains(&needle), "{message}");
            }
        }
    }
    // The messages did format the values (redacted), not skip them.
    assert!(messages.iter().all(|m| m.len() > 20), "{messages:?}");
}
