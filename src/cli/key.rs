//! `coffre key ...`: the operator's calls to the key service, one per
//! subcommand, and how their answers are printed.

use std::path::Path;

use anyhow::Context;
use tonic::transport::Channel;

use super::args::Period;
use super::client::{CliError, connect, read_input, rpc_error};
use super::output::{self, KeyOut, VersionOut};
use super::{ConnectArgs, KeyCommand, PolicyCommand, ProtectionArg, StateFilter};
use crate::grpc::convert::policy_to_pb;
use crate::grpc::pb;
use crate::grpc::pb::key_service_client::KeyServiceClient;
use crate::model::KeyPolicy;

pub async fn run(cmd: KeyCommand) -> anyhow::Result<()> {
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
            check_period("--rotation-period", rotation_period.as_ref())?;
            let protection_level = match protection_level {
                ProtectionArg::Software => pb::ProtectionLevel::Software,
                ProtectionArg::Hsm => pb::ProtectionLevel::Hsm,
            };
            let request = pb::CreateKeyRequest {
                alias: alias.unwrap_or_default(),
                description,
                protection_level: protection_level as i32,
                labels: labels.into_iter().collect(),
                rotation_period: rotation_period.as_ref().map(|p| seconds(p.secs)),
                policy: policy.as_ref().map(policy_to_pb),
            };
            let resp = client(&c).await?.create_key(request).await;
            let resp = resp.map_err(rpc_error)?.into_inner();
            output::warnings(&resp.warnings);
            let mut key =
                KeyOut::from(&returned(resp.key)?).with_given_period(rotation_period.as_ref());
            key.warnings = resp.warnings;
            output::key(&key, &[], c.json)
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
            let mut client = client(&c).await?;
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
            let resp = get_key(&c, key).await?;
            let key = returned(resp.key)?;
            let versions: Vec<VersionOut> = resp.versions.iter().map(VersionOut::from).collect();
            output::key(&KeyOut::from(&key), &versions, c.json)
        }
        KeyCommand::Versions { key, connect: c } => {
            let resp = get_key(&c, key).await?;
            let versions: Vec<VersionOut> = resp.versions.iter().map(VersionOut::from).collect();
            output::versions(&versions, c.json)
        }
        KeyCommand::ScheduleDeletion {
            key,
            days,
            connect: c,
        } => {
            let request = pb::ScheduleKeyDeletionRequest {
                key_id: key,
                pending_window_days: days,
            };
            let resp = client(&c).await?.schedule_key_deletion(request).await;
            let resp = resp.map_err(rpc_error)?.into_inner();
            if !resp.pending_approval_id.is_empty() {
                return super::approval::print_pending(&resp.pending_approval_id, &c).await;
            }
            let mut key = KeyOut::from(&returned(resp.key)?);
            key.deletion_window_days = Some(days);
            output::key(&key, &[], c.json)
        }
        KeyCommand::CancelDeletion { key, connect: c } => {
            let request = pb::CancelKeyDeletionRequest { key_id: key };
            let resp = client(&c).await?.cancel_key_deletion(request).await;
            let resp = resp.map_err(rpc_error)?.into_inner();
            print_pending_or_key(&resp.pending_approval_id, resp.key, &c).await
        }
        KeyCommand::SetRotation {
            key,
            period,
            off,
            connect: c,
        } => {
            let period = if off { None } else { period };
            check_period("--period", period.as_ref())?;
            let request = pb::SetRotationPolicyRequest {
                key_id: key,
                rotation_period: period.as_ref().map(|p| seconds(p.secs)),
            };
            let resp = client(&c).await?.set_rotation_policy(request).await;
            let key = returned(resp.map_err(rpc_error)?.into_inner().key)?;
            let key = KeyOut::from(&key).with_given_period(period.as_ref());
            output::key(&key, &[], c.json)
        }
        KeyCommand::Policy(PolicyCommand::Show { key, connect: c }) => {
            let raw = get_key(&c, key)
                .await?
                .key
                .and_then(|k| k.policy)
                .context("the server returned no policy")?;
            let policy = crate::grpc::convert::policy_from_pb(raw)
                .map_err(|s| anyhow::anyhow!("the server's policy does not parse: {}", s))?;
            output::print_json(&serde_json::to_value(&policy)?)
        }
        KeyCommand::Policy(PolicyCommand::Set {
            key,
            file,
            connect: c,
        }) => {
            let policy = read_policy(&file)?;
            let request = pb::UpdateKeyPolicyRequest {
                key_id: key,
                policy: Some(policy_to_pb(&policy)),
            };
            let resp = client(&c).await?.update_key_policy(request).await;
            let resp = resp.map_err(rpc_error)?.into_inner();
            output::warnings(&resp.warnings);
            if !resp.pending_approval_id.is_empty() {
                if c.json {
                    return output::pending_warned(&resp.pending_approval_id, &resp.warnings, true);
                }
                return super::approval::print_pending(&resp.pending_approval_id, &c).await;
            }
            let mut key = KeyOut::from(&returned(resp.key)?);
            key.warnings = resp.warnings;
            output::key(&key, &[], c.json)
        }
        KeyCommand::RetireVersions {
            key,
            below,
            connect: c,
        } => {
            let request = pb::RetireKeyVersionsRequest {
                key_id: key,
                min_decryption_version: below,
            };
            let resp = client(&c).await?.retire_key_versions(request).await;
            let resp = resp.map_err(rpc_error)?.into_inner();
            print_pending_or_key(&resp.pending_approval_id, resp.key, &c).await
        }
        KeyCommand::Rotate { key, connect: c } => {
            let request = pb::RotateKeyRequest { key_id: key };
            let resp = client(&c).await?.rotate_key(request).await;
            print_key(resp.map_err(rpc_error)?.into_inner().key, &c)
        }
        KeyCommand::Disable { key, connect: c } => {
            let request = pb::DisableKeyRequest { key_id: key };
            let resp = client(&c).await?.disable_key(request).await;
            print_key(resp.map_err(rpc_error)?.into_inner().key, &c)
        }
        KeyCommand::Enable { key, connect: c } => {
            let request = pb::EnableKeyRequest { key_id: key };
            let resp = client(&c).await?.enable_key(request).await;
            let resp = resp.map_err(rpc_error)?.into_inner();
            print_pending_or_key(&resp.pending_approval_id, resp.key, &c).await
        }
    }
}

