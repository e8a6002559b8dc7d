//! Prometheus metrics: counters and histograms kept in atomics (no lock and
//! no allocation on the request path), rendered in the text exposition
//! format on a separate plain-HTTP listener ([`serve`]), which also answers
//! the orchestrators' probes `/healthz` and `/readyz` ([`probes`]).
//!
//! What is exported:
//! - `coffre_requests_total{rpc,code}` and
//!   `coffre_request_duration_seconds{rpc}`: every audited RPC, by its gRPC
//!   status, latency from the start of the handler to the audit record
//!   written;
//! - `coffre_cache_hits_total{cache}` / `coffre_cache_misses_total{cache}`:
//!   the key, alias and CMK-material caches;
//! - `coffre_hsm_requests_total{call}`, `coffre_hsm_errors_total{call}`,
//!   `coffre_hsm_duration_seconds{call}`: every call to the HSM;
//! - `coffre_audit_backlog` (records waiting for the writer),
//!   `coffre_audit_records_total`, `coffre_audit_writes_total` (since
//!   start; the rate of records over the rate of writes is the group
//!   commit's mean batch), `coffre_audit_healthy`;
//! - `coffre_audit_volume_free_bytes`, `coffre_audit_volume_size_bytes`: the
//!   audit log's volume (measured every 10 s; a warning is logged at most
//!   once a minute while the free space is below `[limits]`
//!   `audit_min_free_bytes` or `audit_min_free_percent`);
//! - `coffre_tls_handshakes_in_flight`, `coffre_tls_handshakes_dropped_total`,
//!   `coffre_tls_handshakes_timed_out_total`: the accept loop's bounds;
//! - `coffre_ready`: 1 while the last readiness check passed (what `/readyz`
//!   and `grpc.health.v1` say);
//! - on a node of a shared store (PostgreSQL, [`cluster`]):
//!   `coffre_cluster_lease_holder{lease}`, `coffre_store_errors_total{kind}`,
//!   `coffre_store_pool_connections{state}`,
//!   `coffre_store_pool_max_connections`, `coffre_store_pool_waiters`
//!   (and, from the core, `coffre_cluster_staleness_seconds`,
//!   `coffre_cluster_stale_requests_total`).
//!
//! Metrics carry no key id, principal or context: labels come from fixed
//! sets (RPC names, status codes, cache and HSM call names), so the page
//! cannot leak what the audit log protects, and its size is bounded.

pub mod cluster;
pub mod http;
pub mod probes;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use http::serve;

use crate::authz::Operation;

/// The gRPC status codes, by number (google.rpc.Code).
pub const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// Upper bounds of the latency buckets, in microseconds (+Inf is implied).
const BUCKETS_US: [u64; 16] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 10_000_000,
];

/// A latency histogram with fixed buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS_US.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        if let Some(b) = BUCKETS_US
            .iter()
            .position(|&bound| us <= bound)
            .and_then(|i| self.buckets.get(i))
        {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (bound, b) in BUCKETS_US.iter().zip(&self.buckets) {
            cumulative += b.load(Ordering::Relaxed);
            let le = *bound as f64 / 1e6;
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// Request counters and latencies, by RPC (the audit log's operation).
#[derive(Debug)]
pub struct Metrics {
    requests: Vec<[AtomicU64; CODE_NAMES.len()]>,
    latency: Vec<Histogram>,
    /// TLS handshakes in progress (a gauge, set by the accept loop).
    pub handshakes_in_flight: AtomicU64,
    /// Pending handshakes dropped to make room (per-address or global bound).
    pub handshakes_dropped: AtomicU64,
    /// Handshakes not finished within the handshake timeout.
    pub handshakes_timed_out: AtomicU64,
    /// The audit volume's free and total bytes (`u64::MAX`: not measured yet).
    audit_free: AtomicU64,
    audit_total: AtomicU64,
    /// The last readiness check (`/readyz`, `grpc.health.v1`).
    pub readiness: probes::Readiness,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Operation::ALL
                .iter()
                .map(|_| std::array::from_fn(|_| AtomicU64::new(0)))
                .collect(),
            latency: Operation::ALL
                .iter()
                .map(|_| Histogram::default())
                .collect(),
            handshakes_in_flight: AtomicU64::new(0),
            handshakes_dropped: AtomicU64::new(0),
            handshakes_timed_out: AtomicU64::new(0),
            audit_free: AtomicU64::new(u64::MAX),
            audit_total: AtomicU64::new(u64::MAX),
            readiness: probes::Readiness::default(),
        }
    }
}

