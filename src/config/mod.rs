//! The server configuration of `coffre serve --config FILE` (TOML), parsed
//! once into validated values.
//!
//! - `raw.rs`: the file as serde reads it (`Raw*` structs, no logic).
//! - this file: [`Config`], [`Config::load`], and [`Config::parse`], which
//!   hands each section to its validator; roles, caches, quorum, rate
//!   limits (with `coffre serve`'s defaults) and `[limits]` are checked here.
//! - `hsm.rs`: `[hsm]` into [`HsmConfig`], with the [`PinSource`] and the
//!   [`Pin`] it yields.
//! - `audit.rs`: `[audit]` into [`AuditConfig`], the audit trail's options.
//! - `tls.rs`: `[tls]` into [`TlsPaths`].
//! - `xks.rs`: `[xks]` into [`XksConfig`].
//! - `store.rs`: `[store]` and `[cluster]` into [`StoreConfig`] and
//!   [`ClusterConfig`] (sled, or PostgreSQL shared by several nodes).
//!
//! ```toml
//! listen = "0.0.0.0:7443"
//! metrics_listen = "127.0.0.1:9464"     # optional: Prometheus, plain HTTP; also the
//!                                       # probes GET /healthz and /readyz
//! data_dir = "/var/lib/coffre"          # sled store in DATA_DIR/store
//! scheduler_interval_secs = 60           # automatic rotation, destruction
//! allow_root = false                     # refuse to run as root (default)
//! allow_single_operator = false          # refuse to serve without a two-person
//!                                        # rule (default; see [quorum])
//!
//! [tls]                                  # mTLS is always on
//! cert = "/etc/coffre/server.pem"
//! key = "/etc/coffre/server-key.pem"
//! operator_ca = "/etc/coffre/operators-ca.pem"  # a CA per role: its certificates
//! service_ca = "/etc/coffre/services-ca.pem"    # may act in that role only (every
//! auditor_ca = "/etc/coffre/auditors-ca.pem"    # role with principals needs one)
//! # client_ca = "…"                      # one CA for every role: refused unless
//! # allow_shared_client_ca = true        # (which also accepts overlapping role CAs)
//! crl = "/etc/coffre/clients.crl"        # optional: PEM or DER; re-read on
//!                                        # SIGHUP and when its mtime changes
//! crl_reload_secs = 10                   # optional: how often to check the CRL
//! crl_grace_secs = 0                     # optional: accepted past nextUpdate (max a week)
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
//! [roles]                                # principal → role; deny by default; a URI
//!                                        # (scheme:…) or a plain name without ':'
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
//! [rate_limits]                          # token buckets, charged first (before any field
//!                                        # is read); the values shown are the defaults
//! default = { per_second = 2000, burst = 4000 }       # every principal without its own
//! batch = { per_second = 2000, burst = 4000 }         # batch items, per principal, on top
//!                                        # of its bucket (a batch of N costs N in both)
//! unauthenticated = { per_second = 50, burst = 100 }  # one bucket for every certificate
//!                                        # that names no principal
//! [rate_limits.principals."spiffe://provider.example/batch"]
//! per_second = 100
//! burst = 200
//! # or, for development and benchmarks only: [rate_limits] enabled = false
//! # (every limit off, as in `coffre dev`; nothing else may be set with it)
//!
//! [limits]                               # the listener, all optional (defaults shown)
//! handshake_timeout_ms = 3000            # a TLS handshake not done by then is dropped
//! client_hello_timeout_ms = 1000         # nor a ClientHello not received by then
//! max_handshakes = 256                   # pending in all; beyond, the oldest is dropped
//! max_handshakes_per_ip = 8              # pending per source address; likewise
//! max_concurrent_streams = 128           # HTTP/2 streams per connection
//! max_requests_per_connection = 64       # served at once per connection (others wait)
//! request_timeout_ms = 30000             # up to the response headers
//! keepalive_interval_secs = 30           # HTTP/2 pings on idle connections, and how
//! keepalive_timeout_secs = 10            # long an answer may take before closing
//! max_message_bytes = 16777216           # largest message sent or accepted (>= 256 KiB)
//! audit_min_free_bytes = 1073741824      # warn (log once a minute, and the metric
//! audit_min_free_percent = 10            # coffre_audit_volume_free_bytes) below either;
//!                                        # not ready (/readyz 503, health NOT_SERVING) below both
//!
//! [quorum]                               # M-of-N approvals for sensitive operations;
//!                                        # required (M ≥ 2 for every operation) unless
//!                                        # allow_single_operator = true
//! approvals_required = 2                 # ScheduleKeyDeletion, CancelKeyDeletion, EnableKey,
//! expiry_secs = 86400                    # UpdateKeyPolicy, RetireKeyVersions, RotateRootKey
//! [quorum.operations]
//! ScheduleKeyDeletion = 3                # per-operation override
//!
//! [audit]                                # all optional
//! checkpoint_key = "hsm"                 # checkpoints signed in the PKCS#11 token
//! retention_days = 400                   # the default: prune older records
//!
//! [cache]
//! keys = 100000
//! versions = 100000
//!
//! [store]                                # optional: sled in DATA_DIR/store by default
//! backend = "postgres"                   # several nodes on one database (store.rs)
//! url_env = "COFFRE_DATABASE_URL"
//! [cluster]
//! node_id = "n1"
//!
//! [xks]                                  # optional: the AWS XKS proxy API (xks.rs)
//! listen = "0.0.0.0:8443"
//! cert = "/etc/coffre/xks.pem"
//! key = "/etc/coffre/xks-key.pem"
//! [[xks.credentials]]
//! access_key_id = "…"
//! secret_access_key_env = "COFFRE_XKS_SECRET"
//! principal = "aws-kms-eu-west-3"
//! ```

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::authz::Role;
use crate::service::{KmsOptions, QuorumOptions};

