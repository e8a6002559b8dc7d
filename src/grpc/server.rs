//! The gRPC server: mTLS always on (our own rustls acceptor, see
//! [`super::tls`]), coffre's services, health and reflection, and the
//! bounds that keep it available under abuse ([`ServerLimits`]).
//!
//! Health and reflection (`grpc.reflection.v1` and `v1alpha`, the same
//! descriptors) need a client certificate from one of the client CAs, as
//! every connection does, but no role, and they are not audited nor
//! rate-limited: they say nothing about keys. The readiness check behind
//! `grpc.health.v1` (`readiness`, every second) is also what the metrics
//! listener's `/readyz` answers ([`crate::metrics::probes`]).
//!
//! Accepting never waits: every TCP connection is accepted at once and its
//! TLS handshake runs in a task of its own under `handshake_timeout`. At most
//! `max_handshakes_per_ip` handshakes are pending per source address and
//! `max_handshakes` in all; beyond either bound the oldest pending handshake
//! (of that address, or of all) is dropped, so idle or slow connections can
//! never keep a real client from connecting. Established connections are
//! bounded by HTTP/2 (`max_concurrent_streams`, keepalive pings), a
//! per-connection concurrency limit, a request timeout and a maximum
//! response size on every service.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tokio_rustls::{LazyConfigAcceptor, TlsAcceptor};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use super::api::GrpcApi;
use super::pb;
use super::tls::PreparedTls;
use crate::metrics::Metrics;
use crate::metrics::probes::{Component, Problem, Report, human_bytes};
use crate::pipeline::Pipeline;

/// How long one client connection may live before the server closes it
/// (gracefully): a revoked certificate is refused at the next handshake.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(300);

/// The bounds of the gRPC listener (`[limits]` in the configuration; the
/// defaults are what an absent section gives, and what `coffre dev` uses).
#[derive(Clone, Debug, PartialEq)]
pub struct ServerLimits {
    /// A client that has not finished its TLS handshake by then is dropped.
    pub handshake_timeout: Duration,
    /// A client that has not sent its whole ClientHello by then is dropped
    /// (at most `handshake_timeout`): a silent connection holds a
    /// handshake slot this long, not the whole handshake's time.
    pub client_hello_timeout: Duration,
    /// Pending handshakes in all; beyond, the oldest is dropped.
    pub max_handshakes: usize,
    /// Pending handshakes per source address; beyond, that address's oldest
    /// is dropped.
    pub max_handshakes_per_ip: usize,
    /// HTTP/2 streams (requests) open at once on one connection.
    pub max_concurrent_streams: u32,
    /// Requests served at once on one connection (the others wait).
    pub max_requests_per_connection: usize,
    /// A request (up to its response headers; a stream's messages are not
    /// bounded by it) is cancelled after this long, whatever its deadline.
    pub request_timeout: Duration,
    /// HTTP/2 pings on an idle connection, and how long to wait for the
    /// answer before closing it.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// The largest message the server sends (and accepts).
    pub max_message_bytes: usize,
    /// Alert (log and metric) when the audit log's volume has less free
    /// space than this many bytes…
    pub audit_min_free_bytes: u64,
    /// …or than this percentage of its size. Below both, the node is not
    /// ready (`/readyz` 503, `grpc.health.v1` NOT_SERVING): it is about to
    /// refuse every request, and the orchestrator should send them
    /// elsewhere.
    pub audit_min_free_percent: u8,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(3),
            client_hello_timeout: Duration::from_secs(1),
            max_handshakes: 256,
            max_handshakes_per_ip: 8,
            max_concurrent_streams: 128,
            max_requests_per_connection: 64,
            request_timeout: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            max_message_bytes: 16 * 1024 * 1024,
            audit_min_free_bytes: 1024 * 1024 * 1024,
            audit_min_free_percent: 10,
        }
    }
}

/// How often the audit volume's free space is looked at, and how often at
/// most the warning is logged while it stays low.
const FREE_SPACE_CHECK: Duration = Duration::from_secs(10);
const FREE_SPACE_WARNING: Duration = Duration::from_secs(60);
/// How often coalesced rate-limit refusals are written out.
const REFUSAL_FLUSH: Duration = Duration::from_millis(250);

