//! The storage seam: [`KeyStore`] and its backends.
//!
//! A store holds key metadata, CMK versions (material only in HSM-wrapped
//! form) and the alias index. Every mutating call returns only once the change
//! is durable: a change that was acknowledged survives a crash or power cut.
//!
//! Calls are async, and never made on the cached data-key path. A
//! mutating call, once started, runs to its end even if its caller goes
//! away (its future dropped: a client cancelled, a deadline passed): each
//! backend runs it on a task of its own (sled on the blocking pool, a
//! database client on a spawned task), so a change handed to the store is
//! never cut in the middle of its commit, and its outcome is either
//! durable or nothing.

use std::fmt;
use std::sync::Arc;

use uuid::Uuid;

use crate::model::{KeyId, KeyRecord, KeyState, Timestamp, VersionRecord};
use approvals::Approval;
use integrity::{IntegrityState, RecordMac};

pub mod approvals;
#[cfg(test)]
mod approvals_integrity_tests;
pub(crate) mod checks;
pub mod conformance;
pub mod copy;
pub mod integrity;
pub mod postgres;
pub mod sled;
pub use sled::SledStore;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("a key with id {0} already exists")]
    KeyExists(KeyId),
    #[error("the alias {0:?} is already taken")]
    AliasTaken(String),
    #[error("no key with id {0}")]
    NoSuchKey(KeyId),
    #[error("no version {1} of key {0}")]
    NoSuchVersion(KeyId, u32),
    /// A compare-and-swap lost a race, or a version was not the next one.
    #[error("conflicting concurrent update of key {0}")]
    Conflict(KeyId),
    /// A stored record does not decode: corruption or an incompatible version.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// A stored record failed its MAC (see [`integrity`]): edited, moved to
    /// another slot, planted without the key, or unsealed in a sealed
    /// store. The record is refused, never used; the message names the
    /// table and id, never the content.
    #[error("integrity check failed: {0}")]
    IntegrityFailure(String),
    /// The storage layer failed (I/O error, disk full, read-only medium).
    #[error("storage failure: {0}")]
    Io(String),
    /// A record wrapped under a root key that a rotation has fenced off
    /// ([`KeyStore::fence_root_keys`]): it is about to be destroyed, so
    /// nothing may be stored under it any more. Wrap under the current
    /// root key and write again.
    #[error("root key {0} is retired: wrap under the current root key and retry")]
    RootKeyRetired(u32),
    #[error("an approval with id {0} already exists")]
    ApprovalExists(Uuid),
    #[error("no approval with id {0}")]
    NoSuchApproval(Uuid),
    /// An approval's compare-and-swap lost a race: another approver (on
    /// this node or another) changed it first. Re-read and decide again.
    #[error("conflicting concurrent update of approval {0}")]
    ApprovalConflict(Uuid),
}

/// Which keys [`KeyStore::list_keys`] returns. The default selects every key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyFilter {
    /// Only keys in this state.
    pub state: Option<KeyState>,
    /// Only keys whose alias starts with this (byte-wise) prefix; keys
    /// without an alias never match a `Some` prefix (even an empty one).
    pub alias_prefix: Option<String>,
}

impl KeyFilter {
    /// Whether `key` passes the filter.
    pub fn matches(&self, key: &KeyRecord) -> bool {
        self.state.is_none_or(|s| s == key.state)
            && self.alias_prefix.as_ref().is_none_or(|prefix| {
                key.alias
                    .as_ref()
                    .is_some_and(|alias| alias.starts_with(prefix.as_str()))
            })
    }
}

/// Progress of an HSM root-key rotation: see [`KeyStore::count_versions`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VersionCounts {
    /// Versions whose material is still stored (not destroyed).
    pub live: u64,
    /// Live versions wrapped under another root key than the one asked about:
    /// what a rotation to that root key still has to re-wrap.
    pub not_under_root: u64,
    /// Versions whose material was erased (their key is DESTROYED).
    pub destroyed: u64,
}

/// One entry of the change feed ([`KeyStore::changes_since`]): key
/// `key_id`'s record last changed at `generation`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyChange {
    pub generation: u64,
    pub key_id: KeyId,
}

