//! Health for orchestrators: what `GET /healthz` and `GET /readyz` on the
//! metrics listener answer ([`super::http`]).
//!
//! - `/healthz` (liveness) is `200 ok` while the process answers HTTP at
//!   all: no dependency is checked, so a kubelet never restarts coffre
//!   because its HSM is down (a restart would not bring the HSM back).
//! - `/readyz` (readiness) is `200 ok` only while the last readiness check
//!   found every component fine, and `503` otherwise with one line per
//!   failing component (`hsm: …`, `store: …`, `audit-log: …`,
//!   `audit-volume: …`).
//!
//! The check is not run per probe: the gRPC server's readiness task
//! (`grpc::server`, every second) computes one [`Report`], sets
//! `grpc.health.v1` from it and publishes it here, so the two can never
//! disagree, an unauthenticated prober cannot make coffre call its HSM, and
//! a probe costs a lock and a copy. A report is at most about a second old.
//!
//! Reasons are fixed sentences chosen by component and failure class; the
//! error itself (which may name an HSM endpoint, a module or a file) goes
//! to the server log only.

use std::fmt;
use std::sync::Mutex;

/// What the readiness check looks at.
///
/// Issue #17 (several nodes) adds the cluster's freshness here — in strict
/// mode a node that has not caught up within `max_staleness_ms` is not
/// ready — as one more variant set by the same check in `grpc::server`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Component {
    /// The HSM performs a key operation in a session.
    Hsm,
    /// The key store answers a read.
    Store,
    /// The audit log's last write succeeded (coffre fails closed without it).
    AuditLog,
    /// The audit log's volume has the free space `[limits]` asks for.
    AuditVolume,
    /// A node sharing its store has confirmed, within the bound, that its
    /// caches follow the other nodes' changes (strict mode).
    ClusterFreshness,
}

impl Component {
    /// Its name at the start of a `/readyz` line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Hsm => "hsm",
            Self::Store => "store",
            Self::AuditLog => "audit-log",
            Self::AuditVolume => "audit-volume",
            Self::ClusterFreshness => "cluster-freshness",
        }
    }
}

/// One failing component and what an operator should know about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub component: Component,
    /// A sentence without secrets or paths.
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.component.name(), self.reason)
    }
}

/// The outcome of one readiness check.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Report {
    /// No check has finished yet (the server is starting).
    #[default]
    Starting,
    /// Every component answered.
    Ready,
    /// These did not (never empty, in [`Component`] order).
    NotReady(Vec<Problem>),
}

impl Report {
    /// `Ready` when `problems` is empty, else `NotReady` with them sorted.
    pub fn from_problems(mut problems: Vec<Problem>) -> Self {
        if problems.is_empty() {
            Self::Ready
        } else {
            problems.sort_by_key(|p| p.component);
            Self::NotReady(problems)
        }
    }

    pub fn is_ready(&self) -> bool {
        matches!(self, Self::Ready)
    }

    /// The body of `/readyz`: `ok`, or one line per failing component.
    pub fn body(&self) -> String {
        match self {
            Self::Ready => "ok\n".to_string(),
            Self::Starting => "starting: the first readiness check has not finished\n".to_string(),
            Self::NotReady(problems) => problems.iter().map(|p| format!("{p}\n")).collect(),
        }
    }
}

/// The last [`Report`], shared between the task that checks and the
/// listener that answers.
#[derive(Debug, Default)]
pub struct Readiness {
    last: Mutex<Report>,
}

impl Readiness {
    /// Replaces the last report; returns whether it changed.
    pub fn publish(&self, report: Report) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let changed = *last != report;
        *last = report;
        changed
    }

    /// The last report.
    pub fn current(&self) -> Report {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// `n` bytes for a person: `812.3 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    let name = UNITS.get(unit).copied().unwrap_or("B");
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_lists_each_failing_component_once_in_order() {
        assert_eq!(Report::from_problems(Vec::new()), Report::Ready);
        assert_eq!(Report::Ready.body(), "ok\n");
        assert!(!Report::Starting.is_ready());
        let report = Report::from_problems(vec![
            Problem {
                component: Component::AuditLog,
                reason: "cannot be written".into(),
            },
            Problem {
                component: Component::Hsm,
                reason: "not answering".into(),
            },
        ]);
        assert!(!report.is_ready());
        assert_eq!(
            report.body(),
            "hsm: not answering\naudit-log: cannot be written\n"
        );
    }

    #[test]
    fn publishing_says_whether_the_report_changed() {
        let r = Readiness::default();
        assert_eq!(r.current(), Report::Starting);
        assert!(r.publish(Report::Ready));
        assert!(!r.publish(Report::Ready));
        assert_eq!(r.current(), Report::Ready);
    }

    #[test]
    fn bytes_read_as_a_person_would_write_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(1024 * 1024 * 1024), "1.0 GiB");
    }
}
