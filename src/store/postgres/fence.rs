//! Timeline fencing (design/several-nodes.md §4.2): a returning old
//! primary is never read from nor written to.
//!
//! A multi-host URL with `target_session_attrs=read-write` takes the first
//! host that accepts writes. After a failover, an old primary restarted
//! read-write (no Patroni to demote it, no `pg_rewind`) is such a host,
//! and it is usually first in the list: a node that reconnected to it
//! would read key states the cluster has moved past and write where no
//! one else looks. The server cannot tell: it does not know it was
//! replaced.
//!
//! What tells them apart is where each stands in the replication history:
//! the cluster's `system_identifier` (`pg_control_system()`, the same on a
//! primary and every standby made from it) and the timeline, which every
//! promotion raises. The old primary stays on the timeline it had. So each
//! process remembers the highest `(system_identifier, timeline)` it has
//! seen, and refuses a server on a lower timeline or of another system.
//!
//! - **Where it is checked.** On every new connection, pooled or
//!   dedicated, before it is used ([`super::PgConnector::connect`] and the
//!   pool's `post_create` hook): one round trip per connection, nothing on
//!   the request path. The poller reads through the pool, the coordination
//!   and listening connections are dedicated: all three are covered.
//!   When the highest timeline rises, every pooled connection opened
//!   before is dropped at its next checkout (`post_recycle`, an instant
//!   compared), so that a connection to a server on the old timeline that
//!   is still alive (a partition, not a crash) is not reused either.
//! - **The timeline.** `pg_control_checkpoint().timeline_id` is the
//!   timeline of the last checkpoint, which lags a promotion until the
//!   checkpoint after it completes (PostgreSQL 15 promotes without
//!   waiting for one); the current WAL insert position's file name
//!   (`pg_walfile_name(pg_current_wal_lsn())`) starts with the timeline
//!   in force. coffre takes the greater of the two.
//! - **Privileges.** All four functions are executable by PUBLIC by
//!   default; a DBA who revoked them grants them to `coffre_app`
//!   (sql/roles.sql, docs/postgres.md).
//! - **The alarm.** A refusal is an error log line naming both timelines,
//!   the counter `coffre_cluster_fenced_total`; the node's change feed
//!   cannot be read on such a connection, so its freshness runs out and a
//!   strict node reports NOT_SERVING until it reaches the new primary.
//!
//! - **Carrying on.** With several hosts in the URL, a connection whose
//!   host the fence would refuse is opened again on the URL's other hosts
//!   in turn, and the first the fence admits is used
//!   ([`super::connect`]'s `Dialer`): a node keeps serving from the new
//!   primary while the old one is up first in the URL, and the alarm says
//!   so.
//! - **A process that never saw the promotion** (started after the
//!   failover) asks every host of its URL where it stands before it
//!   connects for use (`PgConnector::seed_fence`), and takes the highest
//!   timeline among them: the new primary, or a standby following it, is
//!   one of them.
//!
//! What it does not cover: a process started after the failover whose URL
//! reaches no server of the new timeline (only the old primary up, or
//! listed) has nothing to compare with. That is why production puts
//! Patroni (or a VIP it moves) in front; this fence is the belt to its
//! braces.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tokio_postgres::Client;

/// Where a server stands in the replication history.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Lineage {
    /// `pg_control_system().system_identifier`: which cluster.
    pub system_identifier: i64,
    /// The timeline in force (see the module docs).
    pub timeline: i64,
}

impl std::fmt::Display for Lineage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "system {} timeline {}",
            self.system_identifier, self.timeline
        )
    }
}

/// Why a server was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Another PostgreSQL cluster than the one this process has used.
    OtherSystem { seen: Lineage, highest: Lineage },
    /// A timeline lower than the highest this process has seen: an old
    /// primary that came back.
    OlderTimeline { seen: Lineage, highest: Lineage },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::OtherSystem { seen, highest } => write!(
                f,
                "the server is PostgreSQL system {}, not system {} that this node has used: \
                 refused, nothing read or written",
                seen.system_identifier, highest.system_identifier
            ),
            Refusal::OlderTimeline { seen, highest } => write!(
                f,
                "the server is on timeline {}, lower than timeline {} that this node has seen: \
                 an old primary that came back after a failover; refused, nothing read or \
                 written (demote it, e.g. pg_rewind and restart it as a standby)",
                seen.timeline, highest.timeline
            ),
        }
    }
}

