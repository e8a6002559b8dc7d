//! `ApprovalService`: M-of-N approvals of sensitive operations, for
//! operators.

use tonic::{Request, Response, Status};

use crate::authz::Operation;
use crate::grpc::GrpcApi;
use crate::grpc::convert::approval_to_pb;
use crate::grpc::pb::{self, approval_service_server::ApprovalService};
use crate::service::parse_approval_id;

#[tonic::async_trait]
impl ApprovalService for GrpcApi {
    async fn list_approvals(
        &self,
        request: Request<pb::ListApprovalsRequest>,
    ) -> Result<Response<pb::ListApprovalsResponse>, Status> {
        self.handle(Operation::ListApprovals, request, async |caller, req, _| {
            let all = self
                .kms()
                .list_approvals(caller, req.include_closed)
                .await?;
            Ok(pb::ListApprovalsResponse {
                approvals: all.iter().map(approval_to_pb).collect(),
            })
        })
        .await
    }

    async fn approve_operation(
        &self,
        request: Request<pb::ApproveOperationRequest>,
    ) -> Result<Response<pb::ApproveOperationResponse>, Status> {
        let op = Operation::ApproveOperation;
        self.handle(op, request, async |caller, req, audit| {
            let id = parse_approval_id(&req.approval_id)?;
            audit.detail(format!("approval {id}"));
            let a = self.kms().approve(caller, id).await?;
            if let Some(key) = a.operation.key_id() {
                audit.resolved_key(key, None);
            }
            Ok(pb::ApproveOperationResponse {
                approval: Some(approval_to_pb(&a)),
            })
        })
        .await
    }

    async fn reject_operation(
        &self,
        request: Request<pb::RejectOperationRequest>,
    ) -> Result<Response<pb::RejectOperationResponse>, Status> {
        let op = Operation::RejectOperation;
        self.handle(op, request, async |caller, req, audit| {
            let id = parse_approval_id(&req.approval_id)?;
            audit.detail(format!("approval {id}"));
            let a = self.kms().reject(caller, id).await?;
            if let Some(key) = a.operation.key_id() {
                audit.resolved_key(key, None);
            }
            Ok(pb::RejectOperationResponse {
                approval: Some(approval_to_pb(&a)),
            })
        })
        .await
    }
}
