//! The HSM seam: one small trait, [`Hsm`], that every backend implements.
//!
//! The HSM holds the root key, which never leaves it. coffre asks it to wrap
//! and unwrap CMK material and to produce random bytes. Session handling
//! (login, re-login after an HSM restart) is the backend's business.

pub mod conformance;
pub mod metered;
pub mod pkcs11;
pub mod sim;

use std::fmt;

use async_trait::async_trait;

use crate::secret::SecretBytes;

/// Material wrapped by the HSM, with the id of the root key that wrapped it.
#[derive(Clone, PartialEq, Eq)]
pub struct HsmWrapped {
    pub blob: Vec<u8>,
    pub root_key_id: u32,
}

impl fmt::Debug for HsmWrapped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HsmWrapped")
            .field("blob_len", &self.blob.len())
            .field("root_key_id", &self.root_key_id)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HsmError {
    /// The HSM cannot be reached or refuses service for now (outage, injected
    /// fault, timeout). Retrying later may succeed.
    #[error("HSM unavailable: {0}")]
    Unavailable(String),
    /// A wrapped blob failed authentication (wrong AAD, corrupted, or wrapped
    /// under a root key the HSM no longer holds).
    #[error("HSM could not authenticate the wrapped material")]
    AuthenticationFailed,
    /// The HSM lost its root keys (tamper response).
    #[error("HSM root key material is gone (tamper response)")]
    Tampered,
    /// Login refused (wrong PIN).
    #[error("HSM login refused: {0}")]
    LoginFailed(String),
    /// The HSM is not set up as coffre requires (no such module or token, a
    /// missing mechanism, no root key, a root key with unsafe attributes).
    /// Refused at start, with what to fix.
    #[error("HSM setup: {0}")]
    Setup(String),
    /// The request was malformed for this HSM (a bug in coffre).
    #[error("HSM rejected the request: {0}")]
    Rejected(String),
}

/// Where and how [`Hsm::seal_with_object`] seals: the key object's name, the
/// salt the HSM derives the per-seal key with, the GCM IV and AAD.
#[derive(Clone, Copy, Debug)]
pub struct ObjectSeal<'a> {
    pub object: &'a str,
    pub salt: &'a [u8; 32],
    pub iv: &'a [u8; 12],
    pub aad: &'a [u8],
}

/// Longest key-object name.
pub const MAX_OBJECT_NAME_LEN: usize = 128;
/// Largest plaintext [`Hsm::seal_with_object`] takes: a caller secret of
/// `Encrypt` (4096 bytes), or an XKS plaintext (4300).
pub const MAX_SEAL_LEN: usize = 4300;

fn no_key_objects() -> HsmError {
    HsmError::Rejected("this HSM backend does not hold CMK versions (protection level HSM)".into())
}

/// Facts about the HSM that may be shown to operators.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HsmInfo {
    pub backend: String,
    pub label: String,
    pub current_root_key_id: u32,
    pub root_key_ids: Vec<u32>,
}

#[async_trait]
pub trait Hsm: Send + Sync + fmt::Debug {
    /// `false` for simulators: the server refuses them outside dev mode
    /// unless the configuration explicitly allows it.
    fn is_secure(&self) -> bool;

    /// Public information; also a cheap liveness probe.
    async fn info(&self) -> Result<HsmInfo, HsmError>;

    /// `len` random bytes from the HSM's generator (1..=1024).
    async fn generate_random(&self, len: usize) -> Result<SecretBytes, HsmError>;

    /// Wraps `plaintext` under the current root key, binding `aad`.
    async fn wrap(&self, plaintext: &[u8], aad: &[u8]) -> Result<HsmWrapped, HsmError>;

    /// Unwraps a blob produced by [`Hsm::wrap`] with the same `aad`.
    async fn unwrap(&self, wrapped: &[u8], aad: &[u8]) -> Result<SecretBytes, HsmError>;

    /// Creates a new root key and makes it current; older root keys still
    /// unwrap. Returns the new root key's id.
    async fn rotate_root_key(&self) -> Result<u32, HsmError>;

    /// Destroys a root key that is not the current one. Whatever it wrapped
    /// can never be unwrapped again.
    async fn destroy_root_key(&self, root_key_id: u32) -> Result<(), HsmError>;

    // --- Protection level HSM: CMK versions as key objects in the HSM ---

    /// Whether this backend can keep CMK versions as its own non-extractable
    /// key objects (protection level `HSM`). The other methods below refuse
    /// with [`HsmError::Rejected`] when it cannot.
    fn supports_key_objects(&self) -> bool {
        false
    }

    /// Generates a non-extractable AES-256 key object named `name` (at most
    /// [`MAX_OBJECT_NAME_LEN`] bytes) inside the HSM. A name already taken
    /// is refused.
    async fn create_key_object(&self, name: &str) -> Result<(), HsmError> {
        let _ = name;
        Err(no_key_objects())
    }

    /// Seals `plaintext` (1..=[`MAX_SEAL_LEN`] bytes) inside the HSM: a
    /// per-seal key derived there from the object and `seal.salt`, then
    /// AES-256-GCM with `seal.iv` and `seal.aad`. Returns ciphertext ‖ tag.
    async fn seal_with_object(
        &self,
        seal: ObjectSeal<'_>,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        let _ = (seal, plaintext);
        Err(no_key_objects())
    }

    /// Opens what [`Hsm::seal_with_object`] sealed with the same parameters.
    /// Any mismatch, and an unknown object, is
    /// [`HsmError::AuthenticationFailed`].
    async fn open_with_object(
        &self,
        seal: ObjectSeal<'_>,
        sealed: &[u8],
    ) -> Result<SecretBytes, HsmError> {
        let _ = (seal, sealed);
        Err(no_key_objects())
    }

    /// Destroys a key object: what it sealed never opens again. Destroying
    /// an object that does not exist succeeds (so an interrupted
    /// destruction can be run again).
    async fn destroy_key_object(&self, name: &str) -> Result<(), HsmError> {
        let _ = name;
        Err(no_key_objects())
    }
}
