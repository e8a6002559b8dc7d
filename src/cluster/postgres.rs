//! [`PgCoordination`]: leases and the node registry in the PostgreSQL
//! store's database (tables `leases` and `nodes`), and LISTEN for the
//! change feed's hint.
//!
//! Two connections of its own, outside the store's pool, so that a pool
//! saturated by requests (or waiting on a restarting database) never
//! starves the lease renewals and the poller's wake-ups: one for leases
//! and heartbeats, one that listens. Each is opened again after it fails.
//! Expiry is judged by the database's `now()`, one clock for every node;
//! the holder also stops by its own monotonic deadline ([`Lease`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{Mutex, Notify};
use tokio_postgres::Client;
use uuid::Uuid;

use super::barrier::Barrier;
use super::{
    BarrierError, ClusterHeads, Coordination, CoordinationError, Durability, DurableTicket,
    FreshnessReport, Lease, LeaseStatus, NodeStatus, ReadMark, ReportedFreshness,
};
use crate::audit::{Digest, PublishedCheckpoint};
use crate::model::Timestamp;
use crate::store::postgres::PgConnector;
use crate::store::postgres::migrate::LATEST_VERSION;

/// The channel the store notifies on at every key change.
pub const CHANGES_CHANNEL: &str = crate::store::postgres::store::KEYS_CHANNEL;

/// The part of a lease's time to live the holder gives up at its end (a
/// renewal that arrives late, a paused process): it stops before the
/// database would give the lease to another node.
const LEASE_MARGIN_DIVISOR: u32 = 5;

/// How long a statement on the coordination connection may take before
/// the connection is given up (and opened again next time). A connection
/// cut without a reset (a partition; a proxy that holds every byte) would
/// otherwise hold the lease renewals and heartbeats until TCP gives up. A
/// lease statement given up may still have been applied: harmless, the
/// holder stops by its own deadline and the lease expires.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(4);

pub struct PgCoordination {
    connector: Arc<PgConnector>,
    node_id: String,
    incarnation: Uuid,
    /// Leases, heartbeats and barriers.
    session: Arc<Session>,
    /// The durability barrier ([`super::barrier`]): the heartbeat is one,
    /// and a wrap under a version not yet covered forces one.
    barrier: Arc<Barrier>,
    listener: Mutex<Option<Client>>,
    wake: Arc<Notify>,
    registered: AtomicBool,
    /// LISTEN for key changes (`[cluster] notify`).
    listen: bool,
}

impl std::fmt::Debug for PgCoordination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCoordination")
            .field("node_id", &self.node_id)
            .field("incarnation", &self.incarnation)
            .field("target", &self.connector.target())
            .finish_non_exhaustive()
    }
}

fn unavailable(e: impl std::fmt::Display) -> CoordinationError {
    CoordinationError::Unavailable(e.to_string())
}

impl PgCoordination {
    /// A coordination for node `node_id`, this process being its
    /// incarnation `incarnation`. Connects lazily.
    pub fn new(connector: Arc<PgConnector>, node_id: impl Into<String>, incarnation: Uuid) -> Self {
        Self {
            connector: Arc::clone(&connector),
            node_id: node_id.into(),
            incarnation,
            session: Arc::new(Session {
                connector: Arc::clone(&connector),
                client: Mutex::new(None),
            }),
            barrier: Arc::new(Barrier::new()),
            listener: Mutex::new(None),
            wake: Arc::new(Notify::new()),
            registered: AtomicBool::new(false),
            listen: true,
        }
    }

    /// Waits for the polls only, never for a notification (`[cluster]
    /// notify = false`): key changes then arrive at the next poll.
    pub fn without_notifications(mut self) -> Self {
        self.listen = false;
        self
    }

    pub fn incarnation(&self) -> Uuid {
        self.incarnation
    }

    /// The timeline rises this process has seen (the barrier's lineage).
    fn lineage(&self) -> u64 {
        self.connector.fence().rises()
    }
}

/// The coordination connection: opened on first use, dropped after an
/// error (opened again next time).
struct Session {
    connector: Arc<PgConnector>,
    client: Mutex<Option<Client>>,
}

