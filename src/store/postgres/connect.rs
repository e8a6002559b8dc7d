//! Connecting to PostgreSQL: the URL, TLS, the session settings coffre
//! forces, the pool, and the checks made before anything is read or
//! written.
//!
//! # The URL
//!
//! It comes from the environment variable `store.url_env` or the file
//! `store.url_file` (see `crate::config`), never from the configuration
//! file, since it may hold the password. Both forms libpq takes are
//! accepted: `postgresql://user:password@host:port/db?param=value` and
//! `host=... user=... dbname=...`. Several hosts (`host=a,b`) are tried in
//! order; with more than one, coffre asks for `target_session_attrs =
//! read-write` unless the URL says otherwise, so that it finds the
//! primary.
//!
//! # TLS: `sslmode`
//!
//! coffre decides between two modes only, and refuses the others rather
//! than guess what an operator meant:
//!
//! | `sslmode` in the URL | coffre |
//! |---|---|
//! | `verify-full` | TLS (rustls, ring), the server's certificate checked against `store.ca_file` and the host name; `ca_file` is required |
//! | absent, with `store.ca_file` | as `verify-full` |
//! | `disable` | plain TCP (or a Unix socket); `store.ca_file` must not be set |
//! | absent, without `store.ca_file` | refused: say `disable` or `verify-full` |
//! | `allow`, `prefer` | refused: they fall back to plain TCP without telling anyone |
//! | `require`, `verify-ca` | refused: they do not check the host name |
//!
//! libpq's default (`prefer`) would silently send the password in clear
//! to whoever answers without TLS, hence no default without a CA.
//! `sslrootcert` and friends in the URL are refused in favour of
//! `store.ca_file`, so that there is one place for the trust anchor.
//!
//! # Sessions
//!
//! Every connection, pooled or not, starts with (as startup options, so
//! that nothing can run before them):
//!
//! ```text
//! -c synchronous_commit=on                      durable (and replicated) before acknowledged
//! -c statement_timeout=0                        a COMMIT is never cancelled (design §3.3)
//! -c idle_in_transaction_session_timeout=30s    a stuck client frees its row locks
//! -c application_name=coffre/<node_id>          pg_stat_activity tells the nodes apart
//! ```
//!
//! and, unless the URL sets them: `connect_timeout = 2 s`, TCP keepalives
//! after 5 s idle, `tcp_user_timeout = 10 s`. The listening connection is
//! `coffre/<node_id>/listen`, so that an operator (or a test) can find it.
//! The pool recycles with [`RecyclingMethod::Verified`] (a test query),
//! since a connection that a server restart closed hard can still look
//! open; the test query gets [`RECYCLE_TIMEOUT`], and a wait for a free
//! connection [`POOL_WAIT_TIMEOUT`]: a connection that stopped answering
//! (a partition, a proxy that holds every byte) is dropped rather than
//! waited on, and nothing queues without end behind a pool full of them.
//!
//! # Errors
//!
//! Every failure is a [`PgError`] naming the server by [`redacted`] URL;
//! text from the server or the client library is scrubbed of the password
//! before it is kept.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_postgres::config::{Host, SslMode, TargetSessionAttrs};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;
use zeroize::Zeroizing;

use super::PgError;
use super::fence::TimelineFence;
use crate::config::{ClusterConfig, PostgresConfig};

/// How long a connection attempt may take, unless the URL says otherwise.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// TCP keepalives start after this much idle time.
const KEEPALIVES_IDLE: Duration = Duration::from_secs(5);
/// Unacknowledged data for this long closes the connection.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the pool's test query on a connection it hands out may take
/// before the connection is dropped (and another one tried or opened).
pub const RECYCLE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a caller waits for a pooled connection when all are in use.
pub const POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(4);
/// What the listening connection's `application_name` adds to the node's.
pub const LISTEN_SUFFIX: &str = "/listen";
/// The oldest server coffre talks to (`server_version_num`).
const MIN_SERVER_VERSION: i32 = 150_000;

/// The connection string: secret (it may hold the password). No `Clone`,
/// a redacted `Debug`, zeroized on drop.
pub struct DatabaseUrl {
    url: Zeroizing<String>,
    /// Where it came from, for messages: `$COFFRE_DATABASE_URL`, a path.
    source_name: String,
}

impl DatabaseUrl {
    /// `url` as read from `source_name` (an environment variable or file,
    /// as people should read it in a message).
    pub fn new(url: Zeroizing<String>, source_name: impl Into<String>) -> Self {
        Self {
            url,
            source_name: source_name.into(),
        }
    }

    pub fn expose(&self) -> &str {
        &self.url
    }

    /// The URL with every password replaced by `***`.
    pub fn redacted(&self) -> String {
        redacted(&self.url)
    }

    pub fn source_name(&self) -> &str {
        &self.source_name
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseUrl")
            .field("url", &self.redacted())
            .field("source", &self.source_name)
            .finish()
    }
}

/// `url` with every password replaced by `***`: the one in the user info
/// of a `postgresql://` URL, a `password=` parameter of its query, or a
/// `password=` pair of the key/value form. Anything that cannot be told
/// apart is over-redacted rather than shown; a string that is neither form
/// is shown as `<unparsable connection string>`.
pub fn redacted(url: &str) -> String {
    let Some(spans) = params(url) else {
        return "<unparsable connection string>".to_string();
    };
    let mut out = url.to_string();
    let mut secrets: Vec<Range<usize>> = spans
        .iter()
        .filter(|p| p.key.contains("password"))
        .map(|p| p.value.clone())
        .collect();
    secrets.sort_by_key(|r| std::cmp::Reverse(r.start));
    for range in secrets {
        if out.get(range.clone()).is_some() {
            out.replace_range(range, "***");
        }
    }
    out
}

/// A parameter of a connection string, and where its value is.
#[derive(Debug)]
struct Param {
    key: String,
    value: Range<usize>,
}

/// The parameters of either form of connection string, with the span of
/// each value (quotes included). For a URL, the user-info password is a
/// parameter named `password` too. `None` if it is neither form.
fn params(url: &str) -> Option<Vec<Param>> {
    let rest = url
        .strip_prefix("postgresql://")
        .or_else(|| url.strip_prefix("postgres://"));
    match rest {
        Some(rest) => Some(url_params(url, url.len() - rest.len())),
        None => key_value_params(url),
    }
}

