//! One XKS request, from HTTP to the pipeline and back.
//!
//! ```text
//!  path ──▶ route ──(unknown: 404 InvalidUriPathException; GET: 405)
//!        ──▶ body (at most MAX_BODY bytes, within BODY_TIMEOUT)
//!        ──▶ SigV4 ──▶ Pipeline::handle(op, caller or why not,
//!                         body: JSON → domain types → Kms::xks_* → JSON)
//!        ──▶ 200 JSON, or {errorName, errorMessage} with its status
//! ```
//!
//! Unknown paths and wrong methods are answered before authentication and
//! are not audit records (they name no operation, as an unknown gRPC
//! method); every request on an API path is, signed or not.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use zeroize::Zeroizing;

use super::sigv4::{Signed, Verifier};
use super::wire::{self, json};
use crate::authz::{Caller, Operation};
use crate::error::Error;
use crate::metrics::probes::{Component, Report};
use crate::model::{AccessReason, EncryptionContext, KeyRef, MAX_REQUEST_METADATA_VALUE_LEN};
use crate::pipeline::{Cause, Code, Failure, Pipeline, RequestAudit, RequestFacts};
use crate::service::xks::{self as core, XksCiphertext, XksHealth, XksUse};

/// The largest request body: a 4300-byte plaintext and an 8192-byte AAD in
/// base64, with request metadata of 2048-character ARNs, fit well.
pub const MAX_BODY: usize = 64 * 1024;
/// How long a body may take to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// The plain liveness path for load balancers (`GET`, no authentication).
pub const LIVENESS_PATH: &str = "/ping";
/// The longest `errorMessage` the API allows is 511 characters.
const MAX_ERROR_MESSAGE: usize = 511;

/// The shared state of the front.
#[derive(Debug)]
pub struct Front {
    pub(super) pipeline: Arc<Pipeline>,
    pub(super) verifier: Verifier,
    /// `[xks] uri_prefix`: "" or "/a/b".
    pub(super) prefix: String,
    /// How long a request may take in the core (the HSM, the store).
    pub(super) deadline: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    Metadata,
    Encrypt,
    Decrypt,
    Health,
}

impl Api {
    fn op(self) -> Operation {
        match self {
            Api::Metadata => Operation::XksGetKeyMetadata,
            Api::Encrypt => Operation::XksEncrypt,
            Api::Decrypt => Operation::XksDecrypt,
            Api::Health => Operation::XksGetHealthStatus,
        }
    }
}

/// Whether `id` can be an `externalKeyId` in a path.
pub(crate) fn is_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The API a path names under `prefix`, with its external key id.
fn route<'p>(prefix: &str, path: &'p str) -> Option<(Api, &'p str)> {
    let rest = path.strip_prefix(prefix)?.strip_prefix("/kms/xks/v1/")?;
    if rest == "health" {
        return Some((Api::Health, ""));
    }
    let (id, api) = rest.strip_prefix("keys/")?.split_once('/')?;
    let api = match api {
        "metadata" => Api::Metadata,
        "encrypt" => Api::Encrypt,
        "decrypt" => Api::Decrypt,
        _ => return None,
    };
    is_key_id(id).then_some((api, id))
}

/// The status and `errorName` of a failure (the API's table).
pub fn error_name(failure: &Failure) -> (StatusCode, &'static str) {
    match (failure.code(), failure.cause()) {
        (Code::InvalidArgument, Cause::Ciphertext) => {
            (StatusCode::BAD_REQUEST, "InvalidCiphertextException")
        }
        (Code::InvalidArgument | Code::OutOfRange, _) => {
            (StatusCode::BAD_REQUEST, "ValidationException")
        }
        (Code::FailedPrecondition, _) => (StatusCode::BAD_REQUEST, "InvalidStateException"),
        (Code::PermissionDenied, Cause::KeyUsage) => {
            (StatusCode::BAD_REQUEST, "InvalidKeyUsageException")
        }
        (Code::PermissionDenied, _) => (StatusCode::FORBIDDEN, "AccessDeniedException"),
        (Code::Unauthenticated, _) => (StatusCode::UNAUTHORIZED, "AuthenticationFailedException"),
        (Code::NotFound, _) => (StatusCode::NOT_FOUND, "KeyNotFoundException"),
        (Code::ResourceExhausted, _) => (StatusCode::TOO_MANY_REQUESTS, "ThrottlingException"),
        (Code::Unimplemented, _) => (StatusCode::NOT_IMPLEMENTED, "UnsupportedOperationException"),
        (Code::Unavailable | Code::DeadlineExceeded, _) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "DependencyTimeoutException",
        ),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "InternalException"),
    }
}

