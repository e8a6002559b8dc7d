//! `coffre bench`: a load generator against a running server, over the same
//! mTLS gRPC as any client.
//!
//! Each operation runs in turn for a warm-up then a fixed duration, with
//! `--concurrency` requests in flight spread over `--connections` HTTP/2
//! connections; latencies go into an HDR histogram. `null` is a
//! `grpc.health.v1.Health/Check` on the same channels: the floor a data-key
//! RPC is compared with, measured in the same run. With `--rate`, requests
//! start on a fixed schedule (open loop); a request that could not start on
//! time because the previous one was still waiting has its latency counted
//! from when it was due, so a stalled server cannot hide its queue.
//!
//! The `xks-…` operations go to the AWS XKS front (`--xks-file`, by default
//! `DATA_DIR/xks.json`), over HTTPS and HTTP/2 with SigV4 as AWS KMS sends
//! them, on `--connections` connections of their own; `xks-ping` (the
//! unauthenticated liveness path) is their floor, as `null` is gRPC's. The
//! keys the bench creates then also grant the front's principal `Encrypt`
//! and `Decrypt`.
//!
//! The write operations (`create-key`, `rotate-key`, `disable-key`) go as
//! the operator and measure what an operator's change costs: a durable
//! store write (on PostgreSQL, a committed transaction) and, for creation
//! and rotation, an HSM call. They are never sent twice: a retried write
//! could make a second key or a second version.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;

use super::ConnectArgs;
use super::client::{connect, rpc_error};
use crate::grpc::pb::{
    self, data_key_service_client::DataKeyServiceClient, key_service_client::KeyServiceClient,
};
use crate::xks::client::{Target, XksClient};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Operations to measure, one after the other, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "null,generate,decrypt"
    )]
    pub ops: Vec<BenchOp>,
    /// How long each operation is measured (e.g. 10s, 500ms, 2m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Measure every operation this many times, in turn, and report the
    /// median throughput (and the median of the per-round ratios to null).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,
    /// Load before each measurement, not measured.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// HTTP/2 connections to open.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub connections: u16,
    /// Requests in flight at once (over all connections).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub concurrency: u16,
    /// Start requests at this total rate (per second) instead of as fast as
    /// the server answers; latencies then count from when a request was due.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Items per request of the batch operations (1 to 1000).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub batch_size: u32,
    /// Use this key (id or alias) instead of creating keys as the operator.
    #[arg(long, conflicts_with_all = ["keys", "existing_keys"])]
    pub key: Option<String>,
    /// Use the first N enabled keys the server lists (as the operator)
    /// instead of creating keys: keys are listed in the order of their
    /// random ids, so this is a uniform sample of a large store (see
    /// `coffre dev --preload-keys`).
    #[arg(long, value_name = "N", conflicts_with = "keys", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub existing_keys: Option<u32>,
    /// Create this many keys (as the operator) and spread the load over them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub keys: u32,
    /// The protection level of the keys the bench creates: `hsm` measures
    /// data keys sealed and opened inside the HSM.
    #[arg(long, value_enum, default_value_t = super::ProtectionArg::Software, conflicts_with_all = ["key", "existing_keys"])]
    pub protection_level: super::ProtectionArg,
    /// Wrapped data keys made before the run, for decrypt and re-encrypt
    /// (at least one per key); requests pick among them at random.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub blobs: u32,
    /// At the end, schedule the deletion (7 days, the shortest wait) of the
    /// keys this run created; without it they stay, under the aliases
    /// `bench/RUN/N` it names.
    #[arg(long, conflicts_with_all = ["key", "existing_keys"])]
    pub cleanup: bool,
    /// The XKS front for the xks-… operations, as `coffre dev --xks-listen`
    /// describes it (default DATA_DIR/xks.json).
    #[arg(long, value_name = "FILE")]
    pub xks_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchOp {
    /// grpc.health.v1.Health/Check: the round trip alone.
    Null,
    Generate,
    Encrypt,
    Decrypt,
    Reencrypt,
    /// BatchGenerateDataKey of --batch-size keys.
    BatchGenerate,
    /// BatchDecrypt of --batch-size blobs.
    BatchDecrypt,
    /// CreateKey (software, no alias, label created-by=coffre-bench), as the
    /// operator: the keys stay.
    CreateKey,
    /// RotateKey of the bench keys (each worker its own key where there are
    /// enough), as the operator: every request adds a version.
    RotateKey,
    /// DisableKey, as the operator: each worker disables a key of its own
    /// (--keys at least --concurrency), then enables it again untimed;
    /// ops/s counts the disables.
    DisableKey,
    /// GET /ping on the XKS front: the HTTPS round trip alone.
    XksPing,
    /// XKS encrypt of 32 bytes with 64 bytes of AAD (SigV4, JSON).
    XksEncrypt,
    /// XKS decrypt of what xks-encrypt made before the run.
    XksDecrypt,
}

impl BenchOp {
    fn name(self) -> &'static str {
        match self {
            BenchOp::Null => "null",
            BenchOp::Generate => "generate",
            BenchOp::Encrypt => "encrypt",
            BenchOp::Decrypt => "decrypt",
            BenchOp::Reencrypt => "reencrypt",
            BenchOp::BatchGenerate => "batch-generate",
            BenchOp::BatchDecrypt => "batch-decrypt",
            BenchOp::CreateKey => "create-key",
            BenchOp::RotateKey => "rotate-key",
            BenchOp::DisableKey => "disable-key",
            BenchOp::XksPing => "xks-ping",
            BenchOp::XksEncrypt => "xks-encrypt",
            BenchOp::XksDecrypt => "xks-decrypt",
        }
    }

    /// A key change, sent as the operator and never retried.
    fn is_write(self) -> bool {
        matches!(
            self,
            BenchOp::CreateKey | BenchOp::RotateKey | BenchOp::DisableKey
        )
    }

    /// Whether it works on the bench keys (created, named or listed).
    fn needs_keys(self) -> bool {
        !matches!(self, BenchOp::Null | BenchOp::CreateKey | BenchOp::XksPing)
    }

    /// Sent to the XKS front rather than over gRPC.
    fn is_xks(self) -> bool {
        matches!(
            self,
            BenchOp::XksPing | BenchOp::XksEncrypt | BenchOp::XksDecrypt
        )
    }

    fn needs_blobs(self) -> bool {
        matches!(
            self,
            BenchOp::Decrypt | BenchOp::Reencrypt | BenchOp::BatchDecrypt
        )
    }
}

