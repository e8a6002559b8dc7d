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
