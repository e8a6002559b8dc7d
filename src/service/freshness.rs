//! Several nodes on one store: how this node's caches follow the others'
//! key changes, within a bound, even when it is cut off.
//!
//! A change acknowledged by another node is in the store's change feed
//! ([`crate::store::KeyStore::changes_since`]). [`Kms::poll_changes`] reads
//! the feed from the last generation applied and forgets every cached key
//! it lists. It first bumps the feed epoch, so that neither a reader that
//! loaded the old record before the poll (`cache_if_current`) nor a local
//! writer publishing meanwhile (`publish`) can put an older record back
//! afterwards; it never waits for this node's writers, whose HSM calls and
//! commits could otherwise hold a poll, and the node's freshness, for a
//! second (see the `service` module docs).
//!
//! The bound holds without synchronized clocks. A successful poll whose
//! first query was *sent* at `t0` extends this node's freshness to `t0 +
//! max_staleness`. If the change committed before `t0`, that poll saw it;
//! if after, this node stops serving at `t0 + max_staleness` at the latest,
//! until a poll succeeds again. Only this node's monotonic clock counts.
//! In strict mode a data-key request past that instant is refused
//! (`UNAVAILABLE`, [`Error::NotFresh`]) and readiness reports NOT_SERVING;
//! in available mode it is served from the caches and counted.
//!
//! A node alone on its store (sled, `coffre dev`) has no freshness to keep:
//! [`Kms::check_fresh`] always passes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::Kms;
use crate::cluster::FreshnessReport;
use crate::error::{Error, Result};
use crate::model::KeyId;

/// What a node sharing its store does when it cannot show that its caches
/// are fresh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StaleMode {
    /// Refuse data keys once stale (the default: the bound always holds).
    Strict,
    /// Keep serving from the caches (the bound holds only while the node
    /// reaches the store).
    Available,
}

/// Settings of a node that shares its store with others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedStore {
    pub mode: StaleMode,
    /// How long after the sending of its last successful poll the node
    /// still serves.
    pub max_staleness: Duration,
}

/// Feed entries read per query.
const FEED_PAGE: usize = 10_000;

/// The freshness lease: the hot path reads one atomic.
#[derive(Debug)]
pub(super) struct Freshness {
    settings: SharedStore,
    /// The instant [`Freshness::fresh_until_ns`] counts from.
    base: Instant,
    /// Nanoseconds after `base` until which the caches are known fresh
    /// (0: never confirmed).
    fresh_until_ns: AtomicU64,
    /// Requests served or refused while stale.
    stale_requests: AtomicU64,
    /// The last change-feed generation a successful poll applied.
    applied: AtomicU64,
    /// The database's lineage ([`crate::cluster::ReadMark::lineage`]) the
    /// caches and `applied` were built under: when it rises, commits this
    /// node read may be gone and their generations issued again.
    lineage: AtomicU64,
}

impl Freshness {
    pub(super) fn new(settings: SharedStore) -> Self {
        Self {
            settings,
            base: Instant::now(),
            fresh_until_ns: AtomicU64::new(0),
            stale_requests: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            lineage: AtomicU64::new(0),
        }
    }

    /// The bound: past it, a strict node refuses data keys.
    pub(super) fn max_staleness(&self) -> Duration {
        self.settings.max_staleness
    }

    fn since_base(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    /// How long past its freshness the node is now (zero while fresh).
    fn overdue(&self) -> Option<Duration> {
        let until = self.fresh_until_ns.load(Ordering::Acquire);
        let now = self.since_base(Instant::now());
        (now >= until).then(|| Duration::from_nanos(now - until))
    }

    /// A poll sent at `sent` succeeded: fresh until `sent + max_staleness`
    /// (never moved back by a slower, older poll).
    fn confirm(&self, sent: Instant) {
        let until = self.since_base(sent).saturating_add(
            u64::try_from(self.settings.max_staleness.as_nanos()).unwrap_or(u64::MAX),
        );
        self.fresh_until_ns.fetch_max(until, Ordering::AcqRel);
    }
}

impl Kms {
    /// Makes this core one of several nodes sharing its store: data keys
    /// are served only while [`Kms::poll_changes`] keeps the caches fresh
    /// (see the module docs). Not fresh until the first poll succeeds.
    pub fn with_shared_store(mut self, settings: SharedStore) -> Self {
        self.freshness = Some(Freshness::new(settings));
        self
    }

