//! `coffre store migrate|status` (and `copy`, in `store_copy.rs`): the PostgreSQL database a server
//! configuration names, reached directly with its URL (no server runs).
//!
//! `migrate` refuses a standby (it would fail on the first write anyway)
//! and a schema it does not know; `status` reads a standby too. Failures
//! follow the CLI's `--json` convention (`report.rs`), with a code that
//! says what kind: `INVALID_ARGUMENT` for the configuration or the URL,
//! `UNAVAILABLE` for a server that does not answer (or TLS),
//! `UNAUTHENTICATED` for a refused login, `PERMISSION_DENIED` for a role
//! that lacks a privilege, `NOT_FOUND` for a missing
//! database, `FAILED_PRECONDITION` for a standby or a schema this coffre
//! cannot use.

use std::path::Path;

use serde_json::json;

use super::client::CliError;
use super::output::print_json;
use super::{StoreArgs, StoreCommand};
use crate::config::{ClusterConfig, Config, PostgresConfig, StoreConfig};
use crate::store::postgres::connect::{ServerInfo, check_primary};
use crate::store::postgres::{PgConnector, PgError, SchemaState, migrate, schema_state};

pub async fn run(cmd: StoreCommand) -> anyhow::Result<()> {
    match cmd {
        StoreCommand::Migrate(args) => run_migrate(&args).await,
        StoreCommand::Status(args) => run_status(&args).await,
        StoreCommand::Copy(args) => super::store_copy::run(&args).await,
    }
}

/// The connector of the configuration's PostgreSQL store.
pub(super) fn connector(path: &Path) -> anyhow::Result<PgConnector> {
    let config = Config::load(path)
        .map_err(|e| CliError::local(tonic::Code::InvalidArgument, format!("{e:#}")))?;
    let (store, cluster) = postgres_settings(&config, path)?;
    PgConnector::from_config(store, cluster).map_err(cli_error)
}

fn postgres_settings<'a>(
    config: &'a Config,
    path: &Path,
) -> anyhow::Result<(&'a PostgresConfig, &'a ClusterConfig)> {
    match (&config.store, &config.cluster) {
        (StoreConfig::Postgres(store), Some(cluster)) => Ok((store, cluster)),
        _ => Err(CliError::local(
            tonic::Code::InvalidArgument,
            format!(
                "{} does not use the PostgreSQL store ([store] backend = \"postgres\"): the sled \
                 store has no schema to manage",
                path.display()
            ),
        )
        .into()),
    }
}

async fn run_migrate(args: &StoreArgs) -> anyhow::Result<()> {
    let connector = connector(&args.config)?;
    let mut client = connector.connect().await.map_err(cli_error)?;
    let info = ServerInfo::read(&connector, &client)
        .await
        .map_err(cli_error)?;
    check_primary(&connector, &info).map_err(cli_error)?;
    let report = migrate(&mut client, &connector).await.map_err(cli_error)?;
    if args.json {
        return print_json(&serde_json::to_value(&report)?);
    }
    if report.applied.is_empty() {
        println!("schema is current (version {})", report.version);
    } else {
        for m in &report.applied {
            println!("applied migration {} ({})", m.version, m.name);
        }
        println!("schema is now version {}", report.version);
    }
    Ok(())
}

async fn run_status(args: &StoreArgs) -> anyhow::Result<()> {
    let connector = connector(&args.config)?;
    let client = connector.connect().await.map_err(cli_error)?;
    let info = ServerInfo::read(&connector, &client)
        .await
        .map_err(cli_error)?;
    let state = schema_state(&client, &connector).await.map_err(cli_error)?;
    let (name, version, words) = match state {
        SchemaState::Missing => (
            "missing",
            None,
            "none: run coffre store migrate".to_string(),
        ),
        SchemaState::Current { version } => (
            "current",
            Some(version),
            format!("version {version} (current)"),
        ),
        SchemaState::Older { version, latest } => (
            "older",
            Some(version),
            format!(
                "version {version}, older than this coffre's {latest}: run coffre store migrate"
            ),
        ),
        SchemaState::Newer { version, known } => (
            "newer",
            Some(version),
            format!("version {version}, newer than this coffre knows ({known}): upgrade coffre"),
        ),
    };
    if args.json {
        return print_json(&json!({
            "target": connector.target(),
            "schema": {
                "state": name,
                "version": version,
                "latest": crate::store::postgres::migrate::LATEST_VERSION,
            },
            "server_version": info.version,
            "server_version_num": info.version_num,
            "server_address": info.server_address,
            "in_recovery": info.in_recovery,
            "synchronous_standby_names": info.synchronous_standby_names,
        }));
    }
    let role = if info.in_recovery {
        "a standby (in recovery)"
    } else {
        "the primary"
    };
    println!("database: {}", connector.target());
    println!(
        "server: PostgreSQL {} at {}, {role}",
        info.version,
        info.server()
    );
    println!("schema: {words}");
    let standbys = if info.synchronous_standby_names.is_empty() {
        "(none: commits wait for no standby)"
    } else {
        info.synchronous_standby_names.as_str()
    };
    println!("synchronous_standby_names: {standbys}");
    Ok(())
}

/// A [`PgError`] as the CLI reports it: the code its kind stands for.
pub(super) fn cli_error(e: PgError) -> anyhow::Error {
    use tonic::Code;
    let code = match &e {
        PgError::Url { .. } | PgError::CaFile { .. } => Code::InvalidArgument,
        PgError::Unreachable { .. } | PgError::Tls { .. } | PgError::Pool { .. } => {
            Code::Unavailable
        }
        PgError::Authentication { .. } => Code::Unauthenticated,
        PgError::Permission { .. } => Code::PermissionDenied,
        PgError::NoDatabase { .. } => Code::NotFound,
        PgError::InRecovery { .. }
        | PgError::NoSynchronousStandby { .. }
        | PgError::ServerTooOld { .. }
        | PgError::SchemaMissing { .. }
        | PgError::SchemaOlder { .. }
        | PgError::SchemaNewer { .. }
        | PgError::ChecksumMismatch { .. } => Code::FailedPrecondition,
        PgError::Query { .. } => Code::Unknown,
    };
    CliError::local(code, e.to_string()).into()
}
