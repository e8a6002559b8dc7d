//! A client of the XKS proxy API, calling it as AWS KMS does: HTTPS
//! (HTTP/2, optionally with a client certificate), every request signed
//! with SigV4 for the service `kms-xks-proxy` by the AWS SDK's own signer
//! (`aws_sigv4::http_request::sign`, not the verifier's code).
//!
//! `coffre xks …` (an operator checking a front before pointing AWS KMS at
//! it), `coffre bench --ops xks-…` and the tests use it. It holds no key
//! material beyond the credential's secret, which stays in `Zeroizing` and
//! out of every `Debug`. Request and answer bodies are plain JSON values:
//! this is a client for checks and load, which sends test data, not a
//! place to pass real plaintext through.

use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{Context, anyhow, bail};
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use serde_json::{Value, json};
use zeroize::Zeroizing;

/// The answers larger than this are refused (the API's are below 16 KiB).
const MAX_ANSWER: usize = 64 * 1024;

/// Where a front is and how to call it: the fields of `DIR/xks.json`, the
/// CA's certificate, and a client certificate for a front with mTLS.
pub struct Target {
    /// `https://HOST:PORT`.
    pub endpoint: String,
    /// "" or "/a/b": what precedes `/kms/xks/v1`.
    pub uri_prefix: String,
    pub access_key_id: String,
    pub secret_access_key: Zeroizing<String>,
    pub region: String,
    /// PEM: the CA the front's certificate chains to.
    pub ca_pem: Vec<u8>,
    /// PEM certificate chain and private key, for a front with mTLS.
    pub client_identity: Option<(Vec<u8>, Zeroizing<Vec<u8>>)>,
    /// The coffre principal the credential acts as, when the file says.
    pub principal: Option<String>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("endpoint", &self.endpoint)
            .field("uri_prefix", &self.uri_prefix)
            .field("access_key_id", &self.access_key_id)
            .field("region", &self.region)
            .field("mtls", &self.client_identity.is_some())
            .finish_non_exhaustive()
    }
}

impl Target {
    /// `DIR/xks.json` as `coffre dev --xks-listen` writes it (its `ca`
    /// read from the path it names).
    pub fn from_xks_json(path: &std::path::Path) -> anyhow::Result<Self> {
        #[derive(serde::Deserialize)]
        struct File {
            endpoint: String,
            uri_prefix: String,
            access_key_id: String,
            secret_access_key: Zeroizing<String>,
            region: String,
            ca: std::path::PathBuf,
            principal: Option<String>,
        }
        let bytes = Zeroizing::new(std::fs::read(path).with_context(|| {
            format!(
                "reading {} (coffre dev --xks-listen writes it)",
                path.display()
            )
        })?);
        let file: File = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not an xks.json", path.display()))?;
        let ca_pem = std::fs::read(&file.ca)
            .with_context(|| format!("reading the CA {} it names", file.ca.display()))?;
        Ok(Target {
            endpoint: file.endpoint,
            uri_prefix: file.uri_prefix,
            access_key_id: file.access_key_id,
            secret_access_key: file.secret_access_key,
            region: file.region,
            ca_pem,
            client_identity: None,
            principal: file.principal,
        })
    }
}

/// What the front answered: the status, the JSON body, and the id coffre
/// gave the request (`x-request-id`: the audit record's `request_id`).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
    pub request_id: Option<String>,
}

impl Answer {
    /// `errorName` of an error answer.
    pub fn error_name(&self) -> Option<&str> {
        self.body.get("errorName").and_then(Value::as_str)
    }
}

/// A request that got no answer: the connection failed or closed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TransportError(String);

struct Signer {
    access_key_id: String,
    secret_access_key: Zeroizing<String>,
    region: String,
}

/// One HTTP/2 connection to a front; clones share it (requests multiplex).
#[derive(Clone)]
pub struct XksClient {
    send: SendRequest<Full<Bytes>>,
    /// `https://HOST:PORT/PREFIX/kms/xks/v1`.
    base: String,
    origin: String,
    signer: Arc<Signer>,
}

impl std::fmt::Debug for XksClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XksClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

