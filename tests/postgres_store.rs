//! The PostgreSQL store's foundation against real servers (issue #17):
//! `coffre store migrate` and `status` with the real binary, the
//! connection's failures in words (never the password), a standby refused,
//! TLS verify-full, and the schema checks `coffre serve` will make. Every
//! test starts its own private server (`common::pg`) and needs PostgreSQL
//! 15+ (`needs::POSTGRES`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use serde_json::Value;
use zeroize::Zeroizing;

use crate::common::binary::{COFFRE, free_port};
use crate::common::pg::PgCluster;
use crate::common::{needs, require};
use coffre::config::Config;
use coffre::store::postgres::migrate::{LATEST_VERSION, MIGRATIONS};
use coffre::store::postgres::{
    DatabaseUrl, PgConnector, PgError, check_schema_for_serving, open_pool, schema_state,
};

/// The variable the test configurations name in `store.url_env`.
const URL_VAR: &str = "COFFRE_TEST_DATABASE_URL";

/// A server configuration for the PostgreSQL store in `dir` (the TLS and
/// HSM paths are never opened by `coffre store`), with `store_extra`
/// added to `[store]`.
pub fn write_config(dir: &Path, store_extra: &str) -> PathBuf {
    let text = format!(
        r#"
data_dir = "{}"
allow_single_operator = true
[tls]
cert = "s.pem"
key = "k.pem"
client_ca = "ca.pem"
[hsm]
backend = "simulator"
endpoint = "http://127.0.0.1:7444"
allow_insecure_simulator = true
[roles]
operator = ["op"]
[store]
backend = "postgres"
url_env = "{URL_VAR}"
{store_extra}
[cluster]
node_id = "n1"
"#,
        dir.join("data").display()
    );
    let path = dir.join(format!("coffre-{}.toml", uuid::Uuid::new_v4().simple()));
    std::fs::write(&path, text).unwrap();
    path
}

/// `coffre store <command> --config CONFIG [--json]` with the URL in the
/// environment.
pub fn coffre_store(command: &str, config: &Path, url: &str, json: bool) -> Output {
    let mut cmd = Command::new(COFFRE);
    cmd.args(["store", command, "--config"])
        .arg(config)
        .env(URL_VAR, url)
        .env("RUST_LOG", "warn");
    if json {
        cmd.arg("--json");
    }
    cmd.output().unwrap()
}

