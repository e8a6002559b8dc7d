//! A real HSM through PKCS#11 (the `cryptoki` crate): any vendor's module,
//! SoftHSM2 in tests.
//!
//! [`Pkcs11Hsm`] keeps coffre's root keys as AES-256 token objects (the
//! current one has the highest id) and seals CMK material with `CKM_AES_GCM`
//! inside the token. Opening it checks the token's mechanisms and every root
//! key's attributes, and refuses a token that falls short.
//!
//! - `policy.rs`: what the token and each object on it must be (the
//!   mechanisms, the labels, the templates and the three attribute
//!   policies), and why.
//! - `session.rs`: the session pool, login, one re-login and retry after a
//!   lost session, the timeout, and what the token's errors mean.
//! - `blob.rs`: the "PK" v1 wrapped-material format.
//! - `root_keys.rs`: finding, checking, generating and using root keys.
//! - `key_objects.rs`: CMK versions kept in the token (protection level
//!   `HSM`).
//! - `audit_signer.rs`: the audit log's checkpoint-signing key
//!   ([`Pkcs11Signer`]).

mod audit_signer;
mod blob;
mod key_objects;
pub mod policy;
mod root_keys;
mod session;

#[cfg(test)]
mod policy_tests;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cryptoki::context::Pkcs11;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use zeroize::Zeroizing;

pub use audit_signer::Pkcs11Signer;
pub use blob::MAX_PLAINTEXT_LEN;
pub use policy::{
    AUDIT_KEY_LABEL, ROOT_KEY_POLICY, ROOT_LABEL_PREFIX, RequiredAttribute, root_key_problems,
};

use key_objects::{KeyObjects, OwnedSeal};
use policy::{KEY_OBJECT_MECHANISM, REQUIRED_MECHANISMS};
use root_keys::{RootKeys, Unwrapping};
use session::{Sessions, classify, context_for, describe};

use super::{Hsm, HsmError, HsmInfo, HsmWrapped, ObjectSeal};
pub use crate::config::TokenSelector;
use crate::secret::SecretBytes;

/// Largest random request, as for the simulator.
pub const MAX_RANDOM_LEN: usize = 1024;

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
    /// Root keys without a `CKA_ALLOWED_MECHANISMS` list (made before
    /// coffre set one): usable with any mechanism the token offers.
    pub unrestricted_root_key_ids: Vec<u32>,
}

/// The PKCS#11 backend. Cheap to clone.
#[derive(Clone)]
pub struct Pkcs11Hsm {
    inner: Arc<Inner>,
}

struct Inner {
    sessions: Arc<Sessions>,
    module: PathBuf,
    roots: RootKeys,
    objects: KeyObjects,
}

impl fmt::Debug for Pkcs11Hsm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Hsm")
            .field("module", &self.inner.module)
            .field("slot", &self.inner.sessions.slot().id())
            .field("token", &self.inner.sessions.token_label())
            .finish_non_exhaustive()
    }
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
        let sessions = Sessions::new(
            ctx,
            slot,
            token_label,
            &settings.pin,
            settings.sessions,
            settings.timeout,
        );
        let hsm = Self {
            inner: Arc::new(Inner {
                sessions: Arc::new(sessions),
                module: settings.module,
                roots: RootKeys::default(),
                objects: KeyObjects::new(key_objects),
            }),
        };
        let sessions = &hsm.inner.sessions;
        let session = sessions.open_session()?;
        hsm.inner
            .roots
            .refresh(&session)
            .map_err(|e| classify(&e))?;
        hsm.inner
            .roots
            .check_all(&session, sessions.token_label())?;
        sessions.give_back(session);
        Ok(hsm)
    }

    /// Refuses a token without a root key, saying how to make one.
    pub fn require_root_key(&self) -> Result<u32, HsmError> {
        self.inner.roots.current_id().ok_or_else(|| {
            HsmError::Setup(format!(
                "the token {:?} holds no coffre root key (an AES-256 object labelled \
                 {ROOT_LABEL_PREFIX}<id>); create the first one with \
                 `coffre hsm init-root-key --config FILE`",
                self.token_label()
            ))
        })
    }

    /// Generates the first root key (id 1) on a token that has none.
    pub async fn init_root_key(&self) -> Result<u32, HsmError> {
        self.run(|inner, s| inner.roots.init(s)).await?
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
                self.token_label()
            )));
        }
        Ok(wrapped.root_key_id)
    }

    /// Logs the application out of the token, as an HSM restart or a
    /// session timeout on the HSM's side would: the next call must log in
    /// again by itself. For `coffre hsm conformance`.
    pub async fn log_out(&self) -> Result<(), HsmError> {
        self.run(|_, s| match s.logout() {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserNotLoggedIn, _)) => Ok(()),
            Err(e) => Err(e),
        })
        .await
    }

    /// Facts about the token and its root keys, for `coffre hsm check`.
    pub async fn report(&self) -> Result<TokenReport, HsmError> {
        self.run(|inner, s| {
            inner.roots.refresh(s)?;
            let unrestricted = inner.roots.unrestricted(s)?;
            Ok(inner.report(unrestricted))
        })
        .await
    }

    /// The token's checkpoint-signing key pair ([`AUDIT_KEY_LABEL`]),
    /// generated in the token if `create` and it has none. Its private half
    /// must pass [`policy::AUDIT_KEY_POLICY`], and a test signature must
    /// verify under its public half. Blocking.
    pub fn audit_signer(&self, create: bool) -> Result<Pkcs11Signer, HsmError> {
        audit_signer::load(&self.inner.sessions, create)
    }

    fn token_label(&self) -> &str {
        self.inner.sessions.token_label()
    }

    /// Runs `op` with a pooled, logged-in session on the blocking pool; on a
    /// lost session, logs in again, finds the root keys again (and forgets
    /// the key objects' handles), and retries once.
    async fn run<T, F>(&self, op: F) -> Result<T, HsmError>
    where
        T: Send + 'static,
        F: Fn(&Inner, &Session) -> Result<T, CkError> + Send + 'static,
    {
        let (inner, again) = (self.inner.clone(), self.inner.clone());
        self.inner
            .sessions
            .run(
                move |s| op(&inner, s),
                move |s| {
                    // Handles found before may not survive what happened.
                    again.objects.forget();
                    again.roots.refresh(s)
                },
            )
            .await
    }
}