fn url_params(url: &str, start: usize) -> Vec<Param> {
    let mut out = Vec::new();
    let rest = url.get(start..).unwrap_or_default();
    let query_at = rest.find('?').map(|i| start + i);
    let before_query = url
        .get(start..query_at.unwrap_or(url.len()))
        .unwrap_or_default();
    // The user info ends at the last '@' before the query, so that a
    // password with an unencoded '@' or '/' is still covered.
    if let Some(at) = before_query.rfind('@') {
        if let Some(colon) = before_query.get(..at).and_then(|info| info.find(':')) {
            out.push(Param {
                key: "password".to_string(),
                value: start + colon + 1..start + at,
            });
        }
    }
    if let Some(q) = query_at {
        let mut pos = q + 1;
        for pair in url.get(q + 1..).unwrap_or_default().split('&') {
            if let Some(eq) = pair.find('=') {
                out.push(Param {
                    key: pair.get(..eq).unwrap_or_default().to_ascii_lowercase(),
                    value: pos + eq + 1..pos + pair.len(),
                });
            }
            pos += pair.len() + 1;
        }
    }
    out
}

/// `key = value` pairs separated by spaces; a value may be single-quoted
/// with backslash escapes, as libpq reads it.
fn key_value_params(s: &str) -> Option<Vec<Param>> {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let skip_spaces = |mut i: usize| {
        while bytes.get(i).is_some_and(|b| b.is_ascii_whitespace()) {
            i += 1;
        }
        i
    };
    loop {
        i = skip_spaces(i);
        if i >= bytes.len() {
            return Some(out);
        }
        let key_start = i;
        while bytes
            .get(i)
            .is_some_and(|b| !b.is_ascii_whitespace() && *b != b'=')
        {
            i += 1;
        }
        let key = s.get(key_start..i)?.to_ascii_lowercase();
        i = skip_spaces(i);
        if bytes.get(i) != Some(&b'=') || key.is_empty() {
            return None;
        }
        i = skip_spaces(i + 1);
        let value_start = i;
        if bytes.get(i) == Some(&b'\'') {
            i += 1;
            loop {
                match bytes.get(i) {
                    None => return None,
                    Some(b'\\') => i += 2,
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(_) => i += 1,
                }
            }
        } else {
            while bytes.get(i).is_some_and(|b| !b.is_ascii_whitespace()) {
                i += 1;
            }
        }
        out.push(Param {
            key,
            value: value_start..i.min(bytes.len()),
        });
    }
}

/// What coffre decided about TLS (see the module docs).
#[derive(Clone)]
enum Tls {
    Disabled,
    VerifyFull(MakeRustlsConnect),
}

/// Everything needed to open connections to the database: the parsed
/// client configuration with coffre's session settings, and TLS.
pub struct PgConnector {
    config: tokio_postgres::Config,
    /// `application_name`: `coffre/<node_id>`.
    app: String,
    tls: Tls,
    target: String,
    password: Option<Zeroizing<String>>,
    pool_size: usize,
    require_synchronous_standby: bool,
    /// The highest timeline seen, shared by every connection this
    /// connector opens ([`super::fence`]).
    fence: Arc<TimelineFence>,
    /// With several hosts in the URL, each one's settings alone, in the
    /// URL's order: what a connection falls back to when the host the
    /// driver picked is fenced off, and what the fence is seeded from.
    per_host: Arc<[tokio_postgres::Config]>,
}

impl fmt::Debug for PgConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgConnector")
            .field("target", &self.target)
            .field(
                "tls",
                &match self.tls {
                    Tls::Disabled => "disabled",
                    Tls::VerifyFull(_) => "verify-full",
                },
            )
            .field("pool_size", &self.pool_size)
            .finish_non_exhaustive()
    }
}

impl PgConnector {
    /// Reads the URL from where `[store]` says, then [`Self::new`].
    pub fn from_config(store: &PostgresConfig, cluster: &ClusterConfig) -> Result<Self, PgError> {
        let url = store.url.read().map_err(|e| PgError::Url {
            source_name: store.url.to_string(),
            why: format!("cannot be read: {e:#}"),
        })?;
        Self::new(&url, store, cluster)
    }

