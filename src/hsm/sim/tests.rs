//! Both simulator backends through the trait: the same checks, faults, a
//! tamper response, deadlines and a simulator restart.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hsm_sim::{Faults, Simulator};

use super::{LocalSimHsm, RemoteSimHsm};
use crate::hsm::{Hsm, HsmError};

const PIN: &str = "coffre-test-pin";

/// The same checks through the trait, for any backend.
async fn conformance(hsm: &dyn Hsm) {
    assert!(!hsm.is_secure());
    let w = hsm.wrap(b"cmk material", b"aad-1").await.unwrap();
    assert_eq!(w.root_key_id, 1);
    let back = hsm.unwrap(&w.blob, b"aad-1").await.unwrap();
    assert_eq!(back.expose(), b"cmk material");
    assert!(matches!(
        hsm.unwrap(&w.blob, b"aad-2").await,
        Err(HsmError::AuthenticationFailed)
    ));
    let mut flipped = w.blob.clone();
    if let Some(last) = flipped.last_mut() {
        *last ^= 1;
    }
    for bad in [flipped, Vec::new(), vec![0xFF; 64], w.blob[..20].to_vec()] {
        assert!(matches!(
            hsm.unwrap(&bad, b"aad-1").await,
            Err(HsmError::AuthenticationFailed)
        ));
    }
    assert!(matches!(
        hsm.wrap(b"", b"").await,
        Err(HsmError::Rejected(_))
    ));
    let r = hsm.generate_random(32).await.unwrap();
    assert_eq!(r.len(), 32);
    assert_ne!(r.expose(), hsm.generate_random(32).await.unwrap().expose());
    for len in [0, 1025] {
        assert!(matches!(
            hsm.generate_random(len).await,
            Err(HsmError::Rejected(_))
        ));
    }
    let info = hsm.info().await.unwrap();
    assert_eq!(info.current_root_key_id, 1);
    assert_eq!(info.root_key_ids, vec![1]);
}

fn state() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hsm.state");
    (dir, path)
}

#[tokio::test]
async fn local_conformance_faults_and_tamper() {
    let (_dir, path) = state();
    let hsm = LocalSimHsm::open(&path, PIN).unwrap();
    conformance(&hsm).await;
    let w = hsm.wrap(b"k", b"").await.unwrap();

    hsm.simulator()
        .set_faults(Faults {
            outage: true,
            ..Faults::default()
        })
        .unwrap();
    assert!(matches!(
        hsm.unwrap(&w.blob, b"").await,
        Err(HsmError::Unavailable(_))
    ));
    assert!(matches!(hsm.info().await, Err(HsmError::Unavailable(_))));
    hsm.simulator().set_faults(Faults::default()).unwrap();
    assert_eq!(hsm.unwrap(&w.blob, b"").await.unwrap().expose(), b"k");

    // Reopening keeps the root key; a wrong PIN is refused.
    drop(hsm);
    assert!(matches!(
        LocalSimHsm::open(&path, "wrong"),
        Err(HsmError::LoginFailed(_))
    ));
    let hsm = LocalSimHsm::open(&path, PIN).unwrap();
    assert_eq!(hsm.unwrap(&w.blob, b"").await.unwrap().expose(), b"k");
    assert!(!format!("{hsm:?}").contains(PIN));

    hsm.simulator().tamper().unwrap();
    assert!(matches!(
        hsm.unwrap(&w.blob, b"").await,
        Err(HsmError::Tampered)
    ));
    assert!(matches!(hsm.wrap(b"k", b"").await, Err(HsmError::Tampered)));
}

