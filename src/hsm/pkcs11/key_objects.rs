//! CMK versions kept in the token (protection level `HSM`): key objects
//! created by name, checked against
//! [`KEY_OBJECT_POLICY`](super::policy::KEY_OBJECT_POLICY) when first
//! found, and used only to derive the one-call key that seals or opens a
//! data key (`CKM_AES_CBC_ENCRYPT_DATA`, then `CKM_AES_GCM`).
//!
//! Each function that takes a [`Session`] runs on the blocking pool, inside
//! [`Sessions::run`]: an `Err` is a device error (retried once after a
//! re-login), an `Ok(Err(..))` coffre's answer.

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock, RwLockWriteGuard};

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::ekdf::AesCbcDeriveParams;
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::blob::{IV_LEN, TAG_LEN};
use super::policy::{
    KEY_OBJECT_MECHANISM, ROOT_LABEL_PREFIX, allows_every_mechanism, key_object_attribute_types,
    key_object_problems, key_object_template, seal_key_template,
};
use super::session::{Sessions, iv_replaced};
use crate::hsm::{HsmError, MAX_OBJECT_NAME_LEN, MAX_SEAL_LEN, ObjectSeal};
use crate::secret::SecretBytes;

/// The token's CMK key objects, by name, as found.
pub(super) struct KeyObjects {
    /// The token offers what protection level HSM needs.
    supported: bool,
    handles: RwLock<HashMap<String, ObjectHandle>>,
}

impl KeyObjects {
    pub(super) fn new(supported: bool) -> Self {
        Self {
            supported,
            handles: RwLock::new(HashMap::new()),
        }
    }

    pub(super) fn supported(&self) -> bool {
        self.supported
    }

