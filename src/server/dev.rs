//! `coffre dev`: everything on one machine, in one [`DataDir`]: the dev
//! PKI, an in-process simulated HSM whose state and PIN persist there, the
//! sled store, the approvals and the audit log. Restarting on the same
//! directory keeps every key.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use zeroize::Zeroizing;

use super::{AuditSetup, DataDir, RunningServer, ServerBuilder};
use crate::audit::AuditEntry;
use crate::authz::{Caller, Role, StaticRoles};
use crate::config::AuditConfig;
use crate::hsm::sim::LocalSimHsm;
use crate::pki;
use crate::service::{CreateKeyInput, KmsOptions, QuorumOptions};

/// What `coffre dev` is started with.
#[derive(Clone, Debug)]
pub struct DevOptions {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub options: KmsOptions,
    /// How often the scheduler looks for due rotations and destructions
    /// (`None`: never, for tests that drive it themselves).
    pub scheduler_interval: Option<Duration>,
    /// M operators and M-of-N approvals for sensitive operations (1: none).
    pub quorum: u32,
    /// A client certificate revocation list to honour (none by default).
    pub crl: Option<PathBuf>,
    /// How often the CRL file is checked for changes.
    pub crl_reload_interval: Duration,
    /// The audit log (`DIR/audit.log`; its public key in
    /// `DIR/audit-public-key.pem`).
    pub audit: AuditConfig,
    /// Where to serve Prometheus metrics (none by default).
    pub metrics_listen: Option<SocketAddr>,
    /// Keys to create for the dev operator before the banner (benchmarks).
    pub preload_keys: u64,
    /// Start once on an audit log behind the store's high-water mark,
    /// recording the loss (`--accept-audit-log-loss`).
    pub accept_audit_log_loss: bool,
    /// `--attribute`: attributes of dev principals, for policies that bind
    /// a context value to the caller (`equals_caller_attribute`). The dev
    /// `service` has `tenant=acme` unless one of these sets its `tenant`.
    pub attributes: Vec<DevAttribute>,
    /// `--xks-listen`: also serve the AWS XKS proxy API there, with a dev
    /// credential described in `DIR/xks.json` (`dev_xks`).
    pub xks_listen: Option<SocketAddr>,
}

/// The attribute every start gives the dev `service` identity unless
/// `--attribute service:tenant=…` says otherwise: the README's
/// `tenant=acme` examples work as written.
pub const DEFAULT_SERVICE_ATTRIBUTE: (&str, &str) = ("tenant", "acme");

/// One `--attribute PRINCIPAL_OR_ROLE:KEY=VALUE`: `target` is a role
/// (`operator`, `service`, `auditor`: every dev principal of that role), a
/// dev principal's name (`operator-2`), or a whole principal
/// (`spiffe://…`, as `[attributes]` of `coffre serve` names it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevAttribute {
    pub target: String,
    pub key: String,
    pub value: String,
}

impl std::str::FromStr for DevAttribute {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let form = "expected PRINCIPAL_OR_ROLE:KEY=VALUE, e.g. service:tenant=acme";
        let (left, value) = s
            .split_once('=')
            .ok_or_else(|| format!("{form}; got {s:?}"))?;
        // A whole principal may hold ':' (a URI): the key is after the last.
        let (target, key) = left
            .rsplit_once(':')
            .ok_or_else(|| format!("{form}; got {s:?} (no ':' before the key)"))?;
        if target.is_empty() || target.ends_with("//") {
            return Err(format!("{form}; got {s:?} (no principal or role)"));
        }
        if key.is_empty() || key.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "{form}; got {s:?} (the key must be non-empty, without spaces)"
            ));
        }
        if value.chars().any(char::is_control) {
            return Err(format!(
                "{form}; got {s:?} (control characters in the value)"
            ));
        }
        Ok(Self {
            target: target.to_string(),
            key: key.to_string(),
            value: value.to_string(),
        })
    }
}