/// Printable ASCII only, shorter than 512 characters (the API's rule).
fn error_message(message: &str) -> String {
    let mut out: String = message
        .chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .take(MAX_ERROR_MESSAGE)
        .collect();
    if message.chars().count() > MAX_ERROR_MESSAGE {
        out.truncate(MAX_ERROR_MESSAGE - 3);
        out.push_str("...");
    }
    out
}

fn json_response(
    status: StatusCode,
    body: Vec<u8>,
    request_id: Option<&str>,
) -> Response<Full<Bytes>> {
    let mut builder = Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json");
    if let Some(id) = request_id {
        builder = builder.header("x-request-id", id);
    }
    builder
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn error_response(
    status: StatusCode,
    name: &str,
    message: &str,
    request_id: Option<&str>,
) -> Response<Full<Bytes>> {
    let message = error_message(message);
    let body = serde_json::to_vec(&json::ErrorBody {
        error_name: name,
        error_message: &message,
    })
    .unwrap_or_default();
    json_response(status, body, request_id)
}

fn failure_response(failure: &Failure, request_id: &str) -> Response<Full<Bytes>> {
    let (status, name) = error_name(failure);
    error_response(status, name, failure.message(), Some(request_id))
}

fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidArgument(message.into())
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(body).map_err(|e| {
        // serde's message names the field and position, never a value.
        invalid(format!("the request body is not a valid request: {e}"))
    })
}

fn decode(field: &str, value: &str) -> Result<Vec<u8>, Error> {
    B64.decode(value)
        .map_err(|_| invalid(format!("{field} is not standard base64")))
}

/// The AAD AWS KMS sent (absent: empty), within the API's 8192 bytes.
fn decode_aad(field: Option<&str>) -> Result<Vec<u8>, Error> {
    let aad = match field {
        Some(a) => decode("additionalAuthenticatedData", a)?,
        None => Vec::new(),
    };
    if aad.len() > wire::MAX_AAD_LEN {
        return Err(Error::Unsupported(format!(
            "additionalAuthenticatedData is {} bytes; coffre takes at most {}",
            aad.len(),
            wire::MAX_AAD_LEN
        )));
    }
    Ok(aad)
}

/// Version 1 of the API knows one algorithm.
fn aes_gcm_only(algorithm: &str) -> Result<(), Error> {
    if algorithm == "AES_GCM" {
        Ok(())
    } else {
        Err(Error::Unsupported(
            "encryptionAlgorithm must be AES_GCM".to_string(),
        ))
    }
}

/// The account (5th field) and region (4th) of an ARN, if it is one.
fn arn_parts(arn: &str) -> Option<(&str, &str)> {
    let mut fields = arn.splitn(6, ':');
    let (Some("arn"), Some(_partition), Some(_service), Some(region), Some(account)) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return None;
    };
    Some((account, region))
}

/// Who called AWS KMS, as a justification: an AWS service principal
/// (`….amazonaws.com`) or "AWS Internal" is the provider acting; any other
/// principal is the customer's own.
fn justification(principal_arn: &str) -> AccessReason {
    if principal_arn == "AWS Internal" {
        AccessReason::ProviderSystemOperation
    } else if principal_arn.ends_with(".amazonaws.com") {
        AccessReason::ProviderInitiatedService
    } else {
        AccessReason::CustomerInitiatedAccess
    }
}

