//! `coffre xks …`: calls an XKS front as AWS KMS does (HTTPS, SigV4 signed
//! by the AWS SDK's signer), with the credential of `DIR/xks.json` or of
//! `--xks-file`. An operator checks a front with it before pointing AWS
//! KMS at it, and sees what AWS KMS would get: the same answers, the same
//! error names, the same audit records.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use tonic::Code;
use zeroize::Zeroizing;

use super::args::{XksArgs, XksCommand};
use super::client::{CliError, read_input};
use super::output::print_json;
use crate::xks::client::{self, Answer, Target, XksClient};

pub async fn run(cmd: XksCommand) -> anyhow::Result<()> {
    match cmd {
        XksCommand::Health(args) => {
            let (mut c, _) = connect(&args).await?;
            let body = json!({ "requestMetadata": client::health_metadata("KmsHealthCheck") });
            let answer = ok(c.post("health", &body).await?, &body)?;
            if args.connect.json {
                return print_json(&answer);
            }
            let status = |d: &Value| str_at(d, "healthStatus").unwrap_or("?").to_string();
            let details = answer
                .get("ekmFleetDetails")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            println!(
                "proxy             {} {}",
                str_at(&answer, "xksProxyVendor").unwrap_or(""),
                str_at(&answer, "xksProxyModel").unwrap_or("")
            );
            for d in &details {
                println!(
                    "{:<17} {} ({})",
                    str_at(d, "id").unwrap_or("?"),
                    status(d),
                    str_at(d, "model").unwrap_or("")
                );
            }
            Ok(())
        }
        XksCommand::Metadata { key, xks } => {
            let (mut c, region) = connect(&xks).await?;
            let body = json!({ "requestMetadata": metadata(&xks, &region, "DescribeKey", &key) });
            let answer = ok(c.post(&key_api(&key, "metadata")?, &body).await?, &body)?;
            if xks.connect.json {
                return print_json(&answer);
            }
            let usage: Vec<&str> = answer
                .get("keyUsage")
                .and_then(Value::as_array)
                .map(|u| u.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            println!(
                "key spec          {}",
                str_at(&answer, "keySpec").unwrap_or("")
            );
            println!("key usage         {}", usage.join(" "));
            println!(
                "key status        {}",
                str_at(&answer, "keyStatus").unwrap_or("")
            );
            Ok(())
        }
        XksCommand::Encrypt {
            key,
            input,
            aad,
            integrity,
            xks,
        } => {
            let plaintext = read_input(&input)?;
            let (mut c, region) = connect(&xks).await?;
            let mut body = json!({
                "requestMetadata": metadata(&xks, &region, "Encrypt", &key),
                "plaintext": Zeroizing::new(B64.encode(&plaintext[..])).as_str(),
                "encryptionAlgorithm": "AES_GCM",
            });
            if let Some(aad) = &aad {
                set(
                    &mut body,
                    "additionalAuthenticatedData",
                    B64.encode(aad).into(),
                );
            }
            if integrity {
                set(
                    &mut body,
                    "ciphertextDataIntegrityValueAlgorithm",
                    "SHA_256".into(),
                );
            }
            let answer = ok(c.post(&key_api(&key, "encrypt")?, &body).await?, &body)?;
            // Always JSON: it is what `coffre xks decrypt --in` reads.
            print_json(&answer)
        }
        XksCommand::Decrypt {
            key,
            input,
            aad,
            output,
            xks,
        } => {
            let encrypted: Value =
                serde_json::from_slice(&read_input(&input)?).with_context(|| {
                    format!(
                        "{}: expected what `coffre xks encrypt` printed",
                        input.display()
                    )
                })?;
            let field = |name: &str| -> anyhow::Result<Value> {
                match encrypted.get(name) {
                    Some(Value::String(s)) => Ok(Value::String(s.clone())),
                    _ => bail!(
                        "{}: no {name} (what `coffre xks encrypt` printed?)",
                        input.display()
                    ),
                }
            };
            let (mut c, region) = connect(&xks).await?;
            let mut body = json!({
                "requestMetadata": metadata(&xks, &region, "Decrypt", &key),
                "ciphertext": field("ciphertext")?,
                "ciphertextMetadata": field("ciphertextMetadata")?,
                "initializationVector": field("initializationVector")?,
                "authenticationTag": field("authenticationTag")?,
                "encryptionAlgorithm": "AES_GCM",
            });
            if let Some(aad) = &aad {
                set(
                    &mut body,
                    "additionalAuthenticatedData",
                    B64.encode(aad).into(),
                );
            }
            let answer = ok(c.post(&key_api(&key, "decrypt")?, &body).await?, &body)?;
            let plain64 = Zeroizing::new(
                str_at(&answer, "plaintext")
                    .context("the answer has no plaintext")?
                    .to_string(),
            );
            if let Some(out) = output {
                let plain = Zeroizing::new(
                    B64.decode(plain64.as_bytes())
                        .context("the plaintext is not base64")?,
                );
                return write_output(&out, &plain);
            }
            if xks.connect.json {
                return print_json(&json!({ "plaintext": plain64.as_str() }));
            }
            println!("plaintext         {}", plain64.as_str());
            Ok(())
        }
    }
}

fn str_at<'a>(value: &'a Value, name: &str) -> Option<&'a str> {
    value.get(name).and_then(Value::as_str)
}

