//! The operator/service client commands: gRPC over mTLS, like any client.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use zeroize::Zeroizing;

use super::output::{self, KeyOut, VersionOut};
use super::{
    ApprovalCommand, ConnectArgs, DataArgs, DatakeyCommand, DecryptArgs, EncryptArgs,
    Justification, KeyCommand, PolicyCommand, StateFilter,
};
use crate::grpc::convert::policy_to_pb;
use crate::grpc::pb;
use crate::grpc::pb::approval_service_client::ApprovalServiceClient;
use crate::grpc::pb::data_key_service_client::DataKeyServiceClient;
use crate::grpc::pb::key_service_client::KeyServiceClient;
use crate::pki::PkiPaths;

/// Opens an mTLS channel as `default_identity` unless told otherwise.
pub async fn connect(args: &ConnectArgs, default_identity: &str) -> anyhow::Result<Channel> {
    let paths = PkiPaths::new(&args.data_dir);
    let name = args.identity.as_deref().unwrap_or(default_identity);
    let ca_path = args.ca.clone().unwrap_or_else(|| paths.ca_cert());
    let (cert_path, key_path) = match (&args.cert, &args.cert_key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => (paths.client_cert(name), paths.client_key(name)),
    };
    let read = |p: &Path, what: &str| -> anyhow::Result<Vec<u8>> {
        std::fs::read(p).with_context(|| {
            format!(
                "cannot read the {what} {} (is `coffre dev` running with --data-dir {}? or pass --ca, --cert and --cert-key)",
                p.display(),
                args.data_dir.display()
            )
        })
    };
    let ca = read(&ca_path, "CA certificate")?;
    let cert = read(&cert_path, "client certificate")?;
    let key = Zeroizing::new(read(&key_path, "client key")?);

    let uri: tonic::transport::Uri = args
        .endpoint
        .parse()
        .with_context(|| format!("invalid endpoint {:?}", args.endpoint))?;
    if uri.scheme_str() != Some("https") {
        bail!("the endpoint must start with https:// (coffre always uses TLS)");
    }
    let host = uri
        .host()
        .unwrap_or("localhost")
        .trim_matches(['[', ']'])
        .to_string();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, &*key))
        .domain_name(host);
    let endpoint = Endpoint::from(uri)
        .tls_config(tls)
        .context("configuring TLS")?
        .timeout(Duration::from_secs(args.timeout.max(1)))
        .connect_timeout(Duration::from_secs(10));
    endpoint
        .connect()
        .await
        .with_context(|| format!("cannot connect to {}", args.endpoint))
}

/// A gRPC error, readable.
pub(super) fn rpc_error(status: tonic::Status) -> anyhow::Error {
    let code = match status.code() {
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::NotFound => "not found",
        tonic::Code::PermissionDenied => "permission denied",
        tonic::Code::FailedPrecondition => "failed precondition",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::AlreadyExists => "already exists",
        tonic::Code::Unauthenticated => "unauthenticated",
        tonic::Code::DeadlineExceeded => "deadline exceeded",
        _ => "error",
    };
    let msg = status.message();
    if msg.is_empty() {
        anyhow::anyhow!("{code} ({:?})", status.code())
    } else {
        anyhow::anyhow!("{code}: {msg}")
    }
}

fn context_map(data: &DataArgs) -> HashMap<String, String> {
    data.context.iter().cloned().collect()
}

fn justification(j: Justification) -> i32 {
    (match j {
        Justification::Unspecified => pb::AccessReason::Unspecified,
        Justification::CustomerInitiatedAccess => pb::AccessReason::CustomerInitiatedAccess,
        Justification::CustomerInitiatedSupport => pb::AccessReason::CustomerInitiatedSupport,
        Justification::ProviderInitiatedService => pb::AccessReason::ProviderInitiatedService,
        Justification::ProviderSystemOperation => pb::AccessReason::ProviderSystemOperation,
        Justification::ProviderInitiatedReview => pb::AccessReason::ProviderInitiatedReview,
        Justification::ThirdPartyDataRequest => pb::AccessReason::ThirdPartyDataRequest,
    }) as i32
}

