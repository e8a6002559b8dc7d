//! `coffre dev` and `coffre serve`: assembling the server from its parts.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use zeroize::Zeroizing;

use super::{DevArgs, DevAuditMode};
use crate::audit::{AuditTrail, AuditTrailOptions};
use crate::authz::{Role, StaticRoles};
use crate::config::{Config, HsmConfig};
use crate::grpc;
use crate::hsm::Hsm;
use crate::hsm::pkcs11::{Pkcs11Hsm, Pkcs11Settings};
use crate::hsm::sim::{LocalSimHsm, RemoteSimHsm};
use crate::model::SystemClock;
use crate::pki::{self, PkiPaths};
use crate::service::{Kms, KmsOptions, SchedulerReport};
use crate::store::SledStore;

/// Logs go to standard error; `RUST_LOG` filters them (default `info`).
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second initialisation (tests) is harmless: keep the first.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

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
    pub audit: crate::config::AuditConfig,
    /// Where to serve Prometheus metrics (none by default).
    pub metrics_listen: Option<SocketAddr>,
    /// Keys to create for the dev operator before the banner (benchmarks).
    pub preload_keys: u64,
}

/// Where the audit log is and how it behaves.
#[derive(Clone, Debug)]
pub struct AuditSetup {
    pub path: PathBuf,
    pub options: AuditTrailOptions,
    /// Where to write the checkpoint public key (PEM), if anywhere.
    pub public_key_file: Option<PathBuf>,
    /// A checkpoint key held by the HSM, instead of the one kept in the store.
    pub external_signer: Option<Arc<dyn crate::audit::ExternalSigner>>,
}

impl AuditSetup {
    /// The log in `dir` with the configured options.
    pub fn in_dir(dir: &Path, config: &crate::config::AuditConfig) -> anyhow::Result<Self> {
        Ok(Self {
            path: config.path_in(dir),
            options: config.trail.clone(),
            public_key_file: None,
            external_signer: None,
        })
    }
}

impl From<DevArgs> for DevOptions {
    fn from(args: DevArgs) -> Self {
        Self {
            data_dir: args.data_dir,
            listen: args.listen,
            options: dev_kms_options(),
            scheduler_interval: Some(Duration::from_secs(10)),
            quorum: args.quorum,
            crl: args.crl,
            crl_reload_interval: Duration::from_secs(args.crl_reload_secs),
            audit: crate::config::AuditConfig::dev(
                match args.audit_durability {
                    DevAuditMode::Fsync => crate::audit::Durability::Fsync,
                    DevAuditMode::Write | DevAuditMode::Off => crate::audit::Durability::Write,
                },
                args.audit_durability == DevAuditMode::Off,
            ),
            metrics_listen: args.metrics_listen,
            preload_keys: args.preload_keys,
        }
    }
}

/// Dev mode: keys created without a policy may be used by the dev
/// `service` identity.
pub fn dev_kms_options() -> KmsOptions {
    KmsOptions {
        default_policy: crate::model::KeyPolicy::granting([pki::dev_principal("service")]),
        ..KmsOptions::default()
    }
}

/// File names inside a dev data directory.
pub const DEV_STORE_DIR: &str = "store";
pub const DEV_HSM_STATE: &str = "hsm-sim.state";
pub const DEV_HSM_PIN: &str = "hsm-sim.pin";
pub const DEV_APPROVALS_DIR: &str = "approvals";
pub const DEV_AUDIT_PUBLIC_KEY: &str = "audit-public-key.pem";

async fn open_approvals(dir: &Path) -> anyhow::Result<crate::store::approvals::ApprovalStore> {
    let d = dir.to_path_buf();
    tokio::task::spawn_blocking(move || crate::store::approvals::ApprovalStore::open(&d))
        .await
        .context("opening the approvals")?
        .with_context(|| format!("opening the approvals in {}", dir.display()))
}

/// A running server.
#[derive(Debug)]
pub struct RunningServer {
    pub addr: SocketAddr,
    pub kms: Arc<Kms>,
    pub audit: Arc<AuditTrail>,
    /// The in-process simulated HSM of `coffre dev` (for fault injection in
    /// tests); `None` with a separate HSM.
    pub simulator: Option<Arc<hsm_sim::Simulator>>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
    scheduler: Option<JoinHandle<()>>,
    client_auth: Arc<grpc::ClientAuth>,
    crl_watcher: Option<JoinHandle<()>>,
    /// Where the metrics page is served, if anywhere.
    pub metrics_addr: Option<SocketAddr>,
    metrics_task: Option<JoinHandle<()>>,
}

