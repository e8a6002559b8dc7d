//! Data-key operations: generate, encrypt, decrypt, re-encrypt.

use std::sync::Arc;

use super::Kms;
use super::policy::no_access;
use crate::authz::{Caller, Operation};
use crate::crypto::{self, ContextDigest, SealError};
use crate::envelope::{self, Header, MAX_CIPHERTEXT_LEN};
use crate::error::{Error, Result};
use crate::hsm::{HsmError, ObjectSeal};
use crate::model::{
    AccessReason, EncryptionContext, KeyId, KeyRecord, KeyRef, KeyState, ProtectionLevel,
};
use crate::secret::SecretBytes;

pub const MIN_DATA_KEY_BYTES: usize = 16;
pub const MAX_DATA_KEY_BYTES: usize = 64;
pub const DEFAULT_DATA_KEY_BYTES: usize = 32;
/// The most items one batch request may carry.
pub const MAX_BATCH_ITEMS: usize = 1000;

/// A new data key: `plaintext` is `None` for GenerateDataKeyWithoutPlaintext.
#[derive(Debug)]
pub struct DataKeyOutput {
    pub plaintext: Option<SecretBytes>,
    pub ciphertext_blob: Vec<u8>,
    pub key_id: KeyId,
    pub key_version: u32,
}

/// Data keys made in one batch, all under one key version and context.
#[derive(Debug)]
pub struct BatchDataKeys {
    pub key_id: KeyId,
    pub key_version: u32,
    /// One per requested key; an item fails alone (the random generator
    /// or the cipher failing), the others stand.
    pub items: Vec<Result<DataKeyItem>>,
}

#[derive(Debug)]
pub struct DataKeyItem {
    pub plaintext: Option<SecretBytes>,
    pub ciphertext_blob: Vec<u8>,
}

/// One blob of a batch decrypt, with the context it was made with.
#[derive(Debug)]
pub struct DecryptItem<'a> {
    pub blob: &'a [u8],
    pub context: &'a EncryptionContext,
    pub expected_key: Option<&'a KeyRef>,
}

#[derive(Debug)]
pub struct DecryptOutput {
    pub plaintext: SecretBytes,
    pub key_id: KeyId,
    pub key_version: u32,
}

#[derive(Debug)]
pub struct ReEncryptOutput {
    pub ciphertext_blob: Vec<u8>,
    pub source_key_id: KeyId,
    pub source_key_version: u32,
    pub key_id: KeyId,
    pub key_version: u32,
}

impl Kms {
    /// `number_of_bytes`: 16 to 64 (callers map "unset" to 32).
    pub async fn generate_data_key(
        &self,
        caller: &Caller,
        key: &KeyRef,
        context: &EncryptionContext,
        justification: AccessReason,
        number_of_bytes: usize,
        with_plaintext: bool,
    ) -> Result<DataKeyOutput> {
        let op = if with_plaintext {
            Operation::GenerateDataKey
        } else {
            Operation::GenerateDataKeyWithoutPlaintext
        };
        self.authorize(caller, op)?;
        if !(MIN_DATA_KEY_BYTES..=MAX_DATA_KEY_BYTES).contains(&number_of_bytes) {
            return Err(Error::InvalidArgument(format!(
                "number_of_bytes must be {MIN_DATA_KEY_BYTES} to {MAX_DATA_KEY_BYTES}, got {number_of_bytes}"
            )));
        }
        let record = self
            .usable_key(caller, key, op, justification, context)
            .await?;
        let mut data_key = SecretBytes::zeroed(number_of_bytes);
        self.rng.fill(data_key.expose_mut()).map_err(seal_error)?;
        let blob = self
            .seal(&record, &crypto::context_digest(context), data_key.expose())
            .await?;
        Ok(DataKeyOutput {
            plaintext: with_plaintext.then_some(data_key),
            ciphertext_blob: blob,
            key_id: record.id,
            key_version: record.primary_version,
        })
    }

