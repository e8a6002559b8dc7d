//! Authorization end to end: the RPC × role matrix, per-key policies
//! (grants, context rules bound to caller attributes, justifications) and
//! the absence of an existence oracle.

use coffre::authz::Role;
use coffre::grpc::pb::{
    self, data_key_service_client::DataKeyServiceClient, hsm_service_client::HsmServiceClient,
    key_service_client::KeyServiceClient,
};
use tonic::{Code, Status};

use crate::common::{REASON, TestServer, ctx};

fn policy(grants: &[(&str, &[pb::DataKeyOperation])]) -> pb::KeyPolicy {
    pb::KeyPolicy {
        grants: grants
            .iter()
            .map(|(who, ops)| pb::Grant {
                principal: format!("spiffe://coffre.dev/{who}"),
                operations: ops.iter().map(|o| *o as i32).collect(),
            })
            .collect(),
        required_context: [(
            "tenant".to_string(),
            pb::ContextRule {
                values: vec![],
                equals_caller_attribute: "tenant".into(),
            },
        )]
        .into_iter()
        .collect(),
        accepted_reasons: vec![REASON],
    }
}

fn gen_req(key: &str, tenant: Option<&str>, why: i32) -> pb::GenerateDataKeyRequest {
    pb::GenerateDataKeyRequest {
        key_id: key.into(),
        encryption_context: tenant.map(|t| ctx(&[("tenant", t)])).unwrap_or_default(),
        justification: why,
        number_of_bytes: 32,
    }
}

fn uuid_nil() -> String {
    "00000000-0000-0000-0000-000000000000".to_string()
}

