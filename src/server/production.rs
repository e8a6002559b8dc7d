//! `coffre serve`: a server assembled from a validated configuration. The
//! HSM backend it names (the simulator as a separate process, or a PKCS#11
//! token, checked and self-tested), the refusal of an insecure backend
//! unless the configuration allows it, the store (sled in the data
//! directory, or the shared PostgreSQL database of `[store]`), the roles,
//! TLS and the audit log.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};

use super::audit::NodeMark;
use super::{AuditSetup, ClusterSetup, DataDir, RunningServer, ServerBuilder};
use crate::audit::ExternalSigner;
use crate::authz::StaticRoles;
use crate::cluster::metered::MeteredCoordination;
use crate::cluster::postgres::PgCoordination;
use crate::cluster::{Coordination, Lease, leases};
use crate::config::{CheckpointKey, ClusterMode, Config, HsmConfig, StoreConfig};
use crate::hsm::Hsm;
use crate::hsm::pkcs11::{Pkcs11Hsm, Pkcs11Settings};
use crate::hsm::sim::RemoteSimHsm;
use crate::metrics::cluster::{ClusterMetrics, LeaseGauges};
use crate::service::freshness::{SharedStore, StaleMode};
use crate::store::KeyStore;
use crate::store::postgres::{
    PgConnector, PgStore, StoreTimeouts, check_schema_for_serving, open_pool,
};

/// Starts the server a configuration describes.
pub async fn start(config: &Config) -> anyhow::Result<RunningServer> {
    start_with(config, StartOnce::default()).await
}

/// What an operator allows for one start only, from `coffre serve`'s flags
/// (never from the configuration file, so that it cannot stay on).
#[derive(Clone, Copy, Debug, Default)]
pub struct StartOnce {
    /// `--accept-audit-log-loss`: see [`crate::server::ServerBuilder::accept_audit_log_loss`].
    pub accept_audit_log_loss: bool,
}

/// [`start`], with what the operator allows for this start only.
pub async fn start_with(config: &Config, once: StartOnce) -> anyhow::Result<RunningServer> {
    let (hsm, signing_token) = open_hsm(config).await?;
    if !hsm.is_secure() {
        if !config.allow_insecure_simulator {
            bail!(
                "the HSM backend is not secure; refusing to serve (see hsm.allow_insecure_simulator)"
            );
        }
        tracing::warn!("the HSM backend is not secure (allowed by the configuration)");
    }
    // Before anything is written: a database coffre cannot serve from is
    // refused with nothing created.
    let shared = match &config.store {
        StoreConfig::Sled => None,
        StoreConfig::Postgres(_) => Some(open_postgres(config).await?),
    };
    let (shared, cluster) = match shared {
        Some((store, cluster)) => (Some(store), Some(cluster)),
        None => (None, None),
    };
    let external_signer = match signing_token {
        Some(token) => {
            Some(audit_signer_in_token(token, cluster.as_ref().map(|c| &c.coordination)).await?)
        }
        None => None,
    };
    let dir = DataDir::new(&config.data_dir);
    // Everything coffre creates from here on is private to its user; what
    // an earlier run or a copy left wider is tightened.
    #[cfg(unix)]
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    dir.create()?;
    #[cfg(unix)]
    dir.secure(&[config.audit.path_in(dir.root())])?;
    let store: Arc<dyn KeyStore> = match shared {
        Some(store) => Arc::new(store),
        None => Arc::new(dir.open_store().await?),
    };
    if config.roles.is_empty() {
        tracing::warn!("no principal has a role: every request will be refused");
    }
    let legacy_approvals = dir.open_legacy_approvals().await?;
    let roles = StaticRoles::new(config.roles.clone()).with_attributes(config.attributes.clone());
    // Several nodes share a PostgreSQL store: each keeps its own audit
    // log, and so its own high-water mark.
    let node_mark = match (&config.store, &config.cluster) {
        (StoreConfig::Postgres(_), Some(cluster)) => Some(NodeMark::new(cluster.node_id.as_str())),
        _ => None,
    };
    let audit = AuditSetup {
        external_signer,
        node_mark,
        ..AuditSetup::new(config.audit.path_in(dir.root()), config.audit.trail.clone())
    };
    let mut builder = ServerBuilder::new(
        store,
        hsm,
        Arc::new(roles),
        crate::grpc::ServerTls {
            crl_state: Some(dir.crl_state()),
            ..config.tls.load()?
        },
        audit,
        config.listen,
    )
    .options(config.options.clone())
    .legacy_approvals(legacy_approvals)
    .scheduler(Some(config.scheduler_interval))
    .metrics(config.metrics_listen)
    .limits(config.limits.clone())
    .accept_audit_log_loss(once.accept_audit_log_loss);
    if let Some(cluster) = cluster {
        builder = builder.cluster(cluster);
    }
    if let Some(xks) = &config.xks {
        let listener = tokio::net::TcpListener::bind(xks.listen)
            .await
            .with_context(|| format!("cannot listen on {} (xks.listen)", xks.listen))?;
        builder = builder.xks(xks.load(listener).context("[xks]")?);
    }
    builder.start().await
}

