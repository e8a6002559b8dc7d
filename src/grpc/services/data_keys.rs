//! `DataKeyService`: the data-key operations, for hosted services.

use std::collections::BTreeMap;

use tonic::{Request, Response, Status};

use crate::audit::AuditItem;
use crate::authz::{Caller, Operation};
use crate::error::{Error, Result};
use crate::grpc::GrpcApi;
use crate::grpc::convert::{self, key_ref, optional_key_ref};
use crate::grpc::pb::{self, data_key_service_server::DataKeyService};
use crate::model::KeyId;
use crate::pipeline::{Code, Failure, RequestAudit};
use crate::service::{DEFAULT_DATA_KEY_BYTES, DataKeyOutput, DecryptItem, MAX_BATCH_ITEMS};

fn number_of_bytes(raw: u32) -> usize {
    if raw == 0 {
        DEFAULT_DATA_KEY_BYTES
    } else {
        usize::try_from(raw).unwrap_or(usize::MAX)
    }
}

/// The error of one batch item, as the single-item RPC would answer it.
fn item_error(failure: Failure) -> pb::BatchItemError {
    pb::BatchItemError {
        code: failure.code() as i32,
        message: failure.message().to_string(),
    }
}

/// What a batch's audit record says besides its key: how many items, how
/// many failed, and (for a decrypt) which key versions the blobs named.
fn batch_detail(items: usize, failed: usize, keys: Option<&BatchKeys>) -> String {
    let mut d = format!("batch of {items}: {} ok, {failed} failed", items - failed);
    if let Some(keys) = keys.filter(|k| k.seen.len() > 1) {
        d.push_str("; keys ");
        for (i, ((id, version), n)) in keys.seen.iter().take(BatchKeys::LISTED).enumerate() {
            if i > 0 {
                d.push_str(", ");
            }
            d.push_str(&format!("{id} v{version} x{n}"));
        }
        if keys.seen.len() > BatchKeys::LISTED {
            d.push_str(&format!(
                ", and {} more",
                keys.seen.len() - BatchKeys::LISTED
            ));
        }
    }
    if let Some(keys) = keys.filter(|k| k.unparsed > 0) {
        d.push_str(&format!("; {} unreadable blobs", keys.unparsed));
    }
    d
}

/// The key versions the blobs of a batch name in their headers (as
/// presented, before authentication), for its audit record.
#[derive(Default)]
struct BatchKeys {
    seen: BTreeMap<(KeyId, u32), usize>,
    unparsed: usize,
}

impl BatchKeys {
    /// How many key versions a record lists by name.
    const LISTED: usize = 32;

    fn add(&mut self, blob: &[u8]) {
        match crate::envelope::parse(blob) {
            Ok(p) => {
                *self
                    .seen
                    .entry((p.header.key_id, p.header.key_version))
                    .or_default() += 1
            }
            Err(_) => self.unparsed += 1,
        }
    }

    /// One key: the record names it (and its version, if only one).
    fn describe_into(&self, audit: &mut RequestAudit) {
        let mut ids = self.seen.keys().map(|(id, _)| *id);
        if let Some(first) = ids.next() {
            if ids.all(|id| id == first) {
                let version = match self.seen.len() {
                    1 => self.seen.keys().next().map(|(_, v)| *v),
                    _ => None,
                };
                audit.resolved_key(first, version);
            }
        }
    }
}

impl GrpcApi {
    /// GenerateDataKey and its WithoutPlaintext form.
    async fn generate_one(
        &self,
        caller: &Caller,
        req: pb::GenerateDataKeyRequest,
        audit: &mut RequestAudit,
        with_plaintext: bool,
    ) -> Result<DataKeyOutput> {
        let key = key_ref("key_id", &req.key_id)?;
        let context = convert::context_from_pb(req.encryption_context)?;
        audit.context(&context);
        let reason = convert::reason_from_pb(req.justification)?;
        let bytes = number_of_bytes(req.number_of_bytes);
        let out = self
            .kms()
            .generate_data_key(caller, &key, &context, reason, bytes, with_plaintext)
            .await?;
        audit.resolved_key(out.key_id, Some(out.key_version));
        Ok(out)
    }
}

