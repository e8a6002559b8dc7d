//! End to end over real gRPC on loopback, with mTLS, the real simulated HSM
//! and the real sled store.

use coffre::grpc::pb::{self, data_key_service_client::DataKeyServiceClient};
use tonic::Code;

use crate::common::{REASON, TestServer, channel_as, ctx, try_channel};

fn decrypt_req(blob: &[u8], context: &[(&str, &str)]) -> pb::DecryptRequest {
    pb::DecryptRequest {
        ciphertext_blob: blob.to_vec(),
        encryption_context: ctx(context),
        justification: REASON,
        key_id: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelope_lifecycle_survives_rotation_and_restart() {
    let mut server = TestServer::start().await;
    let key = server.create_key("app/orders").await;
    assert_eq!(key.state(), pb::KeyState::Enabled);
    assert_eq!(key.primary_version, 1);
    let context = [("tenant", "acme"), ("table", "orders")];

    let mut data = server.data().await;
    let generated = data
        .generate_data_key(pb::GenerateDataKeyRequest {
            key_id: "app/orders".into(),
            encryption_context: ctx(&context),
            justification: REASON,
            number_of_bytes: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(generated.plaintext.len(), 32, "default data key size");
    assert_eq!(generated.key_id, key.key_id);
    assert_eq!(generated.key_version, 1);
    assert_eq!(&generated.ciphertext_blob[..3], b"CF\x01");

    let opened = data
        .decrypt(decrypt_req(&generated.ciphertext_blob, &context))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(opened.plaintext, generated.plaintext);
    assert_eq!(opened.key_version, 1);

    // Rotate: new data keys use version 2; version 1 blobs still decrypt.
    let rotated = server
        .keys()
        .await
        .rotate_key(pb::RotateKeyRequest {
            key_id: key.key_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(rotated.primary_version, 2);

    let re = data
        .re_encrypt(pb::ReEncryptRequest {
            ciphertext_blob: generated.ciphertext_blob.clone(),
            source_encryption_context: ctx(&context),
            justification: REASON,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(re.source_key_version, 1);
    assert_eq!(re.key_version, 2);
    assert_eq!(re.key_id, key.key_id);
    assert_ne!(re.ciphertext_blob, generated.ciphertext_blob);

    for blob in [&generated.ciphertext_blob, &re.ciphertext_blob] {
        let out = data
            .decrypt(decrypt_req(blob, &context))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(out.plaintext, generated.plaintext);
    }

    let new_key = data
        .generate_data_key_without_plaintext(pb::GenerateDataKeyWithoutPlaintextRequest {
            key_id: key.key_id.clone(),
            encryption_context: ctx(&context),
            justification: REASON,
            number_of_bytes: 64,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(new_key.key_version, 2);

    let secret = b"a small caller secret".to_vec();
    let encrypted = data
        .encrypt(pb::EncryptRequest {
            key_id: "app/orders".into(),
            plaintext: secret.clone(),
            encryption_context: ctx(&context),
            justification: REASON,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(encrypted.key_version, 2);

    // Restart on the same data directory: every blob still opens.
    drop(data);
    server.restart().await;
    let mut data = server.data().await;
    let out = data
        .decrypt(decrypt_req(&generated.ciphertext_blob, &context))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.plaintext, generated.plaintext);
    let out = data
        .decrypt(decrypt_req(&re.ciphertext_blob, &context))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.plaintext, generated.plaintext);
    let out = data
        .decrypt(decrypt_req(&encrypted.ciphertext_blob, &context))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.plaintext, secret);
    let out = data
        .decrypt(decrypt_req(&new_key.ciphertext_blob, &context))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.plaintext.len(), 64);

    let shown = server
        .keys()
        .await
        .get_key(pb::GetKeyRequest {
            key_id: "app/orders".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.key.unwrap().primary_version, 2);
    assert_eq!(
        shown.versions.iter().map(|v| v.version).collect::<Vec<_>>(),
        vec![1, 2]
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_encrypt_to_another_key_and_context() {
    let server = TestServer::start().await;
    let a = server.create_key("a").await;
    let b = server.create_key("b").await;
    let mut data = server.data().await;
    let generated = data
        .generate_data_key(pb::GenerateDataKeyRequest {
            key_id: a.key_id.clone(),
            encryption_context: ctx(&[("x", "1")]),
            justification: REASON,
            number_of_bytes: 16,
        })
        .await
        .unwrap()
        .into_inner();
    let moved = data
        .re_encrypt(pb::ReEncryptRequest {
            ciphertext_blob: generated.ciphertext_blob.clone(),
            source_encryption_context: ctx(&[("x", "1")]),
            destination_key_id: "b".into(),
            destination_encryption_context: ctx(&[("y", "2")]),
            justification: REASON,
            source_key_id: "a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(moved.source_key_id, a.key_id);
    assert_eq!(moved.key_id, b.key_id);
    let out = data
        .decrypt(decrypt_req(&moved.ciphertext_blob, &[("y", "2")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.plaintext, generated.plaintext);
    assert_eq!(out.key_id, b.key_id);
    // The old context does not open the new blob.
    let err = data
        .decrypt(decrypt_req(&moved.ciphertext_blob, &[("x", "1")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // A source key that is not the blob's: refused.
    let err = data
        .re_encrypt(pb::ReEncryptRequest {
            ciphertext_blob: generated.ciphertext_blob.clone(),
            source_encryption_context: ctx(&[("x", "1")]),
            source_key_id: "b".into(),
            justification: REASON,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_is_immediate_and_enable_restores() {
    let server = TestServer::start().await;
    let key = server.create_key("d").await;
    let mut data = server.data().await;
    let generated = data
        .generate_data_key(pb::GenerateDataKeyRequest {
            key_id: "d".into(),
            justification: REASON,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut keys = server.keys().await;
    let disabled = keys
        .disable_key(pb::DisableKeyRequest {
            key_id: key.key_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(disabled.state(), pb::KeyState::Disabled);

    // Cached or not, nothing works with a disabled key.
    let err = data
        .decrypt(decrypt_req(&generated.ciphertext_blob, &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("DISABLED"), "{}", err.message());
    let err = data
        .generate_data_key(pb::GenerateDataKeyRequest {
            key_id: "d".into(),
            justification: REASON,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    keys.enable_key(pb::EnableKeyRequest { key_id: "d".into() })
        .await
        .unwrap();
    let out = data
        .decrypt(decrypt_req(&generated.ciphertext_blob, &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.plaintext, generated.plaintext);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_gets_its_status_and_changes_nothing() {
    let server = TestServer::start().await;
    let key = server.create_key("k").await;
    let mut data = server.data().await;
    let mut keys = server.keys().await;
    let good = data
        .generate_data_key(pb::GenerateDataKeyRequest {
            key_id: "k".into(),
            encryption_context: ctx(&[("a", "b")]),
            justification: REASON,
            number_of_bytes: 32,
        })
        .await
        .unwrap()
        .into_inner();

    let gen_req = |key_id: &str, n: u32| pb::GenerateDataKeyRequest {
        key_id: key_id.into(),
        encryption_context: ctx(&[]),
        justification: REASON,
        number_of_bytes: n,
    };
    let cases: Vec<(&str, Code, tonic::Status)> = vec![
        (
            "unknown key",
            Code::PermissionDenied,
            data.generate_data_key(gen_req("no-such-key", 32))
                .await
                .unwrap_err(),
        ),
        (
            "unknown uuid",
            Code::PermissionDenied,
            data.generate_data_key(gen_req("00000000-0000-4000-8000-000000000000", 32))
                .await
                .unwrap_err(),
        ),
        (
            "empty key id",
            Code::InvalidArgument,
            data.generate_data_key(gen_req("", 32)).await.unwrap_err(),
        ),
        (
            "invalid alias",
            Code::InvalidArgument,
            data.generate_data_key(gen_req("bad alias!", 32))
                .await
                .unwrap_err(),
        ),
        (
            "15 bytes",
            Code::InvalidArgument,
            data.generate_data_key(gen_req("k", 15)).await.unwrap_err(),
        ),
        (
            "65 bytes",
            Code::InvalidArgument,
            data.generate_data_key(gen_req("k", 65)).await.unwrap_err(),
        ),
        (
            "plaintext over 4 KiB",
            Code::InvalidArgument,
            data.encrypt(pb::EncryptRequest {
                key_id: "k".into(),
                plaintext: vec![1; 4097],
                encryption_context: ctx(&[]),
                justification: REASON,
            })
            .await
            .unwrap_err(),
        ),
        (
            "empty plaintext",
            Code::InvalidArgument,
            data.encrypt(pb::EncryptRequest {
                key_id: "k".into(),
                plaintext: vec![],
                encryption_context: ctx(&[]),
                justification: REASON,
            })
            .await
            .unwrap_err(),
        ),
        (
            "garbage blob",
            Code::InvalidArgument,
            data.decrypt(decrypt_req(b"not a blob at all", &[("a", "b")]))
                .await
                .unwrap_err(),
        ),
        (
            "empty blob",
            Code::InvalidArgument,
            data.decrypt(decrypt_req(b"", &[("a", "b")]))
                .await
                .unwrap_err(),
        ),
        (
            "truncated blob",
            Code::InvalidArgument,
            data.decrypt(decrypt_req(
                &good.ciphertext_blob[..good.ciphertext_blob.len() - 1],
                &[("a", "b")],
            ))
            .await
            .unwrap_err(),
        ),
        (
            "wrong context",
            Code::InvalidArgument,
            data.decrypt(decrypt_req(&good.ciphertext_blob, &[("a", "c")]))
                .await
                .unwrap_err(),
        ),
        (
            "missing context",
            Code::InvalidArgument,
            data.decrypt(decrypt_req(&good.ciphertext_blob, &[]))
                .await
                .unwrap_err(),
        ),
        (
            "unknown justification",
            Code::InvalidArgument,
            data.generate_data_key(pb::GenerateDataKeyRequest {
                justification: 99,
                ..gen_req("k", 32)
            })
            .await
            .unwrap_err(),
        ),
        (
            "no justification",
            Code::PermissionDenied,
            data.generate_data_key(pb::GenerateDataKeyRequest {
                justification: pb::AccessReason::Unspecified as i32,
                ..gen_req("k", 32)
            })
            .await
            .unwrap_err(),
        ),
        (
            "third-party data request",
            Code::PermissionDenied,
            data.decrypt(pb::DecryptRequest {
                justification: pb::AccessReason::ThirdPartyDataRequest as i32,
                ..decrypt_req(&good.ciphertext_blob, &[("a", "b")])
            })
            .await
            .unwrap_err(),
        ),
        (
            "context with 65 entries",
            Code::InvalidArgument,
            data.generate_data_key(pb::GenerateDataKeyRequest {
                encryption_context: (0..65)
                    .map(|i| (format!("k{i}"), "v".to_string()))
                    .collect(),
                ..gen_req("k", 32)
            })
            .await
            .unwrap_err(),
        ),
        (
            "context key of 257 bytes",
            Code::InvalidArgument,
            data.generate_data_key(pb::GenerateDataKeyRequest {
                encryption_context: ctx(&[(&"x".repeat(257), "v")]),
                ..gen_req("k", 32)
            })
            .await
            .unwrap_err(),
        ),
        (
            "empty context key",
            Code::InvalidArgument,
            data.generate_data_key(pb::GenerateDataKeyRequest {
                encryption_context: ctx(&[("", "v")]),
                ..gen_req("k", 32)
            })
            .await
            .unwrap_err(),
        ),
        (
            "over-long alias",
            Code::InvalidArgument,
            keys.create_key(pb::CreateKeyRequest {
                alias: "a".repeat(257),
                ..Default::default()
            })
            .await
            .unwrap_err(),
        ),
        (
            "description over 8 KiB",
            Code::InvalidArgument,
            keys.create_key(pb::CreateKeyRequest {
                description: "d".repeat(8193),
                ..Default::default()
            })
            .await
            .unwrap_err(),
        ),
        (
            "65 labels",
            Code::InvalidArgument,
            keys.create_key(pb::CreateKeyRequest {
                labels: (0..65)
                    .map(|i| (format!("l{i}"), "v".to_string()))
                    .collect(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
        ),
        (
            "unknown protection level",
            Code::InvalidArgument,
            keys.create_key(pb::CreateKeyRequest {
                protection_level: 7,
                ..Default::default()
            })
            .await
            .unwrap_err(),
        ),
        (
            "duplicate alias",
            Code::AlreadyExists,
            keys.create_key(pb::CreateKeyRequest {
                alias: "k".into(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
        ),
        (
            "alias that looks like a uuid",
            Code::InvalidArgument,
            keys.create_key(pb::CreateKeyRequest {
                alias: "00000000-0000-4000-8000-000000000000".into(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
        ),
        (
            "bad page token",
            Code::InvalidArgument,
            keys.list_keys(pb::ListKeysRequest {
                page_size: 10,
                page_token: "zzz".into(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
        ),
        (
            "page too large",
            Code::InvalidArgument,
            keys.list_keys(pb::ListKeysRequest {
                page_size: 1001,
                ..Default::default()
            })
            .await
            .unwrap_err(),
        ),
        (
            "rotate unknown key",
            Code::NotFound,
            keys.rotate_key(pb::RotateKeyRequest {
                key_id: "nope".into(),
            })
            .await
            .unwrap_err(),
        ),
    ];
    for (what, expected, status) in cases {
        assert_eq!(status.code(), expected, "{what}: {status:?}");
        assert!(!status.message().is_empty(), "{what}: a clear message");
    }

    // Every bit flip of the blob is refused with the same generic message —
    // except in the key id (bytes 4..20), which then names a key that does
    // not exist: the caller gets the answer for a key it may not use (no
    // existence oracle).
    let mut messages = std::collections::BTreeSet::new();
    for i in 0..good.ciphertext_blob.len() {
        let mut bad = good.ciphertext_blob.clone();
        bad[i] ^= 0x01;
        let status = data
            .decrypt(decrypt_req(&bad, &[("a", "b")]))
            .await
            .unwrap_err();
        if (4..20).contains(&i) {
            assert_eq!(
                status.code(),
                Code::PermissionDenied,
                "flip at {i}: {status:?}"
            );
            assert!(
                status
                    .message()
                    .contains("does not exist or you are not allowed")
            );
        } else {
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "flip at {i}: {status:?}"
            );
            messages.insert(status.message().to_string());
        }
    }
    assert_eq!(messages.len(), 1, "one generic message: {messages:?}");

    // Nothing changed: still one key, version 1, enabled, and the good blob opens.
    let listed = keys
        .list_keys(pb::ListKeysRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.keys.len(), 1);
    assert_eq!(listed.keys[0].key_id, key.key_id);
    assert_eq!(listed.keys[0].primary_version, 1);
    assert_eq!(listed.keys[0].state(), pb::KeyState::Enabled);
    let out = data
        .decrypt(decrypt_req(&good.ciphertext_blob, &[("a", "b")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.plaintext, good.plaintext);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_are_enforced() {
    let server = TestServer::start().await;
    server.create_key("r").await;
    let pki = server.data_dir().join("pki");
    let endpoint = server.endpoint();

    // Operators may not touch data keys.
    let mut as_operator = DataKeyServiceClient::new(channel_as(&endpoint, &pki, "operator").await);
    let err = as_operator
        .generate_data_key(pb::GenerateDataKeyRequest {
            key_id: "r".into(),
            justification: REASON,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // Services may not manage keys.
    let mut as_service =
        pb::key_service_client::KeyServiceClient::new(channel_as(&endpoint, &pki, "service").await);
    for status in [
        as_service
            .create_key(pb::CreateKeyRequest::default())
            .await
            .unwrap_err(),
        as_service
            .disable_key(pb::DisableKeyRequest { key_id: "r".into() })
            .await
            .unwrap_err(),
        as_service
            .list_keys(pb::ListKeysRequest::default())
            .await
            .unwrap_err(),
    ] {
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    }

    // Auditors may do neither.
    let auditor = channel_as(&endpoint, &pki, "auditor").await;
    let err = DataKeyServiceClient::new(auditor.clone())
        .decrypt(decrypt_req(b"x", &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = pb::key_service_client::KeyServiceClient::new(auditor)
        .rotate_key(pb::RotateKeyRequest { key_id: "r".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // The key is untouched.
    let key = server
        .keys()
        .await
        .get_key(pb::GetKeyRequest { key_id: "r".into() })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(key.state(), pb::KeyState::Enabled);
    assert_eq!(key.primary_version, 1);
    server.stop().await;
}

/// A refusal by TLS, not by a service: the connection is torn down.
fn transport_refusal(status: &tonic::Status) -> bool {
    let transport = matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
    );
    assert!(
        transport,
        "expected a transport-level refusal, got {status:?}"
    );
    transport
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_certificate_or_from_another_ca_are_refused() {
    let server = TestServer::start().await;
    let pki = server.data_dir().join("pki");
    let endpoint = server.endpoint();

    // No client certificate: the TLS handshake fails, or the first call
    // does — at the transport, before any service code runs.
    let refused = match try_channel(&endpoint, &pki.join("ca.pem"), None).await {
        Err(_) => true,
        Ok(channel) => {
            let status = pb::key_service_client::KeyServiceClient::new(channel)
                .list_keys(pb::ListKeysRequest::default())
                .await
                .unwrap_err();
            transport_refusal(&status)
        }
    };
    assert!(refused, "a client without a certificate must be refused");

    // A certificate from another CA (another dev PKI), with the same name.
    let other = tempfile::tempdir().unwrap();
    coffre::pki::ensure_dev_pki(other.path()).unwrap();
    let other_pki = other.path().join("pki");
    let refused = match try_channel(
        &endpoint,
        &pki.join("ca.pem"),
        Some((
            &other_pki.join("operator.pem"),
            &other_pki.join("operator-key.pem"),
        )),
    )
    .await
    {
        Err(_) => true,
        Ok(channel) => {
            let status = pb::key_service_client::KeyServiceClient::new(channel)
                .list_keys(pb::ListKeysRequest::default())
                .await
                .unwrap_err();
            transport_refusal(&status)
        }
    };
    assert!(refused, "a certificate from another CA must be refused");

    // The legitimate operator still gets in.
    server
        .keys()
        .await
        .list_keys(pb::ListKeysRequest::default())
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_keys_pages_through_every_key() {
    let server = TestServer::start().await;
    let mut created = std::collections::BTreeSet::new();
    for i in 0..7 {
        created.insert(server.create_key(&format!("p{i}")).await.key_id);
    }
    let mut keys = server.keys().await;
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = keys
            .list_keys(pb::ListKeysRequest {
                page_size: 3,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.keys.len() <= 3);
        seen.extend(page.keys.into_iter().map(|k| k.key_id));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(seen.len(), 7, "each key exactly once");
    assert_eq!(
        seen.iter()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>(),
        created
    );
    server.stop().await;
}

async fn health_status(
    health: &mut tonic_health::pb::health_client::HealthClient<tonic::transport::Channel>,
) -> Option<i32> {
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "coffre.v1.DataKeyService".into(),
        })
        .await
        .ok()
        .map(|r| r.into_inner().status)
}

async fn wait_for_health(
    health: &mut tonic_health::pb::health_client::HealthClient<tonic::transport::Channel>,
    want: tonic_health::pb::health_check_response::ServingStatus,
) {
    for _ in 0..100 {
        if health_status(health).await == Some(want as i32) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!(
        "health never became {want:?}: {:?}",
        health_status(health).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_hsm() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let server = TestServer::start().await;
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(server.channel("service").await);
    wait_for_health(&mut health, ServingStatus::Serving).await;

    let sim = server.server.as_ref().unwrap().simulator.clone().unwrap();
    sim.set_faults(hsm_sim::Faults {
        outage: true,
        ..Default::default()
    })
    .unwrap();
    wait_for_health(&mut health, ServingStatus::NotServing).await;
    // A request that needs the HSM says so.
    let err = server
        .keys()
        .await
        .create_key(pb::CreateKeyRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    sim.set_faults(hsm_sim::Faults::default()).unwrap();
    wait_for_health(&mut health, ServingStatus::Serving).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_hsm_makes_coffre_unavailable_not_corrupt() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let server = TestServer::start().await;
    let key = server.create_key("t").await;
    let sim = server.server.as_ref().unwrap().simulator.clone().unwrap();
    sim.tamper().unwrap();
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(server.channel("service").await);
    wait_for_health(&mut health, ServingStatus::NotServing).await;
    let err = server
        .keys()
        .await
        .rotate_key(pb::RotateKeyRequest {
            key_id: key.key_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    // The key's record is unchanged.
    let shown = server
        .keys()
        .await
        .get_key(pb::GetKeyRequest { key_id: "t".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.key.unwrap().primary_version, 1);
    assert_eq!(shown.versions.len(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let server = TestServer::start().await;
    let mut client = ServerReflectionClient::new(server.channel("operator").await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response: {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "coffre.v1.KeyService",
        "coffre.v1.DataKeyService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }
    server.stop().await;
}