/// Serves until `shutdown` resolves, then drains in-flight requests.
pub async fn serve(
    pipeline: Arc<Pipeline>,
    audit: Arc<crate::audit::AuditTrail>,
    listener: TcpListener,
    tls: PreparedTls,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    // Both versions of reflection, each listing both (older tools and
    // grpcio-reflection's Python client speak v1alpha only).
    let reflection = reflection_descriptors()
        .build_v1()
        .context("building the reflection service (v1)")?;
    let reflection_v1alpha = reflection_descriptors()
        .build_v1alpha()
        .context("building the reflection service (v1alpha)")?;

    let kms = Arc::clone(pipeline.kms());
    let metrics = Arc::clone(pipeline.metrics());
    let api = GrpcApi::new(Arc::clone(&pipeline), tls.binding());
    let max = limits.max_message_bytes;
    let audit_service = pb::audit_service_server::AuditServiceServer::new(api.clone())
        .max_encoding_message_size(max)
        .max_decoding_message_size(max);
    let key_service = pb::key_service_server::KeyServiceServer::new(api.clone())
        .max_encoding_message_size(max)
        .max_decoding_message_size(max);
    let hsm_service = pb::hsm_service_server::HsmServiceServer::new(api.clone())
        .max_encoding_message_size(max)
        .max_decoding_message_size(max);
    let approval_service = pb::approval_service_server::ApprovalServiceServer::new(api.clone())
        .max_encoding_message_size(max)
        .max_decoding_message_size(max);
    let data_key_service = pb::data_key_service_server::DataKeyServiceServer::new(api)
        .max_encoding_message_size(max)
        .max_decoding_message_size(max);

    // Rate-limit refusals beyond the first of each second are counted;
    // their counts are written when their second closes.
    let flusher = {
        let pipeline = Arc::clone(&pipeline);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(REFUSAL_FLUSH);
            loop {
                every.tick().await;
                pipeline.flush_refusals(false);
            }
        })
    };
    let free_space = tokio::spawn(watch_free_space(
        Arc::clone(&audit),
        Arc::clone(&metrics),
        limits.clone(),
    ));

    // One readiness check a second feeds both grpc.health.v1 and the
    // metrics listener's /readyz, so that they never disagree.
    let watcher = {
        let kms = Arc::clone(&kms);
        let metrics = Arc::clone(&metrics);
        let reporter = health_reporter.clone();
        let limits = limits.clone();
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let (report, details) = readiness(&kms, &audit, &metrics, &limits).await;
                let status = if report.is_ready() {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                // Logged when it changes, with the errors behind it.
                if metrics.readiness.publish(report.clone()) {
                    match &report {
                        Report::NotReady(problems) => {
                            for p in problems {
                                tracing::warn!(
                                    component = p.component.name(),
                                    "not ready: {}",
                                    p.reason
                                );
                            }
                            for (component, error) in &details {
                                tracing::warn!(component = component.name(), %error, "not ready");
                            }
                        }
                        _ => tracing::info!("ready"),
                    }
                } else {
                    for (component, error) in &details {
                        tracing::debug!(component = component.name(), %error, "still not ready");
                    }
                }
                if last != Some(status) {
                    for name in ["", "coffre.v1.KeyService", "coffre.v1.DataKeyService"] {
                        reporter.set_service_status(name, status).await;
                    }
                    last = Some(status);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };

    let (incoming, acceptor) = tls_incoming(
        listener,
        TlsAcceptor::from(tls.config),
        limits.clone(),
        metrics,
    );
    // Revocation and expiry are checked at the handshake: bound how long a
    // connection lives so that a revoked certificate is cut off within
    // minutes, not whenever the client reconnects.
    let result = Server::builder()
        .max_connection_age(MAX_CONNECTION_AGE)
        .max_connection_age_grace(Duration::from_secs(30))
        .max_concurrent_streams(limits.max_concurrent_streams)
        .concurrency_limit_per_connection(limits.max_requests_per_connection)
        .timeout(limits.request_timeout)
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(key_service)
        .add_service(data_key_service)
        .add_service(hsm_service)
        .add_service(approval_service)
        .add_service(audit_service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .context("serving gRPC");
    // Aborted and awaited: what they hold (the core, hence the store) is
    // dropped before `serve` returns, so that the store can be reopened.
    for task in [watcher, acceptor, flusher, free_space] {
        task.abort();
        let _ = task.await;
    }
    // Every request has been answered: the counts of refusals still in an
    // open second are written now, before the audit log closes.
    pipeline.flush_refusals(true);
    result
}

/// What both reflection services describe: coffre's services, health and
/// (added by the builder) reflection itself, in both versions.
fn reflection_descriptors() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
}

/// The readiness check: the HSM and the store answer (`Kms::check_hsm`,
/// `Kms::check_store`, run together), the audit log's last write succeeded,
/// and its volume's free space, as last measured, is not below both of
/// `[limits]`' floors (below one of them is an alert only: a 10% floor on a
/// large volume leaves gigabytes, no reason to stop serving).
/// Each failing component gets a fixed sentence; the errors behind them
/// are returned beside the report, for the log only (they may name an
/// endpoint, a module or a file).
/// On a node sharing its store with others (strict mode), the caches must
/// also be known fresh: a node that has not read the change feed within
/// `max_staleness_ms` refuses data keys, and a load balancer should send
/// it none.
async fn readiness(
    kms: &crate::service::Kms,
    audit: &crate::audit::AuditTrail,
    metrics: &Metrics,
    limits: &ServerLimits,
) -> (Report, Vec<(Component, String)>) {
    let (hsm, store) = tokio::join!(kms.check_hsm(), kms.check_store());
    let mut problems = Vec::new();
    let mut details = Vec::new();
    if let Err(e) = hsm {
        problems.push(Problem {
            component: Component::Hsm,
            reason: hsm_reason(&e).to_string(),
        });
        details.push((Component::Hsm, e.to_string()));
    }
    if let Err(e) = store {
        details.push((Component::Store, e.to_string()));
        problems.push(Problem {
            component: Component::Store,
            reason: "the key store does not answer a read; see the server log".to_string(),
        });
    }
    if let Err(e) = kms.check_fresh_for_readiness() {
        details.push((Component::ClusterFreshness, e.to_string()));
        problems.push(Problem {
            component: Component::ClusterFreshness,
            reason: "this node could not read the cluster's key changes within \
                     max_staleness_ms, so it refuses data keys until it can; see the server log"
                .to_string(),
        });
    }
    if !audit.is_healthy() {
        problems.push(Problem {
            component: Component::AuditLog,
            reason: "the audit log cannot be written, so every request is refused (fail \
                     closed) until it can; see the server log"
                .to_string(),
        });
    }
    if let Some((free, total)) = metrics.audit_volume_measured()
        && free_space_is_critical(free, total, limits)
    {
        problems.push(Problem {
            component: Component::AuditVolume,
            reason: format!(
                "{} free of {} on the audit log's volume, below audit_min_free_bytes ({}) and \
                 audit_min_free_percent ({}%); when it is full every request is refused: free \
                 space or lower audit.retention_days",
                human_bytes(free),
                human_bytes(total),
                human_bytes(limits.audit_min_free_bytes),
                limits.audit_min_free_percent,
            ),
        });
    }
    (Report::from_problems(problems), details)
}

/// What `/readyz` says of a failed HSM check.
fn hsm_reason(e: &crate::error::Error) -> &'static str {
    use crate::hsm::HsmError;
    match e {
        crate::error::Error::Hsm(HsmError::Unavailable(_)) => {
            "the HSM does not answer (outage, timeout or refused session); see the server log"
        }
        crate::error::Error::Hsm(HsmError::Tampered) => {
            "the HSM has lost its root keys (tamper response); no key can be used"
        }
        crate::error::Error::Hsm(HsmError::LoginFailed(_)) => {
            "the HSM refuses the login (check the PIN); see the server log"
        }
        _ => "the HSM fails a key operation; see the server log",
    }
}

