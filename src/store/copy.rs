//! What `coffre store copy` moves from one backend to another (sled to
//! PostgreSQL today): every record exactly as stored, with its MAC tag.
//!
//! Both backends keep the same JSON bytes and the same tag over them
//! ([`super::integrity`]: one table name and one slot id per record on
//! both), so a record and its tag move as they are. The copy needs no
//! MAC key and no HSM: it never holds a key, and the target's first
//! `coffre serve` checks every record as it reads it, under the MAC key
//! that moves with the other service secrets (HSM-wrapped). A record
//! edited on the way fails there as it would have failed on the source.
//!
//! What is *not* copied, and why ([`copied_secret`]): the single server's
//! audit high-water mark. It is bound (by its HSM wrap's AAD) to its name,
//! `audit-high-water-mark`, which no node of a shared store reads: each
//! node keeps its own log and its own mark,
//! `audit-high-water-mark/<node_id>`, which its first start creates. The
//! old server's audit log is closed by the copy (verify and archive it);
//! see docs/postgres.md, "From sled to PostgreSQL".

use serde::Serialize;

use super::WrappedSecret;
use super::approvals::Approval;
use crate::model::{KeyRecord, VersionRecord};

/// The single server's audit high-water mark (`server/audit.rs`).
pub const SINGLE_SERVER_AUDIT_MARK: &str = "audit-high-water-mark";

/// Whether the service secret `name` moves to a shared store; see the
/// module docs for the one that does not.
pub fn copied_secret(name: &str) -> bool {
    name != SINGLE_SERVER_AUDIT_MARK
}

/// One record as stored: decoded (for the columns a backend derives from
/// it, and to check it belongs to its slot), and its bytes and tag
/// exactly as they were, which is what the target stores.
#[derive(Debug)]
pub struct StoredRecord<R> {
    pub record: R,
    /// The record's JSON, byte for byte: what the tag covers.
    pub json: Vec<u8>,
    /// Its MAC tag ([`super::integrity::TAG_LEN`] bytes), unchecked.
    pub tag: Vec<u8>,
}

/// A whole store, read for a copy.
#[derive(Debug, Default)]
pub struct StoreDump {
    /// Each key with the generation of its last change (the change feed).
    pub keys: Vec<(StoredRecord<KeyRecord>, u64)>,
    pub versions: Vec<StoredRecord<VersionRecord>>,
    pub approvals: Vec<StoredRecord<Approval>>,
    /// Every service secret, by name (HSM-wrapped; the ones
    /// [`copied_secret`] refuses included, so the copy can name them).
    pub secrets: Vec<(String, WrappedSecret)>,
    /// Root keys a rotation fenced off: nothing may be written under them.
    pub retired_root_keys: Vec<u32>,
    /// The change feed's newest generation (at least every key's).
    pub generation: u64,
}

/// How much a copy moved (and the target holds after it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CopyCounts {
    pub keys: u64,
    pub versions: u64,
    pub approvals: u64,
    pub secrets: u64,
    pub generation: u64,
}

impl StoreDump {
    /// What the target must hold once the copy is done.
    pub fn expected(&self) -> CopyCounts {
        CopyCounts {
            keys: self.keys.len() as u64,
            versions: self.versions.len() as u64,
            approvals: self.approvals.len() as u64,
            secrets: self.copied_secrets().count() as u64,
            generation: self.generation,
        }
    }

    /// The secrets that move.
    pub fn copied_secrets(&self) -> impl Iterator<Item = &(String, WrappedSecret)> {
        self.secrets.iter().filter(|(name, _)| copied_secret(name))
    }

    /// The names of the secrets that stay behind.
    pub fn skipped_secrets(&self) -> Vec<String> {
        self.secrets
            .iter()
            .filter(|(name, _)| !copied_secret(name))
            .map(|(name, _)| name.clone())
            .collect()
    }
}
