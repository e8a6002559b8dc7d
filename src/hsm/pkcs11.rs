//! A real HSM through PKCS#11 (the `cryptoki` crate): any vendor's module,
//! SoftHSM2 in tests.
//!
//! # The root keys
//!
//! Each root key is an AES-256 secret-key token object generated inside the
//! token, labelled `coffre-root-<id>` with `CKA_ID` = the id as 4 big-endian
//! bytes. The current root key is the one with the highest id. The attributes
//! coffre sets when it generates one, and requires of every root key at
//! start ([`ROOT_KEY_POLICY`]), close the known PKCS#11 key-extraction attacks:
//!
//! - `CKA_SENSITIVE` true, `CKA_EXTRACTABLE` false, and (set by the token)
//!   `CKA_ALWAYS_SENSITIVE` true, `CKA_NEVER_EXTRACTABLE` true, `CKA_LOCAL`
//!   true: the value never left the token and cannot be read or wrapped out.
//! - `CKA_ENCRYPT` / `CKA_DECRYPT` true and `CKA_WRAP` / `CKA_UNWRAP` /
//!   `CKA_DERIVE` / `CKA_SIGN` / `CKA_VERIFY` false: the key is used with
//!   one mechanism, AES-GCM, for one purpose. No key that wraps can also
//!   decrypt, so the "wrap a sensitive key, then decrypt the wrapping" attack
//!   has nothing to work with, and the root key unwraps no attacker-supplied
//!   key into the token.
//! - `CKA_MODIFIABLE` false and `CKA_COPYABLE` false: no session can turn a
//!   flag back on, on the object or on a copy of it.
//! - `CKA_TOKEN` true, `CKA_PRIVATE` true: persistent, and invisible
//!   without the user PIN.
//!
//! # Wrapping
//!
//! CMK material (1..=1024 bytes) is sealed with `CKM_AES_GCM` inside the
//! token, under the current root key, with a 96-bit IV from the token's
//! generator and a 128-bit tag. The blob binds its own header and the
//! caller's AAD:
//!
//! ```text
//! "PK" | 01 | root key id u32 | iv (12) | ciphertext | tag (16)
//! GCM AAD = the 19 header bytes ‖ caller's AAD
//! ```
//!
//! Random IVs bound one root key to 2^32 wraps (NIST SP 800-38D); coffre
//! wraps once per CMK version created or re-wrapped, far below that.
//!
//! A failed unwrap is [`HsmError::AuthenticationFailed`] when the token says
//! `CKR_ENCRYPTED_DATA_INVALID` (or `_LEN_RANGE`), and also when it says
//! `CKR_GENERAL_ERROR` / `CKR_FUNCTION_FAILED` (SoftHSM2's answer to a tag
//! mismatch) while the session still answers `C_GetSessionInfo`; a session
//! that does not is a device problem ([`HsmError::Unavailable`]).
//!
//! # Sessions
//!
//! PKCS#11 sessions are not thread-safe: each call takes one from a pool of
//! at most `sessions` (opened on demand, logged in once for the whole
//! application), runs on tokio's blocking pool, and gives it back. A call
//! that finds its session closed, or the application logged out (the HSM
//! restarted, a network HSM reconnected), drops the session, logs in again
//! and retries once. A call that outlasts `timeout` is answered
//! [`HsmError::Unavailable`]; the blocking call finishes in the background
//! and returns its session.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

use super::{Hsm, HsmError, HsmInfo, HsmWrapped, MAX_OBJECT_NAME_LEN, MAX_SEAL_LEN, ObjectSeal};
use crate::secret::SecretBytes;

/// Labels of coffre's root keys: this prefix and the id in decimal.
pub const ROOT_LABEL_PREFIX: &str = "coffre-root-";
/// Largest random request, as for the simulator.
pub const MAX_RANDOM_LEN: usize = 1024;
/// Largest plaintext [`Hsm::wrap`] accepts.
pub const MAX_PLAINTEXT_LEN: usize = 1024;

const MAGIC: [u8; 2] = *b"PK";
const FORMAT_VERSION: u8 = 1;
const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 2 + 1 + 4 + IV_LEN;

/// Which token to use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenSelector {
    /// The token with this label (`CKA_LABEL` of the token, trailing spaces
    /// ignored). Exactly one token may carry it.
    Label(String),
    /// The slot with this id.
    Slot(u64),
}

impl fmt::Display for TokenSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSelector::Label(l) => write!(f, "token labelled {l:?}"),
            TokenSelector::Slot(s) => write!(f, "slot {s}"),
        }
    }
}

/// How to reach the HSM.
pub struct Pkcs11Settings {
    /// The vendor's PKCS#11 module (a shared library).
    pub module: PathBuf,
    pub token: TokenSelector,
    /// The user PIN.
    pub pin: Zeroizing<String>,
    /// Most sessions open at once (and so most calls in flight).
    pub sessions: usize,
    /// Longest wait for a session plus one call.
    pub timeout: Duration,
}

impl fmt::Debug for Pkcs11Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Settings")
            .field("module", &self.module)
            .field("token", &self.token)
            .field("sessions", &self.sessions)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// One required attribute of a root key: its PKCS#11 name, its type, and
/// the value it must have.
#[derive(Clone, Copy, Debug)]
pub struct RequiredAttribute {
    pub name: &'static str,
    pub kind: AttributeType,
    pub value: bool,
}

const fn req(name: &'static str, kind: AttributeType, value: bool) -> RequiredAttribute {
    RequiredAttribute { name, kind, value }
}

/// What every root key must be, checked at start ([`Pkcs11Hsm::open`]) and
/// by `coffre hsm check`. The module documentation says why.
pub const ROOT_KEY_POLICY: [RequiredAttribute; 15] = [
    req("CKA_TOKEN", AttributeType::Token, true),
    req("CKA_PRIVATE", AttributeType::Private, true),
    req("CKA_SENSITIVE", AttributeType::Sensitive, true),
    req("CKA_EXTRACTABLE", AttributeType::Extractable, false),
    req("CKA_ALWAYS_SENSITIVE", AttributeType::AlwaysSensitive, true),
    req(
        "CKA_NEVER_EXTRACTABLE",
        AttributeType::NeverExtractable,
        true,
    ),
    req("CKA_LOCAL", AttributeType::Local, true),
    req("CKA_ENCRYPT", AttributeType::Encrypt, true),
    req("CKA_DECRYPT", AttributeType::Decrypt, true),
    req("CKA_WRAP", AttributeType::Wrap, false),
    req("CKA_UNWRAP", AttributeType::Unwrap, false),
    req("CKA_DERIVE", AttributeType::Derive, false),
    req("CKA_SIGN", AttributeType::Sign, false),
    req("CKA_VERIFY", AttributeType::Verify, false),
    req("CKA_MODIFIABLE", AttributeType::Modifiable, false),
];

/// Mechanisms the token must offer.
const REQUIRED_MECHANISMS: [(&str, MechanismType); 2] = [
    ("CKM_AES_KEY_GEN", MechanismType::AES_KEY_GEN),
    ("CKM_AES_GCM", MechanismType::AES_GCM),
];