/// Watches the free space of the audit log's volume: the metric
/// `coffre_audit_volume_free_bytes`, and a warning at most once a minute
/// while it is below the limits (a full volume stops the service: the log
/// fails closed).
async fn watch_free_space(
    audit: Arc<crate::audit::AuditTrail>,
    metrics: Arc<Metrics>,
    limits: ServerLimits,
) {
    let dir = match audit.path().parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let mut warned: Option<Instant> = None;
    let mut every = tokio::time::interval(FREE_SPACE_CHECK);
    loop {
        every.tick().await;
        let probe = dir.clone();
        let space = tokio::task::spawn_blocking(move || {
            Ok::<_, std::io::Error>((fs2::available_space(&probe)?, fs2::total_space(&probe)?))
        })
        .await;
        let (free, total) = match space {
            Ok(Ok(space)) => space,
            Ok(Err(e)) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot read the audit volume's free space");
                continue;
            }
            Err(_) => continue,
        };
        metrics.audit_volume(free, total);
        if free_space_is_low(free, total, &limits)
            && warned.is_none_or(|at| at.elapsed() >= FREE_SPACE_WARNING)
        {
            warned = Some(Instant::now());
            tracing::warn!(
                dir = %dir.display(),
                free_bytes = free,
                total_bytes = total,
                "the audit log's volume is running out of space: when it is full, coffre refuses \
                 every request (fail closed); free space or lower audit.retention_days"
            );
        }
    }
}

