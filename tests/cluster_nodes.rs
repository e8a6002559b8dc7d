//! Several `coffre serve` nodes on one PostgreSQL database, as separate
//! processes (issue #17; design/several-nodes.md §7.4): a key change
//! acknowledged by one node is refused by every node within the bound
//! (`max_staleness_ms`), a node cut off from the database stops serving
//! within the bound and serves again once it reaches it, and a killed
//! node leaves the others serving. Each test starts its own cluster
//! (`common::cluster`); every one needs PostgreSQL 15+.
//!
//! `COFFRE_CLUSTER_REPETITIONS` (default 3) sets how many disables the
//! propagation test measures; the long form runs 30.

use std::time::{Duration, Instant};

use coffre::grpc::pb;
use tonic::Code;

use crate::common::clients::{Clients, generate_request};
use crate::common::cluster::{ClusterOptions, TestCluster};
use crate::common::{needs, require};

const CONTEXT: &[(&str, &str)] = &[("tenant", "acme")];

fn repetitions() -> usize {
    std::env::var("COFFRE_CLUSTER_REPETITIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

/// The operator's and the service's clients on every node.
async fn clients(cluster: &TestCluster) -> Vec<Clients> {
    let mut all = Vec::new();
    for node in &cluster.nodes {
        all.push(Clients::connect(&node.endpoint, &cluster.pki()).await);
    }
    all
}

/// Hammers GenerateDataKey on `key` through `client` until a request
/// started at or after `since + bound` is refused; returns the start
/// time, relative to `since`, of the last request that succeeded (None if
/// none did after `since`). Panics if one started after the bound
/// succeeds, or if nothing is refused within 20 s.
async fn last_success_after(
    client: &mut Clients,
    key: &str,
    since: Instant,
    bound: Duration,
) -> Option<Duration> {
    let mut last_ok = None;
    loop {
        let started = Instant::now();
        match client
            .data
            .generate_data_key(generate_request(key, CONTEXT))
            .await
        {
            Ok(_) => {
                let at = started.saturating_duration_since(since);
                assert!(
                    at <= bound,
                    "a request started {at:?} after the acknowledgement was served (bound {bound:?})"
                );
                last_ok = Some(at);
            }
            Err(s) => {
                assert!(
                    matches!(s.code(), Code::FailedPrecondition | Code::Unavailable),
                    "{s:?}"
                );
                if started >= since + bound {
                    return last_ok;
                }
            }
        }
        assert!(since.elapsed() < Duration::from_secs(20), "never refused");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
async fn a_disable_on_one_node_is_refused_by_every_node_within_the_bound() {
    require(&needs::POSTGRES);
    let cluster = TestCluster::start(ClusterOptions::default()).await;
    let mut c = clients(&cluster).await;
    let bound = Duration::from_millis(1_000);
    let mut worst = Duration::ZERO;
    let mut seen = Vec::new();
    for round in 0..repetitions() {
        let key = c[0].create_key("").await.unwrap().key_id;
        // Warm: every node has the key cached.
        for client in c.iter_mut() {
            client.generate_data_key(&key, CONTEXT).await.unwrap();
        }
        let disabled = c[0]
            .keys
            .disable_key(pb::DisableKeyRequest {
                key_id: key.clone(),
            })
            .await;
        let acknowledged = Instant::now();
        disabled.unwrap();
        for (i, client) in c.iter_mut().enumerate().skip(1) {
            let last = last_success_after(client, &key, acknowledged, bound).await;
            let at = last.unwrap_or_default();
            worst = worst.max(at);
            seen.push(at);
            eprintln!(
                "round {round}, node n{}: last success {at:?} after the disable",
                i + 1
            );
        }
        // The node that made the change refuses at once.
        let err = c[0].generate_data_key(&key, CONTEXT).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    }
    seen.sort();
    eprintln!(
        "disable propagation over {} observations: median {:?}, worst {worst:?} (bound {bound:?})",
        seen.len(),
        seen.get(seen.len() / 2).copied().unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
async fn a_node_cut_off_from_the_database_stops_serving_then_recovers() {
    require(&needs::POSTGRES);
    let cluster = TestCluster::start(ClusterOptions {
        proxied: vec![2],
        ..ClusterOptions::default()
    })
    .await;
    let mut c = clients(&cluster).await;
    let key = c[0].create_key("").await.unwrap().key_id;
    c[2].generate_data_key(&key, CONTEXT).await.unwrap();
    assert!(cluster.ready(2));

    let proxy = cluster.nodes[2].proxy.as_ref().unwrap();
    proxy.blackhole();
    let cut = Instant::now();
    // Within the bound (plus one poll), n3 refuses data keys with
    // UNAVAILABLE and is not ready; n1 and n2 serve on.
    let refused = loop {
        let started = Instant::now();
        match c[2]
            .data
            .generate_data_key(generate_request(&key, CONTEXT))
            .await
        {
            Ok(_) => assert!(
                started.duration_since(cut) <= Duration::from_millis(1_200),
                "served {:?} after the cut",
                started.duration_since(cut)
            ),
            // A request that reached n3 while its store access was being
            // cut may wait out the client's deadline (known limit, see the
            // issue note); only one started well inside the bound may.
            Err(s) if s.code() == Code::Cancelled => assert!(
                started.duration_since(cut) <= Duration::from_millis(1_200),
                "a request started {:?} after the cut hung: {s:?}",
                started.duration_since(cut)
            ),
            Err(s) => {
                assert_eq!(s.code(), Code::Unavailable, "{s:?}");
                break started.duration_since(cut);
            }
        }
        assert!(cut.elapsed() < Duration::from_secs(30), "never refused");
    };
    eprintln!("n3 refused data keys {refused:?} after the cut");
    // Readiness follows within its own refresh (a second or two).
    let deadline = Instant::now() + Duration::from_secs(5);
    while cluster.ready(2) {
        assert!(Instant::now() < deadline, "a stale node stays ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c[0].generate_data_key(&key, CONTEXT).await.unwrap();
    c[1].generate_data_key(&key, CONTEXT).await.unwrap();
    // A change made meanwhile is refused by n3 once it is back.
    c[0].keys
        .disable_key(pb::DisableKeyRequest {
            key_id: key.clone(),
        })
        .await
        .unwrap();

    proxy.heal();
    let healed = Instant::now();
    loop {
        match c[2]
            .data
            .generate_data_key(generate_request(&key, CONTEXT))
            .await
        {
            Err(s) if s.code() == Code::FailedPrecondition => break,
            Err(s) if s.code() == Code::Unavailable => {}
            other => panic!("after the heal: {other:?}"),
        }
        assert!(
            healed.elapsed() < Duration::from_secs(30),
            "n3 never caught up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let other = c[0].create_key("").await.unwrap().key_id;
    c[2].generate_data_key(&other, CONTEXT).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cluster.ready(2) {
        assert!(Instant::now() < deadline, "n3 never ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("n3 served again {:?} after the heal", healed.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
async fn a_killed_node_leaves_the_others_serving_and_comes_back() {
    require(&needs::POSTGRES);
    let mut cluster = TestCluster::start(ClusterOptions::default()).await;
    let mut c = clients(&cluster).await;
    let key = c[0].create_key("").await.unwrap().key_id;
    let sealed = c[1].generate_data_key(&key, CONTEXT).await.unwrap();
    cluster.kill_node(0);
    // The others serve on: a data key made on n2 opens on n3, keys are
    // created on n3.
    let opened = c[2]
        .data
        .decrypt(pb::DecryptRequest {
            ciphertext_blob: sealed.ciphertext_blob.clone(),
            encryption_context: crate::common::ctx(CONTEXT),
            justification: crate::common::REASON,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(opened.plaintext, sealed.plaintext);
    let made = c[2].create_key("").await.unwrap().key_id;
    c[1].generate_data_key(&made, CONTEXT).await.unwrap();
    // n1 restarts and sees everything.
    cluster.start_node(0);
    cluster.wait_ready(0, Duration::from_secs(60));
    let mut n1 = Clients::connect(&cluster.nodes[0].endpoint, &cluster.pki()).await;
    n1.generate_data_key(&made, CONTEXT).await.unwrap();
}
