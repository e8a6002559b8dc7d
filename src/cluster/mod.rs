//! Coordination between nodes that share one store (issue #17): leases
//! for the jobs that should run on one node at a time, the node registry
//! and its heartbeat, and the change feed's wake-up hint.
//!
//! This is a seam beside [`crate::store::KeyStore`], not part of it: the
//! data contract stays the same on every backend, and what only a cluster
//! needs lives here. [`LocalCoordination`] is a node alone on its store
//! (sled, `coffre dev`): every lease is its own, nothing to wait for.
//! [`postgres::PgCoordination`] keeps leases and nodes in the database,
//! judged by the database's clock.
//!
//! A lease is an optimisation, never what keeps data safe: every action a
//! leased job takes is a compare-and-swap in the store (a scheduled
//! rotation or destruction, a root-key fence, an approval), so two nodes
//! that both believe they hold one (a lease that expired under a paused
//! process) still act once. The lease keeps them from racing for nothing,
//! and from calling the HSM twice.

use std::fmt;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::audit::{Digest, PublishedCheckpoint};

pub mod audit;
pub mod barrier;
pub mod local;
pub mod metered;
pub mod postgres;

pub use barrier::{BarrierError, Durability, DurableTicket, ReadMark};
pub use local::LocalCoordination;

/// The jobs that run on one node at a time.
pub mod leases {
    /// Due rotations and destructions.
    pub const SCHEDULER: &str = "scheduler";
    /// The HSM root-key rotation.
    pub const ROOT_ROTATION: &str = "root-rotation";
    /// Signing the cluster audit digest ([`super::audit`]).
    pub const AUDIT_DIGEST: &str = "audit-digest";
    /// A start's one-time setup that an insert-if-absent cannot cover: the
    /// audit signing key pair generated in a PKCS#11 token (two starts at
    /// once would make two pairs under one label).
    pub const CLUSTER_INIT: &str = "cluster-init";
    /// Every lease, for the metrics (`coffre_cluster_lease_holder`).
    pub const ALL: [&str; 4] = [SCHEDULER, ROOT_ROTATION, AUDIT_DIGEST, CLUSTER_INIT];
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoordinationError {
    /// The coordination backend (the database) cannot be reached or
    /// refused the call; retried on the next pass.
    #[error("coordination unavailable: {0}")]
    Unavailable(String),
}

/// A lease this node holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub name: String,
    /// Grows with every new holder: a fencing token.
    pub token: u64,
    /// This node's own deadline (monotonic): the sending time of the call
    /// that granted or renewed the lease, plus its time to live, minus a
    /// margin. The holder stops the job's next action once it has passed,
    /// without waiting to be told.
    pub valid_until: Instant,
}

impl Lease {
    pub fn is_valid(&self) -> bool {
        Instant::now() < self.valid_until
    }
}

/// A node as the registry knows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NodeStatus {
    pub node_id: String,
    pub incarnation: String,
    /// Milliseconds since its last heartbeat, by the registry's clock.
    pub last_seen_ms_ago: u64,
    /// What its last heartbeat said of its caches (`None`: it has not
    /// reported yet, or runs a binary that does not).
    pub freshness: Option<ReportedFreshness>,
}

/// A node's freshness as the registry knows it: its heartbeat's
/// [`FreshnessReport`], aged by the registry's clock.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ReportedFreshness {
    /// The last change-feed generation it had applied.
    pub feed_generation: u64,
    /// Milliseconds from the sending of its last successful poll to its
    /// last heartbeat: how old its caches' confirmation was then (`None`:
    /// never confirmed). A node polls several times between heartbeats,
    /// so this is not aged further; a silent node's is unknown.
    pub staleness_ms: Option<u64>,
    /// Its bound: past it, a strict node refuses data keys.
    pub max_staleness_ms: u64,
    /// Strict (refuses when stale) or available mode.
    pub strict: bool,
}

/// What a heartbeat tells the registry of this node's caches
/// ([`crate::service::Kms::freshness_report`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FreshnessReport {
    /// The last change-feed generation applied.
    pub feed_generation: u64,
    /// Time since the sending of the last successful poll (`None`: none
    /// yet).
    pub confirmed_ago: Option<Duration>,
    pub max_staleness: Duration,
    pub strict: bool,
}

