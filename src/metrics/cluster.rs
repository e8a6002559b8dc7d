//! The metrics of a node that shares its store with others (PostgreSQL):
//!
//! - `coffre_cluster_lease_holder{lease}`: 1 while this node holds the
//!   lease (granted or renewed, and its own monotonic deadline not
//!   passed, [`crate::cluster::Lease::is_valid`]), 0 otherwise; one
//!   sample per lease in [`crate::cluster::leases::ALL`], so that a lease
//!   held by no node shows as a sum of 0 over the cluster, and two
//!   holders (which the lease design tolerates but should not last) as 2;
//! - `coffre_store_errors_total{kind}`: database calls that failed, by a
//!   fixed set of kinds ([`StoreErrorKind`]);
//! - `coffre_store_pool_connections{state="in_use|idle"}`,
//!   `coffre_store_pool_max_connections` and `coffre_store_pool_waiters`:
//!   the serving pool (`[store] pool_size`). Waiters above 0 for long
//!   mean the pool is too small for the load, or the database is slow.
//!
//! Recorded off the request path (lease calls, failed database calls);
//! rendered only when `/metrics` is read.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use super::render_value;
use crate::cluster::leases;

/// Which leases this node holds, until when (its own deadline).
#[derive(Debug, Default)]
pub struct LeaseGauges {
    held: Mutex<BTreeMap<String, Instant>>,
}

impl LeaseGauges {
    /// The lease `name` was granted or renewed, valid until `until`.
    pub fn granted(&self, name: &str, until: Instant) {
        self.lock().insert(name.to_string(), until);
    }

    /// The lease `name` is not this node's (refused, failed, released).
    pub fn lost(&self, name: &str) {
        self.lock().remove(name);
    }

    /// Whether this node holds `name` now.
    pub fn holds(&self, name: &str) -> bool {
        self.lock()
            .get(name)
            .is_some_and(|until| Instant::now() < *until)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Instant>> {
        // Only plain inserts and removes happen under the lock: a poisoned
        // one guards no broken state.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn render(&self, out: &mut String) {
        let samples: Vec<(String, f64)> = leases::ALL
            .iter()
            .map(|name| {
                let v = if self.holds(name) { 1.0 } else { 0.0 };
                (format!("lease=\"{name}\""), v)
            })
            .collect();
        let refs: Vec<(&str, f64)> = samples.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        render_value(
            out,
            "coffre_cluster_lease_holder",
            "gauge",
            "1 while this node holds the lease (scheduler, root rotation, audit digest).",
            &refs,
        );
    }
}

/// What kind of database failure a store call met.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// No answer: the connection closed or failed, a timeout, the server
    /// gone (a failover, a partition). A write's outcome is then unknown.
    Unavailable,
    /// The pool could not hand out a connection.
    Pool,
    /// A deadlock or serialization failure (retried once, then reported).
    Conflict,
    /// A write on a standby (a node still on an old primary).
    ReadOnly,
    /// A privilege missing (a role set up wrong).
    Permission,
    /// Any other error the database returned.
    Other,
}

/// The kinds' label values, in [`StoreErrorKind`] order.
pub const STORE_ERROR_KINDS: [&str; 6] = [
    "unavailable",
    "pool",
    "conflict",
    "read_only",
    "permission",
    "other",
];

impl StoreErrorKind {
    fn index(self) -> usize {
        match self {
            StoreErrorKind::Unavailable => 0,
            StoreErrorKind::Pool => 1,
            StoreErrorKind::Conflict => 2,
            StoreErrorKind::ReadOnly => 3,
            StoreErrorKind::Permission => 4,
            StoreErrorKind::Other => 5,
        }
    }
}

/// Failed database calls, by kind.
#[derive(Debug, Default)]
pub struct StoreErrorCounters {
    counts: [AtomicU64; STORE_ERROR_KINDS.len()],
}

