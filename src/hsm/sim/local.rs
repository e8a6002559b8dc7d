//! [`LocalSimHsm`]: the simulator in the same process, for `coffre dev`.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use hsm_sim::{SessionId, SimError, Simulator};
use zeroize::Zeroizing;

use super::check_random_len;
use crate::hsm::{Hsm, HsmError, HsmInfo, HsmWrapped, ObjectSeal};
use crate::secret::SecretBytes;

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
