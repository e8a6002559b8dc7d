//! The command line: every subcommand, flag, default, environment variable
//! and help text, as clap types. Parsing happens here, once; the command
//! modules receive validated values.

use std::path::PathBuf;

use clap::builder::PossibleValue;
use clap::{Args, Parser, Subcommand, ValueEnum};

use super::bench;
use crate::grpc::pb;

#[derive(Debug, Parser)]
#[command(
    name = "coffre",
    version,
    about = "A sovereign key management service: envelope encryption over gRPC, master keys behind an HSM",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run everything on this machine for a first try: dev PKI, in-process
    /// simulated HSM, sled store, all under --data-dir.
    Dev(DevArgs),
    /// Run the server from a configuration file (production).
    Serve(ServeArgs),
    /// Manage customer master keys (operator).
    #[command(subcommand)]
    Key(KeyCommand),
    /// Data keys (service).
    #[command(subcommand)]
    Datakey(DatakeyCommand),
    /// The HSM behind coffre (operator).
    #[command(subcommand)]
    Hsm(HsmCommand),
    /// Approve or reject sensitive operations (M-of-N quorum; operator).
    #[command(subcommand)]
    Approval(ApprovalCommand),
    /// The audit log (auditor).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Wrap a small secret (at most 4096 bytes) under a key (service).
    Encrypt(EncryptArgs),
    /// Unwrap a ciphertext blob, or a file of them (--batch) (service).
    Decrypt(DecryptArgs),
    /// Move a blob to the newest version of its key, or to another key or
    /// context, without its plaintext leaving the server; --batch for a
    /// file of them (service).
    Reencrypt(ReencryptArgs),
    /// Load a running server and measure throughput and latency (see
    /// BENCHMARKS.md).
    Bench(bench::BenchArgs),
    /// The PostgreSQL store, directly (no server): create or upgrade its
    /// schema, show the database.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Several nodes on one PostgreSQL store: who is alive, who holds
    /// which lease, how far the change feed has gone.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Encrypt a file or a stream of any size on this side, under a fresh
    /// data key of --key bound to --context: the sealed message format
    /// (DESIGN.md), the data never sent to coffre (service).
    Seal(SealArgs),
    /// Open what `coffre seal` made: coffre decrypts its data key if the
    /// key and its policy allow it now (service).
    Open(OpenArgs),
    /// Call an AWS XKS front as AWS KMS does (SigV4), to check it before
    /// pointing AWS KMS at it: health, key metadata, encrypt, decrypt.
    #[command(subcommand)]
    Xks(XksCommand),
}

/// `coffre cluster ...`: the cluster a server configuration's database
/// holds, read from the database directly (it answers even with every
/// node down).
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// The nodes (last heartbeat, staleness of their caches), the leases
    /// (holder, expiry), the change feed's generation and the database's
    /// primary.
    Status(StoreArgs),
}

/// `coffre store ...`: the PostgreSQL database a server configuration
/// names ([store] backend = "postgres"), reached with its URL.
#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Create the schema, or upgrade it to this coffre's; what it applied.
    /// Safe to run on several nodes at once (an advisory lock orders them).
    /// Connect as the schema's owner (coffre_owner), not coffre_app.
    Migrate(StoreArgs),
    /// The database: schema version, primary or standby, server version,
    /// synchronous standbys.
    Status(StoreArgs),
    /// Copy a sled store into a new, migrated PostgreSQL database, offline
    /// (no coffre may run on either): keys, versions, approvals, service
    /// secrets and the change feed, in one transaction, counted at the end.
    Copy(StoreCopyArgs),
}

/// `coffre store copy --from sled:DIR --config FILE`. The target is the
/// database of a node's configuration, as for `migrate`: its URL comes
/// from `url_env` or `url_file`, never from the command line, where a
/// password would show in `ps` and in the shell's history.
#[derive(Debug, Args)]
pub struct StoreCopyArgs {
    /// The source: `sled:DIR`, DIR a data directory (the one `coffre dev
    /// --data-dir` or `data_dir` names; its store is DIR/store).
    #[arg(long, value_name = "sled:DIR", value_parser = parse_sled_source)]
    pub from: PathBuf,
    #[command(flatten)]
    pub target: StoreArgs,
}

