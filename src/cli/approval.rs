//! `coffre approval ...`: the operators' calls to the approval service
//! (M-of-N quorum).

use anyhow::{Context, bail};

use tonic::transport::Channel;

use super::client::{connect, rpc_error};
use super::output;
use super::{ApprovalCommand, ConnectArgs};
use crate::grpc::pb;
use crate::grpc::pb::approval_service_client::ApprovalServiceClient;

pub async fn run(cmd: ApprovalCommand) -> anyhow::Result<()> {
    match cmd {
        ApprovalCommand::List { all, connect: c } => {
            let resp = client(&c)
                .await?
                .list_approvals(pb::ListApprovalsRequest {
                    include_closed: all,
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            output::approvals(&resp.approvals, c.json)
        }
        ApprovalCommand::Approve { id, connect: c } => {
            let resp = client(&c)
                .await?
                .approve_operation(pb::ApproveOperationRequest { approval_id: id })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let a = resp.approval.context("the server returned no approval")?;
            output::approvals(std::slice::from_ref(&a), c.json)?;
            if a.status() == pb::ApprovalStatus::ApprovalFailed {
                bail!("the approved operation failed: {}", a.result);
            }
            Ok(())
        }
        ApprovalCommand::Reject { id, connect: c } => {
            let resp = client(&c)
                .await?
                .reject_operation(pb::RejectOperationRequest { approval_id: id })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let a = resp.approval.context("the server returned no approval")?;
            output::approvals(std::slice::from_ref(&a), c.json)
        }
    }
}

/// The approval service, as the operator unless `--as` names another
/// identity.
async fn client(c: &ConnectArgs) -> anyhow::Result<ApprovalServiceClient<Channel>> {
    Ok(ApprovalServiceClient::new(connect(c, "operator").await?))
}
