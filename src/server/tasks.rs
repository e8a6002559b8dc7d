//! The server's background tasks and the audit log's opening: the
//! scheduler (due rotations and destructions, each audited), the CRL
//! watcher, the metrics page and the probes beside it, and on a node of a
//! cluster the publication of its audit checkpoints and the digest signer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::audit::{AuditEntry, AuditTrail};
use crate::cluster::audit::{self as cluster_audit, CheckpointQueue};
use crate::cluster::{Coordination, Lease, leases};
use crate::grpc;
use crate::service::{Kms, SchedulerReport};

/// Destruction after the waiting period and automatic rotation, every
/// `every`; each action is audited before it takes effect ("destroying",
/// "rotating", under the write guard; an action whose record cannot be
/// written is not taken) and after it. No pass runs while the audit log
/// cannot be written.
///
/// A pass runs only on the node that holds the scheduler's lease
/// ([`crate::cluster::leases::SCHEDULER`]; alone on a store, always), and
/// each action is taken only while the lease is still valid by this node's
/// clock. Each action stays a compare-and-swap in the store, so a lease
/// held twice (a paused process) never doubles one.
pub(super) fn spawn_scheduler(
    kms: Arc<Kms>,
    trail: Arc<AuditTrail>,
    every: Duration,
    coordination: Arc<dyn Coordination>,
    lease_ttl: Duration,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !trail.is_healthy() {
                tracing::warn!("scheduler: the audit log cannot be written; pass skipped");
                continue;
            }
            let lease = match coordination.acquire(leases::SCHEDULER, lease_ttl).await {
                Ok(Some(lease)) => lease,
                Ok(None) => {
                    tracing::debug!("scheduler: another node holds the lease; pass skipped");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "scheduler: the lease cannot be taken; pass skipped");
                    continue;
                }
            };
            let announcer = Announcer {
                trail: &trail,
                lease: &lease,
            };
            let report = kms.run_scheduler_announcing(&announcer).await;
            if report != SchedulerReport::default() {
                tracing::info!(
                    rotated = report.rotated.len(),
                    destroyed = report.destroyed.len(),
                    failed = report.failed,
                    "scheduler pass"
                );
                audit_scheduler(&trail, &report).await;
            }
        }
    })
}

/// Records a scheduled action before it takes effect, while the lease
/// holds; an error stops it.
struct Announcer<'a> {
    trail: &'a AuditTrail,
    lease: &'a Lease,
}

impl crate::service::Announce for Announcer<'_> {
    async fn announce(
        &self,
        operation: &'static str,
        id: crate::model::KeyId,
    ) -> crate::error::Result<()> {
        if !self.lease.is_valid() {
            return Err(crate::error::Error::FailedPrecondition(format!(
                "the {} lease ran out during the pass; the action waits for the next one",
                self.lease.name
            )));
        }
        announce(self.trail, operation, id).await
    }
}

/// Joins the other nodes sharing the store: registers this node, reads
/// the change feed's head and makes the first poll (so that the node is
/// fresh before it serves; a node that cannot is not started), then
/// follows the feed: a poll at least every `poll_interval`, sooner when
/// the store says a key changed; and, beside it in the same task, a
/// heartbeat every second. The heartbeat is a commit on the coordination
/// connection: on the polls' path, a slow commit (or a connection that
/// stopped answering) would delay the next poll and let the node go stale
/// while the store still answers its reads.
pub(super) async fn start_following(
    kms: &Arc<Kms>,
    cluster: &super::ClusterSetup,
) -> anyhow::Result<JoinHandle<()>> {
    let coordination = Arc::clone(&cluster.coordination);
    coordination
        .heartbeat(kms.freshness_report())
        .await
        .context("registering this node in the cluster")?;
    let head = kms.feed_head().await.context("reading the change feed")?;
    let watermark = kms
        .poll_changes(head)
        .await
        .context("reading the change feed")?;
    let kms = Arc::clone(kms);
    let poll_interval = cluster.poll_interval;
    Ok(tokio::spawn(async move {
        tokio::join!(
            follow(&kms, &*coordination, watermark, poll_interval),
            heartbeats(&kms, &*coordination)
        );
    }))
}