fn tls_config(target: &Target) -> anyhow::Result<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&target.ca_pem) {
        roots
            .add(ca.map_err(|e| anyhow!("the CA is not valid PEM: {e}"))?)
            .context("the CA is not usable as a trust anchor")?;
    }
    if roots.is_empty() {
        bail!("the CA file holds no certificate");
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_root_certificates(roots);
    let mut config = match &target.client_identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow!("the client certificate is not valid PEM: {e}"))?;
            let key = PrivateKeyDer::from_pem_slice(key)
                .map_err(|e| anyhow!("the client key is not a valid PEM private key: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .context("the client certificate and key do not go together")?
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

impl XksClient {
    /// Connects (TCP, TLS with ALPN h2, HTTP/2) to `target.endpoint`.
    pub async fn connect(target: &Target) -> anyhow::Result<Self> {
        let uri: hyper::Uri = target
            .endpoint
            .parse()
            .with_context(|| format!("{:?} is not a URL", target.endpoint))?;
        if uri.scheme_str() != Some("https") {
            bail!("{}: the XKS front is HTTPS only", target.endpoint);
        }
        let host = uri
            .host()
            .with_context(|| format!("{}: no host", target.endpoint))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(443);
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_config(target)?));
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .with_context(|| format!("cannot connect to {}", target.endpoint))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(host.clone())
            .with_context(|| format!("{host:?} is not a server name"))?;
        let tls = connector
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS with {}", target.endpoint))?;
        let (send, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(tls))
            .await
            .with_context(|| format!("HTTP/2 with {}", target.endpoint))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "XKS client connection ended");
            }
        });
        let origin = format!("https://{}", uri.authority().map_or("", |a| a.as_str()));
        Ok(XksClient {
            send,
            base: format!("{origin}{}/kms/xks/v1", target.uri_prefix),
            origin,
            signer: Arc::new(Signer {
                access_key_id: target.access_key_id.clone(),
                secret_access_key: target.secret_access_key.clone(),
                region: target.region.clone(),
            }),
        })
    }

    /// `POST {prefix}/kms/xks/v1/{api}` (`health`, `keys/ID/encrypt`, …),
    /// signed; the answer, whatever its status.
    pub async fn post(&mut self, api: &str, body: &Value) -> Result<Answer, TransportError> {
        let url = format!("{}/{api}", self.base);
        let body = Bytes::from(
            serde_json::to_vec(body).map_err(|e| TransportError(format!("encoding: {e}")))?,
        );
        let signed = self
            .signer
            .sign(&url, &body)
            .map_err(|e| TransportError(format!("signing: {e:#}")))?;
        let mut request = hyper::Request::builder()
            .method(hyper::Method::POST)
            .uri(&url)
            .header(hyper::header::CONTENT_TYPE, "application/json");
        for (name, value) in signed {
            request = request.header(name, value);
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| TransportError(format!("request: {e}")))?;
        self.send_request(request).await
    }

    /// `GET /ping`, the unauthenticated liveness path: the round trip alone.
    pub async fn ping(&mut self) -> Result<u16, TransportError> {
        let request = hyper::Request::builder()
            .method(hyper::Method::GET)
            .uri(format!("{}/ping", self.origin))
            .body(Full::new(Bytes::new()))
            .map_err(|e| TransportError(format!("request: {e}")))?;
        let (status, _, _) = self.round_trip(request).await?;
        Ok(status)
    }

    async fn round_trip(
        &mut self,
        request: hyper::Request<Full<Bytes>>,
    ) -> Result<(u16, Option<String>, Bytes), TransportError> {
        self.send
            .ready()
            .await
            .map_err(|e| TransportError(format!("connection: {e}")))?;
        let response = self
            .send
            .send_request(request)
            .await
            .map_err(|e| TransportError(format!("request: {e}")))?;
        let status = response.status().as_u16();
        let request_id = response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let limited = http_body_util::Limited::new(response.into_body(), MAX_ANSWER);
        let bytes = limited
            .collect()
            .await
            .map_err(|e| TransportError(format!("reading the answer: {e}")))?
            .to_bytes();
        Ok((status, request_id, bytes))
    }

    async fn send_request(
        &mut self,
        request: hyper::Request<Full<Bytes>>,
    ) -> Result<Answer, TransportError> {
        let (status, request_id, bytes) = self.round_trip(request).await?;
        let body = serde_json::from_slice(&bytes).map_err(|_| {
            TransportError(format!(
                "answer {status} is not JSON: {:?}",
                String::from_utf8_lossy(bytes.get(..bytes.len().min(200)).unwrap_or_default())
            ))
        })?;
        Ok(Answer {
            status,
            body,
            request_id,
        })
    }
}

impl Signer {
    /// The headers SigV4 adds (`authorization`, `x-amz-date`), signing
    /// `host`, `content-type` and `x-amz-date` over `body`.
    fn sign(&self, url: &str, body: &[u8]) -> anyhow::Result<Vec<(&'static str, String)>> {
        let identity = aws_credential_types::Credentials::new(
            self.access_key_id.as_str(),
            self.secret_access_key.as_str(),
            None,
            None,
            "coffre-xks-client",
        )
        .into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("kms-xks-proxy")
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .context("signing parameters")?
            .into();
        let request = SignableRequest::new(
            "POST",
            url,
            [("content-type", "application/json")].into_iter(),
            SignableBody::Bytes(body),
        )
        .context("the request to sign")?;
        let (instructions, _signature) = sign(request, &params)
            .context("SigV4 signing")?
            .into_parts();
        let (headers, _params) = instructions.into_parts();
        Ok(headers
            .into_iter()
            .map(|h| (h.name(), h.value().to_string()))
            .collect())
    }
}

/// `requestMetadata` as AWS KMS sends it, with a fresh `kmsRequestId`.
pub fn request_metadata(operation: &str, principal_arn: &str, key_arn: &str) -> Value {
    json!({
        "awsPrincipalArn": principal_arn,
        "kmsKeyArn": key_arn,
        "kmsOperation": operation,
        "kmsRequestId": uuid::Uuid::new_v4().to_string(),
    })
}

/// The health request's `requestMetadata` (no principal, no key).
pub fn health_metadata(operation: &str) -> Value {
    json!({
        "kmsOperation": operation,
        "kmsRequestId": uuid::Uuid::new_v4().to_string(),
    })
}
