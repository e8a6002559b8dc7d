//! The root keys on the token: found by their label, checked against
//! [`ROOT_KEY_POLICY`](super::policy::ROOT_KEY_POLICY) before first use,
//! kept by id; and what is done with them inside the token (generate, wrap
//! and unwrap "PK" blobs, destroy).
//!
//! Each function that takes a [`Session`] runs on the blocking pool, inside
//! [`Sessions::run`]: an `Err` is a device error (retried once after a
//! re-login), an `Ok(Err(..))` coffre's answer.

use std::collections::BTreeMap;
use std::sync::{PoisonError, RwLock, RwLockReadGuard};

use cryptoki::error::Error as CkError;
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::blob::{self, IV_LEN};
use super::policy::{
    ROOT_LABEL_PREFIX, allows_every_mechanism, root_key_attribute_types, root_key_problems,
    root_key_template,
};
use super::session::{Sessions, classify, iv_replaced};
use crate::hsm::{HsmError, HsmWrapped};
use crate::secret::SecretBytes;

/// A root key found on the token.
#[derive(Clone, Copy, Debug)]
struct RootKey {
    handle: ObjectHandle,
}

/// The root keys by id, as last read from the token. The current one is
/// the highest id.
#[derive(Default)]
pub(super) struct RootKeys {
    by_id: RwLock<BTreeMap<u32, RootKey>>,
}

impl RootKeys {
    /// The ids, lowest first: the last is the current root key.
    pub(super) fn ids(&self) -> Vec<u32> {
        self.read().keys().copied().collect()
    }

    /// The id of the current root key.
    pub(super) fn current_id(&self) -> Option<u32> {
        self.current().map(|(id, _)| id)
    }

    fn current(&self) -> Option<(u32, RootKey)> {
        self.read().iter().next_back().map(|(id, k)| (*id, *k))
    }

    fn get(&self, id: u32) -> Option<RootKey> {
        self.read().get(&id).copied()
    }

