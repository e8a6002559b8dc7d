//! The gRPC server: mTLS always on, coffre's services, health and reflection.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;

use super::pb;
use super::services::Api;
use crate::service::Kms;

/// The server's TLS material, PEM-encoded. Client certificates are required
/// and must chain to `client_ca_pem`.
#[derive(Clone)]
pub struct ServerTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: zeroize::Zeroizing<Vec<u8>>,
    pub client_ca_pem: Vec<u8>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}

/// Serves until `shutdown` resolves, then drains in-flight requests.
pub async fn serve(
    kms: Arc<Kms>,
    listener: TcpListener,
    tls: ServerTls,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let tls_config = ServerTlsConfig::new()
        .identity(Identity::from_pem(&tls.cert_pem, &*tls.key_pem))
        .client_ca_root(Certificate::from_pem(&tls.client_ca_pem))
        .client_auth_optional(false)
        .timeout(Duration::from_secs(10));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;

    let api = Api::new(Arc::clone(&kms));
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
                    Ok(()) => ServingStatus::Serving,
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

    let result = Server::builder()
        .tls_config(tls_config)
        .context("configuring TLS")?
        .add_service(health_service)
        .add_service(reflection)
        .add_service(key_service)
        .add_service(data_key_service)
        .add_service(hsm_service)
        .add_service(approval_service)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
        .context("serving gRPC");
    watcher.abort();
    result
}
