//! The core of the XKS front (`crate::xks`): AWS KMS asking about a key,
//! encrypting and decrypting under it, and asking whether coffre can serve.
//!
//! # Who sees a key, and for what
//!
//! A key is visible to a credential only if the key's policy has a grant
//! naming the credential's principal; a key that does not exist and a key
//! without such a grant get the same [`Error::KeyNotFound`] (no existence
//! oracle). What the grant allows is the key's usage: `Encrypt` → ENCRYPT,
//! `Decrypt` → DECRYPT; an encrypt or decrypt the grant does not allow is
//! [`Error::KeyUsage`]. Then the policy decides as for gRPC
//! ([`super::policy`]): the justification (the front derives one from who
//! called AWS KMS) and the context rules, over the context the front builds
//! from AWS's request metadata. Last, the key's state: only an ENABLED key
//! encrypts or decrypts.
//!
//! # Ciphertext layout
//!
//! AWS KMS stores what Encrypt returns and hands it back to Decrypt. The
//! 20 bytes of `ciphertextMetadata` are coffre's:
//!
//! ```text
//! +--------+------------------+---------------------+
//! | format | version: u32be   | nonce: 15 bytes     |
//! +--------+------------------+---------------------+
//!   1: the CMK version's material in coffre (protection level SOFTWARE)
//!   2: the CMK version's key object in the HSM (protection level HSM)
//! ```
//!
//! Each encrypt draws a fresh nonce and IV (12 bytes). The AES-256-GCM key
//! is derived per call from the CMK version and the salt
//! [`crypto::xks_salt`]`(key, version, nonce)`: by HKDF in coffre (label
//! `coffre/xks/v1/encrypt`), or inside the HSM from the key object, as for a
//! wrapped data key of protection level HSM. No GCM key therefore comes
//! near its random-IV limit, however much AWS encrypts. The GCM AAD is
//! AWS's AAD and this metadata framed as the API specifies
//! ([`wire::gcm_aad`]), so the tag covers the metadata too.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Kms;
use super::datakeys::ensure_enabled;
use crate::authz::{Caller, Operation};
use crate::crypto::{self, SealError};
use crate::envelope::{IV_LEN, TAG_LEN};
use crate::error::{Error, Result};
use crate::hsm::{HsmError, ObjectSeal};
use crate::model::{
    AccessReason, DataKeyOperation, EncryptionContext, KeyId, KeyRecord, KeyRef, ProtectionLevel,
};
use crate::secret::SecretBytes;
use crate::xks::wire;

/// The largest plaintext an XKS encrypt takes: what the API requires a
/// proxy to support (a longer one is `UnsupportedOperationException`).
pub const MAX_PLAINTEXT_LEN: usize = 4300;
/// The length of coffre's `ciphertextMetadata` (the module docs).
pub const METADATA_LEN: usize = 20;
const NONCE_LEN: usize = 15;
const FORMAT_SOFTWARE: u8 = 1;
const FORMAT_HSM: u8 = 2;

/// What a credential may do with a key: its grant's operations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XksUsage {
    pub encrypt: bool,
    pub decrypt: bool,
}

/// GetKeyMetadata's answer.
#[derive(Debug)]
pub struct XksKeyMetadata {
    pub key_id: KeyId,
    pub usage: XksUsage,
    /// Only an ENABLED key is `ENABLED`.
    pub enabled: bool,
}

/// An XKS encryption, in the fields the API carries.
#[derive(Debug)]
pub struct XksSealed {
    pub ciphertext: Vec<u8>,
    pub iv: [u8; IV_LEN],
    pub tag: [u8; TAG_LEN],
    pub metadata: [u8; METADATA_LEN],
    pub key_id: KeyId,
    pub key_version: u32,
}

/// What a Decrypt presents, decoded but not checked.
#[derive(Debug)]
pub struct XksCiphertext<'a> {
    pub ciphertext: &'a [u8],
    pub iv: &'a [u8],
    pub tag: &'a [u8; TAG_LEN],
    pub metadata: &'a [u8],
    pub aad: &'a [u8],
}

