//! `coffre dev --nodes N`: high availability on one machine, in one data
//! directory. This process runs a private PostgreSQL server
//! (`DIR/postgres`, [`LocalPostgres`]) and the simulated HSM (served over
//! gRPC from `DIR/hsm-sim.state`, as a network HSM would be), and starts
//! N `coffre serve` processes, nodes `n1`…`nN`, on consecutive ports from
//! `--listen`, each with a configuration and data directory of its own
//! under `DIR/nodes/` and the shared dev PKI. It writes `DIR/cluster.json`
//! (DESIGN.md, "Several nodes") and waits for Ctrl-C, then stops them all.
//!
//! A node that exits (killed, say, to watch the others carry on) is
//! reported and not restarted; the others serve on. Restarting `coffre dev
//! --nodes N` on the same directory keeps every key. With
//! `--preload-keys M`, node n1 first loads M keys alone (see [`preload`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

use super::DataDir;
use super::dev::{DevOptions, dev_principals, ensure_dev_dir, resolve_attributes};
use crate::authz::Role;
use crate::hsm::sim::LocalSimHsm;
use crate::pki;
use crate::store::postgres::local::{LocalPostgres, ensure_database};

/// The most nodes `--nodes` starts.
pub const MAX_NODES: u32 = 9;
/// How long each node has to become ready.
const NODE_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// `DIR/cluster.json` (0600: the URL holds the database's password, which
/// is also why it is zeroized and redacted in `Debug`).
#[derive(Serialize)]
pub struct ClusterFile {
    pub postgres_url: zeroize::Zeroizing<String>,
    pub hsm_endpoint: String,
    pub nodes: Vec<NodeEntry>,
}

impl std::fmt::Debug for ClusterFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterFile")
            .field(
                "postgres_url",
                &crate::store::postgres::redacted(&self.postgres_url),
            )
            .field("hsm_endpoint", &self.hsm_endpoint)
            .field("nodes", &self.nodes)
            .finish()
    }
}

#[derive(Debug, Serialize)]
pub struct NodeEntry {
    pub node_id: String,
    pub endpoint: String,
    pub metrics: String,
    pub pid: u32,
    pub data_dir: PathBuf,
    pub log: PathBuf,
}

/// The cluster while it runs.
#[derive(Debug)]
pub struct DevCluster {
    pub file: ClusterFile,
    pub cluster_json: PathBuf,
    postgres: LocalPostgres,
    hsm_shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    hsm_task: Option<tokio::task::JoinHandle<()>>,
    nodes: Vec<(String, Child)>,
    _lock: super::DirLock,
}

/// A port free on 127.0.0.1 now.
async fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    Ok(l.local_addr()?.port())
}

/// The path of the `coffre` binary running now.
fn coffre_binary() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("finding the coffre binary")
}