    /// `count` (1 to 1000) data keys under one key version and context,
    /// with one authorization and one policy decision for all of them.
    #[allow(clippy::too_many_arguments)]
    pub async fn generate_data_keys(
        &self,
        caller: &Caller,
        key: &KeyRef,
        context: &EncryptionContext,
        justification: AccessReason,
        number_of_bytes: usize,
        count: usize,
        with_plaintext: bool,
    ) -> Result<BatchDataKeys> {
        self.authorize(caller, Operation::BatchGenerateDataKey)?;
        if !(MIN_DATA_KEY_BYTES..=MAX_DATA_KEY_BYTES).contains(&number_of_bytes) {
            return Err(Error::InvalidArgument(format!(
                "number_of_bytes must be {MIN_DATA_KEY_BYTES} to {MAX_DATA_KEY_BYTES}, got {number_of_bytes}"
            )));
        }
        if !(1..=MAX_BATCH_ITEMS).contains(&count) {
            return Err(Error::InvalidArgument(format!(
                "count must be 1 to {MAX_BATCH_ITEMS}, got {count}"
            )));
        }
        // The key's policy decides as for the single-key form.
        let op = if with_plaintext {
            Operation::GenerateDataKey
        } else {
            Operation::GenerateDataKeyWithoutPlaintext
        };
        let record = self
            .usable_key(caller, key, op, justification, context)
            .await?;
        let version = record.primary_version;
        let digest = crypto::context_digest(context);
        if record.protection_level == ProtectionLevel::Hsm {
            // Every wrap inside the HSM: one call per data key.
            let mut items = Vec::with_capacity(count);
            for _ in 0..count {
                let mut data_key = SecretBytes::zeroed(number_of_bytes);
                let item = match self.rng.fill(data_key.expose_mut()) {
                    Err(e) => Err(seal_error(e)),
                    Ok(()) => self
                        .seal(&record, &digest, data_key.expose())
                        .await
                        .map(|blob| DataKeyItem {
                            plaintext: with_plaintext.then_some(data_key),
                            ciphertext_blob: blob,
                        }),
                };
                // An HSM that is down fails the rest at once, rather than
                // one timeout per item.
                let hsm_down = matches!(
                    &item,
                    Err(Error::Hsm(HsmError::Unavailable(_) | HsmError::Tampered))
                );
                items.push(item);
                if hsm_down {
                    while items.len() < count {
                        items.push(Err(Error::Hsm(HsmError::Unavailable(
                            "not tried: the HSM failed an earlier item of the batch".into(),
                        ))));
                    }
                    break;
                }
            }
            return Ok(BatchDataKeys {
                key_id: record.id,
                key_version: version,
                items,
            });
        }
        let material = self.material(record.id, version).await?;
        self.ensure_durable(record.id, version).await?;
        let items = (0..count)
            .map(|_| {
                let mut data_key = SecretBytes::zeroed(number_of_bytes);
                self.rng.fill(data_key.expose_mut()).map_err(seal_error)?;
                let blob = crypto::seal(
                    &self.rng,
                    &material,
                    record.id,
                    version,
                    &digest,
                    data_key.expose(),
                )
                .map_err(seal_error)?;
                Ok(DataKeyItem {
                    plaintext: with_plaintext.then_some(data_key),
                    ciphertext_blob: blob,
                })
            })
            .collect();
        Ok(BatchDataKeys {
            key_id: record.id,
            key_version: version,
            items,
        })
    }

    /// Wraps a caller secret of 1 to 4096 bytes.
    pub async fn encrypt(
        &self,
        caller: &Caller,
        key: &KeyRef,
        plaintext: &[u8],
        context: &EncryptionContext,
        justification: AccessReason,
    ) -> Result<DataKeyOutput> {
        self.authorize(caller, Operation::Encrypt)?;
        if plaintext.is_empty() || plaintext.len() > MAX_CIPHERTEXT_LEN {
            return Err(Error::InvalidArgument(format!(
                "plaintext must be 1 to {MAX_CIPHERTEXT_LEN} bytes, got {}",
                plaintext.len()
            )));
        }
        let record = self
            .usable_key(caller, key, Operation::Encrypt, justification, context)
            .await?;
        let blob = self
            .seal(&record, &crypto::context_digest(context), plaintext)
            .await?;
        Ok(DataKeyOutput {
            plaintext: None,
            ciphertext_blob: blob,
            key_id: record.id,
            key_version: record.primary_version,
        })
    }

    pub async fn decrypt(
        &self,
        caller: &Caller,
        blob: &[u8],
        context: &EncryptionContext,
        justification: AccessReason,
        expected_key: Option<&KeyRef>,
    ) -> Result<DecryptOutput> {
        self.authorize(caller, Operation::Decrypt)?;
        self.open(
            caller,
            blob,
            context,
            justification,
            expected_key,
            Operation::Decrypt,
        )
        .await
    }