#[derive(Debug)]
pub struct XksOpened {
    pub plaintext: SecretBytes,
    pub key_id: KeyId,
    pub key_version: u32,
}

/// How a request uses the key: the policy's inputs, built by the front.
#[derive(Debug)]
pub struct XksUse<'a> {
    pub context: &'a EncryptionContext,
    pub justification: AccessReason,
    /// Encrypt with a `ciphertextDataIntegrityValue`: the ciphertext is
    /// decrypted again before it is returned (the API's Appendix C), which
    /// needs the DECRYPT usage too.
    pub verify: bool,
}

/// The health of what serves XKS requests, from best to worst.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum XksHealth {
    /// The HSM answered a wrap and unwrap in time, the store a read.
    Active,
    /// The HSM answered, but the store did not (keys in the cache still
    /// serve), or the HSM took more than half the deadline.
    Degraded,
    /// The HSM did not answer in time, or this node refuses data keys
    /// (strict mode, not fresh).
    Unavailable,
}

impl XksHealth {
    pub fn as_str(self) -> &'static str {
        match self {
            XksHealth::Active => "ACTIVE",
            XksHealth::Degraded => "DEGRADED",
            XksHealth::Unavailable => "UNAVAILABLE",
        }
    }
}

/// GetHealthStatus' answer.
#[derive(Debug)]
pub struct XksHealthReport {
    pub status: XksHealth,
    /// The HSM backend and token (when it answered): the `ekmFleetDetails`.
    pub hsm_backend: String,
    pub hsm_label: String,
}

/// The test value the health check wraps and unwraps under the HSM's root
/// key (never a customer key, as the API asks).
const HEALTH_AAD: &[u8] = b"coffre/xks/v1/health";

fn not_found(named: &str) -> Error {
    Error::KeyNotFound(named.to_string())
}

/// The fields of coffre's `ciphertextMetadata` (the module docs).
fn parse_metadata(metadata: &[u8]) -> Option<(u8, u32, &[u8])> {
    if metadata.len() != METADATA_LEN {
        return None;
    }
    let (format, rest) = metadata.split_first()?;
    let (version, nonce) = rest.split_at_checked(4)?;
    let version = u32::from_be_bytes(version.try_into().ok()?);
    matches!(*format, FORMAT_SOFTWARE | FORMAT_HSM).then_some((*format, version, nonce))
}

fn sealing_failed(e: SealError) -> Error {
    Error::Internal(format!("XKS encryption failed: {e}"))
}

impl Kms {
    /// GetKeyMetadata: the key's usage for this caller and whether it is
    /// enabled. A disabled, pending-deletion or destroyed key answers
    /// (`enabled: false`): AWS KMS shows it and refuses to use it.
    pub async fn xks_key_metadata(&self, caller: &Caller, key: &KeyRef) -> Result<XksKeyMetadata> {
        self.authorize(caller, Operation::XksGetKeyMetadata)?;
        let (record, usage) = self.xks_visible(caller, key).await?;
        Ok(XksKeyMetadata {
            key_id: record.id,
            usage,
            enabled: record.state == crate::model::KeyState::Enabled,
        })
    }

