//! Several `coffre serve` nodes on one PostgreSQL database, as separate
//! processes (issue #17; design/several-nodes.md §7.4): a key change
//! acknowledged by one node (a disable, with and without NOTIFY; a grant
//! removed; a deletion scheduled) is refused by every node within the
//! bound (`max_staleness_ms`), a node cut off from the database stops serving
//! within the bound and serves again once it reaches it, and a killed
//! node leaves the others serving. Each test starts its own cluster
//! (`common::cluster`); every one needs PostgreSQL 15+.
//!
//! `COFFRE_CLUSTER_REPETITIONS` (default 3) sets how many changes each
//! propagation test makes; the long form runs 30. The propagation tests
//! print their median and worst (`propagation (…)` lines, with
//! `--nocapture`) for BENCHMARKS.md.

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

/// When a node stopped serving a changed key, relative to the
/// acknowledgement of the change.
#[derive(Debug, Clone, Copy)]
struct Seen {
    /// The start of the last request that succeeded (None: none did).
    last_success: Option<Duration>,
    /// The start of the first request that was refused.
    first_refusal: Duration,
}

/// Hammers GenerateDataKey on `key` through `client` until a request
/// started at or after `since + bound` is refused. Panics if one started
/// after the bound succeeds, if a refusal is neither `refused` nor
/// UNAVAILABLE (a stale node in strict mode), or if nothing is refused
/// within 20 s.
async fn watch_refusal(
    mut client: Clients,
    key: String,
    refused: Code,
    since: Instant,
    bound: Duration,
) -> Seen {
    let mut last_success = None;
    let mut first_refusal = None;
    loop {
        let started = Instant::now();
        match client
            .data
            .generate_data_key(generate_request(&key, CONTEXT))
            .await
        {
            Ok(_) => {
                let at = started.saturating_duration_since(since);
                assert!(
                    at <= bound,
                    "a request started {at:?} after the acknowledgement was served (bound {bound:?})"
                );
                last_success = Some(at);
            }
            Err(s) => {
                assert!(
                    s.code() == refused || s.code() == Code::Unavailable,
                    "expected {refused:?}: {s:?}"
                );
                first_refusal.get_or_insert(started.saturating_duration_since(since));
                if started >= since + bound {
                    return Seen {
                        last_success,
                        first_refusal: first_refusal.unwrap_or_default(),
                    };
                }
            }
        }
        assert!(since.elapsed() < Duration::from_secs(20), "never refused");
    }
}

/// A key change made on n1, whose effect every node must show.
#[derive(Debug, Clone, Copy)]
enum Change {
    Disable,
    /// UpdateKeyPolicy to a policy without the service's grant.
    RemoveGrant,
    /// ScheduleKeyDeletion (7 days).
    ScheduleDeletion,
}

impl Change {
    /// How a node refuses GenerateDataKey once it knows of the change.
    fn refused(self) -> Code {
        match self {
            Change::Disable | Change::ScheduleDeletion => Code::FailedPrecondition,
            Change::RemoveGrant => Code::PermissionDenied,
        }
    }

