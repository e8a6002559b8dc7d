//! `coffre store copy --from sled:DIR --config FILE` with the real
//! binaries: a sled store made by a real `coffre serve` (on one
//! `hsm-sim serve`) with keys in every state a copy must keep (enabled,
//! disabled, pending deletion, rotated) and a pending approval, copied into
//! a new PostgreSQL database; then `coffre serve` on that database, on the
//! same HSM, opens data keys wrapped before the copy and sees every state
//! and the approval. Refused, with nothing changed: a copy while the sled
//! store is open, and a copy into a database that is not empty.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use coffre::grpc::pb;
use coffre::grpc::pb::approval_service_client::ApprovalServiceClient;
use serde_json::Value;

use crate::common::binary::{COFFRE, Guard, HSM_PIN, free_port, spawn_ready, start_hsm};
use crate::common::clients::{Clients, generate_request};
use crate::common::pg::PgCluster;
use crate::common::{REASON, channel_as, ctx, needs, require};

const URL_VAR: &str = "COFFRE_TEST_DATABASE_URL";
const CONTEXT: [(&str, &str); 1] = [("tenant", "t1")];

/// A server configuration in `dir/name.toml`, its data in `dir/name`:
/// sled (`node` None) or a node of the PostgreSQL store. CancelKeyDeletion
/// needs two operators, so that cancelling leaves a pending approval.
fn write_config(dir: &Path, pki: &Path, name: &str, node: Option<&str>, hsm_port: u16) -> PathBuf {
    write_config_with(dir, pki, name, node, hsm_port, None)
}

