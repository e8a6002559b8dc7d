//! How the server is put together: the composition root.
//!
//! ```text
//!            ┌──────────────────────── ServerBuilder ─────────────────────────┐
//!  store ───▶│ Kms (core) ◀── hsm, authorizer, clock, options, approvals      │
//!            │   │ audit keys, store MAC key (HSM-wrapped, in the store)      │
//!            │   ▼                                                            │
//!            │ AuditTrail (opened and verified) ──▶ Pipeline ──▶ grpc::serve  │──▶ RunningServer
//!            │ tasks: scheduler, CRL watcher, metrics page                    │
//!            └────────────────────────────────────────────────────────────────┘
//! ```
//!
//! [`dev`] assembles `coffre dev` (a [`DataDir`] with the dev PKI and an
//! in-process simulated HSM), [`production`] assembles `coffre serve` from a
//! validated configuration; the integration tests use the same builder. The
//! CLI only parses arguments, calls these and prints.

mod audit;
#[cfg(test)]
mod barrier_pg_tests;
#[cfg(test)]
mod cluster_race_tests;
mod data_dir;
pub mod dev;
pub mod dev_cluster;
pub mod dev_xks;
pub mod production;
mod tasks;

pub(crate) use data_dir::locked;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use audit::AuditSetup;
pub use data_dir::{AUDIT_LOG_FILE, DataDir, DirLock};

use crate::audit::AuditTrail;
use crate::authz::Authorizer;
use crate::cluster::{Coordination, LocalCoordination};
use crate::grpc;
use crate::hsm::Hsm;
use crate::model::{Clock, SystemClock};
use crate::pipeline::Pipeline;
use crate::service::freshness::SharedStore;
use crate::service::{Kms, KmsOptions};
use crate::store::KeyStore;
use crate::store::approvals::ApprovalStore;

/// What a node sharing its store with other nodes needs
/// ([`ServerBuilder::cluster`]).
#[derive(Debug)]
pub struct ClusterSetup {
    /// Leases, the node registry, the change feed's wake-up.
    pub coordination: Arc<dyn Coordination>,
    /// Strict or available, and the freshness bound.
    pub shared: SharedStore,
    /// How often the change feed is read at least.
    pub poll_interval: Duration,
    /// How long a lease lasts unless renewed.
    pub lease_ttl: Duration,
    /// How often the holder of the `audit-digest` lease signs the cluster
    /// audit digest ([`crate::cluster::audit::DEFAULT_DIGEST_INTERVAL`]).
    pub digest_interval: Duration,
    /// The node's lease, database-error and pool metrics, if its
    /// backend keeps them (the metrics page renders them).
    pub metrics: Option<Arc<crate::metrics::cluster::ClusterMetrics>>,
}

/// Everything a server is made of; [`ServerBuilder::start`] puts it
/// together and starts serving.
#[derive(Debug)]
#[must_use]
pub struct ServerBuilder {
    store: Arc<dyn KeyStore>,
    hsm: Arc<dyn Hsm>,
    authorizer: Arc<dyn Authorizer>,
    clock: Arc<dyn Clock>,
    options: KmsOptions,
    legacy_approvals: Option<ApprovalStore>,
    cluster: Option<ClusterSetup>,
    tls: grpc::ServerTls,
    audit: AuditSetup,
    listen: SocketAddr,
    scheduler_interval: Option<Duration>,
    metrics_listen: Option<SocketAddr>,
    simulator: Option<Arc<hsm_sim::Simulator>>,
    limits: grpc::ServerLimits,
    /// Listeners bound before anything else was opened (`coffre dev`).
    listener: Option<TcpListener>,
    metrics_listener: Option<TcpListener>,
    /// Held for as long as the server runs.
    dir_lock: Option<DirLock>,
    /// The AWS XKS front, if on.
    xks: Option<crate::xks::XksSetup>,
}

