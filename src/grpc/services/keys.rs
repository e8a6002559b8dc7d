//! `KeyService`: key lifecycle and policies, for operators.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::authz::{Caller, Operation};
use crate::error::{Error, Result};
use crate::grpc::GrpcApi;
use crate::grpc::convert::{self, key_ref};
use crate::grpc::pb::{self, key_service_server::KeyService};
use crate::model::{KeyRecord, KeyRef};
use crate::pipeline::RequestAudit;
use crate::service::CreateKeyInput;
use crate::service::canonical;
use crate::store::KeyFilter;

impl GrpcApi {
    /// The key after a sensitive operation, or — when it awaits approvals —
    /// the key as it still is and the approval's id.
    async fn key_or_pending(
        &self,
        audit: &mut RequestAudit,
        caller: &Caller,
        result: Result<Arc<KeyRecord>>,
    ) -> Result<(Option<pb::KeyMetadata>, String)> {
        match result {
            Ok(record) => {
                audit.resolved(&record);
                Ok((Some(convert::key_to_pb(&record)), String::new()))
            }
            Err(Error::ApprovalPending(approval)) => {
                audit.detail(format!(
                    "pending approval {}: recorded, 1 of {} approvals; {}",
                    approval.id,
                    approval.approvals_required,
                    canonical::operation_audit(&approval.operation)
                ));
                let key = match approval.operation.key_id() {
                    Some(id) => {
                        audit.resolved_key(id, None);
                        self.kms()
                            .get_key(caller, &KeyRef::Id(id))
                            .await
                            .ok()
                            .map(|v| convert::key_to_pb(&v.key))
                    }
                    None => None,
                };
                Ok((key, approval.id.to_string()))
            }
            Err(e) => Err(e),
        }
    }
}

