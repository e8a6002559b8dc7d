//! `coffre dev` and `coffre serve` from the command line: hardening, the
//! server assembled by [`crate::server`], the banner, and the signals that
//! stop it.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::{DevArgs, DevAuditMode};
use crate::audit::Durability;
use crate::config::{AuditConfig, Config};
use crate::server::{DataDir, dev};

/// Logs go to standard error; `RUST_LOG` filters them (default `info`).
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second initialisation (tests) is harmless: keep the first.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

impl From<DevArgs> for dev::DevOptions {
    fn from(args: DevArgs) -> Self {
        Self {
            data_dir: args.data_dir,
            listen: args.listen,
            options: dev::dev_kms_options(),
            scheduler_interval: Some(Duration::from_secs(10)),
            quorum: args.quorum,
            crl: args.crl,
            crl_reload_interval: Duration::from_secs(args.crl_reload_secs),
            audit: AuditConfig::dev(
                match args.audit_durability {
                    DevAuditMode::Fsync => Durability::Fsync,
                    DevAuditMode::Write | DevAuditMode::Off => Durability::Write,
                },
                args.audit_durability == DevAuditMode::Off,
            ),
            metrics_listen: args.metrics_listen,
            preload_keys: args.preload_keys,
            accept_audit_log_loss: args.accept_audit_log_loss,
            attributes: args.attributes,
            xks_listen: args.xks_listen,
        }
    }
}

/// `coffre dev`: runs until Ctrl-C / SIGTERM or `extra_shutdown`.
pub async fn run_dev(
    opts: dev::DevOptions,
    extra_shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    crate::hardening::disable_core_dumps()?;
    if crate::hardening::running_as_root() {
        tracing::warn!(
            "coffre dev is running as root; coffre serve refuses to unless told to (allow_root)"
        );
    }
    let server = dev::start(&opts).await?;
    if opts.preload_keys > 0 {
        dev::preload_keys(&server, opts.preload_keys).await?;
    }
    print_dev_banner(
        &DataDir::new(&opts.data_dir),
        server.addr,
        server.xks_addr,
        &opts,
    )?;
    if let Some(crl) = &opts.crl {
        println!(
            "  client CRL       {}   (re-read on SIGHUP and when it changes)",
            crl.display()
        );
    }
    server
        .run_until(async {
            tokio::select! {
                () = termination() => {}
                () = extra_shutdown => {}
            }
        })
        .await
}

/// `coffre dev --nodes N`: see [`crate::server::dev_cluster`].
pub async fn run_dev_cluster(opts: dev::DevOptions, nodes: u32) -> anyhow::Result<()> {
    crate::hardening::disable_core_dumps()?;
    if opts.accept_audit_log_loss || opts.crl.is_some() {
        anyhow::bail!(
            "--nodes does not take --accept-audit-log-loss or --crl (use them with a single node)"
        );
    }
    let cluster = crate::server::dev_cluster::start(&opts, nodes).await?;
    let root = opts.data_dir.display();
    let endpoints: Vec<&str> = cluster
        .file
        .nodes
        .iter()
        .map(|n| n.endpoint.as_str())
        .collect();
    println!(
        "coffre dev is running on {nodes} nodes, {}  (mTLS; one PostgreSQL store; Ctrl-C stops \
         them all)",
        endpoints.join(", ")
    );
    for node in &cluster.file.nodes {
        println!(
            "  node {:<4} {}   pid {:<8} metrics {}",
            node.node_id, node.endpoint, node.pid, node.metrics
        );
    }
    println!("  postgres    {root}/postgres   (its URL in {root}/postgres-url)");
    println!("  cluster     {}", cluster.cluster_json.display());
    println!("  status      coffre cluster status --config {root}/nodes/n1/coffre.toml");
    println!(
        "  clients     the dev PKI in {root}/pki, as for one node; --data-dir {root} --node n2 \
         (or any node's --endpoint)"
    );
    println!("Ctrl-C stops every node, the HSM and PostgreSQL.");
    cluster.run_until(termination()).await;
    Ok(())
}

