//! `coffre cluster status`: the cluster as its database records it — the
//! nodes with their last heartbeat and how fresh each one's caches are
//! (its staleness), the leases, the change feed's newest
//! generation, and whether the server reached is the primary. Read from
//! the database directly, so it answers with every node down; failures
//! follow `coffre store`'s codes.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use serde_json::json;

use super::ClusterCommand;
use super::StoreArgs;
use super::client::CliError;
use super::output::print_json;
use super::store::{cli_error, connector};
use crate::cluster::postgres::PgCoordination;
use crate::cluster::{Coordination, ReportedFreshness};
use crate::server::DataDir;
use crate::store::postgres::connect::ServerInfo;

/// A node whose last heartbeat is older than this is shown as silent (it
/// beats every second).
const SILENT_AFTER_MS: u64 = 5_000;

/// Whether a node was within its bound at its last heartbeat; `None` for
/// a silent node, whose last report says nothing of now (cut off from
/// the database, a strict node stops serving by itself).
fn is_fresh(f: &ReportedFreshness, last_seen_ms_ago: u64) -> Option<bool> {
    (last_seen_ms_ago <= SILENT_AFTER_MS)
        .then(|| f.staleness_ms.is_some_and(|ms| ms <= f.max_staleness_ms))
}

/// "staleness 0.2 s (fresh, bound 1.0 s, strict), feed at generation 41
/// of 41", as of the node's last heartbeat.
fn describe_freshness(f: Option<&ReportedFreshness>, last_seen_ms_ago: u64, head: i64) -> String {
    let Some(f) = f else {
        return "freshness not reported".to_string();
    };
    let mode = if f.strict { "strict" } else { "available" };
    let bound = f.max_staleness_ms as f64 / 1000.0;
    let verdict = match is_fresh(f, last_seen_ms_ago) {
        Some(true) => "fresh",
        Some(false) => "STALE",
        None => "unknown now",
    };
    let staleness = match f.staleness_ms {
        Some(ms) => format!("{:.1} s", ms as f64 / 1000.0),
        None => "never confirmed".to_string(),
    };
    format!(
        "staleness {staleness} ({verdict}, bound {bound:.1} s, {mode}), feed at generation {} of {head}",
        f.feed_generation
    )
}

pub async fn run(cmd: ClusterCommand) -> anyhow::Result<()> {
    match cmd {
        ClusterCommand::Status(args) => status(&args).await,
    }
}

async fn status(args: &StoreArgs) -> anyhow::Result<()> {
    let connector = Arc::new(connector(&args.config)?);
    let client = connector.connect().await.map_err(cli_error)?;
    let info = ServerInfo::read(&connector, &client)
        .await
        .map_err(cli_error)?;
    let generation: i64 = client
        .query_one("SELECT key_generation FROM coffre_cluster", &[])
        .await
        .map_err(|e| cli_error(connector.error(&e)))?
        .try_get(0)
        .map_err(|e| cli_error(connector.error(&e)))?;
    let reader = PgCoordination::new(Arc::clone(&connector), "coffre-cli", uuid::Uuid::nil());
    let unavailable = |e: crate::cluster::CoordinationError| {
        CliError::local(tonic::Code::Unavailable, e.to_string())
    };
    let nodes = reader.nodes().await.map_err(unavailable)?;
    let leases = reader.leases().await.map_err(unavailable)?;
    if args.json {
        return print_json(&json!({
            "target": connector.target(),
            "primary": {
                "server_address": info.server_address,
                "in_recovery": info.in_recovery,
                "synchronous_standby_names": info.synchronous_standby_names,
            },
            "key_generation": generation,
            "nodes": nodes.iter().map(|n| json!({
                "node_id": n.node_id,
                "incarnation": n.incarnation,
                "last_seen_ms_ago": n.last_seen_ms_ago,
                "alive": n.last_seen_ms_ago <= SILENT_AFTER_MS,
                "freshness": n.freshness.as_ref().map(|f| json!({
                    "feed_generation": f.feed_generation,
                    "staleness_ms": f.staleness_ms,
                    "max_staleness_ms": f.max_staleness_ms,
                    "mode": if f.strict { "strict" } else { "available" },
                    "fresh": is_fresh(f, n.last_seen_ms_ago),
                })),
            })).collect::<Vec<_>>(),
            "leases": leases.iter().map(|l| json!({
                "name": l.name,
                "holder": l.holder,
                "token": l.token,
                "expires_in_ms": l.expires_in_ms,
                "held": l.expires_in_ms > 0,
            })).collect::<Vec<_>>(),
        }));
    }
    let role = if info.in_recovery {
        "a standby (in recovery): no node can write"
    } else {
        "the primary"
    };
    println!(
        "database: {} ({}, {role})",
        connector.target(),
        info.server()
    );
    println!("change feed: generation {generation}");
    if nodes.is_empty() {
        println!("nodes: none has registered yet");
    } else {
        println!("nodes:");
        for n in &nodes {
            let state = if n.last_seen_ms_ago <= SILENT_AFTER_MS {
                "alive"
            } else {
                "silent"
            };
            println!(
                "  {:<16} {state:<6} last heartbeat {:.1} s ago, {}",
                n.node_id,
                n.last_seen_ms_ago as f64 / 1000.0,
                describe_freshness(n.freshness.as_ref(), n.last_seen_ms_ago, generation)
            );
        }
    }
    if leases.is_empty() {
        println!("leases: none taken yet");
    } else {
        println!("leases:");
        for l in &leases {
            if l.expires_in_ms > 0 {
                println!(
                    "  {:<16} held by {} (token {}), {:.1} s left",
                    l.name,
                    l.holder,
                    l.token,
                    l.expires_in_ms as f64 / 1000.0
                );
            } else {
                println!(
                    "  {:<16} free (last held by {}, token {})",
                    l.name, l.holder, l.token
                );
            }
        }
    }
    Ok(())
}

/// The nodes of a cluster file (`DIR/cluster.json` of `coffre dev
/// --nodes`): (node id, endpoint).
pub(super) fn cluster_file_nodes(path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    #[derive(serde::Deserialize)]
    struct Node {
        node_id: String,
        endpoint: String,
    }
    #[derive(serde::Deserialize)]
    struct File {
        nodes: Vec<Node>,
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file: File = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a cluster file", path.display()))?;
    Ok(file
        .nodes
        .into_iter()
        .map(|n| (n.node_id, n.endpoint))
        .collect())
}

/// `--node NAME`: that node's endpoint in `DATA_DIR/cluster.json`.
pub(super) fn node_endpoint(data_dir: &Path, node: &str) -> anyhow::Result<String> {
    let path = DataDir::new(data_dir).cluster_json();
    let nodes = cluster_file_nodes(&path).map_err(|e| {
        CliError::local(
            tonic::Code::InvalidArgument,
            format!(
                "--node {node}: {e:#} (is `coffre dev --nodes` running with --data-dir {}?)",
                data_dir.display()
            ),
        )
    })?;
    let names: Vec<&str> = nodes.iter().map(|(id, _)| id.as_str()).collect();
    if let Some((_, endpoint)) = nodes.iter().find(|(id, _)| id == node) {
        return Ok(endpoint.clone());
    }
    Err(CliError::local(
        tonic::Code::InvalidArgument,
        format!(
            "--node {node}: {} has no such node (it has {})",
            path.display(),
            names.join(", ")
        ),
    )
    .into())
}