/// The PostgreSQL store of `[store]`: its pool, on a primary of a
/// supported version (with a synchronous standby if the configuration
/// requires one), whose schema is the one this binary knows; and this
/// node's part in the cluster of `[cluster]` (leases, the node registry,
/// following the change feed). Each refusal names the server (its URL
/// redacted) and says what to do; nothing is written.
async fn open_postgres(config: &Config) -> anyhow::Result<(PgStore, ClusterSetup)> {
    let (StoreConfig::Postgres(pg), Some(cluster)) = (&config.store, &config.cluster) else {
        bail!("store.backend = \"postgres\" needs a [cluster] section with node_id");
    };
    let connector = PgConnector::from_config(pg, cluster)?;
    let (pool, server) = open_pool(&connector).await?;
    let client = connector.get(&pool).await?;
    let version = check_schema_for_serving(&**client, &connector).await?;
    drop(client);
    tracing::info!(
        target = connector.target(),
        server = server.server(),
        server_version = %server.version,
        schema = version,
        node = %cluster.node_id,
        "serving from the PostgreSQL store"
    );
    let connector = Arc::new(connector);
    // Bounded waits on the request path: a node cut off from its database
    // refuses (UNAVAILABLE) rather than hold requests to their deadline.
    let timeouts = StoreTimeouts::for_max_staleness(cluster.max_staleness);
    let store = PgStore::open_with(pool, Arc::clone(&connector), timeouts)
        .await
        .context("opening the PostgreSQL store")?;
    let mut coordination =
        PgCoordination::new(connector, cluster.node_id.as_str(), uuid::Uuid::new_v4());
    if !cluster.notify {
        coordination = coordination.without_notifications();
    }
    // The metrics page shows the leases this node holds (recorded as the
    // jobs take them), the store's database errors and its pool.
    let leases = Arc::new(LeaseGauges::default());
    let pool_store = store.clone();
    let metrics = ClusterMetrics {
        leases: Arc::clone(&leases),
        store_errors: Arc::clone(store.errors()),
        pool: Box::new(move || pool_store.pool_use()),
    };
    let setup = ClusterSetup {
        coordination: Arc::new(MeteredCoordination::new(Arc::new(coordination), leases)),
        shared: SharedStore {
            mode: match cluster.mode {
                ClusterMode::Strict => StaleMode::Strict,
                ClusterMode::Available => StaleMode::Available,
            },
            max_staleness: cluster.max_staleness,
        },
        poll_interval: cluster.poll_interval,
        lease_ttl: cluster.lease_ttl,
        digest_interval: cluster.digest_interval,
        metrics: Some(Arc::new(metrics)),
    };
    Ok((store, setup))
}

/// How long a start waits for another node's one-time setup (the
/// `cluster-init` lease), and how long it may hold it.
const CLUSTER_INIT_WAIT: Duration = Duration::from_secs(60);
const CLUSTER_INIT_TTL: Duration = Duration::from_secs(30);