impl Inner {
    fn report(&self, unrestricted_root_key_ids: Vec<u32>) -> TokenReport {
        let ctx = self.sessions.ctx();
        let slot = self.sessions.slot();
        let info = ctx.get_library_info().ok();
        let token = ctx.get_token_info(slot).ok();
        let root_key_ids = self.roots.ids();
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
            slot: slot.id(),
            token_label: self.sessions.token_label().to_owned(),
            token_model: token
                .as_ref()
                .map(|t| t.model().trim_end().to_string())
                .unwrap_or_default(),
            token_serial: token
                .as_ref()
                .map(|t| t.serial_number().trim_end().to_string())
                .unwrap_or_default(),
            current_root_key_id: root_key_ids.last().copied(),
            root_key_ids,
            unrestricted_root_key_ids,
        }
    }
}

#[async_trait]
impl Hsm for Pkcs11Hsm {
    fn is_secure(&self) -> bool {
        true
    }

    async fn info(&self) -> Result<HsmInfo, HsmError> {
        self.run(|inner, s| inner.roots.refresh(s)).await?;
        let root_key_ids = self.inner.roots.ids();
        let Some(current) = root_key_ids.last().copied() else {
            // coffre never starts without a root key; one that disappears
            // from the token was destroyed behind coffre's back.
            return Err(HsmError::Tampered);
        };
        Ok(HsmInfo {
            backend: "pkcs11".into(),
            label: self.token_label().to_owned(),
            current_root_key_id: current,
            root_key_ids,
        })
    }

    async fn generate_random(&self, len: usize) -> Result<SecretBytes, HsmError> {
        if len == 0 || len > MAX_RANDOM_LEN {
            return Err(HsmError::Rejected(format!(
                "random length {len} outside 1..={MAX_RANDOM_LEN}"
            )));
        }
        self.run(move |_, s| {
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
        let plaintext = Zeroizing::new(plaintext.to_vec());
        let aad = aad.to_vec();
        self.run(move |inner, s| {
            let token = inner.sessions.token_label();
            inner.roots.wrap(s, token, &plaintext, &aad)
        })
        .await?
    }

    async fn unwrap(&self, wrapped: &[u8], aad: &[u8]) -> Result<SecretBytes, HsmError> {
        let blob = Unwrapping::parse(wrapped, aad).ok_or(HsmError::AuthenticationFailed)?;
        self.run(move |inner, s| inner.roots.unwrap(s, &inner.sessions, &blob))
            .await?
    }

    async fn rotate_root_key(&self) -> Result<u32, HsmError> {
        self.run(|inner, s| inner.roots.rotate(s)).await?
    }

    async fn destroy_root_key(&self, root_key_id: u32) -> Result<(), HsmError> {
        self.run(move |inner, s| inner.roots.destroy(s, root_key_id))
            .await?
    }

    fn supports_key_objects(&self) -> bool {
        self.inner.objects.supported()
    }

    async fn create_key_object(&self, name: &str) -> Result<(), HsmError> {
        self.inner.objects.check_name(self.token_label(), name)?;
        let name = name.to_owned();
        self.run(move |inner, s| inner.objects.create(s, &name))
            .await?
    }

    async fn seal_with_object(
        &self,
        seal: ObjectSeal<'_>,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        self.inner
            .objects
            .check_name(self.token_label(), seal.object)?;
        key_objects::check_plaintext(plaintext)?;
        let seal = OwnedSeal::from(seal);
        let plaintext = Zeroizing::new(plaintext.to_vec());
        self.run(move |inner, s| {
            let token = inner.sessions.token_label();
            inner.objects.seal(s, token, &seal, &plaintext)
        })
        .await?
    }

    async fn open_with_object(
        &self,
        seal: ObjectSeal<'_>,
        sealed: &[u8],
    ) -> Result<SecretBytes, HsmError> {
        if self
            .inner
            .objects
            .check_name(self.token_label(), seal.object)
            .is_err()
            || !key_objects::plausible_seal(sealed)
        {
            return Err(HsmError::AuthenticationFailed);
        }
        let seal = OwnedSeal::from(seal);
        let sealed = sealed.to_vec();
        self.run(move |inner, s| inner.objects.open(s, &inner.sessions, &seal, &sealed))
            .await?
    }

    async fn destroy_key_object(&self, name: &str) -> Result<(), HsmError> {
        self.inner.objects.check_name(self.token_label(), name)?;
        let name = name.to_owned();
        self.run(move |inner, s| inner.objects.destroy(s, &name))
            .await
    }
}