impl ServerBuilder {
    /// A server on `listen` with the given backends, TLS identity and audit
    /// log; the system clock, default options, no approvals store (quorum
    /// off), no scheduler, no metrics page.
    pub fn new(
        store: Arc<dyn KeyStore>,
        hsm: Arc<dyn Hsm>,
        authorizer: Arc<dyn Authorizer>,
        tls: grpc::ServerTls,
        audit: AuditSetup,
        listen: SocketAddr,
    ) -> Self {
        Self {
            store,
            hsm,
            authorizer,
            clock: Arc::new(SystemClock),
            options: KmsOptions::default(),
            legacy_approvals: None,
            cluster: None,
            tls,
            audit,
            listen,
            scheduler_interval: None,
            metrics_listen: None,
            simulator: None,
            limits: grpc::ServerLimits::default(),
            listener: None,
            metrics_listener: None,
            dir_lock: None,
            xks: None,
        }
    }

    /// Also serves the AWS XKS proxy API (`crate::xks`), through the same
    /// pipeline as gRPC.
    pub fn xks(mut self, setup: crate::xks::XksSetup) -> Self {
        self.xks = Some(setup);
        self
    }

    /// Serves on `listener`, bound already, instead of binding `listen`
    /// at the end of [`ServerBuilder::start`]: a caller that binds first
    /// finds a busy port before it creates or opens anything.
    pub fn bound_listener(mut self, listener: TcpListener) -> Self {
        self.listener = Some(listener);
        self
    }

    /// Serves the metrics page on `listener`, bound already (see
    /// [`ServerBuilder::bound_listener`]).
    pub fn bound_metrics_listener(mut self, listener: TcpListener) -> Self {
        self.metrics_listener = Some(listener);
        self
    }

    /// Keeps the data directory's lock until the server is stopped.
    pub fn hold(mut self, lock: DirLock) -> Self {
        self.dir_lock = Some(lock);
        self
    }

    /// The listener's bounds (handshakes, HTTP/2, timeouts, message size)
    /// and the audit volume's free-space alert; the defaults otherwise.
    pub fn limits(mut self, limits: grpc::ServerLimits) -> Self {
        self.limits = limits;
        self
    }

    pub fn options(mut self, options: KmsOptions) -> Self {
        self.options = options;
        self
    }

    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// A legacy approvals directory (approvals are kept in the key store;
    /// older data directories kept them as files): moved into the store at
    /// start.
    pub fn legacy_approvals(mut self, files: Option<ApprovalStore>) -> Self {
        self.legacy_approvals = files;
        self
    }

    /// Makes this server one of several nodes sharing its store: it
    /// follows the others' key changes (the change feed, within
    /// `shared.max_staleness`), registers and heartbeats, and runs the
    /// scheduler only while it holds the scheduler's lease.
    pub fn cluster(mut self, setup: ClusterSetup) -> Self {
        self.cluster = Some(setup);
        self
    }

    /// How often the scheduler looks for due rotations and destructions
    /// (`None`: never, for tests that drive it themselves).
    pub fn scheduler(mut self, every: Option<Duration>) -> Self {
        self.scheduler_interval = every;
        self
    }

    /// Where to serve Prometheus metrics, if anywhere.
    pub fn metrics(mut self, listen: Option<SocketAddr>) -> Self {
        self.metrics_listen = listen;
        self
    }

    /// The in-process simulator behind `hsm`, kept for fault injection.
    pub fn simulator(mut self, simulator: Arc<hsm_sim::Simulator>) -> Self {
        self.simulator = Some(simulator);
        self
    }

    /// For this start only, accept an audit log behind the store's
    /// high-water mark (a log truly lost): see [`AuditSetup::accept_log_loss`].
    pub fn accept_audit_log_loss(mut self, accept: bool) -> Self {
        self.audit.accept_log_loss = accept;
        self
    }

