//! The service's calls to the data-key service: `coffre datakey generate`,
//! `coffre encrypt` and `coffre decrypt`, and what `coffre reencrypt` and
//! the batch forms (`lines.rs`) share with them: reading a blob, writing raw
//! output, and the hints added to a refused blob.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use super::client::{connect, read_input, rpc_error};
use super::output;
use super::{ConnectArgs, DataArgs, DatakeyCommand, DecryptArgs, EncryptArgs};
use crate::envelope;
use crate::grpc::pb;
use crate::grpc::pb::data_key_service_client::DataKeyServiceClient;
use crate::grpc::pb::key_service_client::KeyServiceClient;

/// `coffre datakey generate`: one data key, or `--count` of them in one
/// batch request.
pub async fn generate(cmd: DatakeyCommand) -> anyhow::Result<()> {
    let DatakeyCommand::Generate {
        key,
        bytes,
        without_plaintext,
        count,
        data,
        connect: c,
    } = cmd;
    let mut client = client(&c).await?;
    let encryption_context = context_map(&data);
    let justification = data.justification as i32;
    if let Some(count) = count {
        let resp = client
            .batch_generate_data_key(pb::BatchGenerateDataKeyRequest {
                key_id: key,
                encryption_context,
                justification,
                number_of_bytes: bytes,
                count,
                without_plaintext,
            })
            .await
            .map_err(rpc_error)?
            .into_inner();
        output::data_keys(resp, c.json)
    } else if without_plaintext {
        let resp = client
            .generate_data_key_without_plaintext(pb::GenerateDataKeyWithoutPlaintextRequest {
                key_id: key,
                encryption_context,
                justification,
                number_of_bytes: bytes,
            })
            .await
            .map_err(rpc_error)?
            .into_inner();
        output::data_key(
            None,
            &resp.ciphertext_blob,
            &resp.key_id,
            resp.key_version,
            c.json,
        )
    } else {
        let resp = client
            .generate_data_key(pb::GenerateDataKeyRequest {
                key_id: key,
                encryption_context,
                justification,
                number_of_bytes: bytes,
            })
            .await
            .map_err(rpc_error)?
            .into_inner();
        let plaintext = Zeroizing::new(resp.plaintext);
        output::data_key(
            Some(&plaintext),
            &resp.ciphertext_blob,
            &resp.key_id,
            resp.key_version,
            c.json,
        )
    }
}

/// The data-key service, as the service identity unless `--as` names
/// another.
pub(super) async fn client(c: &ConnectArgs) -> anyhow::Result<DataKeyServiceClient<Channel>> {
    Ok(DataKeyServiceClient::new(connect(c, "service").await?))
}

pub(super) fn context_map(data: &DataArgs) -> BTreeMap<String, String> {
    data.context.iter().cloned().collect()
}

/// Whether `path` names standard output (`--out -`): then nothing but the
/// raw bytes may be printed there.
pub(super) fn is_stdout(path: &Path) -> bool {
    path == Path::new("-")
}