/// Polls the change feed from `watermark`, for ever.
async fn follow(
    kms: &Kms,
    coordination: &dyn Coordination,
    mut watermark: u64,
    poll_interval: Duration,
) {
    let mut failing = false;
    loop {
        coordination.wait_for_changes(poll_interval).await;
        match kms.poll_changes(watermark).await {
            Ok(next) => {
                if failing {
                    tracing::info!("the change feed is read again: key states confirmed");
                }
                failing = false;
                watermark = next;
            }
            Err(e) => {
                if !failing {
                    tracing::error!(error = %e, "the change feed cannot be read; this node stops serving data keys once its freshness runs out (strict mode)");
                }
                failing = true;
            }
        }
    }
}

/// Tells the node registry this node is alive, and how fresh its caches
/// are, every [`HEARTBEAT_EVERY`].
async fn heartbeats(kms: &Kms, coordination: &dyn Coordination) {
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // immediate: the node registered just now
    loop {
        tick.tick().await;
        if let Err(e) = coordination.heartbeat(kms.freshness_report()).await {
            tracing::warn!(error = %e, "heartbeat failed");
        }
    }
}

/// A node's share of the cluster audit (`crate::cluster::audit`): the
/// publisher of its checkpoints and the digest signer (which signs only
/// while it holds the lease).
#[derive(Debug)]
pub(super) struct ClusterAudit {
    queue: Arc<CheckpointQueue>,
    publisher: JoinHandle<()>,
    signer: Option<JoinHandle<()>>,
}

impl ClusterAudit {
    pub(super) fn start(
        trail: &Arc<AuditTrail>,
        cluster: &super::ClusterSetup,
        queue: Arc<CheckpointQueue>,
        clock: Arc<dyn crate::model::Clock>,
    ) -> Self {
        let coordination = Arc::clone(&cluster.coordination);
        let publisher =
            cluster_audit::spawn_publisher(Arc::clone(&queue), Arc::clone(&coordination));
        let signer = cluster_audit::spawn_digest_signer(
            Arc::clone(trail),
            coordination,
            clock,
            cluster.digest_interval,
            cluster.lease_ttl,
        );
        Self {
            queue,
            publisher,
            signer: Some(signer),
        }
    }

