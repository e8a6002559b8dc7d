//! The signed checkpoint: its v1 encoding, the key that signs it, and the
//! PEM form of that key's public half.
//!
//! # Checkpoint encoding (v1)
//!
//! A checkpoint line is `{"checkpoint":{"seq":S,"head_hash":H,"time":T,"signature":B}}`
//! where `S` is the `seq` of the record just before it, `H` that record's
//! `hash`, `T` milliseconds since the Unix epoch, and `B` the standard base64
//! (padded) Ed25519 signature over the UTF-8 string
//!
//! ```text
//! coffre-audit-checkpoint/v1\n{S}\n{H}\n{T}
//! ```
//!
//! with `S` and `T` in decimal, no trailing newline.
//!
//! The public key travels as an Ed25519 SubjectPublicKeyInfo PEM
//! (`BEGIN PUBLIC KEY`, RFC 8410): [`public_key_to_pem`],
//! [`public_key_from_pem`].

use std::fmt;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::rand::SystemRandom;
use ring::signature::{self, Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};

use super::AuditError;
use crate::model::Timestamp;
use crate::secret::SecretBytes;
/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE {
/// SEQUENCE { OID 1.3.101.112 }, BIT STRING (0 unused bits) } before the
/// 32-byte key.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// A signed statement: the chain's head at `seq` was `head_hash`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub seq: u64,
    pub head_hash: String,
    pub time: Timestamp,
    /// Base64 Ed25519 signature over [`Checkpoint::signed_message`].
    pub signature: String,
}

/// The on-disk wrapper: `{"checkpoint": {...}}`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CheckpointLine {
    pub(crate) checkpoint: Checkpoint,
}

impl Checkpoint {
    /// The exact bytes signed (module docs).
    pub fn signed_message(seq: u64, head_hash: &str, time: Timestamp) -> String {
        format!("coffre-audit-checkpoint/v1\n{seq}\n{head_hash}\n{}", time.0)
    }

    /// Whether the signature verifies under `public_key`.
    pub fn signature_is_valid(&self, public_key: &[u8; 32]) -> bool {
        let Ok(sig) = BASE64.decode(&self.signature) else {
            return false;
        };
        let msg = Self::signed_message(self.seq, &self.head_hash, self.time);
        signature::UnparsedPublicKey::new(&signature::ED25519, public_key)
            .verify(msg.as_bytes(), &sig)
            .is_ok()
    }
}

/// An Ed25519 key held elsewhere (an HSM) that signs checkpoints.
pub trait ExternalSigner: Send + Sync + fmt::Debug {
    /// The 32-byte Ed25519 public key.
    fn public_key(&self) -> [u8; 32];
    /// An Ed25519 signature of `msg`, or why there is none (the HSM is
    /// unavailable, say). Bounded in time by the implementation.
    fn sign(&self, msg: &[u8]) -> Result<[u8; 64], String>;
}

/// The checkpoint signing key (Ed25519): in coffre's memory, or in an HSM.
/// Secret: no `Clone`, redacted `Debug`. The in-memory key's PKCS#8 form is
/// meant to be stored wrapped under the HSM root key. (ring does not zeroize
/// the key pair on drop; the PKCS#8 bytes we hand out are in a zeroizing
/// [`SecretBytes`].)
pub struct CheckpointSigner(SignerKind);

enum SignerKind {
    Local(Ed25519KeyPair),
    External(Arc<dyn ExternalSigner>),
}

