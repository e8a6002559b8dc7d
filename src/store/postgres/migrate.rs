//! The schema's migrations, in house (design §3.4): the SQL files of
//! `sql/`, compiled in, applied in order by `coffre store migrate`.
//!
//! Each pending file is applied in one transaction (PostgreSQL's DDL is
//! transactional, so a failed file leaves nothing behind):
//!
//! 1. `pg_advisory_xact_lock(MIGRATION_LOCK)`, which two migrators racing
//!    (two nodes upgraded at once) take in turn;
//! 2. `schema_migrations` read again under the lock: the other migrator
//!    may have applied the file meanwhile, and then this one does nothing;
//! 3. the file, then its row: version, name, SHA-256 of its text.
//!
//! Before anything is applied, and on every [`schema_state`], the rows of
//! the files already applied must carry the checksums of this binary's
//! files, and no row may be newer than the newest file it has: a database
//! changed by another build (or by hand) is refused, never "repaired".
//!
//! Files are never edited once released; a change is a new file, additive
//! while older nodes still run (expand/contract, design §3.4).

use ring::digest::{SHA256, digest};
use tokio_postgres::{Client, GenericClient};

use super::PgError;
use super::connect::PgConnector;

/// One SQL file of the schema.
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

impl Migration {
    /// The SHA-256 of the file's text, in hex, as `schema_migrations`
    /// keeps it.
    pub fn checksum(&self) -> String {
        hex::encode(digest(&SHA256, self.sql.as_bytes()))
    }
}

/// Every migration this binary knows, in order, versions 1, 2, ...
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("sql/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "node_freshness",
        sql: include_str!("sql/0002_node_freshness.sql"),
    },
];

/// The newest schema version this binary knows (and needs).
pub const LATEST_VERSION: i32 = 2;

/// The advisory lock migrators take ("coffre" and 1, as a number), in
/// PostgreSQL's one 64-bit key space shared with every other application
/// of the database.
pub const MIGRATION_LOCK: i64 = 0x636f_6666_7265_0001;

/// What [`migrate`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MigrateReport {
    /// The migrations this run applied, in order (empty: it was current).
    pub applied: Vec<AppliedMigration>,
    /// The schema version afterwards.
    pub version: i32,
}

/// One applied migration, as `coffre store migrate --json` lists it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AppliedMigration {
    pub version: i32,
    pub name: String,
}

/// Where a database's schema stands relative to this binary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchemaState {
    /// No coffre schema at all (`schema_migrations` absent or empty).
    Missing,
    /// What this binary knows: ready to serve.
    Current { version: i32 },
    /// Older: `coffre store migrate` would bring it to `latest`.
    Older { version: i32, latest: i32 },
    /// Newer than this binary knows: a newer coffre migrated it.
    Newer { version: i32, known: i32 },
}

/// A row of `schema_migrations`.
struct Applied {
    version: i32,
    name: String,
    checksum: String,
}

/// Applies every pending migration, each in its own transaction under
/// [`MIGRATION_LOCK`]. Refuses (applying nothing more) a database whose
/// applied migrations differ from this binary's, or that is newer.
/// `client` is a dedicated connection ([`PgConnector::connect`]), as the
/// schema's owner role.
pub async fn migrate(
    client: &mut Client,
    connector: &PgConnector,
) -> Result<MigrateReport, PgError> {
    let error = |e: tokio_postgres::Error| connector.error(&e);
    let mut report = MigrateReport::default();
    for migration in MIGRATIONS {
        let tx = client.transaction().await.map_err(error)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(error)?;
        let applied = read_applied(&tx, connector).await?;
        report.version = verify(&applied, connector)?;
        if applied.iter().any(|a| a.version == migration.version) {
            // Dropped: rolled back, which releases the lock.
            continue;
        }
        tx.batch_execute(migration.sql).await.map_err(error)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[&migration.version, &migration.name, &migration.checksum()],
        )
        .await
        .map_err(error)?;
        tx.commit().await.map_err(error)?;
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "applied a schema migration"
        );
        report.applied.push(AppliedMigration {
            version: migration.version,
            name: migration.name.to_string(),
        });
        report.version = migration.version;
    }
    Ok(report)
}

