//! The tonic service implementations: authenticate, convert, call the core,
//! map the result.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::audit::RequestAudit;
use super::auth::PrincipalCache;
use super::convert::{self, key_ref, optional_key_ref};
use super::pb::{
    self, approval_service_server::ApprovalService, data_key_service_server::DataKeyService,
    hsm_service_server::HsmService, key_service_server::KeyService,
};
use super::status;
use crate::audit::AuditTrail;
use crate::authz::Operation;
use crate::service::{
    CreateKeyInput, DEFAULT_DATA_KEY_BYTES, DataKeyOutput, Kms, MAX_BATCH_ITEMS, parse_approval_id,
};
use crate::store::KeyFilter;

/// coffre's services over one core and one audit log.
#[derive(Debug, Clone)]
pub struct Api {
    pub(super) kms: Arc<Kms>,
    pub(super) principals: Arc<PrincipalCache>,
    pub(super) audit: Arc<AuditTrail>,
    pub(super) metrics: Arc<crate::metrics::Metrics>,
    pub(super) request_ids: Arc<super::audit::RequestIds>,
}

impl Api {
    pub fn new(
        kms: Arc<Kms>,
        audit: Arc<AuditTrail>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        Self {
            kms,
            principals: Arc::new(PrincipalCache::default()),
            audit,
            metrics,
            request_ids: Arc::new(super::audit::RequestIds::new()),
        }
    }
}

impl Api {
    /// The key after a sensitive operation, or — when it awaits approvals —
    /// the key as it still is and the approval's id.
    async fn key_or_pending(
        &self,
        audit: &mut RequestAudit,
        caller: &crate::authz::Caller,
        result: crate::Result<Arc<crate::model::KeyRecord>>,
    ) -> Result<(Option<pb::KeyMetadata>, String), Status> {
        match result {
            Ok(record) => {
                audit.key_id(record.id, Some(record.primary_version));
                Ok((Some(convert::key_metadata(&record)), String::new()))
            }
            Err(crate::Error::ApprovalPending(approval)) => {
                audit.detail(format!("pending approval {}", approval.id));
                if let Some(id) = approval.operation.key_id() {
                    audit.key_id(id, None);
                }
                let key = match approval.operation.key_id() {
                    Some(id) => self
                        .kms
                        .get_key(caller, &crate::model::KeyRef::Id(id))
                        .await
                        .ok()
                        .map(|v| convert::key_metadata(&v.key)),
                    None => None,
                };
                Ok((key, approval.id.to_string()))
            }
            Err(e) => Err(status(e)),
        }
    }
}

impl Api {
    /// GenerateDataKey and its WithoutPlaintext form: the record and the
    /// core's answer.
    async fn generate_one(
        &self,
        op: Operation,
        request: Request<pb::GenerateDataKeyRequest>,
        with_plaintext: bool,
    ) -> (RequestAudit, Result<DataKeyOutput, Status>) {
        let (mut audit, caller) = self.begin(op, &request);
        audit.key(&request.get_ref().key_id);
        audit.justification(request.get_ref().justification);
        let span = audit.span();
        let result = async {
            let caller = caller?;
            let req = request.into_inner();
            let key = key_ref("key_id", &req.key_id)?;
            let context = convert::context(req.encryption_context)?;
            audit.context(&context);
            let reason = convert::access_reason(req.justification)?;
            let out = self
                .kms
                .generate_data_key(
                    &caller,
                    &key,
                    &context,
                    reason,
                    number_of_bytes(req.number_of_bytes),
                    with_plaintext,
                )
                .await
                .map_err(status)?;
            audit.key_id(out.key_id, Some(out.key_version));
            Ok(out)
        }
        .instrument(span)
        .await;
        (audit, result)
    }
}