/// The dev principals of a server with `quorum` operators, by short name
/// (`operator`, `operator-2`, …, `service`, `auditor`) and role.
pub fn dev_principals(quorum: u32) -> Vec<(String, Role)> {
    let mut all = vec![("operator".to_string(), Role::Operator)];
    all.extend((2..=quorum).map(|n| (format!("operator-{n}"), Role::Operator)));
    all.push(("service".to_string(), Role::Service));
    all.push(("auditor".to_string(), Role::Auditor));
    all
}

/// Every principal's attributes, keyed by principal (as `[attributes]` of
/// `coffre serve`): the default `tenant=acme` of the dev service, then each
/// `--attribute` in order (a later one replaces an earlier value). A
/// target that names no dev principal, role or whole principal is refused.
pub fn resolve_attributes(
    quorum: u32,
    attributes: &[DevAttribute],
) -> anyhow::Result<HashMap<String, BTreeMap<String, String>>> {
    let principals = dev_principals(quorum);
    let mut out: HashMap<String, BTreeMap<String, String>> = HashMap::new();
    let (key, value) = DEFAULT_SERVICE_ATTRIBUTE;
    out.entry(pki::dev_principal("service"))
        .or_default()
        .insert(key.to_string(), value.to_string());
    for a in attributes {
        let targets: Vec<String> = if let Some(role) =
            [Role::Operator, Role::Service, Role::Auditor]
                .into_iter()
                .find(|r| r.as_str() == a.target)
        {
            principals
                .iter()
                .filter(|(_, r)| *r == role)
                .map(|(name, _)| pki::dev_principal(name))
                .collect()
        } else if principals.iter().any(|(name, _)| *name == a.target) {
            vec![pki::dev_principal(&a.target)]
        } else if a.target.contains("://") {
            vec![a.target.clone()]
        } else {
            let names: Vec<&str> = principals.iter().map(|(n, _)| n.as_str()).collect();
            bail!(
                "--attribute {}:{}=…: no dev principal or role is called {:?}; the dev \
                 principals are {} (more operators with --quorum), the roles operator, \
                 service and auditor",
                a.target,
                a.key,
                a.target,
                names.join(", ")
            );
        };
        for principal in targets {
            out.entry(principal)
                .or_default()
                .insert(a.key.clone(), a.value.clone());
        }
    }
    Ok(out)
}

/// Dev mode: keys created without a policy may be used by the dev
/// `service` identity.
pub fn dev_kms_options() -> KmsOptions {
    KmsOptions {
        default_policy: crate::model::KeyPolicy::granting([pki::dev_principal("service")]),
        ..KmsOptions::default()
    }
}

/// Creates `dir` and its dev PKI if they do not exist yet.
pub fn ensure_dev_dir(dir: &DataDir) -> anyhow::Result<()> {
    dir.create()?;
    if pki::ensure_dev_pki(dir.root())? {
        tracing::info!(dir = %dir.pki().dir.display(), "created the development PKI");
    }
    Ok(())
}

/// A builder for a server on `dir`'s dev PKI (made by [`ensure_dev_dir`],
/// with a client certificate for every principal of `roles`), simulated
/// HSM, store and approvals; the audit log in `dir` as `audit` says. The
/// caller adds what else it needs (scheduler, metrics) and starts it.
pub async fn builder(
    dir: &DataDir,
    roles: StaticRoles,
    options: KmsOptions,
    audit: &AuditConfig,
    crl: Option<PathBuf>,
    crl_reload_interval: Duration,
    listen: SocketAddr,
) -> anyhow::Result<ServerBuilder> {
    let pin = dev_pin(dir)?;
    let state = dir.hsm_state();
    let hsm = tokio::task::spawn_blocking(move || LocalSimHsm::open(&state, &pin))
        .await
        .context("opening the simulated HSM")?
        .context("opening the simulated HSM")?;
    let simulator = Arc::clone(hsm.simulator());
    let store = dir.open_store().await?;
    let legacy_approvals = dir.open_legacy_approvals().await?;
    let paths = dir.pki();
    // A CA per role: `coffre dev` has the shape production should have.
    let tls = crate::config::TlsPaths {
        cert: paths.server_cert(),
        key: paths.server_key(),
        client_cas: crate::config::ClientCaPaths::PerRole(
            pki::ROLES
                .into_iter()
                .map(|role| (role, paths.role_ca_cert(role)))
                .collect(),
        ),
        allow_shared_client_ca: false,
        crl,
        crl_reload_interval,
        crl_grace: Duration::ZERO,
    }
    .load()?;
    let tls = crate::grpc::ServerTls {
        crl_state: Some(dir.crl_state()),
        ..tls
    };
    let audit = AuditSetup {
        public_key_file: Some(dir.audit_public_key()),
        ..AuditSetup::new(audit.path_in(dir.root()), audit.trail.clone())
    };
    Ok(ServerBuilder::new(
        Arc::new(store),
        Arc::new(hsm),
        Arc::new(roles),
        tls,
        audit,
        listen,
    )
    .options(options)
    .legacy_approvals(legacy_approvals)
    .simulator(simulator))
}

