//! The audit log across nodes (design/several-nodes.md §6): each node
//! publishes its checkpoints, and the holder of the `audit-digest` lease
//! signs the cluster digest of every node's head.
//!
//! Nothing here is on a request's path: a node's log is written as on a
//! single node (local file, group commit, no database), and a checkpoint is
//! handed to a [`CheckpointQueue`] by the log writer without waiting.
//!
//! - **Publication** ([`spawn_publisher`]): a task takes the queued
//!   checkpoints, oldest first, in batches, and inserts them into
//!   `audit_checkpoints` ([`Coordination::publish_checkpoints`]). On
//!   failure it retries with exponential backoff (from 100 ms to 30 s). The
//!   queue is bounded ([`QUEUE_CAPACITY`]): in a long database outage it
//!   drops its *oldest* checkpoints and keeps the newest. That is enough,
//!   because a digest lists only each node's latest head, and each
//!   checkpoint covers every record before it. The dropped ones only thin
//!   out the history in `audit_checkpoints`; the log file still holds them.
//! - **The digest** ([`spawn_digest_signer`], [`sign_digest_once`]): every
//!   `digest_interval`, the node that holds the lease reads every
//!   registered node's latest published head, checks each one's signature
//!   (format v3: the node and the log are signed, so a row copied to
//!   another node's name is refused, not listed), carries forward the
//!   previous digest's head of a node that published nothing newer (or
//!   left the registry), and signs a [`Digest`] with the audit key,
//!   inserted as `n = last + 1`. A primary-key conflict means another
//!   signer (a lease held twice) won: fine, the next pass starts from its
//!   digest. Nothing is signed when nothing changed.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::{Coordination, CoordinationError, Lease, leases};
use crate::audit::{
    AuditError, AuditTrail, Checkpoint, CheckpointObserver, Digest, NodeHead, PublishedCheckpoint,
};
use crate::model::Clock;

/// Checkpoints waiting for publication, at most.
pub const QUEUE_CAPACITY: usize = 4096;
/// Checkpoints per insert, at most.
const BATCH: usize = 256;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The default `digest_interval`.
pub const DEFAULT_DIGEST_INTERVAL: Duration = Duration::from_secs(60);

/// This node's checkpoints on their way to the database. The log writer
/// pushes ([`CheckpointObserver`]: a short lock, never a wait); the
/// publisher task takes.
#[derive(Debug)]
pub struct CheckpointQueue {
    /// (queue position, checkpoint), oldest first.
    pending: Mutex<VecDeque<(u64, PublishedCheckpoint)>>,
    capacity: usize,
    next: AtomicU64,
    wake: Notify,
    dropped: AtomicU64,
    published: AtomicU64,
}

impl Default for CheckpointQueue {
    fn default() -> Self {
        Self::with_capacity(QUEUE_CAPACITY)
    }
}

