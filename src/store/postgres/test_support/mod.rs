//! What the PostgreSQL store's unit tests need: the integration tests'
//! harness (`tests/common/pg.rs`, private servers) and the machine check
//! (`build/needs.rs`), included here as they are, one server per test
//! process shared by every test, and [`PgFactory`], the conformance
//! suite's factory over it.

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use zeroize::Zeroizing;

use super::{DatabaseUrl, PgConnector, PgStore, migrate, open_pool};
use crate::config::{ClusterConfig, ClusterMode, NodeId, PostgresConfig, UrlSource};
use crate::store::conformance::{OpenStore, StoreFactory};
use crate::store::integrity::{IntegrityState, RECORD_MAC_KEY_LEN, RecordMac};
use crate::store::{KeyStore, StoreError};

#[path = "../../../../build/needs.rs"]
pub mod needs;
#[path = "../../../../tests/common/pg.rs"]
pub mod pg;

#[path = "../../../../tests/common/ports.rs"]
pub mod ports;

/// What `pg.rs` takes from the integration tests' `common::binary`.
pub mod binary {
    pub use super::ports::free_port;
}

/// Fails, saying what to install, unless this machine has PostgreSQL's
/// binaries (as `tests/common/mod.rs`'s `require` does): a test gets here
/// when the build found them, or was told they are required
/// (`COFFRE_REQUIRE_POSTGRES=1`), or with `--include-ignored`.
pub fn require_postgres() {
    let need = &needs::POSTGRES;
    if let Err(missing) = need.detect(&|var| std::env::var(var).ok()) {
        panic!(
            "this test needs {}, and this machine lacks it: {missing}. To run it, {}. Without \
             it (and without {}=1 at build time) `cargo test` reports it as ignored, not run",
            need.what, need.how, need.require
        );
    }
}

static SERVER: OnceLock<pg::PgCluster> = OnceLock::new();

/// The file that marks a server directory as a unit-test process's shared
/// one.
const MARKER: &str = "coffre-unit-tests";

/// The one PostgreSQL server of this test process, started on first use.
///
/// It is started on a thread of its own that never ends: the postmaster
/// dies with the thread that started it (the harness's parent-death
/// signal), so it lives as long as the process and is killed by the
/// kernel when the process exits. Its temporary directory
/// (`/tmp/coffre-pg-*`, marked as this one's) stays behind then; the next
/// test process removes it ([`remove_stale_servers`]), and each test's
/// database is dropped when its store is ([`OpenPg`]).
pub fn server() -> &'static pg::PgCluster {
    SERVER.get_or_init(|| {
        remove_stale_servers();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("postgres".into())
            .spawn(move || {
                tx.send(pg::PgCluster::primary()).unwrap();
                loop {
                    std::thread::park();
                }
            })
            .unwrap();
        let cluster = rx
            .recv()
            .expect("the thread starting PostgreSQL failed (see its panic above)");
        let _ = std::fs::write(cluster.dir().join(MARKER), b"");
        cluster
    })
}

