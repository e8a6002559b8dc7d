//! The gRPC services, in-process on loopback: status mapping.

use std::sync::Arc;

use hsm_sim::proto::fault_injection_client::FaultInjectionClient;
use hsm_sim::proto::hsm_client::HsmClient;
use hsm_sim::proto::*;
use hsm_sim::server::{FAULT_INJECTION_DISABLED, ServerOptions};
use tonic::Code;
use tonic::transport::Channel;

use crate::{PIN, token};

struct Server {
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

async fn start(sim: hsm_sim::Simulator, options: ServerOptions) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        hsm_sim::server::serve(listener, Arc::new(sim), options, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Server {
        url,
        stop: Some(tx),
        task,
    }
}

impl Server {
    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.await.unwrap();
    }
}

async fn clients(url: &str) -> (HsmClient<Channel>, FaultInjectionClient<Channel>) {
    let ch = Channel::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    (HsmClient::new(ch.clone()), FaultInjectionClient::new(ch))
}

#[tokio::test]
async fn grpc_round_trip_and_status_mapping() {
    let (_d, _p, sim) = token();
    let server = start(sim, ServerOptions::default().with_fault_injection(true)).await;
    let (mut hsm, mut faults) = clients(&server.url).await;

    let err = hsm
        .login(LoginRequest { pin: "bad".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let session = hsm
        .login(LoginRequest { pin: PIN.into() })
        .await
        .unwrap()
        .into_inner()
        .session;
    assert_eq!(session.len(), 16);

    let w = hsm
        .wrap(WrapRequest {
            session: session.clone(),
            plaintext: b"over the wire".to_vec(),
            aad: b"aad".to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(w.root_key_id, 1);
    let pt = hsm
        .unwrap(UnwrapRequest {
            session: session.clone(),
            wrapped: w.wrapped.clone(),
            aad: b"aad".to_vec(),
        })
        .await
        .unwrap()
        .into_inner()
        .plaintext;
    assert_eq!(pt, b"over the wire");

    // Wrong AAD: INVALID_ARGUMENT, generic message.
    let err = hsm
        .unwrap(UnwrapRequest {
            session: session.clone(),
            wrapped: w.wrapped.clone(),
            aad: b"nope".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(!err.message().contains("tag"));

    // Malformed or unknown sessions: UNAUTHENTICATED.
    for bad in [vec![], vec![0; 16], vec![1; 3]] {
        let err = hsm
            .generate_random(GenerateRandomRequest {
                session: bad,
                length: 8,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    let err = hsm
        .generate_random(GenerateRandomRequest {
            session: session.clone(),
            length: 5000,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let err = hsm
        .destroy_root_key(DestroyRootKeyRequest {
            session: session.clone(),
            root_key_id: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // Outage: UNAVAILABLE, GetInfo included.
    let state = faults
        .set_faults(SetFaultsRequest {
            latency_ms: 0,
            error_rate: 0.0,
            outage: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(state.outage);
    let err = hsm.get_info(GetInfoRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    let err = hsm
        .wrap(WrapRequest {
            session: session.clone(),
            plaintext: b"x".to_vec(),
            aad: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    let err = faults
        .set_faults(SetFaultsRequest {
            latency_ms: 0,
            error_rate: 2.0,
            outage: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    faults
        .set_faults(SetFaultsRequest::default())
        .await
        .unwrap();

    // Tamper: FAILED_PRECONDITION, with the reason `Tampered`.
    faults.tamper(TamperRequest {}).await.unwrap();
    assert!(
        faults
            .get_faults(GetFaultsRequest {})
            .await
            .unwrap()
            .into_inner()
            .tampered
    );
    let err = hsm
        .unwrap(UnwrapRequest {
            session: session.clone(),
            wrapped: w.wrapped,
            aad: b"aad".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        hsm_sim::status::reason(&err),
        Some(hsm_sim::status::Reason::Tampered)
    );
    let info = hsm.get_info(GetInfoRequest {}).await.unwrap().into_inner();
    assert!(info.tampered);
    assert!(info.root_key_ids.is_empty());

    hsm.logout(LogoutRequest { session }).await.unwrap();
    drop((hsm, faults));
    server.stop().await;
}

#[tokio::test]
async fn fault_injection_is_refused_unless_enabled() {
    let (_d, _p, sim) = token();
    let server = start(sim, ServerOptions::default()).await;
    let (mut hsm, mut faults) = clients(&server.url).await;

    let refused = |err: tonic::Status| {
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        assert_eq!(err.message(), FAULT_INJECTION_DISABLED);
        assert!(err.message().contains("--allow-fault-injection"));
    };
    refused(faults.tamper(TamperRequest {}).await.unwrap_err());
    refused(
        faults
            .set_faults(SetFaultsRequest {
                latency_ms: 0,
                error_rate: 0.0,
                outage: true,
            })
            .await
            .unwrap_err(),
    );
    refused(faults.get_faults(GetFaultsRequest {}).await.unwrap_err());

    // Nothing happened: the token is intact and serves key operations.
    let info = hsm.get_info(GetInfoRequest {}).await.unwrap().into_inner();
    assert!(!info.tampered);
    assert_eq!(info.root_key_ids, vec![1]);
    let session = hsm
        .login(LoginRequest { pin: PIN.into() })
        .await
        .unwrap()
        .into_inner()
        .session;
    hsm.wrap(WrapRequest {
        session,
        plaintext: b"still fine".to_vec(),
        aad: vec![],
    })
    .await
    .unwrap();

    drop((hsm, faults));
    server.stop().await;
}

#[test]
fn server_options_default_to_no_fault_injection() {
    assert!(!ServerOptions::default().allow_fault_injection);
    assert!(
        ServerOptions::default()
            .with_fault_injection(true)
            .allow_fault_injection
    );
}