/// Starts everything; see the module docs.
pub async fn start(opts: &DevOptions, nodes: u32) -> anyhow::Result<DevCluster> {
    if !(2..=MAX_NODES).contains(&nodes) {
        bail!("--nodes takes 2 to {MAX_NODES} (a single node is plain coffre dev)");
    }
    // Every node's port first: a busy one stops the start before anything
    // is created.
    let node_addrs: Vec<SocketAddr> = (0..nodes)
        .map(|i| {
            let port = opts
                .listen
                .port()
                .checked_add(u16::try_from(i).unwrap_or(u16::MAX))
                .context("--listen's port leaves no room for every node")?;
            Ok(SocketAddr::new(opts.listen.ip(), port))
        })
        .collect::<anyhow::Result<_>>()?;
    for addr in &node_addrs {
        drop(bind_check(*addr).await?);
    }
    // Absolute: PostgreSQL's tools and the nodes run with other working
    // directories (initdb as the postgres user reads files by these paths).
    let root = std::path::absolute(&opts.data_dir)
        .with_context(|| format!("resolving {}", opts.data_dir.display()))?;
    let dir = DataDir::new(&root);
    dir.create()?;
    let lock = dir.lock()?;
    ensure_dev_dir(&dir)?;
    let paths = dir.pki();
    for n in 2..=opts.quorum {
        let name = format!("operator-{n}");
        if !paths.client_cert(&name).exists() {
            pki::issue_client_cert(&paths, &name)?;
        }
    }
    // As root, PostgreSQL runs as the postgres user, which must traverse
    // the data directory to reach DIR/postgres (nothing else in it is
    // readable: every file is 0600, every other directory 0700).
    if crate::hardening::running_as_root() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.root(), std::fs::Permissions::from_mode(0o711))
            .with_context(|| format!("letting PostgreSQL reach {}", dir.root().display()))?;
    }

    // The simulated HSM, served to the nodes.
    let pin = super::dev::dev_pin(&dir)?;
    let state = dir.hsm_state();
    let hsm_pin = pin.clone();
    let hsm = tokio::task::spawn_blocking(move || LocalSimHsm::open(&state, &hsm_pin))
        .await
        .context("opening the simulated HSM")?
        .context("opening the simulated HSM")?;
    let simulator = Arc::clone(hsm.simulator());
    let hsm_listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the simulated HSM's port")?;
    let hsm_endpoint = format!("http://{}", hsm_listener.local_addr()?);
    let (hsm_tx, hsm_rx) = tokio::sync::oneshot::channel::<()>();
    let hsm_task = tokio::spawn(async move {
        let served = hsm_sim::server::serve(
            hsm_listener,
            simulator,
            hsm_sim::server::ServerOptions::default(),
            async move {
                let _ = hsm_rx.await;
            },
        )
        .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the simulated HSM stopped serving");
        }
    });

    // The database.
    let pg_dir = dir.root().join("postgres");
    let pg_port = free_port().await?;
    let postgres = {
        let pg_dir = pg_dir.clone();
        tokio::task::spawn_blocking(move || LocalPostgres::start(&pg_dir, pg_port))
            .await
            .context("starting PostgreSQL")??
    };
    ensure_database(&postgres).context("creating the coffre database")?;
    let url = postgres.url();
    let url_file = dir.root().join("postgres-url");
    write_private(&url_file, url.as_bytes())?;

    // Each node's configuration.
    let attributes = resolve_attributes(opts.quorum, &opts.attributes)?;
    let principals = dev_principals(opts.quorum);
    let nodes_dir = dir.root().join("nodes");
    std::fs::create_dir_all(&nodes_dir)
        .with_context(|| format!("creating {}", nodes_dir.display()))?;
    let mut configs = Vec::new();
    for (i, addr) in node_addrs.iter().enumerate() {
        let node_id = format!("n{}", i + 1);
        let node_dir = nodes_dir.join(&node_id);
        std::fs::create_dir_all(&node_dir)
            .with_context(|| format!("creating {}", node_dir.display()))?;
        let metrics_port = match opts.metrics_listen {
            Some(m) => m
                .port()
                .checked_add(u16::try_from(i).unwrap_or(u16::MAX))
                .context("--metrics-listen's port leaves no room for every node")?,
            None => free_port().await?,
        };
        let metrics = SocketAddr::new(
            opts.metrics_listen.map_or(opts.listen.ip(), |m| m.ip()),
            metrics_port,
        );
        let config = node_config(NodeConfig {
            node_id: &node_id,
            node_dir: &node_dir,
            listen: *addr,
            metrics,
            dir: &dir,
            hsm_endpoint: &hsm_endpoint,
            url_file: &url_file,
            principals: &principals,
            attributes: &attributes,
            quorum: opts.quorum,
            cluster: vec![("digest_interval_ms", 1_000)],
        })?;
        let config_path = node_dir.join("coffre.toml");
        crate::fsutil::write_atomic(&config_path, config.as_bytes(), false)
            .with_context(|| format!("writing {}", config_path.display()))?;
        configs.push((node_id, node_dir, config_path, *addr, metrics));
    }

    // The schema, the preloaded keys, then the nodes.
    migrate(&configs).await?;
    let binary = coffre_binary()?;
    if opts.preload_keys > 0 {
        preload(&binary, &configs, opts.preload_keys).await?;
    }
    let mut children = Vec::new();
    let mut entries = Vec::new();
    for (node_id, node_dir, config_path, addr, metrics) in &configs {
        let (mut cmd, log, log_path) = serve_command(&binary, node_dir, config_path)?;
        cmd.stdin(std::process::Stdio::null())
            .stdout(log.try_clone().context("the node's log")?)
            .stderr(log)
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting node {node_id}"))?;
        let pid = child.id().unwrap_or_default();
        children.push((node_id.clone(), child));
        entries.push(NodeEntry {
            node_id: node_id.clone(),
            endpoint: format!("https://{addr}"),
            metrics: format!("http://{metrics}"),
            pid,
            data_dir: node_dir.clone(),
            log: log_path,
        });
    }
    for (entry, (_, child)) in entries.iter().zip(children.iter_mut()) {
        wait_ready(entry, child).await?;
    }
    let file = ClusterFile {
        postgres_url: zeroize::Zeroizing::new(url.to_string()),
        hsm_endpoint,
        nodes: entries,
    };
    let cluster_json = dir.cluster_json();
    let text = serde_json::to_vec_pretty(&file).context("encoding cluster.json")?;
    // It holds the database URL, password included.
    write_private(&cluster_json, &text)?;
    Ok(DevCluster {
        file,
        cluster_json,
        postgres,
        hsm_shutdown: Some(hsm_tx),
        hsm_task: Some(hsm_task),
        nodes: children,
        _lock: lock,
    })
}

