//! `coffre dev`: everything on one machine, in one [`DataDir`]: the dev
//! PKI, an in-process simulated HSM whose state and PIN persist there, the
//! sled store, the approvals and the audit log. Restarting on the same
//! directory keeps every key.

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
    let approvals = dir.open_approvals().await?;
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
    .approvals(approvals)
    .simulator(simulator))
}

/// Starts the dev server: everything under `opts.data_dir`.
pub async fn start(opts: &DevOptions) -> anyhow::Result<RunningServer> {
    let dir = DataDir::new(&opts.data_dir);
    ensure_dev_dir(&dir)?;
    let mut roles = vec![
        (pki::dev_principal("operator"), Role::Operator),
        (pki::dev_principal("service"), Role::Service),
        (pki::dev_principal("auditor"), Role::Auditor),
    ];
    // `--quorum M`: M operators (operator.pem, operator-2.pem, …), and M
    // approvals for every sensitive operation.
    let paths = dir.pki();
    for n in 2..=opts.quorum {
        let name = format!("operator-{n}");
        if !paths.client_cert(&name).exists() {
            pki::issue_client_cert(&paths, &name)?;
        }
        roles.push((pki::dev_principal(&name), Role::Operator));
    }
    let mut options = opts.options.clone();
    if opts.quorum > 1 {
        options.quorum = QuorumOptions::uniform(opts.quorum);
    }
    builder(
        &dir,
        StaticRoles::new(roles),
        options,
        &opts.audit,
        opts.crl.clone(),
        opts.crl_reload_interval,
        opts.listen,
    )
    .await?
    .scheduler(opts.scheduler_interval)
    .metrics(opts.metrics_listen)
    .accept_audit_log_loss(opts.accept_audit_log_loss)
    .start()
    .await
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
fn dev_pin(dir: &DataDir) -> anyhow::Result<Zeroizing<String>> {
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
