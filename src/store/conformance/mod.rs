//! One conformance suite for every [`KeyStore`] backend: the contract of
//! the trait's documentation, checked the same way against each backend
//! (sled today; PostgreSQL is meant to run it unchanged).
//!
//! A backend gives the suite a [`StoreFactory`], which makes new, empty
//! stores. [`run`] runs every check of [`CHECKS`] on a store of its own:
//! each method's guarantees and refusals (a refused call writes nothing),
//! durability across a reopen, and races between two handles on one store.
//! The model-based test (`model`, in unit tests only: it needs proptest)
//! compares random sequences of calls, reopens and compactions with a model
//! of the contract.
//!
//! The checks are grouped by topic: `creation.rs`, `queries.rs` (paging,
//! filters, the due index), `changes.rs` (rotation, compare-and-swap,
//! destruction, re-wrap), `maintenance.rs` (root-rotation work list,
//! compaction, service secrets, durability), `approvals.rs` (quorum
//! approvals and approve-and-apply), `feed.rs` (the change feed),
//! `races.rs` and `integrity.rs`
//! (records bound to their MAC key); `fixtures.rs`
//! builds their records. They return a [`Failure`] naming the check instead
//! of panicking, so that the suite can run outside a test harness too.

use std::sync::Arc;

use super::integrity::RecordMac;
use super::{KeyFilter, KeyStore, StoreError};
use crate::model::{KeyId, KeyRecord, Timestamp};
use fixtures::snapshot;

/// `Ok` if `$result` is an error matching `$pattern`, else `Err` saying
/// what `$what` returned instead.
macro_rules! refused {
    ($what:expr, $result:expr, $pattern:pat $(if $guard:expr)?) => {
        $crate::store::conformance::refused($what, stringify!($pattern), $result, |e| {
            matches!(e, $pattern $(if $guard)?)
        })
    };
}

pub mod approvals;
mod changes;
mod creation;
mod feed;
pub mod fixtures;
mod integrity;
mod maintenance;
#[cfg(test)]
pub mod model;
mod queries;
mod races;

/// A backend under test: it makes new, empty stores.
#[async_trait::async_trait]
pub trait StoreFactory: Sync {
    /// Opens a new, empty store that no other call of `open` shares.
    async fn open(&self) -> Result<Box<dyn OpenStore>, StoreError>;
}

/// One store made by a [`StoreFactory`], and the ways to reach it.
#[async_trait::async_trait]
pub trait OpenStore: Send + Sync {
    /// The store. Each call gives the same handle until [`OpenStore::reopen`].
    fn handle(&self) -> Arc<dyn KeyStore>;

    /// Another, independent user of the same store, for races: sled gives
    /// another `Arc` of its one open store (a second `SledStore::open` of the
    /// directory is refused by its lock); a database server would give a
    /// second connection pool.
    async fn second_handle(&self) -> Result<Arc<dyn KeyStore>, StoreError>;

    /// Closes the store and opens it again, as a restart does. Every handle
    /// given out before must have been dropped.
    async fn reopen(&mut self) -> Result<(), StoreError>;

    /// Closes the store and opens it again with `mac` installed as its
    /// integrity key instead of the factory's (the records stay sealed
    /// under the factory's); [`OpenStore::reopen`] returns to the factory's
    /// key. Every backend must be able to, for the suite's integrity check.
    async fn reopen_under_integrity_key(&mut self, mac: &Arc<RecordMac>) -> Result<(), StoreError> {
        let _ = mac;
        Err(StoreError::Corrupt(
            "this backend cannot be reopened under another integrity key".to_owned(),
        ))
    }

    /// What the backend promises after a successful [`KeyStore::compact`]
    /// beyond unchanged records (sled: only the live generation is left).
    fn check_compacted(&self) -> Result<(), String> {
        Ok(())
    }
}

/// A check that failed, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub check: &'static str,
    pub detail: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.check, self.detail)
    }
}

/// What a check's body returns: its outcome, once awaited.
pub type CheckFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'a>>;

/// One check: its name (what it asserts) and its body, which gets a new,
/// empty store from the factory.
#[derive(Clone, Copy)]
pub struct Check {
    pub name: &'static str,
    pub run: for<'a> fn(&'a dyn StoreFactory) -> CheckFuture<'a>,
}

impl std::fmt::Debug for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Check").field("name", &self.name).finish()
    }
}