/// Writes `path` whole, readable by its owner only (it holds a secret).
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    crate::fsutil::write_atomic(path, bytes, false)
        .with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} private", path.display()))
}

/// Fails if `addr` is in use, saying what to do.
async fn bind_check(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    match TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => bail!(
            "{addr} is in use — is another coffre dev running? stop it, or give --listen another \
             first port (the nodes take consecutive ports from it)"
        ),
        Err(e) => Err(e).with_context(|| format!("cannot listen on {addr}")),
    }
}

/// What a node's configuration is made of ([`node_config`]).
#[derive(Debug)]
pub struct NodeConfig<'a> {
    pub node_id: &'a str,
    /// Its own data directory (audit log, CRL state).
    pub node_dir: &'a Path,
    pub listen: SocketAddr,
    pub metrics: SocketAddr,
    /// The directory of the dev PKI and of the simulated HSM's PIN.
    pub dir: &'a DataDir,
    pub hsm_endpoint: &'a str,
    /// The file holding the database URL (0600).
    pub url_file: &'a Path,
    pub principals: &'a [(String, Role)],
    pub attributes:
        &'a std::collections::HashMap<String, std::collections::BTreeMap<String, String>>,
    pub quorum: u32,
    /// More `[cluster]` settings (`max_staleness_ms`, `poll_interval_ms`, …).
    pub cluster: Vec<(&'a str, i64)>,
}

