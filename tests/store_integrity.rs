//! Integrity of what is stored (issue #15, M5), over real gRPC: someone who
//! writes the data directory while coffre is stopped, without the HSM, can
//! no longer re-enable a key; deleting the store's MAC key to have edited
//! records sealed anew stops the start; a store from before integrity is
//! sealed once, with its audit record.

use std::path::{Path, PathBuf};

use coffre::grpc::pb;
use coffre::model::KeyId;
use coffre::server::DataDir;
use coffre::server::dev::start as start_dev;
use coffre::store::approvals::{Approval, ApprovalStatus, SensitiveOperation};
use coffre::store::integrity::{IntegrityState, RECORD_MAC_KEY_LEN, RecordMac, Table, is_sealed};
use coffre::store::{KeyStore, SledStore, StoreError};
use tonic::Code;

use crate::common::clients::generate_request;
use crate::common::{TestServer, dev_options};
use crate::observability::http_get;

/// The sled database of the store's live generation (`store/CURRENT`).
fn live_generation(data_dir: &Path) -> PathBuf {
    let store = DataDir::new(data_dir).store();
    let current = std::fs::read_to_string(store.join("CURRENT")).unwrap();
    store.join(current.trim())
}

/// The store's sled database, behind coffre's back, once the stopped
/// server's sled has let go of its lock (a moment after the drop).
fn raw_db(data_dir: &Path) -> sled::Db {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match sled::open(live_generation(data_dir)) {
            Ok(db) => return db,
            Err(e) if std::time::Instant::now() < deadline => {
                assert!(e.to_string().contains("lock"), "{e}");
                std::thread::yield_now();
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// The value of `coffre_store_integrity_failures_total` on the metrics page.
fn integrity_failures(server: &TestServer) -> f64 {
    let addr = server.server.as_ref().unwrap().metrics_addr.unwrap();
    let (status, page) = http_get(addr, "/metrics");
    assert!(status.contains("200"), "{status}");
    page.lines()
        .find_map(|l| l.strip_prefix("coffre_store_integrity_failures_total "))
        .unwrap_or_else(|| panic!("no integrity counter in\n{page}"))
        .trim()
        .parse()
        .unwrap()
}

/// A key with a data key under it, then disabled; the server stopped.
async fn disabled_key(server: &mut TestServer) -> String {
    let mut clients = server.clients().await;
    let (key, _) = clients
        .key_with_data_key("integrity/edited", &[("tenant", "acme")])
        .await
        .unwrap();
    clients
        .keys
        .disable_key(pb::DisableKeyRequest {
            key_id: key.key_id.clone(),
        })
        .await
        .unwrap();
    server.server.take().unwrap().stop().await.unwrap();
    key.key_id
}

async fn restart(server: &mut TestServer) {
    server.server = Some(start_dev(&dev_options(server.data_dir())).await.unwrap());
}

/// After the restart the key is refused, DATA_LOSS with a clear message, for
/// data keys and for its metadata, and each refusal is counted.
async fn assert_refused(server: &mut TestServer, key_id: &str) {
    let before = integrity_failures(server);
    let mut clients = server.clients().await;
    let err = clients
        .data
        .generate_data_key(generate_request(key_id, &[("tenant", "acme")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert!(err.message().contains("integrity check"), "{err:?}");
    let err = clients
        .keys
        .get_key(pb::GetKeyRequest {
            key_id: "integrity/edited".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    // Nothing was cached from it: asking again reads (and refuses) again.
    let err = clients
        .data
        .generate_data_key(generate_request(key_id, &[("tenant", "acme")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert!(integrity_failures(server) >= before + 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_record_edited_on_disk_is_refused_after_a_restart() {
    let mut server = TestServer::start().await;
    let key_id = disabled_key(&mut server).await;
    let id: KeyId = key_id.parse().unwrap();
    // DISABLED → ENABLED in the record's JSON, behind the store's back; the
    // seal in front of it is left as it was (no one else has the key).
    {
        let db = raw_db(server.data_dir());
        let keys = db.open_tree("keys").unwrap();
        let stored = keys.get(id.as_bytes()).unwrap().unwrap().to_vec();
        let (from, to) = (&b"\"DISABLED\""[..], &b"\"ENABLED\""[..]);
        let at = stored
            .windows(from.len())
            .position(|w| w == from)
            .expect("the record says DISABLED");
        let mut edited = stored[..at].to_vec();
        edited.extend_from_slice(to);
        edited.extend_from_slice(&stored[at + from.len()..]);
        keys.insert(id.as_bytes(), edited).unwrap();
        db.flush().unwrap();
    }
    restart(&mut server).await;
    assert_refused(&mut server, &key_id).await;
    // One tampered record is refused where it is used; it does not take
    // the node out of service, and the readiness probe (every second) does
    // not count it again and again.
    let counted = integrity_failures(&server);
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(integrity_failures(&server), counted);
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(server.channel("service").await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "coffre.v1.DataKeyService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_re_enabled_with_the_store_api_and_another_key_is_refused() {
    let mut server = TestServer::start().await;
    let key_id = disabled_key(&mut server).await;
    let id: KeyId = key_id.parse().unwrap();
    {
        // The library's own store, without coffre's MAC key: it refuses to
        // read a sealed store, so the attacker seals it under a key of their
        // own and re-enables the key through the API.
        let store = SledStore::open(&DataDir::new(server.data_dir()).store()).unwrap();
        assert!(matches!(
            store.get_key(id).await,
            Err(StoreError::IntegrityFailure(_))
        ));
        let own = std::sync::Arc::new(RecordMac::new(&[7; RECORD_MAC_KEY_LEN]).unwrap());
        assert!(matches!(
            store.install_integrity(&own, true).await.unwrap(),
            IntegrityState::Migrated { .. }
        ));
        let current = store.get_key(id).await.unwrap().unwrap();
        let mut enabled = current.clone();
        enabled.state = coffre::model::KeyState::Enabled;
        store
            .compare_and_swap_key(&current, &enabled)
            .await
            .unwrap();
    }
    restart(&mut server).await;
    assert_refused(&mut server, &key_id).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_mac_key_to_reseal_edited_records_stops_the_start() {
    let mut server = TestServer::start().await;
    disabled_key(&mut server).await;
    {
        let db = raw_db(server.data_dir());
        let meta = db.open_tree("meta").unwrap();
        assert!(meta.remove(b"secret/store-integrity").unwrap().is_some());
        db.flush().unwrap();
    }
    let err = start_dev(&dev_options(server.data_dir()))
        .await
        .expect_err("a start without the MAC key over an audited store");
    let shown = format!("{err:#}");
    assert!(shown.contains("integrity key"), "{shown}");
    assert!(shown.contains("refusing to start"), "{shown}");
}

/// Turns the store back into one from before integrity: every record's seal
/// removed, schema 2, no MAC key; and a new audit log (the old one records
/// that integrity was enabled).
fn unseal(data_dir: &Path, forget_the_audit_log: bool) {
    let db = raw_db(data_dir);
    for tree in ["keys", "versions"] {
        let tree = db.open_tree(tree).unwrap();
        for entry in tree.iter() {
            let (k, v) = entry.unwrap();
            assert!(is_sealed(&v));
            tree.insert(k, &v[36..]).unwrap();
        }
    }
    let meta = db.open_tree("meta").unwrap();
    meta.insert(b"schema", &2u32.to_be_bytes()).unwrap();
    meta.remove(b"secret/store-integrity").unwrap();
    db.flush().unwrap();
    if forget_the_audit_log {
        // A data directory from before #15 has no audit high-water mark
        // either (with it, a missing log refuses the start).
        meta.remove(b"secret/audit-high-water-mark").unwrap();
        db.flush().unwrap();
        std::fs::remove_file(DataDir::new(data_dir).audit_log()).unwrap();
    }
}

fn all_sealed(data_dir: &Path) -> usize {
    let db = raw_db(data_dir);
    let mut n = 0;
    for tree in ["keys", "versions"] {
        for entry in db.open_tree(tree).unwrap().iter() {
            let (_, v) = entry.unwrap();
            assert!(is_sealed(&v));
            n += 1;
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_from_before_integrity_is_sealed_once_and_not_twice() {
    let mut server = TestServer::start().await;
    let mut clients = server.clients().await;
    let (key, _) = clients
        .key_with_data_key("integrity/old", &[("tenant", "acme")])
        .await
        .unwrap();
    server.server.take().unwrap().stop().await.unwrap();
    unseal(server.data_dir(), true);

    // The first start seals every record and says so in the audit log.
    restart(&mut server).await;
    let mut clients = server.clients().await;
    clients
        .generate_data_key(&key.key_id, &[("tenant", "acme")])
        .await
        .unwrap();
    assert_eq!(integrity_failures(&server), 0.0);
    server.server.take().unwrap().stop().await.unwrap();
    assert_eq!(all_sealed(server.data_dir()), 2);
    let log = std::fs::read_to_string(DataDir::new(server.data_dir()).audit_log()).unwrap();
    assert_eq!(log.matches("\"EnableStoreIntegrity\"").count(), 1, "{log}");

    // Unsealed again behind its back, with the audit log kept: refused.
    unseal(server.data_dir(), false);
    let err = start_dev(&dev_options(server.data_dir()))
        .await
        .expect_err("a second migration");
    assert!(format!("{err:#}").contains("refusing to start"), "{err:#}");
}

/// The store's MAC key, unwrapped by the dev HSM (the server stopped).
async fn store_mac(data_dir: &Path) -> std::sync::Arc<RecordMac> {
    use coffre::hsm::Hsm;
    let data = DataDir::new(data_dir);
    let store = SledStore::open(&data.store()).unwrap();
    let name = coffre::store::integrity::STORE_INTEGRITY_SECRET_NAME;
    let sealed = store.get_secret(name).await.unwrap().unwrap();
    drop(store);
    let pin = std::fs::read_to_string(data.hsm_pin()).unwrap();
    let hsm = coffre::hsm::sim::LocalSimHsm::open(&data.hsm_state(), pin.trim()).unwrap();
    let key = hsm
        .unwrap(&sealed.wrapped, &coffre::model::secret_wrap_aad(name))
        .await
        .unwrap();
    std::sync::Arc::new(RecordMac::new(key.expose()).unwrap())
}

/// A pending approval of EnableKey of `key_id`, as an older coffre wrote it.
fn legacy_approval(key_id: KeyId) -> Approval {
    let now = coffre::model::Clock::now(&coffre::model::SystemClock);
    Approval {
        id: uuid::Uuid::new_v4(),
        operation: SensitiveOperation::EnableKey { key_id },
        proposer: "operator".into(),
        approved_by: vec!["operator".into()],
        approvals_required: 2,
        rejected_by: None,
        status: ApprovalStatus::Pending,
        created_at: now,
        expires_at: now.plus(std::time::Duration::from_secs(3600)),
        result: None,
        key_fingerprint: None,
        key_before: None,
        executor: None,
    }
}

/// A data directory from before approvals moved into the key store keeps
/// them as sealed files in `approvals/`: the next start moves each one
/// that verifies into the store (listed afterwards, file removed); a file
/// that fails its MAC stays, refused and never listed; once the directory
/// is empty, it is removed.
#[tokio::test]
async fn legacy_approval_files_move_into_the_store() {
    let mut server = TestServer::start().await;
    let id: KeyId = disabled_key(&mut server).await.parse().unwrap();
    let mac = store_mac(server.data_dir()).await;
    let dir = DataDir::new(server.data_dir()).approvals();
    std::fs::create_dir_all(&dir).unwrap();
    let good = legacy_approval(id);
    let json = serde_json::to_vec_pretty(&good).unwrap();
    let file = |a: &Approval| dir.join(format!("{}.json", a.id));
    std::fs::write(
        file(&good),
        mac.seal_text(Table::Approvals, good.id.as_bytes(), &json),
    )
    .unwrap();
    // One sealed under a key of the attacker's: refused.
    let planted = legacy_approval(id);
    let own = RecordMac::new(&[7; RECORD_MAC_KEY_LEN]).unwrap();
    let planted_json = serde_json::to_vec_pretty(&planted).unwrap();
    std::fs::write(
        file(&planted),
        own.seal_text(Table::Approvals, planted.id.as_bytes(), &planted_json),
    )
    .unwrap();

    restart(&mut server).await;
    let mut approvals =
        pb::approval_service_client::ApprovalServiceClient::new(server.channel("operator").await);
    let listed = approvals
        .list_approvals(pb::ListApprovalsRequest {
            include_closed: true,
        })
        .await
        .unwrap()
        .into_inner()
        .approvals;
    let ids: Vec<&str> = listed.iter().map(|a| a.approval_id.as_str()).collect();
    assert_eq!(ids, vec![good.id.to_string().as_str()], "{listed:?}");
    assert_eq!(listed[0].status(), pb::ApprovalStatus::ApprovalPending);
    assert!(!file(&good).exists(), "the moved file is removed");
    assert!(file(&planted).exists(), "a refused file stays");

    // Without the refused file, the next start removes the directory.
    std::fs::remove_file(file(&planted)).unwrap();
    server.restart().await;
    assert!(!dir.exists(), "{} is left", dir.display());
    let mut approvals =
        pb::approval_service_client::ApprovalServiceClient::new(server.channel("operator").await);
    let listed = approvals
        .list_approvals(pb::ListApprovalsRequest {
            include_closed: true,
        })
        .await
        .unwrap()
        .into_inner()
        .approvals;
    assert_eq!(listed.len(), 1, "moved once, still there: {listed:?}");
}