/// The checks, in the order [`run`] runs them.
pub const CHECKS: &[Check] = &[
    creation::CREATE,
    creation::CREATE_INCONSISTENT,
    creation::CREATE_CLASHES,
    creation::CREATE_BATCH,
    queries::LIST_KEYS_PAGING,
    queries::LIST_KEYS_FILTERS,
    queries::DUE_INDEX,
    changes::ADD_VERSION,
    changes::ADD_VERSION_REFUSALS,
    changes::COMPARE_AND_SWAP,
    changes::DESTROY,
    changes::TOMBSTONE_IS_FINAL,
    changes::REWRAP,
    maintenance::ROOT_ROTATION_WORK_LIST,
    maintenance::COMPACT,
    maintenance::SECRETS,
    maintenance::SECRETS_CREATE_AND_SWAP,
    maintenance::ROOT_FENCE,
    maintenance::DURABLE,
    races::CAS_ONE_WINNER,
    races::ROTATION_ONE_WINNER,
    races::ALIAS_CLASH,
    races::DESTROY_AGAINST_CANCEL,
    races::HANDLES_SEE_EACH_OTHER,
    races::SECRET_ONE_WINNER,
    approvals::APPROVALS,
    approvals::APPROVAL_AND_KEY,
    approvals::APPROVAL_ONE_WINNER,
    feed::CHANGE_FEED,
    feed::CHANGE_FEED_NO_GAP,
    integrity::SEALED_UNDER_ITS_KEY,
];

/// Runs every check of [`CHECKS`] in order, each on a new store, calling
/// `progress` with each check's name before it runs. Stops at the first
/// failure.
pub async fn run(
    factory: &dyn StoreFactory,
    mut progress: impl FnMut(&str),
) -> Result<(), Failure> {
    for check in CHECKS {
        progress(check.name);
        (check.run)(factory).await.map_err(|detail| Failure {
            check: check.name,
            detail,
        })?;
    }
    Ok(())
}

/// `Err(detail)` unless `condition`.
fn ensure(condition: bool, detail: impl FnOnce() -> String) -> Result<(), String> {
    if condition { Ok(()) } else { Err(detail()) }
}

/// `Err` unless `got == expected`, saying what `what` was.
fn same<T: PartialEq + std::fmt::Debug>(what: &str, got: T, expected: T) -> Result<(), String> {
    ensure(got == expected, || {
        format!("{what}: got {got:?}, expected {expected:?}")
    })
}

/// The value of a call that must succeed.
fn ok<T>(what: &str, result: Result<T, StoreError>) -> Result<T, String> {
    result.map_err(|e| format!("{what}: {e:?}"))
}

/// The error of a call that must be refused with an error `expected`
/// accepts (named `kind` in the message).
fn refused<T: std::fmt::Debug>(
    what: &str,
    kind: &str,
    result: Result<T, StoreError>,
    expected: impl FnOnce(&StoreError) -> bool,
) -> Result<(), String> {
    match result {
        Err(e) if expected(&e) => Ok(()),
        other => Err(format!("{what}: expected {kind}, got {other:?}")),
    }
}

/// A store made for one check, and its handle.
type Opened = (Box<dyn OpenStore>, Arc<dyn KeyStore>);

/// A new store from `factory`, with its handle.
async fn open(factory: &dyn StoreFactory) -> Result<Opened, String> {
    let store = ok("opening a new store", factory.open().await)?;
    let handle = store.handle();
    Ok((store, handle))
}

/// Every key, through one unbounded `list_keys`.
async fn all(store: &dyn KeyStore) -> Result<Vec<KeyRecord>, String> {
    ok(
        "list_keys",
        store
            .list_keys(&KeyFilter::default(), None, usize::MAX)
            .await,
    )
}

/// `keys` in ascending order of their id bytes, as `list_keys` returns them.
fn sorted(mut keys: Vec<KeyRecord>) -> Vec<KeyRecord> {
    keys.sort_by_key(|k| *k.id.as_bytes());
    keys
}

/// The ids `due_keys(now, limit)` returns.
async fn due_ids(store: &dyn KeyStore, now: i64, limit: usize) -> Result<Vec<KeyId>, String> {
    let due = ok("due_keys", store.due_keys(Timestamp(now), limit).await)?;
    Ok(due.iter().map(|k| k.id).collect())
}

/// `Err` if the store's [`snapshot`] is no longer `before`, blaming `after`.
async fn unchanged(store: &dyn KeyStore, before: &str, after: &str) -> Result<(), String> {
    ensure(snapshot(store).await == before, || {
        format!("{after} changed the store")
    })
}
