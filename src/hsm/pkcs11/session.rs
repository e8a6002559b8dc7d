//! Sessions with the token, and what the token's errors mean.
//!
//! PKCS#11 sessions are not thread-safe: each call takes one from a pool of
//! at most `sessions` (opened on demand, logged in once for the whole
//! application), runs on tokio's blocking pool, and gives it back. A call
//! that finds its session closed, or the application logged out (the HSM
//! restarted, a network HSM reconnected), drops the session, logs in again,
//! lets the caller find its objects again, and retries once. A call that
//! outlasts `timeout` is answered [`HsmError::Unavailable`]; the blocking
//! call finishes in the background and returns its session.
//!
//! A failed decryption is [`HsmError::AuthenticationFailed`] when the token
//! says `CKR_ENCRYPTED_DATA_INVALID` (or `_LEN_RANGE`), and also when it says
//! `CKR_GENERAL_ERROR` / `CKR_FUNCTION_FAILED` (SoftHSM2's answer to a tag
//! mismatch) while the session still answers `C_GetSessionInfo`; a session
//! that does not is a device problem ([`HsmError::Unavailable`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

use crate::hsm::HsmError;
use crate::secret::SecretBytes;

/// One PKCS#11 context per module and process: a module is initialised once
/// (a second `C_Initialize` fails, and a `C_Finalize` would close every
/// other user's sessions). Never finalised: the process exit ends it.
pub(super) fn context_for(module: &Path) -> Result<Pkcs11, HsmError> {
    static CONTEXTS: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut contexts = CONTEXTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(ctx) = contexts.get(module) {
        return Ok(ctx.clone());
    }
    if !module.is_file() {
        return Err(HsmError::Setup(format!(
            "the PKCS#11 module {} does not exist",
            module.display()
        )));
    }
    let ctx = Pkcs11::new(module).map_err(|e| {
        HsmError::Setup(format!(
            "cannot load the PKCS#11 module {}: {e}",
            module.display()
        ))
    })?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(HsmError::Unavailable(format!(
                "the PKCS#11 module {} failed to initialise: {}",
                module.display(),
                describe(&e)
            )));
        }
    }
    contexts.insert(module.to_path_buf(), ctx.clone());
    Ok(ctx)
}

/// A short description of a cryptoki error: the function and the `CKR_`
/// name, not the spec's paragraph.
pub(super) fn describe(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, function) => format!("{function} returned {rv:?}"),
        other => other.to_string(),
    }
}

/// Errors after which the session, the login or the object handles are
/// gone (the HSM restarted, logged coffre out, or failed over): drop the
/// session, log in again, find the objects again, retry once. A private
/// object used while logged out is reported as an invalid handle by some
/// tokens (SoftHSM2 among them).
pub(super) fn session_lost(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::UserNotLoggedIn
                | RvError::DeviceRemoved
                | RvError::TokenNotPresent
                | RvError::DeviceError
                | RvError::KeyHandleInvalid
                | RvError::ObjectHandleInvalid,
            _
        )
    )
}

fn unavailable(e: &CkError) -> HsmError {
    HsmError::Unavailable(format!("PKCS#11: {}", describe(e)))
}

/// The HSM's answer to a failed call, in coffre's terms.
pub(super) fn classify(e: &CkError) -> HsmError {
    match e {
        CkError::Pkcs11(RvError::PinIncorrect | RvError::PinLocked | RvError::PinExpired, _) => {
            HsmError::LoginFailed(describe(e))
        }
        CkError::Pkcs11(
            RvError::EncryptedDataInvalid
            | RvError::EncryptedDataLenRange
            | RvError::DataInvalid
            | RvError::DataLenRange,
            Function::Decrypt,
        ) => HsmError::AuthenticationFailed,
        _ => unavailable(e),
    }
}

/// Some tokens (AWS CloudHSM, by its documentation) put an IV of their own
/// choosing in `CK_GCM_PARAMS` on encryption. coffre's blobs carry, and
/// authenticate, the IV coffre chose: such a token cannot be used.
pub(super) fn iv_replaced(token: &str) -> HsmError {
    HsmError::Setup(format!(
        "the token {token:?} replaced the AES-GCM IV coffre gave it; coffre needs a token that \
         uses the caller's IV (see SECURITY.md, \"PKCS#11\")"
    ))
}

/// The pool of logged-in sessions with one token.
pub(super) struct Sessions {
    ctx: Pkcs11,
    slot: Slot,
    token_label: String,
    pin: AuthPin,
    idle: Mutex<Vec<Session>>,
    /// Most sessions kept idle (the pool's size).
    max_idle: usize,
    permits: Arc<Semaphore>,
    timeout: Duration,
    /// The module is SoftHSM2, whose tag mismatches are general errors.
    lenient_gcm_errors: bool,
}

impl Sessions {
    /// A pool of at most `size` sessions with the token in `slot`, none
    /// open yet.
    pub(super) fn new(
        ctx: Pkcs11,
        slot: Slot,
        token_label: String,
        pin: &str,
        size: usize,
        timeout: Duration,
    ) -> Self {
        let lenient_gcm_errors = ctx
            .get_library_info()
            .is_ok_and(|i| i.manufacturer_id().contains("SoftHSM"));
        Self {
            ctx,
            slot,
            token_label,
            pin: AuthPin::from(pin),
            idle: Mutex::new(Vec::new()),
            max_idle: size,
            permits: Arc::new(Semaphore::new(size)),
            timeout,
            lenient_gcm_errors,
        }
    }