    /// Builds the core, opens and verifies the audit log, binds the
    /// listeners and starts serving. Certificates, key, client CA and CRL
    /// are checked here: a bad one stops the start with a clear error.
    pub async fn start(self) -> anyhow::Result<RunningServer> {
        let crl_reload_interval = self.tls.crl_reload_interval;
        let clock = Arc::clone(&self.clock);
        // A node of a cluster: its checkpoints name it and are published.
        let mut audit_setup = self.audit;
        let publication = self
            .cluster
            .as_ref()
            .map(|c| audit_setup.join_cluster(c.coordination.node_id()));
        let tls = grpc::PreparedTls::new(&self.tls).context("configuring TLS")?;
        let mut kms = Kms::new(
            self.store,
            self.hsm,
            self.authorizer,
            self.clock,
            self.options,
        );
        if let Some(files) = self.legacy_approvals {
            kms = kms.with_legacy_approvals(files);
        }
        if let Some(cluster) = &self.cluster {
            kms = kms
                .with_shared_store(cluster.shared)
                .with_coordination(Arc::clone(&cluster.coordination));
        }
        let kms = Arc::new(kms);
        let (audit, store_mark) = audit::open_trail(&kms, &audit_setup).await?;
        // Before anything reads a key record: the store refuses them until
        // its MAC key is installed.
        let integrity = kms
            .store_integrity(&audit)
            .await
            .context("checking the integrity of the store (its MAC key is HSM-wrapped)")?;
        kms.attach_audit_log(Arc::clone(&audit));
        // Fresh before the first request: the first poll of the change
        // feed is made here, and a node that cannot make it does not start.
        let coordination: Arc<dyn Coordination> = match &self.cluster {
            Some(cluster) => Arc::clone(&cluster.coordination),
            None => Arc::new(LocalCoordination::default()),
        };
        let follower = match &self.cluster {
            Some(cluster) => Some(tasks::start_following(&kms, cluster).await?),
            None => None,
        };
        let lease_ttl = self.cluster.as_ref().map(|c| c.lease_ttl);
        let cluster_audit = match (&self.cluster, publication) {
            (Some(cluster), Some(queue)) => {
                Some(tasks::ClusterAudit::start(&audit, cluster, queue, clock))
            }
            _ => None,
        };
        let client_auth = tls.client_auth();
        let listener = match self.listener {
            Some(listener) => listener,
            None => TcpListener::bind(self.listen)
                .await
                .with_context(|| format!("cannot listen on {}", self.listen))?,
        };
        let addr = listener.local_addr().context("local address")?;
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let metrics_listener = match (self.metrics_listener, self.metrics_listen) {
            (Some(listener), _) => Some(listener),
            (None, Some(at)) => Some(
                TcpListener::bind(at)
                    .await
                    .with_context(|| format!("cannot listen for metrics on {at}"))?,
            ),
            (None, None) => None,
        };
        let metrics_server = match metrics_listener {
            Some(listener) => Some(
                tasks::start_metrics(
                    listener,
                    &kms,
                    &audit,
                    &metrics,
                    &client_auth,
                    &integrity,
                    tasks::ClusterPage {
                        metrics: self.cluster.as_ref().and_then(|c| c.metrics.clone()),
                        coordination: Arc::clone(&coordination),
                    },
                )
                .await?,
            ),
            None => None,
        };
        let pipeline = Arc::new(Pipeline::new(Arc::clone(&kms), Arc::clone(&audit), metrics));
        let xks = self
            .xks
            .map(|setup| crate::xks::start(setup, Arc::clone(&pipeline)))
            .transpose()
            .context("starting the XKS front")?;
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(grpc::serve(
            pipeline,
            Arc::clone(&audit),
            listener,
            tls,
            self.limits,
            async move {
                let _ = rx.await;
            },
        ));
        let crl_watcher = client_auth
            .crl_path()
            .is_some()
            .then(|| tasks::spawn_crl_watcher(Arc::clone(&client_auth), crl_reload_interval));
        let scheduler = self.scheduler_interval.map(|every| {
            tasks::spawn_scheduler(
                Arc::clone(&kms),
                Arc::clone(&audit),
                every,
                Arc::clone(&coordination),
                lease_ttl.unwrap_or(every.saturating_mul(2)),
            )
        });
        Ok(RunningServer {
            addr,
            xks_addr: xks.as_ref().map(|x| x.addr),
            xks,
            kms,
            audit,
            simulator: self.simulator,
            shutdown: Some(tx),
            task,
            scheduler,
            follower,
            client_auth,
            crl_watcher,
            metrics_addr: metrics_server.as_ref().map(|(addr, _)| *addr),
            metrics_task: metrics_server.map(|(_, task)| task),
            store_mark,
            cluster_audit,
            _dir_lock: self.dir_lock,
        })
    }
}