/// The mechanism protection level `HSM` needs besides those.
const KEY_OBJECT_MECHANISM: (&str, MechanismType) = (
    "CKM_AES_CBC_ENCRYPT_DATA",
    MechanismType::AES_CBC_ENCRYPT_DATA,
);

/// What a CMK key object must be when coffre finds it on the token.
const KEY_OBJECT_POLICY: [RequiredAttribute; 10] = [
    req("CKA_TOKEN", AttributeType::Token, true),
    req("CKA_PRIVATE", AttributeType::Private, true),
    req("CKA_SENSITIVE", AttributeType::Sensitive, true),
    req("CKA_EXTRACTABLE", AttributeType::Extractable, false),
    req("CKA_ALWAYS_SENSITIVE", AttributeType::AlwaysSensitive, true),
    req(
        "CKA_NEVER_EXTRACTABLE",
        AttributeType::NeverExtractable,
        true,
    ),
    req("CKA_DERIVE", AttributeType::Derive, true),
    req("CKA_ENCRYPT", AttributeType::Encrypt, false),
    req("CKA_DECRYPT", AttributeType::Decrypt, false),
    req("CKA_WRAP", AttributeType::Wrap, false),
];

/// Every entry of `policy` that `attrs` does not satisfy (a missing one
/// included), one line each.
fn policy_problems(policy: &[RequiredAttribute], attrs: &[Attribute]) -> Vec<String> {
    policy
        .iter()
        .filter_map(|want| {
            match attrs
                .iter()
                .find(|a| a.attribute_type() == want.kind)
                .and_then(bool_value)
            {
                Some(v) if v == want.value => None,
                Some(v) => Some(format!("{} is {v}, must be {}", want.name, want.value)),
                None => Some(format!("{} is not reported by the token", want.name)),
            }
        })
        .collect()
}

/// The template of a CMK version kept in the token (protection level HSM):
/// it can only derive the per-seal keys, never encrypt, decrypt or wrap
/// anything itself, and never leaves the token.
fn key_object_template(name: &str) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32.into()),
        Attribute::Label(name.as_bytes().to_vec()),
        Attribute::Id(name.as_bytes().to_vec()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Derive(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Modifiable(false),
        Attribute::Copyable(false),
        Attribute::Destroyable(true),
    ]
}

/// The template coffre generates a root key with.
fn root_key_template(id: u32) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32.into()),
        Attribute::Label(format!("{ROOT_LABEL_PREFIX}{id}").into_bytes()),
        Attribute::Id(id.to_be_bytes().to_vec()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Modifiable(false),
        Attribute::Copyable(false),
        Attribute::Destroyable(true),
    ]
}

/// One PKCS#11 context per module and process: a module is initialised once
/// (a second `C_Initialize` fails, and a `C_Finalize` would close every
/// other user's sessions). Never finalised: the process exit ends it.
fn context_for(module: &Path) -> Result<Pkcs11, HsmError> {
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
fn describe(e: &CkError) -> String {
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
fn session_lost(e: &CkError) -> bool {
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
fn classify(e: &CkError) -> HsmError {
    match e {
        CkError::Pkcs11(RvError::PinIncorrect | RvError::PinLocked | RvError::PinExpired, _) => {
            HsmError::LoginFailed(describe(e))
        }
        CkError::Pkcs11(
            RvError::EncryptedDataInvalid
            | RvError::EncryptedDataLenRange
            | RvError::DataInvalid
            | RvError::DataLenRange,
            cryptoki::context::Function::Decrypt,
        ) => HsmError::AuthenticationFailed,
        _ => unavailable(e),
    }
}

/// Some tokens (AWS CloudHSM, by its documentation) put an IV of their own
/// choosing in `CK_GCM_PARAMS` on encryption. coffre's blobs carry, and
/// authenticate, the IV coffre chose: such a token cannot be used.
fn iv_replaced(token: &str) -> HsmError {
    HsmError::Setup(format!(
        "the token {token:?} replaced the AES-GCM IV coffre gave it; coffre needs a token that \
         uses the caller's IV (see SECURITY.md, \"PKCS#11\")"
    ))
}

/// A root key found on the token.
#[derive(Clone, Copy, Debug)]
struct RootKey {
    handle: ObjectHandle,
}

struct Inner {
    ctx: Pkcs11,
    slot: Slot,
    token_label: String,
    module: PathBuf,
    pin: AuthPin,
    idle: Mutex<Vec<Session>>,
    /// Most sessions kept idle (the pool's size).
    max_idle: usize,
    permits: Arc<Semaphore>,
    timeout: Duration,
    /// Root keys by id, as last read from the token.
    roots: RwLock<BTreeMap<u32, RootKey>>,
    /// CMK key objects (protection level HSM) by name, as found.
    objects: RwLock<HashMap<String, ObjectHandle>>,
    /// The token offers what protection level HSM needs.
    key_objects: bool,
    /// The module is SoftHSM2, whose tag mismatches are general errors.
    lenient_gcm_errors: bool,
}

/// The PKCS#11 backend. Cheap to clone.
#[derive(Clone)]
pub struct Pkcs11Hsm {
    inner: Arc<Inner>,
}

impl fmt::Debug for Pkcs11Hsm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Hsm")
            .field("module", &self.inner.module)
            .field("slot", &self.inner.slot.id())
            .field("token", &self.inner.token_label)
            .finish_non_exhaustive()
    }
}

/// What `coffre hsm check` reports.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TokenReport {
    pub module: String,
    pub library: String,
    pub slot: u64,
    pub token_label: String,
    pub token_model: String,
    pub token_serial: String,
    pub root_key_ids: Vec<u32>,
    pub current_root_key_id: Option<u32>,
}

fn find_slot(ctx: &Pkcs11, selector: &TokenSelector) -> Result<(Slot, String), HsmError> {
    let slots = ctx
        .get_slots_with_token()
        .map_err(|e| HsmError::Unavailable(format!("listing the slots: {}", describe(&e))))?;
    let mut labels = Vec::new();
    let mut found = Vec::new();
    for slot in slots {
        let Ok(info) = ctx.get_token_info(slot) else {
            continue;
        };
        let label = info.label().trim_end().to_string();
        let hit = match selector {
            TokenSelector::Label(want) => label == *want,
            TokenSelector::Slot(id) => slot.id() == *id,
        };
        if hit {
            if !info.token_initialized() {
                return Err(HsmError::Setup(format!(
                    "the {selector} (slot {}) is not initialised",
                    slot.id()
                )));
            }
            found.push((slot, label.clone()));
        }
        labels.push(format!("{label:?} (slot {})", slot.id()));
    }
    match found.len() {
        1 => found
            .pop()
            .ok_or_else(|| HsmError::Setup("no token".into())),
        0 => Err(HsmError::Setup(format!(
            "no {selector} in the PKCS#11 module; tokens present: {}",
            if labels.is_empty() {
                "none".to_string()
            } else {
                labels.join(", ")
            }
        ))),
        n => Err(HsmError::Setup(format!(
            "{n} tokens match the {selector}: give hsm.slot instead"
        ))),
    }
}