/// `10s`, `500ms`, `2m`, or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("expected a duration such as 10s or 500ms, got {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        _ => Err(format!("unknown unit {unit:?} in {s:?} (use ms, s or m)")),
    }
}

/// The context every bench data key is made and opened with.
fn bench_context() -> std::collections::BTreeMap<String, String> {
    [("purpose".to_string(), "coffre-bench".to_string())].into()
}

const REASON: pb::AccessReason = pb::AccessReason::CustomerInitiatedAccess;

/// What the workers share: the keys and the wrapped data keys to open.
#[derive(Debug)]
struct Workload {
    keys: Vec<String>,
    blobs: Vec<Vec<u8>>,
    /// For xks-decrypt: (key id, the fields of an XKS encrypt answer).
    xks_ciphertexts: Vec<(String, serde_json::Value)>,
    batch_size: u32,
    /// Keys made by `create-key` (warm-up included), for the note at the end.
    created: std::sync::atomic::AtomicU64,
}

/// The measurement of one operation.
#[derive(Debug)]
struct Measured {
    op: BenchOp,
    requests: u64,
    errors: u64,
    /// Requests sent again after a connection-level failure (the server
    /// closed the connection, at `MAX_CONNECTION_AGE` for instance), as any
    /// client should; the retry's time is in the request's latency.
    retries: u64,
    items_per_request: u64,
    elapsed: Duration,
    latency_us: Histogram<u64>,
    first_error: Option<String>,
}

impl Measured {
    fn ops_per_sec(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn ms(&self, q: f64) -> f64 {
        self.latency_us.value_at_quantile(q) as f64 / 1000.0
    }
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(rate) = args.rate {
        if !(rate.is_finite() && rate > 0.0) {
            bail!("--rate must be a positive number of requests per second");
        }
    }
    let mut channels = Vec::with_capacity(usize::from(args.connections));
    for _ in 0..args.connections {
        channels.push(connect(&args.connect, "service").await?);
    }
    // The write operations go as the operator, on connections of their own.
    let mut operator_channels = Vec::new();
    if args.ops.iter().any(|op| op.is_write()) {
        for _ in 0..args.connections {
            operator_channels.push(operator_channel(&args).await?);
        }
    }
    // The XKS operations go to the front, on connections of their own.
    let mut xks = None;
    if args.ops.iter().any(|op| op.is_xks()) {
        let path = args
            .xks_file
            .clone()
            .unwrap_or_else(|| args.connect.data_dir.join(crate::server::dev_xks::XKS_JSON));
        let target = Target::from_xks_json(&path)?;
        let mut clients = Vec::with_capacity(usize::from(args.connections));
        for _ in 0..args.connections {
            clients.push(XksClient::connect(&target).await?);
        }
        xks = Some((target, clients));
    }
    let needs_keys = args.ops.iter().any(|op| op.needs_keys());
    let audit = AuditWatch::start(&args).await;
    let workload = Arc::new(if needs_keys {
        prepare(&args, channels.first().cloned(), xks.as_ref()).await?
    } else {
        Workload {
            keys: Vec::new(),
            blobs: Vec::new(),
            xks_ciphertexts: Vec::new(),
            batch_size: args.batch_size,
            created: 0.into(),
        }
    });
    if args.ops.contains(&BenchOp::DisableKey)
        && workload.keys.len() < usize::from(args.concurrency)
    {
        bail!(
            "disable-key toggles one key per request in flight, so that every DisableKey is a \
             change: give --keys (or --existing-keys) at least --concurrency ({}), not {}",
            args.concurrency,
            workload.keys.len()
        );
    }
    // Each operation once per round, in the order given; on a noisy
    // machine, the medians over rounds (and the ratios to `null` taken
    // within each round) are what to quote.
    let mut ops: Vec<BenchOp> = Vec::new();
    for op in &args.ops {
        if !ops.contains(op) {
            ops.push(*op);
        }
    }
    let mut summaries: Vec<Summary> = Vec::new();
    for round in 1..=args.rounds {
        for (i, op) in ops.iter().enumerate() {
            let xks_clients = xks.as_ref().map_or(&[][..], |(_, c)| c.as_slice());
            let measured = measure(
                *op,
                &args,
                &channels,
                &operator_channels,
                xks_clients,
                &workload,
            )
            .await?;
            if args.rounds > 1 {
                eprintln!(
                    "round {round}/{}: {:<15} {:>10.0} ops/s",
                    args.rounds,
                    op.name(),
                    measured.ops_per_sec()
                );
            }
            match summaries.get_mut(i) {
                Some(s) => s.add(measured)?,
                None => summaries.push(Summary::new(measured)),
            }
        }
    }
    // Each front against its own floor: gRPC against null, XKS against
    // xks-ping.
    let rates_of = |floor: BenchOp| {
        summaries
            .iter()
            .find(|s| s.total.op == floor)
            .map(|s| s.rates.clone())
    };
    let (null_rates, ping_rates) = (rates_of(BenchOp::Null), rates_of(BenchOp::XksPing));
    if !args.connect.json {
        print_header();
    }
    for s in &summaries {
        if s.total.retries > 0 {
            eprintln!(
                "{}: {} requests sent again after their connection closed",
                s.total.op.name(),
                s.total.retries
            );
        }
        if let Some(e) = &s.total.first_error {
            eprintln!(
                "{}: {} errors; the first: {e}",
                s.total.op.name(),
                s.total.errors
            );
        }
        let floor = if s.total.op.is_xks() {
            &ping_rates
        } else {
            &null_rates
        };
        let vs_null = floor
            .as_ref()
            .filter(|_| !matches!(s.total.op, BenchOp::Null | BenchOp::XksPing))
            .map(|null| {
                median(
                    s.rates
                        .iter()
                        .zip(null)
                        .map(|(r, n)| r / n.max(1e-9))
                        .collect(),
                )
            });
        if args.connect.json {
            println!("{}", json_line(s, vs_null, &args));
        } else {
            print_row(s, vs_null);
        }
    }
    audit.finish(&args).await;
    let made = workload.created.load(std::sync::atomic::Ordering::Relaxed);
    if made > 0 {
        eprintln!(
            "keys: create-key made {made} keys (warm-up included; no alias, label \
             created-by=coffre-bench); they stay: --cleanup does not remove them, \
             `coffre key list` finds them"
        );
    }
    if args.key.is_none() && args.existing_keys.is_none() && !workload.keys.is_empty() {
        created_keys_note(&args, &workload.keys).await?;
    }
    Ok(())
}

/// Bench keys are `bench/RUN/N`: `RUN` is the start time (Unix seconds)
/// and the process id, so that runs never collide and an operator finds
/// them all with `--alias-prefix bench/`.
fn run_id() -> &'static str {
    static RUN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    RUN.get_or_init(|| {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        format!("{secs}-{}", std::process::id())
    })
}

