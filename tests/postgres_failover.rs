//! Issue #17, PostgreSQL failover with real `coffre serve` processes
//! (design/several-nodes.md §3.3, §4.2, §7.5): a primary with a standby
//! `s1` whose replication link goes through a proxy the test can cut,
//! two nodes whose URL names both servers (`host=127.0.0.1,127.0.0.1
//! port=P1,P2`, read-write wanted), and a mixed load of CreateKey,
//! RotateKey and DisableKey whose every acknowledged write is recorded.
//!
//! The scenario, the same with and without synchronous replication: load;
//! cut the replication link (the standby stops receiving WAL); load for a
//! second more; SIGKILL the primary; promote the standby at once. Then:
//!
//! - synchronous (`ANY 1 (s1)`): every acknowledged write is on the
//!   promoted server (read by SQL, the ground truth), since a commit after
//!   the cut waits for the standby and is never acknowledged; data keys
//!   are served again without restarting coffre, and the failover time
//!   (kill → data keys served again for good) is printed;
//! - asynchronous (the negative control): the writes acknowledged after
//!   the cut are certainly missing on the promoted server (their WAL never
//!   left the proxy), so the first test can only pass because of
//!   synchronous replication, not because loopback replication is fast.
//!   The promoted server then issues the lost change-feed generations
//!   again; a key disabled there must still be refused by every node
//!   within the bound (a node follows the new history from its head).
//!
//! Then the returning old primary (§4.2): restarted read-write, first in
//! the URL, it must be refused by every node (timeline fencing), with an
//! alarm (log line, metric, readiness NOT_SERVING), and nothing read from
//! or written to it; once it is gone again the nodes serve from the new
//! primary. Needs PostgreSQL 15+.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use coffre::grpc::pb;
use tonic::Code;

use crate::common::clients::{Clients, generate_request};
use crate::common::cluster::{ClusterOptions, StandbyOptions, TestCluster, http_status};
use crate::common::pg::PgCluster;
use crate::common::{needs, require};

const CONTEXT: &[(&str, &str)] = &[("tenant", "acme")];
/// A call that takes longer has an unknown outcome (never acknowledged).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A write coffre acknowledged.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Write {
    Created(String),
    Rotated(String, u32),
    Disabled(String),
}

#[derive(Debug)]
struct Acked {
    write: Write,
    /// When the request was sent: a write sent after the replication cut
    /// committed after it.
    sent: Instant,
    /// When it was acknowledged.
    at: Instant,
}

type Ledger = Arc<Mutex<Vec<Acked>>>;

/// The operator's and the service's clients on every node.
async fn clients(cluster: &TestCluster) -> Vec<Clients> {
    let mut all = Vec::new();
    for node in &cluster.nodes {
        all.push(Clients::connect(&node.endpoint, &cluster.pki()).await);
    }
    all
}