impl Pkcs11Hsm {
    /// Loads the module, finds the token, logs in, and checks the token's
    /// mechanisms and every root key's attributes. Does not require a root
    /// key to exist (`coffre hsm init-root-key` makes the first one):
    /// [`Pkcs11Hsm::require_root_key`] does. Blocking: call it from
    /// `spawn_blocking` or at startup.
    pub fn open(settings: Pkcs11Settings) -> Result<Self, HsmError> {
        if settings.sessions == 0 {
            return Err(HsmError::Setup(
                "the session pool needs at least one session".into(),
            ));
        }
        let ctx = context_for(&settings.module)?;
        let (slot, token_label) = find_slot(&ctx, &settings.token)?;
        // Asked one by one: listing them all makes cryptoki log an error
        // for every vendor mechanism it does not know.
        for (name, m) in REQUIRED_MECHANISMS {
            match ctx.get_mechanism_info(slot, m) {
                Ok(_) => {}
                Err(CkError::Pkcs11(RvError::MechanismInvalid, _)) => {
                    return Err(HsmError::Setup(format!(
                        "the token {token_label:?} does not offer {name}, which coffre needs"
                    )));
                }
                Err(e) => {
                    return Err(HsmError::Unavailable(format!(
                        "asking the token about {name}: {}",
                        describe(&e)
                    )));
                }
            }
        }
        let key_objects = ctx
            .get_mechanism_info(slot, KEY_OBJECT_MECHANISM.1)
            .is_ok_and(|info| info.derive());
        if !key_objects {
            tracing::warn!(
                token = %token_label,
                "the token does not offer {} for derivation: protection level HSM is unavailable",
                KEY_OBJECT_MECHANISM.0
            );
        }
        let lenient_gcm_errors = ctx
            .get_library_info()
            .is_ok_and(|i| i.manufacturer_id().contains("SoftHSM"));
        let pin = AuthPin::from(settings.pin.as_str());
        let hsm = Self {
            inner: Arc::new(Inner {
                ctx,
                slot,
                token_label,
                module: settings.module,
                pin,
                idle: Mutex::new(Vec::new()),
                max_idle: settings.sessions,
                lenient_gcm_errors,
                permits: Arc::new(Semaphore::new(settings.sessions)),
                timeout: settings.timeout,
                roots: RwLock::new(BTreeMap::new()),
                objects: RwLock::new(HashMap::new()),
                key_objects,
            }),
        };
        let session = hsm.inner.open_session()?;
        hsm.inner
            .refresh_roots(&session)
            .map_err(|e| classify(&e))?;
        hsm.inner.check_roots(&session)?;
        hsm.inner.give_back(session);
        Ok(hsm)
    }

    /// Refuses a token without a root key, saying how to make one.
    pub fn require_root_key(&self) -> Result<u32, HsmError> {
        self.inner.current().map(|(id, _)| id).ok_or_else(|| {
            HsmError::Setup(format!(
                "the token {:?} holds no coffre root key (an AES-256 object labelled \
                 {ROOT_LABEL_PREFIX}<id>); create the first one with \
                 `coffre hsm init-root-key --config FILE`",
                self.inner.token_label
            ))
        })
    }

    /// Generates the first root key (id 1) on a token that has none.
    pub async fn init_root_key(&self) -> Result<u32, HsmError> {
        let inner = self.inner.clone();
        self.run(move |s| {
            inner.refresh_roots(s)?;
            if let Some((id, _)) = inner.current() {
                return Ok(Err(HsmError::Rejected(format!(
                    "the token already holds root key {id}; use RotateRootKey to add one"
                ))));
            }
            inner.generate_root(s, 1).map(Ok)
        })
        .await?
    }

    /// A wrap and an unwrap of a random value under the current root key:
    /// the path every CMK takes, run before serving. Catches a token that
    /// does not keep the caller's GCM IV, or cannot decrypt what it
    /// encrypted.
    pub async fn self_test(&self) -> Result<u32, HsmError> {
        let probe = self.generate_random(32).await?;
        let aad = b"coffre pkcs11 self-test";
        let wrapped = self.wrap(probe.expose(), aad).await?;
        let back = self.unwrap(&wrapped.blob, aad).await?;
        if back.expose() != probe.expose() {
            return Err(HsmError::Setup(format!(
                "the token {:?} unwrapped a probe to other bytes",
                self.inner.token_label
            )));
        }
        Ok(wrapped.root_key_id)
    }