/// After the run: where the keys it created are, and (with `--cleanup`)
/// their deletion scheduled.
async fn created_keys_note(args: &BenchArgs, keys: &[String]) -> anyhow::Result<()> {
    let run = format!("bench/{}", run_id());
    if !args.cleanup {
        let which = match keys.len() {
            1 => format!("1 key, alias {run}/1"),
            n => format!("{n} keys, aliases {run}/1 to {run}/{n}"),
        };
        eprintln!(
            "keys: this run created {which} (label created-by=coffre-bench); list them with \
             `coffre key list --alias-prefix {run}/` (every run's: bench/) and remove them with \
             `coffre key schedule-deletion KEY --days 7`, or pass --cleanup next time"
        );
        return Ok(());
    }
    let mut client = KeyServiceClient::new(operator_channel(args).await?);
    let (mut scheduled, mut pending) = (0usize, 0usize);
    for key in keys {
        let resp = client
            .schedule_key_deletion(pb::ScheduleKeyDeletionRequest {
                key_id: key.clone(),
                pending_window_days: 7,
            })
            .await
            .map_err(rpc_error)
            .with_context(|| format!("--cleanup: scheduling the deletion of {key}"))?
            .into_inner();
        if resp.pending_approval_id.is_empty() {
            scheduled += 1;
        } else {
            pending += 1;
        }
    }
    eprintln!(
        "keys: the deletion of the {scheduled} keys this run created ({run}/…) is scheduled in 7 days{}",
        if pending > 0 {
            format!("; {pending} more wait for approvals (`coffre approval list`)")
        } else {
            String::new()
        }
    );
    Ok(())
}

/// What `coffre bench` says about the audit records it causes: every
/// data-key request is one record in the server's audit log. The log is
/// found on this machine as `coffre dev` keeps it (`DIR/audit.log` of
/// `--data-dir`); the record count comes from signed checkpoints fetched
/// as the auditor (when this client has the auditor's certificate).
#[derive(Debug)]
struct AuditWatch {
    log: Option<std::path::PathBuf>,
    bytes_before: Option<u64>,
    seq_before: Option<u64>,
}

/// A guess of the bytes per record when the log gives none.
const RECORD_BYTES_GUESS: u64 = 500;
/// The rate an estimate assumes without `--rate`: a laptop's order of
/// magnitude for the data-key operations (BENCHMARKS.md).
const RATE_GUESS: f64 = 20_000.0;

impl AuditWatch {
    async fn start(args: &BenchArgs) -> Self {
        let log = crate::server::DataDir::new(&args.connect.data_dir).audit_log();
        let bytes_before = std::fs::metadata(&log).ok().map(|m| m.len());
        let seq_before = audit_seq(args).await;
        let watch = Self {
            log: bytes_before.is_some().then_some(log),
            bytes_before,
            seq_before,
        };
        watch.announce(args);
        watch
    }

    fn announce(&self, args: &BenchArgs) {
        let mut audited: Vec<BenchOp> = Vec::new();
        for op in &args.ops {
            if *op != BenchOp::Null && !audited.contains(op) {
                audited.push(*op);
            }
        }
        let audited_ops = u32::try_from(audited.len()).unwrap_or(u32::MAX);
        let seconds = (args.warmup + args.duration).as_secs_f64()
            * f64::from(audited_ops)
            * f64::from(args.rounds);
        let place = match (&self.log, self.bytes_before) {
            (Some(log), Some(bytes)) => {
                format!("{} (now {})", log.display(), human_bytes(bytes))
            }
            _ => "the server's audit log (not on this machine: it is where the server keeps it)"
                .to_string(),
        };
        eprintln!("audit: every data-key request of this run is one audit record in {place}");
        if seconds <= 0.0 {
            return;
        }
        let per_record = match (self.bytes_before, self.seq_before) {
            (Some(bytes), Some(seq)) if seq > 0 => (bytes / seq).max(1),
            _ => RECORD_BYTES_GUESS,
        };
        let (rate, up_to) = args.rate.map_or((RATE_GUESS, "up to "), |r| (r, ""));
        let records = rate * seconds;
        let bytes = records * per_record as f64;
        eprintln!(
            "audit: the run loads the server for about {seconds:.0} s; at {up_to}{rate:.0} requests/s and \
             {per_record} bytes a record, that is about {records:.0} records, {}{}",
            human_bytes(bytes as u64),
            if bytes > 1e9 {
                " — use a throwaway --data-dir, or `coffre dev --audit-durability off` to measure \
                 without the log"
            } else {
                ""
            }
        );
    }