/// A page of the change feed, and the store's newest generation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangePage {
    /// In ascending generation order.
    pub changes: Vec<KeyChange>,
    /// The generation of the newest change stored (0: none yet). Every
    /// change up to it is in this page or a later one, unless the page is
    /// full (`changes.len() == limit`): then read on from the last one.
    pub head: u64,
}

/// A secret of the service itself (not a customer key), e.g. the audit log's
/// key, stored only wrapped by the HSM root key, like CMK material.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WrappedSecret {
    pub hsm_root_key_id: u32,
    #[serde(with = "crate::model::hex_bytes")]
    pub wrapped: Vec<u8>,
}

impl fmt::Debug for WrappedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WrappedSecret")
            .field("hsm_root_key_id", &self.hsm_root_key_id)
            .field("wrapped_len", &self.wrapped.len())
            .finish()
    }
}

/// Every mutating method is atomic (all of its change or none of it) and
/// returns `Ok` only once the change is durable. A refused call
/// ([`StoreError::KeyExists`], [`StoreError::AliasTaken`],
/// [`StoreError::NoSuchKey`], [`StoreError::NoSuchVersion`],
/// [`StoreError::Conflict`], [`StoreError::Corrupt`]) writes nothing.
/// [`StoreError::Corrupt`] is returned either when a stored record does not
/// decode, or *before anything is written* when the arguments would store an
/// inconsistent record (a caller bug, not a race). [`StoreError::Conflict`]
/// means the stored state is not the one the caller based its change on:
/// re-read and retry (or give up). [`StoreError::Io`] from a mutating call
/// means "outcome unknown".
///
/// DESTROYED is final: a destroyed key's record (its tombstone, which keeps
/// its metadata and alias) and its erased versions are never rewritten. Only
/// [`KeyStore::destroy_key`] makes a key DESTROYED.
#[async_trait::async_trait]
pub trait KeyStore: Send + Sync + fmt::Debug {
    /// Creates a key with its first version, atomically: either the key, its
    /// version, its alias and its entry in the due index all exist
    /// afterwards, or none does. `key.primary_version` must equal
    /// `first_version.version`, `first_version.key_id` must equal `key.id`,
    /// `key.state` must not be DESTROYED and `first_version` must not be
    /// destroyed; otherwise [`StoreError::Corrupt`] and nothing is written.
    /// [`StoreError::KeyExists`] / [`StoreError::AliasTaken`] also leave the
    /// store unchanged.
    async fn create_key(
        &self,
        key: &KeyRecord,
        first_version: &VersionRecord,
    ) -> Result<(), StoreError> {
        self.create_keys(&[(key, first_version)]).await
    }

    /// Creates several keys, each with its first version, as
    /// [`KeyStore::create_key`] creates one, in one atomic and durable write:
    /// all of them or none (a clash with a stored key or alias, or between
    /// two of them, refuses the whole batch). For bulk creation, where one
    /// durable write per key would dominate.
    async fn create_keys(&self, keys: &[(&KeyRecord, &VersionRecord)]) -> Result<(), StoreError>;

    async fn get_key(&self, id: KeyId) -> Result<Option<KeyRecord>, StoreError>;

    /// The key that holds `alias`. An alias stays taken by a DESTROYED key
    /// (its tombstone keeps it), so it is never reused.
    async fn key_id_for_alias(&self, alias: &str) -> Result<Option<KeyId>, StoreError>;

    /// At most `limit` keys that pass `filter`, in ascending order of their
    /// 16 id bytes, starting strictly after `start_after` (which need not
    /// exist nor pass the filter). The next page starts after the last key
    /// returned. May scan keys that the filter rejects.
    async fn list_keys(
        &self,
        filter: &KeyFilter,
        start_after: Option<KeyId>,
        limit: usize,
    ) -> Result<Vec<KeyRecord>, StoreError>;

    /// Keys whose [`KeyRecord::next_due`] is at or before `now`, earliest
    /// first (ties in ascending id order), at most `limit`. Served from an
    /// index maintained atomically with every write of a key record, so the
    /// cost is proportional to the answer, not to the number of keys. An
    /// index entry that does not match its key is [`StoreError::Corrupt`].
    async fn due_keys(&self, now: Timestamp, limit: usize) -> Result<Vec<KeyRecord>, StoreError>;