impl Metrics {
    /// One request of `op` answered with gRPC status `code` (its number).
    pub fn request(&self, op: Operation, code: usize, elapsed: Duration) {
        if let Some(c) = self
            .requests
            .get(op.index())
            .and_then(|codes| codes.get(code))
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(h) = self.latency.get(op.index()) {
            h.observe(elapsed);
        }
    }

    /// Requests of `op` answered with `code` so far.
    pub fn requests(&self, op: Operation, code: usize) -> u64 {
        self.requests
            .get(op.index())
            .and_then(|codes| codes.get(code))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// What the audit volume has left, as last measured.
    pub fn audit_volume(&self, free: u64, total: u64) {
        self.audit_free.store(free, Ordering::Relaxed);
        self.audit_total.store(total, Ordering::Relaxed);
    }

    /// The audit volume's (free, total) bytes as last measured, if it has
    /// been.
    pub fn audit_volume_measured(&self) -> Option<(u64, u64)> {
        let free = self.audit_free.load(Ordering::Relaxed);
        let total = self.audit_total.load(Ordering::Relaxed);
        (free != u64::MAX).then_some((free, total))
    }

    /// The listener's and the audit volume's families.
    fn render_server(&self, out: &mut String) {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        render_value(
            out,
            "coffre_tls_handshakes_in_flight",
            "gauge",
            "TLS handshakes in progress.",
            &[("", load(&self.handshakes_in_flight))],
        );
        render_value(
            out,
            "coffre_tls_handshakes_dropped_total",
            "counter",
            "Pending TLS handshakes dropped to make room for new connections.",
            &[("", load(&self.handshakes_dropped))],
        );
        render_value(
            out,
            "coffre_tls_handshakes_timed_out_total",
            "counter",
            "TLS handshakes not finished within the handshake timeout.",
            &[("", load(&self.handshakes_timed_out))],
        );
        let ready = if self.readiness.current().is_ready() {
            1.0
        } else {
            0.0
        };
        render_value(
            out,
            "coffre_ready",
            "gauge",
            "1 while the last readiness check passed (HSM, store, audit log and its volume).",
            &[("", ready)],
        );
        if let Some((free, total)) = self.audit_volume_measured() {
            render_value(
                out,
                "coffre_audit_volume_free_bytes",
                "gauge",
                "Free bytes on the audit log's volume (a full volume stops the service).",
                &[("", free as f64)],
            );
            render_value(
                out,
                "coffre_audit_volume_size_bytes",
                "gauge",
                "Size of the audit log's volume.",
                &[("", total as f64)],
            );
        }
    }

    /// The request families in the text exposition format, then the
    /// listener's and the audit volume's.
    pub fn render_requests(&self, out: &mut String) {
        self.render_server(out);
        out.push_str("# HELP coffre_requests_total Requests answered, by RPC and gRPC status.\n");
        out.push_str("# TYPE coffre_requests_total counter\n");
        for (op, codes) in Operation::ALL.iter().zip(&self.requests) {
            for (name, c) in CODE_NAMES.iter().zip(codes) {
                let n = c.load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "coffre_requests_total{{rpc=\"{}\",code=\"{name}\"}} {n}",
                        op.name()
                    );
                }
            }
        }
        out.push_str("# HELP coffre_request_duration_seconds Time from the start of a request to its audit record written.\n");
        out.push_str("# TYPE coffre_request_duration_seconds histogram\n");
        for (op, h) in Operation::ALL.iter().zip(&self.latency) {
            if h.count() > 0 {
                h.render(
                    out,
                    "coffre_request_duration_seconds",
                    &format!("rpc=\"{}\"", op.name()),
                );
            }
        }
    }
}

/// Hit and miss counters of one cache.
#[derive(Debug, Default)]
pub struct CacheCounters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

