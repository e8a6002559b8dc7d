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
        ApprovalCommand::Show { id, connect: c } => {
            let a = find(&mut client(&c).await?, &id).await?;
            output::approval_detail(&a, c.json)
        }
        ApprovalCommand::Approve {
            id,
            digest,
            connect: c,
        } => {
            let mut approvals = client(&c).await?;
            let digest = match digest {
                Some(d) => d,
                None => confirm(&mut approvals, &id).await?,
            };
            let resp = approvals
                .approve_operation(pb::ApproveOperationRequest {
                    approval_id: id,
                    operation_sha256: digest,
                })
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

/// The approval `id` as the server has it (closed ones included).
async fn find(
    approvals: &mut ApprovalServiceClient<Channel>,
    id: &str,
) -> anyhow::Result<pb::Approval> {
    let all = approvals
        .list_approvals(pb::ListApprovalsRequest {
            include_closed: true,
        })
        .await
        .map_err(rpc_error)?
        .into_inner()
        .approvals;
    all.into_iter()
        .find(|a| a.approval_id.eq_ignore_ascii_case(id.trim()))
        .with_context(|| format!("no approval {id} (see `coffre approval list --all`)"))
}

/// Without `--digest`: on a terminal, shows the operation in full and asks;
/// the digest sent is the one shown. Without a terminal, refuses.
async fn confirm(
    approvals: &mut ApprovalServiceClient<Channel>,
    id: &str,
) -> anyhow::Result<String> {
    use std::io::{BufRead, IsTerminal, Write};
    if !(std::io::stdin().is_terminal() && std::io::stderr().is_terminal()) {
        bail!(
            "--digest is required without a terminal: review the operation with \
             `coffre approval show {id}` and pass its operation_sha256 as --digest"
        );
    }
    let a = find(approvals, id).await?;
    output::approval_detail(&a, false)?;
    eprint!("approve exactly this operation? type yes: ");
    std::io::stderr().flush().ok();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .context("reading the answer")?;
    if answer.trim() != "yes" {
        bail!("not approved");
    }
    Ok(a.operation_sha256)
}

/// The approval service, as the operator unless `--as` names another
/// identity.
async fn client(c: &ConnectArgs) -> anyhow::Result<ApprovalServiceClient<Channel>> {
    Ok(ApprovalServiceClient::new(connect(c, "operator").await?))
}