    /// Forgets every handle found: after a lost session they may not
    /// survive.
    pub(super) fn forget(&self) {
        self.write().clear();
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<String, ObjectHandle>> {
        self.handles.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Refuses a token without [`KEY_OBJECT_MECHANISM`], and a name that is
    /// empty, too long, or a root key's.
    pub(super) fn check_name(&self, token_label: &str, name: &str) -> Result<(), HsmError> {
        if !self.supported {
            return Err(HsmError::Rejected(format!(
                "the token {token_label:?} does not offer {}: no protection level HSM",
                KEY_OBJECT_MECHANISM.0
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

    /// The handle of the key object `name`, found on the token once.
    fn find(&self, s: &Session, name: &str) -> Result<Option<ObjectHandle>, CkError> {
        if let Some(h) = self
            .handles
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
                Sessions::ensure_logged_in(s)?;
                return Ok(None);
            }
            [one] => {
                // Checked once, when first found: an object planted under a
                // CMK's name with weaker attributes is never used.
                let attrs = s.get_attributes(*one, &key_object_attribute_types())?;
                let problems = key_object_problems(&attrs);
                if !problems.is_empty() {
                    tracing::error!(object = %name, problems = %problems.join("; "), "refusing an HSM key object with unsafe attributes");
                    return Ok(None);
                }
                if allows_every_mechanism(&attrs) {
                    tracing::warn!(
                        object = %name,
                        "this HSM key object allows every mechanism (made before coffre set \
                         CKA_ALLOWED_MECHANISMS); rotate its key to get one restricted to \
                         CKM_AES_CBC_ENCRYPT_DATA"
                    );
                }
                *one
            }
            // Two objects with one name: not made by coffre. Use neither.
            _ => {
                return Err(CkError::Pkcs11(
                    RvError::KeyHandleInvalid,
                    Function::FindObjects,
                ));
            }
        };
        self.write().insert(name.to_owned(), handle);
        Ok(Some(handle))
    }

    /// Generates the key object `name`; refused if it exists.
    pub(super) fn create(&self, s: &Session, name: &str) -> Result<Result<(), HsmError>, CkError> {
        if self.find(s, name)?.is_some() {
            return Ok(Err(HsmError::Rejected(format!("object {name:?} exists"))));
        }
        let handle = s.generate_key(&Mechanism::AesKeyGen, &key_object_template(name))?;
        self.write().insert(name.to_owned(), handle);
        Ok(Ok(()))
    }

    /// Seals `plaintext` under a key derived from the object and the salt.
    pub(super) fn seal(
        &self,
        s: &Session,
        token_label: &str,
        seal: &OwnedSeal,
        plaintext: &[u8],
    ) -> Result<Result<Vec<u8>, HsmError>, CkError> {
        let Some(base) = self.find(s, &seal.object)? else {
            return Ok(Err(HsmError::Rejected(format!(
                "no object {:?}",
                seal.object
            ))));
        };
        let key = derive_seal_key(s, base, &seal.salt, true)?;
        let mut iv = seal.iv;
        let sealed = GcmParams::new(&mut iv, &seal.aad, 128.into())
            .and_then(|p| s.encrypt(&Mechanism::AesGcm(p), key, plaintext));
        // A session object; destroyed now rather than with the session.
        let _ = s.destroy_object(key);
        let sealed = sealed?;
        if iv != seal.iv {
            return Ok(Err(iv_replaced(token_label)));
        }
        Ok(Ok(sealed))
    }

    /// Opens what [`KeyObjects::seal`] sealed; an unknown object does not
    /// authenticate.
    pub(super) fn open(
        &self,
        s: &Session,
        sessions: &Sessions,
        seal: &OwnedSeal,
        sealed: &[u8],
    ) -> Result<Result<SecretBytes, HsmError>, CkError> {
        let Some(base) = self.find(s, &seal.object)? else {
            return Ok(Err(HsmError::AuthenticationFailed));
        };
        let key = derive_seal_key(s, base, &seal.salt, false)?;
        let mut iv = seal.iv;
        let opened = GcmParams::new(&mut iv, &seal.aad, 128.into())
            .and_then(|p| s.decrypt(&Mechanism::AesGcm(p), key, sealed));
        let _ = s.destroy_object(key);
        sessions.gcm_opened(s, opened)
    }

    /// Destroys the key object `name`; one that is not there is success.
    pub(super) fn destroy(&self, s: &Session, name: &str) -> Result<(), CkError> {
        if let Some(handle) = self.find(s, name)? {
            match s.destroy_object(handle) {
                Ok(()) => {}
                // A stale handle, or destroyed by someone else since it was
                // found: forget it and look again (in a session known to be
                // logged in); only "not there" is success.
                Err(CkError::Pkcs11(RvError::ObjectHandleInvalid, _)) => {
                    self.write().remove(name);
                    if let Some(fresh) = self.find(s, name)? {
                        s.destroy_object(fresh)?;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        self.write().remove(name);
        Ok(())
    }
}

/// Refuses a plaintext to seal outside 1..=[`MAX_SEAL_LEN`] bytes.
pub(super) fn check_plaintext(plaintext: &[u8]) -> Result<(), HsmError> {
    if plaintext.is_empty() || plaintext.len() > MAX_SEAL_LEN {
        return Err(HsmError::Rejected(format!(
            "plaintext must be 1..={MAX_SEAL_LEN} bytes"
        )));
    }
    Ok(())
}

/// Whether `sealed` is as long as a seal can be (ciphertext ‖ tag).
pub(super) fn plausible_seal(sealed: &[u8]) -> bool {
    sealed.len() > TAG_LEN && sealed.len() <= MAX_SEAL_LEN + TAG_LEN
}

/// A per-seal key derived inside the token from the CMK object and the
/// salt (`CKM_AES_CBC_ENCRYPT_DATA`, IV 0: the 32 derived bytes are the CBC
/// encryption of the salt), a session object that can only encrypt or only
/// decrypt ([`seal_key_template`]).
fn derive_seal_key(
    s: &Session,
    base: ObjectHandle,
    salt: &[u8; 32],
    encrypt: bool,
) -> Result<ObjectHandle, CkError> {
    let params = AesCbcDeriveParams::new([0u8; 16], salt);
    s.derive_key(
        &Mechanism::AesCbcEncryptData(params),
        base,
        &seal_key_template(encrypt),
    )
}

/// [`ObjectSeal`] owned, to move into a blocking call.
pub(super) struct OwnedSeal {
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