/// Starts the dev server: everything under `opts.data_dir`.
pub async fn start(opts: &DevOptions) -> anyhow::Result<RunningServer> {
    let attributes = resolve_attributes(opts.quorum, &opts.attributes)?;
    // The ports first, then the directory's lock: a busy port or a
    // directory another coffre uses stops the start before anything is
    // created (a new data directory stays absent) or opened.
    let listener = bind(opts.listen, "--listen").await?;
    let metrics_listener = match opts.metrics_listen {
        Some(at) => Some(bind(at, "--metrics-listen").await?),
        None => None,
    };
    let xks_listener = match opts.xks_listen {
        Some(at) => Some(bind(at, "--xks-listen").await?),
        None => None,
    };
    let dir = DataDir::new(&opts.data_dir);
    dir.create()?;
    let lock = dir.lock()?;
    ensure_dev_dir(&dir)?;
    // `--quorum M`: M operators (operator.pem, operator-2.pem, …), and M
    // approvals for every sensitive operation.
    let paths = dir.pki();
    for n in 2..=opts.quorum {
        let name = format!("operator-{n}");
        if !paths.client_cert(&name).exists() {
            pki::issue_client_cert(&paths, &name)?;
        }
    }
    let mut roles: Vec<(String, Role)> = dev_principals(opts.quorum)
        .into_iter()
        .map(|(name, role)| (pki::dev_principal(&name), role))
        .collect();
    if xks_listener.is_some() {
        roles.push((
            pki::dev_principal(super::dev_xks::PRINCIPAL_NAME),
            Role::Service,
        ));
    }
    let mut options = opts.options.clone();
    if opts.quorum > 1 {
        options.quorum = QuorumOptions::uniform(opts.quorum);
    }
    let builder = builder(
        &dir,
        StaticRoles::new(roles).with_attributes(attributes),
        options,
        &opts.audit,
        opts.crl.clone(),
        opts.crl_reload_interval,
        opts.listen,
    )
    .await?
    .bound_listener(listener)
    .scheduler(opts.scheduler_interval)
    .accept_audit_log_loss(opts.accept_audit_log_loss);
    let builder = match metrics_listener {
        Some(listener) => builder.bound_metrics_listener(listener),
        None => builder,
    };
    let builder = match xks_listener {
        Some(listener) => builder.xks(super::dev_xks::setup(&dir, listener)?),
        None => builder,
    };
    builder.hold(lock).start().await
}

/// Binds `at` for `flag`; a port in use says what to do.
async fn bind(at: SocketAddr, flag: &str) -> anyhow::Result<tokio::net::TcpListener> {
    match tokio::net::TcpListener::bind(at).await {
        Ok(listener) => Ok(listener),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => bail!(
            "{at} is in use — is another coffre dev running? stop it, or give {flag} another \
             address (and another --data-dir)"
        ),
        Err(e) => Err(e).with_context(|| format!("cannot listen on {at} ({flag})")),
    }
}

/// Keys per store write of `coffre dev --preload-keys`.
pub const PRELOAD_CHUNK: usize = 5_000;

