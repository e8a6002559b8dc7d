//! Backends for the simulated HSM (`hsm-sim`). Neither is secure: both say so
//! through [`Hsm::is_secure`].
//!
//! - [`LocalSimHsm`]: the simulator in-process, for `coffre dev`.
//! - [`RemoteSimHsm`]: a gRPC client of an `hsm-sim serve` process, with a
//!   per-call deadline and one re-login when the simulator has forgotten the
//!   session (it restarted).
//!
//! Error mapping ([`HsmError`]):
//!
//! | simulator says                                       | HsmError                 |
//! |------------------------------------------------------|--------------------------|
//! | outage, injected error, timeout, transport failure, internal error | `Unavailable` |
//! | unwrap authentication failure (`INVALID_ARGUMENT` on Unwrap) | `AuthenticationFailed` |
//! | tampered (`FAILED_PRECONDITION` "tampered")          | `Tampered`               |
//! | wrong PIN, session lost again after a re-login       | `LoginFailed`            |
//! | other invalid argument or precondition               | `Rejected`               |

use std::fmt;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use hsm_sim::proto::hsm_client::HsmClient;
use hsm_sim::proto::{
    CreateKeyObjectRequest, DestroyKeyObjectRequest, DestroyRootKeyRequest, GenerateRandomRequest,
    GetInfoRequest, LoginRequest, OpenWithObjectRequest, RotateRootKeyRequest,
    SealWithObjectRequest, UnwrapRequest, WrapRequest,
};
use hsm_sim::{MAX_RANDOM_LEN, SessionId, SimError, Simulator};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Response, Status};
use zeroize::Zeroizing;

use super::{Hsm, HsmError, HsmInfo, HsmWrapped, ObjectSeal};
use crate::secret::SecretBytes;

