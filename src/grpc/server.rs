//! The gRPC server: mTLS always on (our own rustls acceptor, see
//! [`super::tls`]), coffre's services, health and reflection.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use super::api::GrpcApi;
use super::pb;
use super::tls::PreparedTls;
use crate::pipeline::Pipeline;

/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many handshakes in progress; beyond, the accept loop waits
/// (new connections queue in the kernel's backlog).
const MAX_PENDING_HANDSHAKES: usize = 256;

/// How long one client connection may live before the server closes it
/// (gracefully): a revoked certificate is refused at the next handshake.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(300);

/// Serves until `shutdown` resolves, then drains in-flight requests.
pub async fn serve(
    pipeline: Arc<Pipeline>,
    audit: Arc<crate::audit::AuditTrail>,
    listener: TcpListener,
    tls: PreparedTls,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;

    let kms = Arc::clone(pipeline.kms());
    let api = GrpcApi::new(pipeline, tls.binding());
    let audit_service = pb::audit_service_server::AuditServiceServer::new(api.clone());
    let key_service = pb::key_service_server::KeyServiceServer::new(api.clone());
    let hsm_service = pb::hsm_service_server::HsmServiceServer::new(api.clone());
    let approval_service = pb::approval_service_server::ApprovalServiceServer::new(api.clone());
    let data_key_service = pb::data_key_service_server::DataKeyServiceServer::new(api);

    // Health follows the HSM: NOT_SERVING while it does not answer.
    let watcher = {
        let kms = Arc::clone(&kms);
        let reporter = health_reporter.clone();
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let status = match kms.check_ready().await {
                    Ok(()) if audit.is_healthy() => ServingStatus::Serving,
                    Ok(()) => {
                        tracing::warn!("not ready: the audit log cannot be written");
                        ServingStatus::NotServing
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "not ready");
                        ServingStatus::NotServing
                    }
                };
                if last != Some(status) {
                    for name in ["", "coffre.v1.KeyService", "coffre.v1.DataKeyService"] {
                        reporter.set_service_status(name, status).await;
                    }
                    last = Some(status);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };

    let (incoming, acceptor) = tls_incoming(listener, TlsAcceptor::from(tls.config));
    // Revocation and expiry are checked at the handshake: bound how long a
    // connection lives so that a revoked certificate is cut off within
    // minutes, not whenever the client reconnects.
    let result = Server::builder()
        .max_connection_age(MAX_CONNECTION_AGE)
        .max_connection_age_grace(Duration::from_secs(30))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(key_service)
        .add_service(data_key_service)
        .add_service(hsm_service)
        .add_service(approval_service)
        .add_service(audit_service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .context("serving gRPC");
    watcher.abort();
    acceptor.abort();
    result
}

/// Accepts TCP connections and completes their TLS handshakes concurrently,
/// each under [`HANDSHAKE_TIMEOUT`]; yields the established TLS streams. A
/// failed handshake (no certificate, another CA, expired, revoked, not TLS)
/// is logged and dropped: it never stops the loop.
fn tls_incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
) -> (
    ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>>,
    JoinHandle<()>,
) {
    let (tx, rx) = mpsc::channel(64);
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    let task = tokio::spawn(async move {
        loop {
            let Ok(permit) = Arc::clone(&pending).acquire_owned().await else {
                return;
            };
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and the like: wait a little rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                drop(permit);
                match handshake {
                    Ok(Ok(stream)) => {
                        // The server has stopped if the receiver is gone.
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::info!(%peer, error = %e, "TLS handshake refused");
                    }
                    Err(_) => {
                        tracing::info!(%peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    (ReceiverStream::new(rx), task)
}