fn denied(s: &Status) -> String {
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    s.message().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_policies_grants_context_binding_and_justifications() {
    use pb::DataKeyOperation as Op;
    let server = TestServer::start_with(&[
        ("operator", Role::Operator, &[]),
        ("svc-acme", Role::Service, &[("tenant", "acme")]),
        ("svc-globex", Role::Service, &[("tenant", "globex")]),
    ])
    .await;
    let mut keys = KeyServiceClient::new(server.channel("operator").await);
    let key = keys
        .create_key(pb::CreateKeyRequest {
            alias: "tenant-data".into(),
            policy: Some(policy(&[
                ("svc-acme", &[Op::GenerateDataKey, Op::Decrypt]),
                ("svc-globex", &[Op::Decrypt]),
            ])),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    let shown = key.policy.clone().unwrap();
    assert_eq!(shown.grants.len(), 2, "GetKey/CreateKey expose the policy");

    let mut acme = DataKeyServiceClient::new(server.channel("svc-acme").await);
    let mut globex = DataKeyServiceClient::new(server.channel("svc-globex").await);

    // The granted service, its own tenant, an accepted reason: allowed.
    let dk = acme
        .generate_data_key(gen_req("tenant-data", Some("acme"), REASON))
        .await
        .unwrap()
        .into_inner();
    // Another tenant's context, no context, another reason: refused.
    let m = denied(
        &acme
            .generate_data_key(gen_req("tenant-data", Some("globex"), REASON))
            .await
            .unwrap_err(),
    );
    assert!(m.contains("tenant"), "{m}");
    let m = denied(
        &acme
            .generate_data_key(gen_req("tenant-data", None, REASON))
            .await
            .unwrap_err(),
    );
    assert!(m.contains("requires the encryption context key"), "{m}");
    for why in [
        pb::AccessReason::ProviderSystemOperation,
        pb::AccessReason::ThirdPartyDataRequest,
        pb::AccessReason::Unspecified,
    ] {
        let m = denied(
            &acme
                .generate_data_key(gen_req("tenant-data", Some("acme"), why as i32))
                .await
                .unwrap_err(),
        );
        assert!(m.contains("justification"), "{m}");
    }
    // An operation that is not granted.
    let m = denied(
        &acme
            .encrypt(pb::EncryptRequest {
                key_id: "tenant-data".into(),
                plaintext: b"x".to_vec(),
                encryption_context: ctx(&[("tenant", "acme")]),
                justification: REASON,
            })
            .await
            .unwrap_err(),
    );
    assert!(m.contains("does not exist or you are not allowed"), "{m}");

    // globex may decrypt, but only with its own tenant — so not acme's blob.
    let decrypt = |tenant: &str| pb::DecryptRequest {
        ciphertext_blob: dk.ciphertext_blob.clone(),
        encryption_context: ctx(&[("tenant", tenant)]),
        justification: REASON,
        key_id: String::new(),
    };
    denied(&globex.decrypt(decrypt("acme")).await.unwrap_err());
    let out = acme.decrypt(decrypt("acme")).await.unwrap().into_inner();
    assert_eq!(out.plaintext, dk.plaintext);

    // No existence oracle: globex asking to generate with this key (no
    // grant) gets exactly the answer for a key that does not exist.
    let for_real = denied(
        &globex
            .generate_data_key(gen_req("tenant-data", Some("globex"), REASON))
            .await
            .unwrap_err(),
    );
    let for_none = denied(
        &globex
            .generate_data_key(gen_req("no-such-key", Some("globex"), REASON))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        for_real.replace("tenant-data", "KEY"),
        for_none.replace("no-such-key", "KEY")
    );
    // Nor is the key's state revealed to it.
    keys.disable_key(pb::DisableKeyRequest {
        key_id: "tenant-data".into(),
    })
    .await
    .unwrap();
    let while_disabled = denied(
        &globex
            .generate_data_key(gen_req("tenant-data", Some("globex"), REASON))
            .await
            .unwrap_err(),
    );
    assert_eq!(while_disabled, for_real);
    keys.enable_key(pb::EnableKeyRequest {
        key_id: "tenant-data".into(),
    })
    .await
    .unwrap();

    // UpdateKeyPolicy: globex may now generate, under its own tenant.
    let updated = keys
        .update_key_policy(pb::UpdateKeyPolicyRequest {
            key_id: "tenant-data".into(),
            policy: Some(policy(&[
                ("svc-acme", &[Op::GenerateDataKey, Op::Decrypt]),
                ("svc-globex", &[Op::GenerateDataKey, Op::Decrypt]),
            ])),
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(updated.policy.unwrap().grants[1].operations.len(), 2);
    globex
        .generate_data_key(gen_req("tenant-data", Some("globex"), REASON))
        .await
        .unwrap();
    // A malformed policy is refused and changes nothing.
    let err = keys
        .update_key_policy(pb::UpdateKeyPolicyRequest {
            key_id: "tenant-data".into(),
            policy: Some(pb::KeyPolicy {
                grants: vec![pb::Grant {
                    principal: String::new(),
                    operations: vec![1],
                }],
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let still = keys
        .get_key(pb::GetKeyRequest {
            key_id: "tenant-data".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(still.policy.unwrap().grants.len(), 2);
    server.stop().await;
}

/// Every RPC against every role, with the expected matrix written out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_against_every_role() {
    let server = TestServer::start_with(&[
        ("operator", Role::Operator, &[]),
        ("service", Role::Service, &[]),
        ("auditor", Role::Auditor, &[]),
    ])
    .await;
    // A principal with a certificate from the right CA but no role at all.
    let pki = coffre::pki::PkiPaths::new(server.data_dir());
    coffre::pki::issue_client_cert(&pki, "nobody").unwrap();

    let mut op_keys = KeyServiceClient::new(server.channel("operator").await);
    op_keys
        .create_key(pb::CreateKeyRequest {
            alias: "m".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let blob = DataKeyServiceClient::new(server.channel("service").await)
        .generate_data_key(pb::GenerateDataKeyRequest {
            key_id: "m".into(),
            justification: REASON,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .ciphertext_blob;

    // (rpc, operator, service, auditor) — true: the role may call it.
    let matrix: &[(&str, bool, bool, bool)] = &[
        ("CreateKey", true, false, false),
        ("GetKey", true, false, false),
        ("ListKeys", true, false, false),
        ("RotateKey", true, false, false),
        ("DisableKey", true, false, false),
        ("EnableKey", true, false, false),
        ("ScheduleKeyDeletion", true, false, false),
        ("CancelKeyDeletion", true, false, false),
        ("SetRotationPolicy", true, false, false),
        ("RetireKeyVersions", true, false, false),
        ("UpdateKeyPolicy", true, false, false),
        ("GenerateDataKey", false, true, false),
        ("GenerateDataKeyWithoutPlaintext", false, true, false),
        ("Encrypt", false, true, false),
        ("Decrypt", false, true, false),
        ("ReEncrypt", false, true, false),
        ("BatchGenerateDataKey", false, true, false),
        ("BatchDecrypt", false, true, false),
        ("GetHsmInfo", true, false, false),
        ("RotateRootKey", true, false, false),
        ("ListApprovals", true, false, false),
        ("ApproveOperation", true, false, false),
        ("RejectOperation", true, false, false),
    ];
    for (who, column) in [
        ("operator", 1),
        ("service", 2),
        ("auditor", 3),
        ("nobody", 0),
    ] {
        let channel = server.channel(who).await;
        let mut k = KeyServiceClient::new(channel.clone());
        let mut d = DataKeyServiceClient::new(channel.clone());
        let mut h = HsmServiceClient::new(channel.clone());
        let mut a = pb::approval_service_client::ApprovalServiceClient::new(channel);
        for (rpc, op, svc, aud) in matrix {
            let allowed = match column {
                1 => *op,
                2 => *svc,
                3 => *aud,
                _ => false,
            };
            let key = || "m".to_string();
            let result: Result<(), Status> = match *rpc {
                "CreateKey" => k
                    .create_key(pb::CreateKeyRequest::default())
                    .await
                    .map(drop),
                "GetKey" => k
                    .get_key(pb::GetKeyRequest { key_id: key() })
                    .await
                    .map(drop),
                "ListKeys" => k.list_keys(pb::ListKeysRequest::default()).await.map(drop),
                "RotateKey" => k
                    .rotate_key(pb::RotateKeyRequest { key_id: key() })
                    .await
                    .map(drop),
                "DisableKey" => k
                    .disable_key(pb::DisableKeyRequest { key_id: key() })
                    .await
                    .map(drop),
                "EnableKey" => k
                    .enable_key(pb::EnableKeyRequest { key_id: key() })
                    .await
                    .map(drop),
                "ScheduleKeyDeletion" => k
                    .schedule_key_deletion(pb::ScheduleKeyDeletionRequest {
                        key_id: key(),
                        pending_window_days: 7,
                    })
                    .await
                    .map(drop),
                "CancelKeyDeletion" => k
                    .cancel_key_deletion(pb::CancelKeyDeletionRequest { key_id: key() })
                    .await
                    .map(drop),
                "SetRotationPolicy" => k
                    .set_rotation_policy(pb::SetRotationPolicyRequest {
                        key_id: key(),
                        rotation_period: None,
                    })
                    .await
                    .map(drop),
                "RetireKeyVersions" => k
                    .retire_key_versions(pb::RetireKeyVersionsRequest {
                        key_id: key(),
                        min_decryption_version: 1,
                    })
                    .await
                    .map(drop),
                "UpdateKeyPolicy" => k
                    .update_key_policy(pb::UpdateKeyPolicyRequest {
                        key_id: key(),
                        policy: Some(pb::KeyPolicy {
                            grants: vec![pb::Grant {
                                principal: "spiffe://coffre.dev/service".into(),
                                operations: (1..=5).collect(),
                            }],
                            required_context: Default::default(),
                            accepted_reasons: vec![REASON],
                        }),
                    })
                    .await
                    .map(drop),
                "GenerateDataKey" => d
                    .generate_data_key(pb::GenerateDataKeyRequest {
                        key_id: key(),
                        justification: REASON,
                        ..Default::default()
                    })
                    .await
                    .map(drop),
                "GenerateDataKeyWithoutPlaintext" => d
                    .generate_data_key_without_plaintext(
                        pb::GenerateDataKeyWithoutPlaintextRequest {
                            key_id: key(),
                            justification: REASON,
                            ..Default::default()
                        },
                    )
                    .await
                    .map(drop),
                "Encrypt" => d
                    .encrypt(pb::EncryptRequest {
                        key_id: key(),
                        plaintext: b"s".to_vec(),
                        justification: REASON,
                        ..Default::default()
                    })
                    .await
                    .map(drop),
                "Decrypt" => d
                    .decrypt(pb::DecryptRequest {
                        ciphertext_blob: blob.clone(),
                        justification: REASON,
                        ..Default::default()
                    })
                    .await
                    .map(drop),
                "ReEncrypt" => d
                    .re_encrypt(pb::ReEncryptRequest {
                        ciphertext_blob: blob.clone(),
                        justification: REASON,
                        ..Default::default()
                    })
                    .await
                    .map(drop),
                "BatchGenerateDataKey" => d
                    .batch_generate_data_key(pb::BatchGenerateDataKeyRequest {
                        key_id: key(),
                        justification: REASON,
                        count: 3,
                        ..Default::default()
                    })
                    .await
                    .map(|r| assert_eq!(r.into_inner().data_keys.len(), 3)),
                "BatchDecrypt" => d
                    .batch_decrypt(pb::BatchDecryptRequest {
                        items: vec![pb::BatchDecryptItem {
                            ciphertext_blob: blob.clone(),
                            ..Default::default()
                        }],
                        justification: REASON,
                    })
                    .await
                    .map(|r| {
                        let results = r.into_inner().results;
                        assert_eq!(results.len(), 1);
                        assert_eq!(results[0].error, None);
                    }),
                "GetHsmInfo" => h.get_hsm_info(pb::GetHsmInfoRequest {}).await.map(drop),
                "RotateRootKey" => match h.rotate_root_key(pb::RotateRootKeyRequest {}).await {
                    Ok(stream) => {
                        let mut stream = stream.into_inner();
                        let mut last = Ok(());
                        while let Some(item) = stream.message().await.transpose() {
                            if let Err(e) = item {
                                last = Err(e);
                            }
                        }
                        last
                    }
                    Err(e) => Err(e),
                },
                "ListApprovals" => a
                    .list_approvals(pb::ListApprovalsRequest::default())
                    .await
                    .map(drop),
                // No quorum configured: there is nothing to approve, so an
                // allowed caller gets NOT_FOUND for an unknown approval.
                "ApproveOperation" => a
                    .approve_operation(pb::ApproveOperationRequest {
                        approval_id: uuid_nil(),
                        operation_sha256: "0".repeat(64),
                    })
                    .await
                    .map(drop),
                "RejectOperation" => a
                    .reject_operation(pb::RejectOperationRequest {
                        approval_id: uuid_nil(),
                    })
                    .await
                    .map(drop),
                other => panic!("no call for {other}"),
            };
            match (&result, allowed) {
                (Ok(()), true) => {}
                // Allowed, but refused for another reason (cancelling a
                // deletion that is not scheduled): authorization passed.
                (Err(s), true) if *rpc == "CancelKeyDeletion" => {
                    assert_eq!(s.code(), Code::FailedPrecondition, "{who} {rpc}: {s:?}")
                }
                (Err(s), true) if rpc.ends_with("Operation") => {
                    assert_eq!(s.code(), Code::NotFound, "{who} {rpc}: {s:?}")
                }
                (Err(s), false) => {
                    assert_eq!(s.code(), Code::PermissionDenied, "{who} {rpc}: {s:?}")
                }
                (Err(s), true) => panic!("{who} may call {rpc} but got {s:?}"),
                (Ok(()), false) => panic!("{who} must not be able to call {rpc}"),
            }
            // Keep the key usable for the next rows.
            if *rpc == "ScheduleKeyDeletion" && allowed {
                k.cancel_key_deletion(pb::CancelKeyDeletionRequest { key_id: key() })
                    .await
                    .unwrap();
                k.enable_key(pb::EnableKeyRequest { key_id: key() })
                    .await
                    .unwrap();
            }
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_service_is_rate_limited_without_starving_the_others() {
    use coffre::service::{RateLimit, RateLimits};
    let mut options = coffre::server::dev::dev_kms_options();
    options.default_policy = coffre::model::KeyPolicy::granting([
        "spiffe://coffre.dev/runaway".to_string(),
        "spiffe://coffre.dev/polite".to_string(),
    ]);
    options.rate_limits = RateLimits {
        default: Some(RateLimit {
            per_second: 0.01,
            burst: 5.0,
        }),
        ..Default::default()
    };
    let server = TestServer::start_with_options(
        &[
            ("operator", Role::Operator, &[]),
            ("runaway", Role::Service, &[]),
            ("polite", Role::Service, &[]),
        ],
        options,
    )
    .await;
    KeyServiceClient::new(server.channel("operator").await)
        .create_key(pb::CreateKeyRequest {
            alias: "r".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let req = || pb::GenerateDataKeyRequest {
        key_id: "r".into(),
        justification: REASON,
        ..Default::default()
    };
    let mut runaway = DataKeyServiceClient::new(server.channel("runaway").await);
    for _ in 0..5 {
        runaway.generate_data_key(req()).await.unwrap();
    }
    let err = runaway.generate_data_key(req()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("retry in"), "{}", err.message());
    // The other service is not affected.
    let mut polite = DataKeyServiceClient::new(server.channel("polite").await);
    for _ in 0..5 {
        polite.generate_data_key(req()).await.unwrap();
    }
    server.stop().await;
}

/// Moving a blob to another key needs the right to decrypt it where it is:
/// otherwise a ReEncrypt grant would work as a Decrypt grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_encrypt_to_another_key_needs_decrypt_on_the_source() {
    use pb::DataKeyOperation as Op;
    let server = TestServer::start_with(&[
        ("operator", Role::Operator, &[]),
        ("svc", Role::Service, &[]),
        ("writer", Role::Service, &[]),
    ])
    .await;
    let mut keys = KeyServiceClient::new(server.channel("operator").await);
    let grant = |ops: &[Op]| pb::KeyPolicy {
        grants: vec![
            pb::Grant {
                principal: "spiffe://coffre.dev/svc".into(),
                operations: ops.iter().map(|o| *o as i32).collect(),
            },
            pb::Grant {
                principal: "spiffe://coffre.dev/writer".into(),
                operations: vec![Op::GenerateDataKey as i32],
            },
        ],
        required_context: Default::default(),
        accepted_reasons: vec![REASON],
    };
    for (alias, ops) in [
        ("source", vec![Op::ReEncrypt]),
        ("mine", vec![Op::ReEncrypt, Op::Decrypt]),
    ] {
        keys.create_key(pb::CreateKeyRequest {
            alias: alias.into(),
            policy: Some(grant(&ops)),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let blob = DataKeyServiceClient::new(server.channel("writer").await)
        .generate_data_key(pb::GenerateDataKeyRequest {
            key_id: "source".into(),
            justification: REASON,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .ciphertext_blob;
    let mut svc = DataKeyServiceClient::new(server.channel("svc").await);
    let move_to = |dest: &str| pb::ReEncryptRequest {
        ciphertext_blob: blob.clone(),
        destination_key_id: dest.into(),
        justification: REASON,
        ..Default::default()
    };
    // Same key: allowed (the caller cannot read it either way).
    svc.re_encrypt(move_to("")).await.unwrap();
    // To a key it can decrypt: refused without Decrypt on the source.
    denied(&svc.re_encrypt(move_to("mine")).await.unwrap_err());
    keys.update_key_policy(pb::UpdateKeyPolicyRequest {
        key_id: "source".into(),
        policy: Some(grant(&[Op::ReEncrypt, Op::Decrypt])),
    })
    .await
    .unwrap();
    svc.re_encrypt(move_to("mine")).await.unwrap();
    server.stop().await;
}