/// The key service, as the operator unless `--as` names another identity.
async fn client(c: &ConnectArgs) -> anyhow::Result<KeyServiceClient<Channel>> {
    Ok(KeyServiceClient::new(connect(c, "operator").await?))
}

/// `GetKey`: the key and its versions.
async fn get_key(c: &ConnectArgs, key: String) -> anyhow::Result<pb::GetKeyResponse> {
    let request = pb::GetKeyRequest { key_id: key };
    let resp = client(c).await?.get_key(request).await;
    Ok(resp.map_err(rpc_error)?.into_inner())
}

/// The key a response must carry.
fn returned(key: Option<pb::KeyMetadata>) -> anyhow::Result<pb::KeyMetadata> {
    key.context("the server returned no key")
}

/// Prints the key a response carries, without its versions.
fn print_key(key: Option<pb::KeyMetadata>, c: &ConnectArgs) -> anyhow::Result<()> {
    output::key(&KeyOut::from(&returned(key)?), &[], c.json)
}

/// For an operation a quorum may hold back: the approval it waits for, or
/// else the key as the operation left it.
async fn print_pending_or_key(
    pending_approval_id: &str,
    key: Option<pb::KeyMetadata>,
    c: &ConnectArgs,
) -> anyhow::Result<()> {
    if pending_approval_id.is_empty() {
        print_key(key, c)
    } else {
        super::approval::print_pending(pending_approval_id, c).await
    }
}

/// A policy from a JSON file: the format `coffre key policy show` prints,
/// or the proto's JSON form (field names in lowerCamelCase, enum values by
/// their proto names, `GENERATE_DATA_KEY` as well as `GenerateDataKey`), so
/// that a policy a gRPC client built can be given as it is.
fn read_policy(path: &Path) -> anyhow::Result<KeyPolicy> {
    let bytes = read_input(path)?;
    let invalid = |why: String| {
        CliError::local(
            tonic::Code::InvalidArgument,
            format!("{} is not a valid policy: {why}", path.display()),
        )
    };
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
    let policy: KeyPolicy =
        serde_json::from_value(from_proto_json(value)).map_err(|e| invalid(e.to_string()))?;
    policy.validate().map_err(invalid)?;
    Ok(policy)
}