impl CheckpointQueue {
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            pending: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            next: AtomicU64::new(0),
            wake: Notify::new(),
            dropped: AtomicU64::new(0),
            published: AtomicU64::new(0),
        }
    }

    /// Queues a checkpoint; the oldest goes if the queue is full.
    pub fn push(&self, checkpoint: PublishedCheckpoint) {
        let position = self.next.fetch_add(1, Ordering::Relaxed);
        {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            pending.push_back((position, checkpoint));
            while pending.len() > self.capacity {
                pending.pop_front();
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.wake.notify_one();
    }

    /// Checkpoints waiting now.
    pub fn len(&self) -> usize {
        self.pending.lock().map_or(0, |p| p.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checkpoints dropped unpublished (the queue was full).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Checkpoints published.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    /// The oldest `max` waiting, and the position of the last of them.
    fn peek(&self, max: usize) -> Option<(u64, Vec<PublishedCheckpoint>)> {
        let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let batch: Vec<_> = pending.iter().take(max).cloned().collect();
        let last = batch.last().map(|(p, _)| *p)?;
        Some((last, batch.into_iter().map(|(_, c)| c).collect()))
    }

    /// Removes what was published: every position up to `last` (some may
    /// have been dropped meanwhile).
    fn done(&self, last: u64, count: usize) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        while pending.front().is_some_and(|(p, _)| *p <= last) {
            pending.pop_front();
        }
        self.published.fetch_add(count as u64, Ordering::Relaxed);
    }
}

impl CheckpointObserver for CheckpointQueue {
    fn checkpointed(&self, checkpoint: &Checkpoint) {
        // A version 3 checkpoint (a node of a cluster) only.
        if let Some(published) = PublishedCheckpoint::from_checkpoint(checkpoint) {
            self.push(published);
        }
    }
}

/// Publishes the queued checkpoints until aborted (see the module docs).
pub fn spawn_publisher(
    queue: Arc<CheckpointQueue>,
    coordination: Arc<dyn Coordination>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut backoff = BACKOFF_MIN;
        let mut failing = false;
        loop {
            let Some((last, batch)) = queue.peek(BATCH) else {
                queue.wake.notified().await;
                continue;
            };
            match coordination.publish_checkpoints(&batch).await {
                Ok(()) => {
                    queue.done(last, batch.len());
                    if failing {
                        tracing::info!(
                            dropped = queue.dropped(),
                            "audit checkpoints are published again"
                        );
                    }
                    failing = false;
                    backoff = BACKOFF_MIN;
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(
                            error = %e,
                            waiting = queue.len(),
                            "cannot publish audit checkpoints; retrying (requests are not \
                             affected; the digest lags meanwhile)"
                        );
                    }
                    failing = true;
                    tokio::time::sleep(backoff).await;
                    backoff = backoff.saturating_mul(2).min(BACKOFF_MAX);
                }
            }
        }
    })
}

/// What one digest pass did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DigestOutcome {
    /// This digest was signed and appended.
    Appended(Digest),
    /// Another signer appended a digest with this `n` first.
    Conflict(u64),
    /// No head changed since the last digest (or none was ever published).
    Unchanged,
    /// The lease ran out before the digest was signed.
    LeaseLost,
}