    async fn finish(&self, args: &BenchArgs) {
        let bytes = match (&self.log, self.bytes_before) {
            (Some(log), Some(before)) => std::fs::metadata(log)
                .ok()
                .map(|m| (log, m.len().saturating_sub(before))),
            _ => None,
        };
        let records = match (self.seq_before, audit_seq(args).await) {
            (Some(before), Some(after)) => Some(after.saturating_sub(before)),
            _ => None,
        };
        match (records, bytes) {
            (Some(n), Some((log, b))) => eprintln!(
                "audit: this run wrote {n} audit records ({}) to {}",
                human_bytes(b),
                log.display()
            ),
            (None, Some((log, b))) => {
                eprintln!(
                    "audit: this run wrote {} to {}",
                    human_bytes(b),
                    log.display()
                )
            }
            (Some(n), None) => {
                eprintln!("audit: this run wrote {n} audit records to the server's log")
            }
            (None, None) => eprintln!(
                "audit: the records of this run are in the server's audit log (`coffre audit events` \
                 as the auditor counts them)"
            ),
        }
    }
}

/// The sequence number of a fresh signed checkpoint (records so far), as
/// the auditor; `None` without the auditor's certificate or access.
async fn audit_seq(args: &BenchArgs) -> Option<u64> {
    use crate::grpc::pb::audit_service_client::AuditServiceClient;
    let mut auditor = args.connect.clone();
    if auditor.cert.is_some() {
        return None;
    }
    auditor.identity = Some("auditor".into());
    let channel = connect(&auditor, "auditor").await.ok()?;
    let resp = AuditServiceClient::new(channel)
        .get_checkpoint(pb::GetCheckpointRequest {})
        .await
        .ok()?
        .into_inner();
    Some(resp.checkpoint.map_or(0, |c| c.seq))
}

/// `1.5 GB`, `312 kB`, `80 B` (powers of 1000).
fn human_bytes(n: u64) -> String {
    let n = n as f64;
    match n {
        _ if n >= 1e9 => format!("{:.1} GB", n / 1e9),
        _ if n >= 1e6 => format!("{:.1} MB", n / 1e6),
        _ if n >= 1e3 => format!("{:.0} kB", n / 1e3),
        _ => format!("{n:.0} B"),
    }
}

/// One operation over every round: merged histogram, summed counts, and
/// the throughput of each round.
#[derive(Debug)]
struct Summary {
    /// Counts, errors and the histogram summed over the rounds.
    total: Measured,
    rates: Vec<f64>,
}

impl Summary {
    fn new(m: Measured) -> Self {
        Self {
            rates: vec![m.ops_per_sec()],
            total: m,
        }
    }

    fn add(&mut self, m: Measured) -> anyhow::Result<()> {
        self.rates.push(m.ops_per_sec());
        self.total.requests += m.requests;
        self.total.errors += m.errors;
        self.total.retries += m.retries;
        self.total.elapsed += m.elapsed;
        self.total
            .latency_us
            .add(&m.latency_us)
            .context("merging histograms")?;
        if self.total.first_error.is_none() {
            self.total.first_error = m.first_error;
        }
        Ok(())
    }

    fn ops_per_sec(&self) -> f64 {
        median(self.rates.clone())
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v.get(n / 2).copied().unwrap_or(0.0),
        n => {
            (v.get(n / 2 - 1).copied().unwrap_or(0.0) + v.get(n / 2).copied().unwrap_or(0.0)) / 2.0
        }
    }
}

/// Creates the keys (unless one was named) and the wrapped data keys the
/// decrypting operations open, showing progress.
async fn prepare(
    args: &BenchArgs,
    service: Option<Channel>,
    xks: Option<&(Target, Vec<XksClient>)>,
) -> anyhow::Result<Workload> {
    // The keys the bench makes grant the front's principal what the XKS
    // operations need; named or listed keys must grant it already.
    let xks_principal = match xks {
        Some((target, _)) => Some(target.principal.clone().context(
            "the --xks-file names no principal: give --key with a key whose policy grants \
             the front's principal Encrypt and Decrypt",
        )?),
        None => None,
    };
    let keys = match (&args.key, args.existing_keys) {
        (Some(k), _) => vec![k.clone()],
        (None, Some(n)) => list_keys(args, n as usize).await?,
        (None, None) => create_keys(args, xks_principal.as_deref()).await?,
    };
    let xks_ciphertexts = match xks {
        Some((_, clients)) if args.ops.contains(&BenchOp::XksDecrypt) => {
            xks_ciphertexts(args, &keys, clients).await?
        }
        _ => Vec::new(),
    };
    let mut blobs = Vec::new();
    if args.ops.iter().any(|op| op.needs_blobs()) {
        let channel = service.context("no connection")?;
        let mut data = DataKeyServiceClient::new(channel);
        let per_key = (args.blobs as usize).div_ceil(keys.len()).max(1);
        let total = per_key * keys.len();
        blobs.reserve(total);
        let mut last_shown = Instant::now();
        for key in &keys {
            let mut left = per_key;
            while left > 0 {
                let count = left.min(1000);
                let response = data
                    .batch_generate_data_key(pb::BatchGenerateDataKeyRequest {
                        key_id: key.clone(),
                        encryption_context: bench_context(),
                        justification: REASON as i32,
                        number_of_bytes: 32,
                        count: u32::try_from(count).unwrap_or(1000),
                        without_plaintext: true,
                    })
                    .await
                    .map_err(rpc_error)
                    .context("making the data keys to decrypt")?
                    .into_inner();
                blobs.extend(response.data_keys.into_iter().map(|k| k.ciphertext_blob));
                left -= count;
            }
            if last_shown.elapsed() > Duration::from_secs(2) {
                eprintln!("made {} of {total} wrapped data keys", blobs.len());
                last_shown = Instant::now();
            }
        }
    }
    Ok(Workload {
        keys,
        blobs,
        xks_ciphertexts,
        batch_size: args.batch_size,
        created: 0.into(),
    })
}