    fn read(&self) -> RwLockReadGuard<'_, BTreeMap<u32, RootKey>> {
        self.by_id.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads the token's root keys: the AES token keys that can encrypt (CMK
    /// key objects cannot) and carry a root key's label.
    pub(super) fn refresh(&self, s: &Session) -> Result<(), CkError> {
        let found = labelled(
            s,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Token(true),
                Attribute::Encrypt(true),
            ],
        )?;
        if found.is_empty() {
            Sessions::ensure_logged_in(s)?;
        }
        // A root key that appeared since the last look (a rotation by
        // another node, or someone else's object) is checked like those
        // checked at start before it can become the current one.
        let known = self.ids();
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
        *self.by_id.write().unwrap_or_else(PoisonError::into_inner) = found;
        Ok(())
    }

    /// The ids of the root keys that allow every mechanism (no
    /// `CKA_ALLOWED_MECHANISMS` list: made before coffre set one), lowest
    /// first.
    pub(super) fn unrestricted(&self, s: &Session) -> Result<Vec<u32>, CkError> {
        let mut ids = Vec::new();
        for (id, key) in self.read().iter() {
            let attrs = s.get_attributes(key.handle, &[AttributeType::AllowedMechanisms])?;
            if allows_every_mechanism(&attrs) {
                ids.push(*id);
            }
        }
        Ok(ids)
    }

    /// Checks every root key against the policy, its type and length.
    /// Refuses the token on the first key that falls short.
    pub(super) fn check_all(&self, s: &Session, token_label: &str) -> Result<(), HsmError> {
        // Every object labelled as a root key, whatever its flags: one that
        // cannot encrypt would be skipped by `refresh`, but is still
        // someone's mistake to report.
        let roots =
            labelled(s, &[Attribute::Class(ObjectClass::SECRET_KEY)]).map_err(|e| classify(&e))?;
        for (id, key) in roots {
            let kinds = root_key_attribute_types();
            let attrs = s
                .get_attributes(key.handle, &kinds)
                .map_err(|e| classify(&e))?;
            let problems = root_key_problems(&attrs);
            if !problems.is_empty() {
                return Err(HsmError::Setup(format!(
                    "root key {ROOT_LABEL_PREFIX}{id} on token {token_label:?} is not safe to use: \
                     {}. coffre refuses to start; see SECURITY.md, \"PKCS#11\"",
                    problems.join("; ")
                )));
            }
            if allows_every_mechanism(&attrs) {
                tracing::warn!(
                    root_key_id = id,
                    "root key {ROOT_LABEL_PREFIX}{id} allows every mechanism (made before coffre \
                     set CKA_ALLOWED_MECHANISMS); `coffre hsm rotate-root` replaces it with one \
                     restricted to CKM_AES_GCM"
                );
            }
        }
        Ok(())
    }

    /// Generates root key `id` in the token.
    fn generate(&self, s: &Session, id: u32) -> Result<u32, CkError> {
        s.generate_key(&Mechanism::AesKeyGen, &root_key_template(id))?;
        self.refresh(s)?;
        Ok(id)
    }

    /// Generates the first root key (id 1); refused if the token has one.
    pub(super) fn init(&self, s: &Session) -> Result<Result<u32, HsmError>, CkError> {
        self.refresh(s)?;
        if let Some(id) = self.current_id() {
            return Ok(Err(HsmError::Rejected(format!(
                "the token already holds root key {id}; use RotateRootKey to add one"
            ))));
        }
        self.generate(s, 1).map(Ok)
    }

    /// Generates the next root key, which becomes the current one.
    pub(super) fn rotate(&self, s: &Session) -> Result<Result<u32, HsmError>, CkError> {
        self.refresh(s)?;
        let Some(current) = self.current_id() else {
            return Ok(Err(HsmError::Tampered));
        };
        let Some(next) = current.checked_add(1) else {
            return Ok(Err(HsmError::Rejected("root key ids exhausted".into())));
        };
        self.generate(s, next).map(Ok)
    }

    /// Destroys a root key that is not the current one.
    pub(super) fn destroy(&self, s: &Session, id: u32) -> Result<Result<(), HsmError>, CkError> {
        self.refresh(s)?;
        let Some(current) = self.current_id() else {
            return Ok(Err(HsmError::Tampered));
        };
        if id == current {
            return Ok(Err(HsmError::Rejected(format!(
                "root key {id} is the current one"
            ))));
        }
        let Some(key) = self.get(id) else {
            return Ok(Err(HsmError::Rejected(format!(
                "no root key {id} on the token"
            ))));
        };
        s.destroy_object(key.handle)?;
        self.refresh(s)?;
        Ok(Ok(()))
    }

    /// Seals `plaintext` under the current root key into a "PK" blob, with
    /// an IV from the token's generator.
    pub(super) fn wrap(
        &self,
        s: &Session,
        token_label: &str,
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<Result<HsmWrapped, HsmError>, CkError> {
        let Some((id, key)) = self.current() else {
            return Ok(Err(HsmError::Tampered));
        };
        let mut iv = [0u8; IV_LEN];
        s.generate_random_slice(&mut iv)?;
        let header = blob::header(id, &iv);
        let full_aad = blob::gcm_aad(&header, aad);
        let mut iv_param = iv;
        let params = GcmParams::new(&mut iv_param, &full_aad, 128.into())?;
        let sealed = s.encrypt(&Mechanism::AesGcm(params), key.handle, plaintext)?;
        if iv_param != iv {
            return Ok(Err(iv_replaced(token_label)));
        }
        Ok(Ok(HsmWrapped {
            blob: blob::encode(&header, &sealed),
            root_key_id: id,
        }))
    }

    /// Opens a parsed "PK" blob under the root key it names.
    pub(super) fn unwrap(
        &self,
        s: &Session,
        sessions: &Sessions,
        blob: &Unwrapping,
    ) -> Result<Result<SecretBytes, HsmError>, CkError> {
        let id = blob.root_key_id;
        // Another coffre node may have rotated the root key.
        if self.get(id).is_none() {
            self.refresh(s)?;
        }
        let Some(key) = self.get(id) else {
            return Ok(Err(if self.current().is_none() {
                HsmError::Tampered
            } else {
                HsmError::AuthenticationFailed
            }));
        };
        let mut iv_param = blob.iv;
        let params = GcmParams::new(&mut iv_param, &blob.full_aad, 128.into())?;
        sessions.gcm_opened(
            s,
            s.decrypt(&Mechanism::AesGcm(params), key.handle, &blob.sealed),
        )
    }
}

/// A "PK" blob parsed and owned, to move into a blocking call.
pub(super) struct Unwrapping {
    root_key_id: u32,
    iv: [u8; IV_LEN],
    full_aad: Vec<u8>,
    sealed: Vec<u8>,
}

impl Unwrapping {
    /// `None` if `wrapped` is not a "PK" blob.
    pub(super) fn parse(wrapped: &[u8], aad: &[u8]) -> Option<Self> {
        let parsed = blob::parse(wrapped)?;
        Some(Self {
            root_key_id: parsed.root_key_id,
            iv: parsed.iv,
            full_aad: blob::gcm_aad(parsed.header, aad),
            sealed: parsed.sealed.to_vec(),
        })
    }
}

/// The objects matching `template` whose label is a root key's, by id.
fn labelled(s: &Session, template: &[Attribute]) -> Result<BTreeMap<u32, RootKey>, CkError> {
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