fn check_random_len(len: usize) -> Result<(), HsmError> {
    if len == 0 || len > MAX_RANDOM_LEN {
        return Err(HsmError::Rejected(format!(
            "random length {len} outside 1..={MAX_RANDOM_LEN}"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// In-process

/// The simulator in-process. Logs in lazily and again if the session is
/// ever refused.
pub struct LocalSimHsm {
    sim: Arc<Simulator>,
    pin: Zeroizing<String>,
    session: Mutex<Option<[u8; 16]>>,
}

impl fmt::Debug for LocalSimHsm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalSimHsm")
            .field("sim", &self.sim)
            .finish_non_exhaustive()
    }
}

fn from_local(err: SimError) -> HsmError {
    match err {
        SimError::BadPin => HsmError::LoginFailed("wrong PIN".into()),
        SimError::NotLoggedIn => HsmError::LoginFailed("session refused after re-login".into()),
        SimError::AuthenticationFailed => HsmError::AuthenticationFailed,
        SimError::Tampered => HsmError::Tampered,
        SimError::Unavailable(m) => HsmError::Unavailable(format!("hsm-sim: {m}")),
        SimError::InvalidInput(m) => HsmError::Rejected(m),
        e @ (SimError::UnknownRootKey(_) | SimError::CurrentRootKey(_)) => {
            HsmError::Rejected(e.to_string())
        }
        e => HsmError::Unavailable(format!("hsm-sim: {e}")),
    }
}

/// Runs `$op` with a session; if the simulator no longer knows it, logs in
/// once more and runs it again.
macro_rules! with_session {
    ($self:ident, |$s:ident| $op:expr) => {{
        let $s = $self.session().await?;
        match $op.await {
            Err(SimError::NotLoggedIn) => {
                $self.forget_session();
                let $s = $self.session().await?;
                $op.await
            }
            other => other,
        }
        .map_err(from_local)
    }};
}

impl LocalSimHsm {
    /// Opens (or creates) the token in `state_path`. A PIN that does not
    /// open an existing token is [`HsmError::LoginFailed`]. Runs PBKDF2:
    /// call it at startup, not on an async hot path.
    pub fn open(state_path: &Path, pin: &str) -> Result<Self, HsmError> {
        let sim = Simulator::open(state_path, pin, "coffre-dev").map_err(from_local)?;
        Ok(Self {
            sim: Arc::new(sim),
            pin: Zeroizing::new(pin.to_owned()),
            session: Mutex::new(None),
        })
    }

    /// The simulator, so tests can inject faults.
    pub fn simulator(&self) -> &Arc<Simulator> {
        &self.sim
    }

    async fn session(&self) -> Result<SessionId, HsmError> {
        let known = *self.session.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(id) = known.and_then(|b| SessionId::from_bytes(&b)) {
            return Ok(id);
        }
        let s = self.sim.login(&self.pin).await.map_err(from_local)?;
        *self.session.lock().unwrap_or_else(PoisonError::into_inner) = Some(*s.as_bytes());
        Ok(s)
    }

    fn forget_session(&self) {
        *self.session.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

#[async_trait]
impl Hsm for LocalSimHsm {
    fn is_secure(&self) -> bool {
        false
    }

    async fn info(&self) -> Result<HsmInfo, HsmError> {
        let info = self.sim.info().map_err(from_local)?;
        Ok(HsmInfo {
            backend: "hsm-sim (in-process)".into(),
            label: info.label,
            current_root_key_id: info.current_root_key_id,
            root_key_ids: info.root_key_ids,
        })
    }

    async fn generate_random(&self, len: usize) -> Result<SecretBytes, HsmError> {
        check_random_len(len)?;
        with_session!(self, |s| self.sim.generate_random(&s, len)).map(SecretBytes::from)
    }

    async fn wrap(&self, plaintext: &[u8], aad: &[u8]) -> Result<HsmWrapped, HsmError> {
        let (blob, root_key_id) = with_session!(self, |s| self.sim.wrap(&s, plaintext, aad))?;
        Ok(HsmWrapped { blob, root_key_id })
    }

    async fn unwrap(&self, wrapped: &[u8], aad: &[u8]) -> Result<SecretBytes, HsmError> {
        with_session!(self, |s| self.sim.unwrap(&s, wrapped, aad)).map(SecretBytes::from)
    }

    async fn rotate_root_key(&self) -> Result<u32, HsmError> {
        with_session!(self, |s| self.sim.rotate_root_key(&s))
    }

    async fn destroy_root_key(&self, root_key_id: u32) -> Result<(), HsmError> {
        with_session!(self, |s| self.sim.destroy_root_key(&s, root_key_id))
    }

    fn supports_key_objects(&self) -> bool {
        true
    }

    async fn create_key_object(&self, name: &str) -> Result<(), HsmError> {
        with_session!(self, |s| self.sim.create_key_object(&s, name))
    }

    async fn seal_with_object(
        &self,
        seal: ObjectSeal<'_>,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        let seal = sim_seal(seal);
        with_session!(self, |s| self.sim.seal_with_object(&s, seal, plaintext))
    }

    async fn open_with_object(
        &self,
        seal: ObjectSeal<'_>,
        sealed: &[u8],
    ) -> Result<SecretBytes, HsmError> {
        let seal = sim_seal(seal);
        with_session!(self, |s| self.sim.open_with_object(&s, seal, sealed)).map(SecretBytes::from)
    }

    async fn destroy_key_object(&self, name: &str) -> Result<(), HsmError> {
        with_session!(self, |s| self.sim.destroy_key_object(&s, name))
    }
}

fn sim_seal(seal: ObjectSeal<'_>) -> hsm_sim::ObjectSeal<'_> {
    hsm_sim::ObjectSeal {
        object: seal.object,
        salt: seal.salt,
        iv: seal.iv,
        aad: seal.aad,
    }
}

// ---------------------------------------------------------------------------
// Remote

/// A client of an `hsm-sim serve` process over gRPC (plain TCP: the
/// simulator is for testing).
pub struct RemoteSimHsm {
    client: HsmClient<Channel>,
    endpoint: String,
    pin: Zeroizing<String>,
    /// The current session; the lock also serialises re-logins.
    session: tokio::sync::Mutex<Zeroizing<Vec<u8>>>,
    timeout: Duration,
}

impl fmt::Debug for RemoteSimHsm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteSimHsm")
            .field("endpoint", &self.endpoint)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Which call a status came from: `INVALID_ARGUMENT` means an
/// authentication failure only on Unwrap.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Login,
    Info,
    Wrap,
    Unwrap,
    Random,
    RootKey,
    Object,
    /// Opening with a key object: `INVALID_ARGUMENT` is an authentication
    /// failure, as for Unwrap.
    OpenObject,
}

impl RemoteSimHsm {
    /// Connects to `endpoint` (`http://host:port`, or `host:port`) and logs
    /// in. Every call, connecting included, gets `timeout` as its deadline.
    /// An unreachable simulator is [`HsmError::Unavailable`]; a wrong PIN
    /// [`HsmError::LoginFailed`].
    pub async fn connect(endpoint: &str, pin: String, timeout: Duration) -> Result<Self, HsmError> {
        let pin = Zeroizing::new(pin);
        let url = if endpoint.contains("://") {
            endpoint.to_owned()
        } else {
            format!("http://{endpoint}")
        };
        let channel = Endpoint::from_shared(url.clone())
            .map_err(|e| HsmError::Rejected(format!("invalid hsm-sim endpoint {url:?}: {e}")))?
            .connect_timeout(timeout)
            .timeout(timeout)
            .connect()
            .await
            .map_err(|e| HsmError::Unavailable(format!("cannot reach hsm-sim at {url}: {e}")))?;
        let hsm = Self {
            client: HsmClient::new(channel),
            endpoint: url,
            pin,
            session: tokio::sync::Mutex::new(Zeroizing::new(Vec::new())),
            timeout,
        };
        let session = hsm.login().await?;
        *hsm.session.lock().await = session;
        Ok(hsm)
    }

    async fn deadline<T>(
        &self,
        call: impl Future<Output = Result<Response<T>, Status>>,
    ) -> Result<T, Status> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => r.map(Response::into_inner),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no answer within {:?}",
                self.timeout
            ))),
        }
    }

    fn map_status(&self, op: Op, status: &Status) -> HsmError {
        let msg = status.message();
        match status.code() {
            Code::InvalidArgument if matches!(op, Op::Unwrap | Op::OpenObject) => {
                HsmError::AuthenticationFailed
            }
            Code::FailedPrecondition if msg.contains("tampered") => HsmError::Tampered,
            Code::Unauthenticated => HsmError::LoginFailed(msg.to_owned()),
            Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::NotFound
            | Code::OutOfRange
            | Code::PermissionDenied
            | Code::Unimplemented => HsmError::Rejected(format!("hsm-sim: {msg}")),
            code => {
                HsmError::Unavailable(format!("hsm-sim at {} ({code:?}): {msg}", self.endpoint))
            }
        }
    }

    async fn login(&self) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        let mut client = self.client.clone();
        let request = LoginRequest {
            pin: self.pin.as_str().to_owned(),
        };
        let response = self
            .deadline(client.login(request))
            .await
            .map_err(|s| self.map_status(Op::Login, &s))?;
        Ok(Zeroizing::new(response.session))
    }

    /// Logs in again unless another call already replaced `stale`.
    async fn relogin(&self, stale: &[u8]) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        let mut current = self.session.lock().await;
        if current.as_slice() == stale {
            tracing::info!(endpoint = %self.endpoint, "hsm-sim session lost; logging in again");
            *current = self.login().await?;
        }
        Ok(current.clone())
    }

    /// Runs a session call; on `UNAUTHENTICATED` (the simulator restarted
    /// and forgot the session) logs in once more and retries once.
    async fn call<T, F, Fut>(&self, op: Op, f: F) -> Result<T, HsmError>
    where
        F: Fn(HsmClient<Channel>, Vec<u8>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let session = self.session.lock().await.clone();
        let first = self
            .deadline(f(self.client.clone(), session.to_vec()))
            .await;
        match first {
            Err(s) if s.code() == Code::Unauthenticated => {
                let session = self.relogin(&session).await?;
                self.deadline(f(self.client.clone(), session.to_vec()))
                    .await
                    .map_err(|s| self.map_status(op, &s))
            }
            other => other.map_err(|s| self.map_status(op, &s)),
        }
    }
}