/// What the digest signer reads before it signs ([`audit`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterHeads {
    /// The store's change counter (`coffre_cluster.key_generation`).
    pub key_generation: u64,
    /// The latest checkpoint published by each registered node that has
    /// published one, in node id order.
    pub heads: Vec<PublishedCheckpoint>,
    /// The last digest of the chain, if any.
    pub last_digest: Option<Digest>,
}

/// A lease as the registry knows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LeaseStatus {
    pub name: String,
    pub holder: String,
    pub token: u64,
    /// Milliseconds until it expires (0: expired), by the registry's clock.
    pub expires_in_ms: u64,
}

#[async_trait]
pub trait Coordination: Send + Sync + fmt::Debug {
    /// This node's id.
    fn node_id(&self) -> &str;

    /// Takes the lease `name` for `ttl`, or renews it if this node (this
    /// incarnation) holds it already; `None` if another node holds it and
    /// it has not expired.
    async fn acquire(&self, name: &str, ttl: Duration) -> Result<Option<Lease>, CoordinationError>;

    /// Gives the lease up early (at shutdown), if still held.
    async fn release(&self, lease: &Lease) -> Result<(), CoordinationError>;

    /// Registers this node on the first call, then records that it is
    /// alive, and how fresh its caches are (`None`: a node alone on its
    /// store, or a caller that has none to report).
    async fn heartbeat(&self, freshness: Option<FreshnessReport>) -> Result<(), CoordinationError>;

    /// Every registered node.
    async fn nodes(&self) -> Result<Vec<NodeStatus>, CoordinationError>;

    /// Every lease, held or expired.
    async fn leases(&self) -> Result<Vec<LeaseStatus>, CoordinationError>;

    /// Waits until another node may have changed keys (a hint: a
    /// notification from the store), or `timeout` has passed.
    async fn wait_for_changes(&self, timeout: Duration);

    /// Publishes this node's audit checkpoints, oldest first (idempotent:
    /// one already published is left as it is). Alone on a store: nothing
    /// to publish to.
    async fn publish_checkpoints(
        &self,
        batch: &[PublishedCheckpoint],
    ) -> Result<(), CoordinationError>;

    /// Every registered node's latest published checkpoint, the store's
    /// key generation and the last digest: what the next digest is made
    /// of. Alone on a store: empty.
    async fn latest_heads(&self) -> Result<ClusterHeads, CoordinationError>;

    /// Appends `digest` to the chain if no digest has its `n` yet; `false`
    /// if one has (another signer won: nothing to do). Alone: `false`.
    async fn append_digest(&self, digest: &Digest) -> Result<bool, CoordinationError>;

    /// The digests after `after_n`, at most `limit`, in order.
    async fn digests_since(
        &self,
        after_n: u64,
        limit: usize,
    ) -> Result<Vec<Digest>, CoordinationError>;

    /// Before a store read whose result may be used for new wraps (a key
    /// version), or before writing one: the durability barrier
    /// ([`barrier`]) begins here.
    fn read_mark(&self) -> ReadMark;

    /// After that read (or write) returned: what a barrier must reach.
    fn durable_ticket(&self, mark: ReadMark) -> DurableTicket;

    /// Whether what was read before `ticket` is known to survive a
    /// failover. Always, alone on a store: its writes are durable when
    /// they return.
    fn durability(&self, ticket: DurableTicket) -> Durability;

    /// Waits until `ticket` is [`Durability::Durable`], forcing a barrier
    /// (a commit of this node's) if none covers it yet; `timeout` at most.
    /// No default, like the rest: a decorator that forgot to forward it
    /// would silently turn the barrier off.
    async fn wait_durable(
        &self,
        ticket: DurableTicket,
        timeout: Duration,
    ) -> Result<(), BarrierError>;

    /// Appends what the backend knows about the shared store's health to
    /// the metrics page (Prometheus text). Alone on a store: nothing. No
    /// default: a decorator that forgot to forward it hid the timeline
    /// fence's counter.
    fn render_metrics(&self, out: &mut String);
}
