//! Faults under a cluster of `coffre serve` nodes (issue #17;
//! design/several-nodes.md §7.4, 2 and 3): PostgreSQL restarted under a
//! mixed load (a fast shutdown, and a SIGKILL of the postmaster), the
//! nodes' LISTEN connections killed, a node SIGKILLed under load, and a
//! request in flight on a node at the instant its database connection is
//! cut. Each test starts its own cluster (`common::cluster`) and needs
//! PostgreSQL 15+.
//!
//! The load ([`Load`]) runs on every node at once: data keys on keys
//! every node has cached, and writes (CreateKey, RotateKey, DisableKey)
//! on keys of its own. Every request carries a deadline ([`DEADLINE`]);
//! each one's start, duration and outcome is kept, and every write a node
//! acknowledged is looked for afterwards, through every node.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coffre::grpc::pb;
use tonic::Code;

use crate::common::clients::{Clients, generate_request};
use crate::common::cluster::{ClusterOptions, TestCluster};
use crate::common::{needs, require};

const CONTEXT: &[(&str, &str)] = &[("tenant", "acme")];

/// The client's deadline on every request of the load. A request that
/// reaches it has hung: none may.
const DEADLINE: Duration = Duration::from_secs(5);

/// Keys every node has cached, for the data keys of the load.
const STABLE_KEYS: usize = 3;

/// The operator's and the service's clients on every node.
async fn clients(cluster: &TestCluster) -> Vec<Clients> {
    let mut all = Vec::new();
    for node in &cluster.nodes {
        all.push(Clients::connect(&node.endpoint, &cluster.pki()).await);
    }
    all
}

/// A request with the load's deadline.
fn with_deadline<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(DEADLINE);
    request
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    DataKey,
    Create,
    Rotate,
    Disable,
}

/// One request of the load, as the client saw it.
#[derive(Clone, Debug)]
struct Event {
    node: usize,
    kind: Kind,
    started: Instant,
    elapsed: Duration,
    /// `Code::Ok` for a success.
    code: Code,
    message: String,
}

/// The writes nodes acknowledged, by key id.
#[derive(Debug, Default)]
struct Acked {
    /// Key id → the node that created it.
    created: BTreeMap<String, usize>,
    /// Key id → the highest primary version a RotateKey answered.
    rotated: BTreeMap<String, u32>,
    /// Key id → the node that disabled it.
    disabled: BTreeMap<String, usize>,
    /// Writes refused or of unknown outcome (UNAVAILABLE), for the report.
    failed: usize,
}

impl Acked {
    fn by_node(&self, node: usize) -> usize {
        self.created.values().filter(|n| **n == node).count()
            + self.disabled.values().filter(|n| **n == node).count()
    }
}

/// The mixed load: on each node, one task of data keys and one of writes,
/// until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    events: Arc<Mutex<Vec<Event>>>,
    acked: Arc<Mutex<Acked>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(c: &[Clients], stable: &[String], nodes: &[usize]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let events = Arc::new(Mutex::new(Vec::new()));
        let acked = Arc::new(Mutex::new(Acked::default()));
        let mut tasks = Vec::new();
        for &node in nodes {
            let client = c[node].clone();
            tasks.push(tokio::spawn(data_keys(
                node,
                client.clone(),
                stable.to_vec(),
                Arc::clone(&stop),
                Arc::clone(&events),
            )));
            tasks.push(tokio::spawn(writes(
                node,
                client,
                Arc::clone(&stop),
                Arc::clone(&events),
                Arc::clone(&acked),
            )));
        }
        Self {
            stop,
            events,
            acked,
            tasks,
        }
    }

    /// Stops the load; every request it made, and what was acknowledged.
    async fn stop(self) -> (Vec<Event>, Acked) {
        self.stop.store(true, Ordering::SeqCst);
        for task in self.tasks {
            task.await.unwrap();
        }
        let events = std::mem::take(&mut *self.events.lock().unwrap());
        let acked = std::mem::take(&mut *self.acked.lock().unwrap());
        (events, acked)
    }
}

