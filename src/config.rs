//! The server configuration of `coffre serve --config FILE` (TOML), parsed
//! once into validated values.
//!
//! ```toml
//! listen = "0.0.0.0:7443"
//! metrics_listen = "127.0.0.1:9464"     # optional: Prometheus, plain HTTP
//! data_dir = "/var/lib/coffre"          # sled store in DATA_DIR/store
//! scheduler_interval_secs = 60           # automatic rotation, destruction
//! allow_root = false                     # refuse to run as root (default)
//!
//! [tls]                                  # mTLS is always on
//! cert = "/etc/coffre/server.pem"
//! key = "/etc/coffre/server-key.pem"
//! client_ca = "/etc/coffre/clients-ca.pem"
//! crl = "/etc/coffre/clients.crl"        # optional: PEM or DER; re-read on
//!                                        # SIGHUP and when its mtime changes
//! crl_reload_secs = 10                   # optional: how often to check the CRL
//!
//! [hsm]
//! backend = "pkcs11"                     # a real HSM (see SECURITY.md, "PKCS#11")
//! module = "/usr/lib/softhsm/libsofthsm2.so"   # the vendor's PKCS#11 library
//! token_label = "coffre"                 # or slot = 0
//! pin_env = "COFFRE_HSM_PIN"             # or pin_file = "/etc/coffre/hsm.pin"
//! sessions = 8                           # session pool: calls in flight
//! timeout_ms = 2000
//!
//! # or, for tests and demos:
//! # backend = "simulator"                # a separate `hsm-sim serve` process
//! # endpoint = "http://127.0.0.1:7444"
//! # allow_insecure_simulator = true      # required to run on a simulator
//!
//! [roles]                                # principal → role; deny by default
//! operator = ["spiffe://operator.example/alice"]
//! service = ["spiffe://provider.example/storage"]
//! auditor = ["spiffe://audit.example/bob"]
//!
//! [attributes."spiffe://provider.example/storage"]   # for policy context rules
//! tenant = "acme"
//!
//! [default_key_policy]                   # keys created without a policy
//! grants = [{ principal = "spiffe://provider.example/storage", operations = ["GenerateDataKey", "Decrypt"] }]
//! accepted_reasons = ["CUSTOMER_INITIATED_ACCESS", "PROVIDER_SYSTEM_OPERATION"]
//! [default_key_policy.required_context.tenant]
//! equals_caller_attribute = "tenant"
//!
//! [rate_limits]                         # per principal token buckets; none by default
//! default = { per_second = 2000, burst = 4000 }
//! [rate_limits.principals."spiffe://provider.example/batch"]
//! per_second = 100
//! burst = 200
//!
//! [quorum]                               # M-of-N approvals for sensitive operations
//! approvals_required = 2                 # ScheduleKeyDeletion, CancelKeyDeletion, EnableKey,
//! expiry_secs = 86400                    # UpdateKeyPolicy, RotateRootKey
//! [quorum.operations]
//! ScheduleKeyDeletion = 3                # per-operation override
//!
//! [audit]                                # all optional
//! checkpoint_key = "hsm"                 # checkpoints signed in the PKCS#11 token
//!
//! [cache]
//! keys = 100000
//! versions = 100000
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::authz::Role;
pub use crate::hsm::pkcs11::TokenSelector;
use crate::service::KmsOptions;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7443";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    /// Prometheus metrics over plain HTTP (GET /metrics); off when unset.
    metrics_listen: Option<String>,
    data_dir: PathBuf,
    tls: RawTls,
    hsm: RawHsm,
    #[serde(default)]
    roles: RawRoles,
    #[serde(default)]
    cache: RawCache,
    /// Seconds between scheduler passes (rotation, destruction); default 60.
    scheduler_interval_secs: Option<u64>,
    /// The policy of keys created without one (default: no grants, the
    /// default reasons).
    default_key_policy: Option<crate::model::KeyPolicy>,
    /// principal → {attribute → value}, for policies that bind a context
    /// value to the caller (e.g. tenant).
    #[serde(default)]
    attributes: HashMap<String, std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    rate_limits: crate::service::RateLimits,
    #[serde(default)]
    quorum: RawQuorum,
    #[serde(default)]
    audit: AuditConfig,
    /// Run even with effective uid 0 (refused by default: see
    /// `crate::hardening`).
    #[serde(default)]
    allow_root: bool,
}

