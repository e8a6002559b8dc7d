//! `ApprovalService`: M-of-N approvals of sensitive operations, for
//! operators.

use tonic::{Request, Response, Status};

use crate::authz::Operation;
use crate::grpc::GrpcApi;
use crate::grpc::convert::approval_to_pb;
use crate::grpc::pb::{self, approval_service_server::ApprovalService};
use crate::service::canonical::operation_audit;
use crate::service::parse_approval_id;
use crate::store::approvals::{Approval, ApprovalStatus};

/// What the audit record of an approval says: the operation approved (its
/// digest, and for a policy the policy), and what became of it — recorded
/// and still short of M, or executed with its outcome.
fn approval_audit(a: &Approval) -> String {
    let what = operation_audit(&a.operation);
    let kind = a.operation.kind().name();
    let result = a.result.as_deref().unwrap_or("");
    let state = match a.status {
        ApprovalStatus::Pending => {
            let mut s = format!(
                "recorded, {} of {} approvals",
                a.approved_by.len(),
                a.approvals_required
            );
            if !result.is_empty() {
                s.push_str(&format!(" ({result})"));
            }
            s
        }
        ApprovalStatus::Executed => format!("executed {kind}: OK ({result})"),
        ApprovalStatus::Failed => format!("executed {kind}: FAILED {result}"),
        ApprovalStatus::Executing => format!("executing {kind}"),
        ApprovalStatus::Rejected => format!("rejected {kind}"),
        ApprovalStatus::Expired => format!("expired {kind}"),
    };
    format!("approval {}: {state}; {what}", a.id)
}

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
            audit.detail(format!(
                "approval {id}: operation_sha256 presented {:?}",
                req.operation_sha256
            ));
            let a = self
                .kms()
                .approve(caller, id, &req.operation_sha256)
                .await?;
            audit.detail(approval_audit(&a));
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
            audit.detail(approval_audit(&a));
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
