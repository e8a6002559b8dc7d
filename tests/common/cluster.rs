//! Several `coffre serve` nodes on one PostgreSQL database, for the
//! cluster tests (design/several-nodes.md §7.4): a private PostgreSQL
//! server (`pg`), one `hsm-sim serve` process that every node uses (a
//! network HSM), and N nodes (`n1`…), each a `coffre serve` process with
//! its own configuration, data directory, port and metrics port, on the
//! same dev PKI. A node may reach the database through a [`TcpProxy`],
//! which the test can cut. Configurations come from the library's
//! [`coffre::server::dev_cluster::node_config`], as `coffre dev --nodes`
//! writes them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use coffre::server::DataDir;
use coffre::server::dev::{dev_principals, ensure_dev_dir, resolve_attributes};
use coffre::server::dev_cluster::{NodeConfig, node_config};
use tonic::transport::Channel;

use super::binary::{Guard, HSM_PIN, free_port, start_hsm, workspace_binary};
use super::pg::PgCluster;
use super::proxy::TcpProxy;

/// How the nodes are set up.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub nodes: usize,
    /// Nodes (by index) whose database connection goes through a proxy.
    pub proxied: Vec<usize>,
    pub max_staleness_ms: i64,
    pub poll_interval_ms: i64,
    /// `fsync = on` in PostgreSQL (durability tests).
    pub fsync: bool,
    /// `[cluster] notify` (default true): false leaves the nodes to learn
    /// of changes by their polls alone, as behind a pooler that drops
    /// LISTEN.
    pub notify: bool,
    /// A streaming standby of `pg` (the failover tests): see
    /// [`StandbyOptions`].
    pub standby: Option<StandbyOptions>,
}

/// A standby `s1` of the primary, which reaches it through a
/// [`TcpProxy`] the test can cut ([`TestCluster::replication`]); every
/// node's URL then names both servers, the primary first
/// (`host=127.0.0.1,127.0.0.1 port=P1,P2`, so coffre asks for
/// `target_session_attrs=read-write`).
#[derive(Debug, Clone, Copy)]
pub struct StandbyOptions {
    /// Commits wait for the standby (`synchronous_standby_names = 'ANY 1
    /// (s1)'`); else asynchronous replication.
    pub synchronous: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            nodes: 3,
            proxied: Vec::new(),
            max_staleness_ms: 1_000,
            poll_interval_ms: 200,
            fsync: false,
            notify: true,
            standby: None,
        }
    }
}

#[derive(Debug)]
pub struct TestNode {
    pub node_id: String,
    pub endpoint: String,
    pub metrics: SocketAddr,
    pub config: PathBuf,
    pub log: PathBuf,
    pub proxy: Option<TcpProxy>,
    process: Option<Guard>,
}

#[derive(Debug)]
pub struct TestCluster {
    pub nodes: Vec<TestNode>,
    pub pg: PgCluster,
    pub db: String,
    /// The standby of [`ClusterOptions::standby`].
    pub standby: Option<PgCluster>,
    /// The standby's replication connection to `pg` goes through this.
    pub replication: Option<TcpProxy>,
    _hsm: Guard,
    // Last: removed after every process is gone.
    pub dir: tempfile::TempDir,
}

impl TestCluster {
    pub async fn start(options: ClusterOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        ensure_dev_dir(&data).unwrap();
        std::fs::write(data.hsm_pin(), HSM_PIN).unwrap();
        let hsm_port = free_port();
        let hsm = start_hsm(&data.hsm_state(), hsm_port);
        let hsm_endpoint = format!("http://127.0.0.1:{hsm_port}");
        let pg = if options.fsync {
            PgCluster::builder().fsync().start()
        } else {
            PgCluster::primary()
        };
        let db = pg.create_database();
        let (standby, replication) = match options.standby {
            Some(o) => {
                let (standby, proxy) = start_standby(&pg, o).await;
                (Some(standby), Some(proxy))
            }
            None => (None, None),
        };
        let principals = dev_principals(1);
        let attributes = resolve_attributes(1, &[]).unwrap();
        let mut nodes = Vec::new();
        for i in 0..options.nodes {
            let node_id = format!("n{}", i + 1);
            let node_dir = dir.path().join("nodes").join(&node_id);
            std::fs::create_dir_all(&node_dir).unwrap();
            let proxy = if options.proxied.contains(&i) {
                Some(TcpProxy::start(SocketAddr::from(([127, 0, 0, 1], pg.port()))).await)
            } else {
                None
            };
            let url = match (&proxy, &standby) {
                (_, Some(s)) => format!(
                    "host=127.0.0.1,127.0.0.1 port={},{} user={} dbname={db} sslmode=disable",
                    pg.port(),
                    s.port(),
                    super::pg::SUPERUSER
                ),
                (Some(p), None) => pg
                    .url(&db)
                    .replace(&format!(":{}/", pg.port()), &format!(":{}/", p.addr.port())),
                (None, None) => pg.url(&db),
            };
            let url_file = node_dir.join("postgres-url");
            std::fs::write(&url_file, &url).unwrap();
            std::fs::set_permissions(
                &url_file,
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )
            .unwrap();
            let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let text = node_config(NodeConfig {
                node_id: &node_id,
                node_dir: &node_dir,
                listen,
                metrics,
                dir: &data,
                hsm_endpoint: &hsm_endpoint,
                url_file: &url_file,
                principals: &principals,
                attributes: &attributes,
                quorum: 1,
                cluster: vec![
                    ("max_staleness_ms", options.max_staleness_ms),
                    ("poll_interval_ms", options.poll_interval_ms),
                ],
            })
            .unwrap();
            let text = if options.notify {
                text
            } else {
                with_notify_off(&text)
            };
            let config = node_dir.join("coffre.toml");
            std::fs::write(&config, text).unwrap();
            nodes.push(TestNode {
                node_id,
                endpoint: format!("https://{listen}"),
                metrics,
                config,
                log: node_dir.join("coffre.log"),
                proxy,
                process: None,
            });
        }
        let out = Command::new(workspace_binary("coffre"))
            .args(["store", "migrate", "--config"])
            .arg(&nodes[0].config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "migrate: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut cluster = Self {
            nodes,
            pg,
            db,
            standby,
            replication,
            _hsm: hsm,
            dir,
        };
        for i in 0..options.nodes {
            cluster.start_node(i);
        }
        for i in 0..options.nodes {
            cluster.wait_ready(i, Duration::from_secs(60));
        }
        cluster
    }