    /// Logs the application out of the token, as an HSM restart or a
    /// session timeout on the HSM's side would: the next call must log in
    /// again by itself. For `coffre hsm conformance`.
    pub async fn log_out(&self) -> Result<(), HsmError> {
        self.run(|s| match s.logout() {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserNotLoggedIn, _)) => Ok(()),
            Err(e) => Err(e),
        })
        .await
    }

    /// Facts about the token and its root keys, for `coffre hsm check`.
    pub async fn report(&self) -> Result<TokenReport, HsmError> {
        let inner = self.inner.clone();
        self.run(move |s| {
            inner.refresh_roots(s)?;
            Ok(inner.report())
        })
        .await
    }

    /// Runs `op` with a pooled, logged-in session on the blocking pool; on a
    /// lost session, logs in again and retries once.
    async fn run<T, F>(&self, op: F) -> Result<T, HsmError>
    where
        T: Send + 'static,
        F: Fn(&Session) -> Result<T, CkError> + Send + 'static,
    {
        let inner = self.inner.clone();
        let timeout = inner.timeout;
        let call = async move {
            let permit = inner
                .clone()
                .permits_owned()
                .await
                .map_err(|_| HsmError::Unavailable("the HSM session pool is closed".into()))?;
            tokio::task::spawn_blocking(move || {
                // The slot is held for as long as the session is in use,
                // even after the caller stopped waiting (timeout): a hung
                // HSM then holds `sessions` threads, not one per request.
                let _permit = permit;
                let first = inner.take_session()?;
                match op(&first) {
                    Ok(v) => {
                        inner.give_back(first);
                        Ok(v)
                    }
                    Err(e) if session_lost(&e) => {
                        tracing::warn!(error = %describe(&e), "HSM session lost; logging in again");
                        drop(first);
                        inner.forget_idle();
                        let second = inner.open_session()?;
                        // Handles found before may not survive what happened.
                        inner
                            .objects
                            .write()
                            .unwrap_or_else(PoisonError::into_inner)
                            .clear();
                        let out = inner
                            .refresh_roots(&second)
                            .and_then(|()| op(&second))
                            .map_err(|e| classify(&e));
                        inner.give_back(second);
                        out
                    }
                    Err(e) => {
                        inner.give_back(first);
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
}

impl Inner {
    async fn permits_owned(
        self: Arc<Self>,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, tokio::sync::AcquireError> {
        self.permits.clone().acquire_owned().await
    }

    fn open_session(&self) -> Result<Session, HsmError> {
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

    fn take_session(&self) -> Result<Session, HsmError> {
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

    fn give_back(&self, session: Session) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.max_idle {
            idle.push(session);
        }
    }

    /// An empty search is only believed in a logged-in session: a session
    /// the token logged out sees no private object, and says no more.
    fn ensure_logged_in(s: &Session) -> Result<(), CkError> {
        use cryptoki::session::SessionState;
        let state = s.get_session_info()?.session_state();
        if matches!(state, SessionState::RwUser | SessionState::RoUser) {
            Ok(())
        } else {
            Err(CkError::Pkcs11(
                RvError::UserNotLoggedIn,
                cryptoki::context::Function::GetSessionInfo,
            ))
        }
    }

    /// Drops every idle session: after one was lost, the others likely were.
    fn forget_idle(&self) {
        let stale = std::mem::take(&mut *self.idle.lock().unwrap_or_else(PoisonError::into_inner));
        drop(stale);
    }

    fn current(&self) -> Option<(u32, RootKey)> {
        self.roots
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .next_back()
            .map(|(id, k)| (*id, *k))
    }

    fn root(&self, id: u32) -> Option<RootKey> {
        self.roots
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .copied()
    }

    /// Reads the token's root keys into `roots`: the AES token keys that can
    /// encrypt (CMK key objects cannot) and carry a root key's label.
    fn refresh_roots(&self, s: &Session) -> Result<(), CkError> {
        let found = Self::labelled_roots(
            s,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Token(true),
                Attribute::Encrypt(true),
            ],
        )?;
        if found.is_empty() {
            Self::ensure_logged_in(s)?;
        }
        // A root key that appeared since the last look (a rotation by
        // another node, or someone else's object) is checked like those
        // checked at start before it can become the current one.
        let known: Vec<u32> = self
            .roots
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .copied()
            .collect();
        let mut found = found;
        let kinds = root_key_attribute_types();
        for (id, key) in found.clone() {
            if known.contains(&id) {
                continue;
            }
            let problems = root_key_problems(&s.get_attributes(key.handle, &kinds)?);
            if !problems.is_empty() {
                tracing::error!(root_key_id = id, problems = %problems.join("; "), "ignoring a root key with unsafe attributes");
                found.remove(&id);
            }
        }
        *self.roots.write().unwrap_or_else(PoisonError::into_inner) = found;
        Ok(())
    }

    /// The objects matching `template` whose label is a root key's.
    fn labelled_roots(
        s: &Session,
        template: &[Attribute],
    ) -> Result<BTreeMap<u32, RootKey>, CkError> {
        let handles = s.find_objects(template)?;
        let mut found = BTreeMap::new();
        for handle in handles {
            let attrs = s.get_attributes(handle, &[AttributeType::Label])?;
            let label = attrs.iter().find_map(|a| match a {
                Attribute::Label(l) => Some(l.as_slice()),
                _ => None,
            });
            let id = label
                .and_then(|l| std::str::from_utf8(l).ok())
                .and_then(|l| l.strip_prefix(ROOT_LABEL_PREFIX))
                .and_then(|n| n.parse::<u32>().ok())
                .filter(|id| *id > 0);
            if let Some(id) = id {
                found.insert(id, RootKey { handle });
            }
        }
        Ok(found)
    }

    /// Checks every root key against [`ROOT_KEY_POLICY`], its type and
    /// length. Refuses the token on the first key that falls short.
    fn check_roots(&self, s: &Session) -> Result<(), HsmError> {
        // Every object labelled as a root key, whatever its flags: one that
        // cannot encrypt would be skipped by `refresh_roots`, but is still
        // someone's mistake to report.
        let roots = Self::labelled_roots(s, &[Attribute::Class(ObjectClass::SECRET_KEY)])
            .map_err(|e| classify(&e))?;
        for (id, key) in roots {
            let kinds = root_key_attribute_types();
            let attrs = s
                .get_attributes(key.handle, &kinds)
                .map_err(|e| classify(&e))?;
            let problems = root_key_problems(&attrs);
            if !problems.is_empty() {
                return Err(HsmError::Setup(format!(
                    "root key {ROOT_LABEL_PREFIX}{id} on token {:?} is not safe to use: {}. \
                     coffre refuses to start; see SECURITY.md, \"PKCS#11\"",
                    self.token_label,
                    problems.join("; ")
                )));
            }
        }
        Ok(())
    }

    /// The handle of the CMK key object `name`, found on the token once.
    fn object(&self, s: &Session, name: &str) -> Result<Option<ObjectHandle>, CkError> {
        if let Some(h) = self
            .objects
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
        {
            return Ok(Some(*h));
        }
        let found = s.find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Token(true),
            Attribute::Label(name.as_bytes().to_vec()),
        ])?;
        let handle = match found.as_slice() {
            [] => {
                Self::ensure_logged_in(s)?;
                return Ok(None);
            }
            [one] => {
                // Checked once, when first found: an object planted under a
                // CMK's name with weaker attributes is never used.
                let kinds: Vec<AttributeType> = KEY_OBJECT_POLICY.iter().map(|r| r.kind).collect();
                let problems =
                    policy_problems(&KEY_OBJECT_POLICY, &s.get_attributes(*one, &kinds)?);
                if !problems.is_empty() {
                    tracing::error!(object = %name, problems = %problems.join("; "), "refusing an HSM key object with unsafe attributes");
                    return Ok(None);
                }
                *one
            }
            // Two objects with one name: not made by coffre. Use neither.
            _ => {
                return Err(CkError::Pkcs11(
                    RvError::KeyHandleInvalid,
                    cryptoki::context::Function::FindObjects,
                ));
            }
        };
        self.objects
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned(), handle);
        Ok(Some(handle))
    }

    /// A per-seal key derived inside the token from the CMK object and the
    /// salt (`CKM_AES_CBC_ENCRYPT_DATA`, IV 0: the 32 derived bytes are the
    /// CBC encryption of the salt), a session object that can only
    /// `purpose` (encrypt or decrypt), non-extractable.
    fn derive_seal_key(
        s: &Session,
        base: ObjectHandle,
        salt: &[u8; 32],
        encrypt: bool,
    ) -> Result<ObjectHandle, CkError> {
        let params = cryptoki::mechanism::ekdf::AesCbcDeriveParams::new([0u8; 16], salt);
        s.derive_key(
            &Mechanism::AesCbcEncryptData(params),
            base,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32.into()),
                Attribute::Token(false),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Encrypt(encrypt),
                Attribute::Decrypt(!encrypt),
                Attribute::Wrap(false),
                Attribute::Unwrap(false),
                Attribute::Derive(false),
            ],
        )
    }

    /// What a `CKM_AES_GCM` decryption's result means: the plaintext, a
    /// blob that does not authenticate (`Ok(Err(..))`), or a device error
    /// (`Err`, which `run` retries or reports as unavailable).
    fn gcm_opened(
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
                    cryptoki::context::Function::Decrypt,
                ),
            ) if self.lenient_gcm_errors => match s.get_session_info() {
                Ok(_) => Ok(Err(HsmError::AuthenticationFailed)),
                Err(_) => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    fn generate_root(&self, s: &Session, id: u32) -> Result<u32, CkError> {
        s.generate_key(&Mechanism::AesKeyGen, &root_key_template(id))?;
        self.refresh_roots(s)?;
        Ok(id)
    }

    fn report(&self) -> TokenReport {
        let info = self.ctx.get_library_info().ok();
        let token = self.ctx.get_token_info(self.slot).ok();
        let roots = self.roots.read().unwrap_or_else(PoisonError::into_inner);
        TokenReport {
            module: self.module.display().to_string(),
            library: info
                .map(|i| {
                    format!(
                        "{} {} ({})",
                        i.manufacturer_id().trim_end(),
                        i.library_version(),
                        i.library_description().trim_end()
                    )
                })
                .unwrap_or_default(),
            slot: self.slot.id(),
            token_label: self.token_label.clone(),
            token_model: token
                .as_ref()
                .map(|t| t.model().trim_end().to_string())
                .unwrap_or_default(),
            token_serial: token
                .as_ref()
                .map(|t| t.serial_number().trim_end().to_string())
                .unwrap_or_default(),
            root_key_ids: roots.keys().copied().collect(),
            current_root_key_id: roots.keys().next_back().copied(),
        }
    }
}

/// The attributes [`root_key_problems`] reads.
fn root_key_attribute_types() -> Vec<AttributeType> {
    let mut kinds: Vec<AttributeType> = ROOT_KEY_POLICY.iter().map(|r| r.kind).collect();
    kinds.push(AttributeType::ValueLen);
    kinds.push(AttributeType::Copyable);
    kinds
}

/// What is wrong with a root key's attributes, one line per problem (empty:
/// nothing). A required attribute the token does not report is a problem.
pub fn root_key_problems(attrs: &[Attribute]) -> Vec<String> {
    let mut problems = policy_problems(&ROOT_KEY_POLICY, attrs);
    // CKA_COPYABLE is a PKCS#11 2.40 attribute some tokens do not report;
    // if reported, it must be false.
    if let Some(true) = attrs
        .iter()
        .find(|a| a.attribute_type() == AttributeType::Copyable)
        .and_then(bool_value)
    {
        problems.push("CKA_COPYABLE is true, must be false".into());
    }
    let len = attrs.iter().find_map(|a| match a {
        Attribute::ValueLen(l) => Some(u64::from(*l)),
        _ => None,
    });
    if len != Some(32) {
        problems.push(format!(
            "CKA_VALUE_LEN is {}, must be 32 (AES-256)",
            len.map_or("not reported".to_string(), |l| l.to_string())
        ));
    }
    problems
}

fn bool_value(a: &Attribute) -> Option<bool> {
    Some(match a {
        Attribute::Token(v)
        | Attribute::Private(v)
        | Attribute::Sensitive(v)
        | Attribute::Extractable(v)
        | Attribute::AlwaysSensitive(v)
        | Attribute::NeverExtractable(v)
        | Attribute::Local(v)
        | Attribute::Encrypt(v)
        | Attribute::Decrypt(v)
        | Attribute::Wrap(v)
        | Attribute::Unwrap(v)
        | Attribute::Derive(v)
        | Attribute::Sign(v)
        | Attribute::Verify(v)
        | Attribute::Modifiable(v)
        | Attribute::Copyable(v) => *v,
        _ => return None,
    })
}

fn header(root_key_id: u32, iv: &[u8; IV_LEN]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    let (magic, rest) = h.split_at_mut(2);
    magic.copy_from_slice(&MAGIC);
    let (version, rest) = rest.split_at_mut(1);
    version.copy_from_slice(&[FORMAT_VERSION]);
    let (id, iv_out) = rest.split_at_mut(4);
    id.copy_from_slice(&root_key_id.to_be_bytes());
    iv_out.copy_from_slice(iv);
    h
}

/// A parsed blob: header, root key id, IV, ciphertext with its tag.
struct Parsed<'a> {
    header: &'a [u8],
    root_key_id: u32,
    iv: [u8; IV_LEN],
    sealed: &'a [u8],
}