    /// Parses `url` and applies `[store]` and `[cluster]` to it: TLS,
    /// session options, timeouts. Nothing is connected yet.
    pub fn new(
        url: &DatabaseUrl,
        store: &PostgresConfig,
        cluster: &ClusterConfig,
    ) -> Result<Self, PgError> {
        let url_error = |why: String| PgError::Url {
            source_name: url.source_name().to_string(),
            why,
        };
        let text = url.expose();
        let shown = url.redacted();
        let Some(spans) = params(text) else {
            return Err(url_error(
                "is not a PostgreSQL connection string (postgresql://user@host:port/db?... or \
                 host=... dbname=...)"
                    .to_string(),
            ));
        };
        for p in &spans {
            if p.key.starts_with("ssl") && p.key != "sslmode" && p.key != "sslnegotiation" {
                return Err(url_error(format!(
                    "sets {}: coffre takes its TLS trust anchors from store.ca_file, not from \
                     the URL",
                    p.key
                )));
            }
        }
        let sslmode = spans.iter().rev().find(|p| p.key == "sslmode");
        let mode_text = sslmode
            .and_then(|p| text.get(p.value.clone()))
            .map(|v| v.trim_matches('\'').to_ascii_lowercase());
        let verify = match (mode_text.as_deref(), &store.ca_file) {
            (Some("verify-full"), Some(_)) | (None, Some(_)) => true,
            (Some("disable"), None) => false,
            (Some("verify-full"), None) => {
                return Err(url_error(
                    "says sslmode=verify-full but store.ca_file is not set: name the PEM file of \
                     the CA that issued the server's certificate"
                        .to_string(),
                ));
            }
            (Some("disable"), Some(_)) => {
                return Err(url_error(
                    "says sslmode=disable but store.ca_file is set: remove one (disable: plain \
                     TCP; ca_file: TLS, verified)"
                        .to_string(),
                ));
            }
            (None, None) => {
                return Err(url_error(
                    "sets no sslmode: add sslmode=verify-full (TLS, the server's certificate and \
                     name checked against store.ca_file) or sslmode=disable (plain TCP: a Unix \
                     socket or a trusted network only)"
                        .to_string(),
                ));
            }
            (Some(mode @ ("allow" | "prefer")), _) => {
                return Err(url_error(format!(
                    "says sslmode={mode}, which falls back to plain TCP without telling anyone: \
                     use sslmode=verify-full (with store.ca_file) or sslmode=disable"
                )));
            }
            (Some(mode @ ("require" | "verify-ca")), _) => {
                return Err(url_error(format!(
                    "says sslmode={mode}, which does not check the server's host name: use \
                     sslmode=verify-full (with store.ca_file)"
                )));
            }
            (Some(other), _) => {
                return Err(url_error(format!(
                    "has an unknown sslmode {other:?} (coffre takes verify-full or disable)"
                )));
            }
        };
        // tokio-postgres knows only disable/prefer/require: hand it a value
        // it parses, then set the mode decided above.
        let mut parsable = text.to_string();
        if let Some(p) = sslmode {
            parsable.replace_range(p.value.clone(), "disable");
        }
        let parsable = Zeroizing::new(parsable);
        let mut config: tokio_postgres::Config = parsable.parse().map_err(|e| {
            url_error(format!(
                "is not a valid PostgreSQL connection string ({})",
                scrub(&chain(&e), None)
            ))
        })?;
        let password = config
            .get_password()
            .map(|p| Zeroizing::new(String::from_utf8_lossy(p).into_owned()));
        if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
            return Err(url_error(
                "names no host (host=... or postgresql://HOST/...)".to_string(),
            ));
        }
        if config.get_user().is_none() {
            return Err(url_error(
                "names no user (user=... or postgresql://USER@host/...)".to_string(),
            ));
        }
        let unix_only = config
            .get_hosts()
            .iter()
            .all(|h| matches!(h, Host::Unix(_)));
        if verify && unix_only && config.get_hostaddrs().is_empty() {
            return Err(url_error(
                "names only Unix sockets, which carry no TLS: use sslmode=disable without \
                 store.ca_file"
                    .to_string(),
            ));
        }
        let tls = if verify {
            config.ssl_mode(SslMode::Require);
            Tls::VerifyFull(rustls_connector(store)?)
        } else {
            config.ssl_mode(SslMode::Disable);
            Tls::Disabled
        };
        let app = format!("coffre/{}", cluster.node_id);
        let ours = format!(
            "-c synchronous_commit=on -c statement_timeout=0 \
             -c idle_in_transaction_session_timeout=30s -c application_name={app}"
        );
        let options = match config.get_options() {
            Some(theirs) if !theirs.trim().is_empty() => format!("{theirs} {ours}"),
            _ => ours,
        };
        config.options(options).application_name(&app);
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(TCP_USER_TIMEOUT);
        }
        if config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
            config.keepalives_idle(KEEPALIVES_IDLE);
        }
        let hosts = config.get_hosts().len().max(config.get_hostaddrs().len());
        if hosts > 1 && !spans.iter().any(|p| p.key == "target_session_attrs") {
            config.target_session_attrs(TargetSessionAttrs::ReadWrite);
        }
        let per_host: Arc<[tokio_postgres::Config]> = if hosts > 1 {
            (0..hosts).map(|i| single_host(&config, i)).collect()
        } else {
            Arc::from([])
        };
        Ok(Self {
            config,
            app,
            tls,
            target: shown,
            password,
            pool_size: store.pool_size,
            require_synchronous_standby: cluster.require_synchronous_standby,
            fence: Arc::new(TimelineFence::new()),
            per_host,
        })
    }

    /// How connections are dialled (see [`Dialer`]).
    fn dialer(&self) -> Dialer {
        Dialer {
            tls: self.tls.clone(),
            per_host: Arc::clone(&self.per_host),
            fence: Arc::clone(&self.fence),
            target: self.target.clone(),
        }
    }

    /// With several hosts in the URL: asks each where it stands, and raises
    /// the fence to the highest timeline among them, so that a process
    /// started after a failover refuses an old primary that came back
    /// first in the URL, though it never saw the promotion itself (the new
    /// primary, or a standby following it, is another host of the list).
    /// A host that does not answer is skipped. Nothing is read or written
    /// but the lineage.
    pub async fn seed_fence(&self) {
        let dialer = self.dialer();
        let asked = self.per_host.iter().map(|host| {
            let mut any = host.clone();
            // Standbys count too: one following the new primary is on its
            // timeline.
            any.target_session_attrs(TargetSessionAttrs::Any);
            let dialer = &dialer;
            async move {
                let (client, _driver) = dialer.open(&any, None).await.ok()?;
                tokio::time::timeout(CONNECT_TIMEOUT, TimelineFence::lineage(&client))
                    .await
                    .ok()?
                    .ok()
            }
        });
        // At once: a host that does not answer costs one connect timeout.
        let seen: Vec<_> = futures_util::future::join_all(asked)
            .await
            .into_iter()
            .flatten()
            .collect();
        // The system of the first host that answered, at the highest
        // timeline any of its servers is on.
        let Some(system) = seen.first().map(|l| l.system_identifier) else {
            return;
        };
        let Some(reference) = seen
            .iter()
            .filter(|l| l.system_identifier == system)
            .max_by_key(|l| l.timeline)
            .copied()
        else {
            return;
        };
        if self.fence.seed(reference) {
            tracing::info!(
                target = %self.target,
                %reference,
                hosts_answered = seen.len(),
                hosts = self.per_host.len(),
                "timeline fence seeded from the URL's hosts"
            );
        }
    }

    /// The server as messages name it: the URL, redacted.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The timeline fence every connection passes ([`super::fence`]).
    pub fn fence(&self) -> &Arc<TimelineFence> {
        &self.fence
    }

    /// Refuses a server on a lower timeline than the highest seen, or of
    /// another system ([`super::fence`]), as [`PgError::Unreachable`]: no
    /// usable server there. The alarm is logged by [`admit`].
    async fn check_lineage(&self, client: &Client) -> Result<(), PgError> {
        let lineage = tokio::time::timeout(CONNECT_TIMEOUT, TimelineFence::lineage(client))
            .await
            .map_err(|_| PgError::Unreachable {
                target: self.target.clone(),
                detail: FENCE_CHECK_TIMED_OUT.to_string(),
            })?
            .map_err(|e| self.error(&e))?;
        admit(&self.fence, &self.target, lineage).map_err(|detail| PgError::Unreachable {
            target: self.target.clone(),
            detail,
        })
    }

    /// The user the URL logs in as.
    pub fn user(&self) -> &str {
        self.config.get_user().unwrap_or_default()
    }

    /// One connection outside the pool, its driver spawned on the current
    /// runtime (it ends when the client is dropped): for migrations, and
    /// for the listener and lease holder, which must not wait behind a
    /// saturated pool. It passes the timeline fence before it is returned
    /// ([`super::fence`]).
    pub async fn connect(&self) -> Result<Client, PgError> {
        let (client, _driver) = self
            .dialer()
            .dial(&self.config, None, |c| c.clone())
            .await
            .map_err(|e| self.connect_error(&e))?;
        self.check_lineage(&client).await?;
        Ok(client)
    }

    /// [`Self::connect`], listening on `channel`: every notification on it
    /// wakes `wake` (the change feed's hint; a lost one costs nothing but
    /// the wait for the next poll). The connection ends when the client is
    /// dropped or the server goes away.
    pub async fn connect_listening(
        &self,
        channel: &str,
        wake: std::sync::Arc<tokio::sync::Notify>,
    ) -> Result<Client, PgError> {
        let (client, _driver) = self
            .dialer()
            .dial(&self.config, Some(wake), |c| self.listening_config(c))
            .await
            .map_err(|e| self.connect_error(&e))?;
        self.check_lineage(&client).await?;
        // A channel name is an identifier: quoted, so that no name can
        // reach SQL as anything else.
        let quoted = format!("\"{}\"", channel.replace('"', "\"\""));
        client
            .batch_execute(&format!("LISTEN {quoted}"))
            .await
            .map_err(|e| self.error(&e))?;
        Ok(client)
    }

    /// The session settings with the listener's `application_name`
    /// (`coffre/<node_id>/listen`), in the startup options too, where
    /// coffre's own setting sits.
    fn listening_config(&self, config: &tokio_postgres::Config) -> tokio_postgres::Config {
        let mut config = config.clone();
        let app = format!("{}{LISTEN_SUFFIX}", self.app);
        if let Some(options) = config.get_options() {
            let options = options.replace(
                &format!("application_name={}", self.app),
                &format!("application_name={app}"),
            );
            config.options(options);
        }
        config.application_name(app);
        config
    }

    /// The pool of `store.pool_size` connections (opened lazily, recycled
    /// with a test query, within the timeouts of the module docs).
    /// [`open_pool`] also checks the server.
    pub fn pool(&self) -> Result<Pool, PgError> {
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Verified,
        };
        let manager = Manager::from_connect(self.config.clone(), self.dialer(), manager_config);
        let fence = Arc::clone(&self.fence);
        let target = self.target.clone();
        let on_create = deadpool_postgres::Hook::async_fn(move |client, _| {
            let fence = Arc::clone(&fence);
            let target = target.clone();
            Box::pin(async move {
                let lineage = tokio::time::timeout(CONNECT_TIMEOUT, TimelineFence::lineage(client))
                    .await
                    .map_err(|_| {
                        deadpool_postgres::HookError::Message(FENCE_CHECK_TIMED_OUT.into())
                    })?
                    .map_err(deadpool_postgres::HookError::Backend)?;
                admit(&fence, &target, lineage)
                    .map_err(|d| deadpool_postgres::HookError::Message(d.into()))
            })
        });
        let fence = Arc::clone(&self.fence);
        let on_recycle = deadpool_postgres::Hook::sync_fn(move |_, metrics| {
            if fence.predates_rise(metrics.created) {
                // Dropped; the pool opens another, which the fence checks.
                return Err(deadpool_postgres::HookError::Message(
                    "opened before PostgreSQL's timeline rose".into(),
                ));
            }
            Ok(())
        });
        Pool::builder(manager)
            .max_size(self.pool_size)
            .post_create(on_create)
            .post_recycle(on_recycle)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .create_timeout(Some(CONNECT_TIMEOUT * 2))
            .recycle_timeout(Some(RECYCLE_TIMEOUT))
            .wait_timeout(Some(POOL_WAIT_TIMEOUT))
            .build()
            .map_err(|e| PgError::Pool {
                target: self.target.clone(),
                detail: e.to_string(),
            })
    }

    /// A pooled connection, with the pool's failure in the same words as
    /// [`Self::connect`]'s.
    pub async fn get(&self, pool: &Pool) -> Result<deadpool_postgres::Object, PgError> {
        use deadpool_postgres::{HookError, PoolError};
        pool.get().await.map_err(|e| match e {
            PoolError::Backend(e) => self.connect_error(&e),
            PoolError::PostCreateHook(HookError::Backend(e)) => self.connect_error(&e),
            // The fence refused the server: no usable server there.
            PoolError::PostCreateHook(HookError::Message(detail)) => PgError::Unreachable {
                target: self.target.clone(),
                detail: detail.into_owned(),
            },
            other => PgError::Pool {
                target: self.target.clone(),
                detail: scrub(
                    &other.to_string(),
                    self.password.as_ref().map(|p| p.as_str()),
                ),
            },
        })
    }

    /// The error of opening a connection: as [`Self::error`], and whatever
    /// is not the server's refusal means no usable server there
    /// ([`PgError::Unreachable`]): something that answers but does not
    /// speak PostgreSQL, a connection closed during the handshake.
    pub fn connect_error(&self, e: &tokio_postgres::Error) -> PgError {
        match self.error(e) {
            PgError::Query { target, detail } => PgError::Unreachable { target, detail },
            other => other,
        }
    }

    /// The error of a statement or connection, classified, in words that
    /// name the server and never the password.
    pub fn error(&self, e: &tokio_postgres::Error) -> PgError {
        let target = self.target.clone();
        let detail = scrub(&describe(e), self.password.as_ref().map(|p| p.as_str()));
        if let Some(db) = e.as_db_error() {
            let code = db.code();
            if *code == SqlState::INVALID_PASSWORD
                || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
            {
                return PgError::Authentication {
                    target,
                    user: self.user().to_string(),
                    detail,
                };
            }
            if *code == SqlState::INVALID_CATALOG_NAME {
                return PgError::NoDatabase {
                    target,
                    database: self
                        .config
                        .get_dbname()
                        .unwrap_or_else(|| self.user())
                        .to_string(),
                };
            }
            if *code == SqlState::INSUFFICIENT_PRIVILEGE {
                return PgError::Permission { target, detail };
            }
            return PgError::Query { target, detail };
        }
        let text = chain(e);
        if text.starts_with("error performing TLS handshake") || has_source::<rustls::Error>(e) {
            return PgError::Tls { target, detail };
        }
        if text.contains("password missing") || text.starts_with("authentication error") {
            return PgError::Authentication {
                target,
                user: self.user().to_string(),
                detail,
            };
        }
        if text.starts_with("error connecting to server") || text.starts_with("timeout") {
            return PgError::Unreachable { target, detail };
        }
        PgError::Query { target, detail }
    }
}

