//! The metrics listener: plain HTTP/1.1, `GET` (or `HEAD`) on three paths:
//!
//! | path       | answer                                                        |
//! |------------|---------------------------------------------------------------|
//! | `/metrics` | the Prometheus page                                           |
//! | `/healthz` | `200 ok`: the process is alive (liveness; checks nothing)     |
//! | `/readyz`  | `200 ok` while ready, else `503` with one line per failing component (see [`super::probes`]) |
//!
//! Any other method on them is `405` (with `Allow: GET, HEAD`), any other
//! path `404`. It is meant for a scraper and the orchestrator's probes on
//! the operator's network (bind it to loopback or a management interface);
//! it serves counters and component states, never key material, but it is
//! unauthenticated, so a listener beyond loopback is logged at `warn` when
//! it starts.
//!
//! Bounded, so that it cannot take the file descriptors the gRPC listener
//! and the audit log need: at most [`MAX_CONNECTIONS`] at once (one more is
//! closed as soon as it is accepted), [`HEADER_TIMEOUT`] to send a request,
//! one request per connection, and [`CONNECTION_TIMEOUT`] for all of it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::probes::Report;

/// Produces the page (the text exposition format).
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Produces the last readiness report (cheap: no check runs per probe).
pub type Ready = Arc<dyn Fn() -> Report + Send + Sync>;

/// What the listener serves.
#[derive(Clone)]
pub struct Pages {
    /// `/metrics`.
    pub metrics: Render,
    /// `/readyz`.
    pub ready: Ready,
}

impl std::fmt::Debug for Pages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pages").finish_non_exhaustive()
    }
}

/// How long a scraper may take to send its request.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one connection may last, whatever it does.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections served at once; more are closed on accept.
pub const MAX_CONNECTIONS: usize = 64;

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    pages: Pages,
    shutdown: impl std::future::Future<Output = ()>,
) {
    serve_bounded(listener, pages, shutdown, MAX_CONNECTIONS).await;
}

/// Whether `addr` can be reached only from this host.
fn is_loopback(addr: SocketAddr) -> bool {
    addr.ip().is_loopback()
}

async fn serve_bounded(
    listener: TcpListener,
    pages: Pages,
    shutdown: impl std::future::Future<Output = ()>,
    max_connections: usize,
) {
    if let Ok(addr) = listener.local_addr() {
        if !is_loopback(addr) {
            tracing::warn!(
                %addr,
                "the metrics listener is reachable beyond this host: it is plain HTTP and \
                 unauthenticated; bind it to loopback or a management network only"
            );
        }
    }
    let permits = Arc::new(Semaphore::new(max_connections));
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Reap finished connections so the set stays small.
        while connections.try_join_next().is_some() {}
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            tracing::debug!(%peer, "metrics listener: too many connections, closing one");
            drop(tcp);
            continue;
        };
        let pages = pages.clone();
        connections.spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let response = answer(&req, &pages);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(tcp), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics connection ended"),
                Err(_) => tracing::debug!(%peer, "metrics connection timed out"),
            }
        });
    }
    connections.abort_all();
}

const TEXT: &str = "text/plain; charset=utf-8";

/// The answer to one request. `HEAD` gets the same status and headers as
/// `GET`; hyper leaves the body out.
fn answer(req: &Request<Incoming>, pages: &Pages) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let known = matches!(path, "/metrics" | "/healthz" | "/readyz");
    let readable = matches!(*req.method(), Method::GET | Method::HEAD);
    let (status, content_type, body) = match (known, readable) {
        (false, _) => (
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: try /metrics, /healthz or /readyz\n".to_string(),
        ),
        (true, false) => (
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "only GET and HEAD\n".to_string(),
        ),
        (true, true) => match path {
            "/metrics" => (
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                (pages.metrics)(),
            ),
            "/readyz" => {
                let report = (pages.ready)();
                let status = if report.is_ready() {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                (status, TEXT, report.body())
            }
            _ => (StatusCode::OK, TEXT, "ok\n".to_string()),
        },
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        headers.insert(hyper::header::CONTENT_TYPE, v);
    }
    if status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
    }
    // A probe's answer is about now: no cache may keep it.
    headers.insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::io::{Read, Write};
    use std::net::TcpStream;

    use super::*;

    fn get(addr: SocketAddr) -> std::io::Result<String> {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }

    /// With every slot held by an idle connection, one more is closed at
    /// once (before the fix it was served: the set had no bound); when a
    /// slot frees, scrapes are answered again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_beyond_the_bound_are_closed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pages = Pages {
            metrics: Arc::new(|| "up 1\n".to_string()),
            ready: Arc::new(|| Report::Ready),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_bounded(
            listener,
            pages,
            async move {
                let _ = stopped.await;
            },
            2,
        ));
        let outcome = tokio::task::spawn_blocking(move || {
            let held: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
            // Accepted in order: this one finds no slot and is closed, so
            // the read ends (EOF or reset) instead of waiting for the
            // 10 s header timeout.
            let mut third = TcpStream::connect(addr).unwrap();
            third
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut buf = [0u8; 16];
            let third_read = third.read(&mut buf);
            drop(held);
            // A slot frees when the server sees a held connection close;
            // retry until then (bounded).
            let mut answered = None;
            for _ in 0..100 {
                match get(addr) {
                    Ok(page) if page.contains("up 1") => {
                        answered = Some(page);
                        break;
                    }
                    _ => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            let closed = match third_read {
                Ok(n) => n == 0,
                Err(e) => !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
            };
            (closed, answered)
        })
        .await
        .unwrap();
        let (third_closed, answered) = outcome;
        assert!(third_closed, "the connection beyond the bound was closed");
        assert!(answered.is_some(), "a freed slot serves again");
        stop.send(()).unwrap();
        server.await.unwrap();
    }

    #[test]
    fn only_loopback_is_quiet() {
        assert!(is_loopback("127.0.0.1:9464".parse().unwrap()));
        assert!(is_loopback("[::1]:9464".parse().unwrap()));
        assert!(!is_loopback("0.0.0.0:9464".parse().unwrap()));
        assert!(!is_loopback("10.1.2.3:9464".parse().unwrap()));
    }
}