/// Calls to the HSM, by kind.
#[derive(Debug, Default)]
pub struct HsmCounters {
    pub calls: [HsmCall; HSM_CALLS.len()],
}

/// The HSM calls counted, in the order of [`HsmCounters::calls`].
pub const HSM_CALLS: [&str; 10] = [
    "info",
    "generate_random",
    "wrap",
    "unwrap",
    "rotate_root_key",
    "destroy_root_key",
    "create_key_object",
    "seal_with_object",
    "open_with_object",
    "destroy_key_object",
];

#[derive(Debug, Default)]
pub struct HsmCall {
    pub errors: AtomicU64,
    pub latency: Histogram,
}

impl HsmCounters {
    pub fn render(&self, out: &mut String) {
        out.push_str("# HELP coffre_hsm_requests_total Calls to the HSM.\n");
        out.push_str("# TYPE coffre_hsm_requests_total counter\n");
        for (name, c) in HSM_CALLS.iter().zip(&self.calls) {
            let _ = writeln!(
                out,
                "coffre_hsm_requests_total{{call=\"{name}\"}} {}",
                c.latency.count()
            );
        }
        out.push_str("# HELP coffre_hsm_errors_total Calls to the HSM that failed.\n");
        out.push_str("# TYPE coffre_hsm_errors_total counter\n");
        for (name, c) in HSM_CALLS.iter().zip(&self.calls) {
            let _ = writeln!(
                out,
                "coffre_hsm_errors_total{{call=\"{name}\"}} {}",
                c.errors.load(Ordering::Relaxed)
            );
        }
        out.push_str("# HELP coffre_hsm_duration_seconds Latency of calls to the HSM.\n");
        out.push_str("# TYPE coffre_hsm_duration_seconds histogram\n");
        for (name, c) in HSM_CALLS.iter().zip(&self.calls) {
            c.latency.render(
                out,
                "coffre_hsm_duration_seconds",
                &format!("call=\"{name}\""),
            );
        }
    }
}

/// Appends a single-value family.
pub fn render_value(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(&str, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, v) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {v}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {v}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_count_everything() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(40));
        h.observe(Duration::from_micros(700));
        h.observe(Duration::from_secs(60));
        let mut out = String::new();
        h.render(&mut out, "x", "rpc=\"Decrypt\"");
        assert!(
            out.contains("x_bucket{rpc=\"Decrypt\",le=\"0.00005\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{rpc=\"Decrypt\",le=\"0.0005\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{rpc=\"Decrypt\",le=\"0.001\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{rpc=\"Decrypt\",le=\"10\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{rpc=\"Decrypt\",le=\"+Inf\"} 3\n"),
            "{out}"
        );
        assert!(out.contains("x_count{rpc=\"Decrypt\"} 3\n"), "{out}");
        assert!(out.contains("x_sum{rpc=\"Decrypt\"} 60.00074\n"), "{out}");
    }

    #[test]
    fn requests_count_by_rpc_and_code() {
        let m = Metrics::default();
        m.request(Operation::Decrypt, 0, Duration::from_micros(10));
        m.request(Operation::Decrypt, 0, Duration::from_micros(10));
        m.request(Operation::Decrypt, 3, Duration::from_micros(10));
        m.request(Operation::Decrypt, 99, Duration::from_micros(10));
        assert_eq!(m.requests(Operation::Decrypt, 0), 2);
        assert_eq!(m.requests(Operation::Decrypt, 3), 1);
        assert_eq!(m.requests(Operation::Encrypt, 0), 0);
        let mut out = String::new();
        m.render_requests(&mut out);
        assert!(out.contains("coffre_requests_total{rpc=\"Decrypt\",code=\"OK\"} 2\n"));
        assert!(
            out.contains("coffre_requests_total{rpc=\"Decrypt\",code=\"INVALID_ARGUMENT\"} 1\n")
        );
        assert!(
            !out.contains("rpc=\"Encrypt\""),
            "families without samples are left out"
        );
        assert!(out.contains("coffre_request_duration_seconds_count{rpc=\"Decrypt\"} 4\n"));
    }
}