/// [`TimelineFence::admit`], with the alarm: an error log line (the first
/// refusal, then at most one every [`FENCE_LOG_EVERY`]: a node keeps
/// reconnecting to a fenced server several times a second). The refusal
/// in words, if refused.
fn admit(
    fence: &TimelineFence,
    target: &str,
    lineage: super::fence::Lineage,
) -> Result<(), String> {
    fence.admit(lineage).map_err(|refusal| {
        if fence.should_log(FENCE_LOG_EVERY) {
            tracing::error!(
                %target,
                refused_total = fence.refused(),
                "PostgreSQL timeline fence: {refusal}"
            );
        }
        refusal.to_string()
    })
}

/// A new connection that does not answer the timeline check in
/// [`CONNECT_TIMEOUT`] is given up, as one that does not connect is: the
/// check must not leave a caller (a poll, a readiness probe) waiting on a
/// server cut off just after the handshake.
const FENCE_CHECK_TIMED_OUT: &str = "the server did not answer the timeline check in time";

/// How often a fenced server's refusals are logged at most.
const FENCE_LOG_EVERY: Duration = Duration::from_secs(10);

/// Opens connections: to the host the driver picks from the URL (the
/// first that accepts, read-write with several hosts), and, when the
/// timeline fence refuses that one (an old primary that came back first
/// in the URL: refused with the alarm, [`admit`]), to the URL's other
/// hosts one by one, taking the first the fence would admit. If none
/// would, the first is returned, for the caller's fence check to refuse.
#[derive(Clone)]
struct Dialer {
    tls: Tls,
    per_host: Arc<[tokio_postgres::Config]>,
    fence: Arc<TimelineFence>,
    /// The redacted URL, for the alarm.
    target: String,
}