/// `coffre dev --preload-keys N`: creates `count` keys (no alias, the
/// default policy) as the dev operator, [`PRELOAD_CHUNK`] per durable store
/// write, each with its audit record (`CreateKey`, detail `preloaded by
/// coffre dev`), and shows progress on standard error. For benchmarks over
/// a large store; the server is already serving.
pub async fn preload_keys(server: &RunningServer, count: u64) -> anyhow::Result<()> {
    let operator = Caller::new(pki::dev_principal("operator"));
    let started = std::time::Instant::now();
    let mut last_report = started;
    let mut done = 0u64;
    while done < count {
        let n = usize::try_from(count - done).map_or(PRELOAD_CHUNK, |left| left.min(PRELOAD_CHUNK));
        let inputs = (0..n)
            .map(|_| CreateKeyInput {
                description: "preloaded by coffre dev".into(),
                ..Default::default()
            })
            .collect();
        let created = server
            .kms
            .create_keys(&operator, inputs)
            .await
            .with_context(|| format!("preloading keys ({done} of {count} created)"))?;
        for view in &created {
            let entry = AuditEntry {
                key_version: Some(1),
                ..AuditEntry::system(
                    &operator.principal,
                    Some(Role::Operator),
                    "CreateKey",
                    view.key.id,
                    "preloaded by coffre dev",
                )
            };
            server
                .audit
                .record(entry)
                .await
                .context("auditing a preloaded key")?;
        }
        done += created.len() as u64;
        if done == count || last_report.elapsed() >= Duration::from_secs(1) {
            last_report = std::time::Instant::now();
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "preloaded {done} of {count} keys ({:.0} keys/s)",
                done as f64 / secs.max(1e-9)
            );
        }
    }
    // A bulk load leaves sled's log full of superseded fragments, which its
    // cleaner would otherwise page in, and hold, for minutes after every
    // start (measured in BENCHMARKS.md, "A million keys").
    eprintln!("compacting the store…");
    let started = std::time::Instant::now();
    server
        .kms
        .compact_store()
        .await
        .context("compacting the store after the preload")?;
    eprintln!("compacted in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// The dev HSM's PIN: random on first start, kept in a 0600 file.
pub(super) fn dev_pin(dir: &DataDir) -> anyhow::Result<Zeroizing<String>> {
    let path = dir.hsm_pin();
    if path.exists() {
        let mut pin = Zeroizing::new(
            std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?,
        );
        let len = pin.trim_end().len();
        pin.truncate(len);
        if pin.is_empty() {
            bail!("{} is empty", path.display());
        }
        return Ok(pin);
    }
    let mut bytes = Zeroizing::new([0u8; 16]);
    crate::crypto::Rng::default()
        .fill(&mut bytes[..])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let pin = Zeroizing::new(hex::encode(&bytes[..]));
    crate::fsutil::write_atomic(&path, pin.as_bytes(), true)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(pin)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(s: &str) -> DevAttribute {
        s.parse().unwrap()
    }

    #[test]
    fn attributes_parse_with_a_role_a_name_or_a_whole_principal() {
        assert_eq!(
            attr("service:tenant=acme"),
            DevAttribute {
                target: "service".into(),
                key: "tenant".into(),
                value: "acme".into(),
            }
        );
        let uri = attr("spiffe://provider.example/storage:tenant=a=b");
        assert_eq!(uri.target, "spiffe://provider.example/storage");
        assert_eq!((uri.key.as_str(), uri.value.as_str()), ("tenant", "a=b"));
        for bad in [
            "service",
            "tenant=acme",
            ":tenant=acme",
            "service:=acme",
            "spiffe://:k=v",
        ] {
            assert!(bad.parse::<DevAttribute>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_dev_service_has_tenant_acme_unless_told_otherwise() {
        let service = pki::dev_principal("service");
        let all = resolve_attributes(1, &[]).unwrap();
        assert_eq!(all[&service]["tenant"], "acme");
        let all = resolve_attributes(1, &[attr("service:tenant=globex")]).unwrap();
        assert_eq!(all[&service]["tenant"], "globex");
        // A role gives it to every dev principal of the role.
        let all = resolve_attributes(2, &[attr("operator:team=blue")]).unwrap();
        assert_eq!(all[&pki::dev_principal("operator-2")]["team"], "blue");
        assert_eq!(all[&pki::dev_principal("operator")]["team"], "blue");
        let e = resolve_attributes(1, &[attr("operator-2:team=blue")]).unwrap_err();
        assert!(e.to_string().contains("no dev principal or role"), "{e}");
    }
}
