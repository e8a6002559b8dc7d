//! [`PgStore`]: the [`KeyStore`] on PostgreSQL (design/several-nodes.md
//! §3), shared by every node of a cluster.
//!
//! # Transactions
//!
//! Each mutating method is one transaction at READ COMMITTED. It locks the
//! rows it decides on (`SELECT ... FOR UPDATE`), decodes them, compares
//! them with the caller's `current` in Rust (the same `PartialEq` as the
//! sled store's transaction), writes and commits. The arguments are checked
//! first, in `store::checks`, which the sled store shares: a call either
//! backend refuses as [`StoreError::Corrupt`] is refused by the other too,
//! before anything is read.
//!
//! Locks are always taken in one order, so that two transactions never
//! wait for each other: `coffre_cluster` → approval → key → versions →
//! `root_keys`. A deadlock or serialization failure (40P01, 40001: neither
//! expected with this order) is retried once inside the method.
//!
//! Every write of key records starts with `UPDATE coffre_cluster SET
//! key_generation = key_generation + n RETURNING key_generation` (one
//! generation per key written) and stamps `keys.generation`: the counter's
//! row lock is held to the commit, so key writes commit one at a time, in
//! generation order, and the change feed ([`KeyStore::changes_since`]) has
//! no gap. The same transaction sends `NOTIFY coffre_keys, '<generation>'`,
//! delivered at commit: a hint for the nodes' pollers, never the guarantee.
//!
//! # Never cancel a commit
//!
//! A mutating call runs its transaction on a task of its own
//! (`tokio::spawn`) and awaits it: a caller that goes away (its future
//! dropped) never drops a transaction between `COMMIT` sent and its
//! answer. PostgreSQL would then have committed locally what a synchronous
//! standby may not hold yet, and the client would not know (design §3.3).
//! The sessions run with `statement_timeout = 0` (`connect.rs`). An error
//! on the way to or during `COMMIT` is [`StoreError::Io`]: outcome
//! unknown. So is a transaction that has not ended within the write wait
//! ([`StoreTimeouts`]): its caller stops waiting, the task does not. Reads
//! are plain statements on a pooled connection, given up after the read
//! timeout.
//!
//! # The root-key fence
//!
//! `root_keys` holds a row per root key a version or a secret was stored
//! under: ACTIVE, or RETIRED once [`KeyStore::fence_root_keys`] found
//! nothing live under it. A write under root key `r` inserts its row
//! (ACTIVE) if absent and takes it `FOR SHARE` to its commit, refusing a
//! RETIRED one ([`StoreError::RootKeyRetired`]); the fence takes the rows it
//! retires `FOR UPDATE`, which waits for those writers, then counts (a new
//! snapshot, which sees them) and marks them RETIRED only if nothing is
//! left. A writer that comes after waits for the fence and then reads
//! RETIRED.
//!
//! # Integrity
//!
//! Key, version and approval rows carry the MAC tag of their record
//! (`records.rs`), checked on every read with the row's id. The store is
//! "sealed" once `store_meta` holds `sealed` (set by
//! [`KeyStore::install_integrity`]'s migration, the first start's); from
//! then on nothing is read or written without the MAC key.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{GenericClient, Pool, Transaction};
use futures_util::future::BoxFuture;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{IsolationLevel, Row};
use uuid::Uuid;

use super::connect::PgConnector;
use super::records::{
    Codec, Sealed, col, decode, encode, key_id_of, root_col, root_of, status_col, uuid_of,
    version_col,
};
use crate::metrics::cluster::{PoolUse, StoreErrorCounters, StoreErrorKind};
use crate::model::{KeyId, KeyRecord, Timestamp, VersionRecord};
use crate::store::approvals::{Approval, ApprovalStatus};
use crate::store::checks::{
    check_add_version, check_approval_and_key, check_approval_swap, check_create, check_destroy,
    check_key_swap, check_rewrap, check_secret,
};
use crate::store::integrity::{IntegrityState, RecordMac, Table};
use crate::store::{
    ChangePage, KeyChange, KeyFilter, KeyStore, StoreError, VersionCounts, WrappedSecret,
};

/// The `store_meta` row that says every record is sealed.
const SEALED: &str = "sealed";

/// The advisory lock under which [`KeyStore::create_approval`] looks for a
/// twin and inserts ("coffre" and 2, as a number; the migrator has 1).
const APPROVALS_LOCK: i64 = 0x636f_6666_7265_0002;

/// The channel of the change feed's wake-up hint.
pub const KEYS_CHANNEL: &str = "coffre_keys";

/// How often a transaction that lost a deadlock or a serialization check
/// runs, in all.
const ATTEMPTS: u32 = 2;

/// How long [`PgStore`]'s callers wait for the database.
///
/// A node cut off from its database without a reset (a partition, or a
/// proxy that holds every byte) keeps its connections open, and a
/// statement on one waits until TCP gives up, if ever. A request must not
/// wait that long: its client would see its own deadline pass instead of a
/// refusal it can retry elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreTimeouts {
    /// Reads (their pooled connection included): past it, UNAVAILABLE.
    pub read: Duration,
    /// A write's caller, past it, gets UNAVAILABLE (outcome unknown); the
    /// transaction is never cancelled (see the module docs).
    pub write_wait: Duration,
}

/// The shortest read timeout [`StoreTimeouts::for_max_staleness`] gives.
const MIN_READ_TIMEOUT: Duration = Duration::from_millis(500);
/// The shortest write wait [`StoreTimeouts::for_max_staleness`] gives.
const MIN_WRITE_WAIT: Duration = Duration::from_secs(5);

impl StoreTimeouts {
    /// For a node whose bound is `max_staleness`: a read that outlives it
    /// is of no use to a strict node, stale by then anyway (at least
    /// [`MIN_READ_TIMEOUT`], for a loaded server); a write's caller waits
    /// five times as long (at least [`MIN_WRITE_WAIT`]): a commit, even
    /// one waiting for a synchronous standby, takes milliseconds, and
    /// seconds mean an outage.
    pub fn for_max_staleness(max_staleness: Duration) -> Self {
        let read = max_staleness.max(MIN_READ_TIMEOUT);
        Self {
            read,
            write_wait: (read * 5).max(MIN_WRITE_WAIT),
        }
    }
}

impl Default for StoreTimeouts {
    /// Outside `coffre serve` (tools, tests on a loaded machine), which
    /// uses [`Self::for_max_staleness`]: generous, but bounded.
    fn default() -> Self {
        Self {
            read: Duration::from_secs(10),
            write_wait: Duration::from_secs(30),
        }
    }
}

/// The PostgreSQL [`KeyStore`]: a pool of connections to one database
/// that [`super::migrate`] gave the current schema. Cheap to clone (one
/// `Arc`); every clone and every other node's store share the same rows.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    connector: Arc<PgConnector>,
    timeouts: StoreTimeouts,
    /// The records' MAC key, once installed.
    mac: OnceLock<Arc<RecordMac>>,
    /// `store_meta` said `sealed` when opened (or this store sealed it).
    sealed: AtomicBool,
    /// Failed database calls, by kind (`coffre_store_errors_total`).
    errors: Arc<StoreErrorCounters>,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("target", &self.inner.connector.target())
            .field("sealed", &self.inner.sealed.load(Ordering::Relaxed))
            .field("integrity_key", &self.inner.mac.get().is_some())
            .finish_non_exhaustive()
    }
}

