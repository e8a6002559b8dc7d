//! `coffre serve` on the PostgreSQL store, as a cluster runs it: one
//! database (a private server, `common::pg`), one `hsm-sim serve`, and two
//! `coffre serve` processes (nodes n1 and n2, each with its own data
//! directory for its audit log, the same PKI). A key made through one node
//! serves through the other, a data key made on one opens on the other,
//! and both restarts keep everything; a database without coffre's schema
//! is refused at start, with nothing written.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use coffre::grpc::pb;

use crate::common::binary::{COFFRE, Guard, HSM_PIN, free_port, spawn_ready, start_hsm};
use crate::common::clients::{Clients, generate_request};
use crate::common::pg::PgCluster;
use crate::common::{REASON, ctx, needs, require};

const URL_VAR: &str = "COFFRE_TEST_DATABASE_URL";

/// Node `node`'s configuration in `dir/node`, sharing `pki` and the HSM.
fn write_config(dir: &Path, pki: &Path, node: &str, hsm_port: u16) -> PathBuf {
    let config = format!(
        r#"
listen = "127.0.0.1:0"
data_dir = "{data}"
allow_root = true
allow_single_operator = true

[tls]
cert = "{pki}/server.pem"
key = "{pki}/server-key.pem"
operator_ca = "{pki}/operator-ca.pem"
service_ca = "{pki}/service-ca.pem"
auditor_ca = "{pki}/auditor-ca.pem"

[hsm]
backend = "simulator"
endpoint = "http://127.0.0.1:{hsm_port}"
pin_env = "COFFRE_HSM_PIN"
timeout_ms = 2000
allow_insecure_simulator = true

[default_key_policy]
grants = [{{ principal = "spiffe://coffre.dev/service", operations = ["GenerateDataKey", "Decrypt"] }}]

[roles]
operator = ["spiffe://coffre.dev/operator"]
service = ["spiffe://coffre.dev/service"]
auditor = ["spiffe://coffre.dev/auditor"]

[store]
backend = "postgres"
url_env = "{URL_VAR}"
pool_size = 4

[cluster]
node_id = "{node}"
"#,
        data = dir.join(node).join("data").display(),
        pki = pki.display(),
    );
    let path = dir.join(format!("{node}.toml"));
    std::fs::write(&path, config).unwrap();
    path
}

fn serve_command(config: &Path, url: &str) -> Command {
    let mut cmd = Command::new(COFFRE);
    cmd.args(["serve", "--config"])
        .arg(config)
        .env(URL_VAR, url)
        .env("COFFRE_HSM_PIN", HSM_PIN)
        .env("RUST_LOG", "warn");
    cmd
}

fn start_node(config: &Path, url: &str) -> (Guard, String) {
    let started = Instant::now();
    let (guard, addr) = spawn_ready(serve_command(config, url), "coffre listening on ");
    eprintln!("{} ready in {:?}", config.display(), started.elapsed());
    (guard, format!("https://{addr}"))
}

