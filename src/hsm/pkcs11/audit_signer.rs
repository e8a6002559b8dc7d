//! The audit log's checkpoint-signing key in the token: an Ed25519 key pair
//! labelled [`AUDIT_KEY_LABEL`] whose private half never leaves it, used
//! only through `CKM_EDDSA`.

use std::fmt;
use std::sync::Arc;

use cryptoki::error::Error as CkError;
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::policy::{
    AUDIT_KEY_LABEL, AUDIT_KEY_POLICY, attribute_types, audit_key_templates, policy_problems,
};
use super::session::{Sessions, classify, describe, session_lost};
use crate::hsm::HsmError;

/// The token's checkpoint-signing key: an Ed25519 private key that never
/// leaves it, used only through `CKM_EDDSA`.
pub struct Pkcs11Signer {
    sessions: Arc<Sessions>,
    private: ObjectHandle,
    public: [u8; 32],
}

impl fmt::Debug for Pkcs11Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Signer")
            .field("token", &self.sessions.token_label())
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
        let sessions = self.sessions.clone();
        let key = self.private;
        let msg = msg.to_vec();
        std::thread::Builder::new()
            .name("coffre-hsm-sign".into())
            .spawn(move || {
                let _ = tx.send(sign_with_relogin(&sessions, key, &msg));
            })
            .map_err(|e| format!("cannot start the signing thread: {e}"))?;
        let timeout = self.sessions.timeout();
        rx.recv_timeout(timeout)
            .map_err(|_| format!("the HSM did not sign within {timeout:?}"))?
    }
}

/// The token's checkpoint-signing key pair, generated in the token if
/// `create` and it has none. Its private half must pass
/// [`AUDIT_KEY_POLICY`], and a test signature must verify under its public
/// half. Blocking.
pub(super) fn load(sessions: &Arc<Sessions>, create: bool) -> Result<Pkcs11Signer, HsmError> {
    let setup = |m: String| HsmError::Setup(m);
    let token = sessions.token_label();
    let s = sessions.take_session()?;
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
                "the token {token:?} holds no audit signing key ({AUDIT_KEY_LABEL})"
            )));
        }
        let (public_template, private_template) = audit_key_templates();
        let (pubk, privk) = s
            .generate_key_pair(
                &Mechanism::EccEdwardsKeyPairGen,
                &public_template,
                &private_template,
            )
            .map_err(|e| {
                setup(format!(
                    "the token {token:?} cannot make an Ed25519 key pair: {}",
                    describe(&e)
                ))
            })?;
        tracing::warn!(token = %token, "generated the audit checkpoint signing key in the HSM");
        private = vec![privk];
        public = vec![pubk];
    }
    let ([private], [public]) = (private.as_slice(), public.as_slice()) else {
        return Err(setup(format!(
            "the token {token:?} must hold exactly one private and one public key labelled \
             {AUDIT_KEY_LABEL}; it holds {} and {}",
            private.len(),
            public.len()
        )));
    };
    let attrs = s
        .get_attributes(*private, &attribute_types(&AUDIT_KEY_POLICY))
        .map_err(|e| classify(&e))?;
    let problems = policy_problems(&AUDIT_KEY_POLICY, &attrs);
    if !problems.is_empty() {
        return Err(setup(format!(
            "the audit signing key {AUDIT_KEY_LABEL} on token {token:?} is not safe to use: {}",
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
        sessions: sessions.clone(),
        private: *private,
        public: point,
    };
    sessions.give_back(s);
    Ok(signer)
}

/// Signs with a pooled session; if the session, the login or the key's
/// handle was lost (an HSM restart or failover), logs in again, finds the
/// private key by its label again, and signs once more.
fn sign_with_relogin(
    sessions: &Sessions,
    key: ObjectHandle,
    msg: &[u8],
) -> Result<[u8; 64], String> {
    let s = sessions.take_session().map_err(|e| e.to_string())?;
    match raw_eddsa_sign(&s, key, msg) {
        Ok(sig) => {
            sessions.give_back(s);
            signature_64(sig)
        }
        Err(e) if session_lost(&e) => {
            drop(s);
            sessions.forget_idle();
            let s = sessions.open_session().map_err(|e| e.to_string())?;
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
            sessions.give_back(s);
            signature_64(out?)
        }
        Err(e) => {
            sessions.give_back(s);
            Err(describe(&e))
        }
    }
}

fn raw_eddsa_sign(s: &Session, key: ObjectHandle, msg: &[u8]) -> Result<Vec<u8>, CkError> {
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