mod audit;
mod hsm;
mod raw;
mod store;
mod tls;
mod xks;
/// The API's forms of an XKS access key id and secret.
pub mod xks_rules {
    pub use super::xks::{valid_access_key_id, valid_secret};
}

pub use audit::AuditConfig;
pub use hsm::{DEFAULT_HSM_SESSIONS, HsmConfig, MAX_HSM_SESSIONS, Pin, PinSource, TokenSelector};
pub use raw::CheckpointKey;
pub use store::{
    ClusterConfig, ClusterMode, DEFAULT_POOL_SIZE, MAX_NODE_ID_LEN, MAX_POOL_SIZE, NodeId,
    PostgresConfig, StoreConfig, UrlSource,
};
pub use tls::{ClientCaPaths, MAX_CRL_GRACE, TlsPaths};
pub use xks::{SecretSource, XksConfig, XksCredentialConfig};

use raw::{RawCache, RawConfig, RawLimits, RawQuorum, RawRoles};

use crate::grpc::ServerLimits;
use crate::service::{RateLimit, RateLimits};

/// `coffre serve`'s rate limit for every principal without one of its own
/// (`[rate_limits] default`); `coffre dev` has none unless told.
pub const DEFAULT_RATE_LIMIT: RateLimit = RateLimit {
    per_second: 2000.0,
    burst: 4000.0,
};
/// Batch items per principal (`[rate_limits] batch`), on top of the
/// principal's own bucket (which a batch also charges one token per item).
pub const DEFAULT_BATCH_LIMIT: RateLimit = RateLimit {
    per_second: 2000.0,
    burst: 4000.0,
};
/// The one bucket of every certificate without a principal
/// (`[rate_limits] unauthenticated`).
pub const DEFAULT_UNAUTHENTICATED_LIMIT: RateLimit = RateLimit {
    per_second: 50.0,
    burst: 100.0,
};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7443";

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
    /// `hsm.allow_insecure_simulator`: the operator explicitly accepted an
    /// HSM backend that says it is not secure (the simulator). Checked
    /// against `Hsm::is_secure` at start.
    pub allow_insecure_simulator: bool,
    pub scheduler_interval: Duration,
    pub attributes: HashMap<String, BTreeMap<String, String>>,
    pub audit: AuditConfig,
    /// `allow_root = true`: run even as root (see `crate::hardening`).
    pub allow_root: bool,
    /// `[limits]`: the listener's bounds, the audit volume's alert.
    pub limits: ServerLimits,
    /// `allow_single_operator = true`: the operator accepted that one
    /// operator alone may run the sensitive operations. Without it, a
    /// configuration whose quorum lets any of them run on one approval is
    /// refused.
    pub allow_single_operator: bool,
    /// `[store]`: where the records are kept.
    pub store: StoreConfig,
    /// `[cluster]`: set exactly when the store is PostgreSQL.
    pub cluster: Option<ClusterConfig>,
    /// `[xks]`: the AWS XKS proxy API front, if on.
    pub xks: Option<XksConfig>,
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
        let hsm = hsm::validate(&raw.hsm)?;
        let roles = roles(raw.roles)?;
        let options = kms_options(
            raw.cache,
            raw.default_key_policy,
            raw.rate_limits,
            raw.quorum,
            &roles,
        )?;
        require_two_person_rule(&options.quorum, raw.allow_single_operator)?;
        let tls = tls::validate(raw.tls, &roles)?;
        let scheduler_interval = Duration::from_secs(raw.scheduler_interval_secs.unwrap_or(60));
        if scheduler_interval.is_zero() {
            bail!("scheduler_interval_secs must be positive");
        }
        let audit = audit::validate(raw.audit, &hsm)?;
        let limits = limits(raw.limits)?;
        let (store, cluster) = store::validate(raw.store, raw.cluster)?;
        let xks = raw.xks.map(|x| xks::validate(x, &roles)).transpose()?;
        let metrics_listen = raw
            .metrics_listen
            .map(|m| {
                m.parse::<SocketAddr>().with_context(|| {
                    format!("metrics_listen must be an address such as 127.0.0.1:9464, got {m:?}")
                })
            })
            .transpose()?;
        Ok(Config {
            listen,
            metrics_listen,
            data_dir: raw.data_dir,
            tls,
            hsm,
            roles,
            options,
            allow_insecure_simulator: raw.hsm.allow_insecure_simulator,
            scheduler_interval,
            attributes: raw.attributes,
            audit,
            allow_root: raw.allow_root,
            limits,
            allow_single_operator: raw.allow_single_operator,
            store,
            cluster,
            xks,
        })
    }
}