/// [`write_config`], with a metrics listener on `metrics` if given.
fn write_config_with(
    dir: &Path,
    pki: &Path,
    name: &str,
    node: Option<&str>,
    hsm_port: u16,
    metrics: Option<SocketAddr>,
) -> PathBuf {
    let store = match node {
        Some(node) => format!(
            "[store]\nbackend = \"postgres\"\nurl_env = \"{URL_VAR}\"\npool_size = 4\n\n\
             [cluster]\nnode_id = \"{node}\"\n"
        ),
        None => String::new(),
    };
    let metrics = metrics
        .map(|addr| format!("metrics_listen = \"{addr}\"\n"))
        .unwrap_or_default();
    let config = format!(
        r#"
{metrics}listen = "127.0.0.1:0"
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
operator = ["spiffe://coffre.dev/operator", "spiffe://coffre.dev/operator-2"]
service = ["spiffe://coffre.dev/service"]
auditor = ["spiffe://coffre.dev/auditor"]

[quorum]
approvals_required = 1
[quorum.operations]
CancelKeyDeletion = 2

{store}"#,
        data = dir.join(name).display(),
        pki = pki.display(),
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    path
}

fn start(config: &Path, url: &str) -> (Guard, String) {
    let mut cmd = Command::new(COFFRE);
    cmd.args(["serve", "--config"])
        .arg(config)
        .env(URL_VAR, url)
        .env("COFFRE_HSM_PIN", HSM_PIN)
        .env("RUST_LOG", "warn");
    let (guard, addr) = spawn_ready(cmd, "coffre listening on ");
    (guard, format!("https://{addr}"))
}

fn terminate(node: &mut Guard) {
    let sent = Command::new("kill")
        .args(["-TERM", &node.0.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = node.0.wait().unwrap();
    assert!(status.success(), "coffre serve stopped with {status}");
}

fn store_cmd(args: &[&str], config: &Path, url: &str) -> Output {
    Command::new(COFFRE)
        .arg("store")
        .args(args)
        .arg("--config")
        .arg(config)
        .env(URL_VAR, url)
        .output()
        .unwrap()
}

fn copy(from: &Path, config: &Path, url: &str) -> Output {
    let source = format!("sled:{}", from.display());
    store_cmd(&["copy", "--from", &source, "--json"], config, url)
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `--json` output: the error object of a failure, or the report.
fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(out)))
}

/// Row counts of the tables a copy writes, as the database holds them.
fn counts(pg: &PgCluster, db: &str) -> String {
    pg.psql(
        db,
        "SELECT (SELECT count(*) FROM keys) || ' ' || (SELECT count(*) FROM key_versions) || ' ' \
         || (SELECT count(*) FROM approvals) || ' ' || (SELECT count(*) FROM service_secrets) \
         || ' ' || (SELECT key_generation FROM coffre_cluster)",
    )
    .trim()
    .to_string()
}

fn db_name(url: &str) -> &str {
    url.rsplit('/')
        .next()
        .and_then(|s| s.split('?').next())
        .unwrap()
}

async fn key(clients: &mut Clients, alias: &str) -> pb::KeyMetadata {
    clients
        .keys
        .get_key(pb::GetKeyRequest {
            key_id: alias.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap()
}

async fn decrypts(clients: &mut Clients, dk: &pb::GenerateDataKeyResponse) {
    let out = clients
        .data
        .decrypt(pb::DecryptRequest {
            ciphertext_blob: dk.ciphertext_blob.clone(),
            encryption_context: ctx(&CONTEXT),
            justification: REASON,
            key_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.plaintext, dk.plaintext);
    assert_eq!(out.key_version, dk.key_version);
}

async fn pending_approvals(endpoint: &str, pki: &Path) -> Vec<pb::Approval> {
    let mut approvals = ApprovalServiceClient::new(channel_as(endpoint, pki, "operator").await);
    approvals
        .list_approvals(pb::ListApprovalsRequest {
            include_closed: false,
        })
        .await
        .unwrap()
        .into_inner()
        .approvals
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
async fn a_sled_store_copied_serves_on_postgres() {
    require(&needs::POSTGRES);
    let dir = tempfile::tempdir().unwrap();
    let mut pg = PgCluster::primary();
    let url = pg.url(&pg.create_database());
    let db = db_name(&url).to_string();
    coffre::pki::ensure_dev_pki(dir.path()).unwrap();
    let pki = dir.path().join("pki");
    let hsm_port = free_port();
    let _hsm = start_hsm(&dir.path().join("hsm.state"), hsm_port);
    let single = write_config(dir.path(), &pki, "single", None, hsm_port);
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let node = write_config_with(dir.path(), &pki, "n1", Some("n1"), hsm_port, Some(metrics));
    let sled_dir = dir.path().join("single");
    let out = store_cmd(&["migrate"], &node, &url);
    assert!(out.status.success(), "migrate: {}", text(&out));

    // The single server on sled: a key in each state, data keys wrapped
    // under them, and a pending approval.
    let (mut server, endpoint) = start(&single, &url);
    let mut c = Clients::connect(&endpoint, &pki).await;
    let (_, dk_enabled) = c.key_with_data_key("enabled", &CONTEXT).await.unwrap();
    let (_, dk_disabled) = c.key_with_data_key("disabled", &CONTEXT).await.unwrap();
    c.keys
        .disable_key(pb::DisableKeyRequest {
            key_id: "disabled".into(),
        })
        .await
        .unwrap();
    c.create_key("pending").await.unwrap();
    c.keys
        .schedule_key_deletion(pb::ScheduleKeyDeletionRequest {
            key_id: "pending".into(),
            pending_window_days: 7,
        })
        .await
        .unwrap();
    let held = c
        .keys
        .cancel_key_deletion(pb::CancelKeyDeletionRequest {
            key_id: "pending".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!held.pending_approval_id.is_empty(), "{held:?}");
    let (_, dk_v1) = c.key_with_data_key("rotated", &CONTEXT).await.unwrap();
    c.keys
        .rotate_key(pb::RotateKeyRequest {
            key_id: "rotated".into(),
        })
        .await
        .unwrap();
    let dk_v2 = c
        .data
        .generate_data_key(generate_request("rotated", &CONTEXT))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((dk_v1.key_version, dk_v2.key_version), (1, 2));
    let approvals_before = pending_approvals(&endpoint, &pki).await;
    assert_eq!(approvals_before.len(), 1);

    // While the server holds the sled store: refused, nothing written.
    let busy = copy(&sled_dir, &node, &url);
    assert!(
        !busy.status.success(),
        "copied a store in use: {}",
        text(&busy)
    );
    let error = json_of(&busy);
    assert_eq!(error["error"]["code"], "FAILED_PRECONDITION", "{error}");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("in use by another coffre process"),
        "{message}"
    );
    assert_eq!(counts(&pg, &db), "0 0 0 0 0");

    drop(c);
    terminate(&mut server);

    // Offline: copied, every count reported.
    let copied = copy(&sled_dir, &node, &url);
    assert!(copied.status.success(), "copy: {}", text(&copied));
    let report = json_of(&copied);
    assert_eq!(report["copied"]["keys"], 4, "{report}");
    assert_eq!(report["copied"]["versions"], 5, "{report}");
    assert_eq!(report["copied"]["approvals"], 1, "{report}");
    assert_eq!(
        report["skipped_secrets"],
        serde_json::json!(["audit-high-water-mark"]),
        "{report}"
    );
    let target = report["to"].as_str().unwrap();
    assert!(!target.contains("password"), "{target}");
    let after = counts(&pg, &db);
    let expected = format!(
        "4 5 1 {} {}",
        report["copied"]["secrets"], report["copied"]["generation"]
    );
    assert_eq!(after, expected);

    // A second copy into the same (now not empty) database: refused,
    // nothing changed.
    let again = copy(&sled_dir, &node, &url);
    assert!(!again.status.success(), "copied twice: {}", text(&again));
    let error = json_of(&again);
    assert_eq!(error["error"]["code"], "FAILED_PRECONDITION", "{error}");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains("is not empty"), "{message}");
    assert_eq!(counts(&pg, &db), after);

    // coffre serve on PostgreSQL: every state, every version, the
    // approval, and the data keys wrapped before the copy.
    let (_node, endpoint) = start(&node, &url);
    let mut c = Clients::connect(&endpoint, &pki).await;
    let state = |k: &pb::KeyMetadata| pb::KeyState::try_from(k.state).unwrap();
    assert_eq!(state(&key(&mut c, "enabled").await), pb::KeyState::Enabled);
    assert_eq!(
        state(&key(&mut c, "disabled").await),
        pb::KeyState::Disabled
    );
    assert_eq!(
        state(&key(&mut c, "pending").await),
        pb::KeyState::PendingDeletion
    );
    let rotated = key(&mut c, "rotated").await;
    assert_eq!(
        (state(&rotated), rotated.primary_version),
        (pb::KeyState::Enabled, 2)
    );
    for dk in [&dk_enabled, &dk_v1, &dk_v2] {
        decrypts(&mut c, dk).await;
    }
    let refused = c
        .data
        .decrypt(pb::DecryptRequest {
            ciphertext_blob: dk_disabled.ciphertext_blob.clone(),
            encryption_context: ctx(&CONTEXT),
            justification: REASON,
            key_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    let approvals_after = pending_approvals(&endpoint, &pki).await;
    assert_eq!(approvals_after.len(), 1);
    assert_eq!(
        approvals_after[0].approval_id,
        approvals_before[0].approval_id
    );
    // New writes continue the copied change feed.
    c.create_key("after-copy").await.unwrap();
    let generation: u64 = pg
        .psql(&db, "SELECT key_generation FROM coffre_cluster")
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        generation,
        report["copied"]["generation"].as_u64().unwrap() + 1
    );

    // The node's cluster metrics, over its real metrics listener: it
    // holds the scheduler's lease (alone, it takes it at its first pass),
    // its pool, and no database error yet.
    let page = wait_for_metric(
        metrics,
        "coffre_cluster_lease_holder{lease=\"scheduler\"} 1\n",
    );
    for line in [
        "coffre_cluster_lease_holder{lease=\"root-rotation\"} 0\n",
        "coffre_store_pool_max_connections 4\n",
        "coffre_store_errors_total{kind=\"unavailable\"} 0\n",
        "coffre_store_pool_waiters 0\n",
    ] {
        assert!(page.contains(line), "{line:?} missing from {page}");
    }
    assert!(
        page.contains("coffre_store_pool_connections{state=\"in_use\"} "),
        "{page}"
    );
    // The database stops: a store call fails, and is counted.
    pg.stop_fast();
    let failed = c.create_key("while-down").await;
    assert!(failed.is_err(), "created a key with the database down");
    let page = wait_for_metric(metrics, "coffre_store_errors_total{kind=\"unavailable\"} ");
    let counted = page
        .lines()
        .find_map(|l| l.strip_prefix("coffre_store_errors_total{kind=\"unavailable\"} "))
        .and_then(|n| n.trim().parse::<f64>().ok())
        .unwrap();
    assert!(counted >= 1.0, "{page}");
}

/// The metrics page once it contains `line` (within 10 s).
fn wait_for_metric(addr: SocketAddr, line: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, page) = crate::observability::http_get(addr, "/metrics");
        if page.contains(line) || Instant::now() > deadline {
            assert!(page.contains(line), "{line:?} not in {page}");
            return page;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The copy's rate: a sled store of 10,000 keys (`COFFRE_COPY_KEYS` to
/// change) made by `coffre dev --preload-keys`, copied into a PostgreSQL
/// server with `fsync = on`. A measurement, not a check of a bound:
/// `cargo test --test tests postgres_copy::copy_rate -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement: run with --ignored --nocapture"]
fn copy_rate() {
    require(&needs::POSTGRES);
    let keys: u64 = std::env::var("COFFRE_COPY_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dev");
    let made = std::time::Instant::now();
    let (mut dev, _) =
        crate::common::binary::start_dev_with(&data, &["--preload-keys", &keys.to_string()]);
    terminate(&mut dev);
    eprintln!("a sled store of {keys} keys made in {:?}", made.elapsed());
    let pg = PgCluster::builder().fsync().start();
    let url = pg.url(&pg.create_database());
    let node = write_config(dir.path(), &data.join("pki"), "n1", Some("n1"), free_port());
    let out = store_cmd(&["migrate"], &node, &url);
    assert!(out.status.success(), "migrate: {}", text(&out));
    let started = std::time::Instant::now();
    let out = copy(&data, &node, &url);
    let wall = started.elapsed();
    assert!(out.status.success(), "copy: {}", text(&out));
    let report = json_of(&out);
    assert_eq!(report["copied"]["keys"], keys, "{report}");
    assert_eq!(report["copied"]["versions"], keys, "{report}");
    eprintln!(
        "copied {keys} keys: {:.2} s inside the command ({:.0} keys/s), {:.2} s for the whole \
         process ({:.0} keys/s)",
        report["seconds"].as_f64().unwrap(),
        report["keys_per_second"].as_f64().unwrap(),
        wall.as_secs_f64(),
        keys as f64 / wall.as_secs_f64()
    );
}