    /// Up to 1000 blobs, each decided and opened as `decrypt` would: one
    /// result per item, in order. Only a caller without the role, or a
    /// batch of the wrong size, fails the whole request.
    ///
    /// The first item that finds the HSM down (unavailable or tampered)
    /// fails the rest of the batch at once with `UNAVAILABLE`, untried,
    /// rather than one HSM timeout per item.
    pub async fn decrypt_batch(
        &self,
        caller: &Caller,
        items: &[DecryptItem<'_>],
        justification: AccessReason,
    ) -> Result<Vec<Result<DecryptOutput>>> {
        self.authorize(caller, Operation::BatchDecrypt)?;
        if !(1..=MAX_BATCH_ITEMS).contains(&items.len()) {
            return Err(Error::InvalidArgument(format!(
                "a batch holds 1 to {MAX_BATCH_ITEMS} items, got {}",
                items.len()
            )));
        }
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let opened = self
                .open(
                    caller,
                    item.blob,
                    item.context,
                    justification,
                    item.expected_key,
                    Operation::Decrypt,
                )
                .await;
            let hsm_down = matches!(
                &opened,
                Err(Error::Hsm(HsmError::Unavailable(_) | HsmError::Tampered))
            );
            out.push(opened);
            if hsm_down {
                while out.len() < items.len() {
                    out.push(Err(Error::Hsm(HsmError::Unavailable(
                        "not tried: the HSM failed an earlier item of the batch".into(),
                    ))));
                }
                break;
            }
        }
        Ok(out)
    }

    /// Unwraps `blob` and wraps its plaintext again under `destination`
    /// (default: the blob's own key, at its primary version), with
    /// `destination_context` (default: the source context). The plaintext
    /// never leaves the server.
    #[allow(clippy::too_many_arguments)]
    pub async fn re_encrypt(
        &self,
        caller: &Caller,
        blob: &[u8],
        source_context: &EncryptionContext,
        expected_source: Option<&KeyRef>,
        destination: Option<&KeyRef>,
        destination_context: Option<&EncryptionContext>,
        justification: AccessReason,
    ) -> Result<ReEncryptOutput> {
        self.authorize(caller, Operation::ReEncrypt)?;
        // Every decision before the unwrap (invariant 3): the source blob's
        // key admits ReEncrypt, the destination key admits ReEncrypt, and a
        // move to another key needs Decrypt on the source too. A refused
        // request costs no HSM call and touches no CMK material.
        let openable = self
            .openable(
                caller,
                blob,
                source_context,
                justification,
                expected_source,
                Operation::ReEncrypt,
            )
            .await?;
        let source_id = openable.record.id;
        let destination = destination.cloned().unwrap_or(KeyRef::Id(source_id));
        let destination_context = destination_context.unwrap_or(source_context);
        let record = self
            .usable_key(
                caller,
                &destination,
                Operation::ReEncrypt,
                justification,
                destination_context,
            )
            .await?;
        if record.id != source_id {
            // Moving a blob to another key lets the caller read it there: it
            // needs the right to decrypt under the source key too, or a
            // ReEncrypt grant would work as a Decrypt grant.
            self.check_policy(
                caller,
                &openable.record,
                &source_id,
                Operation::Decrypt,
                justification,
                source_context,
            )?;
        }
        let opened = self.unwrap_blob(&openable, source_context).await?;
        let digest = crypto::context_digest(destination_context);
        let new_blob = self
            .seal(&record, &digest, opened.plaintext.expose())
            .await?;
        Ok(ReEncryptOutput {
            ciphertext_blob: new_blob,
            source_key_id: opened.key_id,
            source_key_version: opened.key_version,
            key_id: record.id,
            key_version: record.primary_version,
        })
    }

    /// The key, if the caller may use it for `op` now (see `policy.rs`).
    async fn usable_key(
        &self,
        caller: &Caller,
        key: &KeyRef,
        op: Operation,
        justification: AccessReason,
        context: &EncryptionContext,
    ) -> Result<Arc<KeyRecord>> {
        let record = self
            .permitted_key(caller, key, op, justification, context)
            .await?;
        ensure_enabled(caller, &record, op)?;
        Ok(record)
    }