    /// Encrypt: `plaintext` (1 to [`MAX_PLAINTEXT_LEN`] bytes) under the
    /// key's primary version, `aad` (at most [`wire::MAX_AAD_LEN`] bytes)
    /// bound with the metadata.
    pub async fn xks_encrypt(
        &self,
        caller: &Caller,
        key: &KeyRef,
        usage: &XksUse<'_>,
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<XksSealed> {
        let op = Operation::XksEncrypt;
        self.authorize(caller, op)?;
        if plaintext.is_empty() {
            return Err(Error::InvalidArgument(
                "plaintext must not be empty".to_string(),
            ));
        }
        if plaintext.len() > MAX_PLAINTEXT_LEN {
            return Err(Error::Unsupported(format!(
                "plaintext is {} bytes; coffre encrypts at most {MAX_PLAINTEXT_LEN}",
                plaintext.len()
            )));
        }
        let (record, allowed) = self.xks_usable(caller, key, op, usage).await?;
        if usage.verify && !allowed.decrypt {
            return Err(Error::KeyUsage(format!(
                "a ciphertextDataIntegrityValue is vouched for by decrypting, and the grant of \
                 key {} to {} does not allow it to decrypt",
                record.id, caller.principal
            )));
        }
        let (id, version) = (record.id, record.primary_version);
        let hsm = record.protection_level == ProtectionLevel::Hsm;
        let mut random = [0u8; NONCE_LEN + IV_LEN];
        self.rng.fill(&mut random).map_err(sealing_failed)?;
        let (nonce, iv) = random.split_at(NONCE_LEN);
        let iv: [u8; IV_LEN] = iv.try_into().map_err(|_| sealing_failed(SealError::Aead))?;
        let mut metadata = [0u8; METADATA_LEN];
        let (format_field, rest) = metadata.split_at_mut(1);
        let (version_field, nonce_field) = rest.split_at_mut(4);
        format_field.copy_from_slice(&[if hsm { FORMAT_HSM } else { FORMAT_SOFTWARE }]);
        version_field.copy_from_slice(&version.to_be_bytes());
        nonce_field.copy_from_slice(nonce);
        let framed =
            wire::gcm_aad(aad, &metadata).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let salt = crypto::xks_salt(id, version, nonce);
        let (ciphertext, tag) = if hsm {
            let name = self.object_name(id, version).await?;
            self.ensure_durable(id, version).await?;
            let mut sealed = self
                .hsm
                .seal_with_object(
                    ObjectSeal {
                        object: &name,
                        salt: &salt,
                        iv: &iv,
                        aad: &framed,
                    },
                    plaintext,
                )
                .await
                .inspect_err(|e| self.forget_materials_if_tampered(e))?;
            let at = sealed
                .len()
                .checked_sub(TAG_LEN)
                .ok_or_else(|| Error::Internal("the HSM returned no tag".to_string()))?;
            let tag: [u8; TAG_LEN] = sealed
                .get(at..)
                .and_then(|t| t.try_into().ok())
                .ok_or_else(|| Error::Internal("the HSM returned no tag".to_string()))?;
            sealed.truncate(at);
            (sealed, tag)
        } else {
            let material = self.material(id, version).await?;
            self.ensure_durable(id, version).await?;
            crypto::xks_seal(&material, id, version, &salt, &iv, &framed, plaintext)
                .map_err(sealing_failed)?
        };
        let sealed = XksSealed {
            ciphertext,
            iv,
            tag,
            metadata,
            key_id: id,
            key_version: version,
        };
        if usage.verify {
            let opened = self
                .xks_open(
                    &record,
                    version,
                    nonce,
                    &sealed.iv,
                    &framed,
                    &sealed.ciphertext,
                    &sealed.tag,
                )
                .await?;
            if !bool::from(subtle::ConstantTimeEq::ct_eq(opened.expose(), plaintext)) {
                return Err(Error::Internal(
                    "an XKS ciphertext did not decrypt to its plaintext".to_string(),
                ));
            }
        }
        Ok(sealed)
    }

    /// Decrypt: what [`Kms::xks_encrypt`] sealed, if every field and the
    /// AAD are as they were. Any mismatch is [`Error::InvalidCiphertext`].
    pub async fn xks_decrypt(
        &self,
        caller: &Caller,
        key: &KeyRef,
        usage: &XksUse<'_>,
        sealed: &XksCiphertext<'_>,
    ) -> Result<XksOpened> {
        let op = Operation::XksDecrypt;
        self.authorize(caller, op)?;
        let (record, _) = self.xks_usable(caller, key, op, usage).await?;
        let Some((format, version, nonce)) = parse_metadata(sealed.metadata) else {
            tracing::debug!("XKS ciphertext refused: not coffre's ciphertextMetadata");
            return Err(Error::InvalidCiphertext);
        };
        let Ok(iv) = <[u8; IV_LEN]>::try_from(sealed.iv) else {
            return Err(Error::InvalidCiphertext);
        };
        let id = record.id;
        if version == 0 || version > record.primary_version {
            return Err(Error::InvalidCiphertext);
        }
        if version < record.min_decryption_version {
            return Err(Error::FailedPrecondition(format!(
                "version {version} of key {id} is retired (minimum decryption version {})",
                record.min_decryption_version
            )));
        }
        let hsm = record.protection_level == ProtectionLevel::Hsm;
        if (format == FORMAT_HSM) != hsm {
            return Err(Error::InvalidCiphertext);
        }
        if sealed.ciphertext.is_empty() || sealed.ciphertext.len() > MAX_PLAINTEXT_LEN {
            return Err(Error::InvalidCiphertext);
        }
        let framed = wire::gcm_aad(sealed.aad, sealed.metadata)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let plaintext = self
            .xks_open(
                &record,
                version,
                nonce,
                &iv,
                &framed,
                sealed.ciphertext,
                sealed.tag,
            )
            .await?;
        Ok(XksOpened {
            plaintext,
            key_id: id,
            key_version: version,
        })
    }

    /// GetHealthStatus: a deep check within `deadline` (a wrap and unwrap
    /// of a test value under the HSM's root key, a store read, this node's
    /// freshness).
    pub async fn xks_health(&self, caller: &Caller, deadline: Duration) -> Result<XksHealthReport> {
        self.authorize(caller, Operation::XksGetHealthStatus)?;
        let started = Instant::now();
        let hsm_probe = async {
            let info = self.hsm.info().await?;
            let wrapped = self.hsm.wrap(&[0u8; 32], HEALTH_AAD).await?;
            self.hsm.unwrap(&wrapped.blob, HEALTH_AAD).await?;
            Ok::<_, HsmError>(info)
        };
        let probed = tokio::time::timeout(deadline, async {
            tokio::join!(hsm_probe, self.check_store())
        })
        .await;
        let took = started.elapsed();
        let (hsm, store) = match probed {
            Ok((hsm, store)) => (hsm.map_err(|e| e.to_string()), store.is_ok()),
            Err(_) => (Err("no answer within the deadline".to_string()), false),
        };
        let fresh = self.check_fresh_for_readiness().is_ok();
        let status = match &hsm {
            Err(e) => {
                tracing::warn!(error = %e, "XKS health: the HSM did not answer");
                XksHealth::Unavailable
            }
            Ok(_) if !fresh => XksHealth::Unavailable,
            Ok(_) if !store || took > deadline / 2 => XksHealth::Degraded,
            Ok(_) => XksHealth::Active,
        };
        let (hsm_backend, hsm_label) = match hsm {
            Ok(info) => (info.backend, info.label),
            Err(_) => ("hsm".to_string(), "unreachable".to_string()),
        };
        Ok(XksHealthReport {
            status,
            hsm_backend,
            hsm_label,
        })
    }

    /// AES-256-GCM decryption under the version's derived key, in the HSM
    /// or here; any mismatch is [`Error::InvalidCiphertext`].
    #[allow(clippy::too_many_arguments)]
    async fn xks_open(
        &self,
        record: &KeyRecord,
        version: u32,
        nonce: &[u8],
        iv: &[u8; IV_LEN],
        framed: &[u8],
        ciphertext: &[u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<SecretBytes> {
        let id = record.id;
        let salt = crypto::xks_salt(id, version, nonce);
        if record.protection_level == ProtectionLevel::Hsm {
            let mut joined = Vec::with_capacity(ciphertext.len() + TAG_LEN);
            joined.extend_from_slice(ciphertext);
            joined.extend_from_slice(tag);
            let name = self.object_name(id, version).await?;
            return match self
                .hsm
                .open_with_object(
                    ObjectSeal {
                        object: &name,
                        salt: &salt,
                        iv,
                        aad: framed,
                    },
                    &joined,
                )
                .await
            {
                Ok(p) => Ok(p),
                Err(HsmError::AuthenticationFailed) => Err(Error::InvalidCiphertext),
                Err(e) => {
                    self.forget_materials_if_tampered(&e);
                    Err(e.into())
                }
            };
        }
        let material = self.material(id, version).await?;
        crypto::xks_open(&material, id, version, &salt, iv, framed, ciphertext, tag)
            .map_err(|_| Error::InvalidCiphertext)
    }

    /// The key, if a grant names the caller, with the grant's usage.
    async fn xks_visible(
        &self,
        caller: &Caller,
        key: &KeyRef,
    ) -> Result<(Arc<KeyRecord>, XksUsage)> {
        // Before any key is looked at, as for gRPC.
        self.check_fresh()?;
        let named = key.to_string();
        let record = match self.resolve(key).await {
            Ok(record) => record,
            Err(Error::KeyNotFound(_)) => return Err(not_found(&named)),
            Err(e) => return Err(e),
        };
        let mut usage = XksUsage::default();
        let mut granted = false;
        for grant in record
            .policy
            .grants
            .iter()
            .filter(|g| g.principal == caller.principal)
        {
            granted = true;
            usage.encrypt |= grant.operations.contains(&DataKeyOperation::Encrypt);
            usage.decrypt |= grant.operations.contains(&DataKeyOperation::Decrypt);
        }
        if !granted {
            tracing::warn!(principal = %caller.principal, key = %named, "XKS: no grant (or no such key)");
            return Err(not_found(&named));
        }
        Ok((record, usage))
    }

    /// The key, if the caller may use it for `op` now: visible, its usage
    /// allows `op`, the policy admits it, and it is enabled.
    async fn xks_usable(
        &self,
        caller: &Caller,
        key: &KeyRef,
        op: Operation,
        usage: &XksUse<'_>,
    ) -> Result<(Arc<KeyRecord>, XksUsage)> {
        let (record, allowed) = self.xks_visible(caller, key).await?;
        let (permitted, verb) = match op {
            Operation::XksEncrypt => (allowed.encrypt, "encrypt"),
            _ => (allowed.decrypt, "decrypt"),
        };
        if !permitted {
            tracing::warn!(principal = %caller.principal, key_id = %record.id, operation = op.name(), "XKS: the grant does not allow this use");
            return Err(Error::KeyUsage(format!(
                "the grant of key {} to {} does not allow it to {verb}",
                record.id, caller.principal
            )));
        }
        self.check_policy(caller, &record, key, op, usage.justification, usage.context)?;
        ensure_enabled(caller, &record, op)?;
        Ok((record, allowed))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn metadata_parses_only_coffre_layouts() {
        let mut md = [0u8; METADATA_LEN];
        md[0] = FORMAT_SOFTWARE;
        md[1..5].copy_from_slice(&7u32.to_be_bytes());
        md[5..].copy_from_slice(&[9u8; NONCE_LEN]);
        assert_eq!(
            parse_metadata(&md),
            Some((FORMAT_SOFTWARE, 7, &[9u8; NONCE_LEN][..]))
        );
        md[0] = FORMAT_HSM;
        assert_eq!(parse_metadata(&md).map(|m| m.0), Some(FORMAT_HSM));
        md[0] = 3;
        assert_eq!(parse_metadata(&md), None);
        md[0] = FORMAT_SOFTWARE;
        assert_eq!(parse_metadata(&md[..19]), None);
        assert_eq!(parse_metadata(b""), None);
    }
}