/// Below `audit_min_free_bytes` or `audit_min_free_percent` of the volume:
/// the alert.
fn free_space_is_low(free: u64, total: u64, limits: &ServerLimits) -> bool {
    free < limits.audit_min_free_bytes || below_percent(free, total, limits)
}

/// Below both: not ready.
fn free_space_is_critical(free: u64, total: u64, limits: &ServerLimits) -> bool {
    free < limits.audit_min_free_bytes && below_percent(free, total, limits)
}

fn below_percent(free: u64, total: u64, limits: &ServerLimits) -> bool {
    u128::from(free) * 100 < u128::from(total) * u128::from(limits.audit_min_free_percent)
}

/// The handshakes in progress: by arrival (oldest first), and how many per
/// source address. Dropping an entry's sender cancels its handshake.
#[derive(Debug, Default)]
struct Handshakes {
    order: BTreeMap<u64, (IpAddr, oneshot::Sender<()>)>,
    per_ip: HashMap<IpAddr, usize>,
    next: u64,
}

impl Handshakes {
    /// Removes one (finished, or dropped to make room); `false` if it was
    /// already gone.
    fn remove(&mut self, seq: u64) -> bool {
        let Some((ip, _cancel)) = self.order.remove(&seq) else {
            return false;
        };
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
        true
    }

    /// Makes room for one more from `ip` (dropping the oldest of `ip`, then
    /// the oldest of all, as the bounds require) and registers it. Returns
    /// its number, the receiver its task watches, and how many were dropped.
    fn admit(&mut self, ip: IpAddr, limits: &ServerLimits) -> (u64, oneshot::Receiver<()>, u64) {
        let mut dropped = 0;
        if self.per_ip.get(&ip).copied().unwrap_or(0) >= limits.max_handshakes_per_ip.max(1) {
            let oldest = self
                .order
                .iter()
                .find(|(_, (from, _))| *from == ip)
                .map(|(seq, _)| *seq);
            if let Some(seq) = oldest
                && self.remove(seq)
            {
                dropped += 1;
            }
        }
        while self.order.len() >= limits.max_handshakes.max(1) {
            let Some(seq) = self.order.keys().next().copied() else {
                break;
            };
            if self.remove(seq) {
                dropped += 1;
            }
        }
        let seq = self.next;
        self.next += 1;
        let (cancel, cancelled) = oneshot::channel();
        self.order.insert(seq, (ip, cancel));
        *self.per_ip.entry(ip).or_insert(0) += 1;
        (seq, cancelled, dropped)
    }
}

/// A handshake's place in [`Handshakes`], given back when its task ends
/// (finished, timed out, dropped or aborted).
struct Slot {
    table: Arc<Mutex<Handshakes>>,
    metrics: Arc<Metrics>,
    seq: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        table.remove(self.seq);
        self.metrics
            .handshakes_in_flight
            .store(table.order.len() as u64, Ordering::Relaxed);
    }
}