/// `sled:DIR` as the path DIR.
fn parse_sled_source(s: &str) -> Result<PathBuf, String> {
    match s.strip_prefix("sled:") {
        Some(dir) if !dir.is_empty() => Ok(PathBuf::from(dir)),
        _ => Err(format!(
            "{s:?}: expected sled:DIR (the data directory of a sled store)"
        )),
    }
}

#[derive(Debug, Args)]
pub struct StoreArgs {
    /// The server configuration whose [store] and [cluster] to use; the
    /// URL comes from its url_env or url_file.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Where the store, the simulated HSM's state and the dev PKI live.
    #[arg(long, default_value = "./coffre-data", env = "COFFRE_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = crate::config::DEFAULT_LISTEN)]
    pub listen: std::net::SocketAddr,
    /// A client certificate revocation list (PEM or DER) to honour; re-read
    /// on SIGHUP and when the file changes. None by default.
    #[arg(long, value_name = "FILE")]
    pub crl: Option<PathBuf>,
    /// How often to check the CRL file for changes, in seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..), requires = "crl")]
    pub crl_reload_secs: u64,
    /// Log as JSON lines.
    #[arg(long)]
    pub log_json: bool,
    /// How the audit log is written: `write` (each record handed to the
    /// kernel before the response), `fsync` (on disk before the response),
    /// or `off` (no record at all: only to measure what the log costs).
    #[arg(long, value_enum, default_value_t = DevAuditMode::Write)]
    pub audit_durability: DevAuditMode,
    /// Serve Prometheus metrics over plain HTTP on this address (e.g.
    /// 127.0.0.1:9464): GET /metrics, and the probes GET /healthz (alive)
    /// and /readyz (ready to serve; 503 with the reason otherwise).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Require M approvals from distinct operators for sensitive operations,
    /// and issue M operator certificates (operator.pem, operator-2.pem, …).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=9))]
    pub quorum: u32,
    /// Create N more keys (as the dev operator, audited) before printing
    /// the banner (the server already answers meanwhile): to benchmark a
    /// large store. Each start with this flag adds N more. With --nodes,
    /// node n1 loads them into PostgreSQL before any node serves.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub preload_keys: u64,
    /// For this start only: the audit log is behind the high-water mark in
    /// the store and truly lost. The mark is set aside and the loss becomes
    /// the log's next record.
    #[arg(long)]
    pub accept_audit_log_loss: bool,
    /// Give dev principals an attribute, for policies whose context rules
    /// use `equals_caller_attribute` (repeatable): a role (`service`: every
    /// dev principal of it), a dev principal (`operator-2`) or a whole
    /// principal URI. The dev service has tenant=acme unless
    /// `--attribute service:tenant=…` replaces it.
    #[arg(long = "attribute", value_name = "PRINCIPAL_OR_ROLE:KEY=VALUE")]
    pub attributes: Vec<crate::server::dev::DevAttribute>,
    /// Run N nodes (2 to 9) sharing one store, for high availability on
    /// one machine: a private PostgreSQL under DIR/postgres, the simulated
    /// HSM served to every node, N `coffre serve` processes on
    /// consecutive ports from --listen; writes DIR/cluster.json. Needs
    /// PostgreSQL 15+ installed (initdb, pg_ctl).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=9))]
    pub nodes: u32,
    /// Also serve the AWS KMS External Key Store (XKS) proxy API on this
    /// address (HTTPS, SigV4), with a dev credential written to
    /// DIR/xks.json. Its principal (…/aws-kms) sees a key once the key's
    /// policy grants it.
    #[arg(long, value_name = "ADDR")]
    pub xks_listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DevAuditMode {
    Write,
    Fsync,
    Off,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The TOML configuration (see the crate docs of coffre::config).
    #[arg(long)]
    pub config: PathBuf,
    /// Run even as root (refused by default; also `allow_root = true` in
    /// the configuration).
    #[arg(long)]
    pub allow_root: bool,
    /// Log as JSON lines.
    #[arg(long)]
    pub log_json: bool,
    /// For this start only: the audit log is behind the high-water mark in
    /// the store and truly lost (no backup, no export to restore). The mark
    /// is set aside and the loss becomes the log's next record. Never needed
    /// twice.
    #[arg(long)]
    pub accept_audit_log_loss: bool,
    /// Benchmarks (`coffre dev --nodes N --preload-keys M` runs it): create
    /// N keys through the core as the dev operator, audited in this node's
    /// log, then stop instead of serving on. A bulk load of a shared store
    /// the way `coffre dev --preload-keys` loads sled.
    #[arg(long, value_name = "N", hide = true, value_parser = clap::value_parser!(u64).range(1..))]
    pub preload_keys: Option<u64>,
}

/// `--endpoint`'s default.
pub const DEFAULT_ENDPOINT: &str = "https://127.0.0.1:7443";
/// `--data-dir`'s default (client commands).
pub const DEFAULT_DATA_DIR: &str = "./coffre-data";

impl ConnectArgs {
    /// The server (the last `--endpoint`; [`super::client::connect`]
    /// refuses more than one).
    pub fn endpoint(&self) -> &str {
        self.endpoints
            .last()
            .map_or(DEFAULT_ENDPOINT, String::as_str)
    }