/// Keys per store write of `coffre dev --preload-keys`.
pub const PRELOAD_CHUNK: usize = 5_000;

impl RunningServer {
    /// `coffre dev --preload-keys N`: creates `count` keys (no alias, the
    /// default policy) as the dev operator, [`PRELOAD_CHUNK`] per durable
    /// store write, each with its audit record (`CreateKey`, detail
    /// `preloaded by coffre dev`), and shows progress on standard error.
    /// For benchmarks over a large store; the server is already serving.
    pub async fn preload_keys(&self, count: u64) -> anyhow::Result<()> {
        use crate::audit::{AuditEntry, Outcome};
        let operator = crate::authz::Caller::new(pki::dev_principal("operator"));
        let started = std::time::Instant::now();
        let mut last_report = started;
        let mut done = 0u64;
        while done < count {
            let n =
                usize::try_from(count - done).map_or(PRELOAD_CHUNK, |left| left.min(PRELOAD_CHUNK));
            let inputs = (0..n)
                .map(|_| crate::service::CreateKeyInput {
                    description: "preloaded by coffre dev".into(),
                    ..Default::default()
                })
                .collect();
            let created = self
                .kms
                .create_keys(&operator, inputs)
                .await
                .with_context(|| format!("preloading keys ({done} of {count} created)"))?;
            for view in &created {
                let entry = AuditEntry {
                    request_id: uuid::Uuid::new_v4().to_string(),
                    principal: operator.principal.clone(),
                    role: Some(Role::Operator.as_str().to_string()),
                    operation: "CreateKey".into(),
                    key_id: Some(view.key.id.to_string()),
                    key_version: Some(1),
                    context_digest: None,
                    justification: None,
                    context: None,
                    detail: Some("preloaded by coffre dev".into()),
                    outcome: Outcome::Allowed,
                    status_code: "OK".into(),
                };
                self.audit
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
        // A bulk load leaves sled's log full of superseded fragments, which
        // its cleaner would otherwise page in, and hold, for minutes after
        // every start (measured in BENCHMARKS.md, "A million keys").
        eprintln!("compacting the store…");
        let started = std::time::Instant::now();
        self.kms
            .compact_store()
            .await
            .context("compacting the store after the preload")?;
        eprintln!("compacted in {:.1} s", started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Re-reads the CRL now (what SIGHUP does): new connections are verified
    /// against it. If it does not load, the previous one stays in force and
    /// the error is returned.
    pub fn reload_crl(&self) -> anyhow::Result<()> {
        self.client_auth.reload()
    }

    /// Stops accepting, drains in-flight requests, and waits.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(s) = self.scheduler.take() {
            s.abort();
        }
        if let Some(w) = self.crl_watcher.take() {
            w.abort();
        }
        if let Some(m) = self.metrics_task.take() {
            m.abort();
        }
        self.audit.close_followers();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let served = self.task.await.context("server task");
        // The final checkpoint signs every record written.
        let audit = Arc::clone(&self.audit);
        let _ = tokio::task::spawn_blocking(move || audit.shutdown()).await;
        served?
    }

    /// Waits until the server stops by itself (an error) or `signal` fires.
    pub async fn run_until(mut self, signal: impl Future<Output = ()>) -> anyhow::Result<()> {
        tokio::select! {
            r = &mut self.task => r.context("server task")?,
            () = signal => {
                tracing::info!("shutting down");
                self.stop().await
            }
        }
    }
}

/// Starts the dev server: everything under `opts.data_dir`.
pub async fn start_dev(opts: &DevOptions) -> anyhow::Result<RunningServer> {
    let dir = &opts.data_dir;
    create_private_dir(dir)?;
    let created = pki::ensure_dev_pki(dir)?;
    if created {
        tracing::info!(dir = %PkiPaths::new(dir).dir.display(), "created the development PKI");
    }
    let pin = dev_pin(&dir.join(DEV_HSM_PIN))?;
    let hsm_state = dir.join(DEV_HSM_STATE);
    let hsm = tokio::task::spawn_blocking(move || LocalSimHsm::open(&hsm_state, &pin))
        .await
        .context("opening the simulated HSM")?
        .context("opening the simulated HSM")?;
    let simulator = Arc::clone(hsm.simulator());
    let store_dir = dir.join(DEV_STORE_DIR);
    let store = tokio::task::spawn_blocking(move || SledStore::open(&store_dir))
        .await
        .context("opening the store")?
        .with_context(|| format!("opening the store in {}", dir.join(DEV_STORE_DIR).display()))?;
    let mut roles = vec![
        (pki::dev_principal("operator"), Role::Operator),
        (pki::dev_principal("service"), Role::Service),
        (pki::dev_principal("auditor"), Role::Auditor),
    ];
    // `--quorum M`: M operators (operator.pem, operator-2.pem, …), and M
    // approvals for every sensitive operation.
    let paths = PkiPaths::new(dir);
    for n in 2..=opts.quorum {
        let name = format!("operator-{n}");
        if !paths.client_cert(&name).exists() {
            pki::issue_client_cert(&paths, &name)?;
        }
        roles.push((pki::dev_principal(&name), Role::Operator));
    }
    let mut options = opts.options.clone();
    if opts.quorum > 1 {
        options.quorum = crate::service::QuorumOptions::uniform(opts.quorum);
    }
    let approvals = open_approvals(&dir.join(DEV_APPROVALS_DIR)).await?;
    let kms = Arc::new(
        Kms::new(
            Arc::new(store),
            Arc::new(hsm),
            Arc::new(StaticRoles::new(roles)),
            Arc::new(SystemClock),
            options,
        )
        .with_approval_store(approvals),
    );
    let tls = crate::config::TlsPaths {
        cert: paths.server_cert(),
        key: paths.server_key(),
        client_ca: paths.ca_cert(),
        crl: opts.crl.clone(),
        crl_reload_interval: opts.crl_reload_interval,
    }
    .load()?;
    let audit = AuditSetup {
        public_key_file: Some(dir.join(DEV_AUDIT_PUBLIC_KEY)),
        ..AuditSetup::in_dir(dir, &opts.audit)?
    };
    let mut server = start_server(
        kms,
        opts.listen,
        tls,
        opts.scheduler_interval,
        audit,
        opts.metrics_listen,
    )
    .await?;
    server.simulator = Some(simulator);
    Ok(server)
}

pub async fn start_server(
    kms: Arc<Kms>,
    listen: SocketAddr,
    tls: grpc::ServerTls,
    scheduler_interval: Option<Duration>,
    audit: AuditSetup,
    metrics_listen: Option<SocketAddr>,
) -> anyhow::Result<RunningServer> {
    // Certificates, key, client CA and CRL are all checked here: a bad one
    // stops the start with a clear error.
    let crl_reload_interval = tls.crl_reload_interval;
    let tls = grpc::PreparedTls::new(&tls).context("configuring TLS")?;
    let auditor = open_auditor(&kms, &audit).await?;
    let client_auth = tls.client_auth();
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr().context("local address")?;
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let metrics_server = match metrics_listen {
        Some(at) => Some(start_metrics(at, &kms, &auditor, &metrics).await?),
        None => None,
    };
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(grpc::serve(
        Arc::clone(&kms),
        Arc::clone(&auditor),
        metrics,
        listener,
        tls,
        async move {
            let _ = rx.await;
        },
    ));
    let crl_watcher = client_auth
        .crl_path()
        .is_some()
        .then(|| spawn_crl_watcher(Arc::clone(&client_auth), crl_reload_interval));
    // Destruction after the waiting period and automatic rotation.
    let scheduler = scheduler_interval.map(|every| {
        let kms = Arc::clone(&kms);
        let auditor = Arc::clone(&auditor);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let report = kms.run_scheduler_once().await;
                if report != SchedulerReport::default() {
                    tracing::info!(
                        rotated = report.rotated.len(),
                        destroyed = report.destroyed.len(),
                        failed = report.failed,
                        "scheduler pass"
                    );
                    audit_scheduler(&auditor, &report).await;
                }
            }
        })
    });
    Ok(RunningServer {
        addr,
        kms,
        audit: auditor,
        simulator: None,
        shutdown: Some(tx),
        task,
        scheduler,
        client_auth,
        crl_watcher,
        metrics_addr: metrics_server.as_ref().map(|(addr, _)| *addr),
        metrics_task: metrics_server.map(|(_, task)| task),
    })
}