    pub(super) fn ctx(&self) -> &Pkcs11 {
        &self.ctx
    }

    pub(super) fn slot(&self) -> Slot {
        self.slot
    }

    pub(super) fn token_label(&self) -> &str {
        &self.token_label
    }

    /// Longest wait for a session plus one call.
    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs `op` with a pooled, logged-in session on the blocking pool,
    /// within the timeout. On a lost session, drops it and the idle ones,
    /// logs in again, runs `recover` (find again what the loss may have
    /// invalidated) and `op` once more.
    pub(super) async fn run<T, F, R>(self: &Arc<Self>, op: F, recover: R) -> Result<T, HsmError>
    where
        T: Send + 'static,
        F: Fn(&Session) -> Result<T, CkError> + Send + 'static,
        R: FnOnce(&Session) -> Result<(), CkError> + Send + 'static,
    {
        let pool = self.clone();
        let timeout = self.timeout;
        let call =
            async move {
                let permit =
                    pool.permits.clone().acquire_owned().await.map_err(|_| {
                        HsmError::Unavailable("the HSM session pool is closed".into())
                    })?;
                tokio::task::spawn_blocking(move || {
                // The slot is held for as long as the session is in use,
                // even after the caller stopped waiting (timeout): a hung
                // HSM then holds `sessions` threads, not one per request.
                let _permit = permit;
                let first = pool.take_session()?;
                match op(&first) {
                    Ok(v) => {
                        pool.give_back(first);
                        Ok(v)
                    }
                    Err(e) if session_lost(&e) => {
                        tracing::warn!(error = %describe(&e), "HSM session lost; logging in again");
                        drop(first);
                        pool.forget_idle();
                        let second = pool.open_session()?;
                        let out = recover(&second)
                            .and_then(|()| op(&second))
                            .map_err(|e| classify(&e));
                        pool.give_back(second);
                        out
                    }
                    Err(e) => {
                        pool.give_back(first);
                        Err(classify(&e))
                    }
                }
            })
            .await
            .map_err(|e| HsmError::Unavailable(format!("HSM call failed: {e}")))?
            };
        tokio::time::timeout(timeout, call).await.map_err(|_| {
            HsmError::Unavailable(format!("the HSM did not answer within {timeout:?}"))
        })?
    }

    /// A new session, logged in (the login is the application's: a second
    /// session finds it already done).
    pub(super) fn open_session(&self) -> Result<Session, HsmError> {
        let session = self
            .ctx
            .open_rw_session(self.slot)
            .map_err(|e| classify(&e))?;
        match session.login(UserType::User, Some(&self.pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
            Err(e @ CkError::Pkcs11(RvError::PinIncorrect | RvError::PinLocked, _)) => Err(
                HsmError::LoginFailed(format!("token {:?}: {}", self.token_label, describe(&e))),
            ),
            Err(e) => Err(classify(&e)),
        }
    }

    /// An idle session, or a new one.
    pub(super) fn take_session(&self) -> Result<Session, HsmError> {
        let pooled = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        match pooled {
            Some(s) => Ok(s),
            None => self.open_session(),
        }
    }

    /// Returns a session to the pool (or closes it, if the pool is full).
    pub(super) fn give_back(&self, session: Session) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.max_idle {
            idle.push(session);
        }
    }

    /// Drops every idle session: after one was lost, the others likely were.
    pub(super) fn forget_idle(&self) {
        let stale = std::mem::take(&mut *self.idle.lock().unwrap_or_else(PoisonError::into_inner));
        drop(stale);
    }

    /// An empty search is only believed in a logged-in session: a session
    /// the token logged out sees no private object, and says no more.
    pub(super) fn ensure_logged_in(s: &Session) -> Result<(), CkError> {
        let state = s.get_session_info()?.session_state();
        if matches!(state, SessionState::RwUser | SessionState::RoUser) {
            Ok(())
        } else {
            Err(CkError::Pkcs11(
                RvError::UserNotLoggedIn,
                Function::GetSessionInfo,
            ))
        }
    }

    /// What a `CKM_AES_GCM` decryption's result means: the plaintext, a
    /// blob that does not authenticate (`Ok(Err(..))`), or a device error
    /// (`Err`, which [`Sessions::run`] retries or reports as unavailable).
    pub(super) fn gcm_opened(
        &self,
        s: &Session,
        opened: Result<Vec<u8>, CkError>,
    ) -> Result<Result<SecretBytes, HsmError>, CkError> {
        match opened {
            Ok(plain) => Ok(Ok(SecretBytes::from(Zeroizing::new(plain)))),
            Err(e) if matches!(classify(&e), HsmError::AuthenticationFailed) => {
                Ok(Err(HsmError::AuthenticationFailed))
            }
            // SoftHSM2 answers a GCM tag mismatch with CKR_GENERAL_ERROR (or
            // CKR_FUNCTION_FAILED). Only there, and only if the session still
            // answers, is it the blob's fault; anywhere else it is a device
            // problem.
            Err(
                e @ CkError::Pkcs11(
                    RvError::GeneralError | RvError::FunctionFailed,
                    Function::Decrypt,
                ),
            ) if self.lenient_gcm_errors => match s.get_session_info() {
                Ok(_) => Ok(Err(HsmError::AuthenticationFailed)),
                Err(_) => Err(e),
            },
            Err(e) => Err(e),
        }
    }
}
