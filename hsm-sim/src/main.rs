//! The `hsm-sim` command: serve a simulated HSM, inject faults, show info.
//!
//! ```text
//! hsm-sim serve --listen ADDR --state FILE [--pin-env VAR] [--pin-file FILE] [--label L]
//! hsm-sim fault --endpoint URL set [--latency-ms N] [--error-rate F] [--outage]
//! hsm-sim fault --endpoint URL clear | show [--json] | tamper
//! hsm-sim info --endpoint URL [--json]
//! ```
//!
//! The PIN never appears on the command line (where `ps` would show it): it
//! comes from an environment variable (`HSM_SIM_PIN` by default) or a file.

#![forbid(unsafe_code)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use hsm_sim::Simulator;
use hsm_sim::proto::fault_injection_client::FaultInjectionClient;
use hsm_sim::proto::hsm_client::HsmClient;
use hsm_sim::proto::{self, FaultState};
use zeroize::Zeroizing;

/// Default address: loopback only, the simulator is not a security boundary.
const DEFAULT_LISTEN: &str = "127.0.0.1:7700";
const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:7700";

#[derive(Parser, Debug)]
#[command(
    name = "hsm-sim",
    version,
    about = "A simulated network HSM, for testing only"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the simulated HSM over gRPC (plain TCP, no TLS).
    Serve(ServeArgs),
    /// Inject faults into a running simulator.
    Fault {
        #[arg(long, default_value = DEFAULT_ENDPOINT)]
        endpoint: String,
        #[command(subcommand)]
        action: FaultAction,
    },
    /// Show the token's public information.
    Info {
        #[arg(long, default_value = DEFAULT_ENDPOINT)]
        endpoint: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Address to listen on; port 0 picks a free port (printed on stdout).
    #[arg(long, default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// The token's state file, created on first start.
    #[arg(long)]
    state: PathBuf,
    /// Environment variable holding the PIN.
    #[arg(long, default_value = "HSM_SIM_PIN")]
    pin_env: String,
    /// File holding the PIN (first line); takes precedence over --pin-env.
    #[arg(long)]
    pin_file: Option<PathBuf>,
    /// Token label, used when the state file is created.
    #[arg(long, default_value = "hsm-sim")]
    label: String,
}

#[derive(Subcommand, Debug)]
enum FaultAction {
    /// Replace the injected faults (unset options mean no such fault).
    Set {
        #[arg(long, default_value_t = 0)]
        latency_ms: u32,
        #[arg(long, default_value_t = 0.0)]
        error_rate: f64,
        #[arg(long)]
        outage: bool,
    },
    /// Remove every injected fault.
    Clear,
    /// Show the injected faults.
    Show {
        #[arg(long)]
        json: bool,
    },
    /// Trigger the tamper response: every root key is zeroized. Irreversible.
    Tamper,
}

fn read_pin(args: &ServeArgs) -> anyhow::Result<Zeroizing<String>> {
    let pin = if let Some(path) = &args.pin_file {
        let raw = Zeroizing::new(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read PIN file {}", path.display()))?,
        );
        Zeroizing::new(raw.lines().next().unwrap_or("").to_owned())
    } else {
        match std::env::var(&args.pin_env) {
            Ok(v) => Zeroizing::new(v),
            Err(_) => bail!(
                "no PIN: set the environment variable {} or pass --pin-file FILE",
                args.pin_env
            ),
        }
    };
    if pin.is_empty() {
        bail!("the PIN is empty");
    }
    Ok(pin)
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
    tracing::info!("shutting down");
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let pin = read_pin(&args)?;
    let state = args.state.clone();
    let label = args.label.clone();
    // PBKDF2 and file I/O: off the async workers.
    let sim = tokio::task::spawn_blocking(move || Simulator::open(&state, &pin, &label))
        .await
        .context("opening the token")?
        .with_context(|| format!("cannot open the token in {}", args.state.display()))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "listening beyond loopback: hsm-sim is for testing only (no TLS)");
    }
    {
        // Exactly one line on stdout, flushed: harnesses read the address
        // from it (`--listen 127.0.0.1:0`).
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "hsm-sim listening on {addr}")?;
        stdout.flush()?;
    }
    hsm_sim::server::serve(listener, Arc::new(sim), shutdown_signal())
        .await
        .context("server failed")?;
    Ok(())
}

fn endpoint_url(endpoint: &str) -> String {
    if endpoint.contains("://") {
        endpoint.to_owned()
    } else {
        format!("http://{endpoint}")
    }
}

async fn channel(endpoint: &str) -> anyhow::Result<tonic::transport::Channel> {
    let url = endpoint_url(endpoint);
    tonic::transport::Endpoint::from_shared(url.clone())
        .with_context(|| format!("invalid endpoint {url}"))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(30))
        .connect()
        .await
        .with_context(|| format!("cannot reach hsm-sim at {url}"))
}

fn print_faults(state: &FaultState, json: bool) -> anyhow::Result<()> {
    if json {
        let v = serde_json::json!({
            "latency_ms": state.latency_ms,
            "error_rate": state.error_rate,
            "outage": state.outage,
            "tampered": state.tampered,
        });
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!("latency_ms  {}", state.latency_ms);
        println!("error_rate  {}", state.error_rate);
        println!("outage      {}", state.outage);
        println!("tampered    {}", state.tampered);
    }
    Ok(())
}

async fn fault(endpoint: &str, action: FaultAction) -> anyhow::Result<()> {
    let mut client = FaultInjectionClient::new(channel(endpoint).await?);
    let state = match action {
        FaultAction::Set {
            latency_ms,
            error_rate,
            outage,
        } => {
            if !(0.0..=1.0).contains(&error_rate) {
                bail!("--error-rate must be within 0.0..=1.0");
            }
            client
                .set_faults(proto::SetFaultsRequest {
                    latency_ms,
                    error_rate,
                    outage,
                })
                .await?
                .into_inner()
        }
        FaultAction::Clear => client
            .set_faults(proto::SetFaultsRequest::default())
            .await?
            .into_inner(),
        FaultAction::Show { json } => {
            let state = client
                .get_faults(proto::GetFaultsRequest {})
                .await?
                .into_inner();
            return print_faults(&state, json);
        }
        FaultAction::Tamper => {
            client.tamper(proto::TamperRequest {}).await?;
            println!("tampered: every root key zeroized");
            return Ok(());
        }
    };
    print_faults(&state, false)
}

async fn info(endpoint: &str, json: bool) -> anyhow::Result<()> {
    let mut client = HsmClient::new(channel(endpoint).await?);
    let info = client
        .get_info(proto::GetInfoRequest {})
        .await?
        .into_inner();
    if json {
        let v = serde_json::json!({
            "label": info.label,
            "root_key_ids": info.root_key_ids,
            "current_root_key_id": info.current_root_key_id,
            "tampered": info.tampered,
        });
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!("label                {}", info.label);
        println!("root_key_ids         {:?}", info.root_key_ids);
        println!("current_root_key_id  {}", info.current_root_key_id);
        println!("tampered             {}", info.tampered);
    }
    Ok(())
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing();
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Fault { endpoint, action } => fault(&endpoint, action).await,
        Command::Info { endpoint, json } => info(&endpoint, json).await,
    }
}