/// A channel as the operator (unless a certificate was named).
async fn operator_channel(args: &BenchArgs) -> anyhow::Result<Channel> {
    let mut operator_args = args.connect.clone();
    if operator_args.cert.is_none() {
        operator_args.identity = Some("operator".into());
    }
    connect(&operator_args, "operator")
        .await
        .context("creating or listing the bench keys needs the operator identity (or pass --key)")
}

/// The first `n` enabled keys in the server's listing order.
async fn list_keys(args: &BenchArgs, n: usize) -> anyhow::Result<Vec<String>> {
    let mut client = KeyServiceClient::new(operator_channel(args).await?);
    let mut keys = Vec::with_capacity(n);
    let mut page_token = String::new();
    while keys.len() < n {
        let page = client
            .list_keys(pb::ListKeysRequest {
                page_size: 1000,
                page_token,
                state: pb::KeyState::Enabled as i32,
                alias_prefix: String::new(),
            })
            .await
            .map_err(rpc_error)
            .context("listing the bench keys")?
            .into_inner();
        keys.extend(page.keys.into_iter().map(|k| k.key_id).take(n - keys.len()));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    if keys.len() < n {
        bail!("the server lists {} enabled keys, not {n}", keys.len());
    }
    Ok(keys)
}

/// What xks-decrypt opens: `--blobs` XKS encrypt answers, spread over the
/// keys, made 16 at a time.
async fn xks_ciphertexts(
    args: &BenchArgs,
    keys: &[String],
    clients: &[XksClient],
) -> anyhow::Result<Vec<(String, serde_json::Value)>> {
    let per_key = (args.blobs as usize).div_ceil(keys.len().max(1)).max(1);
    let total = per_key * keys.len();
    let mut out = Vec::with_capacity(total);
    let mut in_flight = tokio::task::JoinSet::new();
    let mut next = 0;
    let mut last_shown = Instant::now();
    while out.len() < total {
        while next < total && in_flight.len() < 16 {
            let key = keys.get(next / per_key).cloned().unwrap_or_default();
            let mut client = clients
                .get(next % clients.len().max(1))
                .cloned()
                .context("no XKS connection")?;
            in_flight.spawn(async move {
                let answer = client
                    .post(&format!("keys/{key}/encrypt"), &xks_encrypt_body(&key))
                    .await;
                (key, answer)
            });
            next += 1;
        }
        let Some(done) = in_flight.join_next().await else {
            break;
        };
        let (key, answer) = done.context("XKS encrypt task")?;
        let answer = answer.context("making the XKS ciphertexts to decrypt")?;
        if answer.status != 200 {
            bail!(
                "making the XKS ciphertexts to decrypt: {} {} (does the key's policy grant \
                 the front's principal Encrypt and Decrypt?)",
                answer.status,
                answer.body
            );
        }
        out.push((key, answer.body));
        if last_shown.elapsed() > Duration::from_secs(2) {
            eprintln!("made {} of {total} XKS ciphertexts", out.len());
            last_shown = Instant::now();
        }
    }
    Ok(out)
}

/// The AAD of every bench XKS request: 64 bytes, as AWS KMS's framing of
/// a short encryption context might be.
/// ("coffre-bench: sixty-four bytes of additional authenticated data.")
const XKS_AAD: &str =
    "Y29mZnJlLWJlbmNoOiBzaXh0eS1mb3VyIGJ5dGVzIG9mIGFkZGl0aW9uYWwgYXV0aGVudGljYXRlZCBkYXRhLg==";

fn xks_metadata(operation: &str, key: &str) -> serde_json::Value {
    crate::xks::client::request_metadata(
        operation,
        "arn:aws:iam::111122223333:role/coffre-bench",
        &format!("arn:aws:kms:eu-west-3:111122223333:key/{key}"),
    )
}

/// An XKS encrypt of 32 bytes (a data key's size) under `key`.
fn xks_encrypt_body(key: &str) -> serde_json::Value {
    serde_json::json!({
        "requestMetadata": xks_metadata("Encrypt", key),
        "plaintext": "WlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlo=",
        "encryptionAlgorithm": "AES_GCM",
        "additionalAuthenticatedData": XKS_AAD,
    })
}

/// An XKS decrypt of `encrypted` (an encrypt answer) under `key`.
fn xks_decrypt_body(key: &str, encrypted: &serde_json::Value) -> serde_json::Value {
    let mut body = serde_json::json!({
        "requestMetadata": xks_metadata("Decrypt", key),
        "encryptionAlgorithm": "AES_GCM",
        "additionalAuthenticatedData": XKS_AAD,
    });
    for field in [
        "ciphertext",
        "ciphertextMetadata",
        "initializationVector",
        "authenticationTag",
    ] {
        if let (Some(map), Some(v)) = (body.as_object_mut(), encrypted.get(field)) {
            map.insert(field.to_string(), v.clone());
        }
    }
    body
}

/// Adds a grant of `Encrypt` and `Decrypt` to the XKS front's principal to
/// `key`'s policy (kept as it was otherwise).
async fn grant_xks(
    client: &mut KeyServiceClient<Channel>,
    key: &str,
    principal: &str,
) -> Result<(), tonic::Status> {
    let mut policy = client
        .get_key(pb::GetKeyRequest {
            key_id: key.to_string(),
        })
        .await?
        .into_inner()
        .key
        .and_then(|k| k.policy)
        .unwrap_or_default();
    policy.grants.push(pb::Grant {
        principal: principal.to_string(),
        operations: vec![
            pb::DataKeyOperation::Encrypt as i32,
            pb::DataKeyOperation::Decrypt as i32,
        ],
    });
    let answer = client
        .update_key_policy(pb::UpdateKeyPolicyRequest {
            key_id: key.to_string(),
            policy: Some(policy),
        })
        .await?
        .into_inner();
    if !answer.pending_approval_id.is_empty() {
        return Err(tonic::Status::failed_precondition(format!(
            "UpdateKeyPolicy awaits approvals ({}): run the XKS bench without quorum",
            answer.pending_approval_id
        )));
    }
    Ok(())
}

async fn create_keys(args: &BenchArgs, xks_principal: Option<&str>) -> anyhow::Result<Vec<String>> {
    let channel = operator_channel(args).await?;
    let total = args.keys as usize;
    let mut keys = Vec::with_capacity(total);
    let mut in_flight = tokio::task::JoinSet::new();
    let protection_level = match args.protection_level {
        super::ProtectionArg::Software => pb::ProtectionLevel::Software,
        super::ProtectionArg::Hsm => pb::ProtectionLevel::Hsm,
    } as i32;
    let mut next = 0;
    let mut last_shown = Instant::now();
    let run = run_id();
    while keys.len() < total {
        while next < total && in_flight.len() < 16 {
            let mut client = KeyServiceClient::new(channel.clone());
            let alias = format!("bench/{run}/{}", next + 1);
            let description = format!("created by coffre bench (run {run})");
            let xks_principal = xks_principal.map(str::to_string);
            in_flight.spawn(async move {
                let created = client
                    .create_key(pb::CreateKeyRequest {
                        alias,
                        description,
                        protection_level,
                        labels: [("created-by".to_string(), "coffre-bench".to_string())].into(),
                        ..Default::default()
                    })
                    .await?;
                if let (Some(principal), Some(key)) = (&xks_principal, &created.get_ref().key) {
                    grant_xks(&mut client, &key.key_id, principal).await?;
                }
                Ok::<_, tonic::Status>(created)
            });
            next += 1;
        }
        let Some(done) = in_flight.join_next().await else {
            break;
        };
        let key = done
            .context("key creation task")?
            .map_err(rpc_error)
            .context("creating a bench key")?
            .into_inner()
            .key
            .context("CreateKey answered no key")?;
        keys.push(key.key_id);
        if total > 100 && last_shown.elapsed() > Duration::from_secs(2) {
            eprintln!("created {} of {total} keys", keys.len());
            last_shown = Instant::now();
        }
    }
    Ok(keys)
}

/// Runs `op` for the warm-up and the measured duration; merges the workers'
/// histograms.
async fn measure(
    op: BenchOp,
    args: &BenchArgs,
    channels: &[Channel],
    operator_channels: &[Channel],
    xks_clients: &[XksClient],
    workload: &Arc<Workload>,
) -> anyhow::Result<Measured> {
    if op == BenchOp::XksDecrypt && workload.xks_ciphertexts.is_empty() {
        bail!("{}: no XKS ciphertexts to open", op.name());
    }
    if op.needs_blobs() && workload.blobs.is_empty() {
        bail!("{}: no wrapped data keys to open", op.name());
    }
    let concurrency = usize::from(args.concurrency);
    let start = Instant::now();
    let measure_from = start + args.warmup;
    let end = measure_from + args.duration;
    // With --rate, each worker starts a request every `interval`, the
    // workers staggered evenly.
    let schedule = args.rate.map(|rate| {
        let interval = Duration::from_secs_f64(concurrency as f64 / rate);
        (interval, Duration::from_secs_f64(1.0 / rate))
    });
    let mut workers = tokio::task::JoinSet::new();
    for i in 0..concurrency {
        let pool = if op.is_write() {
            operator_channels
        } else {
            channels
        };
        let channel = pool
            .get(i % pool.len().max(1))
            .cloned()
            .context("no connection")?;
        let xks = xks_clients.get(i % xks_clients.len().max(1)).cloned();
        if op.is_xks() && xks.is_none() {
            bail!("{}: no connection to the XKS front", op.name());
        }
        let workload = Arc::clone(workload);
        let first_due = schedule.map(|(_, stagger)| start + stagger * (i as u32));
        let interval = schedule.map(|(interval, _)| interval);
        workers.spawn(worker(
            op,
            channel,
            xks,
            workload,
            i as u64,
            measure_from,
            end,
            first_due.zip(interval),
        ));
    }
    let mut merged = Measured {
        op,
        requests: 0,
        errors: 0,
        retries: 0,
        items_per_request: match op {
            BenchOp::BatchGenerate | BenchOp::BatchDecrypt => u64::from(args.batch_size),
            _ => 1,
        },
        elapsed: args.duration,
        latency_us: new_histogram()?,
        first_error: None,
    };
    while let Some(done) = workers.join_next().await {
        let w = done.context("bench worker")??;
        merged.requests += w.requests;
        merged.errors += w.errors;
        merged.retries += w.retries;
        merged
            .latency_us
            .add(&w.latency_us)
            .context("merging histograms")?;
        if merged.first_error.is_none() {
            merged.first_error = w.first_error;
        }
    }
    Ok(merged)
}

fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    // 1 µs to 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).context("histogram")
}