/// Why a transaction's body stopped: a refusal of the contract (rolled
/// back, returned as is) or a database error (retried if transient, else
/// [`StoreError::Io`]).
enum Fail {
    Refused(StoreError),
    Db(tokio_postgres::Error),
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        Fail::Refused(e)
    }
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Self {
        Fail::Db(e)
    }
}

type TxResult<T> = Result<T, Fail>;

/// The body of a mutating method: its statements in the transaction, with
/// the codec and its (owned) arguments.
type Body<A, T> = for<'a> fn(&'a Transaction<'a>, &'a Codec, &'a A) -> BoxFuture<'a, TxResult<T>>;

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// A statement prepared once per connection (deadpool's cache), run.
async fn query<C: GenericClient>(
    c: &C,
    sql: &str,
    params: Params<'_>,
) -> Result<Vec<Row>, tokio_postgres::Error> {
    let statement = c.prepare_cached(sql).await?;
    c.query(&statement, params).await
}

async fn query_opt<C: GenericClient>(
    c: &C,
    sql: &str,
    params: Params<'_>,
) -> Result<Option<Row>, tokio_postgres::Error> {
    let statement = c.prepare_cached(sql).await?;
    c.query_opt(&statement, params).await
}

async fn execute<C: GenericClient>(
    c: &C,
    sql: &str,
    params: Params<'_>,
) -> Result<u64, tokio_postgres::Error> {
    let statement = c.prepare_cached(sql).await?;
    c.execute(&statement, params).await
}

/// The metrics' kind of a database error: no server answer, a conflict, a
/// write on a standby, a missing privilege, or another refusal.
fn error_kind(e: &tokio_postgres::Error) -> StoreErrorKind {
    let Some(code) = e.code() else {
        return StoreErrorKind::Unavailable;
    };
    if retryable(e) {
        StoreErrorKind::Conflict
    } else if *code == SqlState::READ_ONLY_SQL_TRANSACTION {
        StoreErrorKind::ReadOnly
    } else if *code == SqlState::INSUFFICIENT_PRIVILEGE {
        StoreErrorKind::Permission
    } else if code.code().starts_with("08") || code.code().starts_with("57P") {
        // Connection exceptions; the server shutting down or restarting.
        StoreErrorKind::Unavailable
    } else {
        StoreErrorKind::Other
    }
}

fn retryable(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    })
}

/// A `LIMIT` from a `usize`.
fn limit_of(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

impl PgStore {
    /// The store on `pool` (see [`super::open_pool`]), whose schema the
    /// caller checked ([`super::check_schema_for_serving`]). Reads whether
    /// the records are sealed.
    pub async fn open(pool: Pool, connector: Arc<PgConnector>) -> Result<PgStore, StoreError> {
        Self::open_with(pool, connector, StoreTimeouts::default()).await
    }

    /// [`Self::open`], with `timeouts` (see [`StoreTimeouts`]).
    pub async fn open_with(
        pool: Pool,
        connector: Arc<PgConnector>,
        timeouts: StoreTimeouts,
    ) -> Result<PgStore, StoreError> {
        let store = PgStore {
            inner: Arc::new(Inner {
                pool,
                connector,
                timeouts,
                mac: OnceLock::new(),
                sealed: AtomicBool::new(false),
                errors: Arc::default(),
            }),
        };
        let sealed = store.read_sealed().await?;
        store.inner.sealed.store(sealed, Ordering::Release);
        Ok(store)
    }

    /// The records' MAC key, if installed (for its failure count).
    pub fn integrity(&self) -> Option<&Arc<RecordMac>> {
        self.inner.mac.get()
    }

    /// The pool (for a caller that checks the server, e.g. readiness).
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// The failed database calls so far, by kind (for the metrics page).
    pub fn errors(&self) -> &Arc<StoreErrorCounters> {
        &self.inner.errors
    }

    /// The pool's use now (for the metrics page).
    pub fn pool_use(&self) -> PoolUse {
        let status = self.inner.pool.status();
        PoolUse {
            in_use: status.size.saturating_sub(status.available) as u64,
            idle: status.available as u64,
            max: status.max_size as u64,
            waiting: status.waiting as u64,
        }
    }

    fn codec(&self) -> Result<Codec, StoreError> {
        match self.inner.mac.get() {
            Some(mac) => Ok(Codec {
                mac: Some(Arc::clone(mac)),
            }),
            None if self.inner.sealed.load(Ordering::Acquire) => {
                Err(StoreError::IntegrityFailure(format!(
                    "the records of the database at {} are sealed and no integrity key is \
                     installed",
                    self.inner.connector.target()
                )))
            }
            None => Ok(Codec { mac: None }),
        }
    }

    async fn read_sealed(&self) -> Result<bool, StoreError> {
        self.read("reading the integrity marker", async {
            let c = self.inner.conn().await?;
            let row = query_opt(
                &c,
                "SELECT value FROM store_meta WHERE name = $1",
                &[&SEALED],
            )
            .await
            .map_err(|e| self.inner.db_error("reading the integrity marker", &e))?;
            Ok(row.is_some())
        })
        .await
    }

    /// Runs `read` within the read timeout: one that outlives it is
    /// [`StoreError::Io`] (UNAVAILABLE), not a wait for the client's
    /// deadline. Dropping it mid-statement is safe: a read changes nothing,
    /// and its pooled connection is tested before it is used again.
    async fn read<T>(
        &self,
        what: &str,
        read: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let limit = self.inner.timeouts.read;
        tokio::time::timeout(limit, read).await.unwrap_or_else(|_| {
            Err(StoreError::Io(format!(
                "{what}: {} gave no answer within {} ms",
                self.inner.connector.target(),
                limit.as_millis()
            )))
        })
    }

    /// Runs `body` as one transaction on a task of its own (see the module
    /// docs): committed if `commit` says so of its result, else rolled
    /// back. The caller waits for it at most the write wait; past it, the
    /// answer is [`StoreError::Io`] (outcome unknown) and the task goes on
    /// to its end, its COMMIT never cut.
    async fn mutate<A, T>(
        &self,
        what: &'static str,
        args: A,
        commit: fn(&T) -> bool,
        body: Body<A, T>,
    ) -> Result<T, StoreError>
    where
        A: Send + Sync + 'static,
        T: Send + 'static,
    {
        let codec = self.codec()?;
        let inner = Arc::clone(&self.inner);
        let task =
            tokio::spawn(async move { inner.transact(what, &codec, &args, commit, body).await });
        let wait = self.inner.timeouts.write_wait;
        match tokio::time::timeout(wait, task).await {
            Ok(done) => {
                done.map_err(|e| StoreError::Io(format!("{what}: the store's task failed: {e}")))?
            }
            // The task is detached, not aborted: it commits or rolls back
            // on its own, and the change feed tells every node which.
            Err(_) => Err(StoreError::Io(format!(
                "{what}: {} gave no answer within {} ms; the outcome is unknown (the \
                 transaction goes on)",
                self.inner.connector.target(),
                wait.as_millis()
            ))),
        }
    }
}

impl Inner {
    async fn conn(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.connector.get(&self.pool).await.map_err(|e| {
            self.errors.count(match e {
                super::PgError::Pool { .. } => StoreErrorKind::Pool,
                _ => StoreErrorKind::Unavailable,
            });
            StoreError::Io(e.to_string())
        })
    }

    /// A database error as the contract has it: [`StoreError::Io`], in
    /// words that name the server (redacted) and never the password;
    /// counted by kind.
    fn db_error(&self, what: &str, e: &tokio_postgres::Error) -> StoreError {
        self.errors.count(error_kind(e));
        StoreError::Io(format!("{what}: {}", self.connector.error(e)))
    }

    async fn transact<A, T>(
        &self,
        what: &'static str,
        codec: &Codec,
        args: &A,
        commit: fn(&T) -> bool,
        body: Body<A, T>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn().await?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let tx = conn
                .build_transaction()
                .isolation_level(IsolationLevel::ReadCommitted)
                .start()
                .await
                .map_err(|e| self.db_error(what, &e))?;
            match body(&tx, codec, args).await {
                Ok(out) if commit(&out) => {
                    // Outcome unknown if this fails: Io.
                    tx.commit()
                        .await
                        .map_err(|e| self.db_error(&format!("{what} (commit)"), &e))?;
                    return Ok(out);
                }
                Ok(out) => {
                    tx.rollback().await.map_err(|e| self.db_error(what, &e))?;
                    return Ok(out);
                }
                Err(Fail::Refused(e)) => {
                    // Nothing was committed; a failed rollback only loses
                    // the connection.
                    let _ = tx.rollback().await;
                    return Err(e);
                }
                Err(Fail::Db(e)) if attempt < ATTEMPTS && retryable(&e) => {
                    self.errors.count(StoreErrorKind::Conflict);
                    let _ = tx.rollback().await;
                    tracing::debug!(what, error = %self.connector.error(&e), "retrying a transaction");
                }
                Err(Fail::Db(e)) => {
                    let _ = tx.rollback().await;
                    return Err(self.db_error(what, &e));
                }
            }
        }
    }
}