    /// The key the caller named, if its policy admits this use; a key that
    /// does not exist gets the same answer as one it may not use.
    async fn permitted_key(
        &self,
        caller: &Caller,
        key: &KeyRef,
        op: Operation,
        justification: AccessReason,
        context: &EncryptionContext,
    ) -> Result<Arc<KeyRecord>> {
        // Before any key is looked at: a node that may have missed other
        // nodes' changes serves none (refuses all alike, leaking nothing).
        self.check_fresh()?;
        let record = match self.resolve(key).await {
            Ok(record) => record,
            Err(Error::KeyNotFound(_)) => return Err(no_access(key)),
            Err(e) => return Err(e),
        };
        self.check_policy(caller, &record, key, op, justification, context)?;
        Ok(record)
    }

    async fn seal(
        &self,
        record: &KeyRecord,
        digest: &ContextDigest,
        plaintext: &[u8],
    ) -> Result<Vec<u8>> {
        let version = record.primary_version;
        if record.protection_level == ProtectionLevel::Hsm {
            return self
                .seal_in_hsm(record.id, version, digest, plaintext)
                .await;
        }
        let material = self.material(record.id, version).await?;
        self.ensure_durable(record.id, version).await?;
        crypto::seal(&self.rng, &material, record.id, version, digest, plaintext)
            .map_err(seal_error)
    }

    /// The HSM object of a version of protection level HSM, as its record
    /// names it: cached (a version's object never changes), else read from
    /// the store once.
    pub(super) async fn object_name(&self, id: KeyId, version: u32) -> Result<Arc<str>> {
        if let Some(name) = self.objects.get(&(id, version)) {
            return Ok(name);
        }
        let mark = self.version_mark();
        let record =
            self.store.get_version(id, version).await?.ok_or_else(|| {
                Error::Internal(format!("key {id} has no version {version} stored"))
            })?;
        let name: Arc<str> = record
            .hsm_object
            .ok_or_else(|| {
                Error::Internal(format!(
                    "version {version} of key {id} (protection level HSM) names no HSM object"
                ))
            })?
            .into();
        self.note_version(id, version, mark);
        self.objects.insert((id, version), Arc::clone(&name));
        Ok(name)
    }

    /// Suite 2: the same header and AAD as suite 1, sealed by the HSM under
    /// the version's key object.
    async fn seal_in_hsm(
        &self,
        id: KeyId,
        version: u32,
        digest: &ContextDigest,
        plaintext: &[u8],
    ) -> Result<Vec<u8>> {
        if plaintext.is_empty() || plaintext.len() > MAX_CIPHERTEXT_LEN {
            return Err(seal_error(SealError::PlaintextLength(plaintext.len())));
        }
        let mut random = [0u8; envelope::SALT_LEN + envelope::IV_LEN];
        self.rng.fill(&mut random).map_err(seal_error)?;
        let (salt, iv) = random.split_at(envelope::SALT_LEN);
        let header = Header {
            suite: envelope::SUITE_HSM_AES256GCM,
            key_id: id,
            key_version: version,
            salt: salt.try_into().map_err(|_| seal_error(SealError::Aead))?,
            iv: iv.try_into().map_err(|_| seal_error(SealError::Aead))?,
        };
        let header_bytes = header.to_bytes();
        let aad = crypto::blob_aad(&header_bytes, digest);
        let name = self.object_name(id, version).await?;
        self.ensure_durable(id, version).await?;
        let sealed = self
            .hsm
            .seal_with_object(
                ObjectSeal {
                    object: &name,
                    salt: &header.salt,
                    iv: &header.iv,
                    aad: &aad,
                },
                plaintext,
            )
            .await
            .inspect_err(|e| self.forget_materials_if_tampered(e))?;
        let mut blob = Vec::with_capacity(header_bytes.len() + sealed.len());
        blob.extend_from_slice(&header_bytes);
        blob.extend_from_slice(&sealed);
        Ok(blob)
    }

    async fn open(
        &self,
        caller: &Caller,
        blob: &[u8],
        context: &EncryptionContext,
        justification: AccessReason,
        expected_key: Option<&KeyRef>,
        op: Operation,
    ) -> Result<DecryptOutput> {
        let openable = self
            .openable(caller, blob, context, justification, expected_key, op)
            .await?;
        self.unwrap_blob(&openable, context).await
    }

