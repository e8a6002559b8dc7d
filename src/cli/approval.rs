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
            if a.status() == pb::ApprovalStatus::ApprovalPending && !c.json {
                print!("{}", pending_hint(&a.approval_id, Some(&a), &c));
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

/// After an operation the quorum holds back: its approval id and the
/// commands the other operators run, with the digest of the operation as
/// proposed and `--as` names from the dev PKI. `--json`: the id only.
pub(super) async fn print_pending(approval_id: &str, c: &ConnectArgs) -> anyhow::Result<()> {
    if c.json {
        return output::pending(approval_id, true);
    }
    // Best effort: without the approval (not listed to this caller, say),
    // the hint has placeholders instead of the digest and names.
    let approval = match client(c).await {
        Ok(mut approvals) => find(&mut approvals, approval_id).await.ok(),
        Err(_) => None,
    };
    print!("{}", pending_hint(approval_id, approval.as_ref(), c));
    Ok(())
}

/// The dev operators an approval still needs (`operator`, `operator-2`,
/// …: `coffre dev --quorum M` issues M of them), the proposer and those who
/// approved left out; `None` when the proposer is not a dev principal.
fn dev_approvers(a: &pb::Approval) -> Option<Vec<String>> {
    let prefix = crate::pki::dev_principal("");
    a.proposer.strip_prefix(&prefix)?;
    let voted: Vec<&str> = std::iter::once(a.proposer.as_str())
        .chain(a.approved_by.iter().map(String::as_str))
        .filter_map(|p| p.strip_prefix(&prefix))
        .collect();
    let needed = usize::try_from(a.approvals_required)
        .unwrap_or(usize::MAX)
        .saturating_sub(a.approved_by.len().max(1))
        .max(1);
    let candidates = std::iter::once("operator".to_string())
        .chain((2..=a.approvals_required.max(2)).map(|n| format!("operator-{n}")));
    Some(
        candidates
            .filter(|name| !voted.contains(&name.as_str()))
            .take(needed)
            .collect(),
    )
}

/// The text [`print_pending`] prints.
fn pending_hint(id: &str, approval: Option<&pb::Approval>, c: &ConnectArgs) -> String {
    let mut connect = String::new();
    if c.data_dir != std::path::Path::new(super::args::DEFAULT_DATA_DIR) {
        connect.push_str(&format!(" --data-dir {}", c.data_dir.display()));
    }
    if let Some(node) = &c.node {
        connect.push_str(&format!(" --node {node}"));
    } else if c.endpoint() != super::args::DEFAULT_ENDPOINT {
        connect.push_str(&format!(" --endpoint {}", c.endpoint()));
    }
    let me = c.identity.as_deref().unwrap_or("operator");
    let (votes, digest, names) = match approval {
        Some(a) => (
            format!(
                " ({} of {} approvals)",
                a.approved_by.len().max(1),
                a.approvals_required
            ),
            a.operation_sha256.clone(),
            dev_approvers(a).unwrap_or_else(|| vec!["<another operator>".into()]),
        ),
        None => (
            String::new(),
            "<operation_sha256 from approval show>".into(),
            vec![
                if me == "operator" {
                    "operator-2"
                } else {
                    "operator"
                }
                .to_string(),
            ],
        ),
    };
    let mut out = format!("this operation needs more approvals: it is pending as {id}{votes}\n");
    out.push_str(
        "another operator reviews it, then approves exactly that operation (the digest):\n",
    );
    for name in &names {
        out.push_str(&format!(
            "  coffre approval show {id} --as {name}{connect}\n"
        ));
        out.push_str(&format!(
            "  coffre approval approve {id} --digest {digest} --as {name}{connect}\n"
        ));
    }
    if let Some(name) = names.first() {
        out.push_str(&format!(
            "or refuses it: coffre approval reject {id} --as {name}{connect}\n"
        ));
    }
    out
}

/// The approval service, as the operator unless `--as` names another
/// identity.
async fn client(c: &ConnectArgs) -> anyhow::Result<ApprovalServiceClient<Channel>> {
    Ok(ApprovalServiceClient::new(connect(c, "operator").await?))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn connect(extra: &[&str]) -> ConnectArgs {
        #[derive(Debug, Parser)]
        struct Wrap {
            #[command(flatten)]
            c: ConnectArgs,
        }
        let args = std::iter::once("x").chain(extra.iter().copied());
        Wrap::parse_from(args).c
    }

    fn approval(required: u32, approved_by: &[&str]) -> pb::Approval {
        let dev = crate::pki::dev_principal;
        pb::Approval {
            approval_id: "ab12".into(),
            proposer: dev("operator"),
            approved_by: approved_by.iter().map(|n| dev(n)).collect(),
            approvals_required: required,
            operation_sha256: "d1e5".into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_hint_names_the_second_operator_and_the_digest() {
        let c = connect(&["--data-dir", "/tmp/q", "--endpoint", "https://127.0.0.1:9"]);
        let hint = pending_hint("ab12", Some(&approval(2, &["operator"])), &c);
        assert!(
            hint.contains(
                "coffre approval approve ab12 --digest d1e5 --as operator-2 --data-dir /tmp/q \
                 --endpoint https://127.0.0.1:9\n"
            ),
            "{hint}"
        );
        assert!(hint.contains("(1 of 2 approvals)"), "{hint}");
        assert!(!hint.contains("--as operator "), "{hint}");
    }

    #[test]
    fn under_a_quorum_of_three_the_hint_names_each_operator_still_needed() {
        let hint = pending_hint("ab12", Some(&approval(3, &["operator"])), &connect(&[]));
        assert!(hint.contains("--as operator-2\n"), "{hint}");
        assert!(hint.contains("--as operator-3\n"), "{hint}");
        assert!(
            !hint.contains("--data-dir"),
            "defaults are left out: {hint}"
        );
        let hint = pending_hint(
            "ab12",
            Some(&approval(3, &["operator", "operator-2"])),
            &connect(&[]),
        );
        assert!(hint.contains("--as operator-3\n"), "{hint}");
        assert!(!hint.contains("--as operator-2"), "{hint}");
    }

    #[test]
    fn without_the_approval_the_hint_has_placeholders() {
        let hint = pending_hint("ab12", None, &connect(&["--as", "operator-2"]));
        assert!(
            hint.contains("--digest <operation_sha256 from approval show> --as operator\n"),
            "{hint}"
        );
    }
}
