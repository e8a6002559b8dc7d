//! HSM faults against a running server (the simulator's fault injection):
//! latency against the caller's deadline, random errors, an outage and the
//! return from it, a tamper response. What needs the HSM fails with a clear
//! status and changes nothing; what does not keeps working (or, after a
//! tamper, deliberately stops).

use std::time::{Duration, Instant};

use coffre::grpc::pb::{self, audit_service_client::AuditServiceClient};
use hsm_sim::Faults;
use tonic::{Code, Request};

use crate::common::clients::{assert_exactly_these_exist, create_keys_through_errors};
use crate::common::{REASON, TestServer, ctx};

fn generate(key: &str) -> pb::GenerateDataKeyRequest {
    pb::GenerateDataKeyRequest {
        key_id: key.to_string(),
        encryption_context: ctx(&[("tenant", "acme")]),
        justification: REASON,
        number_of_bytes: 32,
    }
}

fn decrypt(blob: &[u8]) -> pb::DecryptRequest {
    pb::DecryptRequest {
        ciphertext_blob: blob.to_vec(),
        encryption_context: ctx(&[("tenant", "acme")]),
        justification: REASON,
        key_id: String::new(),
    }
}

fn simulator(server: &TestServer) -> std::sync::Arc<hsm_sim::Simulator> {
    server.server.as_ref().unwrap().simulator.clone().unwrap()
}

/// Audit records of `operation`, polled until `done` holds (records of
/// abandoned requests are written in the background).
async fn events_until(
    server: &TestServer,
    operation: &str,
    done: impl Fn(&[pb::AuditEvent]) -> bool,
) -> Vec<pb::AuditEvent> {
    let mut auditor = AuditServiceClient::new(server.channel("auditor").await);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = auditor
            .list_events(pb::ListEventsRequest {
                page_size: 1000,
                operation: operation.to_string(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .events;
        if done(&events) || Instant::now() > deadline {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A slow HSM: the caller's deadline is kept (the request ends when it
/// passes, not when the HSM answers), nothing is half-created, the abandoned
/// request still has its audit record, and cached keys serve at full speed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_hsm_never_holds_a_caller_past_its_deadline() {
    let server = TestServer::start().await;
    server.create_key("warm").await;
    let mut data = server.data().await;
    let dk = data
        .generate_data_key(generate("warm"))
        .await
        .unwrap()
        .into_inner();

    let sim = simulator(&server);
    sim.set_faults(Faults {
        latency: Duration::from_millis(3000),
        ..Default::default()
    })
    .unwrap();
    let mut keys = server.keys().await;
    let mut request = Request::new(pb::CreateKeyRequest {
        alias: "too-slow".into(),
        ..Default::default()
    });
    request.set_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let err = keys.create_key(request).await.unwrap_err();
    let waited = started.elapsed();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    assert!(
        waited < Duration::from_millis(2500),
        "the caller waited {waited:?} for a 300 ms deadline (the HSM takes 3 s)"
    );

    // A cached key does not wait for the HSM at all.
    let opened = data.decrypt(decrypt(&dk.ciphertext_blob)).await.unwrap();
    assert_eq!(opened.into_inner().plaintext, dk.plaintext);

    sim.set_faults(Faults::default()).unwrap();
    // Give an HSM call that was under way time to finish: still nothing
    // created, since the request was dropped before its store write.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let err = keys
        .get_key(pb::GetKeyRequest {
            key_id: "too-slow".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // The abandoned request has its record, marked as such.
    let events = events_until(&server, "CreateKey", |e| {
        e.iter().any(|r| r.status_code == "CANCELLED")
    })
    .await;
    let abandoned: Vec<_> = events
        .iter()
        .filter(|r| r.status_code == "CANCELLED")
        .collect();
    assert_eq!(abandoned.len(), 1, "{events:#?}");
    assert!(
        abandoned[0].detail.contains("went away before the answer"),
        "{:?}",
        abandoned[0]
    );
    assert!(
        abandoned[0].principal.ends_with("/operator"),
        "{:?}",
        abandoned[0]
    );
    server.stop().await;
}

/// One HSM call in ten fails: each request either succeeds or fails with
/// UNAVAILABLE naming the HSM, and exactly the acknowledged keys exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_hsm_errors_fail_requests_cleanly_and_create_nothing_partial() {
    let server = TestServer::start().await;
    let sim = simulator(&server);
    sim.set_faults(Faults {
        error_rate: 0.1,
        ..Default::default()
    })
    .unwrap();
    let mut keys = server.keys().await;
    let created = create_keys_through_errors(&mut keys).await;
    sim.set_faults(Faults::default()).unwrap();
    assert_exactly_these_exist(&mut keys, &created).await;
    let mut data = server.data().await;
    for alias in &created {
        let dk = data
            .generate_data_key(generate(alias))
            .await
            .unwrap()
            .into_inner();
        let opened = data.decrypt(decrypt(&dk.ciphertext_blob)).await.unwrap();
        assert_eq!(opened.into_inner().plaintext, dk.plaintext);
    }
    server.stop().await;
}

/// An outage: cached CMK versions keep serving (see SECURITY.md), what
/// needs the HSM fails with UNAVAILABLE, a disable still takes effect, and
/// once the HSM is back the next request that needs it succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_spares_cached_keys_and_ends_when_the_hsm_returns() {
    let server = TestServer::start().await;
    server.create_key("warm").await;
    server.create_key("to-disable").await;
    let mut data = server.data().await;
    let dk = data
        .generate_data_key(generate("warm"))
        .await
        .unwrap()
        .into_inner();
    data.generate_data_key(generate("to-disable"))
        .await
        .unwrap();

    let sim = simulator(&server);
    sim.set_faults(Faults {
        outage: true,
        ..Default::default()
    })
    .unwrap();
    let mut keys = server.keys().await;
    let err = keys
        .create_key(pb::CreateKeyRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("HSM"), "{}", err.message());
    for _ in 0..20 {
        let opened = data.decrypt(decrypt(&dk.ciphertext_blob)).await.unwrap();
        assert_eq!(opened.into_inner().plaintext, dk.plaintext);
        data.generate_data_key(generate("warm")).await.unwrap();
    }
    keys.disable_key(pb::DisableKeyRequest {
        key_id: "to-disable".into(),
    })
    .await
    .unwrap();
    let err = data
        .generate_data_key(generate("to-disable"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // The HSM returns: the very next request that needs it is served
    // (coffre keeps no "HSM down" state of its own to wait out).
    sim.set_faults(Faults::default()).unwrap();
    keys.create_key(pb::CreateKeyRequest::default())
        .await
        .unwrap();
    server.stop().await;
}

/// A tamper response destroys the HSM's root keys: coffre stops serving
/// even the CMK versions it had cached (within the health probe's second),
/// since the HSM's own response is to make every key unusable; the store is
/// unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tamper_response_also_ends_cached_keys() {
    let server = TestServer::start().await;
    server.create_key("warm").await;
    let mut data = server.data().await;
    let dk = data
        .generate_data_key(generate("warm"))
        .await
        .unwrap()
        .into_inner();
    let sim = simulator(&server);
    sim.tamper().unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        match data.decrypt(decrypt(&dk.ciphertext_blob)).await {
            Err(e) => break e,
            Ok(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(_) => panic!("cached keys still served 10 s after the tamper response"),
        }
    };
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let err = data.generate_data_key(generate("warm")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let shown = server
        .keys()
        .await
        .get_key(pb::GetKeyRequest {
            key_id: "warm".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.versions.len(), 1, "the store is unchanged");
    server.stop().await;
}