fn parse(blob: &[u8]) -> Option<Parsed<'_>> {
    if blob.len() < HEADER_LEN + 1 + TAG_LEN
        || blob.len() > HEADER_LEN + MAX_PLAINTEXT_LEN + TAG_LEN
    {
        return None;
    }
    let (header, sealed) = blob.split_at(HEADER_LEN);
    let (magic, rest) = header.split_at(2);
    let (version, rest) = rest.split_at(1);
    let (id, iv) = rest.split_at(4);
    if magic != MAGIC || version != [FORMAT_VERSION] {
        return None;
    }
    Some(Parsed {
        header,
        root_key_id: u32::from_be_bytes(id.try_into().ok()?),
        iv: iv.try_into().ok()?,
        sealed,
    })
}

fn gcm_aad(header: &[u8], aad: &[u8]) -> Vec<u8> {
    let mut full = Vec::with_capacity(header.len() + aad.len());
    full.extend_from_slice(header);
    full.extend_from_slice(aad);
    full
}

#[async_trait]
impl Hsm for Pkcs11Hsm {
    fn is_secure(&self) -> bool {
        true
    }

    async fn info(&self) -> Result<HsmInfo, HsmError> {
        let inner = self.inner.clone();
        self.run(move |s| {
            inner.refresh_roots(s)?;
            Ok(())
        })
        .await?;
        let roots = self
            .inner
            .roots
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(current) = roots.keys().next_back().copied() else {
            // coffre never starts without a root key; one that disappears
            // from the token was destroyed behind coffre's back.
            return Err(HsmError::Tampered);
        };
        Ok(HsmInfo {
            backend: "pkcs11".into(),
            label: self.inner.token_label.clone(),
            current_root_key_id: current,
            root_key_ids: roots.keys().copied().collect(),
        })
    }

    async fn generate_random(&self, len: usize) -> Result<SecretBytes, HsmError> {
        if len == 0 || len > MAX_RANDOM_LEN {
            return Err(HsmError::Rejected(format!(
                "random length {len} outside 1..={MAX_RANDOM_LEN}"
            )));
        }
        self.run(move |s| {
            let mut out = Zeroizing::new(vec![0u8; len]);
            s.generate_random_slice(&mut out)?;
            Ok(SecretBytes::from(out))
        })
        .await
    }

    async fn wrap(&self, plaintext: &[u8], aad: &[u8]) -> Result<HsmWrapped, HsmError> {
        if plaintext.is_empty() || plaintext.len() > MAX_PLAINTEXT_LEN {
            return Err(HsmError::Rejected(format!(
                "plaintext must be 1..={MAX_PLAINTEXT_LEN} bytes"
            )));
        }
        let inner = self.inner.clone();
        let plaintext = Zeroizing::new(plaintext.to_vec());
        let aad = aad.to_vec();
        self.run(move |s| {
            let Some((id, key)) = inner.current() else {
                return Ok(Err(HsmError::Tampered));
            };
            let mut iv = [0u8; IV_LEN];
            s.generate_random_slice(&mut iv)?;
            let header = header(id, &iv);
            let full_aad = gcm_aad(&header, &aad);
            let mut iv_param = iv;
            let params = GcmParams::new(&mut iv_param, &full_aad, 128.into())?;
            let sealed = s.encrypt(&Mechanism::AesGcm(params), key.handle, &plaintext)?;
            if iv_param != iv {
                return Ok(Err(iv_replaced(&inner.token_label)));
            }
            let mut blob = Vec::with_capacity(HEADER_LEN + sealed.len());
            blob.extend_from_slice(&header);
            blob.extend_from_slice(&sealed);
            Ok(Ok(HsmWrapped {
                blob,
                root_key_id: id,
            }))
        })
        .await?
    }