/// Creates, rotates and disables keys through `client` until `stop`,
/// recording each acknowledged write. A call that fails or times out is
/// of unknown outcome and not recorded.
async fn writer(mut client: Clients, ledger: Ledger, stop: Arc<AtomicBool>, seed: u64) {
    let mut rng = seed;
    let mut next = move |n: usize| {
        // xorshift: deterministic per writer, no dependency.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        usize::try_from(rng % n.max(1) as u64).unwrap()
    };
    let mut enabled: Vec<String> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let sent = Instant::now();
        let choice = if enabled.len() < 2 { 0 } else { next(3) };
        let outcome = match choice {
            0 => {
                let call = client.keys.create_key(pb::CreateKeyRequest::default());
                match tokio::time::timeout(CALL_TIMEOUT, call).await {
                    Ok(Ok(r)) => {
                        let id = r.into_inner().key.unwrap().key_id;
                        enabled.push(id.clone());
                        Some(Write::Created(id))
                    }
                    _ => None,
                }
            }
            1 => {
                let id = enabled[next(enabled.len())].clone();
                let call = client
                    .keys
                    .rotate_key(pb::RotateKeyRequest { key_id: id.clone() });
                match tokio::time::timeout(CALL_TIMEOUT, call).await {
                    Ok(Ok(r)) => {
                        let version = r.into_inner().key.unwrap().primary_version;
                        Some(Write::Rotated(id, version))
                    }
                    _ => None,
                }
            }
            _ => {
                let id = enabled.swap_remove(next(enabled.len()));
                let call = client
                    .keys
                    .disable_key(pb::DisableKeyRequest { key_id: id.clone() });
                match tokio::time::timeout(CALL_TIMEOUT, call).await {
                    Ok(Ok(_)) => Some(Write::Disabled(id)),
                    _ => None,
                }
            }
        };
        match outcome {
            Some(write) => ledger.lock().unwrap().push(Acked {
                write,
                sent,
                at: Instant::now(),
            }),
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Rotates `key` through `client` until `stop` (a rotation after the
/// replication cut is committed on the primary, and so visible there,
/// while its commit waits for the standby).
/// The versions acknowledged.
async fn rotator(mut client: Clients, key: String, stop: Arc<AtomicBool>) -> Vec<u32> {
    let mut acknowledged = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let call = client.keys.rotate_key(pb::RotateKeyRequest {
            key_id: key.clone(),
        });
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(r)) => acknowledged.push(r.into_inner().key.unwrap().primary_version),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    acknowledged
}

/// Data keys under `key` through `client` until `stop`: every blob
/// acknowledged, with the version it names.
async fn generator(mut client: Clients, key: String, stop: Arc<AtomicBool>) -> Vec<(Vec<u8>, u32)> {
    let mut blobs = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let call = client
            .data
            .generate_data_key(generate_request(&key, CONTEXT));
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(r)) => {
                let r = r.into_inner();
                blobs.push((r.ciphertext_blob, r.key_version));
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    blobs
}

/// The acknowledged writes that `server` does not hold.
fn missing_on(server: &PgCluster, db: &str, acked: &[Acked]) -> Vec<(Write, Instant)> {
    let keys: HashMap<String, String> = server
        .psql(db, "SELECT id::text || ' ' || state FROM keys")
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(id, state)| (id.to_string(), state.to_string()))
        .collect();
    let versions: HashSet<String> = server
        .psql(
            db,
            "SELECT key_id::text || ' ' || version FROM key_versions",
        )
        .lines()
        .map(str::to_string)
        .collect();
    acked
        .iter()
        .filter(|a| match &a.write {
            Write::Created(id) => !keys.contains_key(id),
            Write::Rotated(id, v) => !versions.contains(&format!("{id} {v}")),
            Write::Disabled(id) => keys.get(id).map(String::as_str) != Some("DISABLED"),
        })
        .map(|a| (a.write.clone(), a.at))
        .collect()
}

/// Probes GenerateDataKey on `key` through `client` from now on, until
/// it has succeeded for `settled` in a row, `settled` after `promoted`
/// (once set); returns when
/// the last refusal's outage ended (the start of the first success after
/// the last refusal), relative to `kill`, or `None` if it was never
/// refused. Panics after 60 s.
async fn served_again(
    client: &mut Clients,
    key: &str,
    kill: Instant,
    promoted: &OnceLock<Instant>,
) -> Result<Option<Duration>, String> {
    let settled = Duration::from_millis(1_500);
    let mut refused_once = false;
    let mut back: Option<Instant> = None;
    loop {
        let started = Instant::now();
        let call = client
            .data
            .generate_data_key(generate_request(key, CONTEXT));
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(_)) => {
                back.get_or_insert(started);
            }
            Ok(Err(s)) => {
                assert_eq!(s.code(), Code::Unavailable, "{s:?}");
                if !refused_once || back.is_some() {
                    eprintln!(
                        "refused {:?} after the kill: {}",
                        started.saturating_duration_since(kill),
                        s.message()
                    );
                }
                refused_once = true;
                back = None;
            }
            Err(_) => {
                refused_once = true;
                back = None;
            }
        }
        // Served for `settled` without a refusal, and the new primary
        // promoted for as long (no freshness left from before the kill).
        if let Some(at) = back
            && at.elapsed() >= settled
            && promoted.get().is_some_and(|p| p.elapsed() >= settled)
        {
            return Ok(refused_once.then(|| at.saturating_duration_since(kill)));
        }
        if kill.elapsed() > Duration::from_secs(60) {
            return Err("data keys not served again within 60 s of the kill".to_string());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What one failover run saw.
struct Run {
    cluster: TestCluster,
    /// Failover time per node (None: never interrupted).
    failover: Vec<Option<Duration>>,
    acked: Vec<Acked>,

    streamed: Instant,
    cut: Instant,
    kill: Instant,
    promoted: Instant,
    /// A key created before the load, for data-key probes.
    warm: String,
}

/// The scenario of the module docs, up to the promoted standby serving.
async fn failover(synchronous: bool) -> Run {
    let mut cluster = TestCluster::start(ClusterOptions {
        nodes: 2,
        fsync: true,
        standby: Some(StandbyOptions { synchronous }),
        ..ClusterOptions::default()
    })
    .await;
    let sync_state = cluster.pg.psql(
        "postgres",
        "SELECT sync_state FROM pg_stat_replication WHERE application_name = 's1'",
    );
    assert_eq!(
        sync_state,
        if synchronous { "quorum" } else { "async" },
        "the standby's replication mode"
    );
    let mut c = clients(&cluster).await;
    let warm = c[0].create_key("").await.unwrap().key_id;
    for client in c.iter_mut() {
        client.generate_data_key(&warm, CONTEXT).await.unwrap();
    }

    let ledger: Ledger = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));

    let writers: Vec<_> = c
        .iter()
        .enumerate()
        .flat_map(|(i, client)| (0..2).map(move |j| (i * 2 + j, client.clone())))
        .map(|(n, client)| {
            tokio::spawn(writer(
                client,
                Arc::clone(&ledger),
                Arc::clone(&stop),
                0x9e37_79b9_7f4a_7c15 ^ (n as u64 + 1),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // Every write acknowledged before `streamed` is on the standby: its
    // commit record lies before the primary's flush position then, which
    // the standby has received before the cut (promotion replays all it
    // received).
    let streamed = Instant::now();
    let flushed = cluster
        .pg
        .psql("postgres", "SELECT pg_current_wal_flush_lsn()");
    let standby = cluster.standby.as_ref().unwrap();
    while standby.psql(
        "postgres",
        &format!("SELECT pg_last_wal_receive_lsn() >= '{flushed}'::pg_lsn"),
    ) != "t"
    {
        assert!(
            streamed.elapsed() < Duration::from_secs(30),
            "the standby lags"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cut = Instant::now();
    cluster.replication.as_ref().unwrap().blackhole();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    // Every node probed at once, from the kill on.
    let kill = Instant::now();
    let promotion = Arc::new(OnceLock::new());
    let probes: Vec<_> = c
        .iter()
        .map(|client| {
            let (mut client, warm) = (client.clone(), warm.clone());
            let promotion = Arc::clone(&promotion);
            tokio::spawn(async move { served_again(&mut client, &warm, kill, &promotion).await })
        })
        .collect();
    cluster.pg.kill();
    // The load stops at the kill: a write after the promotion could
    // reuse a version number lost with the old primary and hide the loss.
    stop.store(true, Ordering::SeqCst);
    cluster.standby.as_ref().unwrap().promote();
    let promoted = Instant::now();
    promotion.set(promoted).unwrap();
    eprintln!("promoted {:?} after the kill", promoted - kill);

    let mut failover = Vec::new();
    for probe in probes {
        failover.push(probe.await.unwrap());
    }
    for w in writers {
        w.await.unwrap();
    }

    // Writes go through too, on the new primary, through every node.
    for client in c.iter_mut() {
        let sent = Instant::now();
        let id = client.create_key("").await.unwrap().key_id;
        ledger.lock().unwrap().push(Acked {
            write: Write::Created(id),
            sent,
            at: Instant::now(),
        });
    }
    let acked = std::mem::take(&mut *ledger.lock().unwrap());
    let written_after = acked.iter().filter(|a| a.sent > promoted).count();
    let slow = |t: &Result<Option<Duration>, String>| {
        t.as_ref()
            .map_or(true, |t| t.is_some_and(|t| t > Duration::from_secs(5)))
    };
    if failover.iter().any(slow) {
        let keep = std::env::temp_dir().join(format!("coffre-failover-{}", std::process::id()));
        std::fs::create_dir_all(&keep).unwrap();
        for (i, node) in cluster.nodes.iter().enumerate() {
            let _ = std::fs::copy(&node.log, keep.join(format!("n{}.log", i + 1)));
        }
        eprintln!("slow failover: node logs kept in {}", keep.display());
    }
    let failover: Vec<Option<Duration>> = failover.into_iter().map(|t| t.unwrap()).collect();
    eprintln!(
        "{} writes acknowledged ({} after the cut and before the kill, {written_after} after \
         the promotion); failover time per node (kill -> data keys served again): {failover:?}",
        acked.len(),
        acked.iter().filter(|a| a.at > cut && a.at < kill).count(),
    );
    Run {
        cluster,
        failover,
        acked,
        streamed,
        cut,
        kill,
        promoted,
        warm,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
async fn a_promoted_synchronous_standby_holds_every_acknowledged_write() {
    require(&needs::POSTGRES);
    let run = failover(true).await;
    let standby = run.cluster.standby.as_ref().unwrap();
    let missing = missing_on(standby, &run.cluster.db, &run.acked);
    assert!(
        missing.is_empty(),
        "acknowledged writes missing on the promoted synchronous standby: {missing:?}"
    );
    // A commit after the cut waits for the standby: no write sent after
    // it is acknowledged before the kill.
    let in_window = run
        .acked
        .iter()
        .filter(|a| a.sent > run.cut && a.at < run.kill)
        .count();
    assert_eq!(
        in_window, 0,
        "writes acknowledged while the standby was cut off"
    );
    let times: Vec<Duration> = run.failover.iter().map(|t| t.unwrap_or_default()).collect();
    eprintln!(
        "FAILOVER (synchronous): {} writes checked, none lost; failover time per node {times:?} \
         (promotion took {:?})",
        run.acked.len(),
        run.promoted - run.kill
    );
    let _ = &run.warm;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
async fn without_synchronous_replication_acknowledged_writes_are_lost() {
    require(&needs::POSTGRES);
    let run = failover(false).await;
    let standby = run.cluster.standby.as_ref().unwrap();
    let missing = missing_on(standby, &run.cluster.db, &run.acked);
    // Every write sent after the cut and acknowledged before the kill
    // committed after the standby stopped receiving WAL: all are gone.
    let after_cut: Vec<&Acked> = run
        .acked
        .iter()
        .filter(|a| a.sent > run.cut && a.at < run.kill)
        .collect();
    assert!(
        !after_cut.is_empty(),
        "no write was sent and acknowledged between the cut and the kill: the control shows \
         nothing"
    );
    let missing_writes: HashSet<&Write> = missing.iter().map(|(w, _)| w).collect();
    let kept: Vec<&Write> = after_cut
        .iter()
        .map(|a| &a.write)
        .filter(|w| !missing_writes.contains(w))
        .collect();
    assert!(
        kept.is_empty(),
        "asynchronous replication: writes committed after the cut survived: {kept:?}"
    );
    // And nothing acknowledged before the standby had received the WAL
    // (`streamed`) or sent after the promotion (to the new primary) is
    // missing. (An acknowledgement may arrive just after the kill, for a
    // commit made before it.)
    let sent_of: HashMap<&Write, Instant> = run.acked.iter().map(|a| (&a.write, a.sent)).collect();
    for (write, at) in &missing {
        assert!(
            *at > run.streamed && sent_of[write] < run.promoted,
            "{write:?} lost though acknowledged outside the cut window: {:?} after streamed, \
             {:?} after the kill",
            at.checked_duration_since(run.streamed),
            at.checked_duration_since(run.kill),
        );
    }
    eprintln!(
        "NEGATIVE CONTROL (asynchronous): {} of {} acknowledged writes lost ({} sent after \
         the replication cut, all lost)",
        missing.len(),
        run.acked.len(),
        after_cut.len()
    );

    // The promoted server issues the lost generations again: the two
    // keys created after the promotion and this disable take generations
    // that the nodes had applied before the kill, from the lost history.
    // Each node must still refuse the key within the bound.
    assert!(
        missing.len() >= 3,
        "fewer lost writes than the changes made after the promotion: {missing:?}"
    );
    let mut c = clients(&run.cluster).await;
    c[0].keys
        .disable_key(pb::DisableKeyRequest {
            key_id: run.warm.clone(),
        })
        .await
        .unwrap();
    let disabled = Instant::now();
    let bound = Duration::from_millis(1_000);
    for (i, client) in c.iter_mut().enumerate() {
        loop {
            match client.generate_data_key(&run.warm, CONTEXT).await {
                Err(s) if s.code() == Code::FailedPrecondition => break,
                outcome => {
                    // A poll's round trip and the call's own on top.
                    assert!(
                        disabled.elapsed() < bound + Duration::from_millis(500),
                        "node n{} still answers {:?} for a key disabled on the promoted \
                         server {:?} ago",
                        i + 1,
                        outcome.map(|_| "a data key"),
                        disabled.elapsed()
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        eprintln!(
            "node n{} refuses the key disabled after the promotion {:?} after the disable",
            i + 1,
            disabled.elapsed()
        );
    }
}

/// The counter `name` on node `i`'s metrics page (0 if absent).
fn metric(cluster: &TestCluster, i: usize, name: &str) -> f64 {
    use std::io::{Read, Write as _};
    let addr = cluster.nodes[i].metrics;
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return 0.0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    );
    let mut page = String::new();
    let _ = s.read_to_string(&mut page);
    page.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
async fn a_returning_old_primary_is_fenced_off() {
    require(&needs::POSTGRES);
    let mut run = failover(true).await;
    let db = run.cluster.db.clone();
    // The old primary comes back read-write, first in every node's URL.
    run.cluster.pg.start();
    let old = &run.cluster.pg;
    // Its commits would wait for s1, which is no longer its standby: an
    // operator who brings it back read-write makes it stand alone, so
    // that whatever reached it would show.
    old.psql("postgres", "ALTER SYSTEM RESET synchronous_standby_names");
    old.psql("postgres", "SELECT pg_reload_conf()");
    let new = run.cluster.standby.as_ref().unwrap();
    assert_eq!(old.psql("postgres", "SELECT pg_is_in_recovery()"), "f");
    let heartbeats = "SELECT coalesce(max(last_seen)::text, '') FROM nodes";
    let old_heartbeats = old.psql(&db, heartbeats);
    let old_keys = old.psql(&db, "SELECT count(*) FROM keys");
    // Every node loses its connections to the new primary: each new one
    // goes to the first host of the URL, the old primary.
    let dropped_at = Instant::now();
    new.psql(
        "postgres",
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name LIKE 'coffre/%'",
    );
    let mut c = clients(&run.cluster).await;
    // Each new connection goes first to the old primary: every node
    // refuses it with the alarm (logged, counted), opens the connection
    // on the URL's next host, the new primary, and carries on serving.
    for (i, client) in c.iter_mut().enumerate() {
        loop {
            let fenced = metric(&run.cluster, i, "coffre_cluster_fenced_total") > 0.0;
            if fenced {
                break;
            }
            assert!(
                dropped_at.elapsed() < Duration::from_secs(20),
                "node {i} never met the old primary:\n{}",
                run.cluster.log(i)
            );
            // Requests make the pool open connections.
            let _ = client.generate_data_key(&run.warm, CONTEXT).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let log = run.cluster.log(i);
        assert!(
            log.contains("PostgreSQL timeline fence: the server is on timeline 1, lower than"),
            "no alarm in node {i}'s log:\n{log}"
        );
    }
    // Served and written through the new primary, never the old one.
    let settled = Instant::now();
    for (i, client) in c.iter_mut().enumerate() {
        loop {
            match client.generate_data_key(&run.warm, CONTEXT).await {
                Ok(_) if run.cluster.ready(i) => break,
                outcome => {
                    assert!(
                        settled.elapsed() < Duration::from_secs(20),
                        "node {i} does not serve from the new primary ({:?}, ready {}):\n{}",
                        outcome.map(|_| "a data key"),
                        run.cluster.ready(i),
                        run.cluster.log(i)
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    let made = c[0].create_key("").await.unwrap().key_id;
    let count = |server: &crate::common::pg::PgCluster| {
        server.psql(
            &db,
            &format!("SELECT count(*) FROM keys WHERE id = '{made}'"),
        )
    };
    assert_eq!(count(new), "1", "the write is on the new primary");
    assert_eq!(count(old), "0", "the write reached the old primary");

    // A node started now never saw the promotion: it asks every host of
    // its URL where it stands, takes the new primary's timeline, and
    // refuses the old primary from its first connection on.
    run.cluster.kill_node(1);
    run.cluster.start_node(1);
    run.cluster.wait_ready(1, Duration::from_secs(30));
    let (old, new) = (&run.cluster.pg, run.cluster.standby.as_ref().unwrap());
    let mut restarted = Clients::connect(&run.cluster.nodes[1].endpoint, &run.cluster.pki()).await;
    restarted
        .generate_data_key(&run.warm, CONTEXT)
        .await
        .unwrap();
    let again = restarted.create_key("").await.unwrap().key_id;
    assert_eq!(
        new.psql(
            &db,
            &format!("SELECT count(*) FROM keys WHERE id = '{again}'")
        ),
        "1"
    );
    assert!(metric(&run.cluster, 1, "coffre_cluster_fenced_total") > 0.0);
    let log = run.cluster.log(1);
    assert!(
        log.contains("timeline fence seeded from the URL's hosts"),
        "the restarted node did not seed its fence:\n{log}"
    );

    // Nothing ever reached the old primary.
    assert_eq!(
        old.psql(&db, heartbeats),
        old_heartbeats,
        "a node heartbeat on the old primary"
    );
    assert_eq!(old.psql(&db, "SELECT count(*) FROM keys"), old_keys);
    // The old primary goes away (demoted, as Patroni would): the nodes
    // go on.
    run.cluster.pg.stop_fast();
    for client in c.iter_mut() {
        client.generate_data_key(&run.warm, CONTEXT).await.unwrap();
    }
    let _ = http_status;
}

/// The durability barrier (design/several-nodes.md §3.3) with real
/// processes. Under synchronous replication a commit becomes visible only
/// once the standby has it, unless its wait is cancelled: then it is
/// committed on the primary alone, visible, and lost if the primary is.
/// Here n1 rotates a key all along and n2 makes data keys under it; the
/// replication link is cut, and the wait of n1's rotation is cancelled
/// (as `pg_cancel_backend` does), so n2 reads a version the standby never
/// received. n2 must not wrap a data key under it: its barrier (a commit
/// of its own) cannot be acknowledged. After the primary is killed and
/// the standby promoted, every data key n2 acknowledged opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
async fn no_data_key_is_wrapped_under_a_version_the_standby_never_received() {
    require(&needs::POSTGRES);
    let mut cluster = TestCluster::start(ClusterOptions {
        nodes: 2,
        fsync: true,
        standby: Some(StandbyOptions { synchronous: true }),
        ..ClusterOptions::default()
    })
    .await;
    let c = clients(&cluster).await;
    let key = c[0].clone().create_key("").await.unwrap().key_id;
    let stop = Arc::new(AtomicBool::new(false));
    let rotating = tokio::spawn(rotator(c[0].clone(), key.clone(), Arc::clone(&stop)));
    let generating = tokio::spawn(generator(c[1].clone(), key.clone(), Arc::clone(&stop)));
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    cluster.replication.as_ref().unwrap().blackhole();
    // n1's next rotation waits for the standby; its wait is cancelled, so
    // it is committed on the primary alone.
    let cut = Instant::now();
    let mut cancelled = 0;
    while cut.elapsed() < Duration::from_millis(2_500) {
        let n: u32 = cluster
            .pg
            .psql(
                "postgres",
                "SELECT count(pg_cancel_backend(pid)) FROM pg_stat_activity \
                 WHERE wait_event = 'SyncRep' AND application_name = 'coffre/n1'",
            )
            .parse()
            .unwrap();
        cancelled += n;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(cancelled > 0, "no rotation of n1 waited for the standby");
    let on_primary: u32 = cluster
        .pg
        .psql(
            &cluster.db,
            &format!("SELECT max(version) FROM key_versions WHERE key_id = '{key}'"),
        )
        .parse()
        .unwrap();
    cluster.pg.kill();
    stop.store(true, Ordering::SeqCst);
    cluster.standby.as_ref().unwrap().promote();
    let rotations = rotating.await.unwrap();
    let blobs = generating.await.unwrap();
    let promoted: u32 = cluster
        .standby
        .as_ref()
        .unwrap()
        .psql(
            &cluster.db,
            &format!("SELECT max(version) FROM key_versions WHERE key_id = '{key}'"),
        )
        .parse()
        .unwrap();
    assert!(
        on_primary > promoted,
        "the premise: versions committed on the old primary alone ({on_primary} there, \
         {promoted} on the promoted standby)"
    );
    // A rotation whose wait was cancelled was committed on the primary
    // alone, and PostgreSQL reported it done: n1 must not have
    // acknowledged it.
    let rotated_to = rotations.iter().copied().max().unwrap_or(0);
    assert!(
        rotated_to <= promoted,
        "n1 acknowledged a rotation to version {rotated_to}, which the promoted server does \
         not hold (it has up to {promoted})"
    );
    let newest = blobs.iter().map(|(_, v)| *v).max().unwrap_or(0);
    assert!(
        newest <= promoted,
        "n2 acknowledged a data key under version {newest}, which the promoted server does \
         not hold (it has up to {promoted})"
    );
    // And each opens, on either node, from the promoted server.
    let mut c = clients(&cluster).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    for (blob, version) in &blobs {
        loop {
            let opened = c[0]
                .data
                .decrypt(pb::DecryptRequest {
                    ciphertext_blob: blob.clone(),
                    encryption_context: crate::common::ctx(CONTEXT),
                    justification: crate::common::REASON,
                    key_id: String::new(),
                })
                .await;
            match opened {
                Ok(_) => break,
                Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(s) => panic!("a data key under version {version} no longer opens: {s:?}"),
            }
        }
    }
    eprintln!(
        "BARRIER: {} data keys acknowledged (newest version {newest}), {} rotations \
         (newest {rotated_to}); the old primary had version {on_primary}, the promoted server \
         {promoted}; {cancelled} commit waits cancelled; every data key opens",
        blobs.len(),
        rotations.len()
    );
}