#[async_trait]
impl Hsm for RemoteSimHsm {
    fn is_secure(&self) -> bool {
        false
    }

    async fn info(&self) -> Result<HsmInfo, HsmError> {
        let mut client = self.client.clone();
        let info = self
            .deadline(client.get_info(GetInfoRequest {}))
            .await
            .map_err(|s| self.map_status(Op::Info, &s))?;
        Ok(HsmInfo {
            backend: format!("hsm-sim ({})", self.endpoint),
            label: info.label,
            current_root_key_id: info.current_root_key_id,
            root_key_ids: info.root_key_ids,
        })
    }

    async fn generate_random(&self, len: usize) -> Result<SecretBytes, HsmError> {
        check_random_len(len)?;
        let length = u32::try_from(len).map_err(|_| HsmError::Rejected("length".into()))?;
        let response = self
            .call(Op::Random, |mut c, session| async move {
                c.generate_random(GenerateRandomRequest { session, length })
                    .await
            })
            .await?;
        Ok(SecretBytes::new(response.random))
    }

    async fn wrap(&self, plaintext: &[u8], aad: &[u8]) -> Result<HsmWrapped, HsmError> {
        let response = self
            .call(Op::Wrap, |mut c, session| async move {
                c.wrap(WrapRequest {
                    session,
                    plaintext: plaintext.to_vec(),
                    aad: aad.to_vec(),
                })
                .await
            })
            .await?;
        Ok(HsmWrapped {
            blob: response.wrapped,
            root_key_id: response.root_key_id,
        })
    }