#[tonic::async_trait]
impl DataKeyService for GrpcApi {
    async fn generate_data_key(
        &self,
        request: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<Response<pb::GenerateDataKeyResponse>, Status> {
        let op = Operation::GenerateDataKey;
        self.handle(op, request, async |caller, req, audit| {
            let out = self.generate_one(caller, req, audit, true).await?;
            Ok(pb::GenerateDataKeyResponse {
                // The response owns a copy until it is encoded; the core's
                // copy is zeroized when `out` drops.
                plaintext: out
                    .plaintext
                    .map(|p| p.expose().to_vec())
                    .unwrap_or_default(),
                ciphertext_blob: out.ciphertext_blob,
                key_id: out.key_id.to_string(),
                key_version: out.key_version,
            })
        })
        .await
    }

    async fn generate_data_key_without_plaintext(
        &self,
        request: Request<pb::GenerateDataKeyWithoutPlaintextRequest>,
    ) -> Result<Response<pb::GenerateDataKeyWithoutPlaintextResponse>, Status> {
        let op = Operation::GenerateDataKeyWithoutPlaintext;
        self.handle(op, request, async |caller, r, audit| {
            let req = pb::GenerateDataKeyRequest {
                key_id: r.key_id,
                encryption_context: r.encryption_context,
                justification: r.justification,
                number_of_bytes: r.number_of_bytes,
            };
            let out = self.generate_one(caller, req, audit, false).await?;
            Ok(pb::GenerateDataKeyWithoutPlaintextResponse {
                ciphertext_blob: out.ciphertext_blob,
                key_id: out.key_id.to_string(),
                key_version: out.key_version,
            })
        })
        .await
    }

    async fn batch_generate_data_key(
        &self,
        request: Request<pb::BatchGenerateDataKeyRequest>,
    ) -> Result<Response<pb::BatchGenerateDataKeyResponse>, Status> {
        let op = Operation::BatchGenerateDataKey;
        self.handle(op, request, async |caller, req, audit| {
            let key = key_ref("key_id", &req.key_id)?;
            let context = convert::context_from_pb(req.encryption_context)?;
            audit.context(&context);
            let reason = convert::reason_from_pb(req.justification)?;
            let count = usize::try_from(req.count).unwrap_or(usize::MAX);
            let bytes = number_of_bytes(req.number_of_bytes);
            let out = self
                .kms()
                .generate_data_keys(
                    caller,
                    &key,
                    &context,
                    reason,
                    bytes,
                    count,
                    !req.without_plaintext,
                )
                .await?;
            audit.resolved_key(out.key_id, Some(out.key_version));
            let failed = out.items.iter().filter(|i| i.is_err()).count();
            audit.detail(batch_detail(out.items.len(), failed, None));
            Ok(pb::BatchGenerateDataKeyResponse {
                data_keys: out
                    .items
                    .into_iter()
                    .map(|item| match item {
                        Ok(k) => pb::GeneratedDataKey {
                            plaintext: k.plaintext.map(|p| p.expose().to_vec()).unwrap_or_default(),
                            ciphertext_blob: k.ciphertext_blob,
                            error: None,
                        },
                        Err(e) => pb::GeneratedDataKey {
                            error: Some(item_error(e.into())),
                            ..Default::default()
                        },
                    })
                    .collect(),
                key_id: out.key_id.to_string(),
                key_version: out.key_version,
            })
        })
        .await
    }

    async fn batch_decrypt(
        &self,
        request: Request<pb::BatchDecryptRequest>,
    ) -> Result<Response<pb::BatchDecryptResponse>, Status> {
        let op = Operation::BatchDecrypt;
        self.handle(op, request, async |caller, mut req, audit| {
            self.kms().authorize_only(caller, op)?;
            if !(1..=MAX_BATCH_ITEMS).contains(&req.items.len()) {
                return Err(Error::InvalidArgument(format!(
                    "a batch holds 1 to {MAX_BATCH_ITEMS} items, got {}",
                    req.items.len()
                )));
            }
            let reason = convert::reason_from_pb(req.justification)?;
            // One context for every item: the record carries its digest.
            let one_context = req.items.first().is_some_and(|first| {
                req.items
                    .iter()
                    .all(|i| i.encryption_context == first.encryption_context)
            });
            // Each item is converted alone: a malformed item fails alone.
            let mut keys = BatchKeys::default();
            let converted: Vec<Result<_, Failure>> = req
                .items
                .iter_mut()
                .map(|item| {
                    keys.add(&item.ciphertext_blob);
                    let context =
                        convert::context_from_pb(std::mem::take(&mut item.encryption_context))?;
                    let expected = optional_key_ref("key_id", &item.key_id)?;
                    Ok((context, expected))
                })
                .collect();
            keys.describe_into(audit);
            if let (true, Some(Ok((first, _)))) = (one_context, converted.first()) {
                audit.context(first);
            }
            let mut slots = Vec::with_capacity(converted.len());
            let mut items = Vec::with_capacity(converted.len());
            for (item, c) in req.items.iter().zip(&converted) {
                match c {
                    Ok((context, expected)) => {
                        slots.push(None);
                        items.push(DecryptItem {
                            blob: &item.ciphertext_blob,
                            context,
                            expected_key: expected.as_ref(),
                        });
                    }
                    Err(refused) => slots.push(Some(refused.clone())),
                }
            }
            let mut opened = if items.is_empty() {
                Vec::new().into_iter()
            } else {
                self.kms()
                    .decrypt_batch(caller, &items, reason)
                    .await?
                    .into_iter()
            };
            let mut failed = 0;
            // The record names each item: its authenticated key version
            // (opened blobs only), its context digest (when the batch has
            // more than one context) and its status.
            let mut recorded = Vec::with_capacity(slots.len());
            let results: Vec<pb::BatchDecryptResult> = slots
                .into_iter()
                .zip(&converted)
                .enumerate()
                .map(|(index, (slot, converted))| {
                    let outcome = match slot {
                        Some(refused) => Err(refused),
                        None => opened
                            .next()
                            .unwrap_or_else(|| {
                                Err(Error::Internal("batch decrypt: missing result".into()))
                            })
                            .map_err(Failure::from),
                    };
                    let mut item = AuditItem {
                        index: u32::try_from(index).unwrap_or(u32::MAX),
                        key_id: None,
                        key_version: None,
                        context_digest: match converted {
                            Ok((context, _)) if !one_context => Some(audit.context_digest(context)),
                            _ => None,
                        },
                        status_code: String::new(),
                    };
                    let result = match outcome {
                        Ok(out) => {
                            item.key_id = Some(out.key_id.to_string());
                            item.key_version = Some(out.key_version);
                            item.status_code = Code::Ok.name().to_string();
                            pb::BatchDecryptResult {
                                plaintext: out.plaintext.expose().to_vec(),
                                key_id: out.key_id.to_string(),
                                key_version: out.key_version,
                                error: None,
                            }
                        }
                        Err(failure) => {
                            failed += 1;
                            item.status_code = failure.code().name().to_string();
                            pb::BatchDecryptResult {
                                error: Some(item_error(failure)),
                                ..Default::default()
                            }
                        }
                    };
                    recorded.push(item);
                    result
                })
                .collect();
            audit.detail(batch_detail(results.len(), failed, Some(&keys)));
            audit.items(recorded);
            Ok(pb::BatchDecryptResponse { results })
        })
        .await
    }

    async fn encrypt(
        &self,
        request: Request<pb::EncryptRequest>,
    ) -> Result<Response<pb::EncryptResponse>, Status> {
        self.handle(
            Operation::Encrypt,
            request,
            async |caller, mut req, audit| {
                let key = key_ref("key_id", &req.key_id)?;
                let context =
                    convert::context_from_pb(std::mem::take(&mut req.encryption_context))?;
                audit.context(&context);
                let reason = convert::reason_from_pb(req.justification)?;
                let plaintext = zeroize::Zeroizing::new(std::mem::take(&mut req.plaintext));
                let out = self
                    .kms()
                    .encrypt(caller, &key, &plaintext, &context, reason)
                    .await?;
                audit.resolved_key(out.key_id, Some(out.key_version));
                Ok(pb::EncryptResponse {
                    ciphertext_blob: out.ciphertext_blob,
                    key_id: out.key_id.to_string(),
                    key_version: out.key_version,
                })
            },
        )
        .await
    }

    async fn decrypt(
        &self,
        request: Request<pb::DecryptRequest>,
    ) -> Result<Response<pb::DecryptResponse>, Status> {
        self.handle(Operation::Decrypt, request, async |caller, req, audit| {
            let context = convert::context_from_pb(req.encryption_context)?;
            audit.context(&context);
            let reason = convert::reason_from_pb(req.justification)?;
            let expected = optional_key_ref("key_id", &req.key_id)?;
            let out = self
                .kms()
                .decrypt(
                    caller,
                    &req.ciphertext_blob,
                    &context,
                    reason,
                    expected.as_ref(),
                )
                .await?;
            audit.resolved_key(out.key_id, Some(out.key_version));
            Ok(pb::DecryptResponse {
                plaintext: out.plaintext.expose().to_vec(),
                key_id: out.key_id.to_string(),
                key_version: out.key_version,
            })
        })
        .await
    }

    async fn re_encrypt(
        &self,
        request: Request<pb::ReEncryptRequest>,
    ) -> Result<Response<pb::ReEncryptResponse>, Status> {
        self.handle(Operation::ReEncrypt, request, async |caller, req, audit| {
            let source_context = convert::context_from_pb(req.source_encryption_context)?;
            audit.context(&source_context);
            let destination_context = if req.destination_encryption_context.is_empty() {
                None
            } else {
                Some(convert::context_from_pb(
                    req.destination_encryption_context,
                )?)
            };
            let reason = convert::reason_from_pb(req.justification)?;
            let source = optional_key_ref("source_key_id", &req.source_key_id)?;
            let destination = optional_key_ref("destination_key_id", &req.destination_key_id)?;
            let out = self
                .kms()
                .re_encrypt(
                    caller,
                    &req.ciphertext_blob,
                    &source_context,
                    source.as_ref(),
                    destination.as_ref(),
                    destination_context.as_ref(),
                    reason,
                )
                .await?;
            audit.detail(format!(
                "source {} version {}",
                out.source_key_id, out.source_key_version
            ));
            audit.resolved_key(out.key_id, Some(out.key_version));
            Ok(pb::ReEncryptResponse {
                ciphertext_blob: out.ciphertext_blob,
                source_key_id: out.source_key_id.to_string(),
                source_key_version: out.source_key_version,
                key_id: out.key_id.to_string(),
                key_version: out.key_version,
            })
        })
        .await
    }
}