/// Writes `bytes` to `path` (mode 0600), or to standard output when it is
/// `-`.
pub(super) fn write_output(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    if path == Path::new("-") {
        let mut out = std::io::stdout().lock();
        out.write_all(bytes).context("writing standard output")?;
        return out.flush().context("writing standard output");
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
}

/// `coffre encrypt`: a small secret wrapped under a key.
pub async fn encrypt(args: EncryptArgs) -> anyhow::Result<()> {
    let plaintext = read_input(&args.input)?;
    let resp = client(&args.connect)
        .await?
        .encrypt(pb::EncryptRequest {
            key_id: args.key,
            plaintext: plaintext.to_vec(),
            encryption_context: context_map(&args.data),
            justification: args.data.justification as i32,
        })
        .await
        .map_err(rpc_error)?
        .into_inner();
    if let Some(path) = &args.output {
        write_output(path, &resp.ciphertext_blob)?;
        if is_stdout(path) {
            return Ok(());
        }
    }
    output::ciphertext(
        args.output.is_none().then_some(&resp.ciphertext_blob[..]),
        &resp.key_id,
        resp.key_version,
        args.connect.json,
    )
}

/// `coffre decrypt`: a blob unwrapped, or with `--batch` a file of them.
pub async fn decrypt(args: DecryptArgs) -> anyhow::Result<()> {
    if let Some(batch) = &args.batch {
        return super::lines::decrypt(&args, batch).await;
    }
    let blob = read_blob(args.blob.as_deref(), args.input.as_deref())?;
    let result = client(&args.connect)
        .await?
        .decrypt(pb::DecryptRequest {
            ciphertext_blob: blob.clone(),
            encryption_context: context_map(&args.data),
            justification: args.data.justification as i32,
            key_id: args.key.clone().unwrap_or_default(),
        })
        .await;
    let resp = match result {
        Ok(resp) => resp.into_inner(),
        Err(status) => {
            return Err(refused_blob_error(
                status,
                &blob,
                args.key.as_deref(),
                &args.data,
                &args.connect,
            )
            .await);
        }
    };
    let plaintext = Zeroizing::new(resp.plaintext);
    if let Some(path) = &args.output {
        write_output(path, &plaintext)?;
        if is_stdout(path) {
            return Ok(());
        }
    }
    output::plaintext(
        args.output.is_none().then_some(&plaintext[..]),
        &resp.key_id,
        resp.key_version,
        args.connect.json,
    )
}

/// The blob of `--blob` (base64) or `--in` (raw bytes).
pub(super) fn read_blob(b64: Option<&str>, input: Option<&Path>) -> anyhow::Result<Vec<u8>> {
    match (b64, input) {
        (Some(b64), _) => decode_blob(b64).map_err(|e| anyhow::anyhow!("--blob {e}")),
        (None, Some(path)) => Ok(read_input(path)?.to_vec()),
        (None, None) => bail!("give the blob with --blob or --in"),
    }
}

/// The form a blob takes on the command line and in batch lines.
pub(super) const BASE64_FORM: &str = "the standard base64 alphabet (A-Z a-z 0-9 + /) with `=` padding, as printed by `coffre encrypt`";

/// Decodes a base64 blob; the error names the expected form and where the
/// input leaves it, never a character code. It reads after "--blob" or
/// "blob".
pub(super) fn decode_blob(b64: &str) -> Result<Vec<u8>, String> {
    let b64 = b64.trim();
    if b64.is_empty() {
        return Err(format!("is empty: expected {BASE64_FORM}"));
    }
    B64.decode(b64).map_err(|e| {
        let why = match e {
            base64::DecodeError::InvalidByte(at, byte) => {
                let shown = if byte.is_ascii_graphic() {
                    format!("{:?}", char::from(byte))
                } else if byte == b' ' {
                    "a space".to_string()
                } else {
                    "a character outside the alphabet".to_string()
                };
                let urlsafe = if byte == b'-' || byte == b'_' {
                    " (URL-safe base64? use + for - and / for _)"
                } else {
                    ""
                };
                format!("character {} is {shown}{urlsafe}", at.saturating_add(1))
            }
            base64::DecodeError::InvalidLength(len) => {
                format!(
                    "its length, {len}, is not a multiple of 4 (truncated, or `=` padding missing?)"
                )
            }
            base64::DecodeError::InvalidLastSymbol(at, _) => {
                format!(
                    "character {} ends it wrongly (truncated?)",
                    at.saturating_add(1)
                )
            }
            base64::DecodeError::InvalidPadding => "its `=` padding is wrong".to_string(),
        };
        format!("is not valid base64: {why}; expected {BASE64_FORM}")
    })
}

/// The error of a data command whose blob the server refused: the
/// server's answer ([`rpc_error`]), with [`refused_blob_hint`] as its
/// context when there is one.
pub(super) async fn refused_blob_error(
    status: tonic::Status,
    blob: &[u8],
    expected_key: Option<&str>,
    data: &DataArgs,
    c: &ConnectArgs,
) -> anyhow::Error {
    let hint = refused_blob_hint(&status, blob, expected_key, data, c).await;
    let err = rpc_error(status);
    match hint {
        Some(hint) => err.context(hint),
        None => err,
    }
}

/// What to add to the server's answer when it refused a blob as invalid
/// (`INVALID_ARGUMENT`, one generic message by design): the key the blob's
/// header names in clear (with its alias when the dev PKI's operator can
/// describe it), and the reminder that the context must match exactly.
async fn refused_blob_hint(
    status: &tonic::Status,
    blob: &[u8],
    expected_key: Option<&str>,
    data: &DataArgs,
    c: &ConnectArgs,
) -> Option<String> {
    if status.code() != tonic::Code::InvalidArgument {
        return None;
    }
    let header = envelope::parse(blob).ok().map(|p| p.header);
    let alias = match (&header, expected_key) {
        // Only an alias given with --key needs the blob's key described.
        (Some(h), Some(expected)) if expected != h.key_id.to_string() => {
            describe_alias(c, &h.key_id.to_string()).await
        }
        _ => None,
    };
    blob_hint(
        blob,
        expected_key,
        alias.as_deref(),
        &context_map(data).into_iter().collect(),
    )
}

/// The hint of [`refused_blob_hint`], once the blob's key is described (or
/// not: `alias` None).
pub(super) fn blob_hint(
    blob: &[u8],
    expected_key: Option<&str>,
    alias: Option<&str>,
    context: &std::collections::BTreeMap<String, String>,
) -> Option<String> {
    let given = if context.is_empty() {
        "no context was given".to_string()
    } else {
        let pairs: Vec<String> = context.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("given: {}", pairs.join(", "))
    };
    let must_match = format!(
        "the encryption context must match exactly, key by key, the one given when the blob was made ({given})"
    );
    let header = match envelope::parse(blob) {
        Ok(parsed) => parsed.header,
        Err(e) => {
            return Some(format!(
                "this is not a coffre blob ({e}): give what `coffre encrypt` or `coffre datakey generate` printed (base64 with --blob) or wrote (raw bytes with --in)"
            ));
        }
    };
    let id = header.key_id.to_string();
    let named = match alias {
        Some(a) if !a.is_empty() => {
            format!("key {id} (alias {a:?}), version {}", header.key_version)
        }
        _ => format!("key {id}, version {}", header.key_version),
    };
    let hint = match expected_key {
        Some(expected) if expected == id || alias == Some(expected) => {
            format!("the blob belongs to {named} as --key says, so {must_match}")
        }
        Some(expected) if expected.parse::<crate::model::KeyId>().is_ok() || alias.is_some() => {
            format!(
                "the blob belongs to {named}, not to --key {expected}: drop --key or name that key"
            )
        }
        Some(expected) => format!(
            "the blob belongs to {named}: if --key {expected} is another key, drop --key or name that one; otherwise {must_match}"
        ),
        None => format!("the blob belongs to {named}; {must_match}"),
    };
    Some(hint)
}

/// The alias of key `id`, if the dev PKI of `c` holds an operator identity
/// allowed to describe it (a service may not call GetKey); None otherwise,
/// quietly. Only when the command uses the dev PKI (no --cert).
async fn describe_alias(c: &ConnectArgs, id: &str) -> Option<String> {
    if c.cert.is_some() {
        return None;
    }
    let paths = crate::pki::PkiPaths::new(&c.data_dir);
    if !paths.client_cert("operator").is_file() {
        return None;
    }
    let mut operator = c.clone();
    operator.identity = Some("operator".to_string());
    operator.timeout = operator.timeout.min(5);
    let channel = connect(&operator, "operator").await.ok()?;
    let resp = KeyServiceClient::new(channel)
        .get_key(pb::GetKeyRequest {
            key_id: id.to_string(),
        })
        .await
        .ok()?
        .into_inner();
    resp.key.map(|k| k.alias)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::KeyId;

    fn blob_of(id: KeyId) -> Vec<u8> {
        let header = envelope::Header {
            suite: envelope::SUITE_HKDF_SHA256_AES256GCM,
            key_id: id,
            key_version: 3,
            salt: [0; envelope::SALT_LEN],
            iv: [0; envelope::IV_LEN],
        };
        envelope::encode(&header, &[1; 32], &[0; envelope::TAG_LEN])
    }

    fn ctx(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn base64_errors_name_the_form_not_a_code() {
        let e = decode_blob("Q0YB-AQ_").unwrap_err();
        assert!(
            e.contains("character 5 is '-'") && e.contains("URL-safe"),
            "{e}"
        );
        assert!(e.contains(BASE64_FORM), "{e}");
        let e = decode_blob("Q0YBA").unwrap_err();
        assert!(e.contains(BASE64_FORM), "{e}");
        assert!(!e.contains("Invalid"), "{e}");
        let e = decode_blob("Q0\u{e9}B").unwrap_err();
        assert!(e.contains("outside the alphabet"), "{e}");
        assert!(decode_blob("  ").unwrap_err().contains("is empty"));
        assert_eq!(decode_blob(" Q0YB\n").unwrap(), b"CF\x01");
    }

    #[test]
    fn the_hint_names_the_blob_s_key() {
        let id = KeyId::new_random();
        let blob = blob_of(id);
        let acme = ctx(&[("tenant", "acme")]);
        // Another key named by its UUID: no description needed.
        let other = KeyId::new_random().to_string();
        let h = blob_hint(&blob, Some(&other), None, &acme).unwrap();
        assert!(
            h.contains(&format!(
                "belongs to key {id}, version 3, not to --key {other}"
            )),
            "{h}"
        );
        // An alias, described: the blob's alias differs.
        let h = blob_hint(&blob, Some("billing"), Some("demo"), &acme).unwrap();
        assert!(
            h.contains("(alias \"demo\")") && h.contains("not to --key billing"),
            "{h}"
        );
        // The alias it has: then the context is the reason.
        let h = blob_hint(&blob, Some("demo"), Some("demo"), &acme).unwrap();
        assert!(
            h.contains("as --key says") && h.contains("must match exactly"),
            "{h}"
        );
        // An alias not described: both possibilities.
        let h = blob_hint(&blob, Some("billing"), None, &acme).unwrap();
        assert!(
            h.contains("if --key billing is another key") && h.contains("given: tenant=acme"),
            "{h}"
        );
        // No --key, no context.
        let h = blob_hint(&blob, None, None, &BTreeMap::new()).unwrap();
        assert!(
            h.contains(&id.to_string()) && h.contains("no context was given"),
            "{h}"
        );
        // Not a blob at all.
        let h = blob_hint(b"hello", None, None, &acme).unwrap();
        assert!(h.contains("not a coffre blob"), "{h}");
    }
}