/// Runs it with `--json`, which must succeed; its object.
pub fn store_json(command: &str, config: &Path, url: &str) -> Value {
    let out = coffre_store(command, config, url, true);
    assert!(
        out.status.success(),
        "coffre store {command} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Runs it with `--json`, which must fail: (code, message, all output).
pub fn store_failure(command: &str, config: &Path, url: &str) -> (String, String, String) {
    let out = coffre_store(command, config, url, true);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "coffre store {command} succeeded: {text}"
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {text}"));
    (
        v["error"]["code"].as_str().unwrap().to_string(),
        v["error"]["message"].as_str().unwrap().to_string(),
        text,
    )
}

/// The library's connector for `url` with the settings of `config`.
pub fn connector(config: &Path, url: &str) -> PgConnector {
    let config = Config::load(config).unwrap();
    let coffre::config::StoreConfig::Postgres(store) = &config.store else {
        panic!("not postgres")
    };
    let url = DatabaseUrl::new(Zeroizing::new(url.to_string()), format!("${URL_VAR}"));
    PgConnector::new(&url, store, config.cluster.as_ref().unwrap()).unwrap()
}

/// Whether `db` has a table `name`.
fn has_table(pg: &PgCluster, db: &str, name: &str) -> bool {
    pg.psql(db, &format!("SELECT to_regclass('{name}') IS NOT NULL")) == "t"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
async fn migrate_creates_the_schema_then_finds_it_current() {
    require(&needs::POSTGRES);
    let pg = PgCluster::primary();
    let db = pg.create_database();
    let url = pg.url(&db);
    let config = write_config(pg.dir(), "");

    // Before: no schema, in the status and for serving.
    let status = store_json("status", &config, &url);
    assert_eq!(status["schema"]["state"], "missing", "{status}");
    let c = connector(&config, &url);
    let client = c.connect().await.unwrap();
    let err = check_schema_for_serving(&client, &c).await.unwrap_err();
    assert!(matches!(err, PgError::SchemaMissing { .. }), "{err}");
    assert!(err.to_string().contains("coffre store migrate"), "{err}");

    let started = Instant::now();
    let first = store_json("migrate", &config, &url);
    eprintln!(
        "coffre store migrate (version {LATEST_VERSION}) took {:?}",
        started.elapsed()
    );
    assert_eq!(
        first,
        serde_json::json!({"applied": every_migration(), "version": LATEST_VERSION})
    );
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
        assert!(has_table(&pg, &db, table), "{table} missing");
    }
    assert_eq!(
        pg.psql(
            &db,
            "SELECT count(*), max(key_generation) FROM coffre_cluster"
        ),
        "1|0"
    );
    for m in MIGRATIONS {
        let checksum = pg.psql(
            &db,
            &format!(
                "SELECT checksum FROM schema_migrations WHERE version = {}",
                m.version
            ),
        );
        assert_eq!(checksum, m.checksum(), "migration {}", m.version);
    }

    // Again: nothing to do, in JSON and in words.
    let again = store_json("migrate", &config, &url);
    assert_eq!(
        again,
        serde_json::json!({"applied": [], "version": LATEST_VERSION})
    );
    let out = coffre_store("migrate", &config, &url, false);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("schema is current (version {LATEST_VERSION})")
    );
    assert_eq!(
        pg.psql(&db, "SELECT count(*) FROM schema_migrations"),
        MIGRATIONS.len().to_string()
    );

    let status = store_json("status", &config, &url);
    assert_eq!(status["schema"]["state"], "current", "{status}");
    assert_eq!(status["schema"]["version"], LATEST_VERSION);
    assert_eq!(status["in_recovery"], false);
    assert!(status["server_version_num"].as_i64().unwrap() >= 150_000);
    assert_eq!(status["synchronous_standby_names"], "");
    assert_eq!(status["server_address"], format!("127.0.0.1:{}", pg.port()));
    let out = coffre_store("status", &config, &url, false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("schema: version {LATEST_VERSION} (current)")),
        "{text}"
    );
    assert!(text.contains("the primary"), "{text}");

    // What `coffre serve` will check, and the sessions it will get.
    assert_eq!(
        check_schema_for_serving(&client, &c).await.unwrap(),
        LATEST_VERSION
    );
    let (pool, info) = open_pool(&c).await.unwrap();
    assert!(!info.in_recovery);
    let session = c.get(&pool).await.unwrap();
    for (setting, value) in [
        ("synchronous_commit", "on"),
        ("statement_timeout", "0"),
        ("idle_in_transaction_session_timeout", "30s"),
        ("application_name", "coffre/n1"),
    ] {
        let row = session
            .query_one(&format!("SHOW {setting}"), &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), value, "{setting}");
    }
    assert!(matches!(
        schema_state(&**session, &c).await.unwrap(),
        coffre::store::postgres::SchemaState::Current { version } if version == LATEST_VERSION
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
async fn two_migrations_at_once_apply_the_schema_once() {
    require(&needs::POSTGRES);
    let pg = PgCluster::primary();
    let config = write_config(pg.dir(), "");
    for _round in 0..3 {
        let db = pg.create_database();
        let url = pg.url(&db);
        let spawn = || {
            Command::new(COFFRE)
                .args(["store", "migrate", "--json", "--config"])
                .arg(&config)
                .env(URL_VAR, &url)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (a, b) = (spawn(), spawn());
        // Each migration is its own transaction under the lock, so the
        // two may share the work; together they apply each one once.
        let mut applied = Vec::new();
        for child in [a, b] {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "{out:?}");
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v["version"], LATEST_VERSION, "{v}");
            applied.extend(v["applied"].as_array().unwrap().iter().cloned());
        }
        applied.sort_by_key(|m| m["version"].as_i64());
        assert_eq!(
            Value::Array(applied),
            every_migration(),
            "each migration applied exactly once"
        );
        assert_eq!(
            pg.psql(&db, "SELECT count(*) FROM schema_migrations"),
            MIGRATIONS.len().to_string()
        );
        assert_eq!(pg.psql(&db, "SELECT count(*) FROM coffre_cluster"), "1");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
async fn a_version_1_database_is_migrated_to_the_latest_and_keeps_its_rows() {
    require(&needs::POSTGRES);
    let pg = PgCluster::primary();
    let db = pg.create_database();
    let url = pg.url(&db);
    let config = write_config(pg.dir(), "");
    // A database as coffre's first release with several nodes left it:
    // migration 1 only, and a node registered by that release.
    let first = &MIGRATIONS[0];
    pg.psql(&db, first.sql);
    pg.psql(
        &db,
        &format!(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES (1, 'init', '{}')",
            first.checksum()
        ),
    );
    pg.psql(
        &db,
        "INSERT INTO nodes (node_id, incarnation, started_at, last_seen, binary_version, max_schema) \
         VALUES ('old', gen_random_uuid(), now(), now(), '0.1.0', 1)",
    );

    let status = store_json("status", &config, &url);
    assert_eq!(status["schema"]["state"], "older", "{status}");
    assert_eq!(status["schema"]["version"], 1, "{status}");
    let c = connector(&config, &url);
    let client = c.connect().await.unwrap();
    let err = check_schema_for_serving(&client, &c).await.unwrap_err();
    assert!(
        matches!(err, PgError::SchemaOlder { version: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("coffre store migrate"), "{err}");

    let v = store_json("migrate", &config, &url);
    let later: Vec<Value> = MIGRATIONS[1..]
        .iter()
        .map(|m| serde_json::json!({"version": m.version, "name": m.name}))
        .collect();
    assert_eq!(
        v,
        serde_json::json!({"applied": later, "version": LATEST_VERSION})
    );
    assert_eq!(
        check_schema_for_serving(&client, &c).await.unwrap(),
        LATEST_VERSION
    );
    // The old node's row is kept; it has reported no freshness.
    assert_eq!(
        pg.psql(
            &db,
            "SELECT node_id, feed_generation IS NULL, confirmed_at IS NULL FROM nodes"
        ),
        "old|t|t"
    );
    let out = Command::new(COFFRE)
        .args(["cluster", "status", "--json", "--config"])
        .arg(&config)
        .env(URL_VAR, &url)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["nodes"][0]["node_id"], "old", "{v}");
    assert_eq!(v["nodes"][0]["freshness"], Value::Null, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
async fn a_changed_or_newer_schema_is_refused() {
    require(&needs::POSTGRES);
    let pg = PgCluster::primary();
    let db = pg.create_database();
    let url = pg.url(&db);
    let config = write_config(pg.dir(), "");
    store_json("migrate", &config, &url);
    let c = connector(&config, &url);
    let client = c.connect().await.unwrap();

    // An applied file that is not this binary's.
    pg.psql(
        &db,
        "UPDATE schema_migrations SET checksum = repeat('0', 64) WHERE version = 1",
    );
    for command in ["migrate", "status"] {
        let (code, message, _) = store_failure(command, &config, &url);
        assert_eq!(code, "FAILED_PRECONDITION", "{message}");
        assert!(
            message.contains("migration 1 (init) with checksum 0000"),
            "{message}"
        );
    }
    let err = check_schema_for_serving(&client, &c).await.unwrap_err();
    assert!(
        matches!(err, PgError::ChecksumMismatch { version: 1, .. }),
        "{err}"
    );
    let real = MIGRATIONS[0].checksum();
    pg.psql(
        &db,
        &format!("UPDATE schema_migrations SET checksum = '{real}' WHERE version = 1"),
    );

    // A version this binary does not know: a newer coffre migrated it.
    pg.psql(
        &db,
        &format!(
            "INSERT INTO schema_migrations (version, name, checksum) \
             VALUES ({}, 'future', 'x')",
            LATEST_VERSION + 1
        ),
    );
    let (code, message, _) = store_failure("migrate", &config, &url);
    assert_eq!(code, "FAILED_PRECONDITION", "{message}");
    assert!(
        message.contains(&format!(
            "schema version {}, newer than this coffre knows ({LATEST_VERSION})",
            LATEST_VERSION + 1
        )),
        "{message}"
    );
    let status = store_json("status", &config, &url);
    assert_eq!(status["schema"]["state"], "newer", "{status}");
    assert_eq!(status["schema"]["version"], LATEST_VERSION + 1);
    let err = check_schema_for_serving(&client, &c).await.unwrap_err();
    assert!(
        matches!(
            err,
            PgError::SchemaNewer {
                version,
                known: LATEST_VERSION,
                ..
            } if version == LATEST_VERSION + 1
        ),
        "{err}"
    );
    assert_eq!(
        pg.psql(&db, "SELECT count(*) FROM schema_migrations"),
        (MIGRATIONS.len() + 1).to_string()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
async fn connection_failures_are_clear_and_never_show_the_password() {
    require(&needs::POSTGRES);
    const RIGHT: &str = "C0rrect-S3cret-7f1d";
    const WRONG: &str = "Wr0ng-S3cret-9c2e";
    let pg = PgCluster::builder().password(RIGHT).start();
    let db = pg.create_database();
    let port = pg.port();
    let config = write_config(pg.dir(), "");
    let url = |password: &str, port: u16, db: &str| {
        format!("postgresql://coffre:{password}@127.0.0.1:{port}/{db}?sslmode=disable")
    };
    let closed = free_port();
    for (what, url, code, words) in [
        (
            "bad syntax",
            format!("postgresql://coffre:{WRONG}@127.0.0.1:notaport/{db}?sslmode=disable"),
            "INVALID_ARGUMENT",
            "is not a valid PostgreSQL connection string",
        ),
        (
            "not a URL",
            format!("mysql://coffre:{WRONG}@127.0.0.1/{db}"),
            "INVALID_ARGUMENT",
            "is not a PostgreSQL connection string",
        ),
        (
            "no sslmode",
            format!("postgresql://coffre:{WRONG}@127.0.0.1:{port}/{db}"),
            "INVALID_ARGUMENT",
            "sets no sslmode",
        ),
        (
            "sslmode=prefer",
            format!("postgresql://coffre:{WRONG}@127.0.0.1:{port}/{db}?sslmode=prefer"),
            "INVALID_ARGUMENT",
            "falls back to plain TCP",
        ),
        (
            "a closed port",
            url(WRONG, closed, &db),
            "UNAVAILABLE",
            &format!("cannot reach PostgreSQL at postgresql://coffre:***@127.0.0.1:{closed}/"),
        ),
        (
            "a refused password",
            url(WRONG, port, &db),
            "UNAUTHENTICATED",
            "refused the login of user \"coffre\": password authentication failed",
        ),
        (
            "no password",
            format!("postgresql://coffre@127.0.0.1:{port}/{db}?sslmode=disable"),
            "UNAUTHENTICATED",
            "password missing",
        ),
        (
            "a missing database",
            url(RIGHT, port, "nosuchdb"),
            "NOT_FOUND",
            "has no database \"nosuchdb\"",
        ),
    ] {
        let started = Instant::now();
        let (got, message, text) = store_failure("migrate", &config, &url);
        assert_eq!(got, code, "{what}: {text}");
        assert!(message.contains(words), "{what}: {message}");
        assert!(
            !text.contains(RIGHT) && !text.contains(WRONG),
            "{what}: {text}"
        );
        assert!(
            started.elapsed().as_secs() < 10,
            "{what}: {:?}",
            started.elapsed()
        );
    }
    // The URL from a file that others may read is refused before use.
    let file = pg.dir().join("db.url");
    std::fs::write(&file, url(RIGHT, port, &db)).unwrap();
    let file_config = {
        let text = std::fs::read_to_string(&config).unwrap().replace(
            &format!("url_env = \"{URL_VAR}\""),
            &format!("url_file = \"{}\"", file.display()),
        );
        let path = pg.dir().join("file.toml");
        std::fs::write(&path, text).unwrap();
        path
    };
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, message, text) = store_failure("migrate", &file_config, "unused");
    assert_eq!(code, "INVALID_ARGUMENT", "{text}");
    assert!(message.contains("chmod 600"), "{message}");
    assert!(!text.contains(RIGHT), "{text}");
    // Nothing was written by any of them.
    assert!(!has_table(&pg, &db, "schema_migrations"));

    // With the right password, from the private file, it works.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let v = store_json("migrate", &file_config, "unused");
    assert_eq!(v["version"], LATEST_VERSION, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
async fn a_standby_is_refused_until_promoted() {
    require(&needs::POSTGRES);
    let primary = PgCluster::primary();
    let db = primary.create_database();
    let started = Instant::now();
    let standby = primary.standby("s1");
    eprintln!(
        "pg_basebackup and standby start took {:?}",
        started.elapsed()
    );
    let url = standby.url(&db);
    let config = write_config(standby.dir(), "");

    let (code, message, _) = store_failure("migrate", &config, &url);
    assert_eq!(code, "FAILED_PRECONDITION", "{message}");
    assert!(
        message.contains(&format!(
            "(server 127.0.0.1:{}) is in recovery, a standby",
            standby.port()
        )),
        "{message}"
    );
    let status = store_json("status", &config, &url);
    assert_eq!(status["in_recovery"], true, "{status}");
    assert_eq!(status["schema"]["state"], "missing", "{status}");
    assert!(!has_table(&primary, &db, "schema_migrations"));
    let c = connector(&config, &url);
    let err = open_pool(&c).await.unwrap_err();
    assert!(matches!(err, PgError::InRecovery { .. }), "{err}");

    // A primary without a synchronous standby, when one is required.
    let strict = primary.dir().join("strict.toml");
    std::fs::write(
        &strict,
        std::fs::read_to_string(&config).unwrap().replace(
            "node_id = \"n1\"",
            "node_id = \"n1\"\nrequire_synchronous_standby = true",
        ),
    )
    .unwrap();
    let c = connector(&strict, &primary.url(&db));
    let err = open_pool(&c).await.unwrap_err();
    assert!(matches!(err, PgError::NoSynchronousStandby { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("synchronous_standby_names is empty"),
        "{err}"
    );
    primary.require_synchronous_standby("s1");
    let (_pool, info) = open_pool(&c).await.unwrap();
    assert_eq!(info.synchronous_standby_names, "ANY 1 (s1)");
    // Commits wait for s1, which confirms them.
    primary.psql(&db, "CREATE TABLE replicated (x int)");
    assert_eq!(
        primary.psql(
            "postgres",
            "SELECT sync_state FROM pg_stat_replication WHERE application_name = 's1'"
        ),
        "quorum"
    );

    // Promoted, it is a primary: migrate works there.
    standby.promote();
    let v = store_json("migrate", &config, &url);
    assert_eq!(v["version"], LATEST_VERSION, "{v}");
    assert!(
        !has_table(&primary, &db, "schema_migrations"),
        "the old primary untouched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
async fn tls_verify_full_against_the_servers_ca_and_not_another() {
    require(&needs::POSTGRES);
    let pg = PgCluster::builder().tls().start();
    let db = pg.create_database();
    let ca = pg.ca_file().unwrap().to_path_buf();
    let url = format!(
        "postgresql://coffre@127.0.0.1:{}/{db}?sslmode=verify-full",
        pg.port()
    );
    let config = write_config(pg.dir(), &format!("ca_file = \"{}\"", ca.display()));
    let v = store_json("migrate", &config, &url);
    assert_eq!(v["version"], LATEST_VERSION, "{v}");
    // The sessions are TLS.
    let c = connector(&config, &url);
    let client = c.connect().await.unwrap();
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
    // localhost is in the certificate too; no sslmode with a CA is verify-full.
    let by_name = format!("postgresql://coffre@localhost:{}/{db}", pg.port());
    assert_eq!(
        store_json("status", &config, &by_name)["schema"]["state"],
        "current"
    );

    // Another CA: refused in the handshake.
    let other = pg.dir().join("other-ca.pem");
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    std::fs::write(&other, cert.cert.pem()).unwrap();
    let wrong = write_config(pg.dir(), &format!("ca_file = \"{}\"", other.display()));
    let (code, message, _) = store_failure("status", &wrong, &url);
    assert_eq!(code, "UNAVAILABLE", "{message}");
    assert!(message.contains("TLS with PostgreSQL at"), "{message}");
    assert!(message.contains("UnknownIssuer"), "{message}");
    // And a CA file that is not one.
    std::fs::write(&other, "not PEM").unwrap();
    let (code, message, _) = store_failure("status", &wrong, &url);
    assert_eq!(code, "INVALID_ARGUMENT", "{message}");
    assert!(message.contains("store.ca_file"), "{message}");
}

#[test]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
fn the_harness_kills_restarts_and_stops_its_server() {
    require(&needs::POSTGRES);
    let mut pg = PgCluster::builder().fsync().start();
    let db = pg.create_database();
    pg.psql(&db, "CREATE TABLE t (x int); INSERT INTO t VALUES (1)");
    let pid = pg.pid().unwrap();
    pg.kill();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(" Z ")),
        "the postmaster is gone"
    );
    let started = Instant::now();
    pg.start();
    eprintln!(
        "restart after SIGKILL (crash recovery) took {:?}",
        started.elapsed()
    );
    assert_eq!(pg.psql(&db, "SELECT x FROM t"), "1");
    pg.stop_fast();
    pg.start();
    assert_eq!(pg.psql(&db, "SELECT count(*) FROM t"), "1");
}

/// Every migration of this binary, as `coffre store migrate --json` lists
/// those it applied.
fn every_migration() -> Value {
    MIGRATIONS
        .iter()
        .map(|m| serde_json::json!({"version": m.version, "name": m.name}))
        .collect()
}