/// How long `stop` waits for the audit high-water mark of the final
/// checkpoint to be stored.
const MARK_SETTLE: Duration = Duration::from_secs(5);

/// A running server.
#[derive(Debug)]
pub struct RunningServer {
    pub addr: SocketAddr,
    /// Where the AWS XKS front listens, if it is on.
    pub xks_addr: Option<SocketAddr>,
    xks: Option<crate::xks::RunningXks>,
    pub kms: Arc<Kms>,
    pub audit: Arc<AuditTrail>,
    /// The in-process simulated HSM of `coffre dev` (for fault injection in
    /// tests); `None` with a separate HSM.
    pub simulator: Option<Arc<hsm_sim::Simulator>>,
    /// Where the metrics page is served, if anywhere.
    pub metrics_addr: Option<SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
    scheduler: Option<JoinHandle<()>>,
    /// Follows the other nodes' changes (cluster only).
    follower: Option<JoinHandle<()>>,
    client_auth: Arc<grpc::ClientAuth>,
    crl_watcher: Option<JoinHandle<()>>,
    metrics_task: Option<JoinHandle<()>>,
    /// The audit high-water mark's task, waited for at stop.
    store_mark: Option<Arc<audit::StoreMark>>,
    /// Checkpoint publication and the digest signer (cluster only).
    cluster_audit: Option<tasks::ClusterAudit>,
    /// The data directory's lock (`coffre dev`), released with the server.
    _dir_lock: Option<DirLock>,
}

impl RunningServer {
    /// Re-reads the CRL now (what SIGHUP does): new connections are verified
    /// against it. If it does not load, the previous one stays in force and
    /// the error is returned.
    pub fn reload_crl(&self) -> anyhow::Result<()> {
        self.client_auth.reload()
    }

    /// Stops accepting, drains in-flight requests, and waits.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        for task in [
            self.scheduler.take(),
            self.follower.take(),
            self.crl_watcher.take(),
            self.metrics_task.take(),
        ]
        .into_iter()
        .flatten()
        {
            task.abort();
            let _ = task.await;
        }
        if let Some(cluster_audit) = &mut self.cluster_audit {
            cluster_audit.stop_signing().await;
        }
        self.audit.close_followers();
        // The XKS front's in-flight requests are recorded before the log
        // closes, as gRPC's are.
        if let Some(xks) = self.xks.take()
            && let Err(e) = xks.stop().await
        {
            tracing::warn!(error = %e, "the XKS front stopped with an error");
        }
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let served = self.task.await.context("server task");
        // The final checkpoint signs every record written.
        let audit = Arc::clone(&self.audit);
        let _ = tokio::task::spawn_blocking(move || audit.shutdown()).await;
        if let Some(mark) = &self.store_mark
            && !mark.settle(MARK_SETTLE).await
        {
            tracing::warn!(
                "the audit log's last checkpoint is not yet remembered in the store; the next \
                 start accepts a mark one checkpoint behind"
            );
        }
        // The final checkpoint reaches the database if it can, soon.
        if let Some(cluster_audit) = self.cluster_audit.take() {
            cluster_audit.finish(MARK_SETTLE).await;
        }
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