/// The next `n` generations of the change feed, taken under the counter's
/// row lock (held to the commit): the last one.
async fn next_generations(tx: &Transaction<'_>, n: usize) -> TxResult<i64> {
    let n = i64::try_from(n).map_err(|_| StoreError::Corrupt("too many keys".into()))?;
    let row = query_opt(
        tx,
        "UPDATE coffre_cluster SET key_generation = key_generation + $1 \
         RETURNING key_generation",
        &[&n],
    )
    .await?
    .ok_or_else(|| StoreError::Corrupt("coffre_cluster has no row".into()))?;
    Ok(col(&row, 0, "the feed's generation")?)
}

/// The wake-up hint of the change feed, delivered at commit.
async fn notify(tx: &Transaction<'_>, generation: i64) -> TxResult<()> {
    query(
        tx,
        "SELECT pg_notify($1, $2)",
        &[&KEYS_CHANNEL, &generation.to_string()],
    )
    .await?;
    Ok(())
}

/// Takes root key `root`'s fence row `FOR SHARE` (inserted ACTIVE if
/// absent) to the commit; refuses a RETIRED one. 0 (held by the HSM) has
/// none.
async fn share_root(tx: &Transaction<'_>, root: u32) -> TxResult<()> {
    if root == 0 {
        return Ok(());
    }
    let id = root_col(root);
    execute(
        tx,
        "INSERT INTO root_keys (id, state) VALUES ($1, 'ACTIVE') ON CONFLICT (id) DO NOTHING",
        &[&id],
    )
    .await?;
    let row = query_opt(
        tx,
        "SELECT state FROM root_keys WHERE id = $1 FOR SHARE",
        &[&id],
    )
    .await?
    .ok_or_else(|| StoreError::Corrupt(format!("root key {root}'s fence row vanished")))?;
    let state: &str = col(&row, 0, "a root key's state")?;
    if state == "ACTIVE" {
        Ok(())
    } else {
        Err(StoreError::RootKeyRetired(root).into())
    }
}

/// [`share_root`] for several, in ascending order (the lock order among
/// `root_keys` rows).
async fn share_roots(tx: &Transaction<'_>, roots: impl IntoIterator<Item = u32>) -> TxResult<()> {
    let mut roots: Vec<u32> = roots.into_iter().filter(|r| *r != 0).collect();
    roots.sort_by_key(|r| root_col(*r));
    roots.dedup();
    for root in roots {
        share_root(tx, root).await?;
    }
    Ok(())
}

/// The stored key `current.id`, locked, must equal `current`.
async fn lock_current(tx: &Transaction<'_>, codec: &Codec, current: &KeyRecord) -> TxResult<()> {
    let row = query_opt(
        tx,
        "SELECT id, record, record_mac FROM keys WHERE id = $1 FOR UPDATE",
        &[&uuid_of(current.id)],
    )
    .await?;
    let Some(row) = row else {
        return Err(StoreError::NoSuchKey(current.id).into());
    };
    if codec.key_row(&row)? != *current {
        return Err(StoreError::Conflict(current.id).into());
    }
    Ok(())
}

/// Writes `new` over its row, at `generation`.
async fn update_key(
    tx: &Transaction<'_>,
    new: &KeyRecord,
    sealed: &Sealed,
    generation: i64,
) -> TxResult<()> {
    let due = new.next_due().map(Timestamp::as_millis);
    execute(
        tx,
        "UPDATE keys SET state = $2, next_due_ms = $3, generation = $4, record = $5, \
         record_mac = $6 WHERE id = $1",
        &[
            &uuid_of(new.id),
            &new.state.as_str(),
            &due,
            &generation,
            &sealed.json,
            &sealed.mac,
        ],
    )
    .await?;
    Ok(())
}

async fn insert_version(tx: &Transaction<'_>, v: &VersionRecord, sealed: &Sealed) -> TxResult<u64> {
    Ok(execute(
        tx,
        "INSERT INTO key_versions (key_id, version, hsm_root_key_id, in_hsm, destroyed, record, \
         record_mac) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (key_id, version) DO NOTHING",
        &[
            &uuid_of(v.key_id),
            &version_col(v.key_id, v.version)?,
            &root_col(v.hsm_root_key_id),
            &v.hsm_object.is_some(),
            &v.destroyed_at.is_some(),
            &sealed.json,
            &sealed.mac,
        ],
    )
    .await?)
}

async fn update_version(tx: &Transaction<'_>, v: &VersionRecord, sealed: &Sealed) -> TxResult<()> {
    execute(
        tx,
        "UPDATE key_versions SET hsm_root_key_id = $3, in_hsm = $4, destroyed = $5, record = $6, \
         record_mac = $7 WHERE key_id = $1 AND version = $2",
        &[
            &uuid_of(v.key_id),
            &version_col(v.key_id, v.version)?,
            &root_col(v.hsm_root_key_id),
            &v.hsm_object.is_some(),
            &v.destroyed_at.is_some(),
            &sealed.json,
            &sealed.mac,
        ],
    )
    .await?;
    Ok(())
}

/// The stored approval `current.id`, locked, must equal `current`.
async fn lock_approval(tx: &Transaction<'_>, codec: &Codec, current: &Approval) -> TxResult<()> {
    let row = query_opt(
        tx,
        "SELECT id, record, record_mac FROM approvals WHERE id = $1 FOR UPDATE",
        &[&current.id],
    )
    .await?;
    let Some(row) = row else {
        return Err(StoreError::NoSuchApproval(current.id).into());
    };
    if codec.approval_row(&row)? != *current {
        return Err(StoreError::ApprovalConflict(current.id).into());
    }
    Ok(())
}

/// The derived columns of an approval row.
pub(super) fn approval_columns(a: &Approval) -> (&'static str, Option<Uuid>, i64, Option<Uuid>) {
    let incarnation = a.executor.as_deref().and_then(|e| e.parse::<Uuid>().ok());
    (
        status_col(&a.status),
        a.operation.key_id().map(uuid_of),
        a.expires_at.as_millis(),
        incarnation,
    )
}

