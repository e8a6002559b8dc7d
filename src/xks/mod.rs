//! The AWS KMS External Key Store (XKS) proxy API v1 front (`design/xks.md`;
//! the specification is `aws/aws-kms-xksproxy-api-spec`, v1.0.3).
//!
//! AWS KMS sends every encrypt and decrypt of a customer's external key to
//! this front, over HTTPS, signed with SigV4. Each request goes through the
//! same [`Pipeline`] as gRPC: one audit record before its answer, the rate
//! limit, fail closed; the core (`service::xks`) decides with the key's
//! policy and state, so the operator's disable reaches AWS.
//!
//! - [`wire`]: the byte layouts (framed GCM AAD, integrity value) and the JSON.
//! - [`sigv4`]: request authentication.
//! - [`front`]: routing, conversions, the `{errorName, errorMessage}` answers.
//! - [`listener`]: TLS (optionally mutual, CN pinned) and hyper.
//! - [`client`]: a client calling a front as AWS KMS does (`coffre xks`,
//!   `coffre bench --ops xks-…`, the tests).

pub mod client;
pub mod front;
pub mod listener;
pub mod sigv4;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use listener::XksTls;
pub use sigv4::Credential;

use crate::pipeline::Pipeline;

/// How long a request may take in the core by default: well inside the
/// 250 ms after which AWS KMS gives up, leaving room for the network.
pub const DEFAULT_DEADLINE: Duration = Duration::from_millis(150);

/// Everything the XKS front is started with.
#[derive(Debug)]
pub struct XksSetup {
    /// Bound already (so that a busy port stops the start early).
    pub listener: TcpListener,
    pub tls: XksTls,
    /// "" or "/a/b": what precedes `/kms/xks/v1` in every path.
    pub uri_prefix: String,
    pub credentials: Vec<Credential>,
    pub deadline: Duration,
}

/// The running front: where it listens, and how to stop it.
#[derive(Debug)]
pub struct RunningXks {
    pub addr: std::net::SocketAddr,
    pub(crate) shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    pub(crate) task: JoinHandle<anyhow::Result<()>>,
}

/// Checks the TLS material and starts serving on `setup.listener`.
pub fn start(setup: XksSetup, pipeline: Arc<Pipeline>) -> anyhow::Result<RunningXks> {
    let config = listener::server_config(&setup.tls)?;
    let addr = setup.listener.local_addr()?;
    let front = Arc::new(front::Front {
        pipeline,
        verifier: sigv4::Verifier::new(setup.credentials),
        prefix: setup.uri_prefix,
        deadline: setup.deadline,
    });
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(listener::serve(front, setup.listener, config, async move {
        let _ = rx.await;
    }));
    tracing::info!(%addr, "serving the AWS XKS proxy API");
    Ok(RunningXks {
        addr,
        shutdown: Some(tx),
        task,
    })
}

impl RunningXks {
    /// Stops accepting and waits for in-flight requests.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.await?
    }
}