    /// Rotation: adds `version` and replaces the stored key record with
    /// `updated`, atomically, if the stored key still equals `current`.
    ///
    /// `updated` is the whole new record, so that automatic rotation can move
    /// `next_rotation_at` in the same write. Refused with
    /// [`StoreError::Corrupt`], writing nothing, unless `version.key_id ==
    /// current.id`, `updated` keeps the id and the alias of `current`,
    /// `updated.primary_version == version.version`, neither `current` nor
    /// `updated` is DESTROYED and `version` is not destroyed. Refused with
    /// [`StoreError::Conflict`] if `version.version != current.primary_version
    /// + 1`, if the version already exists, or if the stored key differs from
    /// `current`; [`StoreError::NoSuchKey`] if the key does not exist.
    async fn add_version(
        &self,
        current: &KeyRecord,
        updated: &KeyRecord,
        version: &VersionRecord,
    ) -> Result<(), StoreError>;

    async fn get_version(
        &self,
        id: KeyId,
        version: u32,
    ) -> Result<Option<VersionRecord>, StoreError>;

    /// Every version of a key, in ascending order.
    async fn list_versions(&self, id: KeyId) -> Result<Vec<VersionRecord>, StoreError>;

    /// Replaces the stored record `current` with `new` if the stored one
    /// still equals `current`; otherwise [`StoreError::Conflict`]
    /// ([`StoreError::NoSuchKey`] if it is gone). The due index follows
    /// `new.next_due()`. `new` must keep the id, the alias and the primary
    /// version of `current` (rotation goes through [`KeyStore::add_version`]),
    /// and neither may be DESTROYED (destruction goes through
    /// [`KeyStore::destroy_key`]; a tombstone is final); otherwise
    /// [`StoreError::Corrupt`] and nothing is written.
    async fn compare_and_swap_key(
        &self,
        current: &KeyRecord,
        new: &KeyRecord,
    ) -> Result<(), StoreError>;

    /// Destruction: atomically replaces the stored key `current` with
    /// `tombstone` and every version of the key with a copy whose
    /// `wrapped_material` is empty and whose `destroyed_at` is
    /// `tombstone.destroyed_at`; the key leaves the due index, its alias stays
    /// taken.
    ///
    /// `tombstone` must be DESTROYED with `destroyed_at` set and keep the id,
    /// the alias and the primary version of `current`, and `current` must not
    /// be DESTROYED; otherwise [`StoreError::Corrupt`] and nothing is
    /// written. [`StoreError::Conflict`] if the stored key differs from
    /// `current`, [`StoreError::NoSuchKey`] if it does not exist. Which states
    /// may be destroyed, and when, is the caller's policy.
    ///
    /// The records no longer hold the material once this returns, but the
    /// backend's files may (sled's do: see SECURITY.md, "Destroyed material and
    /// the store's files") until
    /// [`KeyStore::compact`] rewrites them. Copies outside the files
    /// (deleted blocks, backups) are only made useless once the HSM root key
    /// that wrapped the material is rotated away and destroyed.
    async fn destroy_key(
        &self,
        current: &KeyRecord,
        tombstone: &KeyRecord,
    ) -> Result<(), StoreError>;

    /// HSM root-key rotation: replaces the stored version `current` with
    /// `new` if the stored one still equals `current`.
    ///
    /// `new` may differ from `current` only in `hsm_root_key_id` and
    /// `wrapped_material`, which must not be empty; otherwise
    /// [`StoreError::Corrupt`] and nothing is written. [`StoreError::Conflict`]
    /// if the stored version differs from `current` or is destroyed (also
    /// when `current` itself is destroyed), [`StoreError::NoSuchVersion`] if
    /// it does not exist. The key record is not touched.
    async fn rewrap_version(
        &self,
        current: &VersionRecord,
        new: &VersionRecord,
    ) -> Result<(), StoreError>;

