//! The server's background tasks and the audit log's opening: the
//! scheduler (due rotations and destructions, each audited), the CRL
//! watcher, the metrics page.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::audit::{AuditEntry, AuditTrail};
use crate::grpc;
use crate::service::{Kms, SchedulerReport};

/// Destruction after the waiting period and automatic rotation, every
/// `every`; each action is audited.
pub(super) fn spawn_scheduler(
    kms: Arc<Kms>,
    trail: Arc<AuditTrail>,
    every: Duration,
) -> JoinHandle<()> {
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
                audit_scheduler(&trail, &report).await;
            }
        }
    })
}

/// The scheduler's own actions are audited like requests, under the
/// principal `coffre/scheduler`.
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

/// Serves the metrics page on `at` (plain HTTP): the requests counted by
/// the gRPC layer, the core's caches and HSM calls, the audit log's state.
pub(super) async fn start_metrics(
    at: SocketAddr,
    kms: &Arc<Kms>,
    trail: &Arc<AuditTrail>,
    metrics: &Arc<crate::metrics::Metrics>,
    integrity: &Arc<crate::store::integrity::RecordMac>,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(at)
        .await
        .with_context(|| format!("cannot listen for metrics on {at}"))?;
    let addr = listener.local_addr().context("metrics address")?;
    let (kms, trail, metrics) = (Arc::clone(kms), Arc::clone(trail), Arc::clone(metrics));
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
            "coffre_audit_healthy",
            "gauge",
            "1 while the audit log can be written.",
            &[("", healthy)],
        );
        render_value(
            &mut out,
            "coffre_store_integrity_failures_total",
            "counter",
            "Stored records (keys, versions, approvals) refused because they failed their MAC.",
            &[("", integrity.failures() as f64)],
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
