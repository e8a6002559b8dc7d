//! Approvals that show what is approved, over real gRPC under a quorum of
//! two operators: the proposed policy and its difference in ListApprovals,
//! the digest an approver must present, RetireKeyVersions held in both
//! directions, duplicates refused, and audit records naming the policy and
//! the outcome (issue #15: H2, L2, L7).

use coffre::authz::Role;
use coffre::grpc::pb::{
    self, approval_service_client::ApprovalServiceClient, audit_service_client::AuditServiceClient,
    key_service_client::KeyServiceClient,
};
use coffre::pki::dev_principal;
use coffre::service::QuorumOptions;
use coffre::service::canonical::policy_sha256;
use tonic::Code;
use tonic::transport::Channel;

use crate::common::{REASON, TestServer, ctx};

/// Two operators (`operator`, `operator-2`), a service, an auditor; M = 2
/// for every sensitive operation.
async fn quorum_server() -> TestServer {
    let options = coffre::service::KmsOptions {
        quorum: QuorumOptions::uniform(2),
        ..coffre::server::dev::dev_kms_options()
    };
    TestServer::start_with_options(
        &[
            ("operator", Role::Operator, &[]),
            ("operator-2", Role::Operator, &[]),
            ("service", Role::Service, &[]),
            ("auditor", Role::Auditor, &[]),
        ],
        options,
    )
    .await
}

async fn approvals_as(server: &TestServer, who: &str) -> ApprovalServiceClient<Channel> {
    ApprovalServiceClient::new(server.channel(who).await)
}

async fn keys_as(server: &TestServer, who: &str) -> KeyServiceClient<Channel> {
    KeyServiceClient::new(server.channel(who).await)
}

/// Every data-key operation for `principal`, under the default reasons.
fn grant_all(principal: &str) -> pb::Grant {
    pb::Grant {
        principal: principal.to_string(),
        operations: vec![
            pb::DataKeyOperation::GenerateDataKey as i32,
            pb::DataKeyOperation::GenerateDataKeyWithoutPlaintext as i32,
            pb::DataKeyOperation::Encrypt as i32,
            pb::DataKeyOperation::Decrypt as i32,
            pb::DataKeyOperation::ReEncrypt as i32,
        ],
    }
}

fn default_reasons() -> Vec<i32> {
    vec![
        pb::AccessReason::CustomerInitiatedAccess as i32,
        pb::AccessReason::CustomerInitiatedSupport as i32,
        pb::AccessReason::ProviderInitiatedService as i32,
        pb::AccessReason::ProviderSystemOperation as i32,
        pb::AccessReason::ProviderInitiatedReview as i32,
    ]
}

/// One grant to `principal`, one context rule: the shape of the review's
/// attack (same counts as the policy it replaces).
fn one_grant_policy(principal: &str, extra_reasons: &[pb::AccessReason]) -> pb::KeyPolicy {
    let mut reasons = default_reasons();
    reasons.extend(extra_reasons.iter().map(|r| *r as i32));
    pb::KeyPolicy {
        grants: vec![grant_all(principal)],
        required_context: [(
            "tenant".to_string(),
            pb::ContextRule {
                values: vec![],
                equals_caller_attribute: String::new(),
            },
        )]
        .into_iter()
        .collect(),
        accepted_reasons: reasons,
    }
}