    /// Live (not destroyed) versions whose `hsm_root_key_id` differs from
    /// `root_key_id` (a version held by the HSM, with an `hsm_object`, is
    /// wrapped by no root key and never listed), in ascending (key id bytes,
    /// version) order, starting
    /// strictly after `start_after`, at most `limit`: the work list of a
    /// root-key rotation, paged by passing the last (key id, version)
    /// returned. Scans the versions between the pages' bounds, destroyed and
    /// already re-wrapped ones included.
    async fn versions_not_under_root(
        &self,
        root_key_id: u32,
        start_after: Option<(KeyId, u32)>,
        limit: usize,
    ) -> Result<Vec<VersionRecord>, StoreError>;

    /// Counts every stored version (a full scan): live ones, live ones not
    /// under `root_key_id` (as [`KeyStore::versions_not_under_root`] lists
    /// them), destroyed ones. For a root-key rotation's
    /// progress report.
    async fn count_versions(&self, root_key_id: u32) -> Result<VersionCounts, StoreError>;

    /// Rewrites the store so that no data of removed or overwritten records
    /// remains in its files (for instance the material that
    /// [`KeyStore::destroy_key`] erased from the records); expensive
    /// (O(store size)), and reads and writes wait for it; durable before
    /// return. The records are unchanged.
    ///
    /// [`StoreError::Io`] means the files may still hold such data (the
    /// records are intact either way); depending on the backend, the store
    /// may then refuse further calls until reopened, as after any failed
    /// write. It says nothing of copies outside the store's files (deleted
    /// blocks, SSD spare areas, copy-on-write snapshots, backups).
    ///
    /// A backend whose engine cannot promise this (PostgreSQL: old row
    /// versions, the WAL, standbys) does what it can and documents it on
    /// its method (`PgStore::compact`: a `VACUUM`); erasure is then
    /// cryptographic only (SECURITY.md, "Destroyed material and the
    /// store's files").
    async fn compact(&self) -> Result<(), StoreError>;

    /// The service secret `name` (see [`WrappedSecret`]), if stored.
    async fn get_secret(&self, name: &str) -> Result<Option<WrappedSecret>, StoreError>;

    /// Stores (or replaces) the service secret `name`; durable on return.
    async fn put_secret(&self, name: &str, secret: &WrappedSecret) -> Result<(), StoreError>;

    /// Stores `secret` as `name` unless a secret of that name is stored
    /// already, and returns the one stored: `secret`, or the one that was
    /// there (two first starts racing end with one audit key, and both use
    /// it). Durable on return.
    async fn create_secret(
        &self,
        name: &str,
        secret: &WrappedSecret,
    ) -> Result<WrappedSecret, StoreError>;

    /// Replaces the service secret `name` with `new` only if it is still
    /// `current`; `false` (nothing written) if another writer changed or
    /// removed it meanwhile. A root-key rotation re-wraps with it, so that
    /// it never puts back an older value stored meanwhile (the audit
    /// high-water mark). Durable on return.
    async fn swap_secret(
        &self,
        name: &str,
        current: &WrappedSecret,
        new: &WrappedSecret,
    ) -> Result<bool, StoreError>;

    /// The root-key fence of a rotation to `current`: atomically with
    /// respect to every write, checks that no live version and no service
    /// secret is wrapped under another root key than `current` (versions
    /// held by the HSM itself aside), and if so records every id of
    /// `retire` as retired, durably. From then on a version or secret
    /// wrapped under a retired root key is refused
    /// ([`StoreError::RootKeyRetired`]), so that nothing is ever left under
    /// a root key once it is destroyed, whichever process wrote it. Returns
    /// how many records are still under another root key (0: fenced;
    /// otherwise nothing was recorded).
    async fn fence_root_keys(&self, current: u32, retire: &[u32]) -> Result<u64, StoreError>;

    /// Every service secret, by name: what a root-key rotation re-wraps
    /// besides the CMK versions.
    async fn list_secrets(&self) -> Result<Vec<(String, WrappedSecret)>, StoreError>;

    /// Stores `approval` (a new proposal), unless a *twin* is stored: an
    /// approval of the same operation that is PENDING and not expired at
    /// `now` (`now <= expires_at`). Returns the twin if there is one, and
    /// writes nothing; [`StoreError::ApprovalExists`] if its id is taken.
    /// Atomic with respect to every other approval write, so two identical
    /// proposals made at once on two nodes end with one. Durable on return.
    async fn create_approval(
        &self,
        approval: &Approval,
        now: Timestamp,
    ) -> Result<Option<Approval>, StoreError>;