    async fn unwrap(&self, wrapped: &[u8], aad: &[u8]) -> Result<SecretBytes, HsmError> {
        let parsed = parse(wrapped).ok_or(HsmError::AuthenticationFailed)?;
        let id = parsed.root_key_id;
        let iv = parsed.iv;
        let full_aad = gcm_aad(parsed.header, aad);
        let sealed = parsed.sealed.to_vec();
        let inner = self.inner.clone();
        self.run(move |s| {
            // Another coffre node may have rotated the root key.
            if inner.root(id).is_none() {
                inner.refresh_roots(s)?;
            }
            let Some(key) = inner.root(id) else {
                return Ok(Err(if inner.current().is_none() {
                    HsmError::Tampered
                } else {
                    HsmError::AuthenticationFailed
                }));
            };
            let mut iv_param = iv;
            let params = GcmParams::new(&mut iv_param, &full_aad, 128.into())?;
            inner.gcm_opened(
                s,
                s.decrypt(&Mechanism::AesGcm(params), key.handle, &sealed),
            )
        })
        .await?
    }

    async fn rotate_root_key(&self) -> Result<u32, HsmError> {
        let inner = self.inner.clone();
        self.run(move |s| {
            inner.refresh_roots(s)?;
            let Some((current, _)) = inner.current() else {
                return Ok(Err(HsmError::Tampered));
            };
            let Some(next) = current.checked_add(1) else {
                return Ok(Err(HsmError::Rejected("root key ids exhausted".into())));
            };
            inner.generate_root(s, next).map(Ok)
        })
        .await?
    }

    async fn destroy_root_key(&self, root_key_id: u32) -> Result<(), HsmError> {
        let inner = self.inner.clone();
        self.run(move |s| {
            inner.refresh_roots(s)?;
            let Some((current, _)) = inner.current() else {
                return Ok(Err(HsmError::Tampered));
            };
            if root_key_id == current {
                return Ok(Err(HsmError::Rejected(format!(
                    "root key {root_key_id} is the current one"
                ))));
            }
            let Some(key) = inner.root(root_key_id) else {
                return Ok(Err(HsmError::Rejected(format!(
                    "no root key {root_key_id} on the token"
                ))));
            };
            s.destroy_object(key.handle)?;
            inner.refresh_roots(s)?;
            Ok(Ok(()))
        })
        .await?
    }

    fn supports_key_objects(&self) -> bool {
        self.inner.key_objects
    }

    async fn create_key_object(&self, name: &str) -> Result<(), HsmError> {
        self.check_object_name(name)?;
        let inner = self.inner.clone();
        let name = name.to_owned();
        self.run(move |s| {
            if inner.object(s, &name)?.is_some() {
                return Ok(Err(HsmError::Rejected(format!("object {name:?} exists"))));
            }
            let handle = s.generate_key(&Mechanism::AesKeyGen, &key_object_template(&name))?;
            inner
                .objects
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(name.clone(), handle);
            Ok(Ok(()))
        })
        .await?
    }

    async fn seal_with_object(
        &self,
        seal: ObjectSeal<'_>,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        self.check_object_name(seal.object)?;
        if plaintext.is_empty() || plaintext.len() > MAX_SEAL_LEN {
            return Err(HsmError::Rejected(format!(
                "plaintext must be 1..={MAX_SEAL_LEN} bytes"
            )));
        }
        let inner = self.inner.clone();
        let owned = OwnedSeal::from(seal);
        let plaintext = Zeroizing::new(plaintext.to_vec());
        self.run(move |s| {
            let Some(base) = inner.object(s, &owned.object)? else {
                return Ok(Err(HsmError::Rejected(format!(
                    "no object {:?}",
                    owned.object
                ))));
            };
            let key = Inner::derive_seal_key(s, base, &owned.salt, true)?;
            let mut iv = owned.iv;
            let sealed = GcmParams::new(&mut iv, &owned.aad, 128.into())
                .and_then(|p| s.encrypt(&Mechanism::AesGcm(p), key, &plaintext));
            // A session object; destroyed now rather than with the session.
            let _ = s.destroy_object(key);
            let sealed = sealed?;
            if iv != owned.iv {
                return Ok(Err(iv_replaced(&inner.token_label)));
            }
            Ok(Ok(sealed))
        })
        .await?
    }

    async fn open_with_object(
        &self,
        seal: ObjectSeal<'_>,
        sealed: &[u8],
    ) -> Result<SecretBytes, HsmError> {
        if self.check_object_name(seal.object).is_err()
            || sealed.len() <= TAG_LEN
            || sealed.len() > MAX_SEAL_LEN + TAG_LEN
        {
            return Err(HsmError::AuthenticationFailed);
        }
        let inner = self.inner.clone();
        let owned = OwnedSeal::from(seal);
        let sealed = sealed.to_vec();
        self.run(move |s| {
            let Some(base) = inner.object(s, &owned.object)? else {
                return Ok(Err(HsmError::AuthenticationFailed));
            };
            let key = Inner::derive_seal_key(s, base, &owned.salt, false)?;
            let mut iv = owned.iv;
            let opened = GcmParams::new(&mut iv, &owned.aad, 128.into())
                .and_then(|p| s.decrypt(&Mechanism::AesGcm(p), key, &sealed));
            let _ = s.destroy_object(key);
            inner.gcm_opened(s, opened)
        })
        .await?
    }

