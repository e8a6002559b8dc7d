//! `coffre store copy --from sled:DIR --config FILE`: a sled store into a
//! new PostgreSQL database, offline (design/several-nodes.md §3.4).
//!
//! Order, so that every refusal comes before anything is written:
//! the configuration and its URL; the sled store, opened (which takes its
//! lock: a running `coffre dev` or `serve` on it is refused, and none can
//! start on it until the copy is over) and read whole; the database, a
//! primary with the current schema; then one transaction
//! ([`crate::store::postgres::copy::import`]) that refuses a database that
//! is not empty, copies, counts and commits. The source is only read.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use tonic::Code;

use super::StoreCopyArgs;
use super::client::CliError;
use super::output::print_json;
use super::store::{cli_error, connector};
use crate::store::StoreError;
use crate::store::copy::SINGLE_SERVER_AUDIT_MARK;
use crate::store::postgres::connect::{ServerInfo, check_primary};
use crate::store::postgres::copy::{CopyError, import};
use crate::store::sled::SledEngine;

pub async fn run(args: &StoreCopyArgs) -> anyhow::Result<()> {
    let data = &args.from;
    let source = format!("sled:{}", data.display());
    let store_dir = data.join("store");
    if !store_dir.join("CURRENT").is_file() {
        return Err(CliError::local(
            Code::InvalidArgument,
            format!(
                "{source}: no sled store there ({} has no CURRENT file); give the data directory \
                 a coffre ran on (its store is DIR/store)",
                store_dir.display()
            ),
        )
        .into());
    }
    if holds_entries(&data.join("approvals")) {
        return Err(CliError::local(
            Code::FailedPrecondition,
            format!(
                "{source} still has a legacy approvals directory ({}): start coffre on it once, \
                 which moves its approvals into the store, then copy",
                data.join("approvals").display()
            ),
        )
        .into());
    }
    let connector = connector(&args.target.config)?;

    let started = Instant::now();
    let engine = open_source(data, &store_dir, &source).await?;
    if !engine.is_sealed() {
        return Err(CliError::local(
            Code::FailedPrecondition,
            format!(
                "{source}: the store's records are not sealed yet (no coffre has started on it): \
                 start coffre on it once, which seals them, then copy"
            ),
        )
        .into());
    }
    let reader = Arc::clone(&engine);
    let dump = tokio::task::spawn_blocking(move || reader.export())
        .await
        .map_err(|e| CliError::local(Code::Internal, format!("reading {source}: {e}")))?
        .map_err(|e| source_error(&source, e))?;

    let mut client = connector.connect().await.map_err(cli_error)?;
    let info = ServerInfo::read(&connector, &client)
        .await
        .map_err(cli_error)?;
    check_primary(&connector, &info).map_err(cli_error)?;

    let show = !args.target.json && std::io::stderr().is_terminal();
    let mut progress = |table: &'static str, done: u64, total: u64| {
        if show {
            let mut err = std::io::stderr();
            let _ = write!(err, "\rcopying {table}: {done}/{total}   ");
            if done == total {
                let _ = writeln!(err);
            }
        }
    };
    let copied = import(&mut client, &connector, &dump, &mut progress)
        .await
        .map_err(copy_error)?;
    // The source's lock is held to here: no coffre started on it mid-copy.
    drop(engine);
    let seconds = started.elapsed().as_secs_f64();
    let rate = if seconds > 0.0 {
        copied.keys as f64 / seconds
    } else {
        0.0
    };
    let skipped = dump.skipped_secrets();
    if args.target.json {
        return print_json(&json!({
            "from": source,
            "to": connector.target(),
            "copied": copied,
            "skipped_secrets": skipped,
            "seconds": seconds,
            "keys_per_second": rate,
        }));
    }
    println!("copied {source} into {}", connector.target());
    println!("  keys        {}", copied.keys);
    println!("  versions    {}", copied.versions);
    println!("  approvals   {}", copied.approvals);
    println!("  secrets     {}", copied.secrets);
    println!("  generation  {}", copied.generation);
    for name in &skipped {
        if name == SINGLE_SERVER_AUDIT_MARK {
            println!(
                "  not copied: {name} (the single server's audit high-water mark: each node \
                 keeps its own, made at its first start)"
            );
        }
    }
    println!(
        "every count checked against the source, in {seconds:.2} s ({rate:.0} keys/s); the \
         sled store is unchanged"
    );
    Ok(())
}

/// Opens the sled store in `store_dir`, refusing one another process holds.
async fn open_source(
    data: &Path,
    store_dir: &Path,
    source: &str,
) -> anyhow::Result<Arc<SledEngine>> {
    let dir = store_dir.to_path_buf();
    let opened = tokio::task::spawn_blocking(move || SledEngine::open(&dir))
        .await
        .map_err(|e| CliError::local(Code::Internal, format!("opening {source}: {e}")))?;
    match opened {
        Ok(engine) => Ok(Arc::new(engine)),
        Err(e) if crate::server::locked(&store_dir.join("LOCK")) => {
            let pid = std::fs::read_to_string(data.join("coffre.lock"))
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                .map(|pid| format!(" (pid {pid})"))
                .unwrap_or_default();
            Err(CliError::local(
                Code::FailedPrecondition,
                format!(
                    "{source} is in use by another coffre process{pid}: the copy is offline, \
                     stop every coffre on it first ({e})"
                ),
            )
            .into())
        }
        Err(e) => Err(source_error(source, e)),
    }
}

fn holds_entries(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some())
}

fn source_error(source: &str, e: StoreError) -> anyhow::Error {
    let code = match &e {
        StoreError::Io(_) => Code::Unavailable,
        _ => Code::DataLoss,
    };
    CliError::local(code, format!("reading {source}: {e}; nothing was written")).into()
}

fn copy_error(e: CopyError) -> anyhow::Error {
    let e = match e {
        CopyError::Pg(e) => return cli_error(e),
        other => other,
    };
    let code = match &e {
        CopyError::NotEmpty { .. } => Code::FailedPrecondition,
        CopyError::Record(_) => Code::DataLoss,
        CopyError::Mismatch { .. } => Code::Aborted,
        CopyError::Commit { .. } => Code::Unavailable,
        _ => Code::Unknown,
    };
    CliError::local(code, e.to_string()).into()
}