type Opened = (Client, tokio::task::JoinHandle<()>);

impl Dialer {
    /// One connection to `config`, its driver spawned (listening, waking
    /// `wake` at each notification, if given).
    async fn open(
        &self,
        config: &tokio_postgres::Config,
        wake: Option<Arc<tokio::sync::Notify>>,
    ) -> Result<Opened, tokio_postgres::Error> {
        fn spawn<S, T>(
            connection: tokio_postgres::Connection<S, T>,
            wake: Option<Arc<tokio::sync::Notify>>,
        ) -> tokio::task::JoinHandle<()>
        where
            S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
            T: tokio_postgres::tls::TlsStream + Unpin + Send + 'static,
        {
            match wake {
                Some(wake) => tokio::spawn(drive_listening(connection, wake)),
                None => tokio::spawn(drive(connection)),
            }
        }
        match &self.tls {
            Tls::Disabled => {
                let (client, connection) = config.connect(NoTls).await?;
                Ok((client, spawn(connection, wake)))
            }
            Tls::VerifyFull(tls) => {
                let (client, connection) = config.connect(tls.clone()).await?;
                Ok((client, spawn(connection, wake)))
            }
        }
    }

    /// Where the server behind `client` stands (one round trip), if it
    /// answers in time.
    async fn lineage(client: &Client) -> Option<super::fence::Lineage> {
        tokio::time::timeout(CONNECT_TIMEOUT, TimelineFence::lineage(client))
            .await
            .ok()?
            .ok()
    }

    /// A connection to `config`, or to another host of the URL when the
    /// fence would refuse the one picked (see the type's docs). `adapt`
    /// applies to each host's settings what `config` adds to the URL's
    /// (a listener's `application_name`).
    async fn dial(
        &self,
        config: &tokio_postgres::Config,
        wake: Option<Arc<tokio::sync::Notify>>,
        adapt: impl Fn(&tokio_postgres::Config) -> tokio_postgres::Config,
    ) -> Result<Opened, tokio_postgres::Error> {
        let first = self.open(&adapt(config), wake.clone()).await?;
        if self.per_host.is_empty() {
            return Ok(first);
        }
        // Refused here with the alarm (counted, logged); a server that
        // does not answer is left to the caller's check.
        match Self::lineage(&first.0).await {
            Some(lineage) if admit(&self.fence, &self.target, lineage).is_err() => {}
            _ => return Ok(first),
        }
        for (i, host) in self.per_host.iter().enumerate() {
            let Ok(other) = self.open(&adapt(host), wake.clone()).await else {
                continue;
            };
            if Self::lineage(&other.0)
                .await
                .is_some_and(|l| self.fence.would_admit(l))
            {
                if self.fence.should_log_fallback(FENCE_LOG_EVERY) {
                    tracing::warn!(
                        target = %self.target,
                        host = i + 1,
                        "the host the URL led to is fenced off; connected to host {} of the \
                         URL instead",
                        i + 1
                    );
                }
                return Ok(other);
            }
        }
        Ok(first)
    }
}

impl deadpool_postgres::Connect for Dialer {
    fn connect(
        &self,
        pg_config: &tokio_postgres::Config,
    ) -> futures_util::future::BoxFuture<'_, Result<Opened, tokio_postgres::Error>> {
        let pg_config = pg_config.clone();
        Box::pin(async move { self.dial(&pg_config, None, |c| c.clone()).await })
    }
}