#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    #[error(transparent)]
    Coordination(#[from] CoordinationError),
    #[error("signing the digest: {0}")]
    Signing(#[from] AuditError),
    #[error("making the digest: {0}")]
    Encode(String),
}

/// The heads the next digest lists: the published ones whose signature is
/// the audit key's (node and log included), and, for every node of the
/// last digest that published nothing newer in the same log, its head
/// there (so that a node's head never goes back and no node drops out).
fn next_heads(
    public_key: &[u8; 32],
    published: &[PublishedCheckpoint],
    last: Option<&Digest>,
) -> Vec<NodeHead> {
    let mut heads: BTreeMap<String, NodeHead> = last
        .map(|d| {
            d.heads
                .iter()
                .map(|h| (h.node.clone(), h.clone()))
                .collect()
        })
        .unwrap_or_default();
    for cp in published {
        if !cp.signature_is_valid(public_key) {
            tracing::error!(
                node = %cp.node,
                seq = cp.seq,
                "a published audit checkpoint does not verify under the audit key (altered in \
                 the database, or another node's); not listed in the digest"
            );
            continue;
        }
        let head = cp.head();
        match heads.get(&head.node) {
            Some(old) if old.log_id == head.log_id && old.seq >= head.seq => {}
            _ => {
                heads.insert(head.node.clone(), head);
            }
        }
    }
    heads.into_values().collect()
}

/// One digest pass under `lease` (see the module docs).
pub async fn sign_digest_once(
    trail: &Arc<AuditTrail>,
    coordination: &dyn Coordination,
    clock: &dyn Clock,
    lease: &Lease,
) -> Result<DigestOutcome, DigestError> {
    let state = coordination.latest_heads().await?;
    let last = state.last_digest.as_ref();
    let heads = next_heads(&trail.public_key(), &state.heads, last);
    let unchanged = match last {
        Some(d) => d.heads == heads && d.key_generation == state.key_generation,
        None => heads.is_empty(),
    };
    if unchanged {
        return Ok(DigestOutcome::Unchanged);
    }
    let unsigned = Digest::next(last, clock.now(), state.key_generation, heads)
        .map_err(DigestError::Encode)?;
    if !lease.is_valid() {
        return Ok(DigestOutcome::LeaseLost);
    }
    // An HSM-held key blocks while it signs.
    let signer = Arc::clone(trail);
    let digest = tokio::task::spawn_blocking(move || signer.sign_digest(unsigned))
        .await
        .map_err(|e| DigestError::Encode(e.to_string()))??;
    if coordination.append_digest(&digest).await? {
        Ok(DigestOutcome::Appended(digest))
    } else {
        Ok(DigestOutcome::Conflict(digest.n))
    }
}

/// Every `every`, a digest pass while this node holds the `audit-digest`
/// lease (for `lease_ttl`), until aborted.
pub fn spawn_digest_signer(
    trail: Arc<AuditTrail>,
    coordination: Arc<dyn Coordination>,
    clock: Arc<dyn Clock>,
    every: Duration,
    lease_ttl: Duration,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let lease = match coordination.acquire(leases::AUDIT_DIGEST, lease_ttl).await {
                Ok(Some(lease)) => lease,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "audit digest: the lease cannot be taken; pass skipped");
                    continue;
                }
            };
            match sign_digest_once(&trail, coordination.as_ref(), clock.as_ref(), &lease).await {
                Ok(DigestOutcome::Appended(d)) => {
                    tracing::debug!(n = d.n, nodes = d.heads.len(), "audit digest signed");
                }
                Ok(DigestOutcome::Conflict(n)) => {
                    tracing::info!(n, "audit digest: another node signed this one first");
                }
                Ok(DigestOutcome::Unchanged | DigestOutcome::LeaseLost) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "audit digest: pass failed; retried next time")
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::checkpoint::CheckpointSigner;
    use crate::model::Timestamp;

    const LOG: &str = "9d1f0c52-6a1e-4b7e-8f3a-2c4d5e6f7a8b";

    fn published(signer: &CheckpointSigner, node: &str, seq: u64) -> PublishedCheckpoint {
        let cp = signer
            .checkpoint_of(Some(node), LOG, seq, &"ab".repeat(32), Timestamp(1))
            .unwrap();
        PublishedCheckpoint::from_checkpoint(&cp).unwrap()
    }

    #[test]
    fn the_queue_is_bounded_and_keeps_the_newest() {
        let (signer, _) = CheckpointSigner::generate().unwrap();
        let queue = CheckpointQueue::with_capacity(3);
        for seq in 1..=5 {
            queue.push(published(&signer, "n1", seq));
        }
        assert_eq!((queue.len(), queue.dropped()), (3, 2));
        let (last, batch) = queue.peek(2).unwrap();
        assert_eq!(batch.iter().map(|c| c.seq).collect::<Vec<_>>(), [3, 4]);
        // Two more arrive while the batch is being published: the oldest
        // (already in the batch) is dropped, and `done` removes the rest.
        queue.push(published(&signer, "n1", 6));
        queue.push(published(&signer, "n1", 7));
        queue.done(last, batch.len());
        let (_, rest) = queue.peek(10).unwrap();
        assert_eq!(rest.iter().map(|c| c.seq).collect::<Vec<_>>(), [5, 6, 7]);
        // A single node's checkpoint (v2) is not queued.
        queue.checkpointed(
            &signer
                .checkpoint(LOG, 9, &"ab".repeat(32), Timestamp(1))
                .unwrap(),
        );
        assert_eq!(queue.len(), 3);
    }

    #[test]
    fn the_next_heads_never_go_back_nor_drop_a_node_nor_take_a_forgery() {
        let (signer, _) = CheckpointSigner::generate().unwrap();
        let pk = signer.public_key();
        let first = next_heads(
            &pk,
            &[published(&signer, "n1", 10), published(&signer, "n2", 4)],
            None,
        );
        let last = signer
            .sign_digest(Digest::next(None, Timestamp(1), 0, first).unwrap())
            .unwrap();
        // n1 published an older one (clock skew), n2 left the registry, n3
        // is new, and a row claims to be n4's but is n3's.
        let mut forged = published(&signer, "n3", 2);
        forged.node = "n4".into();
        let heads = next_heads(
            &pk,
            &[
                published(&signer, "n1", 8),
                published(&signer, "n3", 2),
                forged,
            ],
            Some(&last),
        );
        let got: Vec<(&str, u64)> = heads.iter().map(|h| (h.node.as_str(), h.seq)).collect();
        assert_eq!(got, [("n1", 10), ("n2", 4), ("n3", 2)]);
    }
}