#[tonic::async_trait]
impl KeyService for GrpcApi {
    async fn create_key(
        &self,
        request: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::CreateKeyResponse>, Status> {
        self.handle(Operation::CreateKey, request, async |caller, req, audit| {
            let input = CreateKeyInput {
                alias: (!req.alias.is_empty()).then_some(req.alias),
                description: req.description,
                protection_level: convert::protection_level_from_pb(req.protection_level)?,
                labels: req.labels,
                rotation_period: convert::duration_from_pb("rotation_period", req.rotation_period)?,
                policy: req.policy.map(convert::policy_from_pb).transpose()?,
            };
            let chosen = input.policy.is_some();
            let view = self.kms().create_key(caller, input).await?;
            // Only a policy the caller chose has something to warn about
            // (and the key exists now: a refusal only drops the warnings).
            let warnings = if chosen {
                self.kms()
                    .policy_warnings(caller, &view.key.policy)
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            audit.resolved(&view.key);
            // The policy the key got (chosen or the default): its digest and
            // the policy itself, which holds no secret.
            audit.detail(format!(
                "{} {}",
                if chosen {
                    "policy set"
                } else {
                    "default policy"
                },
                canonical::policy_audit(&view.key.policy)
            ));
            Ok(pb::CreateKeyResponse {
                key: Some(convert::key_to_pb(&view.key)),
                warnings,
            })
        })
        .await
    }

    async fn get_key(
        &self,
        request: Request<pb::GetKeyRequest>,
    ) -> Result<Response<pb::GetKeyResponse>, Status> {
        self.handle(Operation::GetKey, request, async |caller, req, audit| {
            let view = self
                .kms()
                .get_key(caller, &key_ref("key_id", &req.key_id)?)
                .await?;
            audit.resolved(&view.key);
            Ok(pb::GetKeyResponse {
                key: Some(convert::key_to_pb(&view.key)),
                versions: view
                    .versions
                    .iter()
                    .map(|v| convert::version_to_pb(&view.key, v))
                    .collect(),
            })
        })
        .await
    }

    async fn list_keys(
        &self,
        request: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        self.handle(Operation::ListKeys, request, async |caller, req, _| {
            let start_after = convert::page_token(&req.page_token)?;
            let page_size = usize::try_from(req.page_size).unwrap_or(usize::MAX);
            let filter = KeyFilter {
                state: convert::state_filter_from_pb(req.state)?,
                alias_prefix: (!req.alias_prefix.is_empty()).then_some(req.alias_prefix),
            };
            let page = self
                .kms()
                .list_keys(caller, filter, start_after, page_size)
                .await?;
            Ok(pb::ListKeysResponse {
                keys: page.keys.iter().map(convert::key_to_pb).collect(),
                next_page_token: page.next.map(|id| id.to_string()).unwrap_or_default(),
            })
        })
        .await
    }

    async fn rotate_key(
        &self,
        request: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::RotateKeyResponse>, Status> {
        self.handle(Operation::RotateKey, request, async |caller, req, audit| {
            let record = self
                .kms()
                .rotate_key(caller, &key_ref("key_id", &req.key_id)?)
                .await?;
            audit.resolved(&record);
            Ok(pb::RotateKeyResponse {
                key: Some(convert::key_to_pb(&record)),
            })
        })
        .await
    }

    async fn disable_key(
        &self,
        request: Request<pb::DisableKeyRequest>,
    ) -> Result<Response<pb::DisableKeyResponse>, Status> {
        self.handle(
            Operation::DisableKey,
            request,
            async |caller, req, audit| {
                let record = self
                    .kms()
                    .disable_key(caller, &key_ref("key_id", &req.key_id)?)
                    .await?;
                audit.resolved(&record);
                Ok(pb::DisableKeyResponse {
                    key: Some(convert::key_to_pb(&record)),
                })
            },
        )
        .await
    }

    async fn enable_key(
        &self,
        request: Request<pb::EnableKeyRequest>,
    ) -> Result<Response<pb::EnableKeyResponse>, Status> {
        self.handle(Operation::EnableKey, request, async |caller, req, audit| {
            let key = key_ref("key_id", &req.key_id)?;
            let result = self.kms().enable_key(caller, &key).await;
            let (key, pending_approval_id) = self.key_or_pending(audit, caller, result).await?;
            Ok(pb::EnableKeyResponse {
                key,
                pending_approval_id,
            })
        })
        .await
    }

    async fn schedule_key_deletion(
        &self,
        request: Request<pb::ScheduleKeyDeletionRequest>,
    ) -> Result<Response<pb::ScheduleKeyDeletionResponse>, Status> {
        let op = Operation::ScheduleKeyDeletion;
        self.handle(op, request, async |caller, req, audit| {
            let key = key_ref("key_id", &req.key_id)?;
            let days = (req.pending_window_days != 0).then_some(req.pending_window_days);
            let result = self.kms().schedule_key_deletion(caller, &key, days).await;
            let (key, pending_approval_id) = self.key_or_pending(audit, caller, result).await?;
            Ok(pb::ScheduleKeyDeletionResponse {
                key,
                pending_approval_id,
            })
        })
        .await
    }

    async fn cancel_key_deletion(
        &self,
        request: Request<pb::CancelKeyDeletionRequest>,
    ) -> Result<Response<pb::CancelKeyDeletionResponse>, Status> {
        let op = Operation::CancelKeyDeletion;
        self.handle(op, request, async |caller, req, audit| {
            let key = key_ref("key_id", &req.key_id)?;
            let result = self.kms().cancel_key_deletion(caller, &key).await;
            let (key, pending_approval_id) = self.key_or_pending(audit, caller, result).await?;
            Ok(pb::CancelKeyDeletionResponse {
                key,
                pending_approval_id,
            })
        })
        .await
    }

    async fn set_rotation_policy(
        &self,
        request: Request<pb::SetRotationPolicyRequest>,
    ) -> Result<Response<pb::SetRotationPolicyResponse>, Status> {
        let op = Operation::SetRotationPolicy;
        self.handle(op, request, async |caller, req, audit| {
            let key = key_ref("key_id", &req.key_id)?;
            let period = convert::duration_from_pb("rotation_period", req.rotation_period)?;
            let record = self.kms().set_rotation_policy(caller, &key, period).await?;
            audit.resolved(&record);
            Ok(pb::SetRotationPolicyResponse {
                key: Some(convert::key_to_pb(&record)),
            })
        })
        .await
    }

    async fn update_key_policy(
        &self,
        request: Request<pb::UpdateKeyPolicyRequest>,
    ) -> Result<Response<pb::UpdateKeyPolicyResponse>, Status> {
        let op = Operation::UpdateKeyPolicy;
        self.handle(op, request, async |caller, req, audit| {
            let key = key_ref("key_id", &req.key_id)?;
            let policy = req
                .policy
                .ok_or_else(|| Error::InvalidArgument("policy is required".into()))?;
            let policy = convert::policy_from_pb(policy)?;
            audit.detail(format!("proposed {}", canonical::policy_audit(&policy)));
            // Sent with the answer, applied or pending alike.
            let warnings = self.kms().policy_warnings(caller, &policy)?;
            let result = self.kms().update_key_policy(caller, &key, policy).await;
            if let Ok(record) = &result {
                audit.detail(format!(
                    "applied {}",
                    canonical::policy_audit(&record.policy)
                ));
            }
            let (key, pending_approval_id) = self.key_or_pending(audit, caller, result).await?;
            Ok(pb::UpdateKeyPolicyResponse {
                key,
                pending_approval_id,
                warnings,
            })
        })
        .await
    }

    async fn retire_key_versions(
        &self,
        request: Request<pb::RetireKeyVersionsRequest>,
    ) -> Result<Response<pb::RetireKeyVersionsResponse>, Status> {
        let op = Operation::RetireKeyVersions;
        self.handle(op, request, async |caller, req, audit| {
            let key = key_ref("key_id", &req.key_id)?;
            let min = req.min_decryption_version;
            audit.detail(format!("min_decryption_version={min}"));
            let result = self.kms().retire_key_versions(caller, &key, min).await;
            let (key, pending_approval_id) = self.key_or_pending(audit, caller, result).await?;
            Ok(pb::RetireKeyVersionsResponse {
                key,
                pending_approval_id,
            })
        })
        .await
    }
}
