//! The metrics listener: plain HTTP/1.1, `GET /metrics` only. It is meant
//! for a scraper on the operator's network (bind it to loopback or a
//! management interface); it serves counters, never key material, but it
//! is unauthenticated, so a listener beyond loopback is logged at `warn`
//! when it starts.
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

/// Produces the page (the text exposition format).
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// How long a scraper may take to send its request.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one connection may last, whatever it does.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections served at once; more are closed on accept.
pub const MAX_CONNECTIONS: usize = 64;

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    render: Render,
    shutdown: impl std::future::Future<Output = ()>,
) {
    serve_bounded(listener, render, shutdown, MAX_CONNECTIONS).await;
}

/// Whether `addr` can be reached only from this host.
fn is_loopback(addr: SocketAddr) -> bool {
    addr.ip().is_loopback()
}

async fn serve_bounded(
    listener: TcpListener,
    render: Render,
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
        let render = Arc::clone(&render);
        connections.spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let render = Arc::clone(&render);
                async move { Ok::<_, Infallible>(answer(&req, &render)) }
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

fn answer(req: &Request<Incoming>, render: &Render) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            render(),
        ),
        (&Method::GET, _) => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: try /metrics\n".to_string(),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, v);
    }
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
        let render: Render = Arc::new(|| "up 1\n".to_string());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_bounded(
            listener,
            render,
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