    /// Stops signing digests (first, at stop).
    pub(super) async fn stop_signing(&mut self) {
        if let Some(task) = self.signer.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// After the final checkpoint: lets the publisher drain the queue for
    /// at most `limit`, then stops it.
    pub(super) async fn finish(mut self, limit: Duration) {
        self.stop_signing().await;
        let deadline = tokio::time::Instant::now() + limit;
        while !self.queue.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if !self.queue.is_empty() {
            tracing::warn!(
                waiting = self.queue.len(),
                "audit checkpoints not yet published at stop; the next digest lists this \
                 node's newer head once it publishes again"
            );
        }
        self.publisher.abort();
        let _ = self.publisher.await;
    }
}

/// How often a node tells the registry it is alive.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

async fn announce(
    trail: &AuditTrail,
    operation: &'static str,
    id: crate::model::KeyId,
) -> crate::error::Result<()> {
    let detail = match operation {
        "DestroyKey" => "destroying: the waiting period is over",
        _ => "rotating: the rotation period is over",
    };
    let entry = AuditEntry::system("coffre/scheduler", None, operation, id, detail);
    trail.record(entry).await.map(drop).map_err(|e| {
        tracing::error!(error = %e, key_id = %id, operation, "cannot audit a scheduled action; not taken");
        crate::error::Error::AuditUnwritable(e)
    })
}

/// The scheduler's own actions are audited like requests, under the
/// principal `coffre/scheduler`, before (see [`announce`]) and after.
async fn audit_scheduler(trail: &AuditTrail, report: &SchedulerReport) {
    let actions = report
        .rotated
        .iter()
        .map(|id| ("RotateKey", id))
        .chain(report.destroyed.iter().map(|id| ("DestroyKey", id)));
    for (operation, id) in actions {
        let entry = AuditEntry::system("coffre/scheduler", None, operation, *id, "scheduled");
        if let Err(e) = trail.record(entry).await {
            tracing::error!(error = %e, key_id = %id, operation, "cannot audit a scheduled action");
        }
    }
}

/// What the metrics page shows of the cluster: this node's own counts
/// (leases held, store errors, pool use; none alone on its store) and what
/// the coordination backend knows (the timeline fence).
pub(super) struct ClusterPage {
    pub metrics: Option<Arc<crate::metrics::cluster::ClusterMetrics>>,
    pub coordination: Arc<dyn Coordination>,
}

/// Serves the metrics page on `listener` (plain HTTP): the requests counted
/// by the gRPC layer, the core's caches and HSM calls, the audit log's
/// state; and the probes `/healthz` and `/readyz` (the readiness the gRPC
/// server publishes in `metrics.readiness`).
pub(super) async fn start_metrics(
    listener: TcpListener,
    kms: &Arc<Kms>,
    trail: &Arc<AuditTrail>,
    metrics: &Arc<crate::metrics::Metrics>,
    client_auth: &Arc<grpc::ClientAuth>,
    integrity: &Arc<crate::store::integrity::RecordMac>,
    cluster: ClusterPage,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let ClusterPage {
        metrics: cluster,
        coordination,
    } = cluster;
    let addr = listener.local_addr().context("metrics address")?;
    let ready: crate::metrics::http::Ready = {
        let metrics = Arc::clone(metrics);
        Arc::new(move || metrics.readiness.current())
    };
    let (kms, trail, metrics) = (Arc::clone(kms), Arc::clone(trail), Arc::clone(metrics));
    let client_auth = Arc::clone(client_auth);
    let integrity = Arc::clone(integrity);
    let render: crate::metrics::http::Render = Arc::new(move || {
        use crate::metrics::render_value;
        let mut out = String::with_capacity(16 * 1024);
        metrics.render_requests(&mut out);
        kms.render_metrics(&mut out);
        let healthy = if trail.is_healthy() { 1.0 } else { 0.0 };
        render_value(
            &mut out,
            "coffre_audit_backlog",
            "gauge",
            "Audit records waiting for the writer.",
            &[("", trail.backlog() as f64)],
        );
        render_value(
            &mut out,
            "coffre_audit_records_total",
            "counter",
            "Audit records written (the log's last seq).",
            &[("", trail.last_seq() as f64)],
        );
        render_value(
            &mut out,
            "coffre_audit_writes_total",
            "counter",
            "Writes to the audit log (batches of records, checkpoints).",
            &[("", trail.writes() as f64)],
        );
        render_value(
            &mut out,
            "coffre_audit_healthy",
            "gauge",
            "1 while the audit log can be written.",
            &[("", healthy)],
        );
        render_crl(&mut out, &client_auth);
        render_value(
            &mut out,
            "coffre_store_integrity_failures_total",
            "counter",
            "Stored records (keys, versions, approvals) refused because they failed their MAC.",
            &[("", integrity.failures() as f64)],
        );
        if let Some(cluster) = &cluster {
            cluster.render(&mut out);
        }
        coordination.render_metrics(&mut out);
        out
    });
    tracing::info!(
        %addr,
        "metrics on http://{addr}/metrics, probes on http://{addr}/healthz and /readyz"
    );
    let pages = crate::metrics::http::Pages {
        metrics: render,
        ready,
    };
    let task = tokio::spawn(crate::metrics::serve(
        listener,
        pages,
        std::future::pending(),
    ));
    Ok((addr, task))
}

/// The CRL's metrics: refused reloads, refused rollbacks (alert on any),
/// and until when the CRL in force is fresh (alert before it passes).
fn render_crl(out: &mut String, client_auth: &grpc::ClientAuth) {
    use crate::metrics::render_value;
    let Some(fresh_until) = client_auth.crl_fresh_until() else {
        return;
    };
    render_value(
        out,
        "coffre_crl_reloads_refused_total",
        "counter",
        "CRL reloads refused (unreadable, badly signed, stale or rolled back); the previous CRL stayed.",
        &[("", client_auth.crl_reloads_refused() as f64)],
    );
    render_value(
        out,
        "coffre_crl_rollbacks_refused_total",
        "counter",
        "CRLs refused because they were older than one already seen from their issuer.",
        &[("", client_auth.crl_rollbacks_refused() as f64)],
    );
    render_value(
        out,
        "coffre_crl_fresh_until_seconds",
        "gauge",
        "Unix time after which the CRL in force is stale (earliest nextUpdate plus the grace) and every handshake is refused.",
        &[("", fresh_until as f64)],
    );
}

/// Reloads the CRL on SIGHUP (unix) and whenever the file's modification
/// time or length changes. A CRL that does not load is logged and the
/// previous one stays in force.
pub(super) fn spawn_crl_watcher(
    client_auth: Arc<grpc::ClientAuth>,
    every: Duration,
) -> JoinHandle<()> {
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