/// The context the key's policy decides on, built from the request
/// metadata (the names are AWS's condition keys where one exists):
/// `aws:PrincipalArn`, `aws:PrincipalAccount`, `aws:SourceVpc`,
/// `aws:SourceVpce`, `kms:KeyArn`, `kms:KeyAccount`, `kms:KeyRegion`,
/// `kms:ViaService`, `kms:Operation`, `kms:RequestId`.
fn policy_context(md: &json::RequestMetadata) -> Result<EncryptionContext, Error> {
    let mut entries: Vec<(String, String)> = vec![
        ("kms:RequestId".into(), md.kms_request_id.clone()),
        ("kms:Operation".into(), md.kms_operation.clone()),
    ];
    if let Some(arn) = &md.aws_principal_arn {
        entries.push(("aws:PrincipalArn".into(), arn.clone()));
        if let Some((account, _)) = arn_parts(arn) {
            entries.push(("aws:PrincipalAccount".into(), account.to_string()));
        }
    }
    if let Some(arn) = &md.kms_key_arn {
        entries.push(("kms:KeyArn".into(), arn.clone()));
        if let Some((account, region)) = arn_parts(arn) {
            entries.push(("kms:KeyAccount".into(), account.to_string()));
            entries.push(("kms:KeyRegion".into(), region.to_string()));
        }
    }
    for (name, value) in [
        ("kms:ViaService", &md.kms_via_service),
        ("aws:SourceVpc", &md.aws_source_vpc),
        ("aws:SourceVpce", &md.aws_source_vpce),
    ] {
        if let Some(v) = value {
            entries.push((name.into(), v.clone()));
        }
    }
    EncryptionContext::with_value_limit(entries, MAX_REQUEST_METADATA_VALUE_LEN)
        .map_err(|e| invalid(format!("requestMetadata: {e}")))
}

/// The request metadata into the record (in clear: ARNs and request ids
/// are what the operator correlates with CloudTrail), and the policy's
/// inputs.
fn note_metadata(
    audit: &mut RequestAudit,
    md: &json::RequestMetadata,
    key_arn: bool,
) -> Result<(EncryptionContext, AccessReason), Error> {
    let context = policy_context(md)?;
    audit.context_in_clear(&context);
    md.require(key_arn).map_err(invalid)?;
    let reason = justification(md.aws_principal_arn.as_deref().unwrap_or_default());
    audit.justification(Ok(reason));
    Ok((context, reason))
}