async fn update_approval(tx: &Transaction<'_>, a: &Approval, sealed: &Sealed) -> TxResult<()> {
    let (status, key_id, expires, incarnation) = approval_columns(a);
    execute(
        tx,
        "UPDATE approvals SET status = $2, key_id = $3, expires_at_ms = $4, executor = $5, \
         executor_incarnation = $6, record = $7, record_mac = $8 WHERE id = $1",
        &[
            &a.id,
            &status,
            &key_id,
            &expires,
            &a.executor,
            &incarnation,
            &sealed.json,
            &sealed.mac,
        ],
    )
    .await?;
    Ok(())
}

/// A service secret's row `(record, hsm_root_key_id)`.
fn secret_row(name: &str, row: &Row, at: usize) -> Result<WrappedSecret, StoreError> {
    let json: &[u8] = col(row, at, "a service secret")?;
    let root: i32 = col(row, at + 1, "a service secret's root key")?;
    let secret: WrappedSecret = decode(&format!("service secret {name:?}"), json)?;
    if secret.hsm_root_key_id != root_of(root) {
        return Err(StoreError::Corrupt(format!(
            "service secret {name:?} is stored under root key {} but says {}",
            root_of(root),
            secret.hsm_root_key_id
        )));
    }
    Ok(secret)
}

/// The arguments of `create_keys`: each key, its first version, sealed.
struct NewKeys(Vec<(KeyRecord, Sealed, VersionRecord, Sealed)>);

fn create_body<'a>(
    tx: &'a Transaction<'a>,
    _codec: &'a Codec,
    NewKeys(keys): &'a NewKeys,
) -> BoxFuture<'a, TxResult<()>> {
    Box::pin(async move {
        if keys.is_empty() {
            return Ok(());
        }
        let last = next_generations(tx, keys.len()).await?;
        let first = last - (keys.len() as i64) + 1;
        for (generation, (key, key_sealed, version, version_sealed)) in (first..).zip(keys) {
            let id = uuid_of(key.id);
            // Each check sees the batch's earlier inserts, so two keys of
            // one batch cannot share an id or an alias either.
            if query_opt(tx, "SELECT 1 FROM keys WHERE id = $1", &[&id])
                .await?
                .is_some()
            {
                return Err(StoreError::KeyExists(key.id).into());
            }
            if let Some(alias) = &key.alias
                && query_opt(tx, "SELECT 1 FROM keys WHERE alias = $1", &[alias])
                    .await?
                    .is_some()
            {
                return Err(StoreError::AliasTaken(alias.clone()).into());
            }
            let inserted = execute(
                tx,
                "INSERT INTO keys (id, alias, state, next_due_ms, generation, record, record_mac) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &id,
                    &key.alias,
                    &key.state.as_str(),
                    &key.next_due().map(Timestamp::as_millis),
                    &generation,
                    &key_sealed.json,
                    &key_sealed.mac,
                ],
            )
            .await;
            if let Err(e) = inserted {
                // Only a writer outside coffre's lock order gets here.
                return Err(match unique_violation(&e) {
                    Some("keys_pkey") => StoreError::KeyExists(key.id).into(),
                    Some(_) => match &key.alias {
                        Some(alias) => StoreError::AliasTaken(alias.clone()).into(),
                        None => Fail::Db(e),
                    },
                    None => Fail::Db(e),
                });
            }
            if insert_version(tx, version, version_sealed).await? == 0 {
                return Err(StoreError::Corrupt(format!(
                    "version {} of key {} exists without its key",
                    key.primary_version, key.id
                ))
                .into());
            }
        }
        share_roots(tx, keys.iter().map(|(_, _, v, _)| v.hsm_root_key_id)).await?;
        notify(tx, last).await
    })
}

/// The constraint a unique violation names.
fn unique_violation(e: &tokio_postgres::Error) -> Option<&str> {
    let db = e.as_db_error()?;
    (*db.code() == SqlState::UNIQUE_VIOLATION).then(|| db.constraint().unwrap_or_default())
}

struct AddVersion {
    current: KeyRecord,
    updated: KeyRecord,
    updated_sealed: Sealed,
    version: VersionRecord,
    version_sealed: Sealed,
}

fn add_version_body<'a>(
    tx: &'a Transaction<'a>,
    codec: &'a Codec,
    a: &'a AddVersion,
) -> BoxFuture<'a, TxResult<()>> {
    Box::pin(async move {
        let generation = next_generations(tx, 1).await?;
        lock_current(tx, codec, &a.current).await?;
        if insert_version(tx, &a.version, &a.version_sealed).await? == 0 {
            return Err(StoreError::Conflict(a.current.id).into());
        }
        update_key(tx, &a.updated, &a.updated_sealed, generation).await?;
        share_root(tx, a.version.hsm_root_key_id).await?;
        notify(tx, generation).await
    })
}

struct Swap {
    current: KeyRecord,
    new: KeyRecord,
    sealed: Sealed,
}

fn swap_body<'a>(
    tx: &'a Transaction<'a>,
    codec: &'a Codec,
    s: &'a Swap,
) -> BoxFuture<'a, TxResult<()>> {
    Box::pin(async move {
        let generation = next_generations(tx, 1).await?;
        lock_current(tx, codec, &s.current).await?;
        update_key(tx, &s.new, &s.sealed, generation).await?;
        notify(tx, generation).await
    })
}

fn destroy_body<'a>(
    tx: &'a Transaction<'a>,
    codec: &'a Codec,
    s: &'a Swap,
) -> BoxFuture<'a, TxResult<()>> {
    Box::pin(async move {
        let generation = next_generations(tx, 1).await?;
        lock_current(tx, codec, &s.current).await?;
        let rows = query(
            tx,
            "SELECT key_id, version, record, record_mac FROM key_versions WHERE key_id = $1 \
             ORDER BY version FOR UPDATE",
            &[&uuid_of(s.current.id)],
        )
        .await?;
        for row in &rows {
            let mut v = codec.version_row(row)?;
            v.wrapped_material = Vec::new();
            v.destroyed_at = s.new.destroyed_at;
            let sealed = codec.encode_version(&v)?;
            update_version(tx, &v, &sealed).await?;
        }
        update_key(tx, &s.new, &s.sealed, generation).await?;
        notify(tx, generation).await
    })
}

struct Rewrap {
    current: VersionRecord,
    new: VersionRecord,
    sealed: Sealed,
}

fn rewrap_body<'a>(
    tx: &'a Transaction<'a>,
    codec: &'a Codec,
    r: &'a Rewrap,
) -> BoxFuture<'a, TxResult<()>> {
    Box::pin(async move {
        let (id, number) = (r.current.key_id, r.current.version);
        let row = query_opt(
            tx,
            "SELECT key_id, version, record, record_mac FROM key_versions \
             WHERE key_id = $1 AND version = $2 FOR UPDATE",
            &[&uuid_of(id), &version_col(id, number)?],
        )
        .await?;
        let Some(row) = row else {
            return Err(StoreError::NoSuchVersion(id, number).into());
        };
        if codec.version_row(&row)? != r.current {
            return Err(StoreError::Conflict(id).into());
        }
        update_version(tx, &r.new, &r.sealed).await?;
        share_root(tx, r.new.hsm_root_key_id).await
    })
}

struct Fence {
    current: u32,
    retire: Vec<u32>,
}