pub async fn key(cmd: KeyCommand) -> anyhow::Result<()> {
    match cmd {
        KeyCommand::Create {
            alias,
            description,
            labels,
            rotation_period,
            policy,
            protection_level,
            connect: c,
        } => {
            let policy = policy.map(|p| read_policy(&p)).transpose()?;
            let protection_level = match protection_level {
                super::ProtectionArg::Software => pb::ProtectionLevel::Software,
                super::ProtectionArg::Hsm => pb::ProtectionLevel::Hsm,
            };
            let mut client = KeyServiceClient::new(connect(&c, "operator").await?);
            let resp = client
                .create_key(pb::CreateKeyRequest {
                    alias: alias.unwrap_or_default(),
                    description,
                    protection_level: protection_level as i32,
                    labels: labels.into_iter().collect(),
                    rotation_period: rotation_period.map(seconds),
                    policy: policy.as_ref().map(policy_to_pb),
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let key = resp.key.context("the server returned no key")?;
            output::key(&KeyOut::from(&key), &[], c.json)
        }
        KeyCommand::List {
            page_size,
            page_token,
            all,
            state,
            alias_prefix,
            connect: c,
        } => {
            let state = state.map_or(pb::KeyState::Unspecified, |s| match s {
                StateFilter::Enabled => pb::KeyState::Enabled,
                StateFilter::Disabled => pb::KeyState::Disabled,
                StateFilter::PendingDeletion => pb::KeyState::PendingDeletion,
                StateFilter::Destroyed => pb::KeyState::Destroyed,
            });
            let mut client = KeyServiceClient::new(connect(&c, "operator").await?);
            let mut token = page_token;
            let mut keys = Vec::new();
            loop {
                let resp = client
                    .list_keys(pb::ListKeysRequest {
                        page_size,
                        page_token: token,
                        state: state as i32,
                        alias_prefix: alias_prefix.clone().unwrap_or_default(),
                    })
                    .await
                    .map_err(rpc_error)?
                    .into_inner();
                keys.extend(resp.keys.iter().map(KeyOut::from));
                token = resp.next_page_token;
                if !all || token.is_empty() {
                    break;
                }
            }
            output::key_list(&keys, &token, c.json)
        }
        KeyCommand::Show { key, connect: c } => {
            let mut client = KeyServiceClient::new(connect(&c, "operator").await?);
            let resp = client
                .get_key(pb::GetKeyRequest { key_id: key })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let key = resp.key.context("the server returned no key")?;
            let versions: Vec<VersionOut> = resp.versions.iter().map(VersionOut::from).collect();
            output::key(&KeyOut::from(&key), &versions, c.json)
        }
        KeyCommand::Versions { key, connect: c } => {
            let mut client = KeyServiceClient::new(connect(&c, "operator").await?);
            let resp = client
                .get_key(pb::GetKeyRequest { key_id: key })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let versions: Vec<VersionOut> = resp.versions.iter().map(VersionOut::from).collect();
            output::versions(&versions, c.json)
        }
        KeyCommand::ScheduleDeletion {
            key,
            days,
            connect: c,
        } => {
            let mut client = KeyServiceClient::new(connect(&c, "operator").await?);
            let resp = client
                .schedule_key_deletion(pb::ScheduleKeyDeletionRequest {
                    key_id: key,
                    pending_window_days: days,
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            if !resp.pending_approval_id.is_empty() {
                return output::pending(&resp.pending_approval_id, c.json);
            }
            let key = resp.key.context("the server returned no key")?;
            output::key(&KeyOut::from(&key), &[], c.json)
        }
        KeyCommand::CancelDeletion { key, connect: c } => {
            let mut client = KeyServiceClient::new(connect(&c, "operator").await?);
            let resp = client
                .cancel_key_deletion(pb::CancelKeyDeletionRequest { key_id: key })
                .await
                .map_err(rpc_error)?
                .into_inner();
            if !resp.pending_approval_id.is_empty() {
                return output::pending(&resp.pending_approval_id, c.json);
            }
            let key = resp.key.context("the server returned no key")?;
            output::key(&KeyOut::from(&key), &[], c.json)
        }
        KeyCommand::SetRotation {
            key,
            period,
            off,
            connect: c,
        } => {
            let mut client = KeyServiceClient::new(connect(&c, "operator").await?);
            let resp = client
                .set_rotation_policy(pb::SetRotationPolicyRequest {
                    key_id: key,
                    rotation_period: if off { None } else { period.map(seconds) },
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let key = resp.key.context("the server returned no key")?;
            output::key(&KeyOut::from(&key), &[], c.json)
        }
        KeyCommand::Policy(PolicyCommand::Show { key, connect: c }) => {
            let mut client = KeyServiceClient::new(connect(&c, "operator").await?);
            let resp = client
                .get_key(pb::GetKeyRequest { key_id: key })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let raw = resp
                .key
                .and_then(|k| k.policy)
                .context("the server returned no policy")?;
            let policy = crate::grpc::convert::policy(raw).map_err(|s| {
                anyhow::anyhow!("the server's policy does not parse: {}", s.message())
            })?;
            println!("{}", serde_json::to_string_pretty(&policy)?);
            Ok(())
        }
        KeyCommand::Policy(PolicyCommand::Set {
            key,
            file,
            connect: c,
        }) => {
            let policy = read_policy(&file)?;
            let mut client = KeyServiceClient::new(connect(&c, "operator").await?);
            let resp = client
                .update_key_policy(pb::UpdateKeyPolicyRequest {
                    key_id: key,
                    policy: Some(policy_to_pb(&policy)),
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            if !resp.pending_approval_id.is_empty() {
                return output::pending(&resp.pending_approval_id, c.json);
            }
            let key = resp.key.context("the server returned no key")?;
            output::key(&KeyOut::from(&key), &[], c.json)
        }
        KeyCommand::RetireVersions {
            key,
            below,
            connect: c,
        } => {
            let mut client = KeyServiceClient::new(connect(&c, "operator").await?);
            let resp = client
                .retire_key_versions(pb::RetireKeyVersionsRequest {
                    key_id: key,
                    min_decryption_version: below,
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let key = resp.key.context("the server returned no key")?;
            output::key(&KeyOut::from(&key), &[], c.json)
        }
        KeyCommand::Rotate { key, connect: c } => {
            let mut client = KeyServiceClient::new(connect(&c, "operator").await?);
            let resp = client
                .rotate_key(pb::RotateKeyRequest { key_id: key })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let key = resp.key.context("the server returned no key")?;
            output::key(&KeyOut::from(&key), &[], c.json)
        }
        KeyCommand::Disable { key, connect: c } => {
            let mut client = KeyServiceClient::new(connect(&c, "operator").await?);
            let resp = client
                .disable_key(pb::DisableKeyRequest { key_id: key })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let key = resp.key.context("the server returned no key")?;
            output::key(&KeyOut::from(&key), &[], c.json)
        }
        KeyCommand::Enable { key, connect: c } => {
            let mut client = KeyServiceClient::new(connect(&c, "operator").await?);
            let resp = client
                .enable_key(pb::EnableKeyRequest { key_id: key })
                .await
                .map_err(rpc_error)?
                .into_inner();
            if !resp.pending_approval_id.is_empty() {
                return output::pending(&resp.pending_approval_id, c.json);
            }
            let key = resp.key.context("the server returned no key")?;
            output::key(&KeyOut::from(&key), &[], c.json)
        }
    }
}

/// A policy from a JSON file (the format `coffre key policy show` prints).
fn read_policy(path: &Path) -> anyhow::Result<crate::model::KeyPolicy> {
    let bytes = read_input(path)?;
    let policy: crate::model::KeyPolicy = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a valid policy", path.display()))?;
    policy
        .validate()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(policy)
}

fn seconds(s: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(s).unwrap_or(i64::MAX),
        nanos: 0,
    }
}

pub async fn approval(cmd: ApprovalCommand) -> anyhow::Result<()> {
    match cmd {
        ApprovalCommand::List { all, connect: c } => {
            let mut client = ApprovalServiceClient::new(connect(&c, "operator").await?);
            let resp = client
                .list_approvals(pb::ListApprovalsRequest {
                    include_closed: all,
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            output::approvals(&resp.approvals, c.json)
        }
        ApprovalCommand::Approve { id, connect: c } => {
            let mut client = ApprovalServiceClient::new(connect(&c, "operator").await?);
            let resp = client
                .approve_operation(pb::ApproveOperationRequest { approval_id: id })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let a = resp.approval.context("the server returned no approval")?;
            output::approvals(std::slice::from_ref(&a), c.json)?;
            if a.status() == pb::ApprovalStatus::ApprovalFailed {
                bail!("the approved operation failed: {}", a.result);
            }
            Ok(())
        }
        ApprovalCommand::Reject { id, connect: c } => {
            let mut client = ApprovalServiceClient::new(connect(&c, "operator").await?);
            let resp = client
                .reject_operation(pb::RejectOperationRequest { approval_id: id })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let a = resp.approval.context("the server returned no approval")?;
            output::approvals(std::slice::from_ref(&a), c.json)
        }
    }
}

pub async fn datakey(cmd: DatakeyCommand) -> anyhow::Result<()> {
    match cmd {
        DatakeyCommand::Generate {
            key,
            bytes,
            without_plaintext,
            count,
            data,
            connect: c,
        } => {
            let mut client = DataKeyServiceClient::new(connect(&c, "service").await?);
            if let Some(count) = count {
                let resp = client
                    .batch_generate_data_key(pb::BatchGenerateDataKeyRequest {
                        key_id: key,
                        encryption_context: context_map(&data),
                        justification: justification(data.justification),
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
                    .generate_data_key_without_plaintext(
                        pb::GenerateDataKeyWithoutPlaintextRequest {
                            key_id: key,
                            encryption_context: context_map(&data),
                            justification: justification(data.justification),
                            number_of_bytes: bytes,
                        },
                    )
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
                        encryption_context: context_map(&data),
                        justification: justification(data.justification),
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
    }
}

fn read_input(path: &Path) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let mut buf = Zeroizing::new(Vec::new());
    if path == Path::new("-") {
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("reading standard input")?;
    } else {
        let mut f =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        f.read_to_end(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
    }
    Ok(buf)
}

fn write_output(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
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

pub async fn encrypt(args: EncryptArgs) -> anyhow::Result<()> {
    let plaintext = read_input(&args.input)?;
    let mut client = DataKeyServiceClient::new(connect(&args.connect, "service").await?);
    let resp = client
        .encrypt(pb::EncryptRequest {
            key_id: args.key,
            plaintext: plaintext.to_vec(),
            encryption_context: context_map(&args.data),
            justification: justification(args.data.justification),
        })
        .await
        .map_err(rpc_error)?
        .into_inner();
    if let Some(path) = &args.output {
        write_output(path, &resp.ciphertext_blob)?;
    }
    output::ciphertext(
        args.output.is_none().then_some(&resp.ciphertext_blob[..]),
        &resp.key_id,
        resp.key_version,
        args.connect.json,
    )
}

pub async fn decrypt(args: DecryptArgs) -> anyhow::Result<()> {
    let blob = match (&args.blob, &args.input) {
        (Some(b64), _) => B64
            .decode(b64.trim())
            .context("--blob is not valid base64")?,
        (None, Some(path)) => read_input(path)?.to_vec(),
        (None, None) => bail!("give the blob with --blob or --in"),
    };
    let mut client = DataKeyServiceClient::new(connect(&args.connect, "service").await?);
    let resp = client
        .decrypt(pb::DecryptRequest {
            ciphertext_blob: blob,
            encryption_context: context_map(&args.data),
            justification: justification(args.data.justification),
            key_id: args.key.unwrap_or_default(),
        })
        .await
        .map_err(rpc_error)?
        .into_inner();
    let plaintext = Zeroizing::new(resp.plaintext);
    if let Some(path) = &args.output {
        write_output(path, &plaintext)?;
        if path == Path::new("-") {
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
