//! `hosted-store`: a small object store, as a hosted service on the
//! provider's machines would be, that keeps every object sealed with
//! `coffre-client` under a customer's key held by coffre.
//!
//! ```text
//! PUT    /objects/NAME   body → sealed, stored as STORAGE/objects/HEX(NAME)
//! GET    /objects/NAME   → opened (coffre decrypts the data key) → body
//! GET    /healthz        → 200
//! ```
//!
//! Each object is sealed with the context `{tenant: TENANT}` under a data
//! key from coffre, cached by `CachingClient` within `--cache-max-age-ms`
//! (the cache is per context: a context per object would ask coffre for
//! every object). The object's name is sealed with it, in front of its
//! bytes (`u16be(len) ‖ name ‖ data`), and checked when it is read: a file
//! copied over another object's does not open as that object.
//! A request may declare why it reads (`X-Access-Justification:
//! third-party-data-request`, as a provider answering a foreign authority
//! would have to): it then goes to coffre uncached, with that
//! justification, and the key's policy decides; coffre records it.
//!
//! Errors are plain text: 403 for what coffre refused (a disabled key, a
//! justification the policy does not accept), 404 for an unknown object,
//! 422 for a stored object that does not verify, 503 when coffre cannot
//! be reached.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use coffre_client::{
    AccessReason, CacheLimits, CachingClient, Client, ClientError, Connection, FormatError,
};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use zeroize::Zeroizing;

/// The largest object accepted.
const MAX_OBJECT: usize = 16 * 1024 * 1024;

#[derive(Debug, Parser)]
#[command(about = "A hosted object store whose objects are sealed under a key held by coffre")]
struct Args {
    /// Where to listen (plain HTTP: put it behind the provider's own TLS).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Where the sealed objects are kept.
    #[arg(long)]
    storage: PathBuf,
    /// coffre's endpoint.
    #[arg(long, default_value = "https://127.0.0.1:7443")]
    coffre: String,
    /// The CA of coffre's certificate, and this service's certificate and
    /// key (a service identity coffre knows).
    #[arg(long)]
    ca: PathBuf,
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    cert_key: PathBuf,
    /// The customer's key in coffre (id or alias).
    #[arg(long)]
    key: String,
    /// The tenant, bound into every object's context.
    #[arg(long, default_value = "acme")]
    tenant: String,
    /// How long a data key is cached: the longest a disable in coffre
    /// can take to stop this service.
    #[arg(long, default_value_t = 1000)]
    cache_max_age_ms: u64,
}

struct Store {
    dir: PathBuf,
    key: String,
    tenant: String,
    connection: Connection,
    cached: CachingClient<Client>,
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.into())));
    *r.status_mut() = status;
    r
}

/// A refusal from coffre, or a failure, as an HTTP answer.
fn failure(e: &ClientError) -> Response<Full<Bytes>> {
    let status = match e {
        ClientError::KeyUnusable(_) | ClientError::Refused(_) => StatusCode::FORBIDDEN,
        ClientError::Unavailable(_) | ClientError::Throttled(_) => StatusCode::SERVICE_UNAVAILABLE,
        ClientError::Format(FormatError::Io(_)) => StatusCode::INTERNAL_SERVER_ERROR,
        ClientError::Format(_) | ClientError::ContextMismatch { .. } => {
            StatusCode::UNPROCESSABLE_ENTITY
        }
        _ => StatusCode::BAD_GATEWAY,
    };
    text(status, format!("{e}\n"))
}

fn reason(name: &str) -> Option<AccessReason> {
    Some(match name {
        "customer-initiated-access" => AccessReason::CustomerInitiatedAccess,
        "customer-initiated-support" => AccessReason::CustomerInitiatedSupport,
        "provider-initiated-service" => AccessReason::ProviderInitiatedService,
        "provider-system-operation" => AccessReason::ProviderSystemOperation,
        "provider-initiated-review" => AccessReason::ProviderInitiatedReview,
        "third-party-data-request" => AccessReason::ThirdPartyDataRequest,
        _ => return None,
    })
}