/// The error of one batch item, as the single-item RPC would answer it.
fn item_error(e: crate::Error) -> pb::BatchItemError {
    let s = status(e);
    pb::BatchItemError {
        code: s.code() as i32,
        message: s.message().to_string(),
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
    seen: std::collections::BTreeMap<(crate::model::KeyId, u32), usize>,
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
                audit.key_id(first, version);
            }
        }
    }
}

fn approval_to_pb(a: &crate::store::approvals::Approval) -> pb::Approval {
    use crate::store::approvals::ApprovalStatus as S;
    pb::Approval {
        approval_id: a.id.to_string(),
        operation: a.operation.describe(),
        key_id: a
            .operation
            .key_id()
            .map(|k| k.to_string())
            .unwrap_or_default(),
        proposer: a.proposer.clone(),
        approved_by: a.approved_by.clone(),
        approvals_required: a.approvals_required,
        status: match a.status {
            S::Pending => pb::ApprovalStatus::ApprovalPending,
            S::Executing => pb::ApprovalStatus::ApprovalExecuting,
            S::Executed => pb::ApprovalStatus::ApprovalExecuted,
            S::Rejected => pb::ApprovalStatus::ApprovalRejected,
            S::Expired => pb::ApprovalStatus::ApprovalExpired,
            S::Failed => pb::ApprovalStatus::ApprovalFailed,
        }
        .into(),
        create_time: Some(convert::timestamp(a.created_at)),
        expire_time: Some(convert::timestamp(a.expires_at)),
        rejected_by: a.rejected_by.clone().unwrap_or_default(),
        result: a.result.clone().unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl ApprovalService for Api {
    async fn list_approvals(
        &self,
        request: Request<pb::ListApprovalsRequest>,
    ) -> Result<Response<pb::ListApprovalsResponse>, Status> {
        let (audit, caller) = self.begin(Operation::ListApprovals, &request);
        let span = audit.span();
        let result = async {
            let caller = caller?;
            let all = self
                .kms
                .list_approvals(&caller, request.get_ref().include_closed)
                .await
                .map_err(status)?;
            Ok(pb::ListApprovalsResponse {
                approvals: all.iter().map(approval_to_pb).collect(),
            })
        }
        .instrument(span)
        .await;
        self.finish(audit, result).await
    }

    async fn approve_operation(
        &self,
        request: Request<pb::ApproveOperationRequest>,
    ) -> Result<Response<pb::ApproveOperationResponse>, Status> {
        let (mut audit, caller) = self.begin(Operation::ApproveOperation, &request);
        let span = audit.span();
        let result = async {
            let caller = caller?;
            let id = parse_approval_id(&request.get_ref().approval_id).map_err(status)?;
            audit.detail(format!("approval {id}"));
            let a = self.kms.approve(&caller, id).await.map_err(status)?;
            if let Some(key) = a.operation.key_id() {
                audit.key_id(key, None);
            }
            Ok(pb::ApproveOperationResponse {
                approval: Some(approval_to_pb(&a)),
            })
        }
        .instrument(span)
        .await;
        self.finish(audit, result).await
    }

    async fn reject_operation(
        &self,
        request: Request<pb::RejectOperationRequest>,
    ) -> Result<Response<pb::RejectOperationResponse>, Status> {
        let (mut audit, caller) = self.begin(Operation::RejectOperation, &request);
        let span = audit.span();
        let result = async {
            let caller = caller?;
            let id = parse_approval_id(&request.get_ref().approval_id).map_err(status)?;
            audit.detail(format!("approval {id}"));
            let a = self.kms.reject(&caller, id).await.map_err(status)?;
            if let Some(key) = a.operation.key_id() {
                audit.key_id(key, None);
            }
            Ok(pb::RejectOperationResponse {
                approval: Some(approval_to_pb(&a)),
            })
        }
        .instrument(span)
        .await;
        self.finish(audit, result).await
    }
}

fn number_of_bytes(raw: u32) -> usize {
    if raw == 0 {
        DEFAULT_DATA_KEY_BYTES
    } else {
        usize::try_from(raw).unwrap_or(usize::MAX)
    }
}

#[tonic::async_trait]
impl KeyService for Api {
    async fn create_key(
        &self,
        request: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::CreateKeyResponse>, Status> {
        let (mut audit, caller) = self.begin(Operation::CreateKey, &request);
        let span = audit.span();
        let result = async {
            let caller = caller?;
            let req = request.into_inner();
            let input = CreateKeyInput {
                alias: (!req.alias.is_empty()).then_some(req.alias),
                description: req.description,
                protection_level: convert::protection_level(req.protection_level)?,
                labels: req.labels.into_iter().collect(),
                rotation_period: convert::duration("rotation_period", req.rotation_period)?,
                policy: req.policy.map(convert::policy).transpose()?,
            };
            let view = self.kms.create_key(&caller, input).await.map_err(status)?;
            audit.key_id(view.key.id, Some(view.key.primary_version));
            Ok(pb::CreateKeyResponse {
                key: Some(convert::key_metadata(&view.key)),
            })
        }
        .instrument(span)
        .await;
        self.finish(audit, result).await
    }

    async fn get_key(
        &self,
        request: Request<pb::GetKeyRequest>,
    ) -> Result<Response<pb::GetKeyResponse>, Status> {
        let (mut audit, caller) = self.begin(Operation::GetKey, &request);
        audit.key(&request.get_ref().key_id);
        let span = audit.span();
        let result = async {
            let caller = caller?;
            let key = key_ref("key_id", &request.get_ref().key_id)?;
            let view = self.kms.get_key(&caller, &key).await.map_err(status)?;
            audit.key_id(view.key.id, Some(view.key.primary_version));
            Ok(pb::GetKeyResponse {
                key: Some(convert::key_metadata(&view.key)),
                versions: view
                    .versions
                    .iter()
                    .map(|v| convert::key_version(&view.key, v))
                    .collect(),
            })
        }
        .instrument(span)
        .await;
        self.finish(audit, result).await
    }

    async fn list_keys(
        &self,
        request: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let (audit, caller) = self.begin(Operation::ListKeys, &request);
        let span = audit.span();
        let result = async {
            let caller = caller?;
            let req = request.get_ref();
            let start_after = convert::page_token(&req.page_token)?;
            let page_size = usize::try_from(req.page_size).unwrap_or(usize::MAX);
            let filter = KeyFilter {
                state: convert::key_state_filter(req.state)?,
                alias_prefix: (!req.alias_prefix.is_empty()).then(|| req.alias_prefix.clone()),
            };
            let page = self
                .kms
                .list_keys(&caller, filter, start_after, page_size)
                .await
                .map_err(status)?;
            Ok(pb::ListKeysResponse {
                keys: page.keys.iter().map(convert::key_metadata).collect(),
                next_page_token: page.next.map(|id| id.to_string()).unwrap_or_default(),
            })
        }
        .instrument(span)
        .await;
        self.finish(audit, result).await
    }

    async fn rotate_key(
        &self,
        request: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::RotateKeyResponse>, Status> {
        let (mut audit, caller) = self.begin(Operation::RotateKey, &request);
        audit.key(&request.get_ref().key_id);
        let span = audit.span();
        let result = async {
            let caller = caller?;
            let key = key_ref("key_id", &request.get_ref().key_id)?;
            let record = self.kms.rotate_key(&caller, &key).await.map_err(status)?;
            audit.key_id(record.id, Some(record.primary_version));
            Ok(pb::RotateKeyResponse {
                key: Some(convert::key_metadata(&record)),
            })
        }
        .instrument(span)
        .await;
        self.finish(audit, result).await
    }

    async fn disable_key(
        &self,
        request: Request<pb::DisableKeyRequest>,
    ) -> Result<Response<pb::DisableKeyResponse>, Status> {
        let (mut audit, caller) = self.begin(Operation::DisableKey, &request);
        audit.key(&request.get_ref().key_id);
        let span = audit.span();
        let result = async {
            let caller = caller?;
            let key = key_ref("key_id", &request.get_ref().key_id)?;
            let record = self.kms.disable_key(&caller, &key).await.map_err(status)?;
            audit.key_id(record.id, Some(record.primary_version));
            Ok(pb::DisableKeyResponse {
                key: Some(convert::key_metadata(&record)),
            })
        }
        .instrument(span)
        .await;
        self.finish(audit, result).await
    }

    async fn enable_key(
        &self,
        request: Request<pb::EnableKeyRequest>,
    ) -> Result<Response<pb::EnableKeyResponse>, Status> {
        let (mut audit, caller) = self.begin(Operation::EnableKey, &request);
        audit.key(&request.get_ref().key_id);
        let span = audit.span();
        let result = async {
            let caller = caller?;
            let key = key_ref("key_id", &request.get_ref().key_id)?;
            let result = self.kms.enable_key(&caller, &key).await;
            let (key, pending_approval_id) =
                self.key_or_pending(&mut audit, &caller, result).await?;
            Ok(pb::EnableKeyResponse {
                key,
                pending_approval_id,
            })
        }
        .instrument(span)
        .await;
        self.finish(audit, result).await
    }

    async fn schedule_key_deletion(
        &self,
        request: Request<pb::ScheduleKeyDeletionRequest>,
    ) -> Result<Response<pb::ScheduleKeyDeletionResponse>, Status> {
        let (mut audit, caller) = self.begin(Operation::ScheduleKeyDeletion, &request);
        audit.key(&request.get_ref().key_id);
        let span = audit.span();
        let result = async {
            let caller = caller?;
            let req = request.get_ref();
            let key = key_ref("key_id", &req.key_id)?;
            let days = (req.pending_window_days != 0).then_some(req.pending_window_days);
            let result = self.kms.schedule_key_deletion(&caller, &key, days).await;
            let (key, pending_approval_id) =
                self.key_or_pending(&mut audit, &caller, result).await?;
            Ok(pb::ScheduleKeyDeletionResponse {
                key,
                pending_approval_id,
            })
        }
        .instrument(span)
        .await;
        self.finish(audit, result).await
    }

    async fn cancel_key_deletion(
        &self,
        request: Request<pb::CancelKeyDeletionRequest>,
    ) -> Result<Response<pb::CancelKeyDeletionResponse>, Status> {
        let (mut audit, caller) = self.begin(Operation::CancelKeyDeletion, &request);
        audit.key(&request.get_ref().key_id);
        let span = audit.span();
        let result = async {
            let caller = caller?;
            let key = key_ref("key_id", &request.get_ref().key_id)?;
            let result = self.kms.cancel_key_deletion(&caller, &key).await;
            let (key, pending_approval_id) =
                self.key_or_pending(&mut audit, &caller, result).await?;
            Ok(pb::CancelKeyDeletionResponse {
                key,
                pending_approval_id,
            })
        }
        .instrument(span)
        .await;
        self.finish(audit, result).await
    }

    async fn set_rotation_policy(
        &self,
        request: Request<pb::SetRotationPolicyRequest>,
    ) -> Result<Response<pb::SetRotationPolicyResponse>, Status> {
        let (mut audit, caller) = self.begin(Operation::SetRotationPolicy, &request);
        audit.key(&request.get_ref().key_id);
        let span = audit.span();
        let result = async {
            let caller = caller?;
            let req = request.into_inner();
            let key = key_ref("key_id", &req.key_id)?;
            let period = convert::duration("rotation_period", req.rotation_period)?;
            let record = self
                .kms
                .set_rotation_policy(&caller, &key, period)
                .await
                .map_err(status)?;
            audit.key_id(record.id, Some(record.primary_version));
            Ok(pb::SetRotationPolicyResponse {
                key: Some(convert::key_metadata(&record)),
            })
        }
        .instrument(span)
        .await;
        self.finish(audit, result).await
    }

    async fn update_key_policy(
        &self,
        request: Request<pb::UpdateKeyPolicyRequest>,
    ) -> Result<Response<pb::UpdateKeyPolicyResponse>, Status> {
        let (mut audit, caller) = self.begin(Operation::UpdateKeyPolicy, &request);
        audit.key(&request.get_ref().key_id);
        let span = audit.span();
        let result = async {
            let caller = caller?;
            let req = request.into_inner();
            let key = key_ref("key_id", &req.key_id)?;
            let policy = convert::policy(
                req.policy
                    .ok_or_else(|| Status::invalid_argument("policy is required"))?,
            )?;
            let result = self.kms.update_key_policy(&caller, &key, policy).await;
            let (key, pending_approval_id) =
                self.key_or_pending(&mut audit, &caller, result).await?;
            Ok(pb::UpdateKeyPolicyResponse {
                key,
                pending_approval_id,
            })
        }
        .instrument(span)
        .await;
        self.finish(audit, result).await
    }

    async fn retire_key_versions(
        &self,
        request: Request<pb::RetireKeyVersionsRequest>,
    ) -> Result<Response<pb::RetireKeyVersionsResponse>, Status> {
        let (mut audit, caller) = self.begin(Operation::RetireKeyVersions, &request);
        audit.key(&request.get_ref().key_id);
        let span = audit.span();
        let result = async {
            let caller = caller?;
            let req = request.get_ref();
            let key = key_ref("key_id", &req.key_id)?;
            let record = self
                .kms
                .retire_key_versions(&caller, &key, req.min_decryption_version)
                .await
                .map_err(status)?;
            audit.key_id(record.id, Some(record.primary_version));
            Ok(pb::RetireKeyVersionsResponse {
                key: Some(convert::key_metadata(&record)),
            })
        }
        .instrument(span)
        .await;
        self.finish(audit, result).await
    }
}

type ProgressStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::RotateRootKeyProgress, Status>> + Send>,
>;

#[tonic::async_trait]
impl HsmService for Api {
    async fn get_hsm_info(
        &self,
        request: Request<pb::GetHsmInfoRequest>,
    ) -> Result<Response<pb::GetHsmInfoResponse>, Status> {
        let (audit, caller) = self.begin(Operation::GetHsmInfo, &request);
        let span = audit.span();
        let result = async {
            let caller = caller?;
            let info = self.kms.hsm_info(&caller).await.map_err(status)?;
            Ok(pb::GetHsmInfoResponse {
                backend: info.backend,
                label: info.label,
                current_root_key_id: info.current_root_key_id,
                root_key_ids: info.root_key_ids,
                secure: self.kms.hsm().is_secure(),
            })
        }
        .instrument(span)
        .await;
        self.finish(audit, result).await
    }

    type RotateRootKeyStream = ProgressStream;

    async fn rotate_root_key(
        &self,
        request: Request<pb::RotateRootKeyRequest>,
    ) -> Result<Response<Self::RotateRootKeyStream>, Status> {
        let (mut audit, caller) = self.begin(Operation::RotateRootKey, &request);
        let caller = match caller {
            Ok(c) => c,
            Err(e) => return self.finish(audit, Err(e)).await,
        };
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let api = self.clone();
        // The rotation runs to its end (or error) even if the client goes
        // away: stopping midway is safe, but finishing is better. Its record
        // is written when it ends, before the last message.
        tokio::spawn(async move {
            let progress_tx = tx.clone();
            let result = api
                .kms
                .rotate_root_key(&caller, move |p| {
                    // The final report goes out after the audit record.
                    if !p.done {
                        let _ = progress_tx.try_send(Ok(progress(p)));
                    }
                    true
                })
                .await;
            let last = match result {
                Err(crate::Error::ApprovalPending(a)) => {
                    audit.detail(format!("pending approval {}", a.id));
                    Ok(pb::RotateRootKeyProgress {
                        pending_approval_id: a.id.to_string(),
                        ..Default::default()
                    })
                }
                Err(e) => Err(status(e)),
                Ok(p) => {
                    audit.detail(format!(
                        "new root key {}, {} versions re-wrapped, destroyed root keys {:?}",
                        p.new_root_key_id, p.rewrapped, p.destroyed_root_key_ids
                    ));
                    Ok(progress(&p))
                }
            };
            let last = api.finish(audit, last).await.map(Response::into_inner);
            let _ = tx.send(last).await;
        });
        Ok(Response::new(
            Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)) as ProgressStream,
        ))
    }
}

fn progress(p: &crate::service::RootRotationProgress) -> pb::RotateRootKeyProgress {
    pb::RotateRootKeyProgress {
        old_root_key_ids_count: u32::try_from(p.old_root_key_ids.len()).unwrap_or(u32::MAX),
        new_root_key_id: p.new_root_key_id,
        rewrapped: p.rewrapped,
        remaining: p.remaining,
        done: p.done,
        destroyed_root_key_ids: p.destroyed_root_key_ids.clone(),
        resumed: p.resumed,
        pending_approval_id: String::new(),
    }
}

#[tonic::async_trait]
impl DataKeyService for Api {
    async fn generate_data_key(
        &self,
        request: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<Response<pb::GenerateDataKeyResponse>, Status> {
        let (audit, result) = self
            .generate_one(Operation::GenerateDataKey, request, true)
            .await;
        let result = result.map(|out| pb::GenerateDataKeyResponse {
            // The response owns a copy until it is encoded; the core's copy
            // is zeroized when `out` drops.
            plaintext: out
                .plaintext
                .map(|p| p.expose().to_vec())
                .unwrap_or_default(),
            ciphertext_blob: out.ciphertext_blob,
            key_id: out.key_id.to_string(),
            key_version: out.key_version,
        });
        self.finish(audit, result).await
    }

    async fn generate_data_key_without_plaintext(
        &self,
        request: Request<pb::GenerateDataKeyWithoutPlaintextRequest>,
    ) -> Result<Response<pb::GenerateDataKeyWithoutPlaintextResponse>, Status> {
        let request = request.map(|r| pb::GenerateDataKeyRequest {
            key_id: r.key_id,
            encryption_context: r.encryption_context,
            justification: r.justification,
            number_of_bytes: r.number_of_bytes,
        });
        let (audit, result) = self
            .generate_one(Operation::GenerateDataKeyWithoutPlaintext, request, false)
            .await;
        let result = result.map(|out| pb::GenerateDataKeyWithoutPlaintextResponse {
            ciphertext_blob: out.ciphertext_blob,
            key_id: out.key_id.to_string(),
            key_version: out.key_version,
        });
        self.finish(audit, result).await
    }

    async fn batch_generate_data_key(
        &self,
        request: Request<pb::BatchGenerateDataKeyRequest>,
    ) -> Result<Response<pb::BatchGenerateDataKeyResponse>, Status> {
        let (mut audit, caller) = self.begin(Operation::BatchGenerateDataKey, &request);
        audit.key(&request.get_ref().key_id);
        audit.justification(request.get_ref().justification);
        let span = audit.span();
        let result = async {
            let caller = caller?;
            let req = request.into_inner();
            let key = key_ref("key_id", &req.key_id)?;
            let context = convert::context(req.encryption_context)?;
            audit.context(&context);
            let reason = convert::access_reason(req.justification)?;
            let count = usize::try_from(req.count).unwrap_or(usize::MAX);
            let out = self
                .kms
                .generate_data_keys(
                    &caller,
                    &key,
                    &context,
                    reason,
                    number_of_bytes(req.number_of_bytes),
                    count,
                    !req.without_plaintext,
                )
                .await
                .map_err(status)?;
            audit.key_id(out.key_id, Some(out.key_version));
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
                            error: Some(item_error(e)),
                            ..Default::default()
                        },
                    })
                    .collect(),
                key_id: out.key_id.to_string(),
                key_version: out.key_version,
            })
        }
        .instrument(span)
        .await;
        self.finish(audit, result).await
    }

    async fn batch_decrypt(
        &self,
        request: Request<pb::BatchDecryptRequest>,
    ) -> Result<Response<pb::BatchDecryptResponse>, Status> {
        let (mut audit, caller) = self.begin(Operation::BatchDecrypt, &request);
        audit.justification(request.get_ref().justification);
        let span = audit.span();
        let result = async {
            let caller = caller?;
            let mut req = request.into_inner();
            self.kms
                .authorize_only(&caller, Operation::BatchDecrypt)
                .map_err(status)?;
            if !(1..=MAX_BATCH_ITEMS).contains(&req.items.len()) {
                return Err(Status::invalid_argument(format!(
                    "a batch holds 1 to {MAX_BATCH_ITEMS} items, got {}",
                    req.items.len()
                )));
            }
            let reason = convert::access_reason(req.justification)?;
            // One context for every item: the record carries its digest.
            let one_context = req.items.first().is_some_and(|first| {
                req.items
                    .iter()
                    .all(|i| i.encryption_context == first.encryption_context)
            });
            // Each item is converted alone: a malformed item fails alone.
            let mut keys = BatchKeys::default();
            let converted: Vec<Result<_, Status>> = req
                .items
                .iter_mut()
                .map(|item| {
                    keys.add(&item.ciphertext_blob);
                    let context = convert::context(std::mem::take(&mut item.encryption_context))?;
                    let expected = optional_key_ref("key_id", &item.key_id)?;
                    Ok((context, expected))
                })
                .collect();
            keys.describe_into(&mut audit);
            if let (true, Some(Ok((first, _)))) = (one_context, converted.first()) {
                audit.context(first);
            }
            let mut slots = Vec::with_capacity(converted.len());
            let mut items = Vec::with_capacity(converted.len());
            for (item, c) in req.items.iter().zip(&converted) {
                match c {
                    Ok((context, expected)) => {
                        slots.push(None);
                        items.push(crate::service::DecryptItem {
                            blob: &item.ciphertext_blob,
                            context,
                            expected_key: expected.as_ref(),
                        });
                    }
                    Err(s) => slots.push(Some(s.clone())),
                }
            }
            let mut opened = if items.is_empty() {
                Vec::new().into_iter()
            } else {
                self.kms
                    .decrypt_batch(&caller, &items, reason)
                    .await
                    .map_err(status)?
                    .into_iter()
            };
            let mut failed = 0;
            let results: Vec<pb::BatchDecryptResult> = slots
                .into_iter()
                .map(|slot| {
                    let outcome = match slot {
                        Some(refused) => Err(refused),
                        None => opened
                            .next()
                            .unwrap_or_else(|| {
                                Err(crate::Error::Internal(
                                    "batch decrypt: missing result".into(),
                                ))
                            })
                            .map_err(status),
                    };
                    match outcome {
                        Ok(out) => pb::BatchDecryptResult {
                            plaintext: out.plaintext.expose().to_vec(),
                            key_id: out.key_id.to_string(),
                            key_version: out.key_version,
                            error: None,
                        },
                        Err(s) => {
                            failed += 1;
                            pb::BatchDecryptResult {
                                error: Some(pb::BatchItemError {
                                    code: s.code() as i32,
                                    message: s.message().to_string(),
                                }),
                                ..Default::default()
                            }
                        }
                    }
                })
                .collect();
            audit.detail(batch_detail(results.len(), failed, Some(&keys)));
            Ok(pb::BatchDecryptResponse { results })
        }
        .instrument(span)
        .await;
        self.finish(audit, result).await
    }

    async fn encrypt(
        &self,
        request: Request<pb::EncryptRequest>,
    ) -> Result<Response<pb::EncryptResponse>, Status> {
        let (mut audit, caller) = self.begin(Operation::Encrypt, &request);
        audit.key(&request.get_ref().key_id);
        audit.justification(request.get_ref().justification);
        let span = audit.span();
        let result = async {
            let caller = caller?;
            let mut req = request.into_inner();
            let key = key_ref("key_id", &req.key_id)?;
            let context = convert::context(std::mem::take(&mut req.encryption_context))?;
            audit.context(&context);
            let reason = convert::access_reason(req.justification)?;
            let plaintext = zeroize::Zeroizing::new(std::mem::take(&mut req.plaintext));
            let out = self
                .kms
                .encrypt(&caller, &key, &plaintext, &context, reason)
                .await
                .map_err(status)?;
            audit.key_id(out.key_id, Some(out.key_version));
            Ok(pb::EncryptResponse {
                ciphertext_blob: out.ciphertext_blob,
                key_id: out.key_id.to_string(),
                key_version: out.key_version,
            })
        }
        .instrument(span)
        .await;
        self.finish(audit, result).await
    }

    async fn decrypt(
        &self,
        request: Request<pb::DecryptRequest>,
    ) -> Result<Response<pb::DecryptResponse>, Status> {
        let (mut audit, caller) = self.begin(Operation::Decrypt, &request);
        audit.blob(&request.get_ref().ciphertext_blob);
        audit.justification(request.get_ref().justification);
        let span = audit.span();
        let result = async {
            let caller = caller?;
            let req = request.into_inner();
            let context = convert::context(req.encryption_context)?;
            audit.context(&context);
            let reason = convert::access_reason(req.justification)?;
            let expected = optional_key_ref("key_id", &req.key_id)?;
            let out = self
                .kms
                .decrypt(
                    &caller,
                    &req.ciphertext_blob,
                    &context,
                    reason,
                    expected.as_ref(),
                )
                .await
                .map_err(status)?;
            audit.key_id(out.key_id, Some(out.key_version));
            Ok(pb::DecryptResponse {
                plaintext: out.plaintext.expose().to_vec(),
                key_id: out.key_id.to_string(),
                key_version: out.key_version,
            })
        }
        .instrument(span)
        .await;
        self.finish(audit, result).await
    }

    async fn re_encrypt(
        &self,
        request: Request<pb::ReEncryptRequest>,
    ) -> Result<Response<pb::ReEncryptResponse>, Status> {
        let (mut audit, caller) = self.begin(Operation::ReEncrypt, &request);
        audit.blob(&request.get_ref().ciphertext_blob);
        audit.justification(request.get_ref().justification);
        let span = audit.span();
        let result = async {
            let caller = caller?;
            let req = request.into_inner();
            let source_context = convert::context(req.source_encryption_context)?;
            audit.context(&source_context);
            let destination_context = if req.destination_encryption_context.is_empty() {
                None
            } else {
                Some(convert::context(req.destination_encryption_context)?)
            };
            let reason = convert::access_reason(req.justification)?;
            let source = optional_key_ref("source_key_id", &req.source_key_id)?;
            let destination = optional_key_ref("destination_key_id", &req.destination_key_id)?;
            let out = self
                .kms
                .re_encrypt(
                    &caller,
                    &req.ciphertext_blob,
                    &source_context,
                    source.as_ref(),
                    destination.as_ref(),
                    destination_context.as_ref(),
                    reason,
                )
                .await
                .map_err(status)?;
            audit.detail(format!(
                "source {} version {}",
                out.source_key_id, out.source_key_version
            ));
            audit.key_id(out.key_id, Some(out.key_version));
            Ok(pb::ReEncryptResponse {
                ciphertext_blob: out.ciphertext_blob,
                source_key_id: out.source_key_id.to_string(),
                source_key_version: out.source_key_version,
                key_id: out.key_id.to_string(),
                key_version: out.key_version,
            })
        }
        .instrument(span)
        .await;
        self.finish(audit, result).await
    }
}