fn fence_body<'a>(
    tx: &'a Transaction<'a>,
    _codec: &'a Codec,
    f: &'a Fence,
) -> BoxFuture<'a, TxResult<u64>> {
    Box::pin(async move {
        let mut retire: Vec<u32> = f
            .retire
            .iter()
            .copied()
            .filter(|r| *r != f.current && *r != 0)
            .collect();
        retire.sort_by_key(|r| root_col(*r));
        retire.dedup();
        // The row first (an inserter of it is waited for), then its lock
        // (every writer holding it FOR SHARE is waited for), then the
        // count, which sees what they committed.
        for &root in &retire {
            let id = root_col(root);
            execute(
                tx,
                "INSERT INTO root_keys (id, state) VALUES ($1, 'ACTIVE') \
                 ON CONFLICT (id) DO NOTHING",
                &[&id],
            )
            .await?;
            query(
                tx,
                "SELECT state FROM root_keys WHERE id = $1 FOR UPDATE",
                &[&id],
            )
            .await?;
        }
        let current = root_col(f.current);
        let row = query_opt(
            tx,
            "SELECT (SELECT count(*) FROM key_versions \
                     WHERE NOT destroyed AND NOT in_hsm AND hsm_root_key_id <> $1) \
                  + (SELECT count(*) FROM service_secrets WHERE hsm_root_key_id <> $1)",
            &[&current],
        )
        .await?
        .ok_or_else(|| StoreError::Corrupt("counting records under old root keys".into()))?;
        let left: i64 = col(&row, 0, "a count")?;
        let left = u64::try_from(left).unwrap_or(0);
        if left > 0 {
            return Ok(left);
        }
        for &root in &retire {
            execute(
                tx,
                "UPDATE root_keys SET state = 'RETIRED', since = now() WHERE id = $1",
                &[&root_col(root)],
            )
            .await?;
        }
        Ok(0)
    })
}

struct PutSecret {
    name: String,
    secret: WrappedSecret,
    json: Vec<u8>,
}

fn put_secret_body<'a>(
    tx: &'a Transaction<'a>,
    _codec: &'a Codec,
    p: &'a PutSecret,
) -> BoxFuture<'a, TxResult<()>> {
    Box::pin(async move {
        share_root(tx, p.secret.hsm_root_key_id).await?;
        execute(
            tx,
            "INSERT INTO service_secrets (name, hsm_root_key_id, record) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET hsm_root_key_id = EXCLUDED.hsm_root_key_id, \
             record = EXCLUDED.record",
            &[&p.name, &root_col(p.secret.hsm_root_key_id), &p.json],
        )
        .await?;
        Ok(())
    })
}

fn create_secret_body<'a>(
    tx: &'a Transaction<'a>,
    _codec: &'a Codec,
    p: &'a PutSecret,
) -> BoxFuture<'a, TxResult<WrappedSecret>> {
    Box::pin(async move {
        share_root(tx, p.secret.hsm_root_key_id).await?;
        execute(
            tx,
            "INSERT INTO service_secrets (name, hsm_root_key_id, record) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO NOTHING",
            &[&p.name, &root_col(p.secret.hsm_root_key_id), &p.json],
        )
        .await?;
        let row = query_opt(
            tx,
            "SELECT record, hsm_root_key_id FROM service_secrets WHERE name = $1",
            &[&p.name],
        )
        .await?
        .ok_or_else(|| {
            StoreError::Corrupt(format!(
                "service secret {:?}: the store refused to create it but holds none",
                p.name
            ))
        })?;
        Ok(secret_row(&p.name, &row, 0)?)
    })
}

struct SwapSecret {
    name: String,
    current: WrappedSecret,
    new: WrappedSecret,
    json: Vec<u8>,
}

fn swap_secret_body<'a>(
    tx: &'a Transaction<'a>,
    _codec: &'a Codec,
    s: &'a SwapSecret,
) -> BoxFuture<'a, TxResult<bool>> {
    Box::pin(async move {
        share_root(tx, s.new.hsm_root_key_id).await?;
        let row = query_opt(
            tx,
            "SELECT record, hsm_root_key_id FROM service_secrets WHERE name = $1 FOR UPDATE",
            &[&s.name],
        )
        .await?;
        let Some(row) = row else {
            return Ok(false);
        };
        if secret_row(&s.name, &row, 0)? != s.current {
            return Ok(false);
        }
        execute(
            tx,
            "UPDATE service_secrets SET hsm_root_key_id = $2, record = $3 WHERE name = $1",
            &[&s.name, &root_col(s.new.hsm_root_key_id), &s.json],
        )
        .await?;
        Ok(true)
    })
}

struct NewApproval {
    approval: Approval,
    sealed: Sealed,
    now: Timestamp,
}

fn create_approval_body<'a>(
    tx: &'a Transaction<'a>,
    codec: &'a Codec,
    n: &'a NewApproval,
) -> BoxFuture<'a, TxResult<Option<Approval>>> {
    Box::pin(async move {
        query(tx, "SELECT pg_advisory_xact_lock($1)", &[&APPROVALS_LOCK]).await?;
        // Pending approvals are few; the status column only narrows the
        // scan, the decoded record decides.
        let rows = query(
            tx,
            "SELECT id, record, record_mac FROM approvals WHERE status = 'PENDING'",
            &[],
        )
        .await?;
        let mut twins = Vec::new();
        for row in &rows {
            match codec.approval_row(row) {
                Ok(a)
                    if a.status == ApprovalStatus::Pending
                        && n.now <= a.expires_at
                        && a.operation == n.approval.operation =>
                {
                    twins.push(a);
                }
                Ok(_) | Err(StoreError::IntegrityFailure(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        twins.sort_by_key(|a| (a.created_at, a.id));
        if let Some(twin) = twins.into_iter().next() {
            return Ok(Some(twin));
        }
        let a = &n.approval;
        let (status, key_id, expires, incarnation) = approval_columns(a);
        let inserted = execute(
            tx,
            "INSERT INTO approvals (id, status, key_id, expires_at_ms, executor, \
             executor_incarnation, record, record_mac) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (id) DO NOTHING",
            &[
                &a.id,
                &status,
                &key_id,
                &expires,
                &a.executor,
                &incarnation,
                &n.sealed.json,
                &n.sealed.mac,
            ],
        )
        .await?;
        if inserted == 0 {
            return Err(StoreError::ApprovalExists(a.id).into());
        }
        Ok(None)
    })
}

struct SwapApproval {
    current: Approval,
    new: Approval,
    sealed: Sealed,
}

fn swap_approval_body<'a>(
    tx: &'a Transaction<'a>,
    codec: &'a Codec,
    s: &'a SwapApproval,
) -> BoxFuture<'a, TxResult<()>> {
    Box::pin(async move {
        lock_approval(tx, codec, &s.current).await?;
        update_approval(tx, &s.new, &s.sealed).await
    })
}

fn swap_approval_and_key_body<'a>(
    tx: &'a Transaction<'a>,
    codec: &'a Codec,
    (a, k): &'a (SwapApproval, Swap),
) -> BoxFuture<'a, TxResult<()>> {
    Box::pin(async move {
        let generation = next_generations(tx, 1).await?;
        lock_approval(tx, codec, &a.current).await?;
        lock_current(tx, codec, &k.current).await?;
        update_approval(tx, &a.new, &a.sealed).await?;
        update_key(tx, &k.new, &k.sealed, generation).await?;
        notify(tx, generation).await
    })
}

/// The MAC key and whether to migrate, for [`seal_body`].
struct Seal {
    mac: Arc<RecordMac>,
}

