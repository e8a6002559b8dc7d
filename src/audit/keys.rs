//! The audit log's two keys, from one service secret.
//!
//! The secret (`audit`, 64 random bytes from the HSM) is generated when a
//! data directory is initialised and stored only wrapped by the HSM root key
//! ([`crate::store::WrappedSecret`]), so a root-key rotation re-wraps it with
//! the CMK versions. Bytes 0..32 are the Ed25519 seed of the checkpoint
//! signing key; bytes 32..64 the HMAC-SHA256 key of context digests.

use super::{AuditDigestKey, AuditError, CheckpointSigner};

/// Name of the service secret in the key store.
pub const AUDIT_SECRET_NAME: &str = "audit";
/// Its length in bytes.
pub const AUDIT_SECRET_LEN: usize = 64;

/// The checkpoint signer and the context-digest key. Secret; no `Clone`.
#[derive(Debug)]
pub struct AuditKeys {
    pub signer: CheckpointSigner,
    pub digest: AuditDigestKey,
}

impl AuditKeys {
    /// From the unwrapped service secret.
    pub fn from_secret(secret: &[u8]) -> Result<Self, AuditError> {
        if secret.len() != AUDIT_SECRET_LEN {
            return Err(AuditError::InvalidKey);
        }
        let (seed, mac) = secret.split_at(32);
        Ok(Self {
            signer: CheckpointSigner::from_seed(seed)?,
            digest: AuditDigestKey::new(mac).ok_or(AuditError::InvalidKey)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_keys_come_from_the_secret() {
        let a = AuditKeys::from_secret(&[1u8; 64]).unwrap();
        let b = AuditKeys::from_secret(&[1u8; 64]).unwrap();
        let mut other = [1u8; 64];
        other[40] = 2;
        let c = AuditKeys::from_secret(&other).unwrap();
        assert_eq!(a.signer.public_key(), b.signer.public_key());
        assert_eq!(a.signer.public_key(), c.signer.public_key());
        let ctx = crate::model::EncryptionContext::default();
        assert_eq!(a.digest.context_digest(&ctx), b.digest.context_digest(&ctx));
        assert_ne!(a.digest.context_digest(&ctx), c.digest.context_digest(&ctx));
        assert!(AuditKeys::from_secret(&[1u8; 63]).is_err());
    }
}