    async fn get_approval(&self, id: Uuid) -> Result<Option<Approval>, StoreError>;

    /// Every approval, oldest first (by `created_at`, then id). One whose
    /// record fails its integrity check is left out (the MAC key counts
    /// it, and the server alarms), so that a planted record cannot hide
    /// the others; other errors fail the call.
    async fn list_approvals(&self) -> Result<Vec<Approval>, StoreError>;

    /// Replaces the stored approval `current` with `new` if the stored one
    /// still equals `current`: [`StoreError::ApprovalConflict`] otherwise,
    /// [`StoreError::NoSuchApproval`] if there is none. Every change of an
    /// approval (an approval added, a rejection, expiry, PENDING →
    /// EXECUTING → EXECUTED or FAILED) goes through this, so that of two
    /// approvers deciding from one state exactly one wins. `new` must keep
    /// the id, operation, proposer and creation time of `current`;
    /// otherwise [`StoreError::Corrupt`] and nothing is written.
    async fn swap_approval(&self, current: &Approval, new: &Approval) -> Result<(), StoreError>;

    /// An approved operation on a key, and its approval's outcome, in one
    /// atomic write: [`KeyStore::swap_approval`] of `approval` and
    /// [`KeyStore::compare_and_swap_key`] of `key`, both or neither (with
    /// their refusals: a stale approval is [`StoreError::ApprovalConflict`],
    /// a stale key [`StoreError::Conflict`], and nothing is written). The
    /// approval's operation must name the key; otherwise
    /// [`StoreError::Corrupt`]. So an approved change runs exactly once,
    /// and no crash can leave it applied with its approval still open, or
    /// closed without it.
    async fn swap_approval_and_key(
        &self,
        approval: (&Approval, &Approval),
        key: (&KeyRecord, &KeyRecord),
    ) -> Result<(), StoreError>;

    /// The change feed, which tells the other nodes sharing a store which
    /// cached keys to forget: every key whose record changed (created,
    /// rotated, changed by compare-and-swap, destroyed, changed by an
    /// approval) after generation `after`, with the generation of its
    /// *last* change, in ascending generation order, at most `limit`.
    ///
    /// Every write of key records takes the next generations (one per
    /// key) in the same atomic write, and generations become visible in
    /// order with no gap: once a reader has seen generation `g`, every
    /// change at or below `g` is visible to it too. A key changed twice
    /// is listed once, at its later generation, so the feed is bounded by
    /// the number of keys. Re-wraps of versions (root-key rotation) change
    /// no record a node caches and take no generation.
    async fn changes_since(&self, after: u64, limit: usize) -> Result<ChangePage, StoreError>;

    /// Installs the MAC key of the records (see [`integrity`]), once, at
    /// start, before any other call: from then on every key, version and
    /// approval record is written sealed with `mac` and every one read must verify
    /// under it, its slot included ([`StoreError::IntegrityFailure`]
    /// otherwise). Service secrets are not sealed (the HSM's wrap
    /// authenticates them, bound to their name).
    ///
    /// If the stored records are sealed: [`IntegrityState::Sealed`] (their
    /// MACs are checked as they are read, not here). If they are not (a
    /// store from before integrity): with `migrate`, every record is
    /// (re)sealed under `mac` in one atomic, durable write that also marks
    /// the store sealed, and [`IntegrityState::Migrated`]; without,
    /// [`IntegrityState::NeedsMigration`] and nothing is installed nor
    /// written. Migration trusts what is stored: the caller allows it only
    /// when integrity was never enabled on this store.
    ///
    /// The default refuses: a backend that cannot seal its records cannot
    /// serve.
    async fn install_integrity(
        &self,
        mac: &Arc<RecordMac>,
        migrate: bool,
    ) -> Result<IntegrityState, StoreError> {
        let _ = (mac, migrate);
        Err(StoreError::Corrupt(format!(
            "the store backend {self:?} cannot protect its records' integrity"
        )))
    }
}
