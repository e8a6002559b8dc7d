//! The audit log over real gRPC: exactly one record per request (refused
//! and malformed ones included), written before the response; fail closed
//! when the log's storage refuses writes; a crash mid-append leaves a log
//! that verifies; export, verify, list and tail as an auditor would.

use std::process::Command;

use coffre::grpc::REQUEST_ID_HEADER;
use coffre::grpc::pb;
use coffre::grpc::pb::audit_service_client::AuditServiceClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::common::binary::{COFFRE, run, run_json, start_dev};
use crate::common::{REASON, TestServer, ctx};

fn request_id(meta: &tonic::metadata::MetadataMap) -> String {
    meta.get(REQUEST_ID_HEADER)
        .expect("every response carries its request id")
        .to_str()
        .unwrap()
        .to_string()
}

/// The request id and status code of a unary call's result.
fn outcome<T>(r: Result<tonic::Response<T>, tonic::Status>) -> (String, Code) {
    match r {
        Ok(resp) => (request_id(resp.metadata()), Code::Ok),
        Err(status) => (request_id(status.metadata()), status.code()),
    }
}

async fn all_events(auditor: &mut AuditServiceClient<Channel>) -> Vec<pb::AuditEvent> {
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

/// The name an audit record gives a status code: the library's table, which
/// the metrics' `code` label uses too.
fn code_name(c: Code) -> &'static str {
    coffre::metrics::CODE_NAMES[c as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_leaves_exactly_one_record_before_its_response() {
    let server = TestServer::start().await;
    let mut keys = server.keys().await;
    let mut data = server.data().await;
    let mut auditor = AuditServiceClient::new(server.channel("auditor").await);
    // Callers in the wrong role.
    let mut keys_as_service =
        pb::key_service_client::KeyServiceClient::new(server.channel("service").await);
    let mut data_as_auditor =
        pb::data_key_service_client::DataKeyServiceClient::new(server.channel("auditor").await);
    let mut audit_as_service = AuditServiceClient::new(server.channel("service").await);

    // (request id, expected status, expected key id if known)
    let mut sent: Vec<(String, Code)> = Vec::new();
    let created = keys
        .create_key(pb::CreateKeyRequest {
            alias: "audited".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let key_id = created.get_ref().key.as_ref().unwrap().key_id.clone();
    sent.push((request_id(created.metadata()), Code::Ok));

    let context = ctx(&[("tenant", "acme-very-secret-tenant")]);
    let generated = data
        .generate_data_key(pb::GenerateDataKeyRequest {
            key_id: "audited".into(),
            encryption_context: context.clone(),
            justification: REASON,
            number_of_bytes: 32,
        })
        .await
        .unwrap();
    sent.push((request_id(generated.metadata()), Code::Ok));
    let plaintext = generated.get_ref().plaintext.clone();
    let blob = generated.get_ref().ciphertext_blob.clone();

    let decrypt = |blob: Vec<u8>,
                   context: std::collections::BTreeMap<String, String>,
                   justification: i32| pb::DecryptRequest {
        ciphertext_blob: blob,
        encryption_context: context,
        justification,
        key_id: String::new(),
    };
    sent.push(outcome(
        data.decrypt(decrypt(blob.clone(), context.clone(), REASON))
            .await,
    ));
    // Refused and malformed requests are recorded too.
    let mut tampered = blob.clone();
    *tampered.last_mut().unwrap() ^= 1;
    sent.push(outcome(
        data.decrypt(decrypt(tampered, context.clone(), REASON))
            .await,
    ));
    sent.push(outcome(
        data.decrypt(decrypt(b"garbage".to_vec(), context.clone(), REASON))
            .await,
    ));
    sent.push(outcome(
        data.decrypt(decrypt(blob.clone(), context.clone(), 999))
            .await,
    ));
    sent.push(outcome(
        data.decrypt(decrypt(
            blob.clone(),
            context.clone(),
            pb::AccessReason::ThirdPartyDataRequest as i32,
        ))
        .await,
    ));
    sent.push(outcome(
        data.generate_data_key(pb::GenerateDataKeyRequest {
            key_id: String::new(),
            justification: REASON,
            ..Default::default()
        })
        .await,
    ));
    sent.push(outcome(
        keys.get_key(pb::GetKeyRequest {
            key_id: "no-such-key".into(),
        })
        .await,
    ));
    sent.push(outcome(
        keys_as_service
            .disable_key(pb::DisableKeyRequest {
                key_id: key_id.clone(),
            })
            .await,
    ));
    sent.push(outcome(
        data_as_auditor
            .generate_data_key(pb::GenerateDataKeyRequest {
                key_id: key_id.clone(),
                justification: REASON,
                ..Default::default()
            })
            .await,
    ));
    sent.push(outcome(
        audit_as_service
            .list_events(pb::ListEventsRequest::default())
            .await,
    ));
    sent.push(outcome(
        keys.disable_key(pb::DisableKeyRequest {
            key_id: key_id.clone(),
        })
        .await,
    ));
    sent.push(outcome(
        data.decrypt(decrypt(blob.clone(), context.clone(), REASON))
            .await,
    ));
    let expected_codes = [
        Code::Ok,
        Code::Ok,
        Code::Ok,
        Code::InvalidArgument,
        Code::InvalidArgument,
        Code::InvalidArgument,
        Code::PermissionDenied,
        Code::InvalidArgument,
        Code::NotFound,
        Code::PermissionDenied,
        Code::PermissionDenied,
        Code::PermissionDenied,
        Code::Ok,
        Code::FailedPrecondition,
    ];
    assert_eq!(
        sent.iter().map(|(_, c)| *c).collect::<Vec<_>>(),
        expected_codes
    );

    // Exactly the requests sent, in order, each once (the auditor's own
    // ListEvents is recorded after its answer is built), after the system
    // record of the new store's integrity.
    let events: Vec<_> = all_events(&mut auditor)
        .await
        .into_iter()
        .filter(|e| e.principal != coffre::service::INTEGRITY_PRINCIPAL)
        .collect();
    let ids: Vec<&str> = events.iter().map(|e| e.request_id.as_str()).collect();
    let sent_ids: Vec<&str> = sent.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, sent_ids);
    for (event, (_, code)) in events.iter().zip(&sent) {
        assert_eq!(event.status_code, code_name(*code), "{event:?}");
        let expected_outcome = if *code == Code::Ok {
            pb::AuditOutcome::Allowed
        } else {
            pb::AuditOutcome::Refused
        };
        assert_eq!(event.outcome, expected_outcome as i32, "{event:?}");
    }
    let gen_event = &events[1];
    assert_eq!(gen_event.operation, "GenerateDataKey");
    assert_eq!(gen_event.principal, "spiffe://coffre.dev/service");
    assert_eq!(gen_event.role, "service");
    assert_eq!(gen_event.key_id, key_id);
    assert_eq!(gen_event.key_version, Some(1));
    assert_eq!(gen_event.justification, "CUSTOMER_INITIATED_ACCESS");
    assert_eq!(gen_event.context_digest.len(), 64);
    assert!(
        gen_event.context.is_empty(),
        "no context in clear by default"
    );
    // The refused third-party request names its key (from the blob header)
    // and its justification.
    assert_eq!(events[6].key_id, key_id);
    assert_eq!(events[6].justification, "THIRD_PARTY_DATA_REQUEST");
    assert_eq!(events[5].justification, "UNKNOWN(999)");
    assert_eq!(events[9].principal, "spiffe://coffre.dev/service");
    assert_eq!(events[9].operation, "DisableKey");

    // Export with the real CLI, then verify offline with the dev public key.
    let dir = server.data_dir();
    let out = dir.join("export.jsonl");
    let export = Command::new(COFFRE)
        .args(["audit", "export", "--out"])
        .arg(&out)
        .arg("--data-dir")
        .arg(dir)
        .args(["--endpoint", &server.endpoint(), "--json"])
        .output()
        .unwrap();
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&export.stdout).unwrap();
    // Signed up to the export's own GetCheckpoint request; its record and
    // the ExportLog request's follow, chained but not yet signed (and the
    // store's integrity record comes first).
    let (last, signed) = (
        report["last_seq"].as_u64().unwrap(),
        report["checkpoint_seq"].as_u64().unwrap(),
    );
    assert_eq!(
        (last, signed),
        (events.len() as u64 + 4, events.len() as u64 + 2)
    );
    let verify = Command::new(COFFRE)
        .args(["audit", "verify"])
        .arg(&out)
        .arg("--public-key")
        .arg(dir.join("audit-public-key.pem"))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    tamper_matrix(&out, &dir.join("audit-public-key.pem"));
    // Never key material, never the context in clear.
    let text = std::fs::read_to_string(&out).unwrap();
    use base64::Engine;
    for secret in [
        hex::encode(&plaintext),
        base64::engine::general_purpose::STANDARD.encode(&plaintext),
        "acme-very-secret-tenant".to_string(),
    ] {
        assert!(!text.contains(&secret), "{secret} found in the audit log");
    }
    // The served public key is the one in DIR/audit-public-key.pem.
    let cp = auditor
        .get_checkpoint(pb::GetCheckpointRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        cp.public_key_pem,
        std::fs::read_to_string(dir.join("audit-public-key.pem")).unwrap()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_events_filters_and_pages_and_tail_follows() {
    let server = TestServer::start().await;
    let mut keys = server.keys().await;
    let mut auditor = AuditServiceClient::new(server.channel("auditor").await);
    let mut ids = Vec::new();
    for i in 0..5 {
        let k = keys
            .create_key(pb::CreateKeyRequest {
                alias: format!("k{i}"),
                ..Default::default()
            })
            .await
            .unwrap();
        ids.push(k.into_inner().key.unwrap().key_id);
    }
    let _ = keys
        .get_key(pb::GetKeyRequest {
            key_id: "missing".into(),
        })
        .await
        .unwrap_err();
    // Filter by operation, paged two by two.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = auditor
            .list_events(pb::ListEventsRequest {
                operation: "CreateKey".into(),
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.events.len() <= 2);
        seen.extend(page.events.into_iter().map(|e| e.key_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ids);
    // By key, by outcome, by principal.
    let by_key = auditor
        .list_events(pb::ListEventsRequest {
            key_id: ids[2].clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_key.events.len(), 1);
    let refused = auditor
        .list_events(pb::ListEventsRequest {
            outcome: pb::AuditOutcome::Refused as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(refused.events.len(), 1);
    assert_eq!(refused.events[0].status_code, "NOT_FOUND");
    let nobody = auditor
        .list_events(pb::ListEventsRequest {
            principal: "spiffe://coffre.dev/nobody".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(nobody.events.is_empty());
    assert_eq!(
        auditor
            .list_events(pb::ListEventsRequest {
                page_size: 5000,
                ..Default::default()
            })
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );

    // Tail: the history first, then a new record as it is written.
    let mut stream = auditor
        .tail_events(pb::TailEventsRequest { after_seq: 0 })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.seq, 1);
    let created = keys
        .create_key(pb::CreateKeyRequest {
            alias: "late".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let late_id = request_id(created.metadata());
    let found = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while let Some(e) = stream.message().await.unwrap() {
            if e.request_id == late_id {
                return e;
            }
        }
        panic!("the tail ended");
    })
    .await
    .expect("the new record reached the tail");
    // `json` is the stored line: its hash recomputes.
    let record: coffre::audit::AuditRecord = serde_json::from_str(&found.json).unwrap();
    assert!(record.hash_is_valid());
    assert_eq!(record.hash, found.hash);
    // Stopping the server ends the tail (it does not hold the stop).
    let stopped = tokio::time::timeout(std::time::Duration::from_secs(20), server.stop()).await;
    assert!(stopped.is_ok(), "the stop waited for the tail stream");
    drop(stream);
}

/// `chattr +i` makes writes to the open log fail with EPERM, even for
/// root: the log's storage turned read-only under a running server.
fn chattr(flag: &str, path: &std::path::Path) {
    let out = Command::new("chattr")
        .arg(flag)
        .arg(path)
        .output()
        .expect("chattr (e2fsprogs) is required by this test");
    assert!(
        out.status.success(),
        "chattr {flag} failed (needs CAP_LINUX_IMMUTABLE and ext4/xfs/btrfs): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(coffre_has_chattr),
    ignore = "not run: needs root for chattr +i (CAP_LINUX_IMMUTABLE) and chattr"
)]
async fn fail_closed_while_the_log_cannot_be_written_then_recover() {
    crate::common::require(&crate::common::needs::CHATTR);
    let server = TestServer::start().await;
    let mut keys = server.keys().await;
    let mut data = server.data().await;
    keys.create_key(pb::CreateKeyRequest {
        alias: "fc".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let log = server.data_dir().join("audit.log");
    chattr("+i", &log);
    let generate = || pb::GenerateDataKeyRequest {
        key_id: "fc".into(),
        justification: REASON,
        ..Default::default()
    };
    let refused = data.generate_data_key(generate()).await;
    // Undo the flag before asserting, so a failure leaves no immutable file.
    let refused_again = keys
        .create_key(pb::CreateKeyRequest {
            alias: "not-created".into(),
            ..Default::default()
        })
        .await;
    chattr("-i", &log);
    let status = refused.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("audit log"), "{status:?}");
    assert!(status.metadata().get(REQUEST_ID_HEADER).is_some());
    // While the log is unwritable, nothing runs: the key was not created.
    assert_eq!(refused_again.unwrap_err().code(), Code::Unavailable);
    // Writable again: service resumes by itself (the writer retries every
    // second), and the log verifies.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        match data.generate_data_key(generate()).await {
            Ok(_) => break,
            Err(s) if s.code() == Code::Unavailable => {
                assert!(std::time::Instant::now() < deadline, "no recovery: {s:?}");
            }
            Err(s) => panic!("{s:?}"),
        }
    }
    let missing = keys
        .get_key(pb::GetKeyRequest {
            key_id: "not-created".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let pk = coffre::audit::public_key_from_pem(
        &std::fs::read_to_string(server.data_dir().join("audit-public-key.pem")).unwrap(),
    )
    .unwrap();
    let text = std::fs::read(&log).unwrap();
    let report = coffre::audit::verify(text.as_slice(), &pk, |_| {}).unwrap();
    // The records that could not be written are not there; the others are,
    // in one chain: create, then (after recovery) the refusals recorded
    // once the log was writable, the generate that succeeded, get_key.
    let records: Vec<coffre::audit::AuditRecord> = String::from_utf8(text)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("{\"checkpoint\""))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len() as u64, report.records);
    assert_eq!(records[0].operation, coffre::service::INTEGRITY_OPERATION);
    assert_eq!(records[1].operation, "CreateKey");
    let tail: Vec<(&str, &str)> = records[records.len() - 2..]
        .iter()
        .map(|r| (r.operation.as_str(), r.status_code.as_str()))
        .collect();
    assert_eq!(tail, [("GenerateDataKey", "OK"), ("GetKey", "NOT_FOUND")]);
    assert!(
        records[2..records.len() - 2]
            .iter()
            .all(|r| r.status_code == "UNAVAILABLE"),
        "{records:?}"
    );
    server.stop().await;
}

#[test]
fn a_crash_in_the_middle_of_appending_leaves_a_log_that_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let (mut guard, endpoint) = start_dev(dir.path());
    let (ok, _, err) = run(
        dir.path(),
        &endpoint,
        &["key", "create", "--alias", "crash"],
    );
    assert!(ok, "{err}");
    // Load from several client processes, then SIGKILL the server mid-way.
    let loaders: Vec<_> = (0..4)
        .map(|_| {
            Command::new(COFFRE)
                .args(["datakey", "generate", "--key", "crash", "--context", "a=b"])
                .arg("--data-dir")
                .arg(dir.path())
                .args(["--endpoint", &endpoint])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(150));
    guard.0.kill().unwrap(); // SIGKILL
    guard.0.wait().unwrap();
    for mut l in loaders {
        let _ = l.wait();
    }
    // And a write torn by the crash, for certain: half a record at the end.
    let log = dir.path().join("audit.log");
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    std::io::Write::write_all(&mut f, b"{\"seq\":999,\"time\":17").unwrap();
    drop(f);

    // Restart on the same directory: the torn line is dropped, the chain
    // continues, and the export verifies.
    let (_guard, endpoint) = start_dev(dir.path());
    let (ok, _, err) = run(dir.path(), &endpoint, &["key", "show", "crash"]);
    assert!(ok, "{err}");
    let out = dir.path().join("after-crash.jsonl");
    let exported = run_json(
        dir.path(),
        &endpoint,
        &["audit", "export", "--out", out.to_str().unwrap()],
    );
    assert!(exported["records"].as_u64().unwrap() >= 2, "{exported}");
    let verify = Command::new(COFFRE)
        .args(["audit", "verify"])
        .arg(&out)
        .arg("--public-key")
        .arg(dir.path().join("audit-public-key.pem"))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
}

/// `coffre audit verify` on altered copies of an exported log: each must
/// fail, non-zero, naming a line.
fn tamper_matrix(exported: &std::path::Path, public_key: &std::path::Path) {
    let text = std::fs::read_to_string(exported).unwrap();
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    let is_cp = |l: &String| l.starts_with("{\"checkpoint\"");
    let last_cp = lines.iter().rposition(is_cp).unwrap();
    let record_lines: Vec<usize> = (0..last_cp).filter(|&i| !is_cp(&lines[i])).collect();
    assert!(record_lines.len() >= 10);
    let (a, b) = (record_lines[3], record_lines[4]);
    let mut cases: Vec<(&str, Vec<String>)> = Vec::new();
    let mut edited = lines.clone();
    edited[a] = edited[a].replace("\"outcome\":\"allowed\"", "\"outcome\":\"refused\"");
    if edited[a] == lines[a] {
        edited[a] = edited[a].replace("\"outcome\":\"refused\"", "\"outcome\":\"allowed\"");
    }
    cases.push(("edited outcome", edited));
    let mut edited = lines.clone();
    edited[a] = edited[a].replace("spiffe://coffre.dev/", "spiffe://coffre.dev/x");
    cases.push(("edited principal", edited));
    let mut deleted = lines.clone();
    deleted.remove(a);
    cases.push(("deleted record", deleted));
    let mut inserted = lines.clone();
    inserted.insert(a, lines[b].clone());
    cases.push(("duplicated record", inserted));
    let mut reordered = lines.clone();
    reordered.swap(a, b);
    cases.push(("reordered records", reordered));
    // Cut inside the signed range: the checkpoint after the cut no longer
    // matches the chain.
    let mut truncated = lines.clone();
    truncated.drain(record_lines[2]..last_cp);
    cases.push(("records removed before the last checkpoint", truncated));
    let mut forged = lines.clone();
    let sig_at = forged[last_cp].find("\"signature\":\"").unwrap() + 13;
    let mut bytes = forged[last_cp].clone().into_bytes();
    bytes[sig_at] = if bytes[sig_at] == b'A' { b'B' } else { b'A' };
    forged[last_cp] = String::from_utf8(bytes).unwrap();
    cases.push(("forged checkpoint signature", forged));
    let mut moved = lines.clone();
    moved[last_cp] = moved[last_cp].replacen("\"seq\":", "\"seq\":1", 1);
    cases.push(("checkpoint moved to another seq", moved));

    let dir = tempfile::tempdir().unwrap();
    for (name, content) in cases {
        let path = dir.path().join("tampered.jsonl");
        std::fs::write(&path, content.join("\n") + "\n").unwrap();
        let out = Command::new(COFFRE)
            .args(["audit", "verify"])
            .arg(&path)
            .arg("--public-key")
            .arg(public_key)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: verified anyway");
        assert!(stderr.contains("line "), "{name}: {stderr}");
    }
}
