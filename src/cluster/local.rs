//! [`LocalCoordination`]: a node alone on its store.

use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{
    BarrierError, ClusterHeads, Coordination, CoordinationError, Durability, DurableTicket,
    FreshnessReport, Lease, LeaseStatus, NodeStatus, ReadMark,
};
use crate::audit::{Digest, PublishedCheckpoint};

/// A node alone on its store (sled, whose directory lock admits one
/// process): every lease is its own, no other node changes keys.
#[derive(Debug)]
pub struct LocalCoordination {
    node_id: String,
}

impl LocalCoordination {
    pub fn new(node_id: impl Into<String>) -> Self {
        Self {
            node_id: node_id.into(),
        }
    }
}

impl Default for LocalCoordination {
    fn default() -> Self {
        Self::new("local")
    }
}

#[async_trait]
impl Coordination for LocalCoordination {
    fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Alone on its store: nothing to report.
    fn render_metrics(&self, _out: &mut String) {}

    fn read_mark(&self) -> ReadMark {
        ReadMark::default()
    }

    fn durable_ticket(&self, _mark: ReadMark) -> DurableTicket {
        DurableTicket::default()
    }

    /// Alone on its store, whose writes are durable when they return.
    fn durability(&self, _ticket: DurableTicket) -> Durability {
        Durability::Durable
    }

    async fn wait_durable(
        &self,
        _ticket: DurableTicket,
        _timeout: Duration,
    ) -> Result<(), BarrierError> {
        Ok(())
    }

    async fn acquire(&self, name: &str, ttl: Duration) -> Result<Option<Lease>, CoordinationError> {
        Ok(Some(Lease {
            name: name.to_owned(),
            token: 1,
            valid_until: Instant::now() + ttl,
        }))
    }

    async fn release(&self, _lease: &Lease) -> Result<(), CoordinationError> {
        Ok(())
    }

    async fn heartbeat(
        &self,
        _freshness: Option<FreshnessReport>,
    ) -> Result<(), CoordinationError> {
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<NodeStatus>, CoordinationError> {
        Ok(vec![NodeStatus {
            node_id: self.node_id.clone(),
            incarnation: String::new(),
            last_seen_ms_ago: 0,
            freshness: None,
        }])
    }

    async fn leases(&self) -> Result<Vec<LeaseStatus>, CoordinationError> {
        Ok(Vec::new())
    }

    async fn wait_for_changes(&self, timeout: Duration) {
        tokio::time::sleep(timeout).await;
    }

    async fn publish_checkpoints(
        &self,
        _batch: &[PublishedCheckpoint],
    ) -> Result<(), CoordinationError> {
        Ok(())
    }

    async fn latest_heads(&self) -> Result<ClusterHeads, CoordinationError> {
        Ok(ClusterHeads::default())
    }

    async fn append_digest(&self, _digest: &Digest) -> Result<bool, CoordinationError> {
        Ok(false)
    }

    async fn digests_since(
        &self,
        _after_n: u64,
        _limit: usize,
    ) -> Result<Vec<Digest>, CoordinationError> {
        Ok(Vec::new())
    }
}