impl StoreErrorCounters {
    pub fn count(&self, kind: StoreErrorKind) {
        if let Some(c) = self.counts.get(kind.index()) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn get(&self, kind: StoreErrorKind) -> u64 {
        self.counts
            .get(kind.index())
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    pub fn render(&self, out: &mut String) {
        let samples: Vec<(String, f64)> = STORE_ERROR_KINDS
            .iter()
            .zip(&self.counts)
            .map(|(k, c)| (format!("kind=\"{k}\""), c.load(Ordering::Relaxed) as f64))
            .collect();
        let refs: Vec<(&str, f64)> = samples.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        render_value(
            out,
            "coffre_store_errors_total",
            "counter",
            "Database calls of the store that failed, by kind.",
            &refs,
        );
    }
}

/// The serving pool's use at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolUse {
    pub in_use: u64,
    pub idle: u64,
    pub max: u64,
    /// Callers waiting for a connection.
    pub waiting: u64,
}

impl PoolUse {
    pub fn render(&self, out: &mut String) {
        render_value(
            out,
            "coffre_store_pool_connections",
            "gauge",
            "Connections of the store's pool, in use or idle.",
            &[
                ("state=\"in_use\"", self.in_use as f64),
                ("state=\"idle\"", self.idle as f64),
            ],
        );
        render_value(
            out,
            "coffre_store_pool_max_connections",
            "gauge",
            "The pool's size limit ([store] pool_size).",
            &[("", self.max as f64)],
        );
        render_value(
            out,
            "coffre_store_pool_waiters",
            "gauge",
            "Store calls waiting for a connection of the pool.",
            &[("", self.waiting as f64)],
        );
    }
}

/// Everything above, for one node: what the metrics page renders.
pub struct ClusterMetrics {
    pub leases: std::sync::Arc<LeaseGauges>,
    pub store_errors: std::sync::Arc<StoreErrorCounters>,
    /// Reads the pool's use (deadpool's status) when the page is rendered.
    pub pool: Box<dyn Fn() -> PoolUse + Send + Sync>,
}

impl std::fmt::Debug for ClusterMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterMetrics")
            .field("leases", &self.leases)
            .field("store_errors", &self.store_errors)
            .finish_non_exhaustive()
    }
}

impl ClusterMetrics {
    pub fn render(&self, out: &mut String) {
        self.leases.render(out);
        self.store_errors.render(out);
        (self.pool)().render(out);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_lease_shows_while_held_and_valid() {
        let g = LeaseGauges::default();
        let mut out = String::new();
        g.render(&mut out);
        for name in leases::ALL {
            assert!(
                out.contains(&format!(
                    "coffre_cluster_lease_holder{{lease=\"{name}\"}} 0\n"
                )),
                "{out}"
            );
        }
        g.granted(leases::SCHEDULER, Instant::now() + Duration::from_secs(60));
        // Granted, but its own deadline already passed: not held.
        g.granted(leases::AUDIT_DIGEST, Instant::now());
        let mut out = String::new();
        g.render(&mut out);
        assert!(out.contains("coffre_cluster_lease_holder{lease=\"scheduler\"} 1\n"));
        assert!(out.contains("coffre_cluster_lease_holder{lease=\"audit-digest\"} 0\n"));
        g.lost(leases::SCHEDULER);
        assert!(!g.holds(leases::SCHEDULER));
    }

    #[test]
    fn errors_count_by_kind_and_the_pool_renders_its_use() {
        let errors = Arc::new(StoreErrorCounters::default());
        errors.count(StoreErrorKind::Unavailable);
        errors.count(StoreErrorKind::Unavailable);
        errors.count(StoreErrorKind::ReadOnly);
        let m = ClusterMetrics {
            leases: Arc::new(LeaseGauges::default()),
            store_errors: Arc::clone(&errors),
            pool: Box::new(|| PoolUse {
                in_use: 3,
                idle: 1,
                max: 8,
                waiting: 2,
            }),
        };
        let mut out = String::new();
        m.render(&mut out);
        for line in [
            "coffre_store_errors_total{kind=\"unavailable\"} 2\n",
            "coffre_store_errors_total{kind=\"read_only\"} 1\n",
            "coffre_store_errors_total{kind=\"pool\"} 0\n",
            "coffre_store_pool_connections{state=\"in_use\"} 3\n",
            "coffre_store_pool_connections{state=\"idle\"} 1\n",
            "coffre_store_pool_max_connections 8\n",
            "coffre_store_pool_waiters 2\n",
        ] {
            assert!(out.contains(line), "{line:?} missing from {out}");
        }
        assert!(out.contains("# TYPE coffre_store_errors_total counter\n"));
    }
}