    /// Everything `open` decides before it unwraps: the blob parses, its key
    /// exists and admits `op` for this caller (policy, state), the version
    /// is live and the suite matches the key's protection level. No HSM
    /// call and no CMK material yet.
    async fn openable<'b>(
        &self,
        caller: &Caller,
        blob: &'b [u8],
        context: &EncryptionContext,
        justification: AccessReason,
        expected_key: Option<&KeyRef>,
        op: Operation,
    ) -> Result<Openable<'b>> {
        self.check_fresh()?;
        let parsed = envelope::parse(blob).map_err(|e| {
            tracing::debug!(reason = %e, "ciphertext blob refused");
            Error::InvalidCiphertext
        })?;
        let id = parsed.header.key_id;
        let version = parsed.header.key_version;
        if let Some(expected) = expected_key {
            let expected = self
                .permitted_key(caller, expected, op, justification, context)
                .await?;
            if expected.id != id {
                tracing::debug!(blob_key = %id, expected = %expected.id, "blob belongs to another key");
                return Err(Error::InvalidCiphertext);
            }
        }
        // A blob naming a key this server does not know gets the same answer
        // as a key the caller may not use.
        let record = self.record(id).await?.ok_or_else(|| no_access(&id))?;
        self.check_policy(caller, &record, &id, op, justification, context)?;
        ensure_enabled(caller, &record, op)?;
        if version == 0 || version > record.primary_version {
            return Err(Error::InvalidCiphertext);
        }
        if version < record.min_decryption_version {
            return Err(Error::FailedPrecondition(format!(
                "version {version} of key {id} is retired (minimum decryption version {})",
                record.min_decryption_version
            )));
        }
        let hsm_suite = parsed.header.suite == envelope::SUITE_HSM_AES256GCM;
        if hsm_suite != (record.protection_level == ProtectionLevel::Hsm) {
            tracing::debug!(key_id = %id, suite = parsed.header.suite, "blob suite does not match the key's protection level");
            return Err(Error::InvalidCiphertext);
        }
        Ok(Openable { parsed, record })
    }

    /// Unwraps a blob `openable` admitted: the HSM opens it (suite 2) or the
    /// CMK version does (suite 1). Only an authenticated blob gives a result.
    async fn unwrap_blob(
        &self,
        openable: &Openable<'_>,
        context: &EncryptionContext,
    ) -> Result<DecryptOutput> {
        let parsed = &openable.parsed;
        let id = parsed.header.key_id;
        let version = parsed.header.key_version;
        let digest = crypto::context_digest(context);
        let plaintext = if openable.record.protection_level == ProtectionLevel::Hsm {
            let aad = crypto::blob_aad(parsed.header_bytes, &digest);
            let mut sealed = Vec::with_capacity(parsed.ciphertext.len() + envelope::TAG_LEN);
            sealed.extend_from_slice(parsed.ciphertext);
            sealed.extend_from_slice(parsed.tag);
            let name = self.object_name(id, version).await?;
            let opened = self
                .hsm
                .open_with_object(
                    ObjectSeal {
                        object: &name,
                        salt: &parsed.header.salt,
                        iv: &parsed.header.iv,
                        aad: &aad,
                    },
                    &sealed,
                )
                .await;
            match opened {
                Ok(p) => p,
                Err(HsmError::AuthenticationFailed) => return Err(Error::InvalidCiphertext),
                Err(e) => {
                    self.forget_materials_if_tampered(&e);
                    return Err(e.into());
                }
            }
        } else {
            let material = self.material(id, version).await?;
            crypto::open(&material, parsed, &digest).map_err(|_| Error::InvalidCiphertext)?
        };
        Ok(DecryptOutput {
            plaintext,
            key_id: id,
            key_version: version,
        })
    }
}

/// A blob the caller may open, checked and not yet unwrapped (see
/// `Kms::openable`).
struct Openable<'b> {
    parsed: envelope::ParsedBlob<'b>,
    record: Arc<KeyRecord>,
}

pub(super) fn ensure_enabled(caller: &Caller, record: &KeyRecord, op: Operation) -> Result<()> {
    if record.state == KeyState::Enabled {
        return Ok(());
    }
    // An attempted use of a key that is not enabled is a signal the
    // operator must see (a pending-deletion key still in use, say).
    tracing::warn!(
        key_id = %record.id,
        state = %record.state,
        principal = %caller.principal,
        operation = op.name(),
        "refused use of a key that is not enabled"
    );
    Err(Error::KeyNotEnabled {
        key_id: record.id,
        state: record.state,
    })
}

fn seal_error(e: SealError) -> Error {
    match e {
        SealError::PlaintextLength(n) => Error::InvalidArgument(format!(
            "plaintext must be 1 to {MAX_CIPHERTEXT_LEN} bytes, got {n}"
        )),
        SealError::Random | SealError::Aead => Error::Internal(format!("sealing failed: {e}")),
    }
}
