//! `PgCoordination` against a real PostgreSQL server (issue #17): leases
//! held by one node at a time and judged by the database's clock, renewal
//! by the holder, takeover after expiry with a new token, release; the
//! node registry; and the change feed's NOTIFY waking a waiting node.

use std::sync::Arc;
use std::time::{Duration, Instant};

use coffre::cluster::postgres::{CHANGES_CHANNEL, PgCoordination};
use coffre::cluster::{Coordination, FreshnessReport};

use crate::common::pg::PgCluster;
use crate::common::{needs, require};
use crate::postgres_store::{connector, store_json, write_config};

/// A migrated database on `pg`, and two coordinations on it (nodes n1, n2).
fn two_nodes(pg: &PgCluster) -> (PgCoordination, PgCoordination, String) {
    let db = pg.create_database();
    let url = pg.url(&db);
    let config = write_config(pg.dir(), "");
    store_json("migrate", &config, &url);
    let c = Arc::new(connector(&config, &url));
    (
        PgCoordination::new(Arc::clone(&c), "n1", uuid::Uuid::new_v4()),
        PgCoordination::new(c, "n2", uuid::Uuid::new_v4()),
        db,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
async fn a_lease_is_held_by_one_node_at_a_time() {
    require(&needs::POSTGRES);
    let pg = PgCluster::primary();
    let (n1, n2, _) = two_nodes(&pg);
    let ttl = Duration::from_millis(1_500);

    let first = n1
        .acquire("scheduler", ttl)
        .await
        .unwrap()
        .expect("n1 takes it");
    assert!(first.is_valid());
    assert_eq!(
        n2.acquire("scheduler", ttl).await.unwrap(),
        None,
        "held by n1"
    );
    // The holder renews; the token stays.
    let renewed = n1.acquire("scheduler", ttl).await.unwrap().unwrap();
    assert_eq!(renewed.token, first.token);
    // Another lease is independent.
    assert!(n2.acquire("maintenance", ttl).await.unwrap().is_some());

    // Expired (by the database's clock): n2 takes it, with a new token;
    // n1 can no longer renew.
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    assert!(
        !renewed.is_valid(),
        "the holder's own deadline has passed too"
    );
    let taken = n2
        .acquire("scheduler", ttl)
        .await
        .unwrap()
        .expect("n2 takes it");
    assert_eq!(taken.token, first.token + 1);
    assert_eq!(n1.acquire("scheduler", ttl).await.unwrap(), None);

    // Released: n1 takes it at once.
    n2.release(&taken).await.unwrap();
    let back = n1
        .acquire("scheduler", ttl)
        .await
        .unwrap()
        .expect("released");
    assert_eq!(back.token, taken.token + 1);

    let leases = n1.leases().await.unwrap();
    let scheduler = leases.iter().find(|l| l.name == "scheduler").unwrap();
    assert_eq!(scheduler.holder, "n1");
    assert!(scheduler.expires_in_ms > 0 && scheduler.expires_in_ms <= 1_500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
async fn racing_nodes_take_a_free_lease_once() {
    require(&needs::POSTGRES);
    let pg = PgCluster::primary();
    let (n1, n2, _) = two_nodes(&pg);
    let (n1, n2) = (Arc::new(n1), Arc::new(n2));
    for round in 0..10 {
        let name = format!("race-{round}");
        let (a, b) = tokio::join!(
            n1.acquire(&name, Duration::from_secs(10)),
            n2.acquire(&name, Duration::from_secs(10))
        );
        let winners = [a.unwrap(), b.unwrap()]
            .into_iter()
            .filter(Option::is_some)
            .count();
        assert_eq!(winners, 1, "round {round}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
async fn nodes_register_and_a_notification_wakes_a_waiting_node() {
    require(&needs::POSTGRES);
    let pg = PgCluster::primary();
    let (n1, n2, db) = two_nodes(&pg);
    n1.heartbeat(None).await.unwrap();
    n2.heartbeat(None).await.unwrap();
    let nodes = n1.nodes().await.unwrap();
    let ids: Vec<&str> = nodes.iter().map(|n| n.node_id.as_str()).collect();
    assert_eq!(ids, ["n1", "n2"]);
    assert_eq!(nodes[1].incarnation, n2.incarnation().to_string());
    assert!(
        nodes.iter().all(|n| n.last_seen_ms_ago < 5_000),
        "{nodes:?}"
    );

    // Without a notification, the wait lasts its timeout.
    let started = Instant::now();
    n2.wait_for_changes(Duration::from_millis(300)).await;
    assert!(started.elapsed() >= Duration::from_millis(290));
    // The listener is open now: a notification cuts the next wait short.
    let notify = format!("NOTIFY {CHANGES_CHANNEL}, '7'");
    let waiting = tokio::spawn(async move {
        let started = Instant::now();
        n2.wait_for_changes(Duration::from_secs(20)).await;
        started.elapsed()
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    pg.psql(&db, &notify);
    let waited = waiting.await.unwrap();
    assert!(waited < Duration::from_secs(10), "woken after {waited:?}");
}

/// `coffre cluster status` reads the registry and the leases from the
/// database: the nodes with their heartbeats and reported freshness, the
/// lease holder, the feed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
async fn cluster_status_shows_nodes_leases_and_the_feed() {
    require(&needs::POSTGRES);
    let pg = PgCluster::primary();
    let db = pg.create_database();
    let url = pg.url(&db);
    let config = write_config(pg.dir(), "");
    store_json("migrate", &config, &url);
    let c = Arc::new(connector(&config, &url));
    let n1 = PgCoordination::new(Arc::clone(&c), "n1", uuid::Uuid::new_v4());
    let n2 = PgCoordination::new(Arc::clone(&c), "n2", uuid::Uuid::new_v4());
    let n3 = PgCoordination::new(c, "n3", uuid::Uuid::new_v4());
    // n1 confirmed its caches 200 ms ago, well inside a minute's bound;
    // n2 five seconds ago, past its bound of one; n3 reports nothing.
    n1.heartbeat(Some(FreshnessReport {
        feed_generation: 0,
        confirmed_ago: Some(Duration::from_millis(200)),
        max_staleness: Duration::from_secs(60),
        strict: true,
    }))
    .await
    .unwrap();
    n2.heartbeat(Some(FreshnessReport {
        feed_generation: 0,
        confirmed_ago: Some(Duration::from_secs(5)),
        max_staleness: Duration::from_secs(1),
        strict: false,
    }))
    .await
    .unwrap();
    n3.heartbeat(None).await.unwrap();
    n2.acquire("scheduler", Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();

    let run = |json: bool| {
        let mut cmd = std::process::Command::new(crate::common::binary::COFFRE);
        cmd.args(["cluster", "status", "--config"])
            .arg(&config)
            .env("COFFRE_TEST_DATABASE_URL", &url)
            .env("RUST_LOG", "warn");
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let status: serde_json::Value = serde_json::from_str(&run(true)).unwrap();
    assert_eq!(status["primary"]["in_recovery"], false);
    assert_eq!(status["key_generation"], 0);
    let nodes: Vec<&str> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node_id"].as_str().unwrap())
        .collect();
    assert_eq!(nodes, ["n1", "n2", "n3"]);
    assert!(status["nodes"][0]["alive"].as_bool().unwrap(), "{status}");
    let fresh = &status["nodes"][0]["freshness"];
    assert_eq!(fresh["fresh"], true, "{status}");
    assert_eq!(fresh["mode"], "strict", "{status}");
    assert_eq!(fresh["max_staleness_ms"], 60_000, "{status}");
    assert_eq!(fresh["feed_generation"], 0, "{status}");
    // As of the heartbeat, by the database's clock (to the millisecond).
    let staleness = fresh["staleness_ms"].as_u64().unwrap();
    assert!((199..=201).contains(&staleness), "{status}");
    let stale = &status["nodes"][1]["freshness"];
    assert_eq!(stale["fresh"], false, "{status}");
    assert_eq!(stale["mode"], "available", "{status}");
    let staleness = stale["staleness_ms"].as_u64().unwrap();
    assert!((4_999..=5_001).contains(&staleness), "{status}");
    assert_eq!(status["nodes"][2]["freshness"], serde_json::Value::Null);
    assert_eq!(status["leases"][0]["name"], "scheduler");
    assert_eq!(status["leases"][0]["holder"], "n2");
    assert_eq!(status["leases"][0]["held"], true);
    let text = run(false);
    assert!(text.contains("scheduler        held by n2"), "{text}");
    assert!(text.contains("n1") && text.contains("alive"), "{text}");
    let line = |node: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(node))
            .unwrap_or_else(|| panic!("no line for {node}: {text}"))
            .to_string()
    };
    assert!(
        line("n1").contains("staleness 0.2 s (fresh, bound 60.0 s, strict)"),
        "{text}"
    );
    assert!(line("n1").contains("feed at generation 0 of 0"), "{text}");
    assert!(
        line("n2").contains("staleness 5.0 s (STALE, bound 1.0 s, available)"),
        "{text}"
    );
    assert!(line("n3").contains("freshness not reported"), "{text}");
}

/// The audit log across nodes (design/several-nodes.md §6), in process:
/// two nodes' trails (one audit key, each its own file) publish their
/// checkpoints to one database; the holder of the `audit-digest` lease
/// signs digests that list both heads; the export made of the two files
/// and the stored digests passes `coffre audit verify --cluster`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
async fn two_nodes_publish_checkpoints_and_the_lease_holder_signs_digests() {
    use coffre::audit::cluster::{DIGESTS_FILE, node_file_name, verify_cluster};
    use coffre::audit::{
        AuditKeys, AuditLogOptions, AuditTrail, AuditTrailOptions, CheckpointObserver, Policy,
    };
    use coffre::cluster::audit::{
        CheckpointQueue, DigestOutcome, sign_digest_once, spawn_publisher,
    };
    use coffre::cluster::leases::AUDIT_DIGEST;
    use coffre::model::SystemClock;

    require(&needs::POSTGRES);
    let pg = PgCluster::primary();
    let (n1, n2, db) = two_nodes(&pg);
    let (n1, n2): (Arc<dyn Coordination>, Arc<dyn Coordination>) = (Arc::new(n1), Arc::new(n2));
    n1.heartbeat(None).await.unwrap();
    n2.heartbeat(None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let open = |node: &str| {
        let queue = Arc::new(CheckpointQueue::default());
        let options = AuditTrailOptions {
            log: AuditLogOptions {
                node: Some(node.to_string()),
                observer: Some(Arc::clone(&queue) as Arc<dyn CheckpointObserver>),
                ..AuditLogOptions::default()
            },
            ..AuditTrailOptions::default()
        };
        let keys = AuditKeys::from_secret(&[7u8; 64]).unwrap();
        let trail = AuditTrail::open(&dir.path().join(format!("{node}.log")), keys, options);
        (Arc::new(trail.unwrap()), queue)
    };
    let nodes = [(open("n1"), &n1), (open("n2"), &n2)];
    let publishers: Vec<_> = nodes
        .iter()
        .map(|((_, queue), c)| spawn_publisher(Arc::clone(queue), Arc::clone(c)))
        .collect();
    let lease = n2
        .acquire(AUDIT_DIGEST, Duration::from_secs(30))
        .await
        .unwrap()
        .expect("n2 signs");
    assert_eq!(
        n1.acquire(AUDIT_DIGEST, Duration::from_secs(30))
            .await
            .unwrap(),
        None
    );
    let mut digests = Vec::new();
    for round in 0..2u64 {
        for (i, ((trail, queue), _)) in nodes.iter().enumerate() {
            for n in 0..(3 + i as u64 + round) {
                let mut entry = coffre::audit::AuditEntry::empty();
                entry.request_id = format!("r{round}-{n}");
                entry.operation = "GetKey".into();
                entry.status_code = "OK".into();
                trail.record(entry).await.unwrap();
            }
            trail.checkpoint().await.unwrap().unwrap();
            // Published in the background, within moments.
            let started = Instant::now();
            while queue.published() < round + 1 {
                assert!(started.elapsed() < Duration::from_secs(20), "not published");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let outcome = sign_digest_once(&nodes[1].0.0, n2.as_ref(), &SystemClock, &lease)
            .await
            .unwrap();
        let DigestOutcome::Appended(digest) = outcome else {
            panic!("{outcome:?}")
        };
        assert_eq!(digest.n, round + 1);
        let listed: Vec<(&str, u64)> = digest
            .heads
            .iter()
            .map(|h| (h.node.as_str(), h.seq))
            .collect();
        let expected_n1 = (0..=round).map(|r| 3 + r).sum::<u64>();
        let expected_n2 = (0..=round).map(|r| 4 + r).sum::<u64>();
        assert_eq!(listed, [("n1", expected_n1), ("n2", expected_n2)]);
        digests.push(digest);
    }
    // Nothing changed: no new digest. A second signer loses on the key.
    assert_eq!(
        sign_digest_once(&nodes[1].0.0, n2.as_ref(), &SystemClock, &lease)
            .await
            .unwrap(),
        DigestOutcome::Unchanged
    );
    assert!(!n1.append_digest(&digests[1]).await.unwrap());
    assert_eq!(pg.psql(&db, "SELECT count(*) FROM audit_checkpoints"), "4");
    for task in publishers {
        task.abort();
    }

    // The export: each node's file as the export RPC streams it, and the
    // stored digests.
    let out = tempfile::tempdir().unwrap();
    for ((trail, _), c) in &nodes {
        let mut bytes = Vec::new();
        trail
            .export(64 * 1024, |chunk| {
                bytes.extend(chunk);
                true
            })
            .unwrap();
        std::fs::write(out.path().join(node_file_name(c.node_id())), bytes).unwrap();
    }
    let stored = n1.digests_since(0, 100).await.unwrap();
    assert_eq!(stored, digests);
    let lines: String = stored
        .iter()
        .map(|d| format!("{}\n", d.to_line().unwrap()))
        .collect();
    std::fs::write(out.path().join(DIGESTS_FILE), lines).unwrap();
    let public_key = nodes[0].0.0.public_key();
    let report = verify_cluster(out.path(), &public_key, Policy::default()).unwrap();
    assert_eq!(report.digests, 2);
    assert!(
        report.nodes.iter().all(|n| n.heads_checked == 2),
        "{report:?}"
    );
    // And with the command an auditor runs.
    let key_file = out.path().join("audit-public-key.pem");
    std::fs::write(&key_file, nodes[0].0.0.public_key_pem()).unwrap();
    let verified = std::process::Command::new(crate::common::binary::COFFRE)
        .args(["audit", "verify", "--json", "--cluster"])
        .arg(out.path())
        .arg("--public-key")
        .arg(&key_file)
        .output()
        .unwrap();
    assert!(
        verified.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verified.stdout),
        String::from_utf8_lossy(&verified.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&verified.stdout).unwrap();
    assert_eq!(
        (v["valid"].as_bool(), v["digests"].as_u64()),
        (Some(true), Some(2)),
        "{v}"
    );
}
