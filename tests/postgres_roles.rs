//! `src/store/postgres/sql/roles.sql` as a DBA runs it: `coffre_owner`
//! migrates, `coffre_app` can do what coffre needs (read, insert, update)
//! and nothing else: no DDL, no DELETE or TRUNCATE (audit_* append-only).
//! Needs PostgreSQL 15+ (`needs::POSTGRES`).

use crate::common::pg::PgCluster;
use crate::common::{needs, require};
use crate::postgres_store::{connector, store_failure, store_json, write_config};

const ROLES_SQL: &str = include_str!("../src/store/postgres/sql/roles.sql");

/// The statements of `sql`, comments dropped, split at `;` (roles.sql has
/// no `;` inside a statement).
fn statements(sql: &str) -> Vec<String> {
    let text: String = sql
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .map(|l| format!("{l}\n"))
        .collect();
    text.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Runs roles.sql as the superuser: what precedes `\connect coffre` in
/// the `postgres` database, one statement at a time (CREATE DATABASE
/// cannot run in a transaction block), the rest in `coffre`.
fn apply_roles(pg: &PgCluster) {
    let (cluster_part, database_part) = ROLES_SQL
        .split_once("\\connect coffre")
        .expect("roles.sql connects to the coffre database");
    for statement in statements(cluster_part) {
        pg.psql("postgres", &statement);
    }
    for statement in statements(database_part) {
        pg.psql("coffre", &statement);
    }
}

/// `sql` as `coffre_app` in `coffre`: the error text, or `None` if it ran.
fn as_app(pg: &PgCluster, sql: &str) -> Option<String> {
    let out = pg.try_psql_as("coffre_app", "coffre", sql);
    (!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
async fn the_app_role_does_dml_only_and_the_owner_migrates() {
    require(&needs::POSTGRES);
    let pg = PgCluster::primary();
    apply_roles(&pg);
    let config = write_config(pg.dir(), "");
    let url_as = |user: &str| {
        format!(
            "postgresql://{user}@127.0.0.1:{}/coffre?sslmode=disable",
            pg.port()
        )
    };

    // The app role cannot create the schema.
    let (code, message, _) = store_failure("migrate", &config, &url_as("coffre_app"));
    assert_eq!(code, "PERMISSION_DENIED", "{message}");
    assert!(
        message.contains("permission denied for schema public"),
        "{message}"
    );
    // The owner can.
    let v = store_json("migrate", &config, &url_as("coffre_owner"));
    assert_eq!(v["applied"][0]["version"], 1, "{v}");
    assert_eq!(
        pg.psql(
            "coffre",
            "SELECT tableowner FROM pg_tables WHERE tablename = 'keys'"
        ),
        "coffre_owner"
    );

    // What coffre does as the app: read, insert, update.
    for sql in [
        "SELECT count(*) FROM keys",
        "INSERT INTO store_meta (name, value) VALUES ('sealed', '\\x01')",
        "UPDATE store_meta SET value = '\\x02' WHERE name = 'sealed'",
        "UPDATE coffre_cluster SET key_generation = key_generation + 1",
        "INSERT INTO audit_checkpoints VALUES ('n1', 'l', 1, 'h', 0, 's')",
        "SELECT pg_advisory_xact_lock(1)",
    ] {
        assert_eq!(as_app(&pg, sql), None, "{sql}");
    }
    // And the schema check `coffre serve` makes, as the app.
    let c = connector(&config, &url_as("coffre_app"));
    let client = c.connect().await.unwrap();
    assert_eq!(
        coffre::store::postgres::check_schema_for_serving(&client, &c)
            .await
            .unwrap(),
        coffre::store::postgres::migrate::LATEST_VERSION
    );

    // Nothing else.
    for (sql, refusal) in [
        (
            "CREATE TABLE x (a int)",
            "permission denied for schema public",
        ),
        (
            "CREATE TEMP TABLE x (a int)",
            "permission denied to create temporary tables",
        ),
        (
            "CREATE INDEX ON keys (alias)",
            "must be owner of table keys",
        ),
        (
            "ALTER TABLE keys ADD COLUMN x int",
            "must be owner of table keys",
        ),
        ("DROP TABLE keys", "must be owner of table keys"),
        ("CREATE SCHEMA s", "permission denied for database coffre"),
        (
            "DELETE FROM audit_checkpoints",
            "permission denied for table audit_checkpoints",
        ),
        (
            "TRUNCATE audit_digests",
            "permission denied for table audit_digests",
        ),
        ("DELETE FROM keys", "permission denied for table keys"),
        (
            "TRUNCATE schema_migrations",
            "permission denied for table schema_migrations",
        ),
    ] {
        let err = as_app(&pg, sql).unwrap_or_else(|| panic!("{sql} ran as coffre_app"));
        assert!(err.contains(refusal), "{sql}: {err}");
    }
    assert_eq!(
        pg.psql("coffre", "SELECT count(*) FROM audit_checkpoints"),
        "1"
    );
}