/// A small non-cryptographic generator to pick blobs (xorshift64*).
struct Pick(u64);

impl Pick {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let r = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (r % (n.max(1) as u64)) as usize
    }
}

#[allow(clippy::too_many_arguments)]
async fn worker(
    op: BenchOp,
    channel: Channel,
    xks: Option<XksClient>,
    workload: Arc<Workload>,
    seed: u64,
    measure_from: Instant,
    end: Instant,
    schedule: Option<(Instant, Duration)>,
) -> anyhow::Result<Measured> {
    let mut clients = RpcClients {
        health: HealthClient::new(channel.clone()),
        data: DataKeyServiceClient::new(channel.clone()),
        keys: KeyServiceClient::new(channel),
        xks,
        // Worker i's own key for rotate-key and disable-key.
        own_key: usize::try_from(seed).unwrap_or_default(),
    };
    let mut pick = Pick(0x9E37_79B9_7F4A_7C15 ^ (seed.wrapping_add(1) << 17));
    let mut out = Measured {
        op,
        requests: 0,
        errors: 0,
        retries: 0,
        items_per_request: 1,
        elapsed: Duration::ZERO,
        latency_us: new_histogram()?,
        first_error: None,
    };
    let mut due = schedule.map(|(first, _)| first);
    loop {
        let started = match (due, schedule) {
            (Some(at), Some((_, interval))) => {
                due = Some(at + interval);
                if Instant::now() < at {
                    // On time: the timer's lateness (it ticks in
                    // milliseconds) is the load generator's, not the
                    // server's; the latency counts from the actual start.
                    tokio::time::sleep_until(at.into()).await;
                    Instant::now().max(at)
                } else {
                    // Behind (the previous answer came late): count from
                    // when this request was due, so queueing shows.
                    at
                }
            }
            _ => Instant::now(),
        };
        if started >= end {
            break;
        }
        let mut result = call(op, &mut clients, &workload, &mut pick).await;
        let mut retried = 0;
        while !op.is_write() && retried < MAX_RETRIES && matches!(&result, Err(e) if e.retryable) {
            retried += 1;
            result = call(op, &mut clients, &workload, &mut pick).await;
        }
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        // Untimed: what puts the key back for the next request.
        if result.is_ok() {
            result = restore(op, &mut clients, &workload).await;
        }
        if started < measure_from {
            continue;
        }
        out.retries += retried;
        out.latency_us.saturating_record(micros.max(1));
        out.requests += 1;
        if let Err(e) = result {
            out.errors += 1;
            if out.first_error.is_none() {
                out.first_error = Some(e.message);
            }
        }
    }
    Ok(out)
}