    /// The same, for the server at `endpoint`.
    pub fn at(&self, endpoint: &str) -> Self {
        Self {
            endpoints: vec![endpoint.to_string()],
            node: None,
            ..self.clone()
        }
    }
}

/// How a client command reaches the server.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// The server, e.g. https://127.0.0.1:7443. `audit export --cluster`
    /// takes it once per node.
    #[arg(
        long = "endpoint",
        global = true,
        env = "COFFRE_ENDPOINT",
        default_value = "https://127.0.0.1:7443",
        action = clap::ArgAction::Append,
        value_name = "URL"
    )]
    pub endpoints: Vec<String>,
    /// A node of `coffre dev --nodes` by name (n1, n2, …): its endpoint is
    /// read from DATA_DIR/cluster.json, in place of --endpoint and
    /// COFFRE_ENDPOINT.
    #[arg(long, global = true, value_name = "NAME")]
    pub node: Option<String>,
    /// The `coffre dev` data directory whose dev PKI (DIR/pki/) to use.
    #[arg(
        long,
        global = true,
        env = "COFFRE_DATA_DIR",
        default_value = "./coffre-data"
    )]
    pub data_dir: PathBuf,
    /// Identity to use from the dev PKI (operator, service, auditor, …);
    /// defaults to the role the command needs.
    #[arg(long = "as", global = true, value_name = "NAME")]
    pub identity: Option<String>,
    /// CA certificate of the server (overrides the dev PKI).
    #[arg(long, global = true, env = "COFFRE_CA")]
    pub ca: Option<PathBuf>,
    /// Client certificate (overrides the dev PKI).
    #[arg(long, global = true, env = "COFFRE_CERT", requires = "cert_key")]
    pub cert: Option<PathBuf>,
    /// Private key of the client certificate (overrides the dev PKI).
    #[arg(long, global = true, env = "COFFRE_CERT_KEY", requires = "cert")]
    pub cert_key: Option<PathBuf>,
    /// Machine-readable output: one JSON object.
    #[arg(long, global = true)]
    pub json: bool,
    /// Print only this field of the JSON output, raw (a string without its
    /// quotes), for shell variables: `blob=$(coffre datakey generate ...
    /// --field ciphertext_blob)`. Implies --json; `a.b` and `list.0.c`
    /// reach into objects and lists.
    #[arg(long, global = true, value_name = "NAME")]
    pub field: Option<String>,
    /// Per-call deadline, in seconds.
    #[arg(long, global = true, default_value_t = 30)]
    pub timeout: u64,
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create a key (ENABLED, version 1).
    Create {
        /// Unique alias: letters, digits, '/', '_' and '-'.
        #[arg(long)]
        alias: Option<String>,
        #[arg(long, default_value = "")]
        description: String,
        /// A label, KEY=VALUE; repeat for more.
        #[arg(long = "label", value_parser = parse_pair)]
        labels: Vec<(String, String)>,
        /// Rotate automatically every PERIOD (e.g. 90d, 1y, 12h; 1 day to 10 years).
        #[arg(long, value_parser = parse_given_period)]
        rotation_period: Option<Period>,
        /// The key's policy, a JSON file (default: the server's default policy).
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
        /// `software`: the CMK is wrapped by the HSM at rest and used from
        /// coffre's memory (fast). `hsm`: the CMK never leaves the HSM, which
        /// wraps and unwraps every data key (needs a backend that supports it).
        #[arg(long, value_enum, default_value_t = ProtectionArg::Software)]
        protection_level: ProtectionArg,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// List keys, a page at a time.
    List {
        #[arg(long, default_value_t = 100)]
        page_size: u32,
        /// From the previous page's output.
        #[arg(long, default_value = "")]
        page_token: String,
        /// Follow every page.
        #[arg(long)]
        all: bool,
        /// Only keys in this state.
        #[arg(long, value_enum)]
        state: Option<StateFilter>,
        /// Only keys whose alias starts with this.
        #[arg(long)]
        alias_prefix: Option<String>,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Show a key and its versions.
    Show {
        /// Key id (UUID) or alias.
        key: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Add a new primary version; older versions keep decrypting.
    Rotate {
        key: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Refuse every data-key operation with this key, from now on.
    Disable {
        key: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Serve data-key operations again.
    Enable {
        key: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Destroy the key after a waiting period (7 to 30 days); until then it
    /// can be cancelled.
    ScheduleDeletion {
        key: String,
        /// Waiting period in days, 7 to 30.
        #[arg(long, default_value_t = 30)]
        days: u32,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Cancel a scheduled deletion: the key becomes DISABLED.
    CancelDeletion {
        key: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// List a key's versions with their state.
    Versions {
        key: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Set (or with --off, clear) automatic rotation.
    SetRotation {
        key: String,
        /// e.g. 90d, 1y, 12h; 1 day to 10 years.
        #[arg(long, value_parser = parse_given_period, required_unless_present = "off")]
        period: Option<Period>,
        #[arg(long, conflicts_with = "period")]
        off: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Show or replace a key's policy (JSON).
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Retire the versions below --below: they stop decrypting
    /// (re-encrypt blobs forward first).
    RetireVersions {
        key: String,
        /// The new min_decryption_version.
        #[arg(long)]
        below: u32,
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify an exported audit log offline: every line's canonical
    /// encoding, every record's hash, the hash chain, and every checkpoint's
    /// Ed25519 signature and log identity. The log must start at seq 1, hold
    /// a record and a signed checkpoint, and end with at most --max-unsigned
    /// unsigned records. Names the first bad line and exits non-zero on
    /// failure. With --cluster, verifies a cluster's export (every node's
    /// log and the digest chain that ties them) instead.
    Verify {
        /// The log, JSON lines (records and checkpoints).
        #[arg(required_unless_present = "cluster")]
        file: Option<PathBuf>,
        /// A cluster's export directory (`coffre audit export --cluster`):
        /// `node-<id>.jsonl` per node and `digests.jsonl`. Each node's log
        /// must verify and name its node, the digests must chain and be
        /// signed, and every head they list must be in its node's log.
        #[arg(long, value_name = "DIR", conflicts_with_all = ["file", "checkpoint"])]
        cluster: Option<PathBuf>,
        /// The audit public key (PEM), e.g. DIR/audit-public-key.pem.
        #[arg(long)]
        public_key: PathBuf,
        /// Accept a log that starts from an anchor checkpoint (its older
        /// records archived by retention) instead of seq 1; the anchor's seq
        /// and time are printed.
        #[arg(long)]
        allow_anchored: bool,
        /// The most records allowed after the last signed checkpoint.
        #[arg(long, value_name = "N", default_value_t = crate::audit::verify::DEFAULT_MAX_UNSIGNED)]
        max_unsigned: u64,
        /// A checkpoint kept from before (the line `coffre audit checkpoint
        /// --json` prints, or one from an earlier export) that the log must
        /// contain or extend. Repeatable.
        #[arg(long, value_name = "FILE")]
        checkpoint: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Export the server's audit log (records and checkpoints, JSON lines)
    /// for offline verification. Asks for a fresh checkpoint first, so the
    /// export is signed to its end, and checks it before reporting success.
    ///
    /// With --cluster, exports a cluster for `coffre audit verify
    /// --cluster`: the digests first (from the database, with --config),
    /// then each node's log over its own endpoint (--endpoint once per
    /// node, or --cluster-file), as DIR/node-<id>.jsonl and
    /// DIR/digests.jsonl, and verifies them together.
    Export {
        /// Where to write the log (replaced atomically); with --cluster, the
        /// directory (created if needed).
        #[arg(long)]
        out: PathBuf,
        /// Export every node of a cluster (see above).
        #[arg(long)]
        cluster: bool,
        /// The nodes' endpoints from a cluster file (`coffre dev --nodes`
        /// writes DIR/cluster.json: {"nodes": [{"node_id", "endpoint"}]}).
        #[arg(long, value_name = "FILE", requires = "cluster")]
        cluster_file: Option<PathBuf>,
        /// A node's configuration (`coffre serve --config`), whose database
        /// holds the digests (read directly, as `coffre store status` does).
        #[arg(long, value_name = "FILE", requires = "cluster")]
        config: Option<PathBuf>,
        /// Also write the server's audit public key (PEM) here.
        #[arg(long)]
        public_key_out: Option<PathBuf>,
        /// The audit public key (PEM) to verify the export against, obtained
        /// out of band: the export fails if the server presents another.
        /// Without it, the key the server sends is trusted (and its
        /// fingerprint printed, to compare).
        #[arg(long, value_name = "FILE")]
        public_key: Option<PathBuf>,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// List audit records, filtered, oldest first.
    Events {
        /// Only records about this key (UUID, or the alias as requested).
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        principal: Option<String>,
        /// The RPC name, e.g. Decrypt.
        #[arg(long)]
        operation: Option<String>,
        #[arg(long, value_enum)]
        outcome: Option<OutcomeArg>,
        /// Only records from this period before now (e.g. 1h, 7d).
        #[arg(long, value_parser = parse_period)]
        since: Option<u64>,
        /// At most this many records (1 to 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Continue after a previous page (its next_page_token).
        #[arg(long)]
        page_token: Option<String>,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Stream audit records as JSON lines (one stored record per line) as
    /// they are written, for a SIEM. Resumable with --after-seq.
    Tail {
        /// Start after this seq (0: the whole log first).
        #[arg(long, default_value_t = 0)]
        after_seq: u64,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Sign the current chain head and show the checkpoint.
    Checkpoint {
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum OutcomeArg {
    Allowed,
    Refused,
    Failed,
}

#[derive(Debug, Subcommand)]
pub enum ApprovalCommand {
    /// Pending approvals (--all: also closed ones): id, operation, key,
    /// digest prefix, approvals/required, expiry.
    List {
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// One approval in full: the change (for a policy, the whole proposed
    /// policy and its difference from the current one) and its digest.
    Show {
        id: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Approve the operation whose digest you reviewed; at the required
    /// count the operation runs. Without --digest, on a terminal, shows the
    /// operation and asks for confirmation.
    Approve {
        id: String,
        /// The operation's full `operation_sha256`, as `coffre approval
        /// show ID` prints it. Refused if the operation is not that one.
        #[arg(long, value_name = "HEX")]
        digest: Option<String>,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Reject: the operation will not run.
    Reject {
        id: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Print the policy as JSON (the format `set` takes).
    Show {
        key: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Replace the policy with the JSON in FILE ('-': standard input).
    Set {
        key: String,
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StateFilter {
    Enabled,
    Disabled,
    PendingDeletion,
    Destroyed,
}

/// `coffre hsm ...`: the first two go through a running server, the
/// others open the token directly ([`TokenCommand`], on the same level of
/// the command line).
#[derive(Debug, Subcommand)]
pub enum HsmCommand {
    /// The HSM backend, its root key ids (never their material).
    Info {
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Rotate the HSM root key and re-wrap every CMK version under it, with
    /// progress; safe to interrupt and run again (it resumes).
    RotateRoot {
        #[command(flatten)]
        connect: ConnectArgs,
    },
    #[command(flatten)]
    Token(TokenCommand),
}

/// The `coffre hsm` commands that open the PKCS#11 token a server
/// configuration names, without a server.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create the first root key on the PKCS#11 token a server configuration
    /// names (once, at installation; refused if the token has one). Runs on
    /// the HSM directly, not through a server.
    InitRootKey {
        #[command(flatten)]
        local: LocalHsmArgs,
    },
    /// Check the PKCS#11 HSM a server configuration names, as `coffre serve`
    /// does at start (module, token, login, mechanisms, every root key's
    /// attributes), then wrap and unwrap a random value. Changes nothing.
    Check {
        #[command(flatten)]
        local: LocalHsmArgs,
    },
    /// Run the HSM conformance suite against the PKCS#11 token a
    /// configuration names. It rotates and destroys root keys: it refuses a
    /// token that already holds one, so run it on a fresh test token.
    Conformance {
        #[command(flatten)]
        local: LocalHsmArgs,
    },
}

/// `coffre key create --protection-level`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProtectionArg {
    Software,
    Hsm,
}

#[derive(Debug, Args)]
pub struct LocalHsmArgs {
    /// The server configuration whose [hsm] section to use (backend
    /// "pkcs11"). The PIN comes from its pin_env or pin_file.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum DatakeyCommand {
    /// Generate a data key: its plaintext and its wrapped form.
    Generate {
        /// Key id (UUID) or alias.
        #[arg(long)]
        key: String,
        /// Bytes of data key, 16 to 64.
        #[arg(long, default_value_t = 32)]
        bytes: u32,
        /// Only the wrapped form.
        #[arg(long)]
        without_plaintext: bool,
        /// Make this many data keys (1 to 1000) in one BatchGenerateDataKey
        /// request: one authorization, one audit record.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
        count: Option<u32>,
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

/// What every data-key request carries.
#[derive(Debug, Clone, Args)]
pub struct DataArgs {
    /// An encryption-context entry, KEY=VALUE (optional; repeat for more).
    /// Decrypting needs exactly the entries given when the blob was made.
    #[arg(long = "context", value_name = "KEY=VALUE", value_parser = parse_pair)]
    pub context: Vec<(String, String)>,
    /// Why the key is used.
    #[arg(long, value_enum, default_value_t = pb::AccessReason::CustomerInitiatedAccess)]
    pub justification: pb::AccessReason,
}

/// `--justification`: clap parses the wire's enum directly, so the client
/// sends what the user chose with no conversion in between.
impl ValueEnum for pb::AccessReason {
    fn value_variants<'a>() -> &'a [Self] {
        &[
            Self::Unspecified,
            Self::CustomerInitiatedAccess,
            Self::CustomerInitiatedSupport,
            Self::ProviderInitiatedService,
            Self::ProviderSystemOperation,
            Self::ProviderInitiatedReview,
            Self::ThirdPartyDataRequest,
        ]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(PossibleValue::new(match self {
            Self::Unspecified => "unspecified",
            Self::CustomerInitiatedAccess => "customer-initiated-access",
            Self::CustomerInitiatedSupport => "customer-initiated-support",
            Self::ProviderInitiatedService => "provider-initiated-service",
            Self::ProviderSystemOperation => "provider-system-operation",
            Self::ProviderInitiatedReview => "provider-initiated-review",
            Self::ThirdPartyDataRequest => "third-party-data-request",
        }))
    }
}

#[derive(Debug, Args)]
pub struct EncryptArgs {
    /// The key to wrap under: its id (UUID) or alias.
    #[arg(long)]
    pub key: String,
    /// File holding the secret (1 to 4096 bytes); '-' reads standard input.
    #[arg(long = "in", value_name = "FILE")]
    pub input: PathBuf,
    /// Write the raw blob here instead of printing it in base64 ('-':
    /// standard output, and nothing else is printed there).
    #[arg(long = "out", value_name = "FILE")]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

#[derive(Debug, Args)]
#[command(group(
    clap::ArgGroup::new("source").required(true).args(["blob", "input", "batch"])
))]
pub struct DecryptArgs {
    /// The blob, in base64 (as `coffre encrypt` and `coffre datakey
    /// generate` print it).
    #[arg(long, value_name = "BASE64")]
    pub blob: Option<String>,
    /// File holding the raw blob; '-' reads standard input.
    #[arg(long = "in", value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// A file of JSON lines ('-': standard input), one blob per line:
    /// {"blob": BASE64, "context": {"k": "v"}, "key": KEY}; "context" and
    /// "key" default to --context and --key. Writes one JSON line per input
    /// line, in order, to --out or standard output; exits non-zero if any
    /// line failed. (Its output is JSON already: no --json.)
    #[arg(long, value_name = "FILE", conflicts_with = "json")]
    pub batch: Option<PathBuf>,
    /// Write the raw plaintext here instead of printing it in base64 ('-':
    /// standard output, and nothing else is printed there); with --batch,
    /// the JSON lines.
    #[arg(long = "out", value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Require the blob to belong to this key (UUID or alias).
    #[arg(long)]
    pub key: Option<String>,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

#[derive(Debug, Args)]
#[command(group(
    clap::ArgGroup::new("source").required(true).args(["blob", "input", "batch"])
))]
pub struct ReencryptArgs {
    /// The blob, in base64 (as `coffre encrypt` and `coffre datakey
    /// generate` print it).
    #[arg(long, value_name = "BASE64")]
    pub blob: Option<String>,
    /// File holding the raw blob; '-' reads standard input.
    #[arg(long = "in", value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// A file of JSON lines ('-': standard input), one blob per line:
    /// {"blob": BASE64, "context": {..}, "key": KEY, "to": KEY,
    /// "to_context": {..}}; all but "blob" default to the flags. Writes one
    /// JSON line per input line, in order; exits non-zero if any failed.
    /// (Its output is JSON already: no --json.)
    #[arg(long, value_name = "FILE", conflicts_with = "json")]
    pub batch: Option<PathBuf>,
    /// Write the raw new blob here instead of printing it in base64 ('-':
    /// standard output, and nothing else is printed there); with --batch,
    /// the JSON lines.
    #[arg(long = "out", value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Require the blob to belong to this key (UUID or alias).
    #[arg(long)]
    pub key: Option<String>,
    /// The key to wrap under (UUID or alias); default: the blob's own key,
    /// at its newest version.
    #[arg(long, value_name = "KEY")]
    pub to: Option<String>,
    /// An entry of the new blob's encryption context, KEY=VALUE (repeat for
    /// more); default: the same context as the blob's (--context).
    #[arg(long = "to-context", value_name = "KEY=VALUE", value_parser = parse_pair)]
    pub to_context: Vec<(String, String)>,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// A period such as `90d`, `1y`, `12h`, `3600s` (seconds when no unit).
fn parse_period(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, ""), |i| s.split_at(i));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("expected a period such as 90d, 1y or 12h, got {s:?}"))?;
    let unit_secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        "y" => 365 * 86_400,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {s:?} (use s, m, h, d, w or y)"
            ));
        }
    };
    n.checked_mul(unit_secs)
        .ok_or_else(|| format!("period {s:?} is too long"))
}

/// A period from the command line: its length, and the words it was given
/// in (`90d`), which the output echoes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Period {
    pub secs: u64,
    pub text: String,
}

/// [`parse_period`], keeping the text as given (trimmed).
fn parse_given_period(s: &str) -> Result<Period, String> {
    Ok(Period {
        secs: parse_period(s)?,
        text: s.trim().to_string(),
    })
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
    if k.is_empty() {
        return Err(format!("empty key in {s:?}"));
    }
    Ok((k.to_string(), v.to_string()))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn periods_parse() {
        assert_eq!(parse_period("90d"), Ok(90 * 86_400));
        assert_eq!(parse_period("1y"), Ok(365 * 86_400));
        assert_eq!(parse_period("12h"), Ok(12 * 3600));
        assert_eq!(parse_period("3600"), Ok(3600));
        assert!(parse_period("3x").is_err());
        assert!(parse_period("d").is_err());
        assert!(parse_period("99999999999999999999y").is_err());
        let given = parse_given_period(" 90d ").unwrap();
        assert_eq!((given.secs, given.text.as_str()), (90 * 86_400, "90d"));
    }

    #[test]
    fn pairs_parse() {
        assert_eq!(parse_pair("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(parse_pair("a="), Ok(("a".into(), String::new())));
        assert!(parse_pair("=b").is_err());
        assert!(parse_pair("ab").is_err());
    }

    #[test]
    fn every_access_reason_has_a_spelling() {
        let listed = pb::AccessReason::value_variants();
        // Every value the wire defines (they are numbered from 0 up).
        let defined: Vec<_> = (0..64)
            .filter_map(|n| pb::AccessReason::try_from(n).ok())
            .collect();
        assert_eq!(listed, &defined[..]);
    }
}

/// `coffre xks …`: an XKS front, called as AWS KMS calls it.
#[derive(Debug, Subcommand)]
pub enum XksCommand {
    /// POST health: the proxy and the HSM as AWS KMS sees them (ACTIVE,
    /// DEGRADED or UNAVAILABLE).
    Health(XksArgs),
    /// A key's spec, usage and status, as the credential's principal sees
    /// them (KeyNotFoundException without a grant naming it).
    Metadata {
        /// The external key id: a coffre key id, or an alias without '/'.
        key: String,
        #[command(flatten)]
        xks: XksArgs,
    },
    /// Encrypt 1 to 4300 bytes as AWS KMS does; prints the answer's JSON
    /// (ciphertext, IV, tag, ciphertextMetadata), which `xks decrypt --in`
    /// reads.
    Encrypt {
        /// The external key id: a coffre key id, or an alias without '/'.
        key: String,
        /// File holding the plaintext; '-' reads standard input.
        #[arg(long = "in", value_name = "FILE")]
        input: PathBuf,
        /// Additional authenticated data (AWS KMS sends its encryption
        /// context here); the same text is needed to decrypt.
        #[arg(long, value_name = "TEXT")]
        aad: Option<String>,
        /// Ask for the ciphertextDataIntegrityValue (SHA-256 over AAD,
        /// metadata, IV, ciphertext and tag).
        #[arg(long)]
        integrity: bool,
        #[command(flatten)]
        xks: XksArgs,
    },
    /// Decrypt what `coffre xks encrypt` printed; prints the plaintext in
    /// base64 (or raw bytes with --out).
    Decrypt {
        /// The external key id: a coffre key id, or an alias without '/'.
        key: String,
        /// The JSON `coffre xks encrypt` printed; '-' reads standard input.
        #[arg(long = "in", value_name = "FILE")]
        input: PathBuf,
        /// The additional authenticated data given to encrypt.
        #[arg(long, value_name = "TEXT")]
        aad: Option<String>,
        /// Write the raw plaintext here ('-': standard output, and nothing
        /// else is printed there).
        #[arg(long = "out", value_name = "FILE")]
        output: Option<PathBuf>,
        #[command(flatten)]
        xks: XksArgs,
    },
}

/// Which front, as whom, and what AWS KMS would say about the caller.
#[derive(Debug, Args)]
pub struct XksArgs {
    /// The front and its credential, as `coffre dev --xks-listen` writes
    /// them (endpoint, uri_prefix, access_key_id, secret_access_key,
    /// region, ca); default DATA_DIR/xks.json. The file holds a secret:
    /// keep it private.
    #[arg(long, value_name = "FILE")]
    pub xks_file: Option<PathBuf>,
    /// A client certificate (PEM), for a front with mTLS (`[xks] client_ca`).
    #[arg(long, value_name = "FILE", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// The private key of --client-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// The awsPrincipalArn sent (its account is the key ARN's): what the
    /// key's policy may restrict with aws:PrincipalArn and
    /// aws:PrincipalAccount.
    #[arg(
        long,
        default_value = "arn:aws:iam::111122223333:role/coffre-xks-check"
    )]
    pub principal_arn: String,
    /// The kmsViaService sent (kms:ViaService), e.g. s3 or ebs.
    #[arg(long, value_name = "SERVICE")]
    pub via_service: Option<String>,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// `coffre seal`.
#[derive(Debug, Args)]
pub struct SealArgs {
    /// The key whose data key seals the data: its id or alias.
    #[arg(long)]
    pub key: String,
    /// The data to seal ('-', the default: standard input).
    #[arg(long = "in", value_name = "FILE", default_value = "-")]
    pub input: PathBuf,
    /// Where the sealed message goes ('-', the default: standard output).
    /// A file appears only once complete (written beside it, then renamed).
    #[arg(long = "out", value_name = "FILE", default_value = "-")]
    pub output: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// `coffre open`.
#[derive(Debug, Args)]
pub struct OpenArgs {
    /// The sealed message ('-', the default: standard input).
    #[arg(long = "in", value_name = "FILE", default_value = "-")]
    pub input: PathBuf,
    /// Where the plaintext goes ('-', the default: standard output, where
    /// it is not verified until the command succeeds). A file appears
    /// only once the whole message verified.
    #[arg(long = "out", value_name = "FILE", default_value = "-")]
    pub output: PathBuf,
    /// With --context: the message's context (in its header) must be
    /// exactly these entries, or nothing is opened.
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub connect: ConnectArgs,
}