/// One node's `coffre serve` configuration, as TOML: the dev PKI with a CA
/// per role, the simulated HSM at `hsm_endpoint`, the dev principals and
/// their attributes, keys granted to the dev service by default, no rate
/// limits, the PostgreSQL store and `[cluster] node_id`.
pub fn node_config(c: NodeConfig<'_>) -> anyhow::Result<String> {
    use toml::{Table, Value};
    let path = |p: &Path| Value::String(p.display().to_string());
    let paths = c.dir.pki();
    let mut root = Table::new();
    root.insert("data_dir".into(), path(c.node_dir));
    root.insert("listen".into(), Value::String(c.listen.to_string()));
    root.insert(
        "metrics_listen".into(),
        Value::String(c.metrics.to_string()),
    );
    root.insert("allow_single_operator".into(), Value::Boolean(c.quorum < 2));
    let mut tls = Table::new();
    tls.insert("cert".into(), path(&paths.server_cert()));
    tls.insert("key".into(), path(&paths.server_key()));
    for role in pki::ROLES {
        tls.insert(
            format!("{}_ca", role.as_str()),
            path(&paths.role_ca_cert(role)),
        );
    }
    root.insert("tls".into(), Value::Table(tls));
    let mut hsm = Table::new();
    hsm.insert("backend".into(), Value::String("simulator".into()));
    hsm.insert("endpoint".into(), Value::String(c.hsm_endpoint.into()));
    hsm.insert("pin_file".into(), path(&c.dir.hsm_pin()));
    hsm.insert("allow_insecure_simulator".into(), Value::Boolean(true));
    root.insert("hsm".into(), Value::Table(hsm));
    let mut roles = Table::new();
    for role in pki::ROLES {
        let names: Vec<Value> = c
            .principals
            .iter()
            .filter(|(_, r)| *r == role)
            .map(|(name, _)| Value::String(pki::dev_principal(name)))
            .collect();
        roles.insert(role.as_str().into(), Value::Array(names));
    }
    root.insert("roles".into(), Value::Table(roles));
    let mut attributes = Table::new();
    for (principal, attrs) in c.attributes {
        let t: Table = attrs
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        attributes.insert(principal.clone(), Value::Table(t));
    }
    root.insert("attributes".into(), Value::Table(attributes));
    let policy = crate::model::KeyPolicy::granting([pki::dev_principal("service")]);
    root.insert(
        "default_key_policy".into(),
        Value::try_from(&policy).context("encoding the default key policy")?,
    );
    if c.quorum > 1 {
        let mut quorum = Table::new();
        quorum.insert(
            "approvals_required".into(),
            Value::Integer(i64::from(c.quorum)),
        );
        root.insert("quorum".into(), Value::Table(quorum));
    }
    // A checkpoint each second of activity, published to the database, so
    // that the cluster digest (signed each second, below) soon lists every
    // node's head: a walkthrough can export the cluster's audit at once.
    // Production keeps the defaults (1000 records or 60 s, and 60 s).
    let mut audit = Table::new();
    audit.insert("checkpoint_every_secs".into(), Value::Integer(1));
    root.insert("audit".into(), Value::Table(audit));
    // No rate limits, as in a single `coffre dev`: a newcomer's loops and
    // the benchmarks would otherwise meet `coffre serve`'s defaults.
    let mut rate_limits = Table::new();
    rate_limits.insert("enabled".into(), Value::Boolean(false));
    root.insert("rate_limits".into(), Value::Table(rate_limits));
    let mut store = Table::new();
    store.insert("backend".into(), Value::String("postgres".into()));
    store.insert("url_file".into(), path(c.url_file));
    root.insert("store".into(), Value::Table(store));
    let mut cluster = Table::new();
    cluster.insert("node_id".into(), Value::String(c.node_id.into()));
    for (name, value) in &c.cluster {
        cluster.insert((*name).into(), Value::Integer(*value));
    }
    root.insert("cluster".into(), Value::Table(cluster));
    toml::to_string(&root).context("encoding a node's configuration")
}

/// `coffre store migrate`, in process, with the first node's settings.
async fn migrate(
    configs: &[(String, PathBuf, PathBuf, SocketAddr, SocketAddr)],
) -> anyhow::Result<()> {
    let (_, _, config_path, _, _) = configs.first().context("no node")?;
    let config = crate::config::Config::load(config_path)?;
    let (crate::config::StoreConfig::Postgres(store), Some(cluster)) =
        (&config.store, &config.cluster)
    else {
        bail!("a node's configuration does not name the PostgreSQL store");
    };
    let connector = crate::store::postgres::PgConnector::from_config(store, cluster)?;
    let mut client = connector.connect().await?;
    crate::store::postgres::migrate(&mut client, &connector).await?;
    Ok(())
}

