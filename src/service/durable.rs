//! The durability barrier on the wrap path ([`crate::cluster::barrier`]):
//! a key version read from a shared store, or written by this node, is
//! used for new wraps only once the database has acknowledged a commit of
//! this node's begun after the read (or the write) returned.
//!
//! The versions not yet covered are kept in a small map with their
//! tickets. Alone on a store (sled) nothing ever enters it: every ticket
//! is durable at once, and the wrap path's check is one atomic load. On a
//! shared store an entry lives from the version's read to the next
//! heartbeat (a second at most) or to the first wrap, which forces a
//! barrier and waits for it. The feed's poller sweeps covered entries, so
//! that versions used only for unwraps do not pile up.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::Kms;
use crate::cluster::{BarrierError, Durability, DurableTicket, ReadMark};
use crate::error::{Error, Result};
use crate::model::KeyId;

/// How long a wrap waits for a barrier when the node keeps no freshness
/// bound (a store shared without one, in tests).
const DEFAULT_BARRIER_WAIT: Duration = Duration::from_secs(1);

/// The versions not yet known durable, and their tickets.
#[derive(Debug, Default)]
pub(super) struct Unconfirmed {
    map: std::sync::Mutex<HashMap<(KeyId, u32), DurableTicket>>,
    /// The map's length, for the wrap path's check without the lock.
    len: std::sync::atomic::AtomicUsize,
}

impl Unconfirmed {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(KeyId, u32), DurableTicket>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    fn update(&self, change: impl FnOnce(&mut HashMap<(KeyId, u32), DurableTicket>)) {
        let mut map = self.lock();
        change(&mut map);
        self.len.store(map.len(), Ordering::Release);
    }
}

impl Kms {
    /// Before a store read of a version, or a store write of a new one.
    pub(super) fn version_mark(&self) -> ReadMark {
        self.coordination.read_mark()
    }

    /// After that read or write returned, before the version is cached:
    /// notes it unless it is durable already.
    pub(super) fn note_version(&self, id: KeyId, version: u32, mark: ReadMark) {
        let ticket = self.coordination.durable_ticket(mark);
        if self.coordination.durability(ticket) == Durability::Durable {
            return;
        }
        self.unconfirmed.update(|map| {
            map.insert((id, version), ticket);
        });
    }

    /// On the wrap path, before a data key is wrapped under `version`:
    /// waits for a barrier if the version is not yet known durable.
    pub(super) async fn ensure_durable(&self, id: KeyId, version: u32) -> Result<()> {
        if self.unconfirmed.len() == 0 {
            return Ok(());
        }
        let Some(ticket) = self.unconfirmed.lock().get(&(id, version)).copied() else {
            return Ok(());
        };
        let wait = self
            .freshness
            .as_ref()
            .map_or(DEFAULT_BARRIER_WAIT, |f| f.max_staleness());
        match self.coordination.wait_durable(ticket, wait).await {
            Ok(()) => {
                self.forget_ticket(id, version, ticket);
                Ok(())
            }
            Err(reason) => {
                if reason == BarrierError::Lost {
                    // Read before a failover: what the new primary holds
                    // is read again by the next request.
                    self.forget_ticket(id, version, ticket);
                    self.materials.remove(&(id, version));
                    self.objects.remove(&(id, version));
                    self.keys.remove(&id);
                }
                Err(Error::NotDurable {
                    key_id: id,
                    version,
                    reason,
                })
            }
        }
    }

    /// Drops the entry of `(id, version)` if it is still `ticket` (a
    /// newer read may have replaced it).
    fn forget_ticket(&self, id: KeyId, version: u32, ticket: DurableTicket) {
        self.unconfirmed.update(|map| {
            if map.get(&(id, version)) == Some(&ticket) {
                map.remove(&(id, version));
            }
        });
    }

    /// Drops every entry a barrier has covered since (the feed's poller
    /// calls this on each pass).
    pub(super) fn sweep_confirmed(&self) {
        if self.unconfirmed.len() == 0 {
            return;
        }
        self.unconfirmed.update(|map| {
            map.retain(|_, ticket| self.coordination.durability(*ticket) == Durability::Pending);
        });
    }
}