/// Serves the metrics page on `at` (plain HTTP): the requests counted by
/// the gRPC layer, the core's caches and HSM calls, the audit log's state.
async fn start_metrics(
    at: SocketAddr,
    kms: &Arc<Kms>,
    auditor: &Arc<AuditTrail>,
    metrics: &Arc<crate::metrics::Metrics>,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(at)
        .await
        .with_context(|| format!("cannot listen for metrics on {at}"))?;
    let addr = listener.local_addr().context("metrics address")?;
    let (kms, auditor, metrics) = (Arc::clone(kms), Arc::clone(auditor), Arc::clone(metrics));
    let render: crate::metrics::http::Render = Arc::new(move || {
        use crate::metrics::render_value;
        let mut out = String::with_capacity(16 * 1024);
        metrics.render_requests(&mut out);
        kms.render_metrics(&mut out);
        let healthy = if auditor.is_healthy() { 1.0 } else { 0.0 };
        render_value(
            &mut out,
            "coffre_audit_backlog",
            "gauge",
            "Audit records waiting for the writer.",
            &[("", auditor.backlog() as f64)],
        );
        render_value(
            &mut out,
            "coffre_audit_records_total",
            "counter",
            "Audit records written (the log's last seq).",
            &[("", auditor.last_seq() as f64)],
        );
        render_value(
            &mut out,
            "coffre_audit_healthy",
            "gauge",
            "1 while the audit log can be written.",
            &[("", healthy)],
        );
        out
    });
    tracing::info!(%addr, "metrics on http://{addr}/metrics");
    let task = tokio::spawn(crate::metrics::serve(
        listener,
        render,
        std::future::pending(),
    ));
    Ok((addr, task))
}