/// The settings of `config` for its `i`th host alone (its address and
/// port; everything else the same).
fn single_host(config: &tokio_postgres::Config, i: usize) -> tokio_postgres::Config {
    let mut one = tokio_postgres::Config::new();
    if let Some(user) = config.get_user() {
        one.user(user);
    }
    if let Some(password) = config.get_password() {
        one.password(password);
    }
    if let Some(dbname) = config.get_dbname() {
        one.dbname(dbname);
    }
    if let Some(options) = config.get_options() {
        one.options(options);
    }
    if let Some(app) = config.get_application_name() {
        one.application_name(app);
    }
    match config.get_hosts().get(i) {
        Some(Host::Tcp(host)) => {
            one.host(host);
        }
        #[cfg(unix)]
        Some(Host::Unix(path)) => {
            one.host_path(path);
        }
        None => {}
    }
    if let Some(addr) = config.get_hostaddrs().get(i) {
        one.hostaddr(*addr);
    }
    // One port for every host, or one each.
    let ports = config.get_ports();
    if let Some(port) = ports.get(i).or_else(|| ports.first()) {
        one.port(*port);
    }
    if let Some(t) = config.get_connect_timeout() {
        one.connect_timeout(*t);
    }
    if let Some(t) = config.get_tcp_user_timeout() {
        one.tcp_user_timeout(*t);
    }
    one.keepalives(config.get_keepalives())
        .keepalives_idle(config.get_keepalives_idle());
    if let Some(t) = config.get_keepalives_interval() {
        one.keepalives_interval(t);
    }
    if let Some(n) = config.get_keepalives_retries() {
        one.keepalives_retries(n);
    }
    one.ssl_mode(config.get_ssl_mode())
        .ssl_negotiation(config.get_ssl_negotiation())
        .channel_binding(config.get_channel_binding())
        .target_session_attrs(config.get_target_session_attrs());
    one
}

async fn drive<S, T>(mut connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio_postgres::tls::TlsStream + Unpin,
{
    loop {
        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            Some(Ok(tokio_postgres::AsyncMessage::Notice(notice))) => {
                if unreplicated_commit(&notice) {
                    return;
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                // Never the password: the driver's errors carry none (no URL).
                tracing::debug!(error = %chain(&e), "a PostgreSQL connection ended");
                return;
            }
            None => return,
        }
    }
}

/// Whether `notice` is PostgreSQL's word that a commit's wait for the
/// synchronous standbys was cancelled (`pg_cancel_backend` on a backend
/// waiting on `SyncRep`): the commit is then done on the primary alone,
/// and the COMMIT that follows reports success. The driver stops reading
/// there and drops the connection, so that the statement fails as one
/// whose outcome is unknown, never acknowledged as durable. The warning
/// is matched by its SQLSTATE (01000, a plain WARNING: coffre's
/// statements raise no other) and severity, not by its text, which the
/// server may translate.
fn unreplicated_commit(notice: &tokio_postgres::error::DbError) -> bool {
    let cancelled = notice.code() == &SqlState::WARNING
        && notice.parsed_severity() == Some(tokio_postgres::error::Severity::Warning);
    if cancelled {
        tracing::error!(
            warning = notice.message(),
            detail = notice.detail().unwrap_or_default(),
            "PostgreSQL warned about a statement of coffre's (a cancelled wait for the \
             synchronous standbys): its connection is dropped, so that the statement's outcome \
             is unknown rather than acknowledged"
        );
    } else {
        tracing::debug!(notice = notice.message(), "PostgreSQL notice");
    }
    cancelled
}

/// Drives a listening connection, waking `wake` at each notification.
async fn drive_listening<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    wake: std::sync::Arc<tokio::sync::Notify>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio_postgres::tls::TlsStream + Unpin,
{
    loop {
        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => wake.notify_one(),
            Some(Ok(tokio_postgres::AsyncMessage::Notice(notice))) => {
                if unreplicated_commit(&notice) {
                    wake.notify_one();
                    return;
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::debug!(error = %chain(&e), "a listening PostgreSQL connection ended");
                wake.notify_one();
                return;
            }
            None => {
                wake.notify_one();
                return;
            }
        }
    }
}

/// rustls with ring, trusting only `store.ca_file`.
fn rustls_connector(store: &PostgresConfig) -> Result<MakeRustlsConnect, PgError> {
    let Some(path) = &store.ca_file else {
        return Err(PgError::CaFile {
            path: "(not set)".to_string(),
            why: "is required for TLS".to_string(),
        });
    };
    let ca_error = |why: String| PgError::CaFile {
        path: path.display().to_string(),
        why,
    };
    let pem = std::fs::read(path).map_err(|e| ca_error(format!("cannot be read: {e}")))?;
    let cas = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ca_error(format!("is not valid PEM: {e}")))?;
    if cas.is_empty() {
        return Err(ca_error("holds no certificate".to_string()));
    }
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        roots.add(ca).map_err(|e| {
            ca_error(format!(
                "holds a certificate unusable as a trust anchor: {e}"
            ))
        })?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ca_error(format!("leaves no TLS version usable: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// What the server is, from the connection coffre will use.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ServerInfo {
    /// `server_version`, e.g. `15.8 (Debian 15.8-0+deb12u1)`.
    pub version: String,
    /// `server_version_num`, e.g. 150008.
    pub version_num: i32,
    /// `pg_is_in_recovery()`: a standby.
    pub in_recovery: bool,
    /// The server's address and port as it sees them (`None` on a Unix
    /// socket).
    pub server_address: Option<String>,
    /// `synchronous_standby_names`: empty if commits wait for no standby.
    pub synchronous_standby_names: String,
}

impl ServerInfo {
    /// Asks the server (one round trip).
    pub async fn read(connector: &PgConnector, client: &Client) -> Result<Self, PgError> {
        let row = client
            .query_one(
                "SELECT current_setting('server_version'), \
                        current_setting('server_version_num')::int, \
                        pg_is_in_recovery(), \
                        host(inet_server_addr()) || ':' || inet_server_port(), \
                        current_setting('synchronous_standby_names')",
                &[],
            )
            .await
            .map_err(|e| connector.error(&e))?;
        let get = |e: tokio_postgres::Error| connector.error(&e);
        Ok(Self {
            version: row.try_get(0).map_err(get)?,
            version_num: row.try_get(1).map_err(get)?,
            in_recovery: row.try_get(2).map_err(get)?,
            server_address: row.try_get(3).map_err(get)?,
            synchronous_standby_names: row.try_get(4).map_err(get)?,
        })
    }

    /// The server, as a message names it.
    pub fn server(&self) -> &str {
        self.server_address.as_deref().unwrap_or("on a Unix socket")
    }
}

/// Refuses a server coffre must not write to: a standby (in recovery), or
/// one older than PostgreSQL 15.
pub fn check_primary(connector: &PgConnector, info: &ServerInfo) -> Result<(), PgError> {
    if info.in_recovery {
        return Err(PgError::InRecovery {
            target: connector.target().to_string(),
            server: info.server().to_string(),
        });
    }
    if info.version_num < MIN_SERVER_VERSION {
        return Err(PgError::ServerTooOld {
            target: connector.target().to_string(),
            version: info.version.clone(),
        });
    }
    Ok(())
}

/// The pool `coffre serve` works with, after one of its connections showed
/// that the server is a primary of a supported version, with a
/// synchronous standby if `cluster.require_synchronous_standby`: the pool
/// and what the server said.
pub async fn open_pool(connector: &PgConnector) -> Result<(Pool, ServerInfo), PgError> {
    connector.seed_fence().await;
    let pool = connector.pool()?;
    let client = connector.get(&pool).await?;
    let info = ServerInfo::read(connector, &client).await?;
    check_primary(connector, &info)?;
    if connector.require_synchronous_standby && info.synchronous_standby_names.trim().is_empty() {
        return Err(PgError::NoSynchronousStandby {
            target: connector.target().to_string(),
            server: info.server().to_string(),
        });
    }
    drop(client);
    Ok((pool, info))
}

/// An error and its sources, joined with `: ` (the client library's
/// `Display` is only the kind of failure).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// A server error in the server's words (its message, DETAIL and HINT);
/// anything else as its chain.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut text = format!("{} ({})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                text.push_str(&format!("; {detail}"));
            }
            if let Some(hint) = db.hint() {
                text.push_str(&format!("; hint: {hint}"));
            }
            text
        }
        None => chain(e),
    }
}