    async fn unwrap(&self, wrapped: &[u8], aad: &[u8]) -> Result<SecretBytes, HsmError> {
        let response = self
            .call(Op::Unwrap, |mut c, session| async move {
                c.unwrap(UnwrapRequest {
                    session,
                    wrapped: wrapped.to_vec(),
                    aad: aad.to_vec(),
                })
                .await
            })
            .await?;
        Ok(SecretBytes::new(response.plaintext))
    }

    async fn rotate_root_key(&self) -> Result<u32, HsmError> {
        let response = self
            .call(Op::RootKey, |mut c, session| async move {
                c.rotate_root_key(RotateRootKeyRequest { session }).await
            })
            .await?;
        Ok(response.root_key_id)
    }

    async fn destroy_root_key(&self, root_key_id: u32) -> Result<(), HsmError> {
        self.call(Op::RootKey, |mut c, session| async move {
            c.destroy_root_key(DestroyRootKeyRequest {
                session,
                root_key_id,
            })
            .await
        })
        .await?;
        Ok(())
    }

    fn supports_key_objects(&self) -> bool {
        true
    }

    async fn create_key_object(&self, name: &str) -> Result<(), HsmError> {
        self.call(Op::Object, |mut c, session| async move {
            c.create_key_object(CreateKeyObjectRequest {
                session,
                name: name.to_owned(),
            })
            .await
        })
        .await?;
        Ok(())
    }

    async fn seal_with_object(
        &self,
        seal: ObjectSeal<'_>,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        let response = self
            .call(Op::Object, |mut c, session| async move {
                c.seal_with_object(SealWithObjectRequest {
                    session,
                    name: seal.object.to_owned(),
                    salt: seal.salt.to_vec(),
                    iv: seal.iv.to_vec(),
                    aad: seal.aad.to_vec(),
                    plaintext: plaintext.to_vec(),
                })
                .await
            })
            .await?;
        Ok(response.sealed)
    }

    async fn open_with_object(
        &self,
        seal: ObjectSeal<'_>,
        sealed: &[u8],
    ) -> Result<SecretBytes, HsmError> {
        let response = self
            .call(Op::OpenObject, |mut c, session| async move {
                c.open_with_object(OpenWithObjectRequest {
                    session,
                    name: seal.object.to_owned(),
                    salt: seal.salt.to_vec(),
                    iv: seal.iv.to_vec(),
                    aad: seal.aad.to_vec(),
                    sealed: sealed.to_vec(),
                })
                .await
            })
            .await?;
        Ok(SecretBytes::new(response.plaintext))
    }

    async fn destroy_key_object(&self, name: &str) -> Result<(), HsmError> {
        self.call(Op::Object, |mut c, session| async move {
            c.destroy_key_object(DestroyKeyObjectRequest {
                session,
                name: name.to_owned(),
            })
            .await
        })
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::path::PathBuf;

    use hsm_sim::Faults;

    use super::*;

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
}
