//! `coffre audit ...`: `verify` checks an exported log offline (no server:
//! only the file and the audit public key); `export`, `events`, `tail` and
//! `checkpoint` are auditor clients of the `AuditService`.

use std::fs::File;
use std::io::{BufReader, IsTerminal, Write};

use anyhow::{Context, bail};
use serde_json::json;

use super::client::{CliError, connect, rpc_error};
use super::output::{print_json, print_json_line};
use super::{AuditCommand, OutcomeArg};
use crate::audit::cluster::{ClusterFailure, DIGESTS_FILE, node_file_name, verify_cluster};
use crate::audit::{
    Checkpoint, Policy, key_fingerprint, public_key_from_pem, verify, verify_with_checkpoint,
    verify_with_checkpoints,
};
use crate::grpc::pb;
use crate::grpc::pb::audit_service_client::AuditServiceClient;
use crate::model::Timestamp;

pub async fn run(cmd: AuditCommand) -> anyhow::Result<()> {
    match cmd {
        AuditCommand::Export {
            out,
            cluster: true,
            cluster_file,
            config,
            public_key_out,
            public_key,
            connect: c,
        } => {
            export_cluster(
                &out,
                cluster_file.as_deref(),
                config.as_deref(),
                public_key_out.as_deref(),
                public_key.as_deref(),
                &c,
            )
            .await
        }
        AuditCommand::Export {
            out,
            public_key_out,
            public_key,
            connect: c,
            ..
        } => export(&out, public_key_out.as_deref(), public_key.as_deref(), &c).await,
        AuditCommand::Events {
            key,
            principal,
            operation,
            outcome,
            since,
            limit,
            page_token,
            connect: c,
        } => {
            let mut client = AuditServiceClient::new(connect(&c, "auditor").await?);
            let start_time = since.map(|secs| {
                let now = crate::model::Clock::now(&crate::model::SystemClock);
                let ms = i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX);
                crate::grpc::convert::timestamp_to_pb(Timestamp(now.0.saturating_sub(ms)))
            });
            let response = client
                .list_events(pb::ListEventsRequest {
                    start_time,
                    end_time: None,
                    key_id: key.unwrap_or_default(),
                    principal: principal.unwrap_or_default(),
                    operation: operation.unwrap_or_default(),
                    outcome: outcome.map_or(0, |o| {
                        (match o {
                            OutcomeArg::Allowed => pb::AuditOutcome::Allowed,
                            OutcomeArg::Refused => pb::AuditOutcome::Refused,
                            OutcomeArg::Failed => pb::AuditOutcome::Failed,
                        }) as i32
                    }),
                    page_size: limit,
                    page_token: page_token.unwrap_or_default(),
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            print_events(&response, c.json)
        }
        AuditCommand::Tail {
            after_seq,
            connect: c,
        } => {
            let mut client = AuditServiceClient::new(connect(&c, "auditor").await?);
            let mut stream = client
                .tail_events(pb::TailEventsRequest { after_seq })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let stdout = std::io::stdout();
            while let Some(event) = stream.message().await.map_err(rpc_error)? {
                let mut out = stdout.lock();
                writeln!(out, "{}", event.json)?;
                out.flush()?;
            }
            Ok(())
        }
        AuditCommand::Checkpoint { connect: c } => {
            let mut client = AuditServiceClient::new(connect(&c, "auditor").await?);
            let r = client
                .get_checkpoint(pb::GetCheckpointRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner();
            match (&r.checkpoint, c.json) {
                (Some(cp), true) => print_json_line(&cp.json)?,
                (None, true) => print_json_line("null")?,
                (Some(cp), false) => println!(
                    "checkpoint at seq {} (head {}), signed {}",
                    cp.seq,
                    cp.head_hash,
                    cp.time
                        .as_ref()
                        .map(|t| Timestamp(t.seconds.saturating_mul(1000)).to_rfc3339())
                        .unwrap_or_default()
                ),
                (None, false) => println!("the audit log holds no record yet"),
            }
            Ok(())
        }
        AuditCommand::Verify {
            file,
            cluster,
            public_key,
            allow_anchored,
            max_unsigned,
            checkpoint,
            json,
        } => {
            let policy = Policy {
                allow_anchored,
                max_unsigned,
            };
            match (cluster, file) {
                (Some(dir), _) => verify_cluster_command(&dir, &public_key, policy, json),
                (None, Some(file)) => verify_command(&file, &public_key, policy, &checkpoint, json),
                (None, None) => bail!(CliError::local(
                    tonic::Code::InvalidArgument,
                    "give the log to verify, or --cluster DIR"
                )),
            }
        }
    }
}

/// Reads an Ed25519 public key (PEM).
fn read_public_key(path: &std::path::Path) -> anyhow::Result<[u8; 32]> {
    let pem =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    public_key_from_pem(&pem)
        .with_context(|| format!("{} is not an Ed25519 public key (PEM)", path.display()))
}

/// `coffre audit verify`.
fn verify_command(
    file: &std::path::Path,
    public_key: &std::path::Path,
    policy: Policy,
    checkpoint_files: &[std::path::PathBuf],
    json: bool,
) -> anyhow::Result<()> {
    let key = read_public_key(public_key)?;
    let fingerprint = key_fingerprint(&key);
    let mut known = Vec::with_capacity(checkpoint_files.len());
    for path in checkpoint_files {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let cp = Checkpoint::from_line(&text)
            .map_err(|e| anyhow::anyhow!("{} is not a checkpoint: {e}", path.display()))?;
        known.push(cp);
    }
    let total = std::fs::metadata(file)
        .with_context(|| format!("reading {}", file.display()))?
        .len();
    let reader =
        BufReader::new(File::open(file).with_context(|| format!("opening {}", file.display()))?);
    // Progress on a terminal, every 50,000 records.
    let tty = !json && std::io::stderr().is_terminal();
    let progress = |n: u64| {
        if tty && n % 50_000 == 0 {
            eprint!("\rverified {n} records of a {total}-byte log…");
        }
    };
    let outcome = verify_with_checkpoints(reader, &key, &known, progress);
    if tty {
        eprintln!();
    }
    let report = match outcome {
        Ok(report) => report,
        Err(e) => {
            if json {
                print_json(&json!({
                    "valid": false,
                    "line": e.line,
                    "seq": e.seq,
                    "failure": e.failure.to_string(),
                    "key_fingerprint": fingerprint,
                }))?;
            }
            let seq = e.seq.map(|s| format!(" (seq {s})")).unwrap_or_default();
            let place = if e.line == 0 {
                format!("a --checkpoint{seq}")
            } else {
                format!("line {}{seq}", e.line)
            };
            let failure = CliError::local(
                tonic::Code::DataLoss,
                format!(
                    "the audit log does not verify: {place}: {} (key fingerprint {fingerprint})",
                    e.failure
                ),
            );
            // Under --json the report above is the answer: no second object.
            return Err(if json { failure.answered() } else { failure }.into());
        }
    };
    let covered = report.last_checkpoint.as_ref().map_or(0, |c| c.seq);
    let anchor = report.anchor.as_ref().map(|a| (a.seq, a.time.to_rfc3339()));
    if let Err(failure) = policy.check(&report) {
        if json {
            print_json(&json!({
                "valid": false,
                "failure": failure.to_string(),
                "records": report.records,
                "first_seq": report.first_seq,
                "last_seq": report.last_seq,
                "anchor": anchor.as_ref().map(|(seq, time)| json!({"seq": seq, "time": time})),
                "key_fingerprint": fingerprint,
            }))?;
        }
        let failure = CliError::local(
            tonic::Code::FailedPrecondition,
            format!("the audit log is not accepted: {failure} (key fingerprint {fingerprint})"),
        );
        return Err(if json { failure.answered() } else { failure }.into());
    }
    if json {
        print_json(&json!({
            "valid": true,
            "records": report.records,
            "checkpoints": report.checkpoints,
            "first_seq": report.first_seq,
            "last_seq": report.last_seq,
            "head_hash": report.head_hash,
            "anchor": anchor.as_ref().map(|(seq, time)| json!({"seq": seq, "time": time})),
            "log_id": report.log_id,
            "v1_checkpoints": report.v1_checkpoints,
            "key_fingerprint": fingerprint,
            "last_checkpoint_seq": covered,
            "records_after_last_checkpoint": report.uncovered_records,
            "known_checkpoints": known.iter().map(|k| k.seq).collect::<Vec<_>>(),
        }))?;
        return Ok(());
    }
    println!(
        "OK: {} records (seq {} to {}), {} checkpoints; chain head at seq {} ({})",
        report.records,
        report.first_seq.unwrap_or(0),
        report.last_seq,
        report.checkpoints,
        report.last_seq,
        report.head_hash
    );
    if let Some((seq, time)) = &anchor {
        println!(
            "anchored: the log starts from the checkpoint at seq {seq}, signed {time}; the records before it are not in this file"
        );
    }
    match &report.log_id {
        Some(id) if report.v1_checkpoints > 0 => println!(
            "log id {id} ({} older checkpoints of format v1 carry no log identity)",
            report.v1_checkpoints
        ),
        Some(id) => println!("log id {id}"),
        None => println!(
            "no log id: its checkpoints are of format v1 (written before coffre named its logs)"
        ),
    }
    println!("audit public key fingerprint (SHA-256) {fingerprint}");
    println!(
        "the last signed checkpoint covers seq {covered}; {} later records are chained but not yet signed",
        report.uncovered_records
    );
    if !known.is_empty() {
        let seqs: Vec<String> = known.iter().map(|k| k.seq.to_string()).collect();
        println!("contains the given checkpoints at seq {}", seqs.join(", "));
    }
    Ok(())
}

/// `coffre audit verify --cluster DIR`.
fn verify_cluster_command(
    dir: &std::path::Path,
    public_key: &std::path::Path,
    policy: Policy,
    json: bool,
) -> anyhow::Result<()> {
    let key = read_public_key(public_key)?;
    let fingerprint = key_fingerprint(&key);
    let report = match verify_cluster(dir, &key, policy) {
        Ok(report) => report,
        Err(failure) => {
            if json {
                let (line, seq) = match &failure {
                    ClusterFailure::NodeLog { error, .. } => (Some(error.line), error.seq),
                    _ => (None, None),
                };
                print_json(&json!({
                    "valid": false,
                    "failure": failure.to_string(),
                    "node": failure.node(),
                    "digest": failure.digest(),
                    "line": line,
                    "seq": seq,
                    "key_fingerprint": fingerprint,
                }))?;
            }
            let code = match failure {
                ClusterFailure::Io { .. } | ClusterFailure::NoDigests => tonic::Code::NotFound,
                ClusterFailure::NodePolicy { .. } | ClusterFailure::DigestsAnchored { .. } => {
                    tonic::Code::FailedPrecondition
                }
                _ => tonic::Code::DataLoss,
            };
            let failure = CliError::local(
                code,
                format!(
                    "the cluster's audit export {} does not verify: {failure} (key fingerprint \
                     {fingerprint})",
                    dir.display()
                ),
            );
            return Err(if json { failure.answered() } else { failure }.into());
        }
    };
    let last = report.last_digest.as_ref();
    if json {
        let nodes: Vec<serde_json::Value> = report
            .nodes
            .iter()
            .map(|n| {
                json!({
                    "node": n.node,
                    "file": node_file_name(&n.node),
                    "log_id": n.report.log_id,
                    "records": n.report.records,
                    "checkpoints": n.report.checkpoints,
                    "first_seq": n.report.first_seq,
                    "last_seq": n.report.last_seq,
                    "head_hash": n.report.head_hash,
                    "anchor_seq": n.report.anchor.as_ref().map(|a| a.seq),
                    "digested_seq": n.digested_seq,
                    "records_after_last_digest": n.report.last_seq.saturating_sub(n.digested_seq.unwrap_or(0)),
                    "heads_checked": n.heads_checked,
                    "heads_before_anchor": n.heads_before_anchor,
                    "records_after_last_checkpoint": n.report.uncovered_records,
                })
            })
            .collect();
        print_json(&json!({
            "valid": true,
            "digests": report.digests,
            "first_digest": report.first_digest,
            "last_digest": last.map(|d| d.n),
            "last_digest_time": last.map(|d| d.time.to_rfc3339()),
            "key_generation": last.map(|d| d.key_generation),
            "nodes": nodes,
            "key_fingerprint": fingerprint,
        }))?;
        return Ok(());
    }
    println!(
        "OK: {} digests (n {} to {}), {} node logs",
        report.digests,
        report.first_digest.unwrap_or(0),
        last.map_or(0, |d| d.n),
        report.nodes.len()
    );
    if let Some(d) = last {
        println!(
            "last digest signed {}, key generation {}",
            d.time.to_rfc3339(),
            d.key_generation
        );
    }
    for n in &report.nodes {
        match n.digested_seq {
            Some(seq) => println!(
                "node {}: {} records (seq {} to {}), log {}; digested up to seq {seq}, {} records after it",
                n.node,
                n.report.records,
                n.report.first_seq.unwrap_or(0),
                n.report.last_seq,
                n.report.log_id.as_deref().unwrap_or("-"),
                n.report.last_seq.saturating_sub(seq),
            ),
            None => println!(
                "node {}: {} records (seq {} to {}), log {}; in no digest yet (verified alone)",
                n.node,
                n.report.records,
                n.report.first_seq.unwrap_or(0),
                n.report.last_seq,
                n.report.log_id.as_deref().unwrap_or("-"),
            ),
        }
    }
    println!("audit public key fingerprint (SHA-256) {fingerprint}");
    println!(
        "not covered: each node's records after its last digested head, and digests removed \
         from the end of {DIGESTS_FILE}"
    );
    Ok(())
}

fn print_events(r: &pb::ListEventsResponse, json: bool) -> anyhow::Result<()> {
    if json {
        let events: Vec<serde_json::Value> = r
            .events
            .iter()
            .map(|e| serde_json::from_str(&e.json).unwrap_or(serde_json::Value::Null))
            .collect();
        print_json(&json!({
            "events": events,
            "next_page_token": r.next_page_token,
        }))?;
        return Ok(());
    }
    let rows: Vec<Vec<String>> = r
        .events
        .iter()
        .map(|e| {
            let time = e
                .time
                .as_ref()
                .map(|t| Timestamp(t.seconds.saturating_mul(1000)).to_rfc3339())
                .unwrap_or_default();
            let outcome = match pb::AuditOutcome::try_from(e.outcome) {
                Ok(pb::AuditOutcome::Allowed) => "allowed",
                Ok(pb::AuditOutcome::Refused) => "refused",
                Ok(pb::AuditOutcome::Failed) => "failed",
                _ => "?",
            };
            let key = match e.key_version {
                Some(v) => format!("{} v{v}", e.key_id),
                None => e.key_id.clone(),
            };
            vec![
                format!("{:>8}", e.seq),
                time,
                e.principal.clone(),
                e.operation.clone(),
                key,
                outcome.to_string(),
                e.status_code.clone(),
            ]
        })
        .collect();
    // Columns sized to their content; a principal or key name longer than
    // its limit is cut with `…` (`--json` has every field whole).
    let empty = if r.next_page_token.is_empty() {
        "no events match"
    } else {
        "no events match on this page"
    };
    super::output::table_limited(
        &[
            "     SEQ",
            "TIME",
            "PRINCIPAL",
            "OPERATION",
            "KEY",
            "OUTCOME",
            "STATUS",
        ],
        &rows,
        &[(2, 40), (3, 32), (4, 48)],
        empty,
    );
    if !r.next_page_token.is_empty() {
        println!("more: --page-token {}", r.next_page_token);
    }
    Ok(())
}

/// One node's log, fetched and verified ([`fetch_log`]).
struct Exported {
    report: crate::audit::VerifyReport,
    known: Option<Checkpoint>,
    bytes: u64,
    key: [u8; 32],
    public_key_pem: String,
}

/// `coffre audit export`: checkpoint, stream, verify, then rename into place.
async fn export(
    out: &std::path::Path,
    public_key_out: Option<&std::path::Path>,
    pinned: Option<&std::path::Path>,
    c: &super::ConnectArgs,
) -> anyhow::Result<()> {
    let pinned = pinned.map(read_public_key).transpose()?;
    let Exported {
        report,
        known,
        bytes,
        key,
        public_key_pem,
    } = fetch_log(out, pinned, c).await?;
    let fingerprint = key_fingerprint(&key);
    if let Some(path) = public_key_out {
        std::fs::write(path, &public_key_pem)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if c.json {
        print_json(&json!({
            "file": out.display().to_string(),
            "bytes": bytes,
            "records": report.records,
            "checkpoints": report.checkpoints,
            "last_seq": report.last_seq,
            "checkpoint_seq": known.as_ref().map(|k| k.seq),
            "first_seq": report.first_seq,
            "log_id": report.log_id,
            "key_fingerprint": fingerprint,
            "key_pinned": pinned.is_some(),
        }))?;
    } else {
        println!(
            "exported {} records and {} checkpoints ({bytes} bytes) to {}; verified up to the checkpoint at seq {}",
            report.records,
            report.checkpoints,
            out.display(),
            known.as_ref().map_or(0, |k| k.seq)
        );
        println!(
            "audit public key fingerprint (SHA-256) {fingerprint}{}",
            if pinned.is_some() {
                " (the key given with --public-key)"
            } else {
                " (as the server sent it: compare it with one obtained out of band, or pass --public-key)"
            }
        );
    }
    Ok(())
}

/// Every digest in the database of the node configuration `config`.
async fn fetch_digests(config: &std::path::Path) -> anyhow::Result<Vec<crate::audit::Digest>> {
    use crate::cluster::Coordination;
    let connector = std::sync::Arc::new(super::store::connector(config)?);
    let db = crate::cluster::postgres::PgCoordination::new(
        connector,
        "audit-export",
        uuid::Uuid::new_v4(),
    );
    let mut digests: Vec<crate::audit::Digest> = Vec::new();
    loop {
        let after = digests.last().map_or(0, |d| d.n);
        let page = db.digests_since(after, 1000).await.map_err(|e| {
            CliError::local(
                tonic::Code::Unavailable,
                format!("reading the audit digests: {e}"),
            )
        })?;
        if page.is_empty() {
            return Ok(digests);
        }
        digests.extend(page);
    }
}

/// How long `coffre audit export --cluster` waits for a cluster's first
/// digest when the database holds none yet.
const FIRST_DIGEST_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// `coffre audit export --cluster`: the digests first, then every node's
/// log (each export signs its node's head first, so every head a fetched
/// digest lists is in the file), then the whole export verified.
async fn export_cluster(
    dir: &std::path::Path,
    cluster_file: Option<&std::path::Path>,
    config: Option<&std::path::Path>,
    public_key_out: Option<&std::path::Path>,
    pinned: Option<&std::path::Path>,
    c: &super::ConnectArgs,
) -> anyhow::Result<()> {
    let invalid = |m: String| CliError::local(tonic::Code::InvalidArgument, m);
    let Some(config) = config else {
        bail!(invalid(
            "--cluster needs --config FILE: a node's configuration, whose database holds the \
             digests"
                .into()
        ));
    };
    // (expected node id, endpoint)
    let nodes: Vec<(Option<String>, String)> = match cluster_file {
        Some(file) => super::cluster::cluster_file_nodes(file)?
            .into_iter()
            .map(|(id, e)| (Some(id), e))
            .collect(),
        None => c.endpoints.iter().map(|e| (None, e.clone())).collect(),
    };
    // A cluster that has just started has no digest yet: the first comes
    // within a digest interval of the nodes' first checkpoints. Wait a
    // little for it rather than fail a first export.
    let started = std::time::Instant::now();
    let mut digests = fetch_digests(config).await?;
    while digests.is_empty() && started.elapsed() < FIRST_DIGEST_WAIT {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        digests = fetch_digests(config).await?;
    }
    if digests.is_empty() {
        bail!(CliError::local(
            tonic::Code::FailedPrecondition,
            "the database holds no cluster digest yet: the node holding the audit-digest lease \
             signs one every [cluster] digest_interval_ms (60 s by default) once the nodes have \
             published their checkpoints, and none came in 15 s; export again after that"
        ));
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut text = String::new();
    for d in &digests {
        text.push_str(&d.to_line()?);
        text.push('\n');
    }
    let digests_path = dir.join(DIGESTS_FILE);
    std::fs::write(&digests_path, text)
        .with_context(|| format!("writing {}", digests_path.display()))?;
    let mut pinned = pinned.map(read_public_key).transpose()?;
    let mut public_key_pem = None;
    let mut exported = Vec::new();
    for (expected, endpoint) in &nodes {
        let tmp = dir.join("node.partial.jsonl");
        let got = fetch_log(&tmp, pinned, &c.at(endpoint)).await?;
        // Every node must present the same audit key: the first one's, if
        // none was given.
        pinned.get_or_insert(got.key);
        public_key_pem.get_or_insert(got.public_key_pem.clone());
        let Some(node) = got.report.node.clone() else {
            bail!(CliError::local(
                tonic::Code::FailedPrecondition,
                format!(
                    "the log of {endpoint} names no node (a single node's log): not a node of a \
                     cluster; kept in {}",
                    tmp.display()
                )
            ));
        };
        if let Some(expected) = expected
            && *expected != node
        {
            bail!(CliError::local(
                tonic::Code::FailedPrecondition,
                format!(
                    "{endpoint} serves node {node}'s log, but the cluster file says it is node \
                     {expected}'s"
                )
            ));
        }
        let path = dir.join(node_file_name(&node));
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        exported.push((node, got));
    }
    let key =
        pinned.context("no node to export: give --endpoint once per node, or --cluster-file")?;
    if let (Some(path), Some(pem)) = (public_key_out, &public_key_pem) {
        std::fs::write(path, pem).with_context(|| format!("writing {}", path.display()))?;
    }
    let fingerprint = key_fingerprint(&key);
    let report = verify_cluster(dir, &key, Policy::default()).map_err(|failure| {
        CliError::local(
            tonic::Code::DataLoss,
            format!(
                "the cluster export {} does not verify: {failure} (key fingerprint {fingerprint})",
                dir.display()
            ),
        )
    })?;
    if c.json {
        print_json(&json!({
            "dir": dir.display().to_string(),
            "digests": report.digests,
            "last_digest": report.last_digest.as_ref().map(|d| d.n),
            "nodes": exported.iter().map(|(node, e)| json!({
                "node": node,
                "file": node_file_name(node),
                "bytes": e.bytes,
                "records": e.report.records,
                "last_seq": e.report.last_seq,
                "log_id": e.report.log_id,
            })).collect::<Vec<_>>(),
            "key_fingerprint": fingerprint,
        }))?;
    } else {
        for (node, e) in &exported {
            println!(
                "node {node}: exported {} records ({} bytes) to {}",
                e.report.records,
                e.bytes,
                dir.join(node_file_name(node)).display()
            );
        }
        println!(
            "{} digests to {}; the export verifies as a whole",
            report.digests,
            digests_path.display()
        );
        println!("audit public key fingerprint (SHA-256) {fingerprint}");
    }
    Ok(())
}

/// Checkpoint, stream, verify, then rename into place at `out`.
async fn fetch_log(
    out: &std::path::Path,
    pinned: Option<[u8; 32]>,
    c: &super::ConnectArgs,
) -> anyhow::Result<Exported> {
    let mut client = AuditServiceClient::new(connect(c, "auditor").await?);
    let mut head = client
        .get_checkpoint(pb::GetCheckpointRequest {})
        .await
        .map_err(rpc_error)?
        .into_inner();
    if head.checkpoint.is_none() {
        // The log held no record yet; now it holds this request's: sign it,
        // so that the export carries a checkpoint (`audit verify` refuses a
        // log without one).
        head = client
            .get_checkpoint(pb::GetCheckpointRequest {})
            .await
            .map_err(rpc_error)?
            .into_inner();
    }
    let sent = public_key_from_pem(&head.public_key_pem)
        .context("the server's audit public key is not an Ed25519 key")?;
    let key = match pinned {
        Some(pinned) if pinned != sent => bail!(
            "the server presents the audit public key {}, not the one given with --public-key \
             ({}): nothing exported",
            key_fingerprint(&sent),
            key_fingerprint(&pinned)
        ),
        Some(pinned) => pinned,
        None => sent,
    };
    let known: Option<Checkpoint> = head
        .checkpoint
        .as_ref()
        .map(|cp| {
            Checkpoint::from_line(&cp.json)
                .map_err(|e| anyhow::anyhow!("the server sent a malformed checkpoint: {e}"))
        })
        .transpose()?;
    let mut stream = client
        .export_log(pb::ExportLogRequest {})
        .await
        .map_err(rpc_error)?
        .into_inner();
    let tmp = out.with_extension("partial");
    let mut file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let tty = !c.json && std::io::stderr().is_terminal();
    let mut bytes = 0u64;
    while let Some(chunk) = stream.message().await.map_err(rpc_error)? {
        file.write_all(&chunk.data)
            .with_context(|| format!("writing {}", tmp.display()))?;
        bytes += chunk.data.len() as u64;
        if tty {
            eprint!("\rexported {} KiB…", bytes / 1024);
        }
    }
    if tty {
        eprintln!();
    }
    file.sync_all()
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(file);
    // Check what was received against the checkpoint fetched first: the
    // export must reach it and verify under the server's key.
    let reader = BufReader::new(File::open(&tmp)?);
    let report = match &known {
        Some(cp) => verify_with_checkpoint(reader, &key, cp, |_| {}),
        None => verify(reader, &key, |_| {}),
    }
    .map_err(|e| {
        anyhow::anyhow!(
            "the exported log does not verify (line {}): {}; kept in {}",
            e.line,
            e.failure,
            tmp.display()
        )
    })?;
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    Ok(Exported {
        report,
        known,
        bytes,
        key,
        public_key_pem: head.public_key_pem,
    })
}