    async fn destroy_key_object(&self, name: &str) -> Result<(), HsmError> {
        self.check_object_name(name)?;
        let inner = self.inner.clone();
        let name = name.to_owned();
        self.run(move |s| {
            if let Some(handle) = inner.object(s, &name)? {
                match s.destroy_object(handle) {
                    Ok(()) => {}
                    // A stale handle, or destroyed by someone else since
                    // it was found: forget it and look again (in a session
                    // known to be logged in); only "not there" is success.
                    Err(CkError::Pkcs11(RvError::ObjectHandleInvalid, _)) => {
                        inner
                            .objects
                            .write()
                            .unwrap_or_else(PoisonError::into_inner)
                            .remove(&name);
                        if let Some(fresh) = inner.object(s, &name)? {
                            s.destroy_object(fresh)?;
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
            inner
                .objects
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&name);
            Ok(())
        })
        .await
    }
}

// ---------------------------------------------------------------------------
// The audit log's checkpoint-signing key in the token

/// Label of the Ed25519 key pair that signs audit checkpoints.
pub const AUDIT_KEY_LABEL: &str = "coffre-audit-signing";

/// DER of the Ed25519 curve's OID (1.3.101.112), as `CKA_EC_PARAMS`.
const ED25519_PARAMS: [u8; 5] = [0x06, 0x03, 0x2B, 0x65, 0x70];

/// What the private half must be, checked every time it is loaded.
const AUDIT_KEY_POLICY: [RequiredAttribute; 9] = [
    req("CKA_TOKEN", AttributeType::Token, true),
    req("CKA_PRIVATE", AttributeType::Private, true),
    req("CKA_SENSITIVE", AttributeType::Sensitive, true),
    req("CKA_EXTRACTABLE", AttributeType::Extractable, false),
    req("CKA_ALWAYS_SENSITIVE", AttributeType::AlwaysSensitive, true),
    req(
        "CKA_NEVER_EXTRACTABLE",
        AttributeType::NeverExtractable,
        true,
    ),
    req("CKA_SIGN", AttributeType::Sign, true),
    req("CKA_DECRYPT", AttributeType::Decrypt, false),
    req("CKA_UNWRAP", AttributeType::Unwrap, false),
];

/// The token's checkpoint-signing key: an Ed25519 private key that never
/// leaves it, used only through `CKM_EDDSA`.
pub struct Pkcs11Signer {
    inner: Arc<Inner>,
    private: ObjectHandle,
    public: [u8; 32],
}

impl fmt::Debug for Pkcs11Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Signer")
            .field("token", &self.inner.token_label)
            .field("public_key", &hex::encode(self.public))
            .finish_non_exhaustive()
    }
}

impl crate::audit::ExternalSigner for Pkcs11Signer {
    fn public_key(&self) -> [u8; 32] {
        self.public
    }

    /// On a thread of its own, so a hung HSM costs the audit writer at most
    /// the configured timeout.
    fn sign(&self, msg: &[u8]) -> Result<[u8; 64], String> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let inner = self.inner.clone();
        let key = self.private;
        let msg = msg.to_vec();
        std::thread::Builder::new()
            .name("coffre-hsm-sign".into())
            .spawn(move || {
                let _ = tx.send(sign_with_relogin(&inner, key, &msg));
            })
            .map_err(|e| format!("cannot start the signing thread: {e}"))?;
        rx.recv_timeout(self.inner.timeout)
            .map_err(|_| format!("the HSM did not sign within {:?}", self.inner.timeout))?
    }
}

/// Signs with a pooled session; if the session, the login or the key's
/// handle was lost (an HSM restart or failover), logs in again, finds the
/// private key by its label again, and signs once more.
fn sign_with_relogin(inner: &Inner, key: ObjectHandle, msg: &[u8]) -> Result<[u8; 64], String> {
    let s = inner.take_session().map_err(|e| e.to_string())?;
    match raw_eddsa_sign(&s, key, msg) {
        Ok(sig) => {
            inner.give_back(s);
            signature_64(sig)
        }
        Err(e) if session_lost(&e) => {
            drop(s);
            inner.forget_idle();
            let s = inner.open_session().map_err(|e| e.to_string())?;
            let found = s
                .find_objects(&[
                    Attribute::Class(ObjectClass::PRIVATE_KEY),
                    Attribute::Label(AUDIT_KEY_LABEL.as_bytes().to_vec()),
                ])
                .map_err(|e| describe(&e))?;
            let [fresh] = found.as_slice() else {
                return Err(format!(
                    "after logging in again, {} private keys are labelled {AUDIT_KEY_LABEL}",
                    found.len()
                ));
            };
            let out = raw_eddsa_sign(&s, *fresh, msg).map_err(|e| describe(&e));
            inner.give_back(s);
            signature_64(out?)
        }
        Err(e) => {
            inner.give_back(s);
            Err(describe(&e))
        }
    }
}

fn raw_eddsa_sign(s: &Session, key: ObjectHandle, msg: &[u8]) -> Result<Vec<u8>, CkError> {
    use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
    s.sign(
        &Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
        key,
        msg,
    )
}

fn signature_64(sig: Vec<u8>) -> Result<[u8; 64], String> {
    sig.try_into()
        .map_err(|v: Vec<u8>| format!("the HSM returned a {}-byte Ed25519 signature", v.len()))
}

fn eddsa_sign(s: &Session, key: ObjectHandle, msg: &[u8]) -> Result<[u8; 64], String> {
    signature_64(raw_eddsa_sign(s, key, msg).map_err(|e| describe(&e))?)
}

/// The 32-byte key of a `CKA_EC_POINT`: raw, or a DER OCTET STRING.
fn ed25519_point(point: &[u8]) -> Option<[u8; 32]> {
    match point {
        [0x04, 0x20, rest @ ..] if rest.len() == 32 => rest.try_into().ok(),
        raw if raw.len() == 32 => raw.try_into().ok(),
        _ => None,
    }
}

impl Pkcs11Hsm {
    /// The token's checkpoint-signing key pair ([`AUDIT_KEY_LABEL`]),
    /// generated in the token if `create` and it has none. Its private half
    /// must pass [`AUDIT_KEY_POLICY`], and a test signature must verify under
    /// its public half. Blocking.
    pub fn audit_signer(&self, create: bool) -> Result<Pkcs11Signer, HsmError> {
        let setup = |m: String| HsmError::Setup(m);
        let s = self.inner.take_session()?;
        let find = |class| {
            s.find_objects(&[
                Attribute::Class(class),
                Attribute::Label(AUDIT_KEY_LABEL.as_bytes().to_vec()),
            ])
            .map_err(|e| classify(&e))
        };
        let (mut private, mut public) = (
            find(ObjectClass::PRIVATE_KEY)?,
            find(ObjectClass::PUBLIC_KEY)?,
        );
        if private.is_empty() && public.is_empty() {
            if !create {
                return Err(setup(format!(
                    "the token {:?} holds no audit signing key ({AUDIT_KEY_LABEL})",
                    self.inner.token_label
                )));
            }
            let label = AUDIT_KEY_LABEL.as_bytes().to_vec();
            let (pubk, privk) = s
                .generate_key_pair(
                    &Mechanism::EccEdwardsKeyPairGen,
                    &[
                        Attribute::Token(true),
                        Attribute::Private(false),
                        Attribute::Verify(true),
                        Attribute::EcParams(ED25519_PARAMS.to_vec()),
                        Attribute::Label(label.clone()),
                    ],
                    &[
                        Attribute::Token(true),
                        Attribute::Private(true),
                        Attribute::Sensitive(true),
                        Attribute::Extractable(false),
                        Attribute::Sign(true),
                        Attribute::Decrypt(false),
                        Attribute::Unwrap(false),
                        Attribute::Derive(false),
                        Attribute::Modifiable(false),
                        Attribute::Label(label),
                    ],
                )
                .map_err(|e| {
                    setup(format!(
                        "the token {:?} cannot make an Ed25519 key pair: {}",
                        self.inner.token_label,
                        describe(&e)
                    ))
                })?;
            tracing::warn!(token = %self.inner.token_label, "generated the audit checkpoint signing key in the HSM");
            private = vec![privk];
            public = vec![pubk];
        }
        let ([private], [public]) = (private.as_slice(), public.as_slice()) else {
            return Err(setup(format!(
                "the token {:?} must hold exactly one private and one public key labelled                  {AUDIT_KEY_LABEL}; it holds {} and {}",
                self.inner.token_label,
                private.len(),
                public.len()
            )));
        };
        let kinds: Vec<AttributeType> = AUDIT_KEY_POLICY.iter().map(|r| r.kind).collect();
        let attrs = s
            .get_attributes(*private, &kinds)
            .map_err(|e| classify(&e))?;
        let problems = policy_problems(&AUDIT_KEY_POLICY, &attrs);
        if !problems.is_empty() {
            return Err(setup(format!(
                "the audit signing key {AUDIT_KEY_LABEL} on token {:?} is not safe to use: {}",
                self.inner.token_label,
                problems.join("; ")
            )));
        }
        let point = s
            .get_attributes(*public, &[AttributeType::EcPoint])
            .map_err(|e| classify(&e))?
            .into_iter()
            .find_map(|a| match a {
                Attribute::EcPoint(p) => ed25519_point(&p),
                _ => None,
            })
            .ok_or_else(|| {
                setup(format!(
                    "{AUDIT_KEY_LABEL}'s public key is not an Ed25519 point"
                ))
            })?;
        // The pair must match and the mechanism work: one signature, checked
        // with ring.
        let probe = b"coffre audit signing key check";
        let sig = eddsa_sign(&s, *private, probe).map_err(setup)?;
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &point)
            .verify(probe, &sig)
            .map_err(|_| {
                setup(format!(
                    "{AUDIT_KEY_LABEL}: a signature does not verify under its public key"
                ))
            })?;
        let signer = Pkcs11Signer {
            inner: self.inner.clone(),
            private: *private,
            public: point,
        };
        self.inner.give_back(s);
        Ok(signer)
    }
}

