//! `[store]` and `[cluster]`: which store keeps the records, and how this
//! node takes part in a cluster of nodes sharing a PostgreSQL database.
//!
//! ```toml
//! [store]
//! backend = "postgres"                   # or "sled" (the default: DATA_DIR/store)
//! url_env = "COFFRE_DATABASE_URL"        # or url_file = "/etc/coffre/database.url"
//!                                        # (mode 0600); never the URL itself
//! pool_size = 8                          # connections per node (default 8)
//! ca_file = "/etc/coffre/pg-ca.pem"      # TLS: the CA of the server's certificate
//!                                        # (sslmode=verify-full; see postgres::connect)
//!
//! [cluster]                              # only with backend = "postgres"
//! node_id = "n1"                         # required: unique per node
//! mode = "strict"                        # or "available" (default strict)
//! max_staleness_ms = 1000                # a key change reaches every node within this
//! poll_interval_ms = 200                 # how often a node polls for changes
//! lease_ttl_ms = 10000                   # singletons' leases (scheduler, rotation)
//! digest_interval_ms = 60000             # how often the cluster's audit digest is signed
//! require_synchronous_standby = false    # refuse a primary without one (default false)
//! ```
//!
//! Each setting is checked here, at load, with the reason when it is
//! refused; `service::freshness` and `cluster` use them.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::store::postgres::DatabaseUrl;

/// `[store] pool_size`'s default.
pub const DEFAULT_POOL_SIZE: usize = 8;
/// The largest `pool_size` accepted.
pub const MAX_POOL_SIZE: usize = 256;
/// `[cluster]` defaults.
pub const DEFAULT_MAX_STALENESS: Duration = Duration::from_millis(1000);
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(200);
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_millis(10_000);
/// The longest node id: `coffre/<node_id>` must fit PostgreSQL's
/// `application_name` (63 bytes).
pub const MAX_NODE_ID_LEN: usize = 48;

/// Where the records are kept.
#[derive(Clone, Debug, Default)]
pub enum StoreConfig {
    /// sled in `DATA_DIR/store`: one node.
    #[default]
    Sled,
    /// A PostgreSQL database, shared by the nodes of a cluster.
    Postgres(PostgresConfig),
}

/// `[store]` for `backend = "postgres"`.
#[derive(Clone, Debug)]
pub struct PostgresConfig {
    /// Where the connection string is.
    pub url: UrlSource,
    /// Connections in the pool of each node.
    pub pool_size: usize,
    /// PEM file of the CA(s) the server's certificate must chain to; set,
    /// TLS is on and verified (see `crate::store::postgres::connect`).
    pub ca_file: Option<PathBuf>,
}

/// Where the connection string (which may hold the password) is read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UrlSource {
    /// An environment variable of the process.
    Env(String),
    /// A file readable by coffre's user only (mode 0600 or 0400).
    File(PathBuf),
}

impl fmt::Display for UrlSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UrlSource::Env(var) => write!(f, "${var}"),
            UrlSource::File(path) => write!(f, "in {}", path.display()),
        }
    }
}

impl UrlSource {
    /// Reads the connection string, trimmed of surrounding white space.
    /// A file that its group or others may read or write is refused, as
    /// an `ssh` key is.
    pub fn read(&self) -> anyhow::Result<DatabaseUrl> {
        let raw = match self {
            UrlSource::Env(var) => Zeroizing::new(
                std::env::var(var)
                    .with_context(|| format!("the environment variable {var} is not set"))?,
            ),
            UrlSource::File(path) => {
                check_private(path, "may hold the database password")?;
                Zeroizing::new(
                    std::fs::read_to_string(path)
                        .with_context(|| format!("reading {}", path.display()))?,
                )
            }
        };
        let url = Zeroizing::new(raw.trim().to_string());
        if url.is_empty() {
            bail!("{self} is empty");
        }
        Ok(DatabaseUrl::new(url, self.to_string()))
    }
}

