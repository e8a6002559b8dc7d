//! The `hsm-sim` command: serve a simulated HSM, inject faults, show info.
//!
//! ```text
//! hsm-sim serve --listen ADDR --state FILE [--pin-env VAR] [--pin-file FILE] [--label L]
//!               [--allow-fault-injection] [--allow-non-loopback]
//! hsm-sim fault --endpoint URL set [--latency-ms N] [--error-rate F] [--outage]
//! hsm-sim fault --endpoint URL clear | show [--json] | tamper
//! hsm-sim info --endpoint URL [--json]
//! ```
//!
//! The PIN never appears on the command line (where `ps` would show it): it
//! comes from an environment variable (`HSM_SIM_PIN` by default) or a file,
//! and every copy this process makes of it is zeroized when dropped.
//!
//! `hsm-sim fault` only works against a server started with
//! `--allow-fault-injection`: the gRPC fault-injection service is
//! unauthenticated and `tamper` destroys every root key for good, so servers
//! refuse it by default (`PERMISSION_DENIED`).
//!
//! Trust model: hsm-sim is for development and tests only. Its gRPC is
//! plain (no TLS, no server authentication): `Login` carries the PIN,
//! `Wrap` and `SealWithObject` carry key material in clear, and
//! `GenerateRandom` returns the bytes that become CMKs. Only this host may
//! reach it, so `serve` refuses a non-loopback `--listen` unless
//! `--allow-non-loopback` says the network in between is trusted.

#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use hsm_sim::Simulator;
use hsm_sim::proto::fault_injection_client::FaultInjectionClient;
use hsm_sim::proto::hsm_client::HsmClient;
use hsm_sim::proto::{self, FaultState};
use hsm_sim::server::ServerOptions;
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
    /// Inject faults into a running simulator (one started with
    /// `serve --allow-fault-injection`; others refuse).
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
    /// Serve the fault-injection API (set/clear faults, tamper) to anyone who
    /// can reach the port. Off by default: tamper irreversibly destroys every
    /// root key, and the API has no authentication.
    #[arg(long)]
    allow_fault_injection: bool,
    /// Listen on an address beyond loopback. Refused by default: the PIN,
    /// CMK plaintexts and the random bytes that become CMKs cross the
    /// connection in clear.
    #[arg(long)]
    allow_non_loopback: bool,
}

/// Refuses a listener beyond loopback unless allowed (the module docs'
/// trust model).
fn check_listen(listen: SocketAddr, allowed: bool) -> anyhow::Result<()> {
    if listen.ip().is_loopback() {
        return Ok(());
    }
    if !allowed {
        bail!(
            "refusing to listen on {listen}: hsm-sim is for development and tests only and \
             speaks plain gRPC (no TLS, no server authentication; the PIN and key material \
             cross in clear), so only loopback is allowed; pass --allow-non-loopback to \
             accept that risk on a trusted network"
        );
    }
    tracing::warn!(
        %listen,
        "listening beyond loopback (--allow-non-loopback): hsm-sim is for testing only (no TLS)"
    );
    Ok(())
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

/// Largest PIN file read, in bytes.
const MAX_PIN_FILE_LEN: usize = 4096;

/// Reads the PIN file into one preallocated, zeroized buffer: no growth
/// (which would leave un-wiped copies behind) and no `String` that a UTF-8
/// error would drop un-wiped, as `fs::read_to_string` does.
fn read_pin_file(path: &std::path::Path) -> anyhow::Result<Zeroizing<String>> {
    let cannot = || format!("cannot read PIN file {}", path.display());
    let mut file = std::fs::File::open(path).with_context(cannot)?;
    let mut buf = Zeroizing::new(vec![0u8; MAX_PIN_FILE_LEN + 1]);
    let mut len = 0;
    while let Some(rest) = buf.get_mut(len..).filter(|r| !r.is_empty()) {
        match file.read(rest) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(cannot),
        }
    }
    if len > MAX_PIN_FILE_LEN {
        bail!(
            "PIN file {} is larger than {MAX_PIN_FILE_LEN} bytes",
            path.display()
        );
    }
    let text = buf
        .get(..len)
        .map(std::str::from_utf8)
        .and_then(Result::ok)
        .ok_or_else(|| anyhow!("PIN file {} is not UTF-8", path.display()))?;
    Ok(Zeroizing::new(text.lines().next().unwrap_or("").to_owned()))
}

fn read_pin(args: &ServeArgs) -> anyhow::Result<Zeroizing<String>> {
    let pin = if let Some(path) = &args.pin_file {
        read_pin_file(path)?
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
    check_listen(args.listen, args.allow_non_loopback)?;
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
    {
        // Exactly one line on stdout, flushed: harnesses read the address
        // from it (`--listen 127.0.0.1:0`).
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "hsm-sim listening on {addr}")?;
        stdout.flush()?;
    }
    let options = ServerOptions::default().with_fault_injection(args.allow_fault_injection);
    if options.allow_fault_injection {
        tracing::warn!("fault injection enabled: anyone reaching {addr} can tamper with the token");
    }
    hsm_sim::server::serve(listener, Arc::new(sim), options, shutdown_signal())
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

/// A refused or failed RPC as a one-line error: the server's message, which
/// for a server without `--allow-fault-injection` says how to enable it.
fn rpc_error(status: tonic::Status) -> anyhow::Error {
    match status.code() {
        tonic::Code::PermissionDenied => anyhow!("refused by hsm-sim: {}", status.message()),
        code => anyhow!("hsm-sim error ({code:?}): {}", status.message()),
    }
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
                .await
                .map_err(rpc_error)?
                .into_inner()
        }
        FaultAction::Clear => client
            .set_faults(proto::SetFaultsRequest::default())
            .await
            .map_err(rpc_error)?
            .into_inner(),
        FaultAction::Show { json } => {
            let state = client
                .get_faults(proto::GetFaultsRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner();
            return print_faults(&state, json);
        }
        FaultAction::Tamper => {
            client
                .tamper(proto::TamperRequest {})
                .await
                .map_err(rpc_error)?;
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