/// The audit checkpoint signer in the token, its key pair generated there
/// if the token has none. Nodes sharing the token (and a database) do
/// that one at a time, under the `cluster-init` lease: two first starts at
/// once would each make a pair under the one label, sign under their own,
/// and every later start would refuse the ambiguity.
async fn audit_signer_in_token(
    token: Pkcs11Hsm,
    coordination: Option<&Arc<dyn Coordination>>,
) -> anyhow::Result<Arc<dyn ExternalSigner>> {
    let lease = match coordination {
        Some(coordination) => Some(cluster_init_lease(&**coordination).await?),
        None => None,
    };
    let loaded = tokio::task::spawn_blocking(move || token.audit_signer(true))
        .await
        .context("the audit signing key task failed");
    if let (Some(coordination), Some(lease)) = (coordination, &lease)
        && let Err(e) = coordination.release(lease).await
    {
        tracing::warn!(error = %e, "could not release the cluster-init lease; it runs out on its own");
    }
    let in_token = loaded?.context("loading the audit signing key from the HSM")?;
    tracing::info!(signer = ?in_token, "audit checkpoints are signed in the HSM");
    Ok(Arc::new(in_token))
}

/// Takes the `cluster-init` lease, waiting while another node holds it.
async fn cluster_init_lease(coordination: &dyn Coordination) -> anyhow::Result<Lease> {
    let started = std::time::Instant::now();
    let mut said = false;
    loop {
        match coordination
            .acquire(leases::CLUSTER_INIT, CLUSTER_INIT_TTL)
            .await
        {
            Ok(Some(lease)) => return Ok(lease),
            Ok(None) if !said => {
                tracing::info!(
                    "another node is setting up (the cluster-init lease is held): waiting for it"
                );
                said = true;
            }
            Ok(None) => {}
            Err(e) if started.elapsed() >= CLUSTER_INIT_WAIT => {
                return Err(e).context("taking the cluster-init lease");
            }
            Err(e) => tracing::warn!(error = %e, "cannot take the cluster-init lease yet"),
        }
        if started.elapsed() >= CLUSTER_INIT_WAIT {
            bail!(
                "the cluster-init lease was held by another node for {CLUSTER_INIT_WAIT:?}: \
                 another start is stuck in its setup (see `coffre cluster status`)"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The HSM backend the configuration names, ready to serve, and the token
/// that signs the audit checkpoints if the configuration keeps that key
/// there.
async fn open_hsm(config: &Config) -> anyhow::Result<(Arc<dyn Hsm>, Option<Pkcs11Hsm>)> {
    match &config.hsm {
        HsmConfig::Simulator {
            endpoint,
            pin,
            timeout,
        } => {
            let pin = pin.read()?;
            let hsm = RemoteSimHsm::connect(endpoint, pin.expose().to_string(), *timeout)
                .await
                .with_context(|| format!("connecting to the simulated HSM at {endpoint}"))?;
            tracing::warn!("running on the simulated HSM: not for production");
            Ok((Arc::new(hsm), None))
        }
        HsmConfig::Pkcs11 { .. } => {
            let hsm = open_pkcs11(&config.hsm).await?;
            let root = hsm.require_root_key()?;
            hsm.self_test()
                .await
                .context("the PKCS#11 self-test (wrap and unwrap a random value) failed")?;
            tracing::info!(hsm = ?hsm, current_root_key = root, "PKCS#11 HSM ready");
            let signing = (config.audit.checkpoint_key == CheckpointKey::Hsm).then(|| hsm.clone());
            Ok((Arc::new(hsm), signing))
        }
    }
}

/// Opens the PKCS#11 backend a configuration names: loads the module, finds
/// the token, logs in, checks the mechanisms and every root key's
/// attributes. Errors say which of these failed.
pub async fn open_pkcs11(hsm: &HsmConfig) -> anyhow::Result<Pkcs11Hsm> {
    let HsmConfig::Pkcs11 {
        module,
        token,
        pin,
        sessions,
        timeout,
    } = hsm
    else {
        bail!("the configuration's hsm.backend is not \"pkcs11\"");
    };
    let settings = Pkcs11Settings {
        module: module.clone(),
        token: token.clone(),
        pin: pin.read()?.into_zeroizing(),
        sessions: *sessions,
        timeout: *timeout,
    };
    let what = format!(
        "opening the {token} through the PKCS#11 module {}",
        module.display()
    );
    tokio::task::spawn_blocking(move || Pkcs11Hsm::open(settings))
        .await
        .context("the PKCS#11 start task failed")?
        .context(what)
}