    /// On the data-key path: refuses, in strict mode, once the caches may
    /// be behind the other nodes' changes by more than the bound. One
    /// atomic load when fresh.
    pub(super) fn check_fresh(&self) -> Result<()> {
        let Some(f) = &self.freshness else {
            return Ok(());
        };
        let Some(overdue) = f.overdue() else {
            return Ok(());
        };
        f.stale_requests.fetch_add(1, Ordering::Relaxed);
        match f.settings.mode {
            StaleMode::Available => Ok(()),
            StaleMode::Strict => Err(Error::NotFresh {
                max_staleness: f.settings.max_staleness,
                overdue,
            }),
        }
    }

    /// Readiness: NOT_SERVING (this error) while a strict node is stale,
    /// so that load balancers send no traffic to a node cut off from the
    /// store.
    pub fn check_fresh_for_readiness(&self) -> Result<()> {
        let Some(f) = &self.freshness else {
            return Ok(());
        };
        match (f.settings.mode, f.overdue()) {
            (StaleMode::Strict, Some(overdue)) => Err(Error::NotFresh {
                max_staleness: f.settings.max_staleness,
                overdue,
            }),
            _ => Ok(()),
        }
    }

    /// Whether the caches are known fresh (always, alone on a store).
    pub fn is_fresh(&self) -> bool {
        self.freshness
            .as_ref()
            .is_none_or(|f| f.overdue().is_none())
    }

    /// Whether a stale node refuses data keys (strict mode).
    pub fn refuses_when_stale(&self) -> bool {
        self.freshness
            .as_ref()
            .is_some_and(|f| f.settings.mode == StaleMode::Strict)
    }

    /// The newest generation of the change feed: where a node starting
    /// with empty caches begins to follow it.
    pub async fn feed_head(&self) -> Result<u64> {
        Ok(self.store.changes_since(u64::MAX, 0).await?.head)
    }

    /// One pass over the change feed after `watermark` (the last
    /// generation applied): every key it lists is forgotten by the caches,
    /// as a local writer would; then the node is fresh until this pass's
    /// sending time plus `max_staleness`. Returns the new watermark. An
    /// error leaves the caches and the watermark as they were, and the
    /// freshness runs out on its own.
    ///
    /// If the database's history changed under the node (its timeline rose:
    /// a standby was promoted, a backup restored; or the feed's head went
    /// back), the generations after the failover point may have been
    /// issued again for other changes, which a poll from `watermark` would
    /// skip: the node then drops every cache and follows the feed from the
    /// new history's head ([`Kms::rebase_on_new_history`]).
    pub async fn poll_changes(&self, watermark: u64) -> Result<u64> {
        let sent = Instant::now();
        let mut applied = watermark;
        let head = loop {
            let page = self.store.changes_since(applied, FEED_PAGE).await?;
            if !page.changes.is_empty() {
                let ids: Vec<KeyId> = page.changes.iter().map(|c| c.key_id).collect();
                self.forget_changed(&ids).await;
            }
            let full = page.changes.len() >= FEED_PAGE;
            if let Some(last) = page.changes.last() {
                applied = applied.max(last.generation);
            }
            if !full {
                break page.head;
            }
        };
        if let Some(f) = &self.freshness {
            // After the reads: a rise during them may have served a page
            // of the new history.
            let lineage = self.coordination.read_mark().lineage();
            let built_under = f.lineage.load(Ordering::Acquire);
            if lineage != built_under || head < watermark {
                return self
                    .rebase_on_new_history(f, watermark, head, built_under)
                    .await;
            }
            f.applied.fetch_max(applied, Ordering::AcqRel);
            f.confirm(sent);
        }
        self.sweep_confirmed();
        Ok(applied)
    }

