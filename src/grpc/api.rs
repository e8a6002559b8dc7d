//! [`GrpcApi`]: coffre's gRPC services over one [`Pipeline`], and the one
//! step every handler takes: authenticate the caller from its certificate,
//! note what the request names, hand it to the pipeline, and turn the reply
//! into a response. A handler is its conversions and nothing else.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::auth::{PrincipalCache, principal_of};
use super::convert::reason_note_from_pb;
use super::pb;
use super::status::response;
use crate::authz::{Caller, Operation};
use crate::error::Error;
use crate::pipeline::{Pipeline, RequestAudit, RequestFacts};
use crate::service::MAX_BATCH_ITEMS;

/// coffre's services (keys, data keys, HSM, approvals, audit) over one
/// request pipeline; each generated service trait is implemented in its own
/// file under `services/`.
#[derive(Debug, Clone)]
pub struct GrpcApi {
    pub(super) pipeline: Arc<Pipeline>,
    principals: Arc<PrincipalCache>,
}

impl GrpcApi {
    /// `binding` checks that a principal's certificate comes from its
    /// role's CA (`super::tls`).
    pub fn new(pipeline: Arc<Pipeline>, binding: Arc<super::IdentityBinding>) -> Self {
        Self {
            pipeline,
            principals: Arc::new(PrincipalCache::new(binding)),
        }
    }

    pub(super) fn kms(&self) -> &crate::service::Kms {
        self.pipeline.kms()
    }

    /// What the pipeline is told of a request before its body runs.
    pub(super) fn facts<'a, T: AuditedRequest>(&self, request: &'a Request<T>) -> RequestFacts<'a> {
        let body = request.get_ref();
        RequestFacts {
            caller: principal_of(request, &self.principals, |c| self.kms().role_of(c)),
            key: body.key_id(),
            justification: body.justification().map(reason_note_from_pb),
            blob: body.blob(),
            items: body.items(),
        }
    }

    /// One unary request through the pipeline: `body` gets the caller, the
    /// request and its audit record, and returns the response message.
    pub(super) async fn handle<Req, Resp>(
        &self,
        op: Operation,
        request: Request<Req>,
        body: impl AsyncFnOnce(&Caller, Req, &mut RequestAudit) -> Result<Resp, Error>,
    ) -> Result<Response<Resp>, Status>
    where
        Req: AuditedRequest,
    {
        let open = self.pipeline.open(op, self.facts(&request));
        let req = request.into_inner();
        response(
            open.run(async |caller, audit| body(caller, req, audit).await)
                .await,
        )
    }
}

/// What a request names that its audit record notes before any
/// validation, so that a refused request is recorded with it too.
pub(super) trait AuditedRequest: Send + 'static {
    /// The key as typed (empty: none).
    fn key_id(&self) -> &str {
        ""
    }
    /// The raw `justification` field, if the request has one.
    fn justification(&self) -> Option<i32> {
        None
    }
    /// A wrapped key whose header names the key and version.
    fn blob(&self) -> Option<&[u8]> {
        None
    }
    /// How many items the rate limit charges: 1, or a batch's size as sent
    /// (at most [`MAX_BATCH_ITEMS`]; a larger batch is refused anyway).
    fn items(&self) -> u32 {
        1
    }
}

/// A batch's size as the rate limit charges it.
fn batch_items(n: usize) -> u32 {
    u32::try_from(n.clamp(1, MAX_BATCH_ITEMS)).unwrap_or(1)
}

/// Requests that name a key in `key_id`.
macro_rules! names_key {
    ($($t:ty),* $(,)?) => {$(
        impl AuditedRequest for $t {
            fn key_id(&self) -> &str {
                &self.key_id
            }
        }
    )*};
}

names_key!(
    pb::GetKeyRequest,
    pb::RotateKeyRequest,
    pb::DisableKeyRequest,
    pb::EnableKeyRequest,
    pb::ScheduleKeyDeletionRequest,
    pb::CancelKeyDeletionRequest,
    pb::SetRotationPolicyRequest,
    pb::UpdateKeyPolicyRequest,
    pb::RetireKeyVersionsRequest,
    pb::ListEventsRequest,
);

/// Requests that name nothing before validation.
macro_rules! names_nothing {
    ($($t:ty),* $(,)?) => {$( impl AuditedRequest for $t {} )*};
}

names_nothing!(
    pb::CreateKeyRequest,
    pb::ListKeysRequest,
    pb::GetHsmInfoRequest,
    pb::RotateRootKeyRequest,
    pb::ListApprovalsRequest,
    pb::ApproveOperationRequest,
    pb::RejectOperationRequest,
    pb::GetCheckpointRequest,
    pb::ExportLogRequest,
    pb::TailEventsRequest,
);

/// Data-key requests that name a key and give a justification.
macro_rules! names_key_and_reason {
    ($($t:ty),* $(,)?) => {$(
        impl AuditedRequest for $t {
            fn key_id(&self) -> &str {
                &self.key_id
            }
            fn justification(&self) -> Option<i32> {
                Some(self.justification)
            }
        }
    )*};
}

names_key_and_reason!(
    pb::GenerateDataKeyRequest,
    pb::GenerateDataKeyWithoutPlaintextRequest,
    pb::EncryptRequest,
);

impl AuditedRequest for pb::BatchGenerateDataKeyRequest {
    fn key_id(&self) -> &str {
        &self.key_id
    }
    fn justification(&self) -> Option<i32> {
        Some(self.justification)
    }
    fn items(&self) -> u32 {
        batch_items(usize::try_from(self.count).unwrap_or(MAX_BATCH_ITEMS))
    }
}

impl AuditedRequest for pb::BatchDecryptRequest {
    fn justification(&self) -> Option<i32> {
        Some(self.justification)
    }
    fn items(&self) -> u32 {
        batch_items(self.items.len())
    }
}

/// Decrypt and ReEncrypt name their key through the blob's header.
macro_rules! names_blob {
    ($($t:ty),* $(,)?) => {$(
        impl AuditedRequest for $t {
            fn justification(&self) -> Option<i32> {
                Some(self.justification)
            }
            fn blob(&self) -> Option<&[u8]> {
                Some(&self.ciphertext_blob)
            }
        }
    )*};
}

names_blob!(pb::DecryptRequest, pb::ReEncryptRequest);