/// Removes the directories that earlier unit-test processes' shared
/// servers left in `/tmp`: marked ones whose postmaster (the pid in
/// `postmaster.pid`) is gone. Other directories (the integration tests',
/// another process's live server) are left alone.
fn remove_stale_servers() {
    let Ok(entries) = std::fs::read_dir("/tmp") else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let ours = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with("coffre-pg-"))
            && path.join(MARKER).is_file();
        if !ours {
            continue;
        }
        let pid = std::fs::read_to_string(path.join("data/postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<u32>().ok()));
        let alive = pid.is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// Drops database `db` of the shared server (its sessions cut).
fn drop_database(db: &str) {
    let _ = server().try_psql(
        "postgres",
        &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
    );
}

/// A database of the shared server that is dropped with this value.
#[derive(Debug)]
pub struct TestDatabase {
    pub url: String,
    name: String,
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        drop_database(&self.name);
    }
}

/// The integrity key of the factory's stores.
pub const TEST_KEY: [u8; RECORD_MAC_KEY_LEN] = [0x5a; RECORD_MAC_KEY_LEN];

pub fn test_mac() -> Arc<RecordMac> {
    Arc::new(RecordMac::new(&TEST_KEY).unwrap())
}

pub fn cluster_config() -> ClusterConfig {
    ClusterConfig {
        node_id: NodeId::new("test").unwrap(),
        mode: ClusterMode::Strict,
        max_staleness: Duration::from_millis(1000),
        poll_interval: Duration::from_millis(200),
        lease_ttl: Duration::from_millis(10_000),
        digest_interval: Duration::from_secs(60),
        require_synchronous_standby: false,
        notify: true,
    }
}

/// A connector to `url` with a small pool.
pub fn connector(url: &str) -> Arc<PgConnector> {
    let url = DatabaseUrl::new(Zeroizing::new(url.to_string()), "the test URL");
    let store = PostgresConfig {
        url: UrlSource::Env("COFFRE_TEST_DATABASE_URL".into()),
        pool_size: 4,
        ca_file: None,
    };
    Arc::new(PgConnector::new(&url, &store, &cluster_config()).unwrap())
}

/// A new database on the shared server, migrated (dropped with the value).
pub async fn new_database() -> TestDatabase {
    let server = server();
    let name = server.create_database();
    let url = server.url(&name);
    let c = connector(&url);
    let mut client = c.connect().await.unwrap();
    migrate(&mut client, &c).await.unwrap();
    TestDatabase { url, name }
}

/// A new pool and store on `url` (not yet with its integrity key).
pub async fn open_store(url: &str) -> Result<PgStore, StoreError> {
    let c = connector(url);
    let (pool, _) = open_pool(&c)
        .await
        .map_err(|e| StoreError::Io(e.to_string()))?;
    PgStore::open(pool, c).await
}

/// A store on `url` under `mac`: migrating (`new`, a fresh database) or
/// expecting it sealed already.
pub async fn open_sealed(
    url: &str,
    mac: &Arc<RecordMac>,
    new: bool,
) -> Result<PgStore, StoreError> {
    let store = open_store(url).await?;
    match store.install_integrity(mac, new).await? {
        IntegrityState::Migrated { .. } if new => Ok(store),
        IntegrityState::Sealed if !new => Ok(store),
        other => Err(StoreError::Corrupt(format!(
            "installing the integrity key gave {other:?}"
        ))),
    }
}

/// A database per store, sealed under [`TEST_KEY`].
#[derive(Debug)]
pub struct PgFactory;

/// One database and its current handle; the database is dropped with it
/// (after the store: fields drop in order).
pub struct OpenPg {
    pub store: Option<Arc<PgStore>>,
    pub url: String,
    _db: TestDatabase,
}

#[async_trait::async_trait]
impl StoreFactory for PgFactory {
    async fn open(&self) -> Result<Box<dyn OpenStore>, StoreError> {
        let db = new_database().await;
        let url = db.url.clone();
        let store = open_sealed(&url, &test_mac(), true).await?;
        Ok(Box::new(OpenPg {
            store: Some(Arc::new(store)),
            url,
            _db: db,
        }))
    }
}

#[async_trait::async_trait]
impl OpenStore for OpenPg {
    fn handle(&self) -> Arc<dyn KeyStore> {
        self.store.clone().expect("the store is open")
    }

    /// A second pool on the same database, as another node has.
    async fn second_handle(&self) -> Result<Arc<dyn KeyStore>, StoreError> {
        Ok(Arc::new(open_sealed(&self.url, &test_mac(), false).await?))
    }

    async fn reopen(&mut self) -> Result<(), StoreError> {
        drop(self.store.take());
        self.store = Some(Arc::new(open_sealed(&self.url, &test_mac(), false).await?));
        Ok(())
    }

    async fn reopen_under_integrity_key(&mut self, mac: &Arc<RecordMac>) -> Result<(), StoreError> {
        drop(self.store.take());
        self.store = Some(Arc::new(open_sealed(&self.url, mac, false).await?));
        Ok(())
    }
}

/// Runs `future` to its end on a runtime of its own.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}