/// The proto JSON spellings of a policy (`grants[].operations`,
/// `acceptedReasons`, `requiredContext.*.equalsCallerAttribute`, enum
/// names) rewritten to the ones [`KeyPolicy`] reads; anything else as it is.
fn from_proto_json(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    let renamed = |key: String| match key.as_str() {
        "requiredContext" => "required_context".to_string(),
        "acceptedReasons" => "accepted_reasons".to_string(),
        "equalsCallerAttribute" => "equals_caller_attribute".to_string(),
        _ => key,
    };
    let Value::Object(top) = value else {
        return value;
    };
    let mut out = serde_json::Map::new();
    for (key, v) in top {
        let key = renamed(key);
        let v = match (key.as_str(), v) {
            ("grants", Value::Array(grants)) => Value::Array(
                grants
                    .into_iter()
                    .map(|g| match g {
                        Value::Object(grant) => Value::Object(
                            grant
                                .into_iter()
                                .map(|(k, v)| match (k.as_str(), v) {
                                    ("operations", Value::Array(ops)) => (
                                        k,
                                        Value::Array(ops.into_iter().map(operation_name).collect()),
                                    ),
                                    (_, v) => (k, v),
                                })
                                .collect(),
                        ),
                        other => other,
                    })
                    .collect(),
            ),
            ("accepted_reasons", Value::Array(reasons)) => {
                Value::Array(reasons.into_iter().map(reason_name).collect())
            }
            ("required_context", Value::Object(rules)) => Value::Object(
                rules
                    .into_iter()
                    .map(|(name, rule)| match rule {
                        Value::Object(fields) => (
                            name,
                            Value::Object(
                                fields.into_iter().map(|(k, v)| (renamed(k), v)).collect(),
                            ),
                        ),
                        other => (name, other),
                    })
                    .collect(),
            ),
            (_, v) => v,
        };
        out.insert(key, v);
    }
    Value::Object(out)
}

/// `GENERATE_DATA_KEY` (the proto's name) as `GenerateDataKey`; any other
/// value as it is, for serde to accept or refuse.
fn operation_name(v: serde_json::Value) -> serde_json::Value {
    let found = v.as_str().and_then(|name| {
        crate::model::DataKeyOperation::ALL.into_iter().find(|op| {
            let wire = crate::grpc::convert::operation_to_pb(*op);
            wire.as_str_name() == name
        })
    });
    match found.and_then(|op| serde_json::to_value(op).ok()) {
        Some(ours) => ours,
        None => v,
    }
}

/// `ACCESS_REASON_UNSPECIFIED` (the proto's name) as `UNSPECIFIED`; the
/// other reasons are spelt alike.
fn reason_name(v: serde_json::Value) -> serde_json::Value {
    let found = v.as_str().and_then(|name| {
        pb::AccessReason::from_str_name(name)
            .and_then(|wire| crate::grpc::convert::reason_from_pb(wire as i32).ok())
    });
    match found.and_then(|r| serde_json::to_value(r).ok()) {
        Some(ours) => ours,
        None => v,
    }
}

/// A period flag's value, refused here when the server would refuse it, in
/// the words it was given (`--period 1h`, not `3600 s`).
fn check_period(flag: &str, period: Option<&Period>) -> anyhow::Result<()> {
    use crate::service::{MAX_ROTATION_PERIOD, MIN_ROTATION_PERIOD};
    let Some(p) = period else {
        return Ok(());
    };
    if p.secs < MIN_ROTATION_PERIOD.as_secs() || p.secs > MAX_ROTATION_PERIOD.as_secs() {
        anyhow::bail!(CliError::local(
            tonic::Code::InvalidArgument,
            format!(
                "{flag} {}: a rotation period must be 1 day to 10 years",
                p.text
            ),
        ));
    }
    Ok(())
}

fn seconds(s: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(s).unwrap_or(i64::MAX),
        nanos: 0,
    }
}