    /// Starts node `i` (again), its output appended to its log.
    pub fn start_node(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .unwrap();
        let mut cmd = Command::new(workspace_binary("coffre"));
        cmd.arg("serve").arg("--config").arg(&node.config);
        if nix::unistd::geteuid().is_root() {
            cmd.arg("--allow-root");
        }
        cmd.env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        node.process = Some(Guard(cmd.spawn().unwrap()));
    }

    /// SIGKILLs node `i`.
    pub fn kill_node(&mut self, i: usize) {
        drop(self.nodes[i].process.take());
    }

    /// Waits until node `i`'s /readyz answers 200.
    pub fn wait_ready(&mut self, i: usize, within: Duration) {
        let started = Instant::now();
        loop {
            if let Some(Guard(child)) = self.nodes[i].process.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "node {} exited ({status}):\n{}",
                    self.nodes[i].node_id,
                    self.log(i)
                );
            }
            if self.ready(i) {
                return;
            }
            assert!(
                started.elapsed() < within,
                "node {} not ready in {within:?}:\n{}",
                self.nodes[i].node_id,
                self.log(i)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether node `i`'s /readyz answers 200.
    pub fn ready(&self, i: usize) -> bool {
        http_status(self.nodes[i].metrics, "/readyz").is_some_and(|s| s.contains("200"))
    }

    /// `coffre cluster status --json`, through node `via`'s configuration
    /// (its URL: through its proxy, if it has one).
    pub fn status(&self, via: usize) -> serde_json::Value {
        let out = Command::new(super::binary::COFFRE)
            .args(["cluster", "status", "--json", "--config"])
            .arg(&self.nodes[via].config)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "coffre cluster status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Node `i`'s freshness as `coffre cluster status` (read through node
    /// `via`) reports it: `None` while it has reported none.
    pub fn reported_freshness(&self, via: usize, i: usize) -> Option<serde_json::Value> {
        let status = self.status(via);
        let node = status["nodes"]
            .as_array()
            .and_then(|nodes| {
                nodes
                    .iter()
                    .find(|n| n["node_id"] == self.nodes[i].node_id.as_str())
            })
            .unwrap_or_else(|| panic!("node {} not in {status}", self.nodes[i].node_id));
        Some(node["freshness"].clone()).filter(|f| !f.is_null())
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    pub fn pki(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    /// An mTLS channel to node `i` as the dev `identity`.
    pub async fn channel(&self, i: usize, identity: &str) -> Channel {
        super::channel_as(&self.nodes[i].endpoint, &self.pki(), identity).await
    }
}

/// `text` (a node's configuration) with `[cluster] notify = false`:
/// `node_config` takes integer settings only, and this one is a boolean.
fn with_notify_off(text: &str) -> String {
    let mut root: toml::Table = text.parse().unwrap();
    let cluster = root
        .get_mut("cluster")
        .and_then(toml::Value::as_table_mut)
        .expect("a node's configuration has a [cluster] table");
    cluster.insert("notify".into(), toml::Value::Boolean(false));
    toml::to_string(&root).unwrap()
}

/// The standby `s1` of `pg`, its replication connection moved onto a
/// proxy (`primary_conninfo` is reloadable), synchronous if asked; waits
/// until it streams through the proxy.
async fn start_standby(pg: &PgCluster, options: StandbyOptions) -> (PgCluster, TcpProxy) {
    let standby = pg.standby("s1");
    let proxy = TcpProxy::start(SocketAddr::from(([127, 0, 0, 1], pg.port()))).await;
    standby.psql(
        "postgres",
        &format!(
            "ALTER SYSTEM SET primary_conninfo = 'host=127.0.0.1 port={} user={} \
             application_name=s1'",
            proxy.addr.port(),
            super::pg::SUPERUSER
        ),
    );
    standby.psql("postgres", "SELECT pg_reload_conf()");
    if options.synchronous {
        pg.require_synchronous_standby("s1");
    }
    let wanted = format!("streaming|{}", proxy.addr.port());
    let started = Instant::now();
    loop {
        let seen = standby.psql(
            "postgres",
            "SELECT status || '|' || sender_port FROM pg_stat_wal_receiver",
        );
        if seen == wanted {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the standby does not stream through the proxy: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (standby, proxy)
}

/// The status line of `GET path`, if the server answers.
pub fn http_status(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    response.lines().next().map(str::to_string)
}
