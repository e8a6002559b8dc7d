//! [`import`]: a whole store ([`StoreDump`], read from sled) written into
//! an empty PostgreSQL database in **one transaction**, for `coffre store
//! copy`.
//!
//! One transaction is what makes the copy safe to interrupt: on any
//! error (a refusal, a lost connection, a count that does not match,
//! Ctrl-C) nothing is committed, and the database stays empty, so the
//! copy can simply be run again. No "half copied" marker is needed, and
//! `coffre serve` can never start on a partial copy.
//!
//! The transaction first takes `EXCLUSIVE` locks on every table coffre
//! writes (`coffre_cluster` first, the store's lock order), so no node
//! can write while it checks that the database is empty and copies; then
//! it inserts each table in batches (`INSERT ... SELECT FROM UNNEST` of
//! arrays: one statement per batch), derives the index columns from the
//! records as `PgStore` does, sets the change feed's counter to the
//! source's, counts every table again, and commits only if the counts
//! are the source's.

use std::collections::BTreeSet;

use tokio_postgres::Client;

use super::records::{root_col, uuid_of, version_col};
use super::store::approval_columns;
use super::{PgConnector, PgError, check_schema_for_serving};
use crate::model::Timestamp;
use crate::store::StoreError;
use crate::store::copy::{CopyCounts, StoreDump};

/// Rows per `INSERT` statement.
const BATCH: usize = 2000;

/// The tables a node writes, in the store's lock order (`coffre_cluster`
/// first), with `schema_migrations` left out (the migrator's).
const TABLES: [&str; 11] = [
    "coffre_cluster",
    "approvals",
    "keys",
    "key_versions",
    "root_keys",
    "service_secrets",
    "store_meta",
    "leases",
    "nodes",
    "audit_checkpoints",
    "audit_digests",
];

/// Why a copy was refused or failed. Nothing was committed in any case
/// but [`CopyError::Commit`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CopyError {
    #[error(transparent)]
    Pg(#[from] PgError),
    /// The target already holds data: a copy goes only into a database
    /// that `coffre store migrate` just created.
    #[error(
        "the database at {target} is not empty ({what}): coffre store copy writes only into a \
         new database (created, then `coffre store migrate`); nothing was written"
    )]
    NotEmpty { target: String, what: String },
    /// A record cannot be stored (a version number beyond the column).
    #[error("a record cannot be copied: {0}; nothing was written")]
    Record(#[from] StoreError),
    /// After the inserts, the target does not hold what was copied.
    #[error(
        "after copying, the database at {target} does not match the source ({table}: {found}, \
         expected {expected}): \
         rolled back, nothing was written"
    )]
    Mismatch {
        target: String,
        table: &'static str,
        expected: u64,
        found: u64,
    },
    /// The connection failed while committing: the copy may or may not be
    /// in the database.
    #[error(
        "the commit of the copy into {target} did not answer ({detail}): it may or may not \
         have been applied; run `coffre store copy` again, which refuses a database that \
         holds the copy, or `coffre store status`"
    )]
    Commit { target: String, detail: String },
}