/// `--preload-keys`: the first node alone, `coffre serve --preload-keys
/// N`, creates the keys through its core as `coffre dev --preload-keys`
/// does on sled (batches of [`super::dev::PRELOAD_CHUNK`] keys per store
/// transaction, one audit record per key in that node's log), then exits;
/// its progress shows on standard error. Running it before the nodes
/// start keeps the bulk load off their change feeds.
async fn preload(
    binary: &Path,
    configs: &[(String, PathBuf, PathBuf, SocketAddr, SocketAddr)],
    count: u64,
) -> anyhow::Result<()> {
    let (node_id, node_dir, config_path, _, _) = configs.first().context("no node")?;
    let (mut cmd, log, log_path) = serve_command(binary, node_dir, config_path)?;
    cmd.arg("--preload-keys").arg(count.to_string());
    // Progress lines on this terminal; the server's own log to its file.
    cmd.env(
        "RUST_LOG",
        std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
    )
    .stdin(std::process::Stdio::null())
    .stdout(log)
    .kill_on_drop(true);
    eprintln!("preloading {count} keys through node {node_id}…");
    let status = cmd
        .status()
        .await
        .with_context(|| format!("starting node {node_id} to preload keys"))?;
    if !status.success() {
        bail!(
            "preloading keys through node {node_id} failed ({status}); see {}",
            log_path.display()
        );
    }
    Ok(())
}

/// `coffre serve --config CONFIG` for a node (with `--allow-root` when this
/// process runs as root, as `coffre dev` may), and the node's log file
/// `NODE_DIR/coffre.log`, opened for appending, with its path.
fn serve_command(
    binary: &Path,
    node_dir: &Path,
    config_path: &Path,
) -> anyhow::Result<(Command, std::fs::File, PathBuf)> {
    let log_path = node_dir.join("coffre.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut cmd = Command::new(binary);
    cmd.arg("serve").arg("--config").arg(config_path);
    if crate::hardening::running_as_root() {
        cmd.arg("--allow-root");
    }
    Ok((cmd, log, log_path))
}

/// Waits until the node's readiness probe answers 200, or fails naming
/// its log.
async fn wait_ready(entry: &NodeEntry, child: &mut Child) -> anyhow::Result<()> {
    let started = Instant::now();
    let addr = entry
        .metrics
        .strip_prefix("http://")
        .unwrap_or(&entry.metrics)
        .to_string();
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "node {} exited at start ({status}); see {}",
                entry.node_id,
                entry.log.display()
            );
        }
        if ready(&addr).await {
            return Ok(());
        }
        if started.elapsed() > NODE_READY_TIMEOUT {
            bail!(
                "node {} was not ready within {NODE_READY_TIMEOUT:?}; see {}",
                entry.node_id,
                entry.log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GET /readyz` answers 200.
async fn ready(addr: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let request = format!("GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if s.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.is_ok() && head.ends_with(b"200")
}

impl DevCluster {
    /// Reports nodes that exit until `shutdown` resolves, then stops every
    /// node (SIGTERM, then SIGKILL after 10 s), the HSM and PostgreSQL.
    pub async fn run_until(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut reported = vec![false; self.nodes.len()];
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(Duration::from_millis(500)) => {
                    for (i, (node_id, child)) in self.nodes.iter_mut().enumerate() {
                        if let (Ok(Some(status)), Some(seen)) = (child.try_wait(), reported.get_mut(i))
                            && !*seen
                        {
                            *seen = true;
                            println!("node {node_id} exited ({status}); the other nodes go on serving");
                        }
                    }
                }
            }
        }
        self.stop().await;
    }

    pub async fn stop(&mut self) {
        for (_, child) in &mut self.nodes {
            if let Some(pid) = child.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(0)),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        for (_, child) in &mut self.nodes {
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
        if let Some(tx) = self.hsm_shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.hsm_task.take() {
            let _ = task.await;
        }
        let postgres = &mut self.postgres;
        tokio::task::block_in_place(|| postgres.stop());
    }
}