/// Times a request is sent again after a connection-level failure.
const MAX_RETRIES: u64 = 2;

/// A failed request: what the server (or the transport) said, and whether
/// it failed at the connection level, before the server could act on it.
struct CallError {
    message: String,
    retryable: bool,
}

impl From<tonic::Status> for CallError {
    fn from(s: tonic::Status) -> Self {
        // A connection closed under the request (GOAWAY at the server's
        // maximum connection age, a reset): tonic reports UNAVAILABLE,
        // CANCELLED or UNKNOWN "transport error". Nothing else is retried.
        let retryable = match s.code() {
            tonic::Code::Unavailable | tonic::Code::Cancelled => true,
            tonic::Code::Unknown => s.message().contains("transport error"),
            _ => false,
        };
        CallError {
            message: format!("{:?}: {}", s.code(), s.message()),
            retryable,
        }
    }
}

/// A worker's clients, all on one connection (as the service, or as the
/// operator for the write operations).
struct RpcClients {
    health: HealthClient<Channel>,
    data: DataKeyServiceClient<Channel>,
    keys: KeyServiceClient<Channel>,
    xks: Option<XksClient>,
    own_key: usize,
}

/// The key worker `own` changes: its own where there are enough keys.
fn own_key(w: &Workload, own: usize) -> String {
    w.keys
        .get(own % w.keys.len().max(1))
        .cloned()
        .unwrap_or_default()
}

/// After a timed request of `op` that succeeded, untimed: disable-key
/// enables its key again.
async fn restore(op: BenchOp, c: &mut RpcClients, w: &Workload) -> Result<(), CallError> {
    if op != BenchOp::DisableKey {
        return Ok(());
    }
    c.keys
        .enable_key(pb::EnableKeyRequest {
            key_id: own_key(w, c.own_key),
        })
        .await
        .map_err(CallError::from)
        .and_then(|r| match r.into_inner().pending_approval_id.as_str() {
            "" => Ok(()),
            id => Err(CallError {
                message: format!("EnableKey awaits approvals ({id}): run the bench without quorum"),
                retryable: false,
            }),
        })
}

/// One request of `op`.
async fn call(
    op: BenchOp,
    c: &mut RpcClients,
    w: &Workload,
    pick: &mut Pick,
) -> Result<(), CallError> {
    let reason = REASON as i32;
    let rpc = CallError::from;
    let own = c.own_key;
    let RpcClients {
        health,
        data,
        keys,
        xks,
        ..
    } = c;
    match op {
        BenchOp::XksPing | BenchOp::XksEncrypt | BenchOp::XksDecrypt => {
            let xks = xks.as_mut().ok_or_else(|| CallError {
                message: "no XKS connection".to_string(),
                retryable: false,
            })?;
            xks_call(op, xks, w, pick).await
        }
        BenchOp::CreateKey => {
            keys.create_key(pb::CreateKeyRequest {
                description: format!("created by coffre bench (run {}, create-key)", run_id()),
                labels: [("created-by".to_string(), "coffre-bench".to_string())].into(),
                ..Default::default()
            })
            .await
            .map_err(rpc)?;
            w.created.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        }
        BenchOp::RotateKey => keys
            .rotate_key(pb::RotateKeyRequest {
                key_id: own_key(w, own),
            })
            .await
            .map(drop)
            .map_err(rpc),
        BenchOp::DisableKey => keys
            .disable_key(pb::DisableKeyRequest {
                key_id: own_key(w, own),
            })
            .await
            .map(drop)
            .map_err(rpc),
        BenchOp::Null => health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(drop)
            .map_err(rpc),
        BenchOp::Generate => data
            .generate_data_key(pb::GenerateDataKeyRequest {
                key_id: pick_key(w, pick),
                encryption_context: bench_context(),
                justification: reason,
                number_of_bytes: 32,
            })
            .await
            .map(drop)
            .map_err(rpc),
        BenchOp::Encrypt => data
            .encrypt(pb::EncryptRequest {
                key_id: pick_key(w, pick),
                plaintext: vec![0x5a; 32],
                encryption_context: bench_context(),
                justification: reason,
            })
            .await
            .map(drop)
            .map_err(rpc),
        BenchOp::Decrypt => {
            let blob = w.blobs.get(pick.below(w.blobs.len())).cloned();
            data.decrypt(pb::DecryptRequest {
                ciphertext_blob: blob.unwrap_or_default(),
                encryption_context: bench_context(),
                justification: reason,
                key_id: String::new(),
            })
            .await
            .map(drop)
            .map_err(rpc)
        }
        BenchOp::Reencrypt => {
            let blob = w.blobs.get(pick.below(w.blobs.len())).cloned();
            data.re_encrypt(pb::ReEncryptRequest {
                ciphertext_blob: blob.unwrap_or_default(),
                source_encryption_context: bench_context(),
                justification: reason,
                ..Default::default()
            })
            .await
            .map(drop)
            .map_err(rpc)
        }
        BenchOp::BatchGenerate => {
            let response = data
                .batch_generate_data_key(pb::BatchGenerateDataKeyRequest {
                    key_id: pick_key(w, pick),
                    encryption_context: bench_context(),
                    justification: reason,
                    number_of_bytes: 32,
                    count: w.batch_size,
                    without_plaintext: false,
                })
                .await
                .map_err(rpc)?
                .into_inner();
            match response.data_keys.iter().find_map(|k| k.error.as_ref()) {
                Some(e) => Err(CallError {
                    message: format!("item: {}", e.message),
                    retryable: false,
                }),
                None => Ok(()),
            }
        }
        BenchOp::BatchDecrypt => {
            let items = (0..w.batch_size)
                .map(|_| pb::BatchDecryptItem {
                    ciphertext_blob: w
                        .blobs
                        .get(pick.below(w.blobs.len()))
                        .cloned()
                        .unwrap_or_default(),
                    encryption_context: bench_context(),
                    key_id: String::new(),
                })
                .collect();
            let response = data
                .batch_decrypt(pb::BatchDecryptRequest {
                    items,
                    justification: reason,
                })
                .await
                .map_err(rpc)?
                .into_inner();
            match response.results.iter().find_map(|r| r.error.as_ref()) {
                Some(e) => Err(CallError {
                    message: format!("item: {}", e.message),
                    retryable: false,
                }),
                None => Ok(()),
            }
        }
    }
}