async fn create_key(
    keys: &mut KeyServiceClient<Channel>,
    alias: &str,
    policy: pb::KeyPolicy,
) -> pb::KeyMetadata {
    keys.create_key(pb::CreateKeyRequest {
        alias: alias.to_string(),
        policy: Some(policy),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .key
    .unwrap()
}

async fn pending_approvals(a: &mut ApprovalServiceClient<Channel>) -> Vec<pb::Approval> {
    a.list_approvals(pb::ListApprovalsRequest {
        include_closed: false,
    })
    .await
    .unwrap()
    .into_inner()
    .approvals
}

async fn key(keys: &mut KeyServiceClient<Channel>, id: &str) -> pb::KeyMetadata {
    keys.get_key(pb::GetKeyRequest {
        key_id: id.to_string(),
    })
    .await
    .unwrap()
    .into_inner()
    .key
    .unwrap()
}

async fn all_events(server: &TestServer) -> Vec<pb::AuditEvent> {
    let mut auditor = AuditServiceClient::new(server.channel("auditor").await);
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = auditor
            .list_events(pb::ListEventsRequest {
                page_size: 1000,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        out.extend(page.events);
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}

/// UpdateKeyPolicy under the quorum: the pending approval's id.
async fn propose(
    keys: &mut KeyServiceClient<Channel>,
    key_id: &str,
    policy: &pb::KeyPolicy,
) -> String {
    keys.update_key_policy(pb::UpdateKeyPolicyRequest {
        key_id: key_id.to_string(),
        policy: Some(policy.clone()),
    })
    .await
    .unwrap()
    .into_inner()
    .pending_approval_id
}

/// The policy as the library models it (the test's own conversion).
fn model(p: &pb::KeyPolicy) -> coffre::model::KeyPolicy {
    use coffre::model::{AccessReason as R, ContextRule, DataKeyOperation as O, Grant};
    let op = |o: i32| match pb::DataKeyOperation::try_from(o).unwrap() {
        pb::DataKeyOperation::GenerateDataKey => O::GenerateDataKey,
        pb::DataKeyOperation::GenerateDataKeyWithoutPlaintext => O::GenerateDataKeyWithoutPlaintext,
        pb::DataKeyOperation::Encrypt => O::Encrypt,
        pb::DataKeyOperation::Decrypt => O::Decrypt,
        pb::DataKeyOperation::ReEncrypt => O::ReEncrypt,
        other => panic!("{other:?}"),
    };
    let reason = |r: i32| match pb::AccessReason::try_from(r).unwrap() {
        pb::AccessReason::CustomerInitiatedAccess => R::CustomerInitiatedAccess,
        pb::AccessReason::CustomerInitiatedSupport => R::CustomerInitiatedSupport,
        pb::AccessReason::ProviderInitiatedService => R::ProviderInitiatedService,
        pb::AccessReason::ProviderSystemOperation => R::ProviderSystemOperation,
        pb::AccessReason::ProviderInitiatedReview => R::ProviderInitiatedReview,
        pb::AccessReason::ThirdPartyDataRequest => R::ThirdPartyDataRequest,
        pb::AccessReason::Unspecified => R::Unspecified,
    };
    coffre::model::KeyPolicy {
        grants: p
            .grants
            .iter()
            .map(|g| Grant {
                principal: g.principal.clone(),
                operations: g.operations.iter().map(|o| op(*o)).collect(),
            })
            .collect(),
        required_context: p
            .required_context
            .iter()
            .map(|(k, r)| {
                (
                    k.clone(),
                    ContextRule {
                        values: r.values.iter().cloned().collect(),
                        equals_caller_attribute: (!r.equals_caller_attribute.is_empty())
                            .then(|| r.equals_caller_attribute.clone()),
                    },
                )
            })
            .collect(),
        accepted_reasons: p.accepted_reasons.iter().map(|r| reason(*r)).collect(),
    }
}

fn digest_of(p: &pb::KeyPolicy) -> String {
    policy_sha256(&model(p))
}

#[tokio::test]
async fn a_same_count_policy_swap_is_visible_and_a_stale_digest_is_refused() {
    let server = quorum_server().await;
    let mut keys = keys_as(&server, "operator").await;
    let service = dev_principal("service");
    let evil = dev_principal("evil");
    let current = one_grant_policy(&service, &[]);
    let k = create_key(&mut keys, "swap", current.clone()).await;

    // A benign proposal and the attack, with the same counts as the
    // current policy: one grant, one context rule.
    let mut benign = one_grant_policy(&service, &[]);
    benign.required_context.insert(
        "tenant".into(),
        pb::ContextRule {
            values: vec!["t1".into()],
            equals_caller_attribute: String::new(),
        },
    );
    let attack = one_grant_policy(&evil, &[pb::AccessReason::ThirdPartyDataRequest]);
    let mut ids = Vec::new();
    for policy in [&benign, &attack] {
        let resp = keys
            .update_key_policy(pb::UpdateKeyPolicyRequest {
                key_id: k.key_id.clone(),
                policy: Some(policy.clone()),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!resp.pending_approval_id.is_empty(), "{resp:?}");
        ids.push(resp.pending_approval_id);
    }

    // What the second operator sees: the whole proposed policy, the current
    // one, and a difference that names the swapped grant and the new reason.
    let mut approver = approvals_as(&server, "operator-2").await;
    let listed = pending_approvals(&mut approver).await;
    assert_eq!(listed.len(), 2);
    let seen_attack = listed.iter().find(|a| a.approval_id == ids[1]).unwrap();
    let seen_benign = listed.iter().find(|a| a.approval_id == ids[0]).unwrap();
    assert_eq!(seen_attack.key_id, k.key_id);
    assert_eq!(seen_attack.proposed_policy.as_ref(), Some(&attack));
    assert_eq!(
        seen_attack.current_policy.as_ref().map(digest_of),
        Some(digest_of(&current))
    );
    assert_eq!(seen_attack.operation_sha256.len(), 64, "{seen_attack:?}");
    assert!(
        seen_attack
            .operation_sha256
            .chars()
            .all(|c| c.is_ascii_hexdigit()),
        "{seen_attack:?}"
    );
    assert_ne!(seen_attack.operation_sha256, seen_benign.operation_sha256);
    let changes = &seen_attack.changes;
    for expected in [
        format!("- grant {service:?}"),
        format!("+ grant {evil:?}"),
        "+ accepted reason THIRD_PARTY_DATA_REQUEST".to_string(),
    ] {
        assert!(
            changes.iter().any(|l| l.starts_with(&expected)),
            "{expected:?} not in {changes:?}"
        );
    }
    assert!(
        seen_benign
            .changes
            .iter()
            .any(|l| l.starts_with("~ context rule \"tenant\"")),
        "{:?}",
        seen_benign.changes
    );

    // No digest: refused, with where to get it.
    let err = approver
        .approve_operation(pb::ApproveOperationRequest {
            approval_id: ids[1].clone(),
            operation_sha256: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("operation_sha256"), "{err:?}");
    // The digest of what the approver reviewed (the benign one) does not
    // approve the attack.
    let err = approver
        .approve_operation(pb::ApproveOperationRequest {
            approval_id: ids[1].clone(),
            operation_sha256: seen_benign.operation_sha256.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("changed since you saw it"),
        "{err:?}"
    );

    // Nothing changed: the key's policy, and the approval still at 1 of 2.
    let now = key(&mut keys, &k.key_id).await;
    assert_eq!(
        now.policy.as_ref().map(digest_of),
        Some(digest_of(&current))
    );
    let still = pending_approvals(&mut approver).await;
    let a = still.iter().find(|a| a.approval_id == ids[1]).unwrap();
    assert_eq!(a.approved_by, vec![dev_principal("operator")]);
    assert_eq!(a.status(), pb::ApprovalStatus::ApprovalPending);

    // The benign one, approved with its own digest, runs.
    let done = approver
        .approve_operation(pb::ApproveOperationRequest {
            approval_id: ids[0].clone(),
            operation_sha256: seen_benign.operation_sha256.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .approval
        .unwrap();
    assert_eq!(
        done.status(),
        pb::ApprovalStatus::ApprovalExecuted,
        "{done:?}"
    );
    let now = key(&mut keys, &k.key_id).await;
    assert_eq!(now.policy.as_ref().map(digest_of), Some(digest_of(&benign)));
    server.stop().await;
}

#[tokio::test]
async fn retire_versions_by_one_operator_is_pending_not_applied() {
    let server = quorum_server().await;
    let mut keys = keys_as(&server, "operator").await;
    let k = create_key(
        &mut keys,
        "retire",
        one_grant_policy(&dev_principal("service"), &[]),
    )
    .await;
    let mut data = server.data().await;
    let context = ctx(&[("tenant", "t1")]);
    let old = data
        .generate_data_key(pb::GenerateDataKeyRequest {
            key_id: k.key_id.clone(),
            encryption_context: context.clone(),
            justification: REASON,
            number_of_bytes: 32,
        })
        .await
        .unwrap()
        .into_inner();
    for _ in 0..2 {
        keys.rotate_key(pb::RotateKeyRequest {
            key_id: k.key_id.clone(),
        })
        .await
        .unwrap();
    }
    let decrypt = |blob: Vec<u8>| pb::DecryptRequest {
        ciphertext_blob: blob,
        encryption_context: context.clone(),
        justification: REASON,
        ..Default::default()
    };
    let retire = |min: u32| pb::RetireKeyVersionsRequest {
        key_id: k.key_id.clone(),
        min_decryption_version: min,
    };

    // Retiring every version but the newest: held.
    let held = keys
        .retire_key_versions(retire(3))
        .await
        .unwrap()
        .into_inner();
    assert!(!held.pending_approval_id.is_empty(), "{held:?}");
    assert_eq!(key(&mut keys, &k.key_id).await.min_decryption_version, 1);
    data.decrypt(decrypt(old.ciphertext_blob.clone()))
        .await
        .expect("version 1 still decrypts: nothing was retired");
    let mut approver = approvals_as(&server, "operator-2").await;
    let a = pending_approvals(&mut approver).await.pop().unwrap();
    assert!(a.operation.starts_with("RetireKeyVersions"), "{a:?}");
    assert!(a.changes[0].contains("1 → 3"), "{:?}", a.changes);
    approver
        .approve_operation(pb::ApproveOperationRequest {
            approval_id: a.approval_id.clone(),
            operation_sha256: a.operation_sha256.clone(),
        })
        .await
        .unwrap();
    assert_eq!(key(&mut keys, &k.key_id).await.min_decryption_version, 3);
    let err = data
        .decrypt(decrypt(old.ciphertext_blob.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // Making the retired versions decrypt again: held too.
    let held = keys
        .retire_key_versions(retire(1))
        .await
        .unwrap()
        .into_inner();
    assert!(!held.pending_approval_id.is_empty(), "{held:?}");
    assert_eq!(key(&mut keys, &k.key_id).await.min_decryption_version, 3);
    let err = data
        .decrypt(decrypt(old.ciphertext_blob.clone()))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::FailedPrecondition,
        "still retired: {err:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_duplicate_proposal_is_refused() {
    let server = quorum_server().await;
    let mut keys = keys_as(&server, "operator").await;
    let k = create_key(
        &mut keys,
        "dup",
        one_grant_policy(&dev_principal("service"), &[]),
    )
    .await;
    let schedule = || pb::ScheduleKeyDeletionRequest {
        key_id: k.key_id.clone(),
        pending_window_days: 7,
    };
    let first = keys
        .schedule_key_deletion(schedule())
        .await
        .unwrap()
        .into_inner()
        .pending_approval_id;
    assert!(!first.is_empty());
    // Again, by the other operator: refused, naming the open approval.
    let mut other = keys_as(&server, "operator-2").await;
    let err = other.schedule_key_deletion(schedule()).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains(&first), "{err:?}");
    let mut approver = approvals_as(&server, "operator-2").await;
    assert_eq!(
        pending_approvals(&mut approver).await.len(),
        1,
        "nothing created"
    );
    server.stop().await;
}

#[tokio::test]
async fn audit_records_carry_the_policy_digest_and_the_outcome() {
    let server = quorum_server().await;
    let mut keys = keys_as(&server, "operator").await;
    let initial = one_grant_policy(&dev_principal("service"), &[]);
    let k = create_key(&mut keys, "audited", initial.clone()).await;
    let proposed = one_grant_policy(&dev_principal("service-2"), &[]);
    let digest = digest_of(&proposed);

    // Proposed, then the key changes (disabled): the approval's execution
    // fails, and its record says so.
    let failing = propose(&mut keys, &k.key_id, &proposed).await;
    keys.disable_key(pb::DisableKeyRequest {
        key_id: k.key_id.clone(),
    })
    .await
    .unwrap();
    let mut approver = approvals_as(&server, "operator-2").await;
    let a = pending_approvals(&mut approver).await.pop().unwrap();
    assert_eq!(a.approval_id, failing);
    let failed = approver
        .approve_operation(pb::ApproveOperationRequest {
            approval_id: failing.clone(),
            operation_sha256: a.operation_sha256.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .approval
        .unwrap();
    assert_eq!(
        failed.status(),
        pb::ApprovalStatus::ApprovalFailed,
        "{failed:?}"
    );

    // Proposed again on the key as it is now; approved; runs.
    let ok = propose(&mut keys, &k.key_id, &proposed).await;
    let a = pending_approvals(&mut approver).await.pop().unwrap();
    approver
        .approve_operation(pb::ApproveOperationRequest {
            approval_id: ok.clone(),
            operation_sha256: a.operation_sha256.clone(),
        })
        .await
        .unwrap();

    let events = all_events(&server).await;
    let detail_of = |operation: &str, needle: &str| {
        events
            .iter()
            .filter(|e| e.operation == operation && e.detail.contains(needle))
            .map(|e| e.detail.clone())
            .collect::<Vec<_>>()
    };
    let created = detail_of("CreateKey", "policy_sha256=");
    assert_eq!(created.len(), 1, "{events:?}");
    assert!(
        created[0].contains(&format!("policy_sha256={}", digest_of(&initial))),
        "{created:?}"
    );
    assert!(created[0].contains("policy={\"v\":1,"), "{created:?}");
    let proposals = detail_of("UpdateKeyPolicy", &format!("policy_sha256={digest}"));
    assert_eq!(proposals.len(), 2, "{events:?}");
    assert!(
        proposals.iter().all(|d| d.contains("pending approval")
            && d.contains("operation_sha256=")
            && d.contains(&format!("\"principal\":\"{}\"", dev_principal("service-2")))),
        "{proposals:?}"
    );
    let failed_record = detail_of("ApproveOperation", &failing);
    assert_eq!(failed_record.len(), 1, "{events:?}");
    assert!(
        failed_record[0].contains("executed UpdateKeyPolicy: FAILED")
            && failed_record[0].contains(&format!("policy_sha256={digest}")),
        "{failed_record:?}"
    );
    let ok_record = detail_of("ApproveOperation", &ok);
    assert_eq!(ok_record.len(), 1, "{events:?}");
    assert!(
        ok_record[0].contains("executed UpdateKeyPolicy: OK")
            && ok_record[0].contains(&format!("policy_sha256={digest}")),
        "{ok_record:?}"
    );
    server.stop().await;
}
