//! Issue #15, "defaults and the rest": ReEncrypt decides before it unwraps,
//! BatchDecrypt's record names every item, hsm-sim refuses a listener
//! beyond loopback.

use std::net::SocketAddr;

use coffre::grpc::pb;

use crate::common::{REASON, TestServer, ctx};
use crate::observability::http_get;

/// How many `open_with_object` calls the server's HSM has answered, from its
/// metrics page.
fn hsm_opens(metrics: SocketAddr) -> f64 {
    let (status, page) = http_get(metrics, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let series = "coffre_hsm_requests_total{call=\"open_with_object\"} ";
    page.lines()
        .find_map(|l| l.strip_prefix(series))
        .unwrap_or_else(|| panic!("{series} on\n{page}"))
        .trim()
        .parse()
        .unwrap()
}

/// A ReEncrypt whose destination the caller may not use is refused before
/// the source blob is opened: the HSM opens nothing (the source is an `HSM`
/// key, so each open is one counted HSM call). Before the fix the source was
/// unwrapped first and the refusal came after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_encrypt_to_a_refused_destination_unwraps_nothing() {
    let server = TestServer::start().await;
    let metrics = server.server.as_ref().unwrap().metrics_addr.unwrap();
    let mut keys = server.keys().await;
    let source = keys
        .create_key(pb::CreateKeyRequest {
            alias: "reencrypt/source".into(),
            protection_level: pb::ProtectionLevel::Hsm as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    // The service has no grant on the destination.
    let refused = keys
        .create_key(pb::CreateKeyRequest {
            alias: "reencrypt/refused".into(),
            policy: Some(pb::KeyPolicy {
                grants: vec![pb::Grant {
                    principal: "spiffe://coffre.dev/someone-else".into(),
                    operations: vec![pb::DataKeyOperation::ReEncrypt as i32],
                }],
                accepted_reasons: vec![REASON],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    let mut data = server.data().await;
    let context = ctx(&[("tenant", "acme")]);
    let blob = data
        .encrypt(pb::EncryptRequest {
            key_id: source.key_id.clone(),
            plaintext: b"a secret".to_vec(),
            encryption_context: context.clone(),
            justification: REASON,
        })
        .await
        .unwrap()
        .into_inner()
        .ciphertext_blob;

    let before = hsm_opens(metrics);
    let err = data
        .re_encrypt(pb::ReEncryptRequest {
            ciphertext_blob: blob.clone(),
            source_encryption_context: context.clone(),
            destination_key_id: refused.key_id.clone(),
            justification: REASON,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert_eq!(
        hsm_opens(metrics),
        before,
        "a refused destination cost an HSM open of the source"
    );

    // The same blob to its own key: the one open it takes is counted, so the
    // counter above would have seen one.
    let moved = data
        .re_encrypt(pb::ReEncryptRequest {
            ciphertext_blob: blob,
            source_encryption_context: context,
            justification: REASON,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(moved.source_key_id, source.key_id);
    assert_eq!(hsm_opens(metrics), before + 1.0);
    server.stop().await;
}

fn batch_item(blob: &[u8], context: &[(&str, &str)]) -> pb::BatchDecryptItem {
    pb::BatchDecryptItem {
        ciphertext_blob: blob.to_vec(),
        encryption_context: ctx(context),
        key_id: String::new(),
    }
}

/// The JSON lines of the records of `operation`, in order, through the
/// auditor's API.
async fn records_of(server: &TestServer, operation: &str) -> Vec<serde_json::Value> {
    use pb::audit_service_client::AuditServiceClient;
    let mut auditor = AuditServiceClient::new(server.channel("auditor").await);
    auditor
        .list_events(pb::ListEventsRequest {
            operation: operation.into(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events
        .iter()
        .map(|e| serde_json::from_str(&e.json).unwrap())
        .collect()
}

/// BatchDecrypt's one record names every item: index, the key version that
/// authenticated it (only for an opened blob, never what a refused blob's
/// header claims), its context digest (the same as a single Decrypt's with
/// that context) and its status. Before the fix the record held counts and
/// the versions the headers claimed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_decrypt_record_names_each_items_version_context_and_outcome() {
    let server = TestServer::start().await;
    let a = server.create_key("items/a").await.key_id;
    let b = server.create_key("items/b").await.key_id;
    let mut data = server.data().await;
    let generate = async |data: &mut pb::data_key_service_client::DataKeyServiceClient<_>,
                          key: &str,
                          obj: &str| {
        data.generate_data_key(pb::GenerateDataKeyRequest {
            key_id: key.to_string(),
            encryption_context: ctx(&[("obj", obj)]),
            justification: REASON,
            number_of_bytes: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .ciphertext_blob
    };
    let a1 = generate(&mut data, &a, "1").await;
    server
        .keys()
        .await
        .rotate_key(pb::RotateKeyRequest { key_id: a.clone() })
        .await
        .unwrap();
    let a2 = generate(&mut data, &a, "2").await;
    let b1 = generate(&mut data, &b, "1").await;
    let mut tampered = a1.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;

    let results = data
        .batch_decrypt(pb::BatchDecryptRequest {
            items: vec![
                batch_item(&a1, &[("obj", "1")]),            // 0: a v1
                batch_item(&a2, &[("obj", "2")]),            // 1: a v2
                batch_item(&b1, &[("obj", "1")]),            // 2: b v1
                batch_item(&tampered, &[("obj", "1")]),      // 3: claims a v1
                batch_item(b"not a blob", &[("obj", "1")]),  // 4: unparsable
                batch_item(&a1, &[(&"x".repeat(257), "v")]), // 5: bad context
                batch_item(&a2, &[("obj", "1")]),            // 6: wrong context
            ],
            justification: REASON,
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 7);
    // Single Decrypts give each context's digest, as an auditor would match.
    for (blob, obj) in [(&a1, "1"), (&a2, "2")] {
        data.decrypt(pb::DecryptRequest {
            ciphertext_blob: blob.clone(),
            encryption_context: ctx(&[("obj", obj)]),
            justification: REASON,
            key_id: String::new(),
        })
        .await
        .unwrap();
    }
    let singles = records_of(&server, "Decrypt").await;
    let d1 = singles[0]["context_digest"].as_str().unwrap().to_string();
    let d2 = singles[1]["context_digest"].as_str().unwrap().to_string();
    assert_ne!(d1, d2);

    let batch = records_of(&server, "BatchDecrypt").await;
    assert_eq!(batch.len(), 1, "one record per request");
    let items = batch[0]["items"]
        .as_array()
        .unwrap_or_else(|| panic!("{}", batch[0]));
    let expected = serde_json::json!([
        {"i": 0, "k": a, "v": 1, "c": d1, "s": "OK"},
        {"i": 1, "k": a, "v": 2, "c": d2, "s": "OK"},
        {"i": 2, "k": b, "v": 1, "c": d1, "s": "OK"},
        {"i": 3, "c": d1, "s": "INVALID_ARGUMENT"},
        {"i": 4, "c": d1, "s": "INVALID_ARGUMENT"},
        {"i": 5, "s": "INVALID_ARGUMENT"},
        {"i": 6, "c": d1, "s": "INVALID_ARGUMENT"},
    ]);
    assert_eq!(items, expected.as_array().unwrap(), "{}", batch[0]);
    for (i, r) in results.iter().enumerate() {
        let s = items[i]["s"].as_str().unwrap();
        assert_eq!(r.error.is_none(), s == "OK", "item {i}");
    }

    // One context for the whole batch: stated once, at the top; each item
    // still names its version and outcome. A full batch stays small.
    let results = data
        .batch_decrypt(pb::BatchDecryptRequest {
            items: vec![batch_item(&a1, &[("obj", "1")]); 1000],
            justification: REASON,
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(results.iter().all(|r| r.error.is_none()));
    let batch = records_of(&server, "BatchDecrypt").await;
    let full = &batch[1];
    assert_eq!(full["context_digest"].as_str(), Some(d1.as_str()));
    assert_eq!(full["key_id"].as_str(), Some(a.as_str()));
    let items = full["items"].as_array().unwrap();
    assert_eq!(items.len(), 1000);
    for (i, item) in items.iter().enumerate() {
        assert_eq!(
            item,
            &serde_json::json!({"i": i, "k": a, "v": 1, "s": "OK"}),
            "item {i}"
        );
    }
    let size = full.to_string().len();
    eprintln!("a 1000-item BatchDecrypt record: {size} bytes");
    assert!(size < 80_000, "{size} bytes");
    server.stop().await;
}

/// Pages of the audit API stop at about 1 MiB of records: 64 records of a
/// full batch (about 4.4 MB) would otherwise make one page beyond the
/// 4 MiB a gRPC client accepts. Paging on reads every record once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_pages_of_full_batch_records_fit_a_grpc_message() {
    use pb::audit_service_client::AuditServiceClient;
    let server = TestServer::start().await;
    let a = server.create_key("pages/a").await.key_id;
    let mut data = server.data().await;
    let blob = data
        .generate_data_key(pb::GenerateDataKeyRequest {
            key_id: a,
            encryption_context: ctx(&[("obj", "1")]),
            justification: REASON,
            number_of_bytes: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .ciphertext_blob;
    for _ in 0..64 {
        data.batch_decrypt(pb::BatchDecryptRequest {
            items: vec![batch_item(&blob, &[("obj", "1")]); 1000],
            justification: REASON,
        })
        .await
        .unwrap();
    }
    let mut auditor = AuditServiceClient::new(server.channel("auditor").await);
    let (mut seen, mut pages, mut token) = (0, 0, String::new());
    loop {
        let page = auditor
            .list_events(pb::ListEventsRequest {
                operation: "BatchDecrypt".into(),
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        seen += page.events.len();
        pages += 1;
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(seen, 64);
    assert!(pages >= 4, "{pages} pages");
    server.stop().await;
}