/// Loads (or, on a new data directory, creates) the audit log's keys and
/// opens the log, verifying it; writes the public key file if asked.
async fn open_auditor(kms: &Kms, setup: &AuditSetup) -> anyhow::Result<Arc<AuditTrail>> {
    let mut keys = kms
        .audit_keys()
        .await
        .context("loading the audit log's signing key (HSM-wrapped, in the store)")?;
    if let Some(signer) = &setup.external_signer {
        keys.signer = crate::audit::CheckpointSigner::external(Arc::clone(signer));
    }
    let path = setup.path.clone();
    let options = setup.options.clone();
    let auditor = tokio::task::spawn_blocking(move || AuditTrail::open(&path, keys, options))
        .await
        .context("opening the audit log")?
        .with_context(|| {
            format!(
                "opening the audit log {}{}",
                setup.path.display(),
                if setup.external_signer.is_some() {
                    " (its checkpoints must verify under the HSM's audit signing key: a log \
                     begun with audit.checkpoint_key = \"software\" cannot continue under it; \
                     start a new log file with audit.path and keep the old one)"
                } else {
                    ""
                }
            )
        })?;
    if let Some(file) = &setup.public_key_file {
        let pem = auditor.public_key_pem();
        if std::fs::read_to_string(file).ok().as_deref() != Some(pem.as_str()) {
            crate::fsutil::write_atomic(file, pem.as_bytes(), false)
                .with_context(|| format!("writing {}", file.display()))?;
        }
    }
    tracing::info!(file = %setup.path.display(), "audit log open and verified");
    Ok(Arc::new(auditor))
}

/// The scheduler's own actions are audited like requests, under the
/// principal `coffre/scheduler`.
async fn audit_scheduler(auditor: &AuditTrail, report: &SchedulerReport) {
    use crate::audit::{AuditEntry, Outcome};
    let actions = report
        .rotated
        .iter()
        .map(|id| ("RotateKey", id))
        .chain(report.destroyed.iter().map(|id| ("DestroyKey", id)));
    for (operation, id) in actions {
        let entry = AuditEntry {
            request_id: uuid::Uuid::new_v4().to_string(),
            principal: "coffre/scheduler".into(),
            role: None,
            operation: operation.into(),
            key_id: Some(id.to_string()),
            key_version: None,
            context_digest: None,
            justification: None,
            context: None,
            detail: Some("scheduled".into()),
            outcome: Outcome::Allowed,
            status_code: "OK".into(),
        };
        if let Err(e) = auditor.record(entry).await {
            tracing::error!(error = %e, key_id = %id, operation, "cannot audit a scheduled action");
        }
    }
}