fn has_source<T: std::error::Error + 'static>(e: &dyn std::error::Error) -> bool {
    let mut source = e.source();
    while let Some(s) = source {
        if s.is::<T>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// `text` with `password` replaced by `***` (a password shorter than 3
/// characters would mangle the text and reveal nothing).
fn scrub(text: &str, password: Option<&str>) -> String {
    match password {
        Some(p) if p.len() >= 3 => text.replace(p, "***"),
        _ => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::config::{ClusterConfig, ClusterMode, NodeId, UrlSource};

    #[test]
    fn redacted_hides_every_password() {
        for (url, shown) in [
            (
                "postgresql://coffre:s3cret@db.example:5432/coffre?sslmode=verify-full",
                "postgresql://coffre:***@db.example:5432/coffre?sslmode=verify-full",
            ),
            (
                "postgres://coffre@db/coffre?password=s3cret&sslmode=disable",
                "postgres://coffre@db/coffre?password=***&sslmode=disable",
            ),
            // An unencoded '@' or '/' in the password.
            (
                "postgresql://coffre:p@ss/w0rd@db/coffre",
                "postgresql://coffre:***@db/coffre",
            ),
            ("postgresql://db/coffre", "postgresql://db/coffre"),
            (
                "postgresql://coffre@db/coffre",
                "postgresql://coffre@db/coffre",
            ),
            (
                "host=db user=coffre password=s3cret dbname=coffre",
                "host=db user=coffre password=*** dbname=coffre",
            ),
            (
                "host=db password = 'it\\'s s3cret' user=coffre",
                "host=db password = *** user=coffre",
            ),
            ("host=db PassWord=s3cret", "host=db PassWord=***"),
            ("not a url at all", "<unparsable connection string>"),
            (
                "host=db password='unterminated",
                "<unparsable connection string>",
            ),
        ] {
            let got = redacted(url);
            assert_eq!(got, shown, "{url}");
            assert!(!got.contains("s3cret") && !got.contains("w0rd"), "{got}");
        }
    }

    #[test]
    fn the_url_never_shows_in_debug() {
        let url = DatabaseUrl::new(
            Zeroizing::new("postgresql://coffre:s3cret@db/coffre".to_string()),
            "$X",
        );
        let shown = format!("{url:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("coffre:***@db"), "{shown}");
    }

    fn store(ca_file: Option<&str>) -> PostgresConfig {
        PostgresConfig {
            url: UrlSource::Env("X".to_string()),
            pool_size: 4,
            ca_file: ca_file.map(Into::into),
        }
    }

    fn cluster() -> ClusterConfig {
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
    }

    fn connector(url: &str, ca_file: Option<&str>) -> Result<PgConnector, PgError> {
        let url = DatabaseUrl::new(Zeroizing::new(url.to_string()), "$COFFRE_DATABASE_URL");
        PgConnector::new(&url, &store(ca_file), &cluster())
    }

    #[test]
    fn each_host_of_a_multi_host_url_gets_the_same_settings_alone() {
        let c = connector(
            "host=10.0.0.1,10.0.0.2 port=5432,5433 user=coffre password=s3cret dbname=db \
             sslmode=disable connect_timeout=3",
            None,
        )
        .unwrap();
        assert_eq!(c.per_host.len(), 2);
        for (i, (host, port)) in [("10.0.0.1", 5432), ("10.0.0.2", 5433)]
            .into_iter()
            .enumerate()
        {
            let one = &c.per_host[i];
            assert_eq!(one.get_hosts(), &[Host::Tcp(host.to_string())]);
            assert_eq!(one.get_ports(), &[port]);
            assert_eq!(one.get_user(), c.config.get_user());
            assert_eq!(one.get_password(), c.config.get_password());
            assert_eq!(one.get_dbname(), Some("db"));
            assert_eq!(one.get_options(), c.config.get_options());
            assert_eq!(one.get_application_name(), Some("coffre/n1"));
            assert_eq!(one.get_connect_timeout(), Some(&Duration::from_secs(3)));
            assert_eq!(one.get_tcp_user_timeout(), c.config.get_tcp_user_timeout());
            assert_eq!(one.get_keepalives_idle(), c.config.get_keepalives_idle());
            assert_eq!(one.get_ssl_mode(), SslMode::Disable);
            assert_eq!(
                one.get_target_session_attrs(),
                TargetSessionAttrs::ReadWrite
            );
        }
        // One port for every host.
        let c = connector(
            "host=a,b port=6000 user=coffre dbname=db sslmode=disable",
            None,
        )
        .unwrap();
        assert_eq!(c.per_host[1].get_hosts(), &[Host::Tcp("b".to_string())]);
        assert_eq!(c.per_host[1].get_ports(), &[6000]);
        // A single host needs no list.
        let c = connector("host=a user=coffre dbname=db sslmode=disable", None).unwrap();
        assert!(c.per_host.is_empty());
    }

    #[test]
    fn sessions_get_coffres_settings() {
        let c = connector(
            "postgresql://coffre:s3cret@127.0.0.1:5432/db?sslmode=disable&options=-c%20work_mem%3D4MB",
            None,
        )
        .unwrap();
        let options = c.config.get_options().unwrap();
        assert!(options.starts_with("-c work_mem=4MB "), "{options}");
        for setting in [
            "synchronous_commit=on",
            "statement_timeout=0",
            "idle_in_transaction_session_timeout=30s",
            "application_name=coffre/n1",
        ] {
            assert!(options.contains(setting), "{options}");
        }
        assert_eq!(c.config.get_application_name(), Some("coffre/n1"));
        let listening = c.listening_config(&c.config);
        assert_eq!(listening.get_application_name(), Some("coffre/n1/listen"));
        let options = listening.get_options().unwrap();
        assert!(
            options.contains("application_name=coffre/n1/listen")
                && options.contains("synchronous_commit=on"),
            "{options}"
        );
        assert_eq!(c.config.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
        assert_eq!(c.config.get_ssl_mode(), SslMode::Disable);
        assert_eq!(c.config.get_target_session_attrs(), TargetSessionAttrs::Any);
        assert_eq!(
            c.target(),
            "postgresql://coffre:***@127.0.0.1:5432/db?sslmode=disable&options=-c%20work_mem%3D4MB"
        );
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        // Several hosts: the primary is looked for, unless the URL says.
        let c = connector(
            "host=a,b user=coffre sslmode=disable connect_timeout=7",
            None,
        )
        .unwrap();
        assert_eq!(
            c.config.get_target_session_attrs(),
            TargetSessionAttrs::ReadWrite
        );
        assert_eq!(
            c.config.get_connect_timeout(),
            Some(&Duration::from_secs(7))
        );
        let c = connector(
            "host=a,b user=coffre sslmode=disable target_session_attrs=any",
            None,
        )
        .unwrap();
        assert_eq!(c.config.get_target_session_attrs(), TargetSessionAttrs::Any);
    }

    #[test]
    fn sslmode_is_verify_full_or_disable() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let cert = rcgen::generate_simple_self_signed(vec!["db".to_string()]).unwrap();
        std::fs::write(&ca, cert.cert.pem()).unwrap();
        let ca = ca.to_str().unwrap();

        let c = connector("postgresql://coffre@db/x?sslmode=verify-full", Some(ca)).unwrap();
        assert_eq!(c.config.get_ssl_mode(), SslMode::Require);
        let c = connector("postgresql://coffre@db/x", Some(ca)).unwrap();
        assert_eq!(c.config.get_ssl_mode(), SslMode::Require);
        let c = connector("host=db user=coffre sslmode='verify-full'", Some(ca)).unwrap();
        assert!(matches!(c.tls, Tls::VerifyFull(_)));

        for (url, ca_file, why) in [
            ("postgresql://coffre@db/x", None, "sets no sslmode"),
            (
                "postgresql://coffre@db/x?sslmode=prefer",
                None,
                "falls back to plain TCP",
            ),
            (
                "postgresql://coffre@db/x?sslmode=allow",
                Some(ca),
                "falls back to plain TCP",
            ),
            (
                "postgresql://coffre@db/x?sslmode=require",
                Some(ca),
                "host name",
            ),
            (
                "postgresql://coffre@db/x?sslmode=verify-ca",
                Some(ca),
                "host name",
            ),
            (
                "postgresql://coffre@db/x?sslmode=verify-full",
                None,
                "store.ca_file is not set",
            ),
            (
                "postgresql://coffre@db/x?sslmode=disable",
                Some(ca),
                "ca_file is set",
            ),
            (
                "postgresql://coffre@db/x?sslmode=bogus",
                None,
                "unknown sslmode",
            ),
            (
                "postgresql://coffre@db/x?sslmode=verify-full&sslrootcert=/r.pem",
                Some(ca),
                "store.ca_file, not from the URL",
            ),
            ("host=/run/postgresql user=coffre", Some(ca), "Unix sockets"),
        ] {
            let err = connector(url, ca_file).unwrap_err().to_string();
            assert!(err.contains(why), "{url}: {err}");
            assert!(err.contains("$COFFRE_DATABASE_URL"), "{err}");
        }
        let err = connector("postgresql://coffre@db/x", Some("/nonexistent/ca.pem"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot be read"), "{err}");
        std::fs::write(dir.path().join("empty.pem"), "").unwrap();
        let empty = dir.path().join("empty.pem");
        let err = connector("postgresql://coffre@db/x", empty.to_str())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no certificate"), "{err}");
    }

    #[test]
    fn a_bad_url_is_refused_without_its_password() {
        for (url, why) in [
            (
                "postgresql://coffre:s3cret@db:notaport/x?sslmode=disable",
                "not a valid",
            ),
            (
                "host=db user=coffre password=s3cret sslmode=disable bogus=1",
                "not a valid",
            ),
            (
                "password=s3cret sslmode=disable user=coffre",
                "names no host",
            ),
            ("host=db password=s3cret sslmode=disable", "names no user"),
            (
                "mysql://coffre:s3cret@db/x",
                "not a PostgreSQL connection string",
            ),
        ] {
            let err = connector(url, None).unwrap_err().to_string();
            assert!(err.contains(why), "{url}: {err}");
            assert!(!err.contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn scrub_replaces_the_password() {
        assert_eq!(scrub("user x, pw s3cret", Some("s3cret")), "user x, pw ***");
        assert_eq!(scrub("a b", Some("a")), "a b");
        assert_eq!(scrub("a b", None), "a b");
    }
}