/// Where the schema stands; the checksums of the applied migrations this
/// binary knows are checked ([`PgError::ChecksumMismatch`]).
pub async fn schema_state(
    client: &impl GenericClient,
    connector: &PgConnector,
) -> Result<SchemaState, PgError> {
    let applied = read_applied(client, connector).await?;
    if applied.is_empty() {
        return Ok(SchemaState::Missing);
    }
    let version = applied.iter().map(|a| a.version).max().unwrap_or(0);
    if version > LATEST_VERSION {
        return Ok(SchemaState::Newer {
            version,
            known: LATEST_VERSION,
        });
    }
    verify(&applied, connector)?;
    Ok(if version < LATEST_VERSION {
        SchemaState::Older {
            version,
            latest: LATEST_VERSION,
        }
    } else {
        SchemaState::Current { version }
    })
}

/// What `coffre serve` checks before it uses a database: the schema must
/// be exactly the one this binary knows. Its version, or why not.
pub async fn check_schema_for_serving(
    client: &impl GenericClient,
    connector: &PgConnector,
) -> Result<i32, PgError> {
    let target = connector.target().to_string();
    match schema_state(client, connector).await? {
        SchemaState::Current { version } => Ok(version),
        SchemaState::Missing => Err(PgError::SchemaMissing { target }),
        SchemaState::Older { version, latest } => Err(PgError::SchemaOlder {
            target,
            version,
            required: latest,
        }),
        SchemaState::Newer { version, known } => Err(PgError::SchemaNewer {
            target,
            version,
            known,
        }),
    }
}

/// The rows of `schema_migrations`, none if the table does not exist.
async fn read_applied(
    client: &impl GenericClient,
    connector: &PgConnector,
) -> Result<Vec<Applied>, PgError> {
    let error = |e: tokio_postgres::Error| connector.error(&e);
    let exists: bool = client
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
        .await
        .and_then(|row| row.try_get(0))
        .map_err(error)?;
    if !exists {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "SELECT version, name, checksum FROM schema_migrations ORDER BY version",
            &[],
        )
        .await
        .map_err(error)?;
    rows.iter()
        .map(|row| {
            Ok(Applied {
                version: row.try_get(0)?,
                name: row.try_get(1)?,
                checksum: row.try_get(2)?,
            })
        })
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(error)
}

/// Refuses applied migrations that are newer than this binary, or that
/// differ from its files; the version they make.
fn verify(applied: &[Applied], connector: &PgConnector) -> Result<i32, PgError> {
    let target = || connector.target().to_string();
    let mut version = 0;
    for row in applied {
        let Some(known) = MIGRATIONS.iter().find(|m| m.version == row.version) else {
            return Err(PgError::SchemaNewer {
                target: target(),
                version: applied
                    .iter()
                    .map(|a| a.version)
                    .max()
                    .unwrap_or(row.version),
                known: LATEST_VERSION,
            });
        };
        let expected = known.checksum();
        if row.checksum != expected || row.name != known.name {
            return Err(PgError::ChecksumMismatch {
                target: target(),
                version: row.version,
                name: row.name.clone(),
                stored: row.checksum.clone(),
                expected,
            });
        }
        version = version.max(row.version);
    }
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_from_one_without_gaps() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(usize::try_from(m.version).ok(), Some(i + 1), "{}", m.name);
            assert_eq!(m.checksum().len(), 64);
        }
        assert_eq!(MIGRATIONS.last().map(|m| m.version), Some(LATEST_VERSION));
    }

    #[test]
    fn the_first_migration_creates_every_table_of_the_design() {
        let sql = MIGRATIONS.first().map(|m| m.sql).unwrap_or_default();
        for table in [
            "coffre_cluster",
            "keys",
            "key_versions",
            "root_keys",
            "service_secrets",
            "approvals",
            "leases",
            "nodes",
            "audit_checkpoints",
            "audit_digests",
            "store_meta",
            "schema_migrations",
        ] {
            assert!(
                sql.contains(&format!("CREATE TABLE {table} (")),
                "{table} is missing"
            );
        }
    }
}