/// The highest lineage this process has seen, and the refusals.
#[derive(Debug, Default)]
pub struct TimelineFence {
    state: Mutex<State>,
    refused: AtomicU64,
    /// Times the highest timeline rose (the durability barrier's lineage).
    rises: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    highest: Option<Lineage>,
    /// When `highest` last rose to a new timeline (not its first value).
    raised_at: Option<Instant>,
    /// When a refusal was last logged.
    logged_at: Option<Instant>,
    /// When a fallback to another host was last logged.
    fallback_logged_at: Option<Instant>,
}

/// The one query: the system, both timelines (the WAL position's only on
/// a primary: `pg_current_wal_lsn()` fails in recovery).
const LINEAGE_SQL: &str = "SELECT s.system_identifier, \
       greatest(c.timeline_id::bigint, \
                CASE WHEN pg_is_in_recovery() THEN 0 \
                     ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint \
                END) \
     FROM pg_control_system() s, pg_control_checkpoint() c";

impl TimelineFence {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the server where it stands (one round trip).
    pub async fn lineage(client: &Client) -> Result<Lineage, tokio_postgres::Error> {
        let row = client.query_one(LINEAGE_SQL, &[]).await?;
        Ok(Lineage {
            system_identifier: row.try_get(0)?,
            timeline: row.try_get(1)?,
        })
    }