/// `[roles]`: one role per principal.
fn roles(raw: RawRoles) -> anyhow::Result<HashMap<String, Role>> {
    let mut roles = HashMap::new();
    for (role, principals) in [
        (Role::Operator, raw.operator),
        (Role::Service, raw.service),
        (Role::Auditor, raw.auditor),
    ] {
        for p in principals {
            if p.is_empty() {
                bail!("an empty principal in roles.{role}");
            }
            check_principal_name(&p).with_context(|| format!("in roles.{role}"))?;
            if let Some(previous) = roles.insert(p.clone(), role) {
                bail!("principal {p:?} has two roles ({previous} and {role}): give it one");
            }
        }
    }
    Ok(roles)
}

/// A `[roles]` entry is a URI (`scheme:…`, as a URI SAN gives it) or a
/// plain name without `:` (as a CN gives it), so that a certificate's CN
/// can never equal a URI principal.
fn check_principal_name(p: &str) -> anyhow::Result<()> {
    if p.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bail!("principal {p:?} contains a space or a control character");
    }
    let Some((scheme, rest)) = p.split_once(':') else {
        return Ok(());
    };
    let mut chars = scheme.chars();
    let scheme_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !scheme_ok || rest.is_empty() {
        bail!(
            "principal {p:?} is neither a URI (scheme:…, e.g. spiffe://operator.example/alice) nor a plain name without ':'"
        );
    }
    Ok(())
}