impl CheckpointSigner {
    /// A new random key; returns the signer and its PKCS#8 (v2) document.
    pub fn generate() -> Result<(Self, SecretBytes), AuditError> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| AuditError::InvalidKey)?;
        let pkcs8 = SecretBytes::new(pkcs8.as_ref().to_vec());
        let signer = Self::from_pkcs8(pkcs8.expose())?;
        Ok((signer, pkcs8))
    }

    /// From a 32-byte Ed25519 seed (as kept, HSM-wrapped, in the key store).
    pub fn from_seed(seed: &[u8]) -> Result<Self, AuditError> {
        Ed25519KeyPair::from_seed_unchecked(seed)
            .map(|k| Self(SignerKind::Local(k)))
            .map_err(|_| AuditError::InvalidKey)
    }

    /// From a PKCS#8 v2 document, as produced by [`Self::generate`].
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, AuditError> {
        Ed25519KeyPair::from_pkcs8(pkcs8)
            .map(|k| Self(SignerKind::Local(k)))
            .map_err(|_| AuditError::InvalidKey)
    }

    /// A key held by an HSM.
    pub fn external(signer: Arc<dyn ExternalSigner>) -> Self {
        Self(SignerKind::External(signer))
    }

    /// Whether the key is held outside coffre's memory.
    pub fn is_external(&self) -> bool {
        matches!(self.0, SignerKind::External(_))
    }

    pub fn public_key(&self) -> [u8; 32] {
        match &self.0 {
            SignerKind::Local(k) => {
                let mut out = [0u8; 32];
                out.copy_from_slice(k.public_key().as_ref());
                out
            }
            SignerKind::External(s) => s.public_key(),
        }
    }

    /// The public key as a SubjectPublicKeyInfo PEM (`BEGIN PUBLIC KEY`).
    pub fn public_key_pem(&self) -> String {
        public_key_to_pem(&self.public_key())
    }

    /// Signs the chain head at `seq`. Only an external key can fail.
    pub fn checkpoint(
        &self,
        seq: u64,
        head_hash: &str,
        time: Timestamp,
    ) -> Result<Checkpoint, AuditError> {
        let msg = Checkpoint::signed_message(seq, head_hash, time);
        let signature = match &self.0 {
            SignerKind::Local(k) => BASE64.encode(k.sign(msg.as_bytes()).as_ref()),
            SignerKind::External(s) => {
                BASE64.encode(s.sign(msg.as_bytes()).map_err(AuditError::Signing)?)
            }
        };
        Ok(Checkpoint {
            seq,
            head_hash: head_hash.to_string(),
            time,
            signature,
        })
    }
}

impl fmt::Debug for CheckpointSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CheckpointSigner(<redacted>)")
    }
}

/// An Ed25519 public key as SubjectPublicKeyInfo PEM.
pub fn public_key_to_pem(key: &[u8; 32]) -> String {
    let mut der = ED25519_SPKI_PREFIX.to_vec();
    der.extend_from_slice(key);
    format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        BASE64.encode(der)
    )
}

/// The inverse of [`public_key_to_pem`]; `None` unless it is exactly an
/// Ed25519 SubjectPublicKeyInfo.
pub fn public_key_from_pem(pem: &str) -> Option<[u8; 32]> {
    let body: String = pem
        .trim()
        .strip_prefix("-----BEGIN PUBLIC KEY-----")?
        .strip_suffix("-----END PUBLIC KEY-----")?
        .split_whitespace()
        .collect();
    let der = BASE64.decode(body).ok()?;
    let key = der.strip_prefix(&ED25519_SPKI_PREFIX[..])?;
    key.try_into().ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::audit::record::GENESIS_HASH;

    pub(crate) fn test_signer() -> (CheckpointSigner, [u8; 32]) {
        let (signer, _pkcs8) = CheckpointSigner::generate().unwrap();
        let pk = signer.public_key();
        (signer, pk)
    }

    #[test]
    fn signer_is_redacted_and_pem_round_trips() {
        let (signer, pk) = test_signer();
        assert_eq!(format!("{signer:?}"), "CheckpointSigner(<redacted>)");
        let pem = signer.public_key_pem();
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA"));
        assert_eq!(public_key_from_pem(&pem), Some(pk));
        assert!(
            public_key_from_pem("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----")
                .is_none()
        );
        let cp = signer.checkpoint(7, GENESIS_HASH, Timestamp(5)).unwrap();
        assert!(cp.signature_is_valid(&pk));
        assert!(!cp.signature_is_valid(&[0u8; 32]));
    }
}