/// Runs `call` with the load's deadline (and a client-side guard past
/// it): the event, and the answer if it succeeded.
async fn timed<T>(
    node: usize,
    kind: Kind,
    events: &Mutex<Vec<Event>>,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Option<T> {
    let started = Instant::now();
    let result = tokio::time::timeout(DEADLINE + Duration::from_secs(2), call).await;
    let elapsed = started.elapsed();
    let (code, message, out) = match result {
        Ok(Ok(response)) => (Code::Ok, String::new(), Some(response.into_inner())),
        Ok(Err(status)) => (status.code(), status.message().to_string(), None),
        Err(_) => (Code::DeadlineExceeded, "no answer at all".to_string(), None),
    };
    events.lock().unwrap().push(Event {
        node,
        kind,
        started,
        elapsed,
        code,
        message,
    });
    out
}

async fn data_keys(
    node: usize,
    mut client: Clients,
    stable: Vec<String>,
    stop: Arc<AtomicBool>,
    events: Arc<Mutex<Vec<Event>>>,
) {
    let mut i = 0;
    while !stop.load(Ordering::SeqCst) {
        let key = &stable[i % stable.len()];
        i += 1;
        timed(
            node,
            Kind::DataKey,
            &events,
            client
                .data
                .generate_data_key(with_deadline(generate_request(key, CONTEXT))),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Creates a key, rotates it, disables it, and again. A write whose
/// outcome is unknown (UNAVAILABLE) leaves its key: the next one starts.
async fn writes(
    node: usize,
    mut client: Clients,
    stop: Arc<AtomicBool>,
    events: Arc<Mutex<Vec<Event>>>,
    acked: Arc<Mutex<Acked>>,
) {
    let mut current: Option<(String, Kind)> = None;
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let ok = match current.take() {
            None => {
                let created = timed(
                    node,
                    Kind::Create,
                    &events,
                    client.keys.create_key(with_deadline(pb::CreateKeyRequest {
                        alias: format!("load-n{}-{n}", node + 1),
                        ..Default::default()
                    })),
                )
                .await;
                created.and_then(|r| r.key).map(|key| {
                    acked
                        .lock()
                        .unwrap()
                        .created
                        .insert(key.key_id.clone(), node);
                    current = Some((key.key_id, Kind::Rotate));
                })
            }
            Some((id, Kind::Rotate)) => {
                let rotated = timed(
                    node,
                    Kind::Rotate,
                    &events,
                    client
                        .keys
                        .rotate_key(with_deadline(pb::RotateKeyRequest { key_id: id.clone() })),
                )
                .await;
                rotated.and_then(|r| r.key).map(|key| {
                    let mut acked = acked.lock().unwrap();
                    let v = acked.rotated.entry(id.clone()).or_default();
                    *v = (*v).max(key.primary_version);
                    current = Some((id, Kind::Disable));
                })
            }
            Some((id, _)) => {
                let disabled = timed(
                    node,
                    Kind::Disable,
                    &events,
                    client
                        .keys
                        .disable_key(with_deadline(pb::DisableKeyRequest { key_id: id.clone() })),
                )
                .await;
                disabled.map(|_| {
                    acked.lock().unwrap().disabled.insert(id, node);
                })
            }
        };
        if ok.is_none() {
            acked.lock().unwrap().failed += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// No request of the load waited out its deadline.
fn assert_nothing_hung(events: &[Event]) {
    let worst = events.iter().map(|e| e.elapsed).max().unwrap_or_default();
    for e in events {
        assert!(
            !matches!(e.code, Code::DeadlineExceeded | Code::Cancelled) && e.elapsed < DEADLINE,
            "a request hung: {e:?}"
        );
    }
    eprintln!(
        "{} requests, the slowest took {worst:?} (deadline {DEADLINE:?})",
        events.len()
    );
}

/// Every acknowledged write is there, read through node `i` (GetKey reads
/// the store): each created key exists, each rotated one has at least the
/// acknowledged version, each disabled one is DISABLED and its data keys
/// are refused.
async fn assert_acked_present(client: &mut Clients, i: usize, acked: &Acked) {
    for (id, by) in &acked.created {
        let got = client
            .keys
            .get_key(pb::GetKeyRequest { key_id: id.clone() })
            .await
            .unwrap_or_else(|s| {
                panic!(
                    "key {id}, created through n{}, not found through n{}: {s:?}",
                    by + 1,
                    i + 1
                )
            })
            .into_inner();
        let key = got.key.unwrap();
        if let Some(v) = acked.rotated.get(id) {
            assert!(
                key.primary_version >= *v,
                "key {id}: version {v} acknowledged, n{} reads {}",
                i + 1,
                key.primary_version
            );
        }
        if acked.disabled.contains_key(id) {
            assert_eq!(
                key.state,
                pb::KeyState::Disabled as i32,
                "key {id}: disabled, n{} reads {key:?}",
                i + 1
            );
        }
    }
    for id in acked.disabled.keys() {
        let refused = client.generate_data_key(id, CONTEXT).await.unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    }
}

/// Creates the keys the data keys use, and caches them on every node.
async fn stable_keys(c: &mut [Clients]) -> Vec<String> {
    let mut stable = Vec::new();
    for _ in 0..STABLE_KEYS {
        stable.push(c[0].create_key("").await.unwrap().key_id);
    }
    for client in c.iter_mut() {
        for key in &stable {
            client.generate_data_key(key, CONTEXT).await.unwrap();
        }
    }
    stable
}

/// What a data-key refusal of a stale node says.
const STALE: &str = "could not confirm the state of its keys";

/// How PostgreSQL goes away.
#[derive(Clone, Copy, Debug)]
enum Outage {
    /// `pg_ctl stop -m fast`: sessions are ended, a clean shutdown.
    Fast,
    /// SIGKILL to the postmaster: crash recovery at the next start.
    Kill,
}

/// How long PostgreSQL stays down: well past the freshness bound.
const OUTAGE: Duration = Duration::from_secs(3);
/// How soon after PostgreSQL is back every node serves data keys and
/// writes again.
const RECOVERY_BOUND: Duration = Duration::from_secs(5);
/// How long a poll may take on a loaded machine (its read, then the
/// write guard it waits for when it has changes to apply): the last
/// successful poll before an outage may be that much older.
const POLL_SLACK: Duration = Duration::from_millis(300);

/// Milliseconds from `from` to `to`, negative if `to` is earlier.
fn millis_since(from: Instant, to: Instant) -> i64 {
    match to.checked_duration_since(from) {
        Some(d) => d.as_millis() as i64,
        None => -((from - to).as_millis() as i64),
    }
}

/// The restart test, both ways: see [`Outage`].
async fn postgres_restarted_mid_load(outage: Outage) {
    require(&needs::POSTGRES);
    // A bound of 2 s: on a loaded machine, with fsync on, a node's own
    // write can hold its write guard for a second, and the poll that waits
    // to apply a change behind it would let a 1 s bound lapse while the
    // database is still up (seen here; see the issue note).
    let options = ClusterOptions {
        fsync: true,
        max_staleness_ms: 2_000,
        ..ClusterOptions::default()
    };
    let max_staleness = Duration::from_millis(options.max_staleness_ms as u64);
    let poll_interval = Duration::from_millis(options.poll_interval_ms as u64);
    let mut cluster = TestCluster::start(options).await;
    let mut c = clients(&cluster).await;
    let stable = stable_keys(&mut c).await;
    let nodes: Vec<usize> = (0..cluster.nodes.len()).collect();
    let load = Load::start(&c, &stable, &nodes);
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    let port = cluster.pg.port();
    let down = Instant::now();
    match outage {
        Outage::Fast => cluster.pg.stop_fast(),
        Outage::Kill => cluster.pg.kill(),
    }
    let stopped = Instant::now();
    tokio::time::sleep(OUTAGE).await;
    // The test's own thread (the postmaster's parent-death signal). The
    // database is down until `starting`, back by `back` (pg_isready, polled
    // every 20 ms: it may accept connections a little earlier).
    let starting = Instant::now();
    cluster.pg.start();
    let back = Instant::now();
    assert_eq!(
        cluster.pg.port(),
        port,
        "PostgreSQL came back on another port"
    );
    eprintln!(
        "{outage:?}: PostgreSQL stopped in {:?}, started {:?} after the stop began, ready \
         {:?} later",
        stopped - down,
        starting - down,
        back - starting
    );
    tokio::time::sleep(RECOVERY_BOUND + Duration::from_secs(1)).await;
    let (events, acked) = load.stop().await;

    assert_nothing_hung(&events);
    // Failures are UNAVAILABLE: stale data keys, writes with no database
    // (or an unknown outcome).
    for e in events.iter().filter(|e| e.code != Code::Ok) {
        assert_eq!(e.code, Code::Unavailable, "{}: {e:?}", e.message);
    }
    // During the outage: data keys are served until the node is stale,
    // never refused as stale before, and refused once it is. The last poll
    // that succeeded was sent at most a poll interval, plus the time the
    // poll before it took (POLL_SLACK), before PostgreSQL began to stop.
    // A data key may also be refused because it needed the store: a record
    // read while a write overlapped is used but not cached (the write
    // epoch), so under this load a "cached" key is read again now and then.
    let earliest_stale = down + max_staleness.saturating_sub(poll_interval + POLL_SLACK);
    let latest_fresh = stopped + max_staleness;
    let mut first_refused = vec![None; nodes.len()];
    let mut needed_store = 0;
    for e in events.iter().filter(|e| e.kind == Kind::DataKey) {
        let stale = e.message.contains(STALE);
        if e.code == Code::Unavailable && !stale {
            assert!(e.message.contains("key store"), "{e:?}");
            needed_store += 1;
        }
        if e.code == Code::Unavailable && stale {
            assert!(
                e.started + e.elapsed >= earliest_stale,
                "a data key refused {:?} after the outage began, before n{} can be stale: {e:?}",
                e.started.saturating_duration_since(down),
                e.node + 1
            );
            if e.started < starting && first_refused[e.node].is_none() {
                first_refused[e.node] = Some(e.started + e.elapsed - down);
            }
        }
        if e.code == Code::Ok && e.started > latest_fresh + Duration::from_millis(10) {
            assert!(
                e.started >= starting,
                "n{} served a data key {:?} after PostgreSQL stopped, past the bound",
                e.node + 1,
                e.started - stopped
            );
        }
    }
    eprintln!("{outage:?}: {needed_store} data keys refused because they needed the store");
    for (node, first) in first_refused.iter().enumerate() {
        let first = first.unwrap_or_else(|| panic!("n{} never refused a data key", node + 1));
        eprintln!(
            "{outage:?}: n{} refused data keys from {first:?} after PostgreSQL began to stop \
             (max_staleness {max_staleness:?})",
            node + 1
        );
    }
    // Recovery, without restarting coffre: per node, the first data key
    // and the first write that succeeded among those started after
    // PostgreSQL began to start, from the moment it was ready (negative:
    // it accepted connections before pg_isready saw it).
    for node in &nodes {
        let first = |kinds: &[Kind]| {
            events
                .iter()
                .filter(|e| e.node == *node && kinds.contains(&e.kind) && e.code == Code::Ok)
                .filter(|e| e.started >= starting)
                .map(|e| millis_since(back, e.started + e.elapsed))
                .min()
        };
        let data = first(&[Kind::DataKey]).expect("no data key served after the restart");
        let write = first(&[Kind::Create, Kind::Rotate, Kind::Disable])
            .expect("no write acknowledged after the restart");
        eprintln!(
            "{outage:?}: n{}: first data key {data} ms, first write {write} ms after PostgreSQL \
             was ready",
            node + 1
        );
        let bound = RECOVERY_BOUND.as_millis() as i64;
        assert!(
            data <= bound && write <= bound,
            "n{} recovered too slowly: data key {data:?}, write {write:?}",
            node + 1
        );
    }
    eprintln!(
        "{outage:?}: acknowledged {} creates, {} rotations, {} disables; {} writes failed",
        acked.created.len(),
        acked.rotated.len(),
        acked.disabled.len(),
        acked.failed
    );
    assert!(
        !acked.disabled.is_empty(),
        "the load acknowledged no disable"
    );
    for (i, client) in c.iter_mut().enumerate() {
        assert_acked_present(client, i, &acked).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
async fn postgres_stopped_fast_mid_load_then_served_again() {
    postgres_restarted_mid_load(Outage::Fast).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
async fn postgres_killed_mid_load_then_served_again() {
    postgres_restarted_mid_load(Outage::Kill).await;
}

/// The nodes' listening connections (`application_name` `coffre/<node>/listen`),
/// as `name pid` lines, sorted.
fn listeners(cluster: &TestCluster) -> Vec<String> {
    let out = cluster.pg.psql(
        &cluster.db,
        "SELECT application_name || ' ' || pid FROM pg_stat_activity \
         WHERE application_name LIKE 'coffre/%/listen' ORDER BY 1",
    );
    out.lines().map(str::to_string).collect()
}

/// Waits until every node listens on a connection that is not one of
/// `old`; the new ones.
async fn wait_for_listeners(
    cluster: &TestCluster,
    old: &[String],
    within: Duration,
) -> Vec<String> {
    let started = Instant::now();
    loop {
        let now = listeners(cluster);
        if now.len() == cluster.nodes.len() && now.iter().all(|l| !old.contains(l)) {
            return now;
        }
        assert!(
            started.elapsed() < within,
            "the nodes do not all listen again after {within:?}: {now:?} (before: {old:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Hammers GenerateDataKey on `key` through `client` from `since` until
/// it is refused; the start of the first refused request, after `since`.
/// Panics if a request started past `since + bound` is served.
async fn first_refusal(
    mut client: Clients,
    key: String,
    since: Instant,
    bound: Duration,
) -> Duration {
    loop {
        let started = Instant::now();
        match client
            .data
            .generate_data_key(generate_request(&key, CONTEXT))
            .await
        {
            Ok(_) => assert!(
                started <= since + bound,
                "a data key started {:?} after the disable was served (bound {bound:?})",
                started - since
            ),
            Err(s) => {
                assert!(
                    matches!(s.code(), Code::FailedPrecondition | Code::Unavailable),
                    "{s:?}"
                );
                return started.saturating_duration_since(since);
            }
        }
        assert!(since.elapsed() < Duration::from_secs(20), "never refused");
    }
}

/// Disables a fresh key through n1 that every node has cached; how long
/// after the acknowledgement each other node refused it.
async fn disable_propagation(c: &mut [Clients], bound: Duration) -> Vec<Duration> {
    let key = c[0].create_key("").await.unwrap().key_id;
    for client in c.iter_mut() {
        client.generate_data_key(&key, CONTEXT).await.unwrap();
    }
    c[0].keys
        .disable_key(pb::DisableKeyRequest {
            key_id: key.clone(),
        })
        .await
        .unwrap();
    let acknowledged = Instant::now();
    let hammers: Vec<_> = c
        .iter()
        .skip(1)
        .map(|client| {
            tokio::spawn(first_refusal(
                client.clone(),
                key.clone(),
                acknowledged,
                bound,
            ))
        })
        .collect();
    let mut out = Vec::new();
    for h in hammers {
        out.push(h.await.unwrap());
    }
    out
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
async fn killed_listeners_leave_the_bound_to_the_polls_and_come_back() {
    require(&needs::POSTGRES);
    // Polls far apart (600 ms) against NOTIFY's milliseconds: which of the
    // two carried a change shows in how soon it arrived.
    let options = ClusterOptions {
        poll_interval_ms: 600,
        ..ClusterOptions::default()
    };
    let bound = Duration::from_millis(options.max_staleness_ms as u64);
    let cluster = TestCluster::start(options).await;
    let mut c = clients(&cluster).await;
    let before = wait_for_listeners(&cluster, &[], Duration::from_secs(10)).await;
    let mut notified = Vec::new();
    for _ in 0..3 {
        notified.extend(disable_propagation(&mut c, bound).await);
    }
    eprintln!("with NOTIFY: a disable refused after {notified:?}");

    // Every listener killed; a disable made at once is still refused
    // everywhere within the bound (the polls carry it if NOTIFY is lost).
    let killed = cluster.pg.psql(
        &cluster.db,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name LIKE 'coffre/%/listen'",
    );
    assert_eq!(killed, cluster.nodes.len().to_string(), "{before:?}");
    let killed_at = Instant::now();
    let after_kill = disable_propagation(&mut c, bound).await;
    eprintln!("listeners killed: a disable made at once refused after {after_kill:?}");

    // They listen again, on new connections, and NOTIFY carries changes
    // again: milliseconds, where the polls alone would take 300 ms on
    // average (uniform over the 600 ms interval).
    let again = wait_for_listeners(&cluster, &before, Duration::from_secs(5)).await;
    eprintln!(
        "listening again {:?} after the kill: {again:?}",
        killed_at.elapsed()
    );
    let mut resumed = Vec::new();
    for _ in 0..4 {
        resumed.extend(disable_propagation(&mut c, bound).await);
    }
    let m = median(resumed.clone());
    eprintln!("NOTIFY again: a disable refused after {resumed:?} (median {m:?})");
    assert!(
        m < Duration::from_millis(100),
        "changes arrive at poll speed, not NOTIFY's: {resumed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
async fn a_node_killed_under_load_loses_no_acknowledged_write() {
    require(&needs::POSTGRES);
    let mut cluster = TestCluster::start(ClusterOptions::default()).await;
    let mut c = clients(&cluster).await;
    let stable = stable_keys(&mut c).await;
    let nodes: Vec<usize> = (0..cluster.nodes.len()).collect();
    let load = Load::start(&c, &stable, &nodes);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // SIGKILL, mid-load: n1 may be in the middle of a write.
    cluster.kill_node(0);
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let (events, acked) = load.stop().await;

    // The other nodes served every request throughout.
    for e in events.iter().filter(|e| e.node != 0) {
        assert_eq!(e.code, Code::Ok, "{}: {e:?}", e.message);
    }
    let after_kill = events
        .iter()
        .filter(|e| e.node != 0 && e.started > killed)
        .count();
    assert!(after_kill > 0, "the others made no request after the kill");
    let by_n1 = acked.by_node(0);
    eprintln!(
        "acknowledged {} creates, {} rotations, {} disables ({by_n1} creates and disables by n1)",
        acked.created.len(),
        acked.rotated.len(),
        acked.disabled.len()
    );
    assert!(by_n1 > 0, "n1 acknowledged no write before it was killed");
    // Everything acknowledged, n1's included, through n2 and n3.
    for (i, client) in c.iter_mut().enumerate().skip(1) {
        assert_acked_present(client, i, &acked).await;
    }
    // n1 restarted sees it all.
    cluster.start_node(0);
    cluster.wait_ready(0, Duration::from_secs(60));
    let mut n1 = Clients::connect(&cluster.nodes[0].endpoint, &cluster.pki()).await;
    assert_acked_present(&mut n1, 0, &acked).await;
}

/// The deadline of the requests in flight at the cut: long, so that one
/// that waits for the database shows as hung rather than refused.
const IN_FLIGHT_DEADLINE: Duration = Duration::from_secs(15);

/// One request to n3 at the cut: its outcome and how long it took.
async fn in_flight<T: Send + 'static>(
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>> + Send + 'static,
) -> tokio::task::JoinHandle<(Result<T, Code>, Duration)> {
    tokio::spawn(async move {
        let started = Instant::now();
        let out = call
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| s.code());
        (out, started.elapsed())
    })
}

fn long_deadline<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(IN_FLIGHT_DEADLINE);
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
async fn requests_in_flight_when_the_database_is_cut_are_refused_quickly() {
    require(&needs::POSTGRES);
    let options = ClusterOptions {
        proxied: vec![2],
        ..ClusterOptions::default()
    };
    let max_staleness = Duration::from_millis(options.max_staleness_ms as u64);
    let cluster = TestCluster::start(options).await;
    let mut c = clients(&cluster).await;
    // Keys n3 has never read: a request naming one reads the store.
    let read = c[0].create_key("").await.unwrap().key_id;
    let uncached = c[0].create_key("").await.unwrap().key_id;
    let warm = c[0].create_key("").await.unwrap().key_id;
    // n3 is fresh, and its pool holds connections it used.
    c[2].generate_data_key(&warm, CONTEXT).await.unwrap();
    c[2].keys
        .get_key(pb::GetKeyRequest {
            key_id: warm.clone(),
        })
        .await
        .unwrap();

    let proxy = cluster.nodes[2].proxy.as_ref().unwrap();
    proxy.blackhole();
    // At once, while n3 is still fresh: a read through to the store, a
    // data key under a key n3 must load, and a write.
    let mut n3 = c[2].clone();
    let get = in_flight(async move {
        n3.keys
            .get_key(long_deadline(pb::GetKeyRequest { key_id: read }))
            .await
    })
    .await;
    let mut n3 = c[2].clone();
    let data = in_flight(async move {
        n3.data
            .generate_data_key(long_deadline(generate_request(&uncached, CONTEXT)))
            .await
    })
    .await;
    let mut n3 = c[2].clone();
    let create = in_flight(async move {
        n3.keys
            .create_key(long_deadline(pb::CreateKeyRequest {
                alias: "in-flight".to_string(),
                ..Default::default()
            }))
            .await
    })
    .await;
    let (get, get_took) = get.await.unwrap();
    let (data, data_took) = data.await.unwrap();
    let (create, create_took) = create.await.unwrap();
    eprintln!(
        "in flight at the cut: GetKey {:?} in {get_took:?}, GenerateDataKey {:?} in \
         {data_took:?}, CreateKey {:?} in {create_took:?}",
        get.as_ref().map(drop),
        data.as_ref().map(drop),
        create.as_ref().map(drop),
    );
    // Reads: refused within twice the bound, not at the client's deadline.
    let read_bound = 2 * max_staleness;
    assert_eq!(get.err(), Some(Code::Unavailable), "GetKey in {get_took:?}");
    assert!(get_took <= read_bound, "GetKey took {get_took:?}");
    assert_eq!(
        data.err(),
        Some(Code::Unavailable),
        "GenerateDataKey in {data_took:?}"
    );
    assert!(
        data_took <= read_bound,
        "GenerateDataKey took {data_took:?}"
    );
    // A write: its caller stops waiting (outcome unknown); the transaction
    // is not cancelled.
    assert_eq!(
        create.as_ref().err(),
        Some(&Code::Unavailable),
        "CreateKey in {create_took:?}"
    );
    assert!(
        create_took <= WRITE_BOUND,
        "CreateKey took {create_took:?} (bound {WRITE_BOUND:?})"
    );

    // Healed: whatever became of the write, n3 and n1 agree on it.
    proxy.heal();
    let healed = Instant::now();
    let listed = |mut client: Clients| async move {
        client
            .keys
            .list_keys(pb::ListKeysRequest {
                page_size: 10,
                alias_prefix: "in-flight".into(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().keys.len())
    };
    let on_n1 = listed(c[0].clone()).await.unwrap();
    loop {
        match listed(c[2].clone()).await {
            Ok(on_n3) => {
                assert_eq!(on_n3, on_n1, "n3 and n1 disagree on the in-flight write");
                break;
            }
            Err(s) => assert_eq!(s.code(), Code::Unavailable, "{s:?}"),
        }
        assert!(
            healed.elapsed() < Duration::from_secs(30),
            "n3 never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "after the heal: the in-flight CreateKey {} ({:?} after the heal)",
        if on_n1 == 1 {
            "committed"
        } else {
            "did not commit"
        },
        healed.elapsed()
    );
    // And it serves data keys again once a poll has confirmed its caches
    // (a store read can succeed before the poller's next pass does).
    loop {
        match c[2].generate_data_key(&warm, CONTEXT).await {
            Ok(_) => break,
            Err(s) => assert_eq!(s.code(), Code::Unavailable, "{s:?}"),
        }
        assert!(
            healed.elapsed() < Duration::from_secs(30),
            "n3 never served data keys again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How long a write's caller waits for its transaction on a node cut off
/// from the database (the store gives up after five times the bound, 5 s
/// with the defaults), with a margin for the machine.
const WRITE_BOUND: Duration = Duration::from_secs(6);