/// Reloads the CRL on SIGHUP (unix) and whenever the file's modification
/// time or length changes. A CRL that does not load is logged and the
/// previous one stays in force.
fn spawn_crl_watcher(client_auth: Arc<grpc::ClientAuth>, every: Duration) -> JoinHandle<()> {
    // Registered before the server reports itself started, so that a SIGHUP
    // sent as soon as it is up reloads rather than kills it.
    #[cfg(unix)]
    let mut hangup = {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; the CRL is reloaded on change only");
                None
            }
        }
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate; the CRL was just read
        loop {
            #[cfg(unix)]
            let hup = async {
                match hangup.as_mut() {
                    Some(s) => {
                        if s.recv().await.is_none() {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let hup = std::future::pending::<()>();
            let result = tokio::select! {
                () = hup => {
                    tracing::info!("SIGHUP: reloading the CRL");
                    client_auth.reload().map(|()| true)
                }
                _ = tick.tick() => client_auth.reload_if_changed(),
            };
            match result {
                Ok(true) => tracing::info!("reloaded the CRL"),
                Ok(false) => {}
                Err(e) => tracing::error!(
                    error = format!("{e:#}"),
                    "the CRL did not load; the previous one stays in force"
                ),
            }
        }
    })
}

/// `coffre dev`: runs until Ctrl-C / SIGTERM or `extra_shutdown`.
pub async fn run_dev(
    opts: DevOptions,
    extra_shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    crate::hardening::disable_core_dumps()?;
    if crate::hardening::running_as_root() {
        tracing::warn!(
            "coffre dev is running as root; coffre serve refuses to unless told to (allow_root)"
        );
    }
    let server = start_dev(&opts).await?;
    if opts.preload_keys > 0 {
        server.preload_keys(opts.preload_keys).await?;
    }
    print_dev_banner(&opts.data_dir, server.addr);
    if let Some(crl) = &opts.crl {
        println!(
            "  client CRL       {}   (re-read on SIGHUP and when it changes)",
            crl.display()
        );
    }
    server
        .run_until(async {
            tokio::select! {
                () = termination() => {}
                () = extra_shutdown => {}
            }
        })
        .await
}

/// Opens the PKCS#11 backend a configuration names: loads the module, finds
/// the token, logs in, checks the mechanisms and every root key's
/// attributes. Errors say which of these failed.
pub async fn open_pkcs11(hsm: &HsmConfig) -> anyhow::Result<Pkcs11Hsm> {
    let HsmConfig::Pkcs11 {
        module,
        token,
        pin,
        sessions,
        timeout,
    } = hsm
    else {
        bail!("the configuration's hsm.backend is not \"pkcs11\"");
    };
    let settings = Pkcs11Settings {
        module: module.clone(),
        token: token.clone(),
        pin: pin.read()?.into_zeroizing(),
        sessions: *sessions,
        timeout: *timeout,
    };
    let what = format!(
        "opening the {token} through the PKCS#11 module {}",
        module.display()
    );
    tokio::task::spawn_blocking(move || Pkcs11Hsm::open(settings))
        .await
        .context("the PKCS#11 start task failed")?
        .context(what)
}

/// `coffre serve --config FILE`.
pub async fn run_serve(config_path: &Path, allow_root: bool) -> anyhow::Result<()> {
    crate::hardening::disable_core_dumps()?;
    let config = Config::load(config_path)?;
    crate::hardening::refuse_root(allow_root || config.allow_root)?;
    let mut external_signer: Option<Arc<dyn crate::audit::ExternalSigner>> = None;
    let hsm: Arc<dyn Hsm> = match &config.hsm {
        HsmConfig::Simulator {
            endpoint,
            pin,
            timeout,
        } => {
            let pin = pin.read()?;
            let hsm = RemoteSimHsm::connect(endpoint, pin.expose().to_string(), *timeout)
                .await
                .with_context(|| format!("connecting to the simulated HSM at {endpoint}"))?;
            tracing::warn!("running on the simulated HSM: not for production");
            Arc::new(hsm)
        }
        HsmConfig::Pkcs11 { .. } => {
            let hsm = open_pkcs11(&config.hsm).await?;
            let root = hsm.require_root_key()?;
            hsm.self_test()
                .await
                .context("the PKCS#11 self-test (wrap and unwrap a random value) failed")?;
            tracing::info!(hsm = ?hsm, current_root_key = root, "PKCS#11 HSM ready");
            if config.audit.checkpoint_key == crate::config::CheckpointKey::Hsm {
                let token = hsm.clone();
                let signer = tokio::task::spawn_blocking(move || token.audit_signer(true))
                    .await
                    .context("the audit signing key task failed")?
                    .context("loading the audit signing key from the HSM")?;
                tracing::info!(signer = ?signer, "audit checkpoints are signed in the HSM");
                external_signer = Some(Arc::new(signer));
            }
            Arc::new(hsm)
        }
    };
    if !hsm.is_secure() {
        if !config.allow_insecure_simulator {
            bail!(
                "the HSM backend is not secure; refusing to serve (see hsm.allow_insecure_simulator)"
            );
        }
        tracing::warn!("the HSM backend is not secure (allowed by the configuration)");
    }
    let store_dir = config.data_dir.join("store");
    create_private_dir(&config.data_dir)?;
    let store = {
        let dir = store_dir.clone();
        tokio::task::spawn_blocking(move || SledStore::open(&dir))
            .await
            .context("opening the store")?
            .with_context(|| format!("opening the store in {}", store_dir.display()))?
    };
    if config.roles.is_empty() {
        tracing::warn!("no principal has a role: every request will be refused");
    }
    let approvals = open_approvals(&config.data_dir.join("approvals")).await?;
    let kms = Arc::new(
        Kms::new(
            Arc::new(store),
            hsm,
            Arc::new(
                StaticRoles::new(config.roles.clone()).with_attributes(config.attributes.clone()),
            ),
            Arc::new(SystemClock),
            config.options.clone(),
        )
        .with_approval_store(approvals),
    );
    let tls = config.tls.load()?;
    let audit = AuditSetup {
        external_signer,
        ..AuditSetup::in_dir(&config.data_dir, &config.audit)?
    };
    let server = start_server(
        kms,
        config.listen,
        tls,
        Some(config.scheduler_interval),
        audit,
        config.metrics_listen,
    )
    .await?;
    tracing::info!(addr = %server.addr, "coffre serving");
    println!("coffre listening on {}", server.addr);
    server.run_until(termination()).await
}

async fn termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        if !dir.is_dir() {
            bail!("{} is not a directory", dir.display());
        }
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// The dev HSM's PIN: random on first start, kept in a 0600 file.
fn dev_pin(path: &Path) -> anyhow::Result<Zeroizing<String>> {
    if path.exists() {
        let mut pin = Zeroizing::new(
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
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
    crate::fsutil::write_atomic(path, pin.as_bytes(), true)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(pin)
}

fn print_dev_banner(dir: &Path, addr: SocketAddr) {
    let dir = dir.display();
    println!(
        "\
coffre dev is running on https://{addr}  (mTLS; Ctrl-C stops it)

  data directory   {dir}   (store, simulated HSM state, dev PKI; reused on restart)
  dev PKI          {dir}/pki/  ca.pem, server.pem, operator.pem, service.pem, auditor.pem (+ -key.pem)
  HSM              simulated, in-process — for development only
  audit log        {dir}/audit.log  (verify exports with {dir}/audit-public-key.pem)

Try it from another terminal:
  coffre key create --alias demo --data-dir {dir} --endpoint https://{addr}
  coffre datakey generate --key demo --context tenant=acme --data-dir {dir} --endpoint https://{addr}
  coffre decrypt --blob <ciphertext_blob> --context tenant=acme --data-dir {dir} --endpoint https://{addr}
(with cargo: cargo run --release -- key create ...)"
    );
}