/// An external key id as coffre's key reference; one that cannot name a
/// coffre key is a key that does not exist.
fn key_ref(id: &str) -> Result<KeyRef, Error> {
    KeyRef::parse(id).map_err(|_| Error::KeyNotFound(id.to_string()))
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<Zeroizing<Vec<u8>>, Error> {
    serde_json::to_vec(value)
        .map(Zeroizing::new)
        .map_err(|e| Error::Internal(format!("encoding a response: {e}")))
}

impl Front {
    /// Runs `work` in the core within the deadline.
    async fn in_time<T>(&self, work: impl Future<Output = Result<T, Error>>) -> Result<T, Error> {
        match tokio::time::timeout(self.deadline, work).await {
            Ok(result) => result,
            Err(_) => Err(Error::DeadlineExceeded(format!(
                "coffre could not answer within {} ms (the HSM or the key store is slow or \
                 unreachable); retry",
                self.deadline.as_millis()
            ))),
        }
    }

    pub async fn serve(
        self: Arc<Self>,
        request: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let path = request.uri().path().to_string();
        if path == LIVENESS_PATH && request.method() == Method::GET {
            return Ok(Response::new(Full::new(Bytes::from_static(b"ok\n"))));
        }
        let Some((api, key_id)) = route(&self.prefix, &path) else {
            return Ok(error_response(
                StatusCode::NOT_FOUND,
                "InvalidUriPathException",
                "no XKS API at this path; check the URI path configured in AWS KMS",
                None,
            ));
        };
        let key_id = key_id.to_string();
        if request.method() != Method::POST {
            let mut response = error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "ValidationException",
                "the XKS API takes POST only",
                None,
            );
            response.headers_mut().insert(
                hyper::header::ALLOW,
                hyper::header::HeaderValue::from_static("POST"),
            );
            return Ok(response);
        }
        let (parts, body) = request.into_parts();
        let collected =
            tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_BODY).collect()).await;
        let body = match collected {
            Ok(Ok(collected)) => Zeroizing::new(collected.to_bytes().to_vec()),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "XKS request body refused");
                return Ok(error_response(
                    StatusCode::BAD_REQUEST,
                    "ValidationException",
                    &format!("the request body could not be read or is over {MAX_BODY} bytes"),
                    None,
                ));
            }
            Err(_) => {
                return Ok(error_response(
                    StatusCode::BAD_REQUEST,
                    "ValidationException",
                    "the request body did not arrive in time",
                    None,
                ));
            }
        };
        let signed = Signed {
            method: parts.method.as_str(),
            path: &path,
            authority: parts.uri.authority().map(|a| a.as_str()),
            query: parts.uri.query(),
            headers: &parts.headers,
            body: &body,
        };
        let caller = match self.verifier.verify(&signed, SystemTime::now()) {
            Ok(principal) => Ok(Caller::new(principal.to_string())),
            Err(why) => {
                tracing::warn!(reason = %why, api = api.op().name(), "XKS request refused: SigV4");
                Err(Failure::unauthenticated(
                    "the request's AWS SigV4 signature does not verify for service kms-xks-proxy; \
                     check the credential configured in AWS KMS",
                ))
            }
        };
        let facts = RequestFacts {
            key: &key_id,
            ..RequestFacts::new(caller)
        };
        let front = Arc::clone(&self);
        let body = &body[..];
        let reply = self
            .pipeline
            .handle(api.op(), facts, async |caller, audit| match api {
                Api::Metadata => front.metadata(caller, audit, &key_id, body).await,
                Api::Encrypt => front.encrypt(caller, audit, &key_id, body).await,
                Api::Decrypt => front.decrypt(caller, audit, &key_id, body).await,
                Api::Health => front.health(caller, audit, body).await,
            })
            .await;
        Ok(match reply.result {
            Ok(json) => json_response(StatusCode::OK, json.to_vec(), Some(&reply.request_id)),
            Err(failure) => failure_response(&failure, &reply.request_id),
        })
    }

    async fn metadata(
        &self,
        caller: &Caller,
        audit: &mut RequestAudit,
        key_id: &str,
        body: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, Error> {
        let request: json::MetadataRequest = parse(body)?;
        note_metadata(audit, &request.request_metadata, false)?;
        let key = key_ref(key_id)?;
        let kms = self.pipeline.kms();
        let found = self.in_time(kms.xks_key_metadata(caller, &key)).await?;
        audit.resolved_key(found.key_id, None);
        let mut usage = Vec::new();
        if found.usage.encrypt {
            usage.push("ENCRYPT");
        }
        if found.usage.decrypt {
            usage.push("DECRYPT");
        }
        to_json(&json::MetadataResponse {
            key_spec: "AES_256",
            key_usage: usage,
            key_status: if found.enabled { "ENABLED" } else { "DISABLED" },
        })
    }

    async fn encrypt(
        &self,
        caller: &Caller,
        audit: &mut RequestAudit,
        key_id: &str,
        body: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, Error> {
        let request: json::EncryptRequest = parse(body)?;
        let (context, justification) = note_metadata(audit, &request.request_metadata, true)?;
        aes_gcm_only(&request.encryption_algorithm)?;
        let integrity = match request.ciphertext_data_integrity_value_algorithm.as_deref() {
            None => false,
            Some("SHA_256") => true,
            Some(_) => {
                return Err(Error::Unsupported(
                    "ciphertextDataIntegrityValueAlgorithm must be SHA_256".to_string(),
                ));
            }
        };
        let plaintext = Zeroizing::new(decode("plaintext", &request.plaintext)?);
        let aad = decode_aad(request.additional_authenticated_data.as_deref())?;
        let key = key_ref(key_id)?;
        let usage = XksUse {
            context: &context,
            justification,
            verify: integrity,
        };
        let kms = self.pipeline.kms();
        let sealed = self
            .in_time(kms.xks_encrypt(caller, &key, &usage, &plaintext, &aad))
            .await?;
        audit.resolved_key(sealed.key_id, Some(sealed.key_version));
        let cdiv = integrity.then(|| {
            B64.encode(wire::integrity_value(
                &aad,
                &sealed.metadata,
                &sealed.iv,
                &sealed.ciphertext,
                &sealed.tag,
            ))
        });
        to_json(&json::EncryptResponse {
            ciphertext: B64.encode(&sealed.ciphertext),
            ciphertext_metadata: B64.encode(sealed.metadata),
            initialization_vector: B64.encode(sealed.iv),
            authentication_tag: B64.encode(sealed.tag),
            ciphertext_data_integrity_value: cdiv,
        })
    }

    async fn decrypt(
        &self,
        caller: &Caller,
        audit: &mut RequestAudit,
        key_id: &str,
        body: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, Error> {
        let request: json::DecryptRequest = parse(body)?;
        let (context, justification) = note_metadata(audit, &request.request_metadata, true)?;
        aes_gcm_only(&request.encryption_algorithm)?;
        let ciphertext = decode("ciphertext", &request.ciphertext)?;
        if ciphertext.len() > core::MAX_PLAINTEXT_LEN {
            return Err(Error::Unsupported(format!(
                "ciphertext is {} bytes; coffre decrypts at most {}",
                ciphertext.len(),
                core::MAX_PLAINTEXT_LEN
            )));
        }
        let iv = decode("initializationVector", &request.initialization_vector)?;
        if iv.len() != 12 && iv.len() != 16 {
            return Err(invalid("initializationVector must be 12 or 16 bytes"));
        }
        let tag = decode("authenticationTag", &request.authentication_tag)?;
        let tag: [u8; 16] = tag
            .as_slice()
            .try_into()
            .map_err(|_| invalid("authenticationTag must be 16 bytes"))?;
        let aad = decode_aad(request.additional_authenticated_data.as_deref())?;
        let metadata = match &request.ciphertext_metadata {
            Some(m) => decode("ciphertextMetadata", m)?,
            None => Vec::new(),
        };
        if metadata.len() > wire::MAX_METADATA_LEN {
            return Err(invalid(format!(
                "ciphertextMetadata must be at most {} bytes",
                wire::MAX_METADATA_LEN
            )));
        }
        let key = key_ref(key_id)?;
        let usage = XksUse {
            context: &context,
            justification,
            verify: false,
        };
        let sealed = XksCiphertext {
            ciphertext: &ciphertext,
            iv: &iv,
            tag: &tag,
            metadata: &metadata,
            aad: &aad,
        };
        let kms = self.pipeline.kms();
        let opened = self
            .in_time(kms.xks_decrypt(caller, &key, &usage, &sealed))
            .await?;
        audit.resolved_key(opened.key_id, Some(opened.key_version));
        to_json(&json::DecryptResponse {
            plaintext: Zeroizing::new(B64.encode(opened.plaintext.expose())),
        })
    }

    async fn health(
        &self,
        caller: &Caller,
        audit: &mut RequestAudit,
        body: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, Error> {
        let request: json::HealthRequest = parse(body)?;
        let md = &request.request_metadata;
        if md.kms_request_id.len() > json::MAX_METADATA_FIELD_LEN
            || md.kms_operation.len() > json::MAX_METADATA_FIELD_LEN
        {
            return Err(invalid(
                "requestMetadata fields are at most 2048 characters",
            ));
        }
        let context = EncryptionContext::with_value_limit(
            [
                ("kms:RequestId".to_string(), md.kms_request_id.clone()),
                ("kms:Operation".to_string(), md.kms_operation.clone()),
            ],
            MAX_REQUEST_METADATA_VALUE_LEN,
        )
        .map_err(|e| invalid(format!("requestMetadata: {e}")))?;
        audit.context_in_clear(&context);
        let kms = self.pipeline.kms();
        let mut report = kms.xks_health(caller, self.deadline).await?;
        report.status = with_audit(report.status, &self.pipeline.metrics().readiness.current());
        to_json(&json::HealthResponse {
            xks_proxy_fleet_size: 1,
            xks_proxy_vendor: "coffre",
            xks_proxy_model: format!("coffre {}", env!("CARGO_PKG_VERSION")),
            ekm_vendor: "coffre",
            ekm_fleet_details: vec![json::EkmDetail {
                id: report.hsm_label,
                model: report.hsm_backend,
                health_status: report.status.as_str(),
            }],
        })
    }
}

/// The health the core found, made worse by the audit log's state as the
/// last readiness check saw it: a log that cannot be written is
/// UNAVAILABLE (coffre refuses every request then), a volume short of free
/// space DEGRADED.
fn with_audit(status: XksHealth, readiness: &Report) -> XksHealth {
    let Report::NotReady(problems) = readiness else {
        return status;
    };
    problems
        .iter()
        .map(|p| match p.component {
            Component::AuditLog => XksHealth::Unavailable,
            Component::AuditVolume => XksHealth::Degraded,
            _ => XksHealth::Active,
        })
        .fold(status, std::cmp::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_audit_log_state_makes_health_worse_never_better() {
        use crate::metrics::probes::Problem;
        let problem = |component| Problem {
            component,
            reason: String::new(),
        };
        let volume = Report::NotReady(vec![problem(Component::AuditVolume)]);
        let log = Report::NotReady(vec![problem(Component::AuditLog)]);
        let hsm_only = Report::NotReady(vec![problem(Component::Hsm)]);
        assert_eq!(
            with_audit(XksHealth::Active, &Report::Ready),
            XksHealth::Active
        );
        assert_eq!(with_audit(XksHealth::Active, &volume), XksHealth::Degraded);
        assert_eq!(with_audit(XksHealth::Active, &log), XksHealth::Unavailable);
        assert_eq!(
            with_audit(XksHealth::Unavailable, &volume),
            XksHealth::Unavailable
        );
        assert_eq!(
            with_audit(XksHealth::Degraded, &hsm_only),
            XksHealth::Degraded
        );
        assert_eq!(
            with_audit(XksHealth::Active, &Report::Starting),
            XksHealth::Active
        );
    }

    #[test]
    fn routes_follow_the_prefix_and_the_api_paths() {
        let p = "/tenant-a";
        assert_eq!(
            route(p, "/tenant-a/kms/xks/v1/health"),
            Some((Api::Health, ""))
        );
        assert_eq!(
            route(p, "/tenant-a/kms/xks/v1/keys/my-key_1.x/encrypt"),
            Some((Api::Encrypt, "my-key_1.x"))
        );
        assert_eq!(
            route("", "/kms/xks/v1/keys/k/metadata"),
            Some((Api::Metadata, "k"))
        );
        for bad in [
            "/kms/xks/v1/health",
            "/tenant-b/kms/xks/v1/health",
            "/tenant-a/kms/xks/v2/health",
            "/tenant-a/kms/xks/v1/keys/k/sign",
            "/tenant-a/kms/xks/v1/keys//encrypt",
            "/tenant-a/kms/xks/v1/keys/../encrypt",
            "/tenant-a/kms/xks/v1/keys/a/b/encrypt",
            "/tenant-a/kms/xks/v1/keys/a%2Fb/encrypt",
        ] {
            assert_eq!(route(p, bad), None, "{bad}");
        }
    }

    #[test]
    fn error_messages_are_printable_ascii_under_512() {
        assert_eq!(error_message("clé\n"), "cl??");
        let long = "x".repeat(600);
        let m = error_message(&long);
        assert_eq!(m.len(), MAX_ERROR_MESSAGE);
        assert!(m.ends_with("..."));
    }

    #[test]
    fn who_called_aws_kms_is_the_justification() {
        assert_eq!(
            justification("arn:aws:iam::123456789012:user/Alice"),
            AccessReason::CustomerInitiatedAccess
        );
        assert_eq!(
            justification("ec2.amazonaws.com"),
            AccessReason::ProviderInitiatedService
        );
        assert_eq!(
            justification("AWS Internal"),
            AccessReason::ProviderSystemOperation
        );
        assert_eq!(
            arn_parts("arn:aws:kms:eu-west-3:111122223333:key/abc"),
            Some(("111122223333", "eu-west-3"))
        );
        assert_eq!(arn_parts("AWS Internal"), None);
    }
}