impl Session {
    /// Runs one statement on the coordination connection, opening it
    /// first if needed, dropping it after an error (opened again next
    /// time).
    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, CoordinationError> {
        let mut slot = self.client.lock().await;
        if slot.as_ref().is_none_or(Client::is_closed) {
            *slot = Some(self.connector.connect().await.map_err(unavailable)?);
        }
        let Some(client) = slot.as_ref() else {
            return Err(unavailable("no coordination connection"));
        };
        match tokio::time::timeout(STATEMENT_TIMEOUT, client.query(sql, params)).await {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(e)) => {
                let why = self.connector.error(&e);
                *slot = None;
                Err(unavailable(why))
            }
            Err(_) => {
                *slot = None;
                Err(unavailable(format!(
                    "{} gave no answer within {} ms on the coordination connection",
                    self.connector.target(),
                    STATEMENT_TIMEOUT.as_millis()
                )))
            }
        }
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn non_negative(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A u64 into a `bigint` column, or why not.
fn bigint(v: u64, what: &str) -> Result<i64, CoordinationError> {
    i64::try_from(v).map_err(|_| unavailable(format!("{what} {v} does not fit a bigint")))
}

/// A digest from its stored line.
fn digest_of(line: &str) -> Result<Digest, CoordinationError> {
    Digest::from_line(line)
        .map_err(|e| unavailable(format!("a stored audit digest is malformed: {e}")))
}

#[async_trait]
impl Coordination for PgCoordination {
    fn node_id(&self) -> &str {
        &self.node_id
    }

    async fn acquire(&self, name: &str, ttl: Duration) -> Result<Option<Lease>, CoordinationError> {
        let sent = Instant::now();
        let rows = self
            .session
            .query(
                "INSERT INTO leases AS l (name, holder, holder_incarnation, token, expires_at)
                 VALUES ($1, $2, $3, 1, now() + $4::bigint * interval '1 millisecond')
                 ON CONFLICT (name) DO UPDATE
                   SET holder = $2, holder_incarnation = $3,
                       token = CASE WHEN l.holder = $2 AND l.holder_incarnation = $3
                                    THEN l.token ELSE l.token + 1 END,
                       expires_at = now() + $4::bigint * interval '1 millisecond'
                   WHERE l.expires_at < now()
                      OR (l.holder = $2 AND l.holder_incarnation = $3)
                 RETURNING token",
                &[&name, &self.node_id, &self.incarnation, &millis(ttl)],
            )
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let token: i64 = row.try_get(0).map_err(unavailable)?;
        let margin = ttl / LEASE_MARGIN_DIVISOR;
        Ok(Some(Lease {
            name: name.to_owned(),
            token: non_negative(token),
            valid_until: sent + ttl.saturating_sub(margin),
        }))
    }

    async fn release(&self, lease: &Lease) -> Result<(), CoordinationError> {
        let token = i64::try_from(lease.token).unwrap_or(i64::MAX);
        self.session
            .query(
                "UPDATE leases SET expires_at = now()
             WHERE name = $1 AND holder = $2 AND holder_incarnation = $3 AND token = $4",
                &[&lease.name, &self.node_id, &self.incarnation, &token],
            )
            .await?;
        Ok(())
    }

    async fn heartbeat(&self, freshness: Option<FreshnessReport>) -> Result<(), CoordinationError> {
        let version = env!("CARGO_PKG_VERSION");
        let generation = freshness
            .map(|f| bigint(f.feed_generation, "the feed generation"))
            .transpose()?;
        // The confirmation's age, placed on the database's clock (the
        // node's own is monotonic and means nothing to another).
        let confirmed_ms_ago = freshness
            .and_then(|f| f.confirmed_ago)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let max_staleness_ms =
            freshness.map(|f| i64::try_from(f.max_staleness.as_millis()).unwrap_or(i64::MAX));
        let strict = freshness.map(|f| f.strict);
        // A write, so a barrier: acknowledged, it shows every commit this
        // node read before it began replicated.
        let barrier = self.barrier.begin(self.lineage());
        let written = self.session.query(
            "INSERT INTO nodes AS n (node_id, incarnation, started_at, last_seen, binary_version, max_schema,
                                     feed_generation, confirmed_at, max_staleness_ms, strict)
             VALUES ($1, $2, now(), now(), $3, $4,
                     $5, now() - $6::bigint * interval '1 millisecond', $7, $8)
             ON CONFLICT (node_id) DO UPDATE
               SET started_at = CASE WHEN n.incarnation = $2 THEN n.started_at ELSE now() END,
                   incarnation = $2, last_seen = now(), binary_version = $3, max_schema = $4,
                   feed_generation = $5, confirmed_at = EXCLUDED.confirmed_at,
                   max_staleness_ms = $7, strict = $8",
            &[
                &self.node_id,
                &self.incarnation,
                &version,
                &LATEST_VERSION,
                &generation,
                &confirmed_ms_ago,
                &max_staleness_ms,
                &strict,
            ],
        )
        .await;
        self.barrier.finish(
            barrier,
            written.as_ref().map(|_| ()).map_err(ToString::to_string),
            self.lineage(),
        );
        written?;
        if !self.registered.swap(true, Ordering::AcqRel) {
            tracing::info!(node_id = %self.node_id, incarnation = %self.incarnation, "registered in the cluster's node registry");
        }
        Ok(())
    }

    fn read_mark(&self) -> ReadMark {
        self.barrier.mark(self.lineage())
    }

    fn durable_ticket(&self, mark: ReadMark) -> DurableTicket {
        self.barrier.ticket(mark)
    }

    fn durability(&self, ticket: DurableTicket) -> Durability {
        self.barrier.durability(ticket, self.lineage())
    }

    async fn wait_durable(
        &self,
        ticket: DurableTicket,
        timeout: Duration,
    ) -> Result<(), BarrierError> {
        let start = || {
            let (barrier, session) = (Arc::clone(&self.barrier), Arc::clone(&self.session));
            let (node_id, incarnation) = (self.node_id.clone(), self.incarnation);
            let started = barrier.begin_forced(self.lineage());
            // A task of its own: a waiter that gives up does not cut the
            // commit short, and later waiters share it.
            tokio::spawn(async move {
                let outcome = session
                    .query(
                        "UPDATE nodes SET last_seen = now()
                         WHERE node_id = $1 AND incarnation = $2 RETURNING 1",
                        &[&node_id, &incarnation],
                    )
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|rows| {
                        // No row, no write: nothing waited for the standbys.
                        if rows.is_empty() {
                            Err(format!(
                                "node {node_id} (incarnation {incarnation}) is not in the \
                                 node registry"
                            ))
                        } else {
                            Ok(())
                        }
                    });
                let lineage = session.connector.fence().rises();
                barrier.finish(started, outcome, lineage);
            });
        };
        self.barrier
            .wait(ticket, timeout, || self.lineage(), start)
            .await
    }