/// Sets `name` in a JSON object (what `json!({…})` made).
fn set(object: &mut Value, name: &str, value: Value) {
    if let Some(map) = object.as_object_mut() {
        map.insert(name.to_string(), value);
    }
}

fn write_output(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    if path == Path::new("-") {
        let mut out = std::io::stdout().lock();
        out.write_all(bytes).context("writing standard output")?;
        return out.flush().context("writing standard output");
    }
    crate::fsutil::write_atomic(path, bytes, true)
        .with_context(|| format!("writing {}", path.display()))
}

/// The front named by `--xks-file`, else `DATA_DIR/xks.json`.
fn target(args: &XksArgs) -> anyhow::Result<Target> {
    let path: PathBuf = args
        .xks_file
        .clone()
        .unwrap_or_else(|| args.connect.data_dir.join(crate::server::dev_xks::XKS_JSON));
    let mut target = Target::from_xks_json(&path)?;
    if let (Some(cert), Some(key)) = (&args.client_cert, &args.client_key) {
        let cert = std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
        let key = read_input(key)?;
        target.client_identity = Some((cert, key));
    }
    Ok(target)
}

/// A connection to the front, and the region its credential signs for.
async fn connect(args: &XksArgs) -> anyhow::Result<(XksClient, String)> {
    let target = target(args)?;
    let client = tokio::time::timeout(
        std::time::Duration::from_secs(args.connect.timeout),
        XksClient::connect(&target),
    )
    .await
    .with_context(|| format!("{}: no connection within the --timeout", target.endpoint))??;
    Ok((client, target.region))
}

fn key_api(key: &str, api: &str) -> anyhow::Result<String> {
    if !crate::xks::front::is_key_id(key) {
        bail!(
            "{key:?} cannot be an XKS external key id (1 to 128 letters, digits, '.', '_', \
             '-'): name the key by its id, or by an alias without '/'"
        );
    }
    Ok(format!("keys/{key}/{api}"))
}

/// `requestMetadata` for `operation`: the AWS principal and account of
/// `--principal-arn`, a key ARN in that account, `--via-service`.
fn metadata(args: &XksArgs, region: &str, operation: &str, key: &str) -> Value {
    let account = args
        .principal_arn
        .split(':')
        .nth(4)
        .filter(|a| !a.is_empty())
        .unwrap_or("111122223333");
    let key_arn = format!("arn:aws:kms:{region}:{account}:key/{key}");
    let mut md = client::request_metadata(operation, &args.principal_arn, &key_arn);
    if let Some(via) = &args.via_service {
        set(&mut md, "kmsViaService", via.as_str().into());
    }
    md
}

/// The body of a 200 answer; any other is an error naming the API's
/// `errorName` and `errorMessage`, with the gRPC code closest to it, the
/// request id coffre gave it (the audit record's `request_id`) and the
/// `kmsRequestId` sent (its `context."kms:RequestId"`).
fn ok(answer: Answer, sent: &Value) -> anyhow::Result<Value> {
    if answer.status == 200 {
        return Ok(answer.body);
    }
    let name = answer.error_name().unwrap_or("(no errorName)");
    let code = match name {
        "ValidationException" | "InvalidCiphertextException" => Code::InvalidArgument,
        "InvalidStateException" => Code::FailedPrecondition,
        "InvalidKeyUsageException" | "AccessDeniedException" => Code::PermissionDenied,
        "KeyNotFoundException" | "InvalidUriPathException" => Code::NotFound,
        "AuthenticationFailedException" => Code::Unauthenticated,
        "ThrottlingException" => Code::ResourceExhausted,
        "DependencyTimeoutException" => Code::Unavailable,
        "UnsupportedOperationException" => Code::Unimplemented,
        "InternalException" => Code::Internal,
        _ => Code::Unknown,
    };
    let message = answer
        .body
        .get("errorMessage")
        .and_then(Value::as_str)
        .unwrap_or("");
    let kms_request_id = sent
        .pointer("/requestMetadata/kmsRequestId")
        .and_then(Value::as_str)
        .unwrap_or("");
    let mut error = CliError::local(
        code,
        format!(
            "{name} ({}): {message} (kmsRequestId {kms_request_id})",
            answer.status
        ),
    );
    error.request_id = answer.request_id;
    Err(error.into())
}
