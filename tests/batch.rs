//! The batch RPCs over real gRPC: BatchGenerateDataKey makes keys that the
//! single Decrypt opens; BatchDecrypt answers each item as Decrypt would,
//! in order; bad batches are refused whole; one audit record per request.

use coffre::grpc::pb::{self, audit_service_client::AuditServiceClient};
use tonic::Code;

use crate::common::{REASON, TestServer, ctx};

fn item(blob: &[u8], context: &[(&str, &str)]) -> pb::BatchDecryptItem {
    pb::BatchDecryptItem {
        ciphertext_blob: blob.to_vec(),
        encryption_context: ctx(context),
        key_id: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_generate_makes_keys_that_decrypt_one_by_one() {
    let server = TestServer::start().await;
    let key_id = server.create_key("batch/gen").await.key_id;
    let context = [("tenant", "acme")];
    let mut data = server.data().await;

    let batch = data
        .batch_generate_data_key(pb::BatchGenerateDataKeyRequest {
            key_id: "batch/gen".into(),
            encryption_context: ctx(&context),
            justification: REASON,
            number_of_bytes: 48,
            count: 100,
            without_plaintext: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(batch.key_id, key_id);
    assert_eq!(batch.key_version, 1);
    assert_eq!(batch.data_keys.len(), 100);
    let mut seen = std::collections::HashSet::new();
    for k in &batch.data_keys {
        assert_eq!(k.error, None);
        assert_eq!(k.plaintext.len(), 48);
        assert!(seen.insert(k.plaintext.clone()), "data keys repeat");
        assert!(seen.insert(k.ciphertext_blob.clone()), "blobs repeat");
    }
    // Every blob opens alone, to its own plaintext, and only with its context.
    for k in batch.data_keys.iter().step_by(9) {
        let opened = data
            .decrypt(pb::DecryptRequest {
                ciphertext_blob: k.ciphertext_blob.clone(),
                encryption_context: ctx(&context),
                justification: REASON,
                key_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(opened.plaintext, k.plaintext);
        let wrong = data
            .decrypt(pb::DecryptRequest {
                ciphertext_blob: k.ciphertext_blob.clone(),
                encryption_context: ctx(&[("tenant", "other")]),
                justification: REASON,
                key_id: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(wrong.code(), Code::InvalidArgument);
    }

    let without = data
        .batch_generate_data_key(pb::BatchGenerateDataKeyRequest {
            key_id: key_id.clone(),
            justification: REASON,
            count: 1000,
            without_plaintext: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(without.data_keys.len(), 1000);
    assert!(
        without
            .data_keys
            .iter()
            .all(|k| k.plaintext.is_empty() && k.error.is_none() && !k.ciphertext_blob.is_empty())
    );

    // Refused whole, with the single form's codes.
    for (what, req, code) in [
        (
            "count 0",
            pb::BatchGenerateDataKeyRequest {
                key_id: key_id.clone(),
                justification: REASON,
                count: 0,
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            "count 1001",
            pb::BatchGenerateDataKeyRequest {
                key_id: key_id.clone(),
                justification: REASON,
                count: 1001,
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            "8-byte keys",
            pb::BatchGenerateDataKeyRequest {
                key_id: key_id.clone(),
                justification: REASON,
                count: 2,
                number_of_bytes: 8,
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            "unknown key",
            pb::BatchGenerateDataKeyRequest {
                key_id: "no/such/key".into(),
                justification: REASON,
                count: 2,
                ..Default::default()
            },
            Code::PermissionDenied,
        ),
        (
            "refused reason",
            pb::BatchGenerateDataKeyRequest {
                key_id: key_id.clone(),
                justification: pb::AccessReason::ThirdPartyDataRequest as i32,
                count: 2,
                ..Default::default()
            },
            Code::PermissionDenied,
        ),
    ] {
        let err = data.batch_generate_data_key(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{what}: {err:?}");
    }

    // A disabled key serves no batch either.
    server
        .keys()
        .await
        .disable_key(pb::DisableKeyRequest {
            key_id: key_id.clone(),
        })
        .await
        .unwrap();
    let err = data
        .batch_generate_data_key(pb::BatchGenerateDataKeyRequest {
            key_id: key_id.clone(),
            justification: REASON,
            count: 2,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_decrypt_answers_each_item_in_order() {
    let server = TestServer::start().await;
    let a = server.create_key("batch/a").await.key_id;
    let b = server.create_key("batch/b").await.key_id;
    let off = server.create_key("batch/off").await.key_id;
    let mut data = server.data().await;
    let mut generate = async |key: &str, context: &[(&str, &str)]| {
        let k = data
            .generate_data_key(pb::GenerateDataKeyRequest {
                key_id: key.to_string(),
                encryption_context: ctx(context),
                justification: REASON,
                number_of_bytes: 0,
            })
            .await
            .unwrap()
            .into_inner();
        (k.plaintext, k.ciphertext_blob)
    };
    let (pa, ba) = generate(&a, &[("obj", "1")]).await;
    let (pb_, bb) = generate(&b, &[("obj", "2")]).await;
    let (_, boff) = generate(&off, &[]).await;
    server
        .keys()
        .await
        .disable_key(pb::DisableKeyRequest {
            key_id: off.clone(),
        })
        .await
        .unwrap();
    let mut tampered = ba.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;

    let mut wrong_key = item(&ba, &[("obj", "1")]);
    wrong_key.key_id = "batch/b".into();
    let mut named_key = item(&bb, &[("obj", "2")]);
    named_key.key_id = "batch/b".into();
    let items = vec![
        item(&ba, &[("obj", "1")]),            // 0: ok, key a
        item(&bb, &[("obj", "2")]),            // 1: ok, key b
        item(&ba, &[("obj", "2")]),            // 2: wrong context
        item(&tampered, &[("obj", "1")]),      // 3: tampered
        item(&boff, &[]),                      // 4: disabled key
        item(b"not a blob", &[]),              // 5: unparsable
        item(&ba, &[(&"x".repeat(257), "v")]), // 6: malformed context
        wrong_key,                             // 7: blob of another key
        named_key,                             // 8: ok, key named
        item(&ba, &[("obj", "1")]),            // 9: ok again
    ];
    let results = data
        .batch_decrypt(pb::BatchDecryptRequest {
            items,
            justification: REASON,
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 10);
    let code = |i: usize| results[i].error.as_ref().map(|e| Code::from(e.code));
    for (i, plaintext, key) in [(0, &pa, &a), (1, &pb_, &b), (8, &pb_, &b), (9, &pa, &a)] {
        assert_eq!(code(i), None, "item {i}");
        assert_eq!(&results[i].plaintext, plaintext, "item {i}");
        assert_eq!(&results[i].key_id, key, "item {i}");
        assert_eq!(results[i].key_version, 1);
    }
    for (i, expected) in [
        (2, Code::InvalidArgument),
        (3, Code::InvalidArgument),
        (4, Code::FailedPrecondition),
        (5, Code::InvalidArgument),
        (6, Code::InvalidArgument),
        (7, Code::InvalidArgument),
    ] {
        assert_eq!(code(i), Some(expected), "item {i}: {:?}", results[i].error);
        assert!(
            results[i].plaintext.is_empty(),
            "item {i} leaks a plaintext"
        );
    }
    // The refusal of a tampered blob says nothing about what was wrong.
    assert_eq!(
        results[2].error.as_ref().unwrap().message,
        results[3].error.as_ref().unwrap().message
    );

    // Refused whole: no item, too many items, a caller without the role.
    let err = data
        .batch_decrypt(pb::BatchDecryptRequest {
            items: vec![],
            justification: REASON,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = data
        .batch_decrypt(pb::BatchDecryptRequest {
            items: vec![item(&ba, &[("obj", "1")]); 1001],
            justification: REASON,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let mut operator =
        pb::data_key_service_client::DataKeyServiceClient::new(server.channel("operator").await);
    let err = operator
        .batch_decrypt(pb::BatchDecryptRequest {
            items: vec![item(b"junk", &[])],
            justification: REASON,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // A full batch: 1000 items, every one opened.
    let results = data
        .batch_decrypt(pb::BatchDecryptRequest {
            items: vec![item(&ba, &[("obj", "1")]); 1000],
            justification: REASON,
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 1000);
    assert!(
        results
            .iter()
            .all(|r| r.error.is_none() && r.plaintext == pa)
    );

    // One record per batch request, naming what the batch touched.
    let mut auditor = AuditServiceClient::new(server.channel("auditor").await);
    let events = auditor
        .list_events(pb::ListEventsRequest {
            operation: "BatchDecrypt".into(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(events.len(), 5, "{events:#?}");
    let mixed = &events[0];
    assert_eq!(mixed.outcome(), pb::AuditOutcome::Allowed);
    assert_eq!(mixed.key_id, "", "several keys: none named alone");
    assert!(
        mixed
            .detail
            .starts_with("batch of 10: 4 ok, 6 failed; keys "),
        "{}",
        mixed.detail
    );
    for key in [&a, &b, &off] {
        assert!(mixed.detail.contains(key.as_str()), "{}", mixed.detail);
    }
    assert!(
        mixed.detail.ends_with("; 1 unreadable blobs"),
        "{}",
        mixed.detail
    );
    let refused: Vec<_> = events[1..4]
        .iter()
        .map(|e| e.status_code.as_str())
        .collect();
    assert_eq!(
        refused,
        ["INVALID_ARGUMENT", "INVALID_ARGUMENT", "PERMISSION_DENIED"]
    );
    let full = &events[4];
    assert_eq!(full.key_id, a);
    assert_eq!(full.key_version, Some(1));
    assert_eq!(full.detail, "batch of 1000: 1000 ok, 0 failed");
    assert!(!full.context_digest.is_empty(), "one context: its digest");
    server.stop().await;
}