/// Accepts TCP connections without waiting and completes their TLS
/// handshakes concurrently, each under `handshake_timeout` and within the
/// bounds of [`ServerLimits`] (see the module docs); yields the established
/// TLS streams. A failed handshake (no certificate, another CA, expired,
/// revoked, not TLS, too slow, dropped) is logged and dropped: it never
/// stops the loop.
fn tls_incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    limits: ServerLimits,
    metrics: Arc<Metrics>,
) -> (
    ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>>,
    JoinHandle<()>,
) {
    let (tx, rx) = mpsc::channel(64);
    let table = Arc::new(Mutex::new(Handshakes::default()));
    let task = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and the like: wait a little rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let _ = tcp.set_nodelay(true);
            let ip = peer.ip().to_canonical();
            let (seq, cancelled, dropped) = {
                let mut t = table.lock().unwrap_or_else(|e| e.into_inner());
                let admitted = t.admit(ip, &limits);
                metrics
                    .handshakes_in_flight
                    .store(t.order.len() as u64, Ordering::Relaxed);
                admitted
            };
            if dropped > 0 {
                metrics
                    .handshakes_dropped
                    .fetch_add(dropped, Ordering::Relaxed);
                tracing::info!(%peer, dropped, "too many pending TLS handshakes: dropped the oldest");
            }
            let slot = Slot {
                table: Arc::clone(&table),
                metrics: Arc::clone(&metrics),
                seq,
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let metrics = Arc::clone(&metrics);
            let (timeout, hello) = (limits.handshake_timeout, limits.client_hello_timeout);
            tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + timeout;
                let hello_by = tokio::time::Instant::now() + hello.min(timeout);
                // The ClientHello first, under its own shorter bound, then
                // the rest of the handshake under the whole one.
                let handshake = async {
                    let lazy = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
                    match tokio::time::timeout_at(hello_by, lazy).await {
                        Ok(Ok(start)) => {
                            let config = Arc::clone(acceptor.config());
                            tokio::time::timeout_at(deadline, start.into_stream(config)).await
                        }
                        Ok(Err(e)) => Ok(Err(e)),
                        Err(elapsed) => Err(elapsed),
                    }
                };
                let handshake = tokio::select! {
                    h = handshake => h,
                    _ = cancelled => return,
                };
                drop(slot);
                match handshake {
                    Ok(Ok(stream)) => {
                        // The server has stopped if the receiver is gone.
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::info!(%peer, error = %e, "TLS handshake refused");
                    }
                    Err(_) => {
                        metrics.handshakes_timed_out.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(%peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    (ReceiverStream::new(rx), task)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn per_address_then_global_bounds_drop_the_oldest() {
        let limits = ServerLimits {
            max_handshakes: 5,
            max_handshakes_per_ip: 2,
            ..ServerLimits::default()
        };
        let mut t = Handshakes::default();
        let (a0, mut a0_rx, d) = t.admit(ip(1), &limits);
        assert_eq!(d, 0);
        let (_, _a1_rx, _) = t.admit(ip(1), &limits);
        // A third from the same address drops that address's oldest.
        let (_, _a2_rx, d) = t.admit(ip(1), &limits);
        assert_eq!(d, 1);
        assert!(!t.order.contains_key(&a0));
        assert!(
            a0_rx.try_recv().is_err(),
            "its sender is gone: the task stops"
        );
        assert_eq!(t.per_ip[&ip(1)], 2);
        // Other addresses fill the global bound; the next drops the oldest.
        let (b0, _b0_rx, _) = t.admit(ip(2), &limits);
        let (_, _c0_rx, _) = t.admit(ip(3), &limits);
        assert_eq!(t.order.len(), 4);
        let (_, _d0_rx, _) = t.admit(ip(4), &limits);
        assert_eq!(t.order.len(), 5);
        let (_, _e0_rx, d) = t.admit(ip(5), &limits);
        assert_eq!(d, 1);
        assert_eq!(t.order.len(), 5);
        assert_eq!(t.per_ip[&ip(1)], 1, "the oldest of all was from ip 1");
        // Finishing removes once; a second removal is a no-op.
        assert!(t.remove(b0));
        assert!(!t.remove(b0));
        assert!(!t.per_ip.contains_key(&ip(2)));
    }

    #[test]
    fn free_space_alerts_on_bytes_or_percent() {
        let limits = ServerLimits {
            audit_min_free_bytes: 1000,
            audit_min_free_percent: 10,
            ..ServerLimits::default()
        };
        assert!(free_space_is_low(999, 1_000_000_000, &limits));
        assert!(free_space_is_low(50_000, 1_000_000, &limits));
        assert!(!free_space_is_low(100_000, 1_000_000, &limits));
    }

    /// Readiness fails only below both floors: 8% free of a large volume
    /// (below the percentage, gigabytes above the bytes) stays ready.
    #[test]
    fn readiness_fails_on_free_space_only_below_both_floors() {
        let limits = ServerLimits::default();
        let gib = 1024 * 1024 * 1024;
        assert!(free_space_is_low(20 * gib, 250 * gib, &limits));
        assert!(!free_space_is_critical(20 * gib, 250 * gib, &limits));
        assert!(!free_space_is_critical(gib / 2, 2 * gib, &limits));
        assert!(free_space_is_critical(gib / 2, 250 * gib, &limits));
    }
}
