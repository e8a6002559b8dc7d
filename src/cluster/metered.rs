//! A [`Coordination`] that records, for the metrics page, which leases the
//! one it wraps granted this node (`coffre_cluster_lease_holder`,
//! [`crate::metrics::cluster::LeaseGauges`]). A decorator, like
//! `hsm::metered`, so that no backend has to know about metrics: every
//! lease a job takes goes through `acquire`, whatever the backend.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{
    BarrierError, ClusterHeads, Coordination, CoordinationError, Durability, DurableTicket,
    FreshnessReport, Lease, LeaseStatus, NodeStatus, ReadMark,
};
use crate::audit::{Digest, PublishedCheckpoint};
use crate::metrics::cluster::LeaseGauges;

#[derive(Debug)]
pub struct MeteredCoordination {
    inner: Arc<dyn Coordination>,
    gauges: Arc<LeaseGauges>,
}

impl MeteredCoordination {
    pub fn new(inner: Arc<dyn Coordination>, gauges: Arc<LeaseGauges>) -> Self {
        Self { inner, gauges }
    }
}

#[async_trait]
impl Coordination for MeteredCoordination {
    fn node_id(&self) -> &str {
        self.inner.node_id()
    }

    async fn acquire(&self, name: &str, ttl: Duration) -> Result<Option<Lease>, CoordinationError> {
        let result = self.inner.acquire(name, ttl).await;
        match &result {
            Ok(Some(lease)) => self.gauges.granted(name, lease.valid_until),
            // Refused, or not known to be held: a holder that cannot renew
            // stops acting on it, so it is not counted as held either.
            Ok(None) | Err(_) => self.gauges.lost(name),
        }
        result
    }

    async fn release(&self, lease: &Lease) -> Result<(), CoordinationError> {
        self.gauges.lost(&lease.name);
        self.inner.release(lease).await
    }

    async fn heartbeat(&self, freshness: Option<FreshnessReport>) -> Result<(), CoordinationError> {
        self.inner.heartbeat(freshness).await
    }

    fn read_mark(&self) -> ReadMark {
        self.inner.read_mark()
    }

    fn durable_ticket(&self, mark: ReadMark) -> DurableTicket {
        self.inner.durable_ticket(mark)
    }

    fn durability(&self, ticket: DurableTicket) -> Durability {
        self.inner.durability(ticket)
    }

    async fn wait_durable(
        &self,
        ticket: DurableTicket,
        timeout: Duration,
    ) -> Result<(), BarrierError> {
        self.inner.wait_durable(ticket, timeout).await
    }

    async fn nodes(&self) -> Result<Vec<NodeStatus>, CoordinationError> {
        self.inner.nodes().await
    }

    async fn leases(&self) -> Result<Vec<LeaseStatus>, CoordinationError> {
        self.inner.leases().await
    }

    fn render_metrics(&self, out: &mut String) {
        self.inner.render_metrics(out);
    }

    async fn wait_for_changes(&self, timeout: Duration) {
        self.inner.wait_for_changes(timeout).await
    }

    async fn publish_checkpoints(
        &self,
        batch: &[PublishedCheckpoint],
    ) -> Result<(), CoordinationError> {
        self.inner.publish_checkpoints(batch).await
    }

    async fn latest_heads(&self) -> Result<ClusterHeads, CoordinationError> {
        self.inner.latest_heads().await
    }

    async fn append_digest(&self, digest: &Digest) -> Result<bool, CoordinationError> {
        self.inner.append_digest(digest).await
    }

    async fn digests_since(
        &self,
        after_n: u64,
        limit: usize,
    ) -> Result<Vec<Digest>, CoordinationError> {
        self.inner.digests_since(after_n, limit).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{LocalCoordination, leases};

    #[tokio::test]
    async fn a_granted_lease_is_held_until_released() {
        let gauges = Arc::new(LeaseGauges::default());
        let c =
            MeteredCoordination::new(Arc::new(LocalCoordination::new("n1")), Arc::clone(&gauges));
        assert!(!gauges.holds(leases::SCHEDULER));
        let lease = c
            .acquire(leases::SCHEDULER, Duration::from_secs(30))
            .await
            .unwrap()
            .unwrap();
        assert!(gauges.holds(leases::SCHEDULER));
        assert!(!gauges.holds(leases::AUDIT_DIGEST));
        c.release(&lease).await.unwrap();
        assert!(!gauges.holds(leases::SCHEDULER));
    }
}