/// `[rate_limits]`: what is unset gets `coffre serve`'s defaults, unless
/// `enabled = false` turns every limit off (then none may be set).
fn rate_limits_of(raw: raw::RawRateLimits) -> anyhow::Result<RateLimits> {
    if raw.enabled == Some(false) {
        let set = [
            raw.default.is_some().then_some("default"),
            raw.unauthenticated.is_some().then_some("unauthenticated"),
            raw.batch.is_some().then_some("batch"),
            (!raw.principals.is_empty()).then_some("principals"),
        ];
        let set: Vec<&str> = set.into_iter().flatten().collect();
        if !set.is_empty() {
            bail!(
                "rate_limits: enabled = false turns every limit off, yet {} is set; \
                 remove one or the other",
                set.join(", ")
            );
        }
        return Ok(RateLimits::default());
    }
    Ok(RateLimits {
        default: raw.default.or(Some(DEFAULT_RATE_LIMIT)),
        unauthenticated: raw.unauthenticated.or(Some(DEFAULT_UNAUTHENTICATED_LIMIT)),
        batch: raw.batch.or(Some(DEFAULT_BATCH_LIMIT)),
        principals: raw.principals,
    })
}

/// `[cache]`, `[default_key_policy]`, `[rate_limits]` and `[quorum]`: the
/// core's options. A quorum needs as many operators as it requires.
fn kms_options(
    cache: RawCache,
    default_key_policy: Option<crate::model::KeyPolicy>,
    rate_limits: raw::RawRateLimits,
    quorum: RawQuorum,
    roles: &HashMap<String, Role>,
) -> anyhow::Result<KmsOptions> {
    let operators = roles.values().filter(|r| **r == Role::Operator).count();
    let quorum = quorum_options(quorum)?;
    if let Some(m) = quorum.approvals_required.values().max() {
        if usize::try_from(*m).unwrap_or(usize::MAX) > operators.max(1) {
            bail!(
                "quorum: {m} approvals are required but only {operators} operators are configured: \
                 the operations could never be approved"
            );
        }
    }
    let rate_limits = rate_limits_of(rate_limits)?;
    for (who, limit) in rate_limits.all() {
        limit
            .validate()
            .map_err(|e| anyhow::anyhow!("rate_limits ({who}): {e}"))?;
    }
    let default_policy = default_key_policy.unwrap_or_default();
    default_policy
        .validate()
        .map_err(|e| anyhow::anyhow!("default_key_policy: {e}"))?;
    let defaults = KmsOptions::default();
    Ok(KmsOptions {
        key_cache_capacity: cache.keys.unwrap_or(defaults.key_cache_capacity).max(1),
        material_cache_capacity: cache
            .versions
            .unwrap_or(defaults.material_cache_capacity)
            .max(1),
        default_policy,
        rate_limits,
        quorum,
    })
}