/// `[audit]`: the audit log.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// The log file (default `DATA_DIR/audit.log`).
    pub path: Option<PathBuf>,
    /// `write` (default: each record reaches the OS before the response; it
    /// survives a crash of coffre) or `fsync` (it reaches the disk; group
    /// commit: concurrent requests share one fsync).
    #[serde(default)]
    pub durability: AuditDurability,
    /// A signed checkpoint after this many records (default 1000)…
    pub checkpoint_every_records: Option<u64>,
    /// …or after this many seconds (default 60), whichever comes first.
    pub checkpoint_every_secs: Option<u64>,
    /// Records older than this are pruned, down to a signed anchor
    /// checkpoint (default: keep everything).
    pub retention_days: Option<u32>,
    /// Encryption-context keys whose values records show in clear; `"*"`
    /// for all. Default: none (only a keyed digest).
    #[serde(default)]
    pub clear_context_keys: Vec<String>,
    /// No record written: `coffre dev --audit-durability off`, to measure
    /// what the log costs. No configuration file can set it.
    #[serde(skip)]
    pub discard: bool,
    /// Which key signs checkpoints: `software` (default: an Ed25519 key kept
    /// wrapped under the HSM root key and used in coffre's memory) or `hsm`
    /// (an Ed25519 key pair generated in the PKCS#11 token, used there).
    #[serde(default)]
    pub checkpoint_key: CheckpointKey,
}

/// `[audit] checkpoint_key`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointKey {
    #[default]
    Software,
    Hsm,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuditDurability {
    #[default]
    Write,
    Fsync,
}

impl AuditConfig {
    /// The log's path, given the data directory.
    pub fn path_in(&self, data_dir: &Path) -> PathBuf {
        self.path
            .clone()
            .unwrap_or_else(|| data_dir.join(AUDIT_LOG_FILE))
    }

    pub fn auditor_options(&self) -> anyhow::Result<crate::audit::AuditTrailOptions> {
        use crate::audit::{
            AuditLogOptions, AuditTrailOptions, CheckpointPolicy, ClearContext, Durability,
        };
        let every_records = self.checkpoint_every_records.unwrap_or(1000);
        let every_secs = self.checkpoint_every_secs.unwrap_or(60);
        if every_records == 0 || every_secs == 0 {
            bail!(
                "audit.checkpoint_every_records and audit.checkpoint_every_secs must be at least 1"
            );
        }
        if self.retention_days == Some(0) {
            bail!("audit.retention_days must be at least 1");
        }
        let clear_context = if self.clear_context_keys.is_empty() {
            ClearContext::None
        } else if self.clear_context_keys.iter().any(|k| k == "*") {
            ClearContext::All
        } else {
            ClearContext::Keys(self.clear_context_keys.iter().cloned().collect())
        };
        Ok(AuditTrailOptions {
            log: AuditLogOptions {
                durability: match self.durability {
                    AuditDurability::Write => Durability::Write,
                    AuditDurability::Fsync => Durability::Fsync,
                },
                checkpoints: CheckpointPolicy {
                    every_records,
                    every: Duration::from_secs(every_secs),
                },
                clock: std::sync::Arc::new(crate::model::SystemClock),
            },
            clear_context,
            retention: self
                .retention_days
                .map(|d| Duration::from_secs(u64::from(d) * 86_400)),
            housekeeping_interval: Duration::from_secs(1),
            discard: self.discard,
        })
    }
}