/// [`ObjectSeal`] owned, to move into a blocking call.
struct OwnedSeal {
    object: String,
    salt: [u8; 32],
    iv: [u8; IV_LEN],
    aad: Vec<u8>,
}

impl From<ObjectSeal<'_>> for OwnedSeal {
    fn from(s: ObjectSeal<'_>) -> Self {
        Self {
            object: s.object.to_owned(),
            salt: *s.salt,
            iv: *s.iv,
            aad: s.aad.to_vec(),
        }
    }
}

impl Pkcs11Hsm {
    fn check_object_name(&self, name: &str) -> Result<(), HsmError> {
        if !self.inner.key_objects {
            return Err(HsmError::Rejected(format!(
                "the token {:?} does not offer {}: no protection level HSM",
                self.inner.token_label, KEY_OBJECT_MECHANISM.0
            )));
        }
        if name.is_empty()
            || name.len() > MAX_OBJECT_NAME_LEN
            || name.starts_with(ROOT_LABEL_PREFIX)
        {
            return Err(HsmError::Rejected(format!(
                "invalid key object name {name:?}"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_header_round_trips_and_parsing_is_strict() {
        let iv = [7u8; IV_LEN];
        let h = header(42, &iv);
        let mut blob = h.to_vec();
        blob.extend_from_slice(&[1u8; 32 + TAG_LEN]);
        let p = parse(&blob).expect("parses");
        assert_eq!(p.root_key_id, 42);
        assert_eq!(p.iv, iv);
        assert_eq!(p.header, &h[..]);
        assert_eq!(p.sealed.len(), 32 + TAG_LEN);

        let mut wrong_magic = blob.clone();
        wrong_magic[0] = b'H';
        assert!(parse(&wrong_magic).is_none());
        let mut wrong_version = blob.clone();
        wrong_version[2] = 2;
        assert!(parse(&wrong_version).is_none());
        assert!(
            parse(&blob[..HEADER_LEN + TAG_LEN]).is_none(),
            "no ciphertext"
        );
        assert!(parse(&[]).is_none());
        let long = vec![0u8; HEADER_LEN + MAX_PLAINTEXT_LEN + TAG_LEN + 1];
        assert!(parse(&long).is_none());
    }

    #[test]
    fn the_generation_template_satisfies_the_policy_it_is_checked_against() {
        // The token adds the attributes a generated key gets by itself.
        let mut attrs = root_key_template(1);
        attrs.extend([
            Attribute::AlwaysSensitive(true),
            Attribute::NeverExtractable(true),
            Attribute::Local(true),
        ]);
        assert_eq!(root_key_problems(&attrs), Vec::<String>::new());
    }

    #[test]
    fn every_weakened_attribute_is_reported() {
        let mut base = root_key_template(1);
        base.extend([
            Attribute::AlwaysSensitive(true),
            Attribute::NeverExtractable(true),
            Attribute::Local(true),
        ]);
        for want in ROOT_KEY_POLICY {
            let weakened: Vec<Attribute> = base
                .iter()
                .map(|a| {
                    if a.attribute_type() == want.kind {
                        bool_attr(want.kind, !want.value)
                    } else {
                        a.clone()
                    }
                })
                .collect();
            let problems = root_key_problems(&weakened);
            assert_eq!(problems.len(), 1, "{}: {problems:?}", want.name);
            assert!(problems[0].starts_with(want.name), "{problems:?}");

            let missing: Vec<Attribute> = base
                .iter()
                .filter(|a| a.attribute_type() != want.kind)
                .cloned()
                .collect();
            let problems = root_key_problems(&missing);
            assert_eq!(
                problems,
                vec![format!("{} is not reported by the token", want.name)]
            );
        }
        let copyable: Vec<Attribute> = base
            .iter()
            .map(|a| match a {
                Attribute::Copyable(_) => Attribute::Copyable(true),
                other => other.clone(),
            })
            .collect();
        assert_eq!(
            root_key_problems(&copyable),
            vec!["CKA_COPYABLE is true, must be false"]
        );
        let aes128: Vec<Attribute> = base
            .iter()
            .map(|a| match a {
                Attribute::ValueLen(_) => Attribute::ValueLen(16.into()),
                other => other.clone(),
            })
            .collect();
        assert_eq!(
            root_key_problems(&aes128),
            vec!["CKA_VALUE_LEN is 16, must be 32 (AES-256)"]
        );
    }

    fn bool_attr(kind: AttributeType, v: bool) -> Attribute {
        match kind {
            AttributeType::Token => Attribute::Token(v),
            AttributeType::Private => Attribute::Private(v),
            AttributeType::Sensitive => Attribute::Sensitive(v),
            AttributeType::Extractable => Attribute::Extractable(v),
            AttributeType::AlwaysSensitive => Attribute::AlwaysSensitive(v),
            AttributeType::NeverExtractable => Attribute::NeverExtractable(v),
            AttributeType::Local => Attribute::Local(v),
            AttributeType::Encrypt => Attribute::Encrypt(v),
            AttributeType::Decrypt => Attribute::Decrypt(v),
            AttributeType::Wrap => Attribute::Wrap(v),
            AttributeType::Unwrap => Attribute::Unwrap(v),
            AttributeType::Derive => Attribute::Derive(v),
            AttributeType::Sign => Attribute::Sign(v),
            AttributeType::Verify => Attribute::Verify(v),
            AttributeType::Modifiable => Attribute::Modifiable(v),
            other => panic!("not a policy attribute: {other:?}"),
        }
    }
}