fn migrate(config: &Path, url: &str) {
    let out = Command::new(COFFRE)
        .args(["store", "migrate", "--config"])
        .arg(config)
        .env(URL_VAR, url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "coffre store migrate: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn aliases(clients: &mut Clients) -> Vec<String> {
    let listed = clients
        .keys
        .list_keys(pb::ListKeysRequest::default())
        .await
        .unwrap()
        .into_inner();
    listed.keys.into_iter().map(|k| k.alias).collect()
}

fn decrypt_request(blob: &[u8]) -> pb::DecryptRequest {
    pb::DecryptRequest {
        ciphertext_blob: blob.to_vec(),
        encryption_context: ctx(&[("tenant", "t1")]),
        justification: REASON,
        key_id: String::new(),
    }
}

async fn decrypts(clients: &mut Clients, dk: &pb::GenerateDataKeyResponse) {
    let out = clients
        .data
        .decrypt(decrypt_request(&dk.ciphertext_blob))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.plaintext, dk.plaintext);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
async fn two_nodes_serve_one_database() {
    require(&needs::POSTGRES);
    let dir = tempfile::tempdir().unwrap();
    let pg = PgCluster::primary();
    let url = pg.url(&pg.create_database());
    coffre::pki::ensure_dev_pki(dir.path()).unwrap();
    let pki = dir.path().join("pki");
    let hsm_port = free_port();
    let _hsm = start_hsm(&dir.path().join("hsm.state"), hsm_port);
    let c1 = write_config(dir.path(), &pki, "n1", hsm_port);
    let c2 = write_config(dir.path(), &pki, "n2", hsm_port);
    migrate(&c1, &url);

    let (n1, e1) = start_node(&c1, &url);
    let (n2, e2) = start_node(&c2, &url);
    let mut on1 = Clients::connect(&e1, &pki).await;
    let mut on2 = Clients::connect(&e2, &pki).await;
    let context = [("tenant", "t1")];

    // A key made through n1 is listed and used through n2.
    let (key, dk1) = on1.key_with_data_key("shared", &context).await.unwrap();
    assert_eq!(aliases(&mut on2).await, vec!["shared".to_string()]);
    let dk2 = on2
        .data
        .generate_data_key(generate_request(&key.key_id, &context))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dk2.key_version, 1);
    // Data keys open on the other node.
    decrypts(&mut on2, &dk1).await;
    decrypts(&mut on1, &dk2).await;
    // A key made through n2 serves on n1 too.
    let (_, dk3) = on2.key_with_data_key("second", &context).await.unwrap();
    decrypts(&mut on1, &dk3).await;

    // Both stop (SIGTERM: a final checkpoint each) and start again:
    // everything is still there.
    drop((on1, on2));
    for mut node in [n1, n2] {
        terminate(&mut node);
    }
    let (_n1, e1) = start_node(&c1, &url);
    let (_n2, e2) = start_node(&c2, &url);
    let mut on1 = Clients::connect(&e1, &pki).await;
    let mut on2 = Clients::connect(&e2, &pki).await;
    for clients in [&mut on1, &mut on2] {
        let mut listed = aliases(clients).await;
        listed.sort();
        assert_eq!(listed, vec!["second".to_string(), "shared".to_string()]);
        for dk in [&dk1, &dk2, &dk3] {
            decrypts(clients, dk).await;
        }
    }
    // The nodes' audit logs are their own.
    for node in ["n1", "n2"] {
        assert!(
            dir.path().join(node).join("data/audit.log").is_file(),
            "{node} has no audit log"
        );
    }
    // A key disabled through n1 is refused by n2 within the freshness
    // bound (1 s by default), though n2 had it cached.
    on2.data
        .generate_data_key(generate_request("shared", &context))
        .await
        .unwrap();
    on1.keys
        .disable_key(pb::DisableKeyRequest {
            key_id: "shared".into(),
        })
        .await
        .unwrap();
    let disabled = Instant::now();
    loop {
        match on2
            .data
            .generate_data_key(generate_request("shared", &context))
            .await
        {
            Err(e) if e.code() == tonic::Code::FailedPrecondition => break,
            other => assert!(
                disabled.elapsed().as_millis() < 1_500,
                "n2 still serves a key disabled through n1 {:?} ago: {other:?}",
                disabled.elapsed()
            ),
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    eprintln!(
        "n2 refused the disabled key {:?} after n1's OK",
        disabled.elapsed()
    );
    // Each node's audit log has its own high-water mark in the store.
    assert_eq!(
        pg.psql(
            db_name(&url),
            "SELECT string_agg(name, ',' ORDER BY name) FROM service_secrets \
             WHERE name LIKE 'audit-high-water-mark%'"
        ),
        "audit-high-water-mark/n1,audit-high-water-mark/n2"
    );
    // The database holds the records; no node made a sled store.
    assert_eq!(pg_count(&pg, &url, "keys"), "2");
    for node in ["n1", "n2"] {
        assert!(!dir.path().join(node).join("data/store").exists());
    }
}

/// SIGTERM, and wait for the process to exit (cleanly).
fn terminate(node: &mut Guard) {
    let sent = Command::new("kill")
        .args(["-TERM", &node.0.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = node.0.wait().unwrap();
    assert!(status.success(), "a node stopped with {status}");
}

/// The database a harness URL names.
fn db_name(url: &str) -> &str {
    url.rsplit('/')
        .next()
        .and_then(|s| s.split('?').next())
        .unwrap()
}

fn pg_count(pg: &PgCluster, url: &str, table: &str) -> String {
    pg.psql(db_name(url), &format!("SELECT count(*) FROM {table}"))
}

#[test]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
fn serve_refuses_a_database_without_coffres_schema() {
    require(&needs::POSTGRES);
    let dir = tempfile::tempdir().unwrap();
    let pg = PgCluster::primary();
    let url = pg.url(&pg.create_database());
    coffre::pki::ensure_dev_pki(dir.path()).unwrap();
    let hsm_port = free_port();
    let _hsm = start_hsm(&dir.path().join("hsm.state"), hsm_port);
    let config = write_config(dir.path(), &dir.path().join("pki"), "n1", hsm_port);
    let started = Instant::now();
    let out = serve_command(&config, &url).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("has no coffre schema")
            && stderr.contains("coffre store migrate --config FILE"),
        "{stderr}"
    );
    assert!(started.elapsed().as_secs() < 20, "{:?}", started.elapsed());
    assert!(
        !dir.path().join("n1").exists(),
        "a refused start wrote its data directory"
    );
    // Nothing in the database either.
    assert_eq!(
        pg.psql(
            db_name(&url),
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ),
        "0"
    );
}

#[test]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
fn serve_refuses_an_unreachable_server_a_refused_login_and_a_standby() {
    require(&needs::POSTGRES);
    const RIGHT: &str = "C0rrect-S3cret-4b1e";
    const WRONG: &str = "Wr0ng-S3cret-6d0a";
    let dir = tempfile::tempdir().unwrap();
    let locked = PgCluster::builder().password(RIGHT).start();
    let db = locked.create_database();
    let url = |password: &str, port: u16| {
        format!("postgresql://coffre:{password}@127.0.0.1:{port}/{db}?sslmode=disable")
    };
    let m = write_config(dir.path(), &dir.path().join("pki"), "m", free_port());
    migrate(&m, &url(RIGHT, locked.port()));
    // A standby of a migrated primary (trust logins: pg_basebackup asks
    // for no password).
    let primary = PgCluster::primary();
    let primary_db = primary.create_database();
    migrate(&m, &primary.url(&primary_db));
    let standby = primary.standby("s1");
    coffre::pki::ensure_dev_pki(dir.path()).unwrap();
    let hsm_port = free_port();
    let _hsm = start_hsm(&dir.path().join("hsm.state"), hsm_port);
    let config = write_config(dir.path(), &dir.path().join("pki"), "n1", hsm_port);
    let closed = free_port();
    for (what, url, words) in [
        (
            "a closed port",
            url(RIGHT, closed),
            format!("cannot reach PostgreSQL at postgresql://coffre:***@127.0.0.1:{closed}/"),
        ),
        (
            "a refused password",
            url(WRONG, locked.port()),
            "refused the login of user \"coffre\": password authentication failed".to_string(),
        ),
        (
            "a standby",
            standby.url(&primary_db),
            format!(
                "(server 127.0.0.1:{}) is in recovery, a standby",
                standby.port()
            ),
        ),
    ] {
        let started = Instant::now();
        let out = serve_command(&config, &url).output().unwrap();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{what}: {all}");
        assert!(all.contains(&words), "{what}: {all}");
        for password in [RIGHT, WRONG] {
            assert!(!all.contains(password), "{what} shows a password: {all}");
        }
        assert!(
            started.elapsed().as_secs() < 20,
            "{what}: {:?}",
            started.elapsed()
        );
        assert!(
            !dir.path().join("n1").exists(),
            "{what}: a refused start wrote its data directory"
        );
    }
}