/// The audit log's file name in a data directory.
pub const AUDIT_LOG_FILE: &str = "audit.log";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuorum {
    /// M for every sensitive operation (default 1: no quorum).
    approvals_required: Option<u32>,
    /// Per-operation overrides.
    #[serde(default)]
    operations: std::collections::BTreeMap<crate::store::approvals::SensitiveKind, u32>,
    /// How long a proposal stays open (default 24 h).
    expiry_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
    crl: Option<PathBuf>,
    crl_reload_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHsm {
    backend: String,
    endpoint: Option<String>,
    pin_env: Option<String>,
    pin_file: Option<PathBuf>,
    timeout_ms: Option<u64>,
    #[serde(default)]
    allow_insecure_simulator: bool,
    /// PKCS#11: the vendor's module.
    module: Option<PathBuf>,
    /// PKCS#11: the token, by label or by slot id.
    token_label: Option<String>,
    slot: Option<u64>,
    /// PKCS#11: the session pool size.
    sessions: Option<usize>,
    /// Refused with a clear message: the PIN never goes in the file.
    pin: Option<toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoles {
    #[serde(default)]
    operator: Vec<String>,
    #[serde(default)]
    service: Vec<String>,
    #[serde(default)]
    auditor: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    keys: Option<usize>,
    versions: Option<usize>,
}

/// Where the TLS files are.
#[derive(Clone, Debug)]
pub struct TlsPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    /// The client certificate revocation list, if any: read when the
    /// server starts (a CRL that does not load stops it) and re-read on
    /// SIGHUP and when the file changes.
    pub crl: Option<PathBuf>,
    /// How often the CRL file's modification time is checked.
    pub crl_reload_interval: Duration,
}

impl TlsPaths {
    /// Reads the three PEM files, with a clear error for each. The CRL is
    /// read when the server prepares its TLS configuration.
    pub fn load(&self) -> anyhow::Result<crate::grpc::ServerTls> {
        let read = |p: &Path, what: &str| {
            std::fs::read(p).with_context(|| format!("reading the {what} {}", p.display()))
        };
        Ok(crate::grpc::ServerTls {
            cert_pem: read(&self.cert, "server certificate")?,
            key_pem: Zeroizing::new(read(&self.key, "server key")?),
            client_ca_pem: read(&self.client_ca, "client CA certificate")?,
            crl: self.crl.clone(),
            crl_reload_interval: self.crl_reload_interval,
        })
    }
}

/// A PIN, read from an environment variable or a file; never from the
/// configuration file itself.
pub struct Pin(pub Zeroizing<String>);

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pin(<redacted>)")
    }
}

#[derive(Clone, Debug)]
pub enum PinSource {
    Env(String),
    File(PathBuf),
}

impl PinSource {
    pub fn read(&self) -> anyhow::Result<Pin> {
        let pin =
            match self {
                PinSource::Env(var) => Zeroizing::new(std::env::var(var).with_context(|| {
                    format!("the HSM PIN environment variable {var} is not set")
                })?),
                PinSource::File(path) => {
                    let mut pin =
                        Zeroizing::new(std::fs::read_to_string(path).with_context(|| {
                            format!("reading the HSM PIN file {}", path.display())
                        })?);
                    let len = pin.trim_end_matches(['\n', '\r']).len();
                    pin.truncate(len);
                    pin
                }
            };
        if pin.is_empty() {
            bail!("the HSM PIN is empty");
        }
        Ok(Pin(pin))
    }
}

/// Default size of the PKCS#11 session pool: a call in flight per session.
pub const DEFAULT_HSM_SESSIONS: usize = 8;
/// Largest PKCS#11 session pool accepted.
pub const MAX_HSM_SESSIONS: usize = 1024;

#[derive(Clone, Debug)]
pub enum HsmConfig {
    /// A separate `hsm-sim serve` process.
    Simulator {
        endpoint: String,
        pin: PinSource,
        timeout: Duration,
    },
    /// A PKCS#11 module (a real HSM; SoftHSM2 in tests).
    Pkcs11 {
        module: PathBuf,
        token: TokenSelector,
        pin: PinSource,
        sessions: usize,
        timeout: Duration,
    },
}