/// `[limits]`: each key positive; the defaults of [`ServerLimits`] for
/// what is unset.
fn limits(raw: RawLimits) -> anyhow::Result<ServerLimits> {
    fn positive<T: PartialOrd + Default + Copy>(
        name: &str,
        v: Option<T>,
        d: T,
    ) -> anyhow::Result<T> {
        match v {
            Some(v) if v <= T::default() => bail!("limits.{name} must be positive"),
            Some(v) => Ok(v),
            None => Ok(d),
        }
    }
    fn duration(
        name: &str,
        v: Option<u64>,
        unit: fn(u64) -> Duration,
        d: Duration,
    ) -> anyhow::Result<Duration> {
        match v {
            Some(0) => bail!("limits.{name} must be positive"),
            Some(v) => Ok(unit(v)),
            None => Ok(d),
        }
    }
    let ms: fn(u64) -> Duration = Duration::from_millis;
    let secs: fn(u64) -> Duration = Duration::from_secs;
    let d = ServerLimits::default();
    let limits = ServerLimits {
        handshake_timeout: duration(
            "handshake_timeout_ms",
            raw.handshake_timeout_ms,
            ms,
            d.handshake_timeout,
        )?,
        client_hello_timeout: duration(
            "client_hello_timeout_ms",
            raw.client_hello_timeout_ms,
            ms,
            d.client_hello_timeout,
        )?,
        max_handshakes: positive("max_handshakes", raw.max_handshakes, d.max_handshakes)?,
        max_handshakes_per_ip: positive(
            "max_handshakes_per_ip",
            raw.max_handshakes_per_ip,
            d.max_handshakes_per_ip,
        )?,
        max_concurrent_streams: positive(
            "max_concurrent_streams",
            raw.max_concurrent_streams,
            d.max_concurrent_streams,
        )?,
        max_requests_per_connection: positive(
            "max_requests_per_connection",
            raw.max_requests_per_connection,
            d.max_requests_per_connection,
        )?,
        request_timeout: duration(
            "request_timeout_ms",
            raw.request_timeout_ms,
            ms,
            d.request_timeout,
        )?,
        keepalive_interval: duration(
            "keepalive_interval_secs",
            raw.keepalive_interval_secs,
            secs,
            d.keepalive_interval,
        )?,
        keepalive_timeout: duration(
            "keepalive_timeout_secs",
            raw.keepalive_timeout_secs,
            secs,
            d.keepalive_timeout,
        )?,
        max_message_bytes: positive(
            "max_message_bytes",
            raw.max_message_bytes,
            d.max_message_bytes,
        )?,
        audit_min_free_bytes: raw.audit_min_free_bytes.unwrap_or(d.audit_min_free_bytes),
        audit_min_free_percent: raw
            .audit_min_free_percent
            .unwrap_or(d.audit_min_free_percent),
    };
    if limits.handshake_timeout > Duration::from_secs(60) {
        bail!("limits.handshake_timeout_ms must be at most 60000");
    }
    if limits.client_hello_timeout > limits.handshake_timeout {
        bail!("limits.client_hello_timeout_ms must not exceed limits.handshake_timeout_ms");
    }
    if limits.max_handshakes_per_ip > limits.max_handshakes {
        bail!("limits.max_handshakes_per_ip must not exceed limits.max_handshakes");
    }
    if limits.max_message_bytes < MIN_MESSAGE_BYTES {
        bail!(
            "limits.max_message_bytes must be at least {MIN_MESSAGE_BYTES} (a key's policy alone may take {} bytes)",
            crate::model::MAX_POLICY_BYTES
        );
    }
    if limits.audit_min_free_percent > 100 {
        bail!("limits.audit_min_free_percent must be 0 to 100");
    }
    Ok(limits)
}

/// The smallest `limits.max_message_bytes`: room for a few keys at their
/// largest policy.
const MIN_MESSAGE_BYTES: usize = 4 * crate::model::MAX_POLICY_BYTES;

/// The two-person rule is the default of `coffre serve`: a quorum that lets
/// one operator alone run a sensitive operation (re-grant any key to any
/// principal, schedule a deletion, rotate the root key) is refused unless
/// the configuration says `allow_single_operator = true`.
fn require_two_person_rule(quorum: &QuorumOptions, allowed: bool) -> anyhow::Result<()> {
    use crate::store::approvals::SensitiveKind;
    let alone: Vec<String> = SensitiveKind::ALL
        .into_iter()
        .filter(|k| quorum.required(*k) < 2)
        .map(|k| format!("{k:?}"))
        .collect();
    if alone.is_empty() {
        return Ok(());
    }
    if !allowed {
        bail!(
            "one operator alone could run {}: set [quorum] approvals_required = 2 (or more, with \
             as many operators in [roles]) for a two-person rule, or set \
             allow_single_operator = true to accept a single operator",
            alone.join(", ")
        );
    }
    tracing::warn!(
        operations = %alone.join(", "),
        "one operator alone may run sensitive operations (allow_single_operator = true)"
    );
    Ok(())
}