    /// Admits a server at `seen`, or refuses it (counted). The first
    /// server sets the system; a higher timeline raises the mark.
    pub fn admit(&self, seen: Lineage) -> Result<(), Refusal> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some(highest) = state.highest else {
            state.highest = Some(seen);
            return Ok(());
        };
        let refusal = if seen.system_identifier != highest.system_identifier {
            Refusal::OtherSystem { seen, highest }
        } else if seen.timeline < highest.timeline {
            Refusal::OlderTimeline { seen, highest }
        } else {
            if seen.timeline > highest.timeline {
                state.highest = Some(seen);
                state.raised_at = Some(Instant::now());
                // Under the lock: a barrier reading it after this admit
                // sees the rise.
                self.rises.fetch_add(1, Ordering::SeqCst);
                drop(state);
                tracing::warn!(
                    from = highest.timeline,
                    to = seen.timeline,
                    system = seen.system_identifier,
                    "PostgreSQL is on a new timeline (a standby was promoted); servers on \
                     timeline {} or lower are refused from now on",
                    highest.timeline
                );
            }
            return Ok(());
        };
        drop(state);
        self.refused.fetch_add(1, Ordering::Relaxed);
        Err(refusal)
    }

    /// Whether [`Self::admit`] would admit a server at `seen` (nothing
    /// counted, nothing raised).
    pub fn would_admit(&self, seen: Lineage) -> bool {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.highest.is_none_or(|highest| {
            seen.system_identifier == highest.system_identifier && seen.timeline >= highest.timeline
        })
    }

    /// Before connections are used: takes `seen` as the reference if
    /// there is none (not a rise: nothing was read before), or raises it
    /// to `seen`'s higher timeline of the same system (a rise, as in
    /// [`Self::admit`]). Another system, or a lower timeline, changes
    /// nothing here: [`Self::admit`] refuses it when a connection reaches
    /// it. Whether the reference changed.
    pub fn seed(&self, seen: Lineage) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match state.highest {
            None => {
                state.highest = Some(seen);
                true
            }
            Some(highest)
                if highest.system_identifier == seen.system_identifier
                    && seen.timeline > highest.timeline =>
            {
                state.highest = Some(seen);
                state.raised_at = Some(Instant::now());
                self.rises.fetch_add(1, Ordering::SeqCst);
                true
            }
            Some(_) => false,
        }
    }

    /// Whether a connection opened at `created` predates the latest rise
    /// of the timeline (and must not be reused).
    pub fn predates_rise(&self, created: Instant) -> bool {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.raised_at.is_some_and(|at| created < at)
    }

    /// Whether to log a refusal now: the first one, then one per `every`.
    pub fn should_log(&self, every: std::time::Duration) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let due = state.logged_at.is_none_or(|at| at.elapsed() >= every);
        if due {
            state.logged_at = Some(Instant::now());
        }
        due
    }

    /// Whether to log a fallback to another host now: the first one, then
    /// one per `every`.
    pub fn should_log_fallback(&self, every: std::time::Duration) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let due = state
            .fallback_logged_at
            .is_none_or(|at| at.elapsed() >= every);
        if due {
            state.fallback_logged_at = Some(Instant::now());
        }
        due
    }

    /// The highest lineage seen, if any.
    pub fn highest(&self) -> Option<Lineage> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).highest
    }

    /// How many times the highest timeline rose in this process.
    pub fn rises(&self) -> u64 {
        self.rises.load(Ordering::SeqCst)
    }

    /// Servers refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn at(system_identifier: i64, timeline: i64) -> Lineage {
        Lineage {
            system_identifier,
            timeline,
        }
    }

    #[test]
    fn seeding_sets_or_raises_the_reference_and_refuses_nothing() {
        let fence = TimelineFence::new();
        assert!(fence.would_admit(at(7, 1)), "no reference yet");
        assert!(fence.seed(at(7, 2)));
        assert_eq!(fence.rises(), 0, "the first reference is no rise");
        assert!(!fence.would_admit(at(7, 1)));
        assert!(!fence.would_admit(at(8, 2)));
        assert!(fence.would_admit(at(7, 2)) && fence.would_admit(at(7, 3)));
        assert!(!fence.seed(at(7, 1)), "a lower timeline does not lower it");
        assert!(!fence.seed(at(8, 9)), "another system does not replace it");
        assert_eq!(fence.highest(), Some(at(7, 2)));
        assert!(fence.seed(at(7, 3)));
        assert_eq!(fence.rises(), 1, "raising a reference is a rise");
        // Asking counts nothing; the refusal comes with admit.
        assert_eq!(fence.refused(), 0);
        fence.admit(at(7, 2)).unwrap_err();
        assert_eq!(fence.refused(), 1);
    }

    #[test]
    fn a_lower_timeline_or_another_system_is_refused() {
        let fence = TimelineFence::new();
        assert_eq!(fence.highest(), None);
        fence.admit(at(7, 1)).unwrap();
        fence.admit(at(7, 1)).unwrap();
        assert_eq!(fence.refused(), 0);
        let before = Instant::now();
        assert!(!fence.predates_rise(before));
        assert_eq!(fence.rises(), 0);
        fence.admit(at(7, 2)).unwrap();
        assert_eq!(fence.highest(), Some(at(7, 2)));
        assert_eq!(
            fence.rises(),
            1,
            "the first server sets the mark, a promotion raises it"
        );
        assert!(fence.predates_rise(before));
        let err = fence.admit(at(7, 1)).unwrap_err();
        assert_eq!(
            err,
            Refusal::OlderTimeline {
                seen: at(7, 1),
                highest: at(7, 2)
            }
        );
        assert!(
            err.to_string()
                .contains("timeline 1, lower than timeline 2"),
            "{err}"
        );
        let err = fence.admit(at(8, 3)).unwrap_err();
        assert!(matches!(err, Refusal::OtherSystem { .. }), "{err:?}");
        assert!(err.to_string().contains("system 8"), "{err}");
        // Refusals leave the mark where it was.
        assert_eq!(fence.highest(), Some(at(7, 2)));
        assert_eq!(fence.refused(), 2);
        fence.admit(at(7, 2)).unwrap();
        assert!(!fence.predates_rise(Instant::now()));
    }
}