/// A validated server configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    /// Where to serve Prometheus metrics (plain HTTP), if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    pub data_dir: PathBuf,
    pub tls: TlsPaths,
    pub hsm: HsmConfig,
    pub roles: HashMap<String, Role>,
    pub options: KmsOptions,
    /// The operator explicitly accepted an HSM backend that says it is not
    /// secure (the simulator). Checked against `Hsm::is_secure` at start.
    pub allow_insecure_hsm: bool,
    pub scheduler_interval: Duration,
    pub attributes: HashMap<String, std::collections::BTreeMap<String, String>>,
    pub audit: AuditConfig,
    /// `allow_root = true`: run even as root (see `crate::hardening`).
    pub allow_root: bool,
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the configuration {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in the configuration {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let raw: RawConfig = toml::from_str(text)?;
        let listen = raw
            .listen
            .as_deref()
            .unwrap_or(DEFAULT_LISTEN)
            .parse()
            .context("listen must be an address such as 127.0.0.1:7443")?;

        let hsm = match raw.hsm.backend.as_str() {
            "simulator" => {
                if !raw.hsm.allow_insecure_simulator {
                    bail!(
                        "the simulated HSM is not secure: it keeps its root key in a file. \
                         Set hsm.allow_insecure_simulator = true to use it anyway (tests, demos)"
                    );
                }
                let endpoint = raw
                    .hsm
                    .endpoint
                    .clone()
                    .context("hsm.endpoint is required for the simulator backend")?;
                check_loopback(&endpoint)?;
                for (set, name) in [
                    (raw.hsm.module.is_some(), "module"),
                    (raw.hsm.token_label.is_some(), "token_label"),
                    (raw.hsm.slot.is_some(), "slot"),
                    (raw.hsm.sessions.is_some(), "sessions"),
                ] {
                    if set {
                        bail!("hsm.{name} is for the pkcs11 backend, not the simulator");
                    }
                }
                HsmConfig::Simulator {
                    endpoint,
                    pin: pin_source(&raw.hsm)?,
                    timeout: hsm_timeout(&raw.hsm)?,
                }
            }
            "pkcs11" => {
                if raw.hsm.endpoint.is_some() {
                    bail!("hsm.endpoint is for the simulator; the pkcs11 backend takes hsm.module");
                }
                if raw.hsm.allow_insecure_simulator {
                    bail!("hsm.allow_insecure_simulator is for the simulator backend");
                }
                let module = raw.hsm.module.clone().context(
                    "hsm.module (the vendor's PKCS#11 library) is required for the pkcs11 backend",
                )?;
                let token = match (raw.hsm.token_label.clone(), raw.hsm.slot) {
                    (Some(label), None) if !label.is_empty() => TokenSelector::Label(label),
                    (None, Some(slot)) => TokenSelector::Slot(slot),
                    (None, None) | (Some(_), None) => {
                        bail!("the pkcs11 backend needs hsm.token_label or hsm.slot")
                    }
                    (Some(_), Some(_)) => bail!("set hsm.token_label or hsm.slot, not both"),
                };
                let sessions = raw.hsm.sessions.unwrap_or(DEFAULT_HSM_SESSIONS);
                if !(1..=MAX_HSM_SESSIONS).contains(&sessions) {
                    bail!("hsm.sessions must be 1..={MAX_HSM_SESSIONS}");
                }
                HsmConfig::Pkcs11 {
                    module,
                    token,
                    pin: pin_source(&raw.hsm)?,
                    sessions,
                    timeout: hsm_timeout(&raw.hsm)?,
                }
            }
            other => bail!("unknown hsm.backend {other:?} (supported: \"pkcs11\", \"simulator\")"),
        };

        let mut roles = HashMap::new();
        for (role, principals) in [
            (Role::Operator, raw.roles.operator),
            (Role::Service, raw.roles.service),
            (Role::Auditor, raw.roles.auditor),
        ] {
            for p in principals {
                if p.is_empty() {
                    bail!("an empty principal in roles.{role}");
                }
                if let Some(previous) = roles.insert(p.clone(), role) {
                    bail!("principal {p:?} has two roles ({previous} and {role}): give it one");
                }
            }
        }

        let operators = roles.values().filter(|r| **r == Role::Operator).count();
        let quorum = quorum_options(raw.quorum)?;
        if let Some(m) = quorum.approvals_required.values().max() {
            if usize::try_from(*m).unwrap_or(usize::MAX) > operators.max(1) {
                bail!(
                    "quorum: {m} approvals are required but only {operators} operators are configured: \
                     the operations could never be approved"
                );
            }
        }
        let defaults = KmsOptions::default();
        for (who, limit) in raw
            .rate_limits
            .default
            .iter()
            .map(|l| ("default", l))
            .chain(
                raw.rate_limits
                    .principals
                    .iter()
                    .map(|(p, l)| (p.as_str(), l)),
            )
        {
            limit
                .validate()
                .map_err(|e| anyhow::anyhow!("rate_limits ({who}): {e}"))?;
        }
        let default_policy = raw.default_key_policy.unwrap_or_default();
        default_policy
            .validate()
            .map_err(|e| anyhow::anyhow!("default_key_policy: {e}"))?;
        let options = KmsOptions {
            key_cache_capacity: raw.cache.keys.unwrap_or(defaults.key_cache_capacity).max(1),
            material_cache_capacity: raw
                .cache
                .versions
                .unwrap_or(defaults.material_cache_capacity)
                .max(1),
            default_policy,
            rate_limits: raw.rate_limits,
            quorum,
        };

        let crl_reload_interval = match (&raw.tls.crl, raw.tls.crl_reload_secs) {
            (_, Some(0)) => bail!("tls.crl_reload_secs must be positive"),
            (None, Some(_)) => bail!("tls.crl_reload_secs is set but tls.crl is not"),
            (_, Some(secs)) => Duration::from_secs(secs),
            (_, None) => crate::grpc::DEFAULT_CRL_RELOAD_INTERVAL,
        };

        let scheduler_interval = Duration::from_secs(raw.scheduler_interval_secs.unwrap_or(60));
        if scheduler_interval.is_zero() {
            bail!("scheduler_interval_secs must be positive");
        }
        raw.audit.auditor_options()?;
        if raw.audit.checkpoint_key == CheckpointKey::Hsm
            && !matches!(hsm, HsmConfig::Pkcs11 { .. })
        {
            bail!("audit.checkpoint_key = \"hsm\" needs hsm.backend = \"pkcs11\"");
        }
        let metrics_listen = raw
            .metrics_listen
            .map(|m| {
                m.parse::<SocketAddr>().with_context(|| {
                    format!("metrics_listen must be an address such as 127.0.0.1:9464, got {m:?}")
                })
            })
            .transpose()?;
        Ok(Config {
            allow_root: raw.allow_root,
            metrics_listen,
            audit: raw.audit,
            attributes: raw.attributes,
            scheduler_interval,
            allow_insecure_hsm: raw.hsm.allow_insecure_simulator,
            listen,
            data_dir: raw.data_dir,
            tls: TlsPaths {
                cert: raw.tls.cert,
                key: raw.tls.key,
                client_ca: raw.tls.client_ca,
                crl: raw.tls.crl,
                crl_reload_interval,
            },
            hsm,
            roles,
            options,
        })
    }
}