fn quorum_options(raw: RawQuorum) -> anyhow::Result<QuorumOptions> {
    let base = raw.approvals_required.unwrap_or(1);
    let mut q = QuorumOptions::uniform(base);
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const GOOD: &str = r#"
        data_dir = "/tmp/x"
        allow_single_operator = true
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
        allow_single_operator = true
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
    fn rate_limits_can_be_turned_off_but_not_half_way() {
        let off = format!("{GOOD}\n[rate_limits]\nenabled = false\n");
        let c = Config::parse(&off).unwrap();
        assert_eq!(c.options.rate_limits, RateLimits::default());
        assert_eq!(c.options.rate_limits.all().count(), 0);
        let on = format!("{GOOD}\n[rate_limits]\nenabled = true\n");
        let c = Config::parse(&on).unwrap();
        assert_eq!(c.options.rate_limits.default, Some(DEFAULT_RATE_LIMIT));
        let both = format!(
            "{GOOD}\n[rate_limits]\nenabled = false\nbatch = {{ per_second = 1, burst = 1 }}\n"
        );
        let err = format!("{:#}", Config::parse(&both).unwrap_err());
        assert!(
            err.contains("enabled = false") && err.contains("batch"),
            "{err}"
        );
    }

    #[test]
    fn serve_has_default_limits_and_retention() {
        let c = Config::parse(GOOD).unwrap();
        let limits = &c.options.rate_limits;
        assert_eq!(limits.default, Some(DEFAULT_RATE_LIMIT));
        assert_eq!(limits.batch, Some(DEFAULT_BATCH_LIMIT));
        assert_eq!(limits.unauthenticated, Some(DEFAULT_UNAUTHENTICATED_LIMIT));
        assert_eq!(
            c.audit.trail.retention,
            Some(Duration::from_secs(
                u64::from(audit::DEFAULT_RETENTION_DAYS) * 86_400
            ))
        );
        assert_eq!(c.limits, ServerLimits::default());
        // What the file says wins.
        let text = format!(
            "{GOOD}\n{}",
            r#"
[rate_limits]
batch = { per_second = 10, burst = 1000 }
unauthenticated = { per_second = 1, burst = 1 }
"#
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.options.rate_limits.batch.unwrap().burst, 1000.0);
        assert_eq!(c.options.rate_limits.unauthenticated.unwrap().burst, 1.0);
        assert_eq!(c.options.rate_limits.default, Some(DEFAULT_RATE_LIMIT));
    }

    #[test]
    fn parses_limits_and_refuses_bad_ones() {
        let text = format!(
            "{GOOD}\n{}",
            r#"
[limits]
handshake_timeout_ms = 2000
client_hello_timeout_ms = 500
max_handshakes = 512
max_handshakes_per_ip = 4
max_concurrent_streams = 64
max_requests_per_connection = 32
request_timeout_ms = 10000
keepalive_interval_secs = 20
keepalive_timeout_secs = 5
max_message_bytes = 8388608
audit_min_free_bytes = 2147483648
audit_min_free_percent = 5
"#
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(
            c.limits,
            ServerLimits {
                handshake_timeout: Duration::from_secs(2),
                client_hello_timeout: Duration::from_millis(500),
                max_handshakes: 512,
                max_handshakes_per_ip: 4,
                max_concurrent_streams: 64,
                max_requests_per_connection: 32,
                request_timeout: Duration::from_secs(10),
                keepalive_interval: Duration::from_secs(20),
                keepalive_timeout: Duration::from_secs(5),
                max_message_bytes: 8 * 1024 * 1024,
                audit_min_free_bytes: 2 * 1024 * 1024 * 1024,
                audit_min_free_percent: 5,
            }
        );
        for (from, to) in [
            ("handshake_timeout_ms = 2000", "handshake_timeout_ms = 0"),
            (
                "handshake_timeout_ms = 2000",
                "handshake_timeout_ms = 90000",
            ),
            ("max_handshakes = 512", "max_handshakes = 2"),
            (
                "client_hello_timeout_ms = 500",
                "client_hello_timeout_ms = 2500",
            ),
            ("max_concurrent_streams = 64", "max_concurrent_streams = 0"),
            ("max_message_bytes = 8388608", "max_message_bytes = 1024"),
            ("audit_min_free_percent = 5", "audit_min_free_percent = 101"),
            ("keepalive_timeout_secs = 5", "keepalive_timeout = 5"),
        ] {
            let bad = text.replace(from, to);
            let err = format!("{:#}", Config::parse(&bad).unwrap_err());
            assert!(
                err.contains("limits") || err.contains("unknown field"),
                "{to}: {err}"
            );
        }
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
        // RetireKeyVersions is sensitive: under the base M, and named too.
        assert_eq!(q.required(SensitiveKind::RetireKeyVersions), 2);
        let retire = text.replace("ScheduleKeyDeletion = 3", "RetireKeyVersions = 3");
        let q = Config::parse(&retire).unwrap().options.quorum;
        assert_eq!(q.required(SensitiveKind::RetireKeyVersions), 3);
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
    fn a_single_operator_is_refused_unless_allowed() {
        let strict = GOOD
            .replace("allow_single_operator = true\n", "")
            .replace(r#"operator = ["op"]"#, r#"operator = ["op", "op2"]"#);
        assert!(!strict.contains("allow_single_operator"));
        // No [quorum], a quorum of one, or one operation left to one operator.
        for quorum in [
            "",
            "[quorum]\napprovals_required = 1\n",
            "[quorum]\napprovals_required = 2\n[quorum.operations]\nRotateRootKey = 1\n",
        ] {
            let text = format!("{strict}\n{quorum}");
            let err = format!("{:#}", Config::parse(&text).unwrap_err());
            assert!(
                err.contains("approvals_required = 2")
                    && err.contains("allow_single_operator = true"),
                "both ways out named: {err}"
            );
            assert!(err.contains("RotateRootKey"), "{err}");
            let allowed = format!("allow_single_operator = true\n{text}");
            let c = Config::parse(&allowed).unwrap();
            assert!(c.allow_single_operator);
        }
        // A two-person rule for every operation needs no flag.
        let text = format!("{strict}\n[quorum]\napprovals_required = 2\n");
        let c = Config::parse(&text).unwrap();
        assert!(!c.allow_single_operator);
        assert_eq!(
            c.options
                .quorum
                .required(crate::store::approvals::SensitiveKind::UpdateKeyPolicy),
            2
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

    #[test]
    fn audit_is_validated_once_into_the_trails_options() {
        use crate::audit::{ClearContext, Durability};
        let defaults = Config::parse(GOOD).unwrap().audit;
        // `coffre serve` prunes by default (AuditConfig::default, which
        // `coffre dev` starts from, keeps everything).
        let mut expected = AuditConfig::default();
        expected.trail.retention = Some(Duration::from_secs(
            u64::from(audit::DEFAULT_RETENTION_DAYS) * 86_400,
        ));
        assert_eq!(
            format!("{defaults:?}"),
            format!("{expected:?}"),
            "no [audit] section: the defaults"
        );
        assert_eq!(
            defaults.path_in(Path::new("/d")),
            Path::new("/d").join(crate::server::AUDIT_LOG_FILE)
        );
        let text = format!(
            "{GOOD}\n{}",
            r#"
[audit]
path = "/var/log/coffre-audit.log"
durability = "fsync"
checkpoint_every_records = 5
checkpoint_every_secs = 7
retention_days = 2
clear_context_keys = ["tenant"]
"#
        );
        let a = Config::parse(&text).unwrap().audit;
        assert_eq!(
            a.path_in(Path::new("/d")),
            Path::new("/var/log/coffre-audit.log")
        );
        assert_eq!(a.checkpoint_key, CheckpointKey::Software);
        assert_eq!(a.trail.log.durability, Durability::Fsync);
        assert_eq!(a.trail.log.checkpoints.every_records, 5);
        assert_eq!(a.trail.log.checkpoints.every, Duration::from_secs(7));
        assert_eq!(a.trail.retention, Some(Duration::from_secs(2 * 86_400)));
        assert_eq!(
            a.trail.clear_context,
            ClearContext::Keys(["tenant".to_string()].into())
        );
        assert!(!a.trail.discard, "no file can turn the log off");
        let all = text.replace(r#"["tenant"]"#, r#"["tenant", "*"]"#);
        assert_eq!(
            Config::parse(&all).unwrap().audit.trail.clear_context,
            ClearContext::All
        );
        for (bad, why) in [
            (
                "checkpoint_every_records = 5",
                "checkpoint_every_records = 0",
            ),
            ("checkpoint_every_secs = 7", "checkpoint_every_secs = 0"),
            ("retention_days = 2", "retention_days = 0"),
        ] {
            let err = format!("{:#}", Config::parse(&text.replace(bad, why)).unwrap_err());
            assert!(err.contains("at least 1"), "{why}: {err}");
        }
        let dev = AuditConfig::dev(Durability::Fsync, true);
        assert_eq!(dev.trail.log.durability, Durability::Fsync);
        assert!(dev.trail.discard);
        assert_eq!(dev.path, None);
    }
}