/// Where a copy stands, for a progress display: `done` of `total` rows of
/// `table` written.
pub type Progress<'a> = &'a mut (dyn FnMut(&'static str, u64, u64) + Send);

/// Writes `dump` into the empty, current-schema database `client` is
/// connected to (a primary: the caller checked it), in one transaction;
/// returns what the target then holds (equal to `dump.expected()`).
pub async fn import(
    client: &mut Client,
    connector: &PgConnector,
    dump: &StoreDump,
    progress: Progress<'_>,
) -> Result<CopyCounts, CopyError> {
    let target = connector.target().to_string();
    let db = |e: tokio_postgres::Error| CopyError::Pg(connector.error(&e));
    check_schema_for_serving(&*client, connector).await?;
    let tx = client.transaction().await.map_err(db)?;
    tx.batch_execute(&format!(
        "LOCK TABLE {} IN EXCLUSIVE MODE",
        TABLES.join(", ")
    ))
    .await
    .map_err(db)?;

    // Empty: no row anywhere, and the feed at 0.
    let mut held = Vec::new();
    for table in TABLES.iter().filter(|t| **t != "coffre_cluster") {
        let n: i64 = tx
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .and_then(|r| r.try_get(0))
            .map_err(db)?;
        if n > 0 {
            held.push(format!("{n} rows in {table}"));
        }
    }
    let head: i64 = tx
        .query_one("SELECT key_generation FROM coffre_cluster", &[])
        .await
        .and_then(|r| r.try_get(0))
        .map_err(db)?;
    if head != 0 {
        held.push(format!("change feed at generation {head}"));
    }
    if !held.is_empty() {
        return Err(CopyError::NotEmpty {
            target,
            what: held.join(", "),
        });
    }

    let expected = dump.expected();
    let total = expected.keys;
    for (n, batch) in dump.keys.chunks(BATCH).enumerate() {
        let mut ids = Vec::with_capacity(batch.len());
        let mut aliases = Vec::with_capacity(batch.len());
        let mut states = Vec::with_capacity(batch.len());
        let mut due = Vec::with_capacity(batch.len());
        let mut generations = Vec::with_capacity(batch.len());
        let mut records = Vec::with_capacity(batch.len());
        let mut tags = Vec::with_capacity(batch.len());
        for (key, generation) in batch {
            ids.push(uuid_of(key.record.id));
            aliases.push(key.record.alias.clone());
            states.push(key.record.state.as_str().to_string());
            due.push(key.record.next_due().map(Timestamp::as_millis));
            generations.push(i64::try_from(*generation).map_err(|_| {
                StoreError::Corrupt(format!("key generation {generation} is out of range"))
            })?);
            records.push(key.json.as_slice());
            tags.push(key.tag.as_slice());
        }
        tx.execute(
            "INSERT INTO keys (id, alias, state, next_due_ms, generation, record, record_mac) \
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::int8[], $5::int8[], \
             $6::bytea[], $7::bytea[])",
            &[&ids, &aliases, &states, &due, &generations, &records, &tags],
        )
        .await
        .map_err(db)?;
        progress("keys", (n * BATCH + batch.len()) as u64, total);
    }

    let total = expected.versions;
    let mut roots = BTreeSet::new();
    for (n, batch) in dump.versions.chunks(BATCH).enumerate() {
        let mut ids = Vec::with_capacity(batch.len());
        let mut numbers = Vec::with_capacity(batch.len());
        let mut root_ids = Vec::with_capacity(batch.len());
        let mut in_hsm = Vec::with_capacity(batch.len());
        let mut destroyed = Vec::with_capacity(batch.len());
        let mut records = Vec::with_capacity(batch.len());
        let mut tags = Vec::with_capacity(batch.len());
        for v in batch {
            let r = &v.record;
            ids.push(uuid_of(r.key_id));
            numbers.push(version_col(r.key_id, r.version)?);
            root_ids.push(root_col(r.hsm_root_key_id));
            in_hsm.push(r.hsm_object.is_some());
            destroyed.push(r.destroyed_at.is_some());
            records.push(v.json.as_slice());
            tags.push(v.tag.as_slice());
            roots.insert(r.hsm_root_key_id);
        }
        tx.execute(
            "INSERT INTO key_versions (key_id, version, hsm_root_key_id, in_hsm, destroyed, \
             record, record_mac) SELECT * FROM UNNEST($1::uuid[], $2::int4[], $3::int4[], \
             $4::bool[], $5::bool[], $6::bytea[], $7::bytea[])",
            &[
                &ids, &numbers, &root_ids, &in_hsm, &destroyed, &records, &tags,
            ],
        )
        .await
        .map_err(db)?;
        progress("versions", (n * BATCH + batch.len()) as u64, total);
    }

    for a in &dump.approvals {
        let (status, key_id, expires, incarnation) = approval_columns(&a.record);
        tx.execute(
            "INSERT INTO approvals (id, status, key_id, expires_at_ms, executor, \
             executor_incarnation, record, record_mac) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &a.record.id,
                &status,
                &key_id,
                &expires,
                &a.record.executor,
                &incarnation,
                &a.json,
                &a.tag,
            ],
        )
        .await
        .map_err(db)?;
    }

    for (name, secret) in dump.copied_secrets() {
        let json = serde_json::to_vec(secret)
            .map_err(|e| StoreError::Corrupt(format!("encoding service secret {name:?}: {e}")))?;
        tx.execute(
            "INSERT INTO service_secrets (name, hsm_root_key_id, record) VALUES ($1, $2, $3)",
            &[name, &root_col(secret.hsm_root_key_id), &json],
        )
        .await
        .map_err(db)?;
        roots.insert(secret.hsm_root_key_id);
    }

    // The fence: every root key something is stored under, ACTIVE unless
    // the source retired it (0: held by the HSM, no root key).
    let retired: BTreeSet<u32> = dump.retired_root_keys.iter().copied().collect();
    for root in roots.union(&retired).filter(|r| **r != 0) {
        let state = if retired.contains(root) {
            "RETIRED"
        } else {
            "ACTIVE"
        };
        tx.execute(
            "INSERT INTO root_keys (id, state) VALUES ($1, $2)",
            &[&root_col(*root), &state],
        )
        .await
        .map_err(db)?;
    }

    // Sealed, as the source was (export refuses an unsealed one), and the
    // feed's counter where the source's was.
    tx.execute(
        "INSERT INTO store_meta (name, value) VALUES ('sealed', '\\x01'::bytea)",
        &[],
    )
    .await
    .map_err(db)?;
    let generation = i64::try_from(expected.generation).map_err(|_| {
        StoreError::Corrupt(format!(
            "generation {} is out of range",
            expected.generation
        ))
    })?;
    tx.execute(
        "UPDATE coffre_cluster SET key_generation = $1",
        &[&generation],
    )
    .await
    .map_err(db)?;

    let count = |table: &'static str| {
        let tx = &tx;
        async move {
            tx.query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await
                .and_then(|r| r.try_get::<_, i64>(0))
                .map(|n| n as u64)
        }
    };
    let found = CopyCounts {
        keys: count("keys").await.map_err(db)?,
        versions: count("key_versions").await.map_err(db)?,
        approvals: count("approvals").await.map_err(db)?,
        secrets: count("service_secrets").await.map_err(db)?,
        generation: tx
            .query_one("SELECT key_generation FROM coffre_cluster", &[])
            .await
            .and_then(|r| r.try_get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(db)?,
    };
    for (table, e, f) in [
        ("keys", expected.keys, found.keys),
        ("versions", expected.versions, found.versions),
        ("approvals", expected.approvals, found.approvals),
        ("service secrets", expected.secrets, found.secrets),
        ("generation", expected.generation, found.generation),
    ] {
        if e != f {
            return Err(CopyError::Mismatch {
                target,
                table,
                expected: e,
                found: f,
            });
        }
    }
    tx.commit().await.map_err(|e| CopyError::Commit {
        target: target.clone(),
        detail: connector.error(&e).to_string(),
    })?;
    Ok(found)
}
