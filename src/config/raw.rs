//! The configuration file as TOML gives it: serde structs mirroring its
//! sections, and nothing else. Unknown fields are refused here; every other
//! check is made once, on the way to [`super::Config`].

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use serde::Deserialize;

use crate::model::KeyPolicy;
use crate::service::RateLimit;
use crate::store::approvals::SensitiveKind;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) listen: Option<String>,
    /// Prometheus metrics over plain HTTP (GET /metrics) and the probes
    /// (GET /healthz, /readyz); off when unset.
    pub(super) metrics_listen: Option<String>,
    pub(super) data_dir: PathBuf,
    pub(super) tls: RawTls,
    pub(super) hsm: RawHsm,
    #[serde(default)]
    pub(super) roles: RawRoles,
    #[serde(default)]
    pub(super) cache: RawCache,
    /// Seconds between scheduler passes (rotation, destruction); default 60.
    pub(super) scheduler_interval_secs: Option<u64>,
    /// The policy of keys created without one (default: no grants, the
    /// default reasons).
    pub(super) default_key_policy: Option<KeyPolicy>,
    /// principal → {attribute → value}, for policies that bind a context
    /// value to the caller (e.g. tenant).
    #[serde(default)]
    pub(super) attributes: HashMap<String, BTreeMap<String, String>>,
    /// Per-principal rate limits; `coffre serve` fills in what is unset
    /// with its defaults (`super::DEFAULT_RATE_LIMIT` and the others).
    #[serde(default)]
    pub(super) rate_limits: RawRateLimits,
    /// The listener's bounds and the audit volume's free-space alert.
    #[serde(default)]
    pub(super) limits: RawLimits,
    #[serde(default)]
    pub(super) quorum: RawQuorum,
    #[serde(default)]
    pub(super) audit: RawAudit,
    /// Run even with effective uid 0 (refused by default: see
    /// `crate::hardening`).
    #[serde(default)]
    pub(super) allow_root: bool,
    /// Serve even though one operator alone may run the sensitive
    /// operations (no `[quorum]`, or one requiring a single approval):
    /// refused by default.
    #[serde(default)]
    pub(super) allow_single_operator: bool,
    /// `[store]`: sled (default) or PostgreSQL (`super::store`).
    pub(super) store: Option<super::store::RawStore>,
    /// `[cluster]`: this node in a cluster (PostgreSQL only).
    pub(super) cluster: Option<super::store::RawCluster>,
    /// `[xks]`: the AWS XKS proxy API front (`super::xks`).
    pub(super) xks: Option<super::xks::RawXks>,
}

/// `[rate_limits]`: the core's limits ([`crate::service::RateLimits`]),
/// and `enabled = false`, which turns every one of them off (as `coffre dev`
/// runs; for development and benchmarks).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimits {
    pub(super) enabled: Option<bool>,
    pub(super) default: Option<RateLimit>,
    #[serde(default)]
    pub(super) principals: HashMap<String, RateLimit>,
    pub(super) unauthenticated: Option<RateLimit>,
    pub(super) batch: Option<RateLimit>,
}

/// `[limits]`: every key optional (defaults in `grpc::ServerLimits`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) handshake_timeout_ms: Option<u64>,
    pub(super) client_hello_timeout_ms: Option<u64>,
    pub(super) max_handshakes: Option<usize>,
    pub(super) max_handshakes_per_ip: Option<usize>,
    pub(super) max_concurrent_streams: Option<u32>,
    pub(super) max_requests_per_connection: Option<usize>,
    pub(super) request_timeout_ms: Option<u64>,
    pub(super) keepalive_interval_secs: Option<u64>,
    pub(super) keepalive_timeout_secs: Option<u64>,
    pub(super) max_message_bytes: Option<usize>,
    pub(super) audit_min_free_bytes: Option<u64>,
    pub(super) audit_min_free_percent: Option<u8>,
}

/// `[audit]`: the audit log.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    /// The log file (default `DATA_DIR/audit.log`).
    pub(super) path: Option<PathBuf>,
    /// `write` (default: each record reaches the OS before the response; it
    /// survives a crash of coffre) or `fsync` (it reaches the disk; group
    /// commit: concurrent requests share one fsync).
    #[serde(default)]
    pub(super) durability: AuditDurability,
    /// A signed checkpoint after this many records (default 1000)…
    pub(super) checkpoint_every_records: Option<u64>,
    /// …or after this many seconds (default 60), whichever comes first.
    pub(super) checkpoint_every_secs: Option<u64>,
    /// Records older than this are pruned, down to a signed anchor
    /// checkpoint (default for `coffre serve`: 400 days,
    /// `super::audit::DEFAULT_RETENTION_DAYS`).
    pub(super) retention_days: Option<u32>,
    /// Encryption-context keys whose values records show in clear; `"*"`
    /// for all. Default: none (only a keyed digest).
    #[serde(default)]
    pub(super) clear_context_keys: Vec<String>,
    /// Which key signs checkpoints: `software` (default: an Ed25519 key kept
    /// wrapped under the HSM root key and used in coffre's memory) or `hsm`
    /// (an Ed25519 key pair generated in the PKCS#11 token, used there).
    #[serde(default)]
    pub(super) checkpoint_key: CheckpointKey,
}

/// `[audit] checkpoint_key`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointKey {
    #[default]
    Software,
    Hsm,
}

/// `[audit] durability`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(super) enum AuditDurability {
    #[default]
    Write,
    Fsync,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQuorum {
    /// M for every sensitive operation (default 1: no quorum, which
    /// `coffre serve` refuses unless `allow_single_operator = true`).
    pub(super) approvals_required: Option<u32>,
    /// Per-operation overrides.
    #[serde(default)]
    pub(super) operations: BTreeMap<SensitiveKind, u32>,
    /// How long a proposal stays open (default 24 h).
    pub(super) expiry_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
    /// One CA bundle for every role: accepted only with
    /// `allow_shared_client_ca = true`.
    pub(super) client_ca: Option<PathBuf>,
    /// The CAs whose certificates may act as operators, services, auditors.
    pub(super) operator_ca: Option<PathBuf>,
    pub(super) service_ca: Option<PathBuf>,
    pub(super) auditor_ca: Option<PathBuf>,
    /// Accept `client_ca` (one anchor for every role), or role CAs that
    /// overlap (one issued by another, or the same).
    #[serde(default)]
    pub(super) allow_shared_client_ca: bool,
    pub(super) crl: Option<PathBuf>,
    pub(super) crl_reload_secs: Option<u64>,
    /// How long past its nextUpdate a CRL is still accepted (default 0).
    pub(super) crl_grace_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHsm {
    pub(super) backend: String,
    pub(super) endpoint: Option<String>,
    pub(super) pin_env: Option<String>,
    pub(super) pin_file: Option<PathBuf>,
    pub(super) timeout_ms: Option<u64>,
    #[serde(default)]
    pub(super) allow_insecure_simulator: bool,
    /// PKCS#11: the vendor's module.
    pub(super) module: Option<PathBuf>,
    /// PKCS#11: the token, by label or by slot id.
    pub(super) token_label: Option<String>,
    pub(super) slot: Option<u64>,
    /// PKCS#11: the session pool size.
    pub(super) sessions: Option<usize>,
    /// Refused with a clear message: the PIN never goes in the file.
    pub(super) pin: Option<toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoles {
    #[serde(default)]
    pub(super) operator: Vec<String>,
    #[serde(default)]
    pub(super) service: Vec<String>,
    #[serde(default)]
    pub(super) auditor: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCache {
    pub(super) keys: Option<usize>,
    pub(super) versions: Option<usize>,
}