/// Re-seals every key, version and approval row under `mac` (migration
/// trusts what is stored: each record must decode and belong to its row)
/// and marks the store sealed; how many rows.
fn seal_body<'a>(
    tx: &'a Transaction<'a>,
    _codec: &'a Codec,
    s: &'a Seal,
) -> BoxFuture<'a, TxResult<u64>> {
    Box::pin(async move {
        // Every writer of these tables waits: key writers at the counter,
        // the others at the table locks.
        query(
            tx,
            "SELECT key_generation FROM coffre_cluster FOR UPDATE",
            &[],
        )
        .await?;
        tx.batch_execute("LOCK TABLE approvals, keys, key_versions IN EXCLUSIVE MODE")
            .await?;
        let mut records = 0u64;
        for row in query(tx, "SELECT id, record FROM approvals", &[]).await? {
            let id: Uuid = col(&row, 0, "an approval id")?;
            let json: &[u8] = col(&row, 1, "an approval")?;
            let record: Approval = decode("an approval", json)?;
            if record.id != id {
                return Err(StoreError::Corrupt(format!(
                    "approval {} is stored under another id",
                    record.id
                ))
                .into());
            }
            let tag = s.mac.tag(Table::Approvals, id.as_bytes(), json);
            execute(
                tx,
                "UPDATE approvals SET record_mac = $2 WHERE id = $1",
                &[&id, &&tag[..]],
            )
            .await?;
            records += 1;
        }
        for row in query(tx, "SELECT id, record FROM keys", &[]).await? {
            let id: Uuid = col(&row, 0, "a key id")?;
            let json: &[u8] = col(&row, 1, "a key record")?;
            let record: KeyRecord = decode(&format!("key {id}"), json)?;
            if uuid_of(record.id) != id {
                return Err(StoreError::Corrupt(format!(
                    "key record stored under {id} has id {}",
                    record.id
                ))
                .into());
            }
            let tag = s.mac.tag(Table::Keys, id.as_bytes(), json);
            execute(
                tx,
                "UPDATE keys SET record_mac = $2 WHERE id = $1",
                &[&id, &&tag[..]],
            )
            .await?;
            records += 1;
        }
        for row in query(tx, "SELECT key_id, version, record FROM key_versions", &[]).await? {
            let id: Uuid = col(&row, 0, "a version's key id")?;
            let number: i32 = col(&row, 1, "a version number")?;
            let json: &[u8] = col(&row, 2, "a version record")?;
            let key_id = key_id_of(id);
            let record: VersionRecord = decode(&format!("version {number} of key {key_id}"), json)?;
            if record.key_id != key_id || i64::from(record.version) != i64::from(number) {
                return Err(StoreError::Corrupt(format!(
                    "version record stored as {key_id} v{number} claims {} v{}",
                    record.key_id, record.version
                ))
                .into());
            }
            let slot = super::records::version_slot(key_id, record.version);
            let tag = s.mac.tag(Table::Versions, &slot, json);
            execute(
                tx,
                "UPDATE key_versions SET record_mac = $3 WHERE key_id = $1 AND version = $2",
                &[&id, &number, &&tag[..]],
            )
            .await?;
            records += 1;
        }
        execute(
            tx,
            "INSERT INTO store_meta (name, value) VALUES ($1, '\\x01'::bytea) \
             ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
            &[&SEALED],
        )
        .await?;
        Ok(records)
    })
}

fn always<T>(_: &T) -> bool {
    true
}

#[async_trait]
impl KeyStore for PgStore {
    async fn create_keys(&self, keys: &[(&KeyRecord, &VersionRecord)]) -> Result<(), StoreError> {
        let codec = self.codec()?;
        let mut prepared = Vec::with_capacity(keys.len());
        for &(key, first) in keys {
            check_create(key, first)?;
            version_col(first.key_id, first.version)?;
            prepared.push((
                key.clone(),
                codec.encode_key(key)?,
                first.clone(),
                codec.encode_version(first)?,
            ));
        }
        self.mutate("creating keys", NewKeys(prepared), always, create_body)
            .await
    }

    async fn get_key(&self, id: KeyId) -> Result<Option<KeyRecord>, StoreError> {
        self.read("reading a key", async {
            let codec = self.codec()?;
            let c = self.inner.conn().await?;
            let row = query_opt(
                &c,
                "SELECT id, record, record_mac FROM keys WHERE id = $1",
                &[&uuid_of(id)],
            )
            .await
            .map_err(|e| self.inner.db_error("reading a key", &e))?;
            row.map(|r| codec.key_row(&r)).transpose()
        })
        .await
    }

    /// The `alias` column is an index; the key record it leads to is
    /// sealed and names its alias: a row whose record does not carry it
    /// (the column edited) is refused.
    async fn key_id_for_alias(&self, alias: &str) -> Result<Option<KeyId>, StoreError> {
        self.read("reading an alias", async {
            let codec = self.codec()?;
            let c = self.inner.conn().await?;
            let row = query_opt(
                &c,
                "SELECT id, record, record_mac FROM keys WHERE alias = $1",
                &[&alias],
            )
            .await
            .map_err(|e| self.inner.db_error("reading an alias", &e))?;
            let Some(row) = row else {
                return Ok(None);
            };
            let record = codec.key_row(&row)?;
            if record.alias.as_deref() == Some(alias) {
                return Ok(Some(record.id));
            }
            tracing::error!(
                table = "keys",
                id = %record.id,
                "a key row's alias column is not its record's: refused"
            );
            Err(StoreError::IntegrityFailure(format!(
                "the alias column leads to key {}, whose record does not carry that alias",
                record.id
            )))
        })
        .await
    }

