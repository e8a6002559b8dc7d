//! coffre's data-key RPCs over mTLS, with typed errors, and sealing and
//! opening built on them: [`Client::sealer`] asks for a data key and
//! starts a message; [`Client::opener`] reads a message's header, asks
//! coffre to decrypt its data key (coffre checks the key's state and
//! policy and records the request), and opens the frames.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use zeroize::{Zeroize, Zeroizing};

use crate::format::{DEFAULT_FRAME_LEN, DataKey, FormatError, Header};
use crate::stream::{Opener, Sealer};

#[allow(
    missing_debug_implementations,
    clippy::all,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
mod pb {
    tonic::include_proto!("coffre.v1");
}

pub use pb::AccessReason;

/// Why a call failed, by what the caller can do about it. The message is
/// the server's (it names no secret), with its request id when it gave
/// one (the audit record's `request_id`).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The key is disabled, pending deletion or destroyed (the operator's
    /// decision), or the version is retired: `FAILED_PRECONDITION`.
    #[error("the key cannot be used now: {0}")]
    KeyUnusable(String),
    /// The key does not exist, or this principal may not use it for this
    /// operation, context or justification: `PERMISSION_DENIED` /
    /// `NOT_FOUND` (coffre does not say which).
    #[error("refused: {0}")]
    Refused(String),
    /// The wrapped data key does not open with this context, or is not
    /// coffre's: `INVALID_ARGUMENT` on Decrypt.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Rate-limited: `RESOURCE_EXHAUSTED`. Retry later.
    #[error("throttled: {0}")]
    Throttled(String),
    /// coffre (or its HSM, store or audit log) cannot serve now, or the
    /// connection failed: retry.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The certificate was refused: `UNAUTHENTICATED`.
    #[error("not authenticated: {0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Other(String),
    /// The message is malformed or not authentic.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The header's context is not the one the caller asserted.
    #[error("the message's context is {found:?}, not the one expected")]
    ContextMismatch { found: BTreeMap<String, String> },
    /// Connecting: a bad endpoint, certificate or key.
    #[error("connecting: {0}")]
    Connect(String),
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        let mut message = s.message().to_string();
        if let Some(id) = s
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
        {
            message.push_str(&format!(" (request id {id})"));
        }
        match s.code() {
            tonic::Code::FailedPrecondition => ClientError::KeyUnusable(message),
            tonic::Code::PermissionDenied | tonic::Code::NotFound => ClientError::Refused(message),
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => ClientError::Invalid(message),
            tonic::Code::ResourceExhausted => ClientError::Throttled(message),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                ClientError::Unavailable(message)
            }
            tonic::Code::Unauthenticated => ClientError::Unauthenticated(message),
            code => ClientError::Other(format!("{code:?}: {message}")),
        }
    }
}

/// Where coffre is and who this service is: PEM bytes of the CA that
/// issued coffre's certificate, of this service's certificate and key.
pub struct Connection {
    /// `https://HOST:PORT`.
    pub endpoint: String,
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Zeroizing<Vec<u8>>,
    /// Per-call deadline.
    pub timeout: Duration,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("endpoint", &self.endpoint)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// A data key from GenerateDataKey: its plaintext (zeroized on drop), its
/// wrapped form and which key version wrapped it.
#[derive(Debug)]
pub struct GeneratedKey {
    pub data_key: DataKey,
    pub blob: Vec<u8>,
    pub key_id: String,
    pub key_version: u32,
}

/// A connection to coffre's DataKeyService, cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    data: pb::data_key_service_client::DataKeyServiceClient<Channel>,
    reason: AccessReason,
}