/// One request of an `xks-…` operation; anything but a 200 is an error.
async fn xks_call(
    op: BenchOp,
    xks: &mut XksClient,
    w: &Workload,
    pick: &mut Pick,
) -> Result<(), CallError> {
    let transport = |e: crate::xks::client::TransportError| CallError {
        message: e.to_string(),
        retryable: false,
    };
    let answer = match op {
        BenchOp::XksPing => {
            let status = xks.ping().await.map_err(transport)?;
            return match status {
                200 => Ok(()),
                other => Err(CallError {
                    message: format!("/ping answered {other}"),
                    retryable: false,
                }),
            };
        }
        BenchOp::XksEncrypt => {
            let key = pick_key(w, pick);
            xks.post(&format!("keys/{key}/encrypt"), &xks_encrypt_body(&key))
                .await
        }
        _ => {
            let (key, encrypted) = w
                .xks_ciphertexts
                .get(pick.below(w.xks_ciphertexts.len()))
                .ok_or_else(|| CallError {
                    message: "no XKS ciphertexts to decrypt".to_string(),
                    retryable: false,
                })?;
            xks.post(
                &format!("keys/{key}/decrypt"),
                &xks_decrypt_body(key, encrypted),
            )
            .await
        }
    }
    .map_err(transport)?;
    match answer.status {
        200 => Ok(()),
        status => Err(CallError {
            message: format!(
                "{status} {}: {}",
                answer.error_name().unwrap_or("?"),
                answer
                    .body
                    .get("errorMessage")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("")
            ),
            retryable: false,
        }),
    }
}

fn pick_key(w: &Workload, pick: &mut Pick) -> String {
    let i = if w.keys.len() <= 1 {
        0
    } else {
        pick.below(w.keys.len())
    };
    w.keys.get(i).cloned().unwrap_or_default()
}

fn print_header() {
    println!(
        "{:<15} {:>10} {:>12} {:>8} {:>8} {:>8} {:>9} {:>8} {:>7}",
        "op", "ops/s", "items/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "errors", "x null"
    );
}

fn print_row(s: &Summary, vs_null: Option<f64>) {
    let m = &s.total;
    let vs_null = vs_null.map_or_else(|| "-".into(), |r| format!("{r:.2}"));
    println!(
        "{:<15} {:>10.0} {:>12.0} {:>8.3} {:>8.3} {:>8.3} {:>9.3} {:>8} {:>7}",
        m.op.name(),
        s.ops_per_sec(),
        s.ops_per_sec() * m.items_per_request as f64,
        m.ms(0.5),
        m.ms(0.9),
        m.ms(0.99),
        m.ms(0.999),
        m.errors,
        vs_null
    );
}

fn json_line(s: &Summary, vs_null: Option<f64>, args: &BenchArgs) -> serde_json::Value {
    let m = &s.total;
    serde_json::json!({
        "op": m.op.name(),
        "ops_per_sec": s.ops_per_sec(),
        "ops_per_sec_by_round": s.rates,
        "vs_null": vs_null,
        "rounds": s.rates.len(),
        "items_per_sec": s.ops_per_sec() * m.items_per_request as f64,
        "p50_ms": m.ms(0.5),
        "p90_ms": m.ms(0.9),
        "p99_ms": m.ms(0.99),
        "p999_ms": m.ms(0.999),
        "max_ms": m.latency_us.max() as f64 / 1000.0,
        "requests": m.requests,
        "errors": m.errors,
        "retries": m.retries,
        "measured_s": m.elapsed.as_secs_f64(),
        "concurrency": args.concurrency,
        "connections": args.connections,
        "rate": args.rate,
        "batch_size": (m.items_per_request > 1).then_some(m.items_per_request),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("1h").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), 0.0);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn picks_stay_in_range_and_spread() {
        let mut p = Pick(42);
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            if let Some(n) = seen.get_mut(p.below(10)) {
                *n += 1;
            }
        }
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
    }
}