    async fn nodes(&self) -> Result<Vec<NodeStatus>, CoordinationError> {
        let rows = self
            .session
            .query(
                "SELECT node_id, incarnation::text,
                        (extract(epoch FROM now() - last_seen) * 1000)::bigint,
                        feed_generation,
                        (extract(epoch FROM last_seen - confirmed_at) * 1000)::bigint,
                        max_staleness_ms, strict
                 FROM nodes ORDER BY node_id",
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let generation: Option<i64> = r.try_get(3).map_err(unavailable)?;
                let staleness: Option<i64> = r.try_get(4).map_err(unavailable)?;
                let max_staleness: Option<i64> = r.try_get(5).map_err(unavailable)?;
                let strict: Option<bool> = r.try_get(6).map_err(unavailable)?;
                let freshness = match (generation, max_staleness, strict) {
                    (Some(generation), Some(max_staleness), Some(strict)) => {
                        Some(ReportedFreshness {
                            feed_generation: non_negative(generation),
                            staleness_ms: staleness.map(non_negative),
                            max_staleness_ms: non_negative(max_staleness),
                            strict,
                        })
                    }
                    _ => None,
                };
                Ok(NodeStatus {
                    node_id: r.try_get(0).map_err(unavailable)?,
                    incarnation: r.try_get(1).map_err(unavailable)?,
                    last_seen_ms_ago: non_negative(r.try_get(2).map_err(unavailable)?),
                    freshness,
                })
            })
            .collect()
    }

    async fn leases(&self) -> Result<Vec<LeaseStatus>, CoordinationError> {
        let rows = self
            .session
            .query(
                "SELECT name, holder, token,
                        greatest(0, (extract(epoch FROM expires_at - now()) * 1000))::bigint
                 FROM leases ORDER BY name",
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(LeaseStatus {
                    name: r.try_get(0).map_err(unavailable)?,
                    holder: r.try_get(1).map_err(unavailable)?,
                    token: non_negative(r.try_get(2).map_err(unavailable)?),
                    expires_in_ms: non_negative(r.try_get(3).map_err(unavailable)?),
                })
            })
            .collect()
    }

    async fn wait_for_changes(&self, timeout: Duration) {
        if !self.listen {
            tokio::time::sleep(timeout).await;
            return;
        }
        {
            let mut listener = self.listener.lock().await;
            if listener.as_ref().is_none_or(Client::is_closed) {
                match self
                    .connector
                    .connect_listening(CHANGES_CHANNEL, Arc::clone(&self.wake))
                    .await
                {
                    Ok(client) => *listener = Some(client),
                    Err(e) => {
                        *listener = None;
                        tracing::debug!(error = %e, "cannot listen for key changes; polling only");
                    }
                }
            }
        }
        let _ = tokio::time::timeout(timeout, self.wake.notified()).await;
    }

    async fn publish_checkpoints(
        &self,
        batch: &[PublishedCheckpoint],
    ) -> Result<(), CoordinationError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut nodes = Vec::with_capacity(batch.len());
        let mut logs = Vec::with_capacity(batch.len());
        let mut seqs = Vec::with_capacity(batch.len());
        let mut hashes = Vec::with_capacity(batch.len());
        let mut times = Vec::with_capacity(batch.len());
        let mut signatures = Vec::with_capacity(batch.len());
        for cp in batch {
            nodes.push(cp.node.as_str());
            logs.push(cp.log_id.as_str());
            seqs.push(bigint(cp.seq, "seq")?);
            hashes.push(cp.head_hash.as_str());
            times.push(cp.time.0);
            signatures.push(cp.signature.as_str());
        }
        self.session.query(
            "INSERT INTO audit_checkpoints (node_id, log_id, seq, head_hash, time_ms, signature)
             SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[],
                                  $5::bigint[], $6::text[])
             ON CONFLICT DO NOTHING",
            &[&nodes, &logs, &seqs, &hashes, &times, &signatures],
        )
        .await?;
        Ok(())
    }

    async fn latest_heads(&self) -> Result<ClusterHeads, CoordinationError> {
        let rows = self
            .session
            .query(
                "SELECT (SELECT key_generation FROM coffre_cluster),
                        (SELECT line FROM audit_digests ORDER BY n DESC LIMIT 1)",
                &[],
            )
            .await?;
        let Some(row) = rows.first() else {
            return Err(unavailable("no coffre_cluster row"));
        };
        let key_generation: Option<i64> = row.try_get(0).map_err(unavailable)?;
        let last: Option<String> = row.try_get(1).map_err(unavailable)?;
        let last_digest = last.as_deref().map(digest_of).transpose()?;
        // One index probe per registered node (audit_checkpoints_latest),
        // not a scan of every checkpoint ever published.
        let rows = self
            .session
            .query(
                "SELECT c.node_id, c.log_id, c.seq, c.head_hash, c.time_ms, c.signature
                 FROM nodes n CROSS JOIN LATERAL (
                     SELECT * FROM audit_checkpoints a
                     WHERE a.node_id = n.node_id
                     ORDER BY a.time_ms DESC, a.seq DESC LIMIT 1) c
                 ORDER BY c.node_id",
                &[],
            )
            .await?;
        let heads = rows
            .iter()
            .map(|r| {
                Ok(PublishedCheckpoint {
                    node: r.try_get(0).map_err(unavailable)?,
                    log_id: r.try_get(1).map_err(unavailable)?,
                    seq: non_negative(r.try_get(2).map_err(unavailable)?),
                    head_hash: r.try_get(3).map_err(unavailable)?,
                    time: Timestamp(r.try_get(4).map_err(unavailable)?),
                    signature: r.try_get(5).map_err(unavailable)?,
                })
            })
            .collect::<Result<Vec<_>, CoordinationError>>()?;
        Ok(ClusterHeads {
            key_generation: non_negative(key_generation.unwrap_or(0)),
            heads,
            last_digest,
        })
    }

    async fn append_digest(&self, digest: &Digest) -> Result<bool, CoordinationError> {
        let line = digest.to_line().map_err(unavailable)?;
        let rows = self
            .session
            .query(
                "INSERT INTO audit_digests (n, time_ms, prev_hash, key_generation, line)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (n) DO NOTHING
                 RETURNING n",
                &[
                    &bigint(digest.n, "digest n")?,
                    &digest.time.0,
                    &digest.prev,
                    &bigint(digest.key_generation, "key generation")?,
                    &line,
                ],
            )
            .await?;
        Ok(!rows.is_empty())
    }

    fn render_metrics(&self, out: &mut String) {
        use crate::metrics::render_value;
        let fence = self.connector.fence();
        render_value(
            out,
            "coffre_cluster_fenced_total",
            "counter",
            "PostgreSQL connections refused by the timeline fence (an old primary back after a \
             failover, or another system); alert on any.",
            &[("", fence.refused() as f64)],
        );
        if let Some(highest) = fence.highest() {
            render_value(
                out,
                "coffre_cluster_timeline",
                "gauge",
                "The highest PostgreSQL timeline this process has seen; servers on a lower one \
                 are refused.",
                &[("", highest.timeline as f64)],
            );
        }
    }

    async fn digests_since(
        &self,
        after_n: u64,
        limit: usize,
    ) -> Result<Vec<Digest>, CoordinationError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .session
            .query(
                "SELECT line FROM audit_digests WHERE n > $1 ORDER BY n LIMIT $2",
                &[&bigint(after_n, "digest n")?, &limit],
            )
            .await?;
        rows.iter()
            .map(|r| digest_of(&r.try_get::<_, String>(0).map_err(unavailable)?))
            .collect()
    }
}