/// Refuses a secret's file that its group or others may read or write, as
/// `ssh` refuses such a key; `holds` says what is at stake.
#[cfg(unix)]
pub(super) fn check_private(path: &std::path::Path, holds: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        bail!(
            "{} {holds} and is accessible to its group or others (mode {:04o}): chmod 600 it",
            path.display(),
            mode & 0o7777
        );
    }
    Ok(())
}

#[cfg(not(unix))]
pub(super) fn check_private(_path: &std::path::Path, _holds: &str) -> anyhow::Result<()> {
    Ok(())
}

/// A node's name in the cluster: 1 to [`MAX_NODE_ID_LEN`] ASCII letters,
/// digits, `.`, `_` or `-`, so that it can go into a session option and a
/// log line as it is.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(String);

impl NodeId {
    pub fn new(id: &str) -> anyhow::Result<Self> {
        let valid = !id.is_empty()
            && id.len() <= MAX_NODE_ID_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !valid {
            bail!(
                "cluster.node_id {id:?} must be 1 to {MAX_NODE_ID_LEN} letters, digits, '.', '_' \
                 or '-'"
            );
        }
        Ok(Self(id.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a node does when it cannot show that its caches are fresh.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClusterMode {
    /// Refuse data keys (UNAVAILABLE) once the last successful poll is
    /// older than `max_staleness_ms`: a key change reaches every node in
    /// bounded time, even a node cut off from the database.
    #[default]
    Strict,
    /// Keep serving from the caches: available through a database outage,
    /// but a disabled key may still be used on a cut-off node.
    Available,
}

/// `[cluster]`, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    pub node_id: NodeId,
    pub mode: ClusterMode,
    pub max_staleness: Duration,
    pub poll_interval: Duration,
    pub lease_ttl: Duration,
    /// How often the holder of the `audit-digest` lease signs the cluster
    /// digest of every node's audit head (`cluster::audit`).
    pub digest_interval: Duration,
    /// Refuse a primary whose `synchronous_standby_names` is empty. Off by
    /// default while single-server deployments are common; production
    /// across data centres should turn it on (docs/postgres.md).
    pub require_synchronous_standby: bool,
    /// LISTEN for the store's key-change notifications, which wake the
    /// poller at once (default). Off, key changes arrive at the next poll:
    /// the bound still holds (it rests on the polls, never on a
    /// notification); for tests and for poolers that break LISTEN.
    pub notify: bool,
}

/// `[store]` as TOML gives it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStore {
    pub(super) backend: Option<String>,
    pub(super) url_env: Option<String>,
    pub(super) url_file: Option<PathBuf>,
    pub(super) pool_size: Option<usize>,
    pub(super) ca_file: Option<PathBuf>,
    /// Refused with a clear message: the URL may hold the password.
    pub(super) url: Option<toml::Value>,
}

/// `[cluster]` as TOML gives it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub(super) node_id: Option<String>,
    #[serde(default)]
    pub(super) mode: ClusterMode,
    pub(super) max_staleness_ms: Option<u64>,
    pub(super) poll_interval_ms: Option<u64>,
    pub(super) lease_ttl_ms: Option<u64>,
    pub(super) digest_interval_ms: Option<u64>,
    #[serde(default)]
    pub(super) require_synchronous_standby: bool,
    pub(super) notify: Option<bool>,
}

/// `[store]` and `[cluster]` together: a cluster needs the PostgreSQL
/// store, and the PostgreSQL store a node id.
pub(super) fn validate(
    store: Option<RawStore>,
    cluster: Option<RawCluster>,
) -> anyhow::Result<(StoreConfig, Option<ClusterConfig>)> {
    let store = store.unwrap_or_default();
    if store.url.is_some() {
        bail!(
            "store.url: the connection string may hold the password and never goes in the \
             configuration file; set store.url_env (an environment variable) or store.url_file \
             (a file readable only by coffre)"
        );
    }
    match store.backend.as_deref().unwrap_or("sled") {
        "sled" => {
            for (set, name) in [
                (store.url_env.is_some(), "url_env"),
                (store.url_file.is_some(), "url_file"),
                (store.pool_size.is_some(), "pool_size"),
                (store.ca_file.is_some(), "ca_file"),
            ] {
                if set {
                    bail!("store.{name} is for the postgres backend, not sled");
                }
            }
            if cluster.is_some() {
                bail!(
                    "[cluster] needs store.backend = \"postgres\": the sled store serves one \
                     node"
                );
            }
            Ok((StoreConfig::Sled, None))
        }
        "postgres" => {
            let url = match (store.url_env, store.url_file) {
                (Some(var), None) if !var.is_empty() => UrlSource::Env(var),
                (None, Some(file)) => UrlSource::File(file),
                (Some(_), Some(_)) => bail!("set store.url_env or store.url_file, not both"),
                _ => bail!(
                    "the postgres backend needs store.url_env (the environment variable that \
                     holds the connection string) or store.url_file (a file that holds it)"
                ),
            };
            let pool_size = store.pool_size.unwrap_or(DEFAULT_POOL_SIZE);
            if !(1..=MAX_POOL_SIZE).contains(&pool_size) {
                bail!("store.pool_size must be 1..={MAX_POOL_SIZE}");
            }
            let cluster = cluster_config(cluster)?;
            Ok((
                StoreConfig::Postgres(PostgresConfig {
                    url,
                    pool_size,
                    ca_file: store.ca_file,
                }),
                Some(cluster),
            ))
        }
        other => bail!("unknown store.backend {other:?} (supported: \"sled\", \"postgres\")"),
    }
}

fn cluster_config(raw: Option<RawCluster>) -> anyhow::Result<ClusterConfig> {
    let required = "cluster.node_id is required with store.backend = \"postgres\": a name \
                    unique to this node (e.g. n1, or the host's short name)";
    let raw = raw.context(required)?;
    let node_id = NodeId::new(raw.node_id.as_deref().context(required)?)?;
    let ms = |name: &str, v: Option<u64>, d: Duration, min: u64, max: u64| match v {
        Some(v) if !(min..=max).contains(&v) => {
            bail!("cluster.{name} must be {min}..={max} (milliseconds), got {v}")
        }
        Some(v) => Ok(Duration::from_millis(v)),
        None => Ok(d),
    };
    let max_staleness = ms(
        "max_staleness_ms",
        raw.max_staleness_ms,
        DEFAULT_MAX_STALENESS,
        50,
        60_000,
    )?;
    let poll_interval = ms(
        "poll_interval_ms",
        raw.poll_interval_ms,
        DEFAULT_POLL_INTERVAL,
        10,
        60_000,
    )?;
    let lease_ttl = ms(
        "lease_ttl_ms",
        raw.lease_ttl_ms,
        DEFAULT_LEASE_TTL,
        1000,
        600_000,
    )?;
    let digest_interval = ms(
        "digest_interval_ms",
        raw.digest_interval_ms,
        crate::cluster::audit::DEFAULT_DIGEST_INTERVAL,
        1000,
        3_600_000,
    )?;
    if poll_interval >= max_staleness {
        bail!(
            "cluster.poll_interval_ms ({}) must be less than cluster.max_staleness_ms ({}): a \
             node proves its caches fresh by polling, so it must poll more often than the bound",
            poll_interval.as_millis(),
            max_staleness.as_millis()
        );
    }
    if lease_ttl <= poll_interval {
        bail!(
            "cluster.lease_ttl_ms ({}) must be more than cluster.poll_interval_ms ({})",
            lease_ttl.as_millis(),
            poll_interval.as_millis()
        );
    }
    Ok(ClusterConfig {
        node_id,
        mode: raw.mode,
        max_staleness,
        poll_interval,
        lease_ttl,
        digest_interval,
        require_synchronous_standby: raw.require_synchronous_standby,
        notify: raw.notify.unwrap_or(true),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use super::*;

    fn parse(text: &str) -> anyhow::Result<(StoreConfig, Option<ClusterConfig>)> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Sections {
            store: Option<RawStore>,
            cluster: Option<RawCluster>,
        }
        let s: Sections = toml::from_str(text)?;
        validate(s.store, s.cluster)
    }

    const PG: &str =
        "[store]\nbackend = \"postgres\"\nurl_env = \"DB\"\n[cluster]\nnode_id = \"n1\"\n";

    #[test]
    fn sled_is_the_default_and_takes_no_postgres_settings() {
        assert!(matches!(parse("").unwrap(), (StoreConfig::Sled, None)));
        assert!(matches!(
            parse("[store]\nbackend = \"sled\"").unwrap(),
            (StoreConfig::Sled, None)
        ));
        for (text, why) in [
            (
                "[store]\nurl_env = \"DB\"",
                "store.url_env is for the postgres backend",
            ),
            (
                "[store]\npool_size = 3",
                "store.pool_size is for the postgres",
            ),
            (
                "[cluster]\nnode_id = \"n1\"",
                "[cluster] needs store.backend",
            ),
            (
                "[store]\nbackend = \"mysql\"",
                "unknown store.backend \"mysql\"",
            ),
        ] {
            let err = format!("{:#}", parse(text).unwrap_err());
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn postgres_gets_its_defaults() {
        let (store, cluster) = parse(PG).unwrap();
        let StoreConfig::Postgres(pg) = store else {
            panic!("{store:?}")
        };
        assert_eq!(pg.url, UrlSource::Env("DB".to_string()));
        assert_eq!(pg.pool_size, DEFAULT_POOL_SIZE);
        assert_eq!(pg.ca_file, None);
        assert_eq!(
            cluster.unwrap(),
            ClusterConfig {
                node_id: NodeId::new("n1").unwrap(),
                mode: ClusterMode::Strict,
                max_staleness: Duration::from_millis(1000),
                poll_interval: Duration::from_millis(200),
                lease_ttl: Duration::from_millis(10_000),
                digest_interval: Duration::from_secs(60),
                require_synchronous_standby: false,
                notify: true,
            }
        );
        let text = "[store]\nbackend = \"postgres\"\nurl_file = \"/etc/coffre/db.url\"\n\
                    pool_size = 16\nca_file = \"/etc/coffre/ca.pem\"\n[cluster]\nnode_id = \
                    \"dc1-a.coffre_2\"\nmode = \"available\"\nmax_staleness_ms = 2000\n\
                    poll_interval_ms = 500\nlease_ttl_ms = 5000\ndigest_interval_ms = 1000\n\
                    require_synchronous_standby = true\n";
        let (store, cluster) = parse(text).unwrap();
        let StoreConfig::Postgres(pg) = store else {
            panic!("{store:?}")
        };
        assert_eq!(pg.url, UrlSource::File("/etc/coffre/db.url".into()));
        assert_eq!(pg.pool_size, 16);
        assert_eq!(pg.ca_file, Some("/etc/coffre/ca.pem".into()));
        let cluster = cluster.unwrap();
        assert_eq!(cluster.node_id.as_str(), "dc1-a.coffre_2");
        assert_eq!(cluster.mode, ClusterMode::Available);
        assert_eq!(cluster.max_staleness, Duration::from_secs(2));
        assert_eq!(cluster.poll_interval, Duration::from_millis(500));
        assert_eq!(cluster.lease_ttl, Duration::from_secs(5));
        assert_eq!(cluster.digest_interval, Duration::from_secs(1));
        assert!(cluster.require_synchronous_standby);
    }

    #[test]
    fn postgres_settings_are_checked() {
        let cluster = "[cluster]\nnode_id = \"n1\"\n";
        let store = "[store]\nbackend = \"postgres\"\n";
        for (text, why) in [
            (format!("{store}{cluster}"), "needs store.url_env"),
            (
                format!("{store}url_env = \"\"\n{cluster}"),
                "needs store.url_env",
            ),
            (
                format!("{store}url_env = \"A\"\nurl_file = \"f\"\n{cluster}"),
                "not both",
            ),
            (
                format!("{store}url = \"postgresql://u:pw@h/d\"\n{cluster}"),
                "never goes in the configuration file",
            ),
            (
                format!("{store}url_env = \"A\"\npool_size = 0\n{cluster}"),
                "store.pool_size must be 1..=256",
            ),
            (
                format!("{store}url_env = \"A\"\npool_size = 1000\n{cluster}"),
                "store.pool_size",
            ),
            (
                format!("{store}url_env = \"A\"\n"),
                "cluster.node_id is required",
            ),
            (
                format!("{store}url_env = \"A\"\n[cluster]\nmode = \"strict\"\n"),
                "cluster.node_id is required",
            ),
            (
                format!("{store}url_env = \"A\"\n[cluster]\nnode_id = \"n 1\"\n"),
                "letters, digits",
            ),
            (
                format!("{store}url_env = \"A\"\n[cluster]\nnode_id = \"\"\n"),
                "letters, digits",
            ),
            (
                format!(
                    "{store}url_env = \"A\"\n[cluster]\nnode_id = \"{}\"\n",
                    "n".repeat(49)
                ),
                "1 to 48",
            ),
            (
                format!("{store}url_env = \"A\"\n{cluster}mode = \"lax\"\n"),
                "unknown variant",
            ),
            (
                format!("{store}url_env = \"A\"\n{cluster}poll_interval_ms = 1000\n"),
                "must be less than cluster.max_staleness_ms",
            ),
            (
                format!(
                    "{store}url_env = \"A\"\n{cluster}max_staleness_ms = 500\npoll_interval_ms = 600\n"
                ),
                "must be less than",
            ),
            (
                format!("{store}url_env = \"A\"\n{cluster}max_staleness_ms = 0\n"),
                "cluster.max_staleness_ms must be 50..=60000",
            ),
            (
                format!("{store}url_env = \"A\"\n{cluster}poll_interval_ms = 0\n"),
                "cluster.poll_interval_ms must be",
            ),
            (
                format!("{store}url_env = \"A\"\n{cluster}lease_ttl_ms = 10\n"),
                "cluster.lease_ttl_ms must be 1000..=600000",
            ),
            (
                format!("{store}url_env = \"A\"\n{cluster}digest_interval_ms = 999\n"),
                "cluster.digest_interval_ms must be 1000..=3600000",
            ),
            (
                format!(
                    "{store}url_env = \"A\"\n{cluster}max_staleness_ms = 60000\npoll_interval_ms = 2000\nlease_ttl_ms = 1500\n"
                ),
                "must be more than cluster.poll_interval_ms",
            ),
            (
                format!("{store}url_env = \"A\"\n{cluster}leases = 1\n"),
                "unknown field",
            ),
        ] {
            let err = format!("{:#}", parse(&text).unwrap_err());
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn the_url_is_read_from_a_private_file_or_the_environment() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.url");
        std::fs::write(&path, "postgresql://coffre:s3cret@db/coffre\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let source = UrlSource::File(path.clone());
        let err = format!("{:#}", source.read().unwrap_err());
        assert!(
            err.contains("mode 0640") && err.contains("chmod 600"),
            "{err}"
        );
        assert!(!err.contains("s3cret"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let url = source.read().unwrap();
        assert_eq!(url.expose(), "postgresql://coffre:s3cret@db/coffre");
        assert_eq!(url.source_name(), format!("in {}", path.display()));
        std::fs::write(&path, " \n").unwrap();
        assert!(format!("{:#}", source.read().unwrap_err()).contains("is empty"));
        let missing = UrlSource::File(dir.path().join("none"));
        assert!(format!("{:#}", missing.read().unwrap_err()).contains("reading"));
        let unset = UrlSource::Env("COFFRE_TEST_SURELY_UNSET_VARIABLE".to_string());
        let err = format!("{:#}", unset.read().unwrap_err());
        assert!(err.contains("is not set"), "{err}");
        assert_eq!(unset.to_string(), "$COFFRE_TEST_SURELY_UNSET_VARIABLE");
    }
}
