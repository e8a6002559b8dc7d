//! The XKS listener: TLS (rustls, ring; HTTP/2 and HTTP/1.1 by ALPN),
//! optionally mutual with the client's root CA and subject CN pinned, and
//! hyper serving [`Front`] on each connection.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::front::Front;

/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 4096;
/// How long a TLS handshake, and a request's headers, may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight requests get to finish at shutdown.
const DRAIN: Duration = Duration::from_secs(10);

/// The XKS listener's TLS material, PEM.
#[derive(Clone)]
pub struct XksTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: zeroize::Zeroizing<Vec<u8>>,
    /// mTLS: the only root CA a client certificate may chain to.
    pub client_ca_pem: Option<Vec<u8>>,
    /// mTLS: the subject CN the client certificate must have (AWS KMS:
    /// `cks.kms.<region>.amazonaws.com`).
    pub client_cn: Option<String>,
}

impl std::fmt::Debug for XksTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XksTls")
            .field("mtls", &self.client_ca_pem.is_some())
            .field("client_cn", &self.client_cn)
            .finish_non_exhaustive()
    }
}

/// A client verifier that also pins the subject CN: a certificate with
/// another CN ends the handshake.
#[derive(Debug)]
struct PinnedSubject {
    inner: Arc<dyn ClientCertVerifier>,
    cn: Option<String>,
}

fn common_names(der: &[u8]) -> Option<Vec<String>> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    cert.subject()
        .iter_common_name()
        .map(|cn| cn.as_str().ok().map(str::to_string))
        .collect()
}

impl ClientCertVerifier for PinnedSubject {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if let Some(pinned) = &self.cn {
            let names = common_names(end_entity).unwrap_or_default();
            if names.is_empty() || names.iter().any(|n| n != pinned) {
                tracing::warn!(presented = ?names, pinned = %pinned, "XKS: client certificate refused (subject CN)");
                return Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::ApplicationVerificationFailure,
                ));
            }
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The rustls configuration; any problem with the material is an error here.
pub fn server_config(tls: &XksTls) -> anyhow::Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = CertificateDer::pem_slice_iter(&tls.cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("xks.cert is not valid PEM: {e}"))?;
    if certs.is_empty() {
        bail!("xks.cert holds no certificate");
    }
    let key = PrivateKeyDer::from_pem_slice(&tls.key_pem)
        .map_err(|e| anyhow!("xks.key is not a valid PEM private key: {e}"))?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let mut config = match &tls.client_ca_pem {
        None => {
            if tls.client_cn.is_some() {
                bail!("xks.client_cn needs xks.client_ca: the CN is pinned on a chain to that CA");
            }
            builder.with_no_client_auth()
        }
        Some(pem) => {
            let mut roots = RootCertStore::empty();
            for ca in CertificateDer::pem_slice_iter(pem) {
                let ca = ca.map_err(|e| anyhow!("xks.client_ca is not valid PEM: {e}"))?;
                roots
                    .add(ca)
                    .context("xks.client_ca is not usable as a trust anchor")?;
            }
            if roots.is_empty() {
                bail!("xks.client_ca holds no certificate");
            }
            let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| anyhow!("building the xks.client_ca verifier: {e}"))?;
            builder.with_client_cert_verifier(Arc::new(PinnedSubject {
                inner,
                cn: tls.client_cn.clone(),
            }))
        }
    }
    .with_single_cert(certs, key)
    .context("xks.cert and xks.key do not go together")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Serves `front` on `listener` until `shutdown`, then lets in-flight
/// requests finish (at most [`DRAIN`]).
pub async fn serve(
    front: Arc<Front>,
    listener: TcpListener,
    config: Arc<ServerConfig>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let acceptor = TlsAcceptor::from(config);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = Arc::clone(&slots).acquire_owned() => permit.context("connection slots")?,
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "XKS: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let front = Arc::clone(&front);
        let builder = Arc::clone(&builder);
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "XKS: TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "XKS: TLS handshake timed out");
                    return;
                }
            };
            let service = service_fn(move |request| Arc::clone(&front).serve(request));
            let connection = builder.serve_connection(TokioIo::new(tls), service);
            if let Err(e) = watcher.watch(connection).await {
                tracing::debug!(%peer, error = %e, "XKS: connection ended with an error");
            }
        });
    }
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "XKS: requests still in flight after {} s; closing",
            DRAIN.as_secs()
        );
    }
    Ok(())
}