/// An hsm-sim gRPC server on loopback, stoppable.
struct Server {
    addr: SocketAddr,
    sim: Arc<Simulator>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

async fn start(path: &Path, addr: SocketAddr) -> Server {
    let sim = Arc::new(Simulator::open(path, PIN, "remote-test").unwrap());
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let served = sim.clone();
    let task = tokio::spawn(async move {
        // Faults are injected in-process (`server.sim`): the gRPC
        // fault-injection service stays disabled, as by default.
        let options = hsm_sim::server::ServerOptions::default();
        hsm_sim::server::serve(listener, served, options, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Server {
        addr,
        sim,
        stop,
        task,
    }
}

impl Server {
    async fn stop(self) {
        let _ = self.stop.send(());
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(5), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

const TIMEOUT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn remote_conformance_and_faults() {
    let (_dir, path) = state();
    let server = start(&path, "127.0.0.1:0".parse().unwrap()).await;
    let hsm = RemoteSimHsm::connect(&server.addr.to_string(), PIN.into(), TIMEOUT)
        .await
        .unwrap();
    conformance(&hsm).await;
    assert!(!format!("{hsm:?}").contains(PIN));

    let w = hsm.wrap(b"k", b"a").await.unwrap();
    server
        .sim
        .set_faults(Faults {
            outage: true,
            ..Faults::default()
        })
        .unwrap();
    for r in [
        hsm.unwrap(&w.blob, b"a").await.map(|_| ()),
        hsm.wrap(b"k", b"a").await.map(|_| ()),
        hsm.info().await.map(|_| ()),
    ] {
        assert!(matches!(r, Err(HsmError::Unavailable(_))), "{r:?}");
    }
    server
        .sim
        .set_faults(Faults {
            error_rate: 1.0,
            ..Faults::default()
        })
        .unwrap();
    assert!(matches!(
        hsm.generate_random(8).await,
        Err(HsmError::Unavailable(_))
    ));
    server.sim.set_faults(Faults::default()).unwrap();
    assert_eq!(hsm.unwrap(&w.blob, b"a").await.unwrap().expose(), b"k");

    server.sim.tamper().unwrap();
    assert!(matches!(
        hsm.unwrap(&w.blob, b"a").await,
        Err(HsmError::Tampered)
    ));
    server.stop().await;
}

#[tokio::test]
async fn remote_deadline_is_unavailable() {
    let (_dir, path) = state();
    let server = start(&path, "127.0.0.1:0".parse().unwrap()).await;
    let hsm = RemoteSimHsm::connect(
        &format!("http://{}", server.addr),
        PIN.into(),
        Duration::from_millis(200),
    )
    .await
    .unwrap();
    server
        .sim
        .set_faults(Faults {
            latency: Duration::from_secs(2),
            ..Faults::default()
        })
        .unwrap();
    let start = std::time::Instant::now();
    let r = hsm.wrap(b"k", b"").await;
    assert!(matches!(r, Err(HsmError::Unavailable(_))), "{r:?}");
    assert!(start.elapsed() < Duration::from_secs(2));
    server.sim.set_faults(Faults::default()).unwrap();
    server.stop().await;
}

#[tokio::test]
async fn remote_connect_failures_are_clear() {
    // Nothing listens on this port once the listener is dropped.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let err = RemoteSimHsm::connect(&addr.to_string(), PIN.into(), TIMEOUT)
        .await
        .unwrap_err();
    assert!(
        matches!(err, HsmError::Unavailable(ref m) if m.contains("cannot reach")),
        "{err}"
    );

    let (_dir, path) = state();
    let server = start(&path, "127.0.0.1:0".parse().unwrap()).await;
    let err = RemoteSimHsm::connect(&server.addr.to_string(), "wrong".into(), TIMEOUT)
        .await
        .unwrap_err();
    assert!(matches!(err, HsmError::LoginFailed(_)), "{err}");
    server.stop().await;
}

#[tokio::test]
async fn remote_survives_a_simulator_restart() {
    let (_dir, path) = state();
    let server = start(&path, "127.0.0.1:0".parse().unwrap()).await;
    let addr = server.addr;
    let hsm = RemoteSimHsm::connect(&addr.to_string(), PIN.into(), TIMEOUT)
        .await
        .unwrap();
    let before = hsm.wrap(b"survives", b"ctx").await.unwrap();
    server.stop().await;

    // While it is down: Unavailable, not a hang and not a login error.
    let r = hsm.wrap(b"x", b"").await;
    assert!(matches!(r, Err(HsmError::Unavailable(_))), "{r:?}");

    // Same state file, same address, no sessions: the client logs in
    // again by itself.
    let server = start(&path, addr).await;
    let back = hsm.unwrap(&before.blob, b"ctx").await.unwrap();
    assert_eq!(back.expose(), b"survives");
    let after = hsm.wrap(b"again", b"").await.unwrap();
    assert_eq!(after.root_key_id, 1);
    server.stop().await;
}