/// `coffre serve --config FILE`.
pub async fn run_serve(
    config_path: &Path,
    allow_root: bool,
    once: crate::server::production::StartOnce,
    preload_keys: Option<u64>,
) -> anyhow::Result<()> {
    crate::hardening::disable_core_dumps()?;
    let config = Config::load(config_path)?;
    crate::hardening::refuse_root(allow_root || config.allow_root)?;
    let server = crate::server::production::start_with(&config, once).await?;
    if let Some(count) = preload_keys {
        // A bulk load, then out: the caller (coffre dev --nodes) starts the
        // nodes once the keys are in.
        let loaded = dev::preload_keys(&server, count).await;
        server.stop().await?;
        return loaded;
    }
    tracing::info!(addr = %server.addr, "coffre serving");
    if let Some(xks) = server.xks_addr {
        println!("coffre XKS front listening on {xks}");
    }
    println!("coffre listening on {}", server.addr);
    server.run_until(termination()).await
}

async fn termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn print_dev_banner(
    dir: &DataDir,
    addr: SocketAddr,
    xks: Option<SocketAddr>,
    opts: &dev::DevOptions,
) -> anyhow::Result<()> {
    let audit_log = dir.audit_log();
    let public_key = dir.audit_public_key();
    let pki = dir.pki().dir;
    let (audit_log, public_key, pki) = (audit_log.display(), public_key.display(), pki.display());
    let root = dir.root().display();
    let operators: Vec<String> = (2..=opts.quorum)
        .map(|n| format!("operator-{n}.pem"))
        .collect();
    let more_operators = if operators.is_empty() {
        String::new()
    } else {
        format!(", {}", operators.join(", "))
    };
    let connect = format!("--data-dir {root} --endpoint https://{addr}");
    println!(
        "\
coffre dev is running on https://{addr}  (mTLS; Ctrl-C stops it)

  data directory   {root}   (store, simulated HSM state, dev PKI; reused on restart)
  dev PKI          {pki}/  ca.pem, server.pem, operator.pem{more_operators}, service.pem, auditor.pem (+ -key.pem)
                   each role's certificates from its own CA: operator-ca.pem, service-ca.pem, auditor-ca.pem
  HSM              simulated, in-process — for development only
  audit log        {audit_log}  (verify exports with {public_key})"
    );
    println!(
        "  attributes       {}   (for equals_caller_attribute; --attribute PRINCIPAL_OR_ROLE:KEY=VALUE)",
        attributes_line(opts)?
    );
    if let Some(xks) = xks {
        println!(
            "  AWS XKS front    https://localhost:{}{}/kms/xks/v1  (SigV4 credential and CA in {root}/xks.json;
                   principal {}: grant it Encrypt and Decrypt; check it with coffre xks health --data-dir {root})",
            xks.port(),
            crate::server::dev_xks::URI_PREFIX,
            crate::pki::dev_principal(crate::server::dev_xks::PRINCIPAL_NAME),
        );
    }
    if opts.quorum > 1 {
        println!(
            "  quorum           {} approvals from distinct operators for sensitive operations:
                   operator.pem{more_operators} in {pki}/
                   act as another operator with --as NAME (its NAME.pem and NAME-key.pem), e.g.
                   coffre approval list --as operator-2 {connect}",
            opts.quorum
        );
    }
    // The context the examples use: the dev service's own tenant.
    let tenant = dev::resolve_attributes(opts.quorum, &opts.attributes)?
        .get(&crate::pki::dev_principal("service"))
        .and_then(|a| a.get("tenant").cloned())
        .unwrap_or_else(|| dev::DEFAULT_SERVICE_ATTRIBUTE.1.to_string());
    println!(
        "
Try it from another terminal:
  coffre key create --alias demo {connect}
  coffre datakey generate --key demo --context tenant={tenant} {connect}
  coffre decrypt --blob <ciphertext_blob> --context tenant={tenant} {connect}
(with cargo: cargo run --release -- key create ...)"
    );
    Ok(())
}

/// `service: tenant=acme; operator-2: team=blue`: every principal's
/// attributes, by the short name of a dev principal where it is one.
fn attributes_line(opts: &dev::DevOptions) -> anyhow::Result<String> {
    let resolved = dev::resolve_attributes(opts.quorum, &opts.attributes)?;
    let mut parts: Vec<(String, String)> = resolved
        .into_iter()
        .map(|(principal, attrs)| {
            let name = principal
                .strip_prefix(&crate::pki::dev_principal(""))
                .map_or_else(|| principal.clone(), str::to_string);
            let pairs: Vec<String> = attrs.iter().map(|(k, v)| format!("{k}={v}")).collect();
            (name, pairs.join(", "))
        })
        .collect();
    parts.sort();
    Ok(parts
        .into_iter()
        .map(|(name, pairs)| format!("{name}: {pairs}"))
        .collect::<Vec<_>>()
        .join("; "))
}