    /// The database's history changed: what the caches hold may come from
    /// commits that are gone, and the feed's generations after the point
    /// where the histories part may name other changes now. Reads the new
    /// history's head (on a connection of the current lineage, checked
    /// before and after), then drops every cache, so that whatever is read
    /// from now on comes from the new history, and follows the feed from
    /// that head.
    async fn rebase_on_new_history(
        &self,
        f: &Freshness,
        watermark: u64,
        seen_head: u64,
        built_under: u64,
    ) -> Result<u64> {
        const ATTEMPTS: usize = 3;
        for _ in 0..ATTEMPTS {
            let sent = Instant::now();
            let lineage = self.coordination.read_mark().lineage();
            let head = self.feed_head().await?;
            if self.coordination.read_mark().lineage() != lineage {
                continue;
            }
            tracing::warn!(
                watermark,
                seen_head,
                new_head = head,
                lineage_was = built_under,
                lineage,
                "the database's history changed (a promotion or a restore): every cached key \
                 and version is dropped, and the change feed is followed from the new head"
            );
            self.feed_epoch.fetch_add(1, Ordering::SeqCst);
            self.keys.clear();
            self.materials.clear();
            self.objects.clear();
            self.missing.clear();
            f.lineage.store(lineage, Ordering::Release);
            f.applied.store(head, Ordering::Release);
            f.confirm(sent);
            self.sweep_confirmed();
            return Ok(head);
        }
        Err(Error::Store(crate::store::StoreError::Io(format!(
            "the database's timeline rose {ATTEMPTS} times while the change feed's head was read"
        ))))
    }

    /// Forgets what the caches hold of keys another node changed: their
    /// records, their unwrapped versions and HSM object names (a destroyed
    /// key's material must go; a few HSM unwraps after a change cost
    /// little), and every "no such key" (a key created elsewhere must be
    /// found). The feed epoch is bumped first, so that an overlapping
    /// reader or local writer does not cache what it had before.
    async fn forget_changed(&self, ids: &[KeyId]) {
        self.feed_epoch.fetch_add(1, Ordering::SeqCst);
        let changed: std::collections::HashSet<KeyId> = ids.iter().copied().collect();
        for id in &changed {
            self.keys.remove(id);
        }
        self.materials.remove_where(|(id, _)| changed.contains(id));
        self.objects.remove_where(|(id, _)| changed.contains(id));
        self.missing.clear();
    }

    /// How fresh this node's caches are, for its heartbeat (`coffre
    /// cluster status` shows it); `None` alone on a store.
    pub fn freshness_report(&self) -> Option<FreshnessReport> {
        self.freshness.as_ref().map(|f| {
            let max_staleness = f.settings.max_staleness;
            let until = f.fresh_until_ns.load(Ordering::Acquire);
            // The last poll's sending time is its freshness's end minus
            // the bound; 0 means no poll has succeeded.
            let confirmed_ago = (until != 0).then(|| {
                let sent = Duration::from_nanos(until).saturating_sub(max_staleness);
                let now = Duration::from_nanos(f.since_base(Instant::now()));
                now.saturating_sub(sent)
            });
            FreshnessReport {
                feed_generation: f.applied.load(Ordering::Acquire),
                confirmed_ago,
                max_staleness,
                strict: f.settings.mode == StaleMode::Strict,
            }
        })
    }

    /// Data-key requests that met a stale node (served in available mode,
    /// refused in strict mode), and the seconds since its freshness ran
    /// out (0 while fresh), for the metrics.
    pub fn staleness(&self) -> Option<(u64, f64)> {
        self.freshness.as_ref().map(|f| {
            (
                f.stale_requests.load(Ordering::Relaxed),
                f.overdue().map_or(0.0, |d| d.as_secs_f64()),
            )
        })
    }
}