fn quorum_options(raw: RawQuorum) -> anyhow::Result<crate::service::QuorumOptions> {
    let base = raw.approvals_required.unwrap_or(1);
    let mut q = crate::service::QuorumOptions::uniform(base);
    for (kind, m) in raw.operations {
        q.approvals_required.insert(kind, m);
    }
    if q.approvals_required.values().any(|m| *m == 0 || *m > 16) {
        bail!("quorum: approvals_required must be 1 to 16");
    }
    if let Some(secs) = raw.expiry_secs {
        if secs < 60 {
            bail!("quorum.expiry_secs must be at least 60");
        }
        q.expiry = Duration::from_secs(secs);
    }
    Ok(q)
}

/// The simulator speaks plain TCP (PIN and CMK material in clear): it must
/// be on this host.
fn pin_source(hsm: &RawHsm) -> anyhow::Result<PinSource> {
    if hsm.pin.is_some() {
        bail!(
            "hsm.pin: the PIN never goes in the configuration file; \
             set hsm.pin_env (an environment variable) or hsm.pin_file (a file readable only by coffre)"
        );
    }
    Ok(match (&hsm.pin_env, &hsm.pin_file) {
        (Some(var), None) => PinSource::Env(var.clone()),
        (None, Some(file)) => PinSource::File(file.clone()),
        (None, None) => PinSource::Env("COFFRE_HSM_PIN".to_string()),
        (Some(_), Some(_)) => bail!("set hsm.pin_env or hsm.pin_file, not both"),
    })
}

fn hsm_timeout(hsm: &RawHsm) -> anyhow::Result<Duration> {
    let timeout = Duration::from_millis(hsm.timeout_ms.unwrap_or(2000));
    if timeout.is_zero() {
        bail!("hsm.timeout_ms must be positive");
    }
    Ok(timeout)
}