impl Client {
    /// Connects with mTLS. Every call declares `CUSTOMER_INITIATED_ACCESS`
    /// unless [`Client::with_reason`] says otherwise.
    pub async fn connect(c: &Connection) -> Result<Self, ClientError> {
        let uri: tonic::transport::Uri = c
            .endpoint
            .parse()
            .map_err(|e| ClientError::Connect(format!("{:?}: {e}", c.endpoint)))?;
        if uri.scheme_str() != Some("https") {
            return Err(ClientError::Connect(format!(
                "{:?}: coffre is reached over https:// only",
                c.endpoint
            )));
        }
        let host = uri
            .host()
            .unwrap_or("localhost")
            .trim_matches(['[', ']'])
            .to_string();
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&c.ca_pem))
            .identity(Identity::from_pem(&c.cert_pem, &*c.key_pem))
            .domain_name(host);
        let channel = Endpoint::from(uri)
            .tls_config(tls)
            .map_err(|e| ClientError::Connect(format!("TLS: {e}")))?
            .timeout(c.timeout)
            .connect_timeout(Duration::from_secs(10))
            .connect()
            .await
            .map_err(|e| {
                ClientError::Unavailable(format!("cannot connect to {}: {e}", c.endpoint))
            })?;
        Ok(Client {
            data: pb::data_key_service_client::DataKeyServiceClient::new(channel),
            reason: AccessReason::CustomerInitiatedAccess,
        })
    }

    /// A client on a channel made elsewhere (with its own TLS settings and
    /// diagnostics, as the `coffre` CLI does).
    pub fn from_channel(channel: Channel) -> Self {
        Client {
            data: pb::data_key_service_client::DataKeyServiceClient::new(channel),
            reason: AccessReason::CustomerInitiatedAccess,
        }
    }

    /// The justification every later call declares (recorded in coffre's
    /// audit log; the key's policy may refuse it).
    pub fn with_reason(mut self, reason: AccessReason) -> Self {
        self.reason = reason;
        self
    }

    /// GenerateDataKey: a fresh 32-byte data key under `key`, bound to
    /// `context`.
    pub async fn generate_data_key(
        &self,
        key: &str,
        context: &BTreeMap<String, String>,
    ) -> Result<GeneratedKey, ClientError> {
        let mut response = self
            .data
            .clone()
            .generate_data_key(pb::GenerateDataKeyRequest {
                key_id: key.to_string(),
                encryption_context: context.clone().into_iter().collect(),
                justification: self.reason as i32,
                number_of_bytes: 32,
            })
            .await?
            .into_inner();
        let data_key = DataKey::from_slice(&response.plaintext);
        response.plaintext.zeroize();
        Ok(GeneratedKey {
            data_key: data_key?,
            blob: std::mem::take(&mut response.ciphertext_blob),
            key_id: std::mem::take(&mut response.key_id),
            key_version: response.key_version,
        })
    }

    /// Decrypt: the data key `blob` wraps, if `context` is the one it was
    /// made with and coffre allows it now.
    pub async fn decrypt(
        &self,
        blob: &[u8],
        context: &BTreeMap<String, String>,
    ) -> Result<DataKey, ClientError> {
        let mut response = self
            .data
            .clone()
            .decrypt(pb::DecryptRequest {
                ciphertext_blob: blob.to_vec(),
                encryption_context: context.clone().into_iter().collect(),
                justification: self.reason as i32,
                key_id: String::new(),
            })
            .await?
            .into_inner();
        let data_key = DataKey::from_slice(&response.plaintext);
        response.plaintext.zeroize();
        Ok(data_key?)
    }

    /// Starts a sealed message to `output` under a fresh data key of `key`
    /// bound to `context` (the header is written at once); write the
    /// plaintext to it, then call [`Sealer::finish`].
    pub async fn sealer<W: Write>(
        &self,
        key: &str,
        context: BTreeMap<String, String>,
        output: W,
    ) -> Result<(Sealer<W>, GeneratedKey), ClientError> {
        crate::format::check_context(&context).map_err(FormatError::InvalidInput)?;
        let generated = self.generate_data_key(key, &context).await?;
        let sealer = Sealer::new(
            output,
            &generated.data_key,
            context,
            generated.blob.clone(),
            DEFAULT_FRAME_LEN,
        )?;
        Ok((sealer, generated))
    }

    /// Reads the header of the message on `input`, has coffre decrypt its
    /// data key with the header's context (which must equal `expected`
    /// when given), and returns a reader of its plaintext, with the header.
    pub async fn opener<R: Read>(
        &self,
        mut input: R,
        expected: Option<&BTreeMap<String, String>>,
    ) -> Result<(Opener<R>, Header), ClientError> {
        let header = Header::read_from(&mut input)?;
        if let Some(expected) = expected {
            if *expected != header.context {
                return Err(ClientError::ContextMismatch {
                    found: header.context.clone(),
                });
            }
        }
        let data_key = self.decrypt(&header.blob, &header.context).await?;
        let opener = Opener::new(input, &header, &data_key)?;
        Ok((opener, header))
    }
}
