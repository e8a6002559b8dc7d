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

/// A version not yet known durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    ticket: DurableTicket,
    /// The ticket is lost and the caches' copies of the version were
    /// dropped (once: the entry stays for the next wrap to refuse).
    swept: bool,
}

/// The versions not yet known durable, and their tickets.
#[derive(Debug, Default)]
pub(super) struct Unconfirmed {
    map: std::sync::Mutex<HashMap<(KeyId, u32), Entry>>,
    /// The map's length, for the wrap path's check without the lock.
    len: std::sync::atomic::AtomicUsize,
}

impl Unconfirmed {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(KeyId, u32), Entry>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    fn update(&self, change: impl FnOnce(&mut HashMap<(KeyId, u32), Entry>)) {
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
            map.insert(
                (id, version),
                Entry {
                    ticket,
                    swept: false,
                },
            );
        });
    }

    /// On the wrap path, before a data key is wrapped under `version`:
    /// waits for a barrier if the version is not yet known durable.
    pub(super) async fn ensure_durable(&self, id: KeyId, version: u32) -> Result<()> {
        if self.unconfirmed.len() == 0 {
            return Ok(());
        }
        let Some(Entry { ticket, .. }) = self.unconfirmed.lock().get(&(id, version)).copied()
        else {
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
            if map.get(&(id, version)).map(|e| e.ticket) == Some(ticket) {
                map.remove(&(id, version));
            }
        });
    }

    /// Drops every entry a barrier has covered since (the feed's poller
    /// calls this on each pass). An entry whose read the timeline's rise
    /// may have undone stays, for the next wrap under that version to
    /// refuse and read again (a request may hold the material between its
    /// read and its wrap), and what the caches hold of it goes now. Such
    /// entries are few: versions read within a heartbeat before a failover;
    /// the next wrap under one refuses once (`UNAVAILABLE`, retry).
    pub(super) fn sweep_confirmed(&self) {
        if self.unconfirmed.len() == 0 {
            return;
        }
        let mut lost = Vec::new();
        self.unconfirmed.update(|map| {
            map.retain(
                |&(id, version), entry| match self.coordination.durability(entry.ticket) {
                    Durability::Durable => false,
                    Durability::Pending => true,
                    Durability::Lost => {
                        if !entry.swept {
                            entry.swept = true;
                            lost.push((id, version));
                        }
                        true
                    }
                },
            );
        });
        for (id, version) in lost {
            self.materials.remove(&(id, version));
            self.objects.remove(&(id, version));
            self.keys.remove(&id);
        }
    }
}