impl Store {
    fn context(&self) -> BTreeMap<String, String> {
        [("tenant".to_string(), self.tenant.clone())].into()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join("objects").join(hex::encode(name))
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let path = req.uri().path().to_string();
        if path == "/healthz" {
            return Ok(text(StatusCode::OK, "ok\n"));
        }
        let Some(name) = path.strip_prefix("/objects/").filter(|n| valid_name(n)) else {
            return Ok(text(StatusCode::NOT_FOUND, "no such path\n"));
        };
        let name = name.to_string();
        let declared = req
            .headers()
            .get("x-access-justification")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Ok(match *req.method() {
            Method::PUT => self.put(&name, req).await,
            Method::GET => self.get(&name, declared.as_deref()).await,
            _ => text(StatusCode::METHOD_NOT_ALLOWED, "PUT or GET\n"),
        })
    }

    async fn put(&self, name: &str, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let body = match Limited::new(req.into_body(), MAX_OBJECT).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "at most 16 MiB\n"),
        };
        let mut named = Zeroizing::new(Vec::with_capacity(2 + name.len() + body.len()));
        named.extend_from_slice(&u16::try_from(name.len()).unwrap_or(u16::MAX).to_be_bytes());
        named.extend_from_slice(name.as_bytes());
        named.extend_from_slice(&body);
        let sealed = match self
            .cached
            .seal_bytes(&self.key, &self.context(), &named)
            .await
        {
            Ok(s) => s,
            Err(e) => return failure(&e),
        };
        match write_atomic(&self.path(name), &sealed) {
            Ok(()) => text(
                StatusCode::CREATED,
                format!("stored {} bytes sealed\n", sealed.len()),
            ),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("storing: {e}\n")),
        }
    }

    async fn get(&self, name: &str, declared: Option<&str>) -> Response<Full<Bytes>> {
        let sealed = match std::fs::read(self.path(name)) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return text(StatusCode::NOT_FOUND, "no such object\n");
            }
            Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, format!("reading: {e}\n")),
        };
        let context = self.context();
        let opened = match declared {
            None | Some("customer-initiated-access") => {
                self.cached.open_bytes(&sealed, Some(&context)).await
            }
            Some(other) => {
                // Another reason goes to coffre itself, uncached: the
                // key's policy decides, and coffre records it.
                let Some(reason) = reason(other) else {
                    return text(StatusCode::BAD_REQUEST, "unknown X-Access-Justification\n");
                };
                match Client::connect(&self.connection).await {
                    Ok(c) => {
                        let uncached = CachingClient::new(
                            c.with_reason(reason),
                            CacheLimits {
                                max_age: Duration::ZERO,
                                ..CacheLimits::default()
                            },
                        );
                        uncached.open_bytes(&sealed, Some(&context)).await
                    }
                    Err(e) => Err(e),
                }
            }
        };
        match opened {
            Ok((plain, _)) => {
                let plain = Zeroizing::new(plain);
                let (len, rest) = plain.split_first_chunk::<2>().unwrap_or((&[0, 0], &[]));
                let len = usize::from(u16::from_be_bytes(*len));
                match (rest.get(..len), rest.get(len..)) {
                    (Some(stored), Some(data)) if stored == name.as_bytes() => {
                        Response::new(Full::new(Bytes::copy_from_slice(data)))
                    }
                    _ => text(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "this file holds another object: it was moved or copied here\n",
                    ),
                }
            }
            Err(e) => failure(&e),
        }
    }
}

/// Object names: 1 to 200 of `A-Z a-z 0-9 . _ -`.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let connection = Connection {
        endpoint: args.coffre.clone(),
        ca_pem: read(&args.ca)?,
        cert_pem: read(&args.cert)?,
        key_pem: Zeroizing::new(read(&args.cert_key)?),
        timeout: Duration::from_secs(10),
    };
    let client = Client::connect(&connection)
        .await
        .with_context(|| format!("connecting to coffre at {}", args.coffre))?;
    std::fs::create_dir_all(args.storage.join("objects"))
        .with_context(|| format!("creating {}", args.storage.display()))?;
    let store = Arc::new(Store {
        dir: args.storage.clone(),
        key: args.key.clone(),
        tenant: args.tenant.clone(),
        connection,
        cached: CachingClient::new(
            client,
            CacheLimits {
                max_age: Duration::from_millis(args.cache_max_age_ms),
                ..CacheLimits::default()
            },
        ),
    });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    println!(
        "hosted-store listening on http://{}",
        listener.local_addr()?
    );
    loop {
        let (stream, _) = listener.accept().await?;
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| Arc::clone(&store).handle(req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