    async fn apply(self, operator: &mut Clients, key: &str) {
        match self {
            Change::Disable => {
                operator
                    .keys
                    .disable_key(pb::DisableKeyRequest {
                        key_id: key.to_string(),
                    })
                    .await
                    .unwrap();
            }
            Change::RemoveGrant => {
                // Another principal keeps a grant: the policy stays valid,
                // only the caller's grant is gone.
                let done = operator
                    .keys
                    .update_key_policy(pb::UpdateKeyPolicyRequest {
                        key_id: key.to_string(),
                        policy: Some(pb::KeyPolicy {
                            grants: vec![pb::Grant {
                                principal: coffre::pki::dev_principal("someone-else"),
                                operations: vec![pb::DataKeyOperation::GenerateDataKey as i32],
                            }],
                            ..Default::default()
                        }),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert!(done.pending_approval_id.is_empty(), "{done:?}");
            }
            Change::ScheduleDeletion => {
                let done = operator
                    .keys
                    .schedule_key_deletion(pb::ScheduleKeyDeletionRequest {
                        key_id: key.to_string(),
                        pending_window_days: 7,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert!(done.pending_approval_id.is_empty(), "{done:?}");
            }
        }
    }
}

/// The median and the largest of `v` (sorted here).
fn median_worst(v: &mut [Duration]) -> (Duration, Duration) {
    v.sort();
    (
        v.get(v.len() / 2).copied().unwrap_or_default(),
        v.last().copied().unwrap_or_default(),
    )
}

/// Makes `change` on n1 [`repetitions`] times, each on a fresh key that
/// every node has cached, and checks that every other node refuses the
/// key from the bound on (n1 at once); they are watched at the same
/// time. Prints each round and the median and worst over all rounds of
/// the first refusal and of the last success, as "propagation" lines a
/// benchmark can quote.
async fn change_is_refused_everywhere(options: ClusterOptions, change: Change, label: &str) {
    // Two polls and a margin: long enough for every node to have applied
    // the key's creation from the feed.
    let settle = Duration::from_millis(u64::try_from(2 * options.poll_interval_ms + 100).unwrap());
    let cluster = TestCluster::start(options).await;
    let mut c = clients(&cluster).await;
    let bound = Duration::from_millis(1_000);
    let mut first_refusals = Vec::new();
    let mut last_successes = Vec::new();
    for round in 0..repetitions() {
        let key = c[0].create_key("").await.unwrap().key_id;
        // The creation reaches every node's feed first: applying it drops
        // the key from the caches, and a change made before that would be
        // read from the store at the next request, not carried by the
        // feed, which is what is measured here.
        tokio::time::sleep(settle).await;
        // Warm: every node has the key cached.
        for client in c.iter_mut() {
            client.generate_data_key(&key, CONTEXT).await.unwrap();
        }
        let (first, rest) = c.split_first_mut().unwrap();
        change.apply(first, &key).await;
        let acknowledged = Instant::now();
        let watchers: Vec<_> = rest
            .iter()
            .map(|client| {
                tokio::spawn(watch_refusal(
                    client.clone(),
                    key.clone(),
                    change.refused(),
                    acknowledged,
                    bound,
                ))
            })
            .collect();
        for (i, watcher) in watchers.into_iter().enumerate() {
            let seen = watcher.await.unwrap();
            eprintln!(
                "{label}: round {round}, node n{}: first refusal {:?}, last success {:?} after the acknowledgement",
                i + 2,
                seen.first_refusal,
                seen.last_success
            );
            first_refusals.push(seen.first_refusal);
            last_successes.push(seen.last_success.unwrap_or_default());
        }
        // The node that made the change refuses at once.
        let err = c[0].generate_data_key(&key, CONTEXT).await.unwrap_err();
        assert_eq!(err.code(), change.refused(), "{err:?}");
    }
    let (median, worst) = median_worst(&mut first_refusals);
    let (median_ok, worst_ok) = median_worst(&mut last_successes);
    eprintln!(
        "propagation ({label}) over {} rounds, {} observations: first refusal median {median:?}, \
         worst {worst:?}; last success median {median_ok:?}, worst {worst_ok:?} (bound {bound:?})",
        repetitions(),
        first_refusals.len(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
async fn a_disable_on_one_node_is_refused_by_every_node_within_the_bound() {
    require(&needs::POSTGRES);
    change_is_refused_everywhere(
        ClusterOptions::default(),
        Change::Disable,
        "disable, NOTIFY on",
    )
    .await;
}

/// Without NOTIFY the polls alone carry the change (every
/// `poll_interval_ms`), still within the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
async fn a_disable_is_refused_everywhere_within_the_bound_without_notify() {
    require(&needs::POSTGRES);
    change_is_refused_everywhere(
        ClusterOptions {
            notify: false,
            ..ClusterOptions::default()
        },
        Change::Disable,
        "disable, NOTIFY off",
    )
    .await;
}

/// A policy change revoking the caller's grant is a key change like a
/// disable: every node refuses the caller within the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
async fn a_grant_removed_on_one_node_is_refused_by_every_node_within_the_bound() {
    require(&needs::POSTGRES);
    change_is_refused_everywhere(
        ClusterOptions::default(),
        Change::RemoveGrant,
        "grant removed",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
async fn a_deletion_scheduled_on_one_node_is_refused_by_every_node_within_the_bound() {
    require(&needs::POSTGRES);
    change_is_refused_everywhere(
        ClusterOptions::default(),
        Change::ScheduleDeletion,
        "deletion scheduled",
    )
    .await;
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

    // `coffre cluster status` shows n3 fresh (its heartbeat reports it).
    wait_reported_fresh(&cluster, 2, Some(true));

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
    // n3 cannot report any more: `coffre cluster status` (through n1)
    // shows it silent, its freshness unknown.
    wait_reported_fresh(&cluster, 2, None);
    assert_eq!(
        cluster.reported_freshness(0, 0).unwrap()["fresh"],
        true,
        "n1 is fresh"
    );
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
    wait_reported_fresh(&cluster, 2, Some(true));
}

/// Waits (up to 10 s) until `coffre cluster status`, read through n1,
/// reports node `i` fresh, stale, or unknown (silent), as `fresh` says.
fn wait_reported_fresh(cluster: &TestCluster, i: usize, fresh: Option<bool>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let want = fresh.map_or(serde_json::Value::Null, serde_json::Value::Bool);
    loop {
        let reported = cluster.reported_freshness(0, i);
        if reported.as_ref().is_some_and(|f| f["fresh"] == want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {i} never reported fresh = {want}: {reported:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
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