fn check_loopback(endpoint: &str) -> anyhow::Result<()> {
    let uri: tonic::transport::Uri = endpoint
        .parse()
        .with_context(|| format!("hsm.endpoint {endpoint:?} is not a URL"))?;
    let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        bail!(
            "hsm.endpoint {endpoint:?} is not on this host: the simulated HSM speaks plain TCP \
             and must be reached over loopback (127.0.0.1, ::1 or localhost)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const GOOD: &str = r#"
        data_dir = "/tmp/x"
        [tls]
        cert = "s.pem"
        key = "k.pem"
        client_ca = "ca.pem"
        [hsm]
        backend = "simulator"
        endpoint = "http://127.0.0.1:7444"
        allow_insecure_simulator = true
        [roles]
        operator = ["op"]
        service = ["svc"]
    "#;

    const PKCS11: &str = r#"
        data_dir = "/tmp/x"
        [tls]
        cert = "s.pem"
        key = "k.pem"
        client_ca = "ca.pem"
        [hsm]
        backend = "pkcs11"
        module = "/usr/lib/softhsm/libsofthsm2.so"
        token_label = "coffre"
        pin_file = "/etc/coffre/hsm.pin"
    "#;

    #[test]
    fn pkcs11_sections_are_checked() {
        let c = Config::parse(PKCS11).unwrap();
        match &c.hsm {
            HsmConfig::Pkcs11 {
                token,
                sessions,
                pin: PinSource::File(f),
                ..
            } => {
                assert_eq!(token, &TokenSelector::Label("coffre".into()));
                assert_eq!(*sessions, DEFAULT_HSM_SESSIONS);
                assert_eq!(f, Path::new("/etc/coffre/hsm.pin"));
            }
            other => panic!("{other:?}"),
        }
        let slot = PKCS11.replace("token_label = \"coffre\"", "slot = 3");
        assert!(matches!(
            Config::parse(&slot).unwrap().hsm,
            HsmConfig::Pkcs11 {
                token: TokenSelector::Slot(3),
                ..
            }
        ));
        let hsm_key = format!("{PKCS11}\n[audit]\ncheckpoint_key = \"hsm\"\n");
        assert_eq!(
            Config::parse(&hsm_key).unwrap().audit.checkpoint_key,
            CheckpointKey::Hsm
        );
        for (bad, why) in [
            (
                PKCS11.replace("module = \"/usr/lib/softhsm/libsofthsm2.so\"", ""),
                "hsm.module",
            ),
            (
                PKCS11.replace("token_label = \"coffre\"", ""),
                "token_label or hsm.slot",
            ),
            (
                PKCS11.replace(
                    "token_label = \"coffre\"",
                    "token_label = \"coffre\"\nslot = 1",
                ),
                "not both",
            ),
            (
                PKCS11.replace("pin_file = \"/etc/coffre/hsm.pin\"", "pin = \"1234\""),
                "never goes in the configuration",
            ),
            (format!("{PKCS11}\nsessions = 0"), "hsm.sessions"),
            (
                format!("{PKCS11}\nendpoint = \"http://127.0.0.1:1\""),
                "hsm.endpoint is for the simulator",
            ),
            (
                format!("{GOOD}\n[audit]\ncheckpoint_key = \"hsm\"\n"),
                "needs hsm.backend",
            ),
            (
                GOOD.replace(
                    "allow_insecure_simulator = true",
                    "allow_insecure_simulator = true\nmodule = \"/x.so\"",
                ),
                "for the pkcs11 backend",
            ),
        ] {
            let err = format!("{:#}", Config::parse(&bad).unwrap_err());
            assert!(err.contains(why), "expected {why:?} in {err:?}");
        }
    }

    #[test]
    fn parses_a_good_configuration() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.roles.get("op"), Some(&Role::Operator));
        assert_eq!(c.roles.get("svc"), Some(&Role::Service));
        assert!(
            matches!(c.hsm, HsmConfig::Simulator { pin: PinSource::Env(ref v), .. } if v == "COFFRE_HSM_PIN")
        );
    }

    #[test]
    fn refuses_the_simulator_unless_allowed() {
        let text = GOOD.replace("allow_insecure_simulator = true", "");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("not secure"), "{err}");
    }

    #[test]
    fn parses_attributes_and_a_default_policy() {
        let text = format!(
            "{GOOD}\n{}",
            r#"
[attributes."svc"]
tenant = "acme"

[default_key_policy]
grants = [{ principal = "svc", operations = ["GenerateDataKey", "Decrypt"] }]
accepted_reasons = ["CUSTOMER_INITIATED_ACCESS"]
[default_key_policy.required_context.tenant]
equals_caller_attribute = "tenant"
"#
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.attributes["svc"]["tenant"], "acme");
        let p = &c.options.default_policy;
        assert_eq!(p.grants.len(), 1);
        assert_eq!(p.grants[0].operations.len(), 2);
        assert_eq!(
            p.required_context["tenant"]
                .equals_caller_attribute
                .as_deref(),
            Some("tenant")
        );
        let bad = text.replace("\"Decrypt\"", "\"Destroy\"");
        assert!(Config::parse(&bad).is_err(), "unknown operation refused");
    }

    #[test]
    fn parses_rate_limits_and_refuses_bad_ones() {
        let text = format!(
            "{GOOD}\n{}",
            r#"
[rate_limits]
default = { per_second = 100, burst = 200 }
[rate_limits.principals."svc"]
per_second = 5
burst = 10
"#
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.options.rate_limits.principals["svc"].burst, 10.0);
        let bad = text.replace("burst = 10", "burst = 0");
        let err = format!("{:#}", Config::parse(&bad).unwrap_err());
        assert!(err.contains("rate_limits"), "{err}");
    }

    #[test]
    fn parses_quorum() {
        use crate::store::approvals::SensitiveKind;
        let text = format!(
            "{}\n{}",
            GOOD.replace(r#"operator = ["op"]"#, r#"operator = ["op", "op2", "op3"]"#),
            "[quorum]\napprovals_required = 2\n[quorum.operations]\nScheduleKeyDeletion = 3\n"
        );
        let q = Config::parse(&text).unwrap().options.quorum;
        assert_eq!(q.required(SensitiveKind::ScheduleKeyDeletion), 3);
        assert_eq!(q.required(SensitiveKind::EnableKey), 2);
        assert!(Config::parse(&text.replace("= 3", "= 0")).is_err());
        let err = format!(
            "{:#}",
            Config::parse(&text.replace("= 3", "= 4")).unwrap_err()
        );
        assert!(
            err.contains("only 3 operators"),
            "an unreachable quorum: {err}"
        );
        assert_eq!(
            Config::parse(GOOD)
                .unwrap()
                .options
                .quorum
                .required(SensitiveKind::RotateRootKey),
            1
        );
    }

    #[test]
    fn refuses_a_simulator_off_this_host() {
        for bad in ["http://10.0.0.5:7444", "http://hsm.example:7444"] {
            let text = GOOD.replace("http://127.0.0.1:7444", bad);
            let err = format!("{:#}", Config::parse(&text).unwrap_err());
            assert!(err.contains("loopback"), "{err}");
        }
        let text = GOOD.replace("http://127.0.0.1:7444", "http://[::1]:7444");
        assert!(Config::parse(&text).is_ok());
    }

    #[test]
    fn reads_the_crl_settings() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.tls.crl, None);
        let text = GOOD.replace(
            r#"client_ca = "ca.pem""#,
            "client_ca = \"ca.pem\"\ncrl = \"clients.crl\"\ncrl_reload_secs = 3",
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.tls.crl.as_deref(), Some(Path::new("clients.crl")));
        assert_eq!(c.tls.crl_reload_interval, Duration::from_secs(3));

        for bad in [
            "crl_reload_secs = 3",
            "crl = \"x.crl\"\ncrl_reload_secs = 0",
        ] {
            let text = GOOD.replace(
                r#"client_ca = "ca.pem""#,
                &format!("client_ca = \"ca.pem\"\n{bad}"),
            );
            assert!(Config::parse(&text).is_err(), "{bad}");
        }
    }

    #[test]
    fn refuses_two_roles_and_unknown_fields() {
        let text = GOOD.replace(r#"service = ["svc"]"#, r#"service = ["op"]"#);
        assert!(
            Config::parse(&text)
                .unwrap_err()
                .to_string()
                .contains("two roles")
        );
        let text = format!("{GOOD}\n[extra]\nx = 1\n");
        assert!(Config::parse(&text).is_err());
    }
}