    async fn list_keys(
        &self,
        filter: &KeyFilter,
        start_after: Option<KeyId>,
        limit: usize,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        self.read("listing keys", async {
            if limit == 0 {
                return Ok(Vec::new());
            }
            let codec = self.codec()?;
            let c = self.inner.conn().await?;
            let after = start_after.map(uuid_of);
            let state = filter.state.map(|s| s.as_str());
            let rows = query(
                &c,
                "SELECT id, record, record_mac FROM keys \
                 WHERE ($1::uuid IS NULL OR id > $1) AND ($2::text IS NULL OR state = $2) \
                   AND ($3::text IS NULL OR starts_with(alias, $3)) \
                 ORDER BY id LIMIT $4",
                &[&after, &state, &filter.alias_prefix, &limit_of(limit)],
            )
            .await
            .map_err(|e| self.inner.db_error("listing keys", &e))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                let record = codec.key_row(row)?;
                if !filter.matches(&record) {
                    return Err(StoreError::IntegrityFailure(format!(
                        "the state or alias column of key {} is not its record's",
                        record.id
                    )));
                }
                out.push(record);
            }
            Ok(out)
        })
        .await
    }

    async fn due_keys(&self, now: Timestamp, limit: usize) -> Result<Vec<KeyRecord>, StoreError> {
        self.read("reading due keys", async {
            let codec = self.codec()?;
            let c = self.inner.conn().await?;
            let rows = query(
                &c,
                "SELECT id, record, record_mac, next_due_ms FROM keys \
                 WHERE next_due_ms IS NOT NULL AND next_due_ms <= $1 \
                 ORDER BY next_due_ms, id LIMIT $2",
                &[&now.as_millis(), &limit_of(limit)],
            )
            .await
            .map_err(|e| self.inner.db_error("reading due keys", &e))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                let record = codec.key_row(row)?;
                let at: i64 = col(row, 3, "a due time")?;
                if record.next_due() != Some(Timestamp(at)) {
                    return Err(StoreError::Corrupt(format!(
                        "the due index says key {} is due at {at}, the key says {:?}",
                        record.id,
                        record.next_due().map(Timestamp::as_millis)
                    )));
                }
                out.push(record);
            }
            Ok(out)
        })
        .await
    }

    async fn add_version(
        &self,
        current: &KeyRecord,
        updated: &KeyRecord,
        version: &VersionRecord,
    ) -> Result<(), StoreError> {
        check_add_version(current, updated, version)?;
        version_col(version.key_id, version.version)?;
        let codec = self.codec()?;
        let args = AddVersion {
            current: current.clone(),
            updated: updated.clone(),
            updated_sealed: codec.encode_key(updated)?,
            version: version.clone(),
            version_sealed: codec.encode_version(version)?,
        };
        self.mutate("adding a version", args, always, add_version_body)
            .await
    }

    async fn get_version(
        &self,
        id: KeyId,
        version: u32,
    ) -> Result<Option<VersionRecord>, StoreError> {
        self.read("reading a version", async {
            let Ok(number) = i32::try_from(version) else {
                return Ok(None);
            };
            let codec = self.codec()?;
            let c = self.inner.conn().await?;
            let row = query_opt(
                &c,
                "SELECT key_id, version, record, record_mac FROM key_versions \
                 WHERE key_id = $1 AND version = $2",
                &[&uuid_of(id), &number],
            )
            .await
            .map_err(|e| self.inner.db_error("reading a version", &e))?;
            row.map(|r| codec.version_row(&r)).transpose()
        })
        .await
    }

    async fn list_versions(&self, id: KeyId) -> Result<Vec<VersionRecord>, StoreError> {
        self.read("listing versions", async {
            let codec = self.codec()?;
            let c = self.inner.conn().await?;
            let rows = query(
                &c,
                "SELECT key_id, version, record, record_mac FROM key_versions \
                 WHERE key_id = $1 ORDER BY version",
                &[&uuid_of(id)],
            )
            .await
            .map_err(|e| self.inner.db_error("listing versions", &e))?;
            rows.iter().map(|r| codec.version_row(r)).collect()
        })
        .await
    }

    async fn compare_and_swap_key(
        &self,
        current: &KeyRecord,
        new: &KeyRecord,
    ) -> Result<(), StoreError> {
        check_key_swap(current, new)?;
        let codec = self.codec()?;
        let args = Swap {
            current: current.clone(),
            new: new.clone(),
            sealed: codec.encode_key(new)?,
        };
        self.mutate("replacing a key", args, always, swap_body)
            .await
    }

    async fn destroy_key(
        &self,
        current: &KeyRecord,
        tombstone: &KeyRecord,
    ) -> Result<(), StoreError> {
        check_destroy(current, tombstone)?;
        let codec = self.codec()?;
        let args = Swap {
            current: current.clone(),
            new: tombstone.clone(),
            sealed: codec.encode_key(tombstone)?,
        };
        self.mutate("destroying a key", args, always, destroy_body)
            .await
    }

    async fn rewrap_version(
        &self,
        current: &VersionRecord,
        new: &VersionRecord,
    ) -> Result<(), StoreError> {
        check_rewrap(current, new)?;
        if i32::try_from(current.version).is_err() {
            return Err(StoreError::NoSuchVersion(current.key_id, current.version));
        }
        let codec = self.codec()?;
        let args = Rewrap {
            current: current.clone(),
            new: new.clone(),
            sealed: codec.encode_version(new)?,
        };
        self.mutate("re-wrapping a version", args, always, rewrap_body)
            .await
    }

    async fn versions_not_under_root(
        &self,
        root_key_id: u32,
        start_after: Option<(KeyId, u32)>,
        limit: usize,
    ) -> Result<Vec<VersionRecord>, StoreError> {
        self.read("listing versions to re-wrap", async {
            if limit == 0 {
                return Ok(Vec::new());
            }
            let codec = self.codec()?;
            let c = self.inner.conn().await?;
            // No stored version is past i32::MAX: "after (id, v)" for a larger
            // v is "after (id, i32::MAX)".
            let after_id = start_after.map(|(id, _)| uuid_of(id));
            let after_version =
                start_after.map_or(0, |(_, v)| i32::try_from(v).unwrap_or(i32::MAX));
            let rows = query(
                &c,
                "SELECT key_id, version, record, record_mac FROM key_versions \
                 WHERE NOT destroyed AND NOT in_hsm AND hsm_root_key_id <> $1 \
                   AND ($2::uuid IS NULL OR (key_id, version) > ($2, $3)) \
                 ORDER BY key_id, version LIMIT $4",
                &[
                    &root_col(root_key_id),
                    &after_id,
                    &after_version,
                    &limit_of(limit),
                ],
            )
            .await
            .map_err(|e| self.inner.db_error("listing versions to re-wrap", &e))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                let record = codec.version_row(row)?;
                if record.destroyed_at.is_some()
                    || record.hsm_object.is_some()
                    || record.hsm_root_key_id == root_key_id
                {
                    return Err(StoreError::Corrupt(format!(
                        "the columns of version {} of key {} are not its record's",
                        record.version, record.key_id
                    )));
                }
                out.push(record);
            }
            Ok(out)
        })
        .await
    }

    async fn count_versions(&self, root_key_id: u32) -> Result<VersionCounts, StoreError> {
        self.read("counting versions", async {
            let c = self.inner.conn().await?;
            let row = query_opt(
                &c,
                "SELECT count(*) FILTER (WHERE NOT destroyed), \
                        count(*) FILTER (WHERE NOT destroyed AND NOT in_hsm \
                                           AND hsm_root_key_id <> $1), \
                        count(*) FILTER (WHERE destroyed) \
                 FROM key_versions",
                &[&root_col(root_key_id)],
            )
            .await
            .map_err(|e| self.inner.db_error("counting versions", &e))?
            .ok_or_else(|| StoreError::Corrupt("counting versions gave no row".into()))?;
            let count = |i: usize| -> Result<u64, StoreError> {
                let n: i64 = col(&row, i, "a count")?;
                Ok(u64::try_from(n).unwrap_or(0))
            };
            Ok(VersionCounts {
                live: count(0)?,
                not_under_root: count(1)?,
                destroyed: count(2)?,
            })
        })
        .await
    }

    /// PostgreSQL cannot promise what this method promises of sled's
    /// files: an old row version stays in the table's files until VACUUM
    /// reuses its space (and then only as free space, not overwritten),
    /// and the WAL, standbys, archives and backups keep it longer. This
    /// runs `VACUUM` on `keys`, `key_versions` and `approvals` (outside a
    /// transaction, as it must), which marks dead row versions reusable,
    /// and returns `Ok` once it has: erasure of destroyed material on
    /// PostgreSQL is cryptographic, by rotating the HSM root key that
    /// wrapped it away and destroying it (SECURITY.md, "Destroyed material
    /// and the store's files"). A role that does not own the tables
    /// (coffre_app) gets PostgreSQL's warning, not an error: the owner's
    /// or autovacuum's VACUUM does the same.
    async fn compact(&self) -> Result<(), StoreError> {
        let c = self.inner.conn().await?;
        c.batch_execute("VACUUM keys, key_versions, approvals")
            .await
            .map_err(|e| self.inner.db_error("vacuuming", &e))
    }

    async fn get_secret(&self, name: &str) -> Result<Option<WrappedSecret>, StoreError> {
        self.read("reading a service secret", async {
            let c = self.inner.conn().await?;
            let row = query_opt(
                &c,
                "SELECT record, hsm_root_key_id FROM service_secrets WHERE name = $1",
                &[&name],
            )
            .await
            .map_err(|e| self.inner.db_error("reading a service secret", &e))?;
            row.map(|r| secret_row(name, &r, 0)).transpose()
        })
        .await
    }

    async fn put_secret(&self, name: &str, secret: &WrappedSecret) -> Result<(), StoreError> {
        check_secret(name, secret)?;
        let args = PutSecret {
            name: name.to_owned(),
            secret: secret.clone(),
            json: encode("service secret", secret)?,
        };
        self.mutate("writing a service secret", args, always, put_secret_body)
            .await
    }

    async fn create_secret(
        &self,
        name: &str,
        secret: &WrappedSecret,
    ) -> Result<WrappedSecret, StoreError> {
        check_secret(name, secret)?;
        let args = PutSecret {
            name: name.to_owned(),
            secret: secret.clone(),
            json: encode("service secret", secret)?,
        };
        self.mutate(
            "creating a service secret",
            args,
            always,
            create_secret_body,
        )
        .await
    }

    async fn swap_secret(
        &self,
        name: &str,
        current: &WrappedSecret,
        new: &WrappedSecret,
    ) -> Result<bool, StoreError> {
        check_secret(name, new)?;
        let args = SwapSecret {
            name: name.to_owned(),
            current: current.clone(),
            new: new.clone(),
            json: encode("service secret", new)?,
        };
        self.mutate(
            "replacing a service secret",
            args,
            |swapped| *swapped,
            swap_secret_body,
        )
        .await
    }

    async fn fence_root_keys(&self, current: u32, retire: &[u32]) -> Result<u64, StoreError> {
        let args = Fence {
            current,
            retire: retire.to_vec(),
        };
        self.mutate("fencing root keys", args, |left| *left == 0, fence_body)
            .await
    }

    async fn list_secrets(&self) -> Result<Vec<(String, WrappedSecret)>, StoreError> {
        self.read("listing service secrets", async {
            let c = self.inner.conn().await?;
            let rows = query(
                &c,
                "SELECT name, record, hsm_root_key_id FROM service_secrets ORDER BY name",
                &[],
            )
            .await
            .map_err(|e| self.inner.db_error("listing service secrets", &e))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                let name: String = col(row, 0, "a service secret's name")?;
                let secret = secret_row(&name, row, 1)?;
                out.push((name, secret));
            }
            Ok(out)
        })
        .await
    }

    async fn create_approval(
        &self,
        approval: &Approval,
        now: Timestamp,
    ) -> Result<Option<Approval>, StoreError> {
        let codec = self.codec()?;
        let args = NewApproval {
            approval: approval.clone(),
            sealed: codec.encode_approval(approval)?,
            now,
        };
        self.mutate("creating an approval", args, always, create_approval_body)
            .await
    }

    async fn get_approval(&self, id: Uuid) -> Result<Option<Approval>, StoreError> {
        self.read("reading an approval", async {
            let codec = self.codec()?;
            let c = self.inner.conn().await?;
            let row = query_opt(
                &c,
                "SELECT id, record, record_mac FROM approvals WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(|e| self.inner.db_error("reading an approval", &e))?;
            row.map(|r| codec.approval_row(&r)).transpose()
        })
        .await
    }

    async fn list_approvals(&self) -> Result<Vec<Approval>, StoreError> {
        self.read("listing approvals", async {
            let codec = self.codec()?;
            let c = self.inner.conn().await?;
            let rows = query(&c, "SELECT id, record, record_mac FROM approvals", &[])
                .await
                .map_err(|e| self.inner.db_error("listing approvals", &e))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                match codec.approval_row(row) {
                    Ok(a) => out.push(a),
                    Err(StoreError::IntegrityFailure(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            out.sort_by_key(|a| (a.created_at, a.id));
            Ok(out)
        })
        .await
    }

    async fn swap_approval(&self, current: &Approval, new: &Approval) -> Result<(), StoreError> {
        check_approval_swap(current, new)?;
        let codec = self.codec()?;
        let args = SwapApproval {
            current: current.clone(),
            new: new.clone(),
            sealed: codec.encode_approval(new)?,
        };
        self.mutate("replacing an approval", args, always, swap_approval_body)
            .await
    }

    async fn swap_approval_and_key(
        &self,
        (current, new): (&Approval, &Approval),
        (key, next): (&KeyRecord, &KeyRecord),
    ) -> Result<(), StoreError> {
        check_approval_and_key((current, new), (key, next))?;
        let codec = self.codec()?;
        let args = (
            SwapApproval {
                current: current.clone(),
                new: new.clone(),
                sealed: codec.encode_approval(new)?,
            },
            Swap {
                current: key.clone(),
                new: next.clone(),
                sealed: codec.encode_key(next)?,
            },
        );
        self.mutate(
            "replacing an approval and its key",
            args,
            always,
            swap_approval_and_key_body,
        )
        .await
    }

    async fn changes_since(&self, after: u64, limit: usize) -> Result<ChangePage, StoreError> {
        self.read("reading the change feed", async {
            let c = self.inner.conn().await?;
            let after = i64::try_from(after).unwrap_or(i64::MAX);
            // One statement, one snapshot: the head and the page agree.
            let rows = query(
                &c,
                "SELECT c.key_generation, k.id, k.generation FROM coffre_cluster c \
                 LEFT JOIN LATERAL (SELECT id, generation FROM keys WHERE generation > $1 \
                                    ORDER BY generation LIMIT $2) k ON true \
                 ORDER BY k.generation",
                &[&after, &limit_of(limit)],
            )
            .await
            .map_err(|e| self.inner.db_error("reading the change feed", &e))?;
            let mut page = ChangePage::default();
            for row in &rows {
                let head: i64 = col(row, 0, "the feed's generation")?;
                page.head = u64::try_from(head).unwrap_or(0);
                let id: Option<Uuid> = col(row, 1, "a key id in the change feed")?;
                let generation: Option<i64> = col(row, 2, "a generation in the change feed")?;
                if let (Some(id), Some(generation)) = (id, generation) {
                    page.changes.push(KeyChange {
                        generation: u64::try_from(generation).unwrap_or(0),
                        key_id: key_id_of(id),
                    });
                }
            }
            Ok(page)
        })
        .await
    }

    async fn install_integrity(
        &self,
        mac: &Arc<RecordMac>,
        migrate: bool,
    ) -> Result<IntegrityState, StoreError> {
        if self.inner.mac.get().is_some() {
            return Err(StoreError::Corrupt(format!(
                "the integrity key of the store at {} is already installed",
                self.inner.connector.target()
            )));
        }
        let sealed = self.read_sealed().await?;
        if !migrate {
            if !sealed {
                return Ok(IntegrityState::NeedsMigration);
            }
            self.inner.sealed.store(true, Ordering::Release);
            return self.set_mac(mac).map(|()| IntegrityState::Sealed);
        }
        let inner = Arc::clone(&self.inner);
        let args = Seal {
            mac: Arc::clone(mac),
        };
        // The migration's codec is not used (it trusts what is stored).
        let codec = Codec { mac: None };
        let records = tokio::spawn(async move {
            inner
                .transact("sealing the records", &codec, &args, always, seal_body)
                .await
        })
        .await
        .map_err(|e| {
            StoreError::Io(format!("sealing the records: the store's task failed: {e}"))
        })??;
        self.inner.sealed.store(true, Ordering::Release);
        self.set_mac(mac)?;
        Ok(IntegrityState::Migrated { records })
    }
}

impl PgStore {
    fn set_mac(&self, mac: &Arc<RecordMac>) -> Result<(), StoreError> {
        self.inner.mac.set(Arc::clone(mac)).map_err(|_| {
            StoreError::Corrupt(format!(
                "the integrity key of the store at {} is already installed",
                self.inner.connector.target()
            ))
        })
    }
}
