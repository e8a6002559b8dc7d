//! Sealed approval files (`store::integrity`, table `approvals`): an edited,
//! planted, copied or unsealed file is refused and never listed; an
//! unsealed directory is migrated.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::fs;
use std::path::Path;
use std::sync::Arc;

use uuid::Uuid;

use super::StoreError;
use super::approvals::tests::approval;
use super::approvals::{ApprovalStatus, ApprovalStore};
use super::integrity::{RECORD_MAC_KEY_LEN, RecordMac, is_sealed_text};
use crate::model::Timestamp;

fn mac(byte: u8) -> Arc<RecordMac> {
    Arc::new(RecordMac::new(&[byte; RECORD_MAC_KEY_LEN]).unwrap())
}

fn file(dir: &Path, id: Uuid) -> std::path::PathBuf {
    dir.join(format!("{id}.json"))
}

fn sealed(dir: &Path, m: &Arc<RecordMac>) -> ApprovalStore {
    let store = ApprovalStore::open(dir).unwrap();
    assert_eq!(store.install_integrity(m).unwrap(), 0);
    store
}

#[test]
fn an_edited_approval_is_refused_and_not_listed() {
    let dir = tempfile::tempdir().unwrap();
    let m = mac(1);
    let store = sealed(dir.path(), &m);
    let a = approval(ApprovalStatus::Pending);
    let b = approval(ApprovalStatus::Pending);
    store.put(&a).unwrap();
    store.put(&b).unwrap();
    let path = file(dir.path(), a.id);
    let text = fs::read_to_string(&path).unwrap();
    assert!(is_sealed_text(text.as_bytes()));
    // One approval more than it has, by editing the JSON under the seal.
    fs::write(&path, text.replace("\"alice\"\n", "\"alice\", \"bob\"\n")).unwrap();
    assert_ne!(fs::read_to_string(&path).unwrap(), text);
    assert!(matches!(
        store.get(a.id),
        Err(StoreError::IntegrityFailure(_))
    ));
    let listed: Vec<Uuid> = store.list().unwrap().iter().map(|x| x.id).collect();
    assert_eq!(listed, vec![b.id]);
    assert_eq!(m.failures(), 2);
}

#[test]
fn a_planted_or_copied_approval_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = mac(1);
    let store = sealed(dir.path(), &m);
    // Planted without the key: plain JSON, as files were before.
    let planted = approval(ApprovalStatus::Pending);
    fs::write(
        file(dir.path(), planted.id),
        serde_json::to_vec_pretty(&planted).unwrap(),
    )
    .unwrap();
    assert!(matches!(
        store.get(planted.id),
        Err(StoreError::IntegrityFailure(_))
    ));
    // A valid sealed file copied under another id (its JSON's id edited).
    let a = approval(ApprovalStatus::Pending);
    store.put(&a).unwrap();
    let other = Uuid::new_v4();
    let text = fs::read_to_string(file(dir.path(), a.id)).unwrap();
    fs::write(
        file(dir.path(), other),
        text.replace(&a.id.to_string(), &other.to_string()),
    )
    .unwrap();
    assert!(matches!(
        store.get(other),
        Err(StoreError::IntegrityFailure(_))
    ));
    // Under another key.
    drop(store);
    let store = ApprovalStore::open(dir.path()).unwrap();
    // The planted file is the one unsealed file.
    assert_eq!(store.install_integrity(&mac(2)).unwrap(), 1);
    assert!(matches!(
        store.get(a.id),
        Err(StoreError::IntegrityFailure(_))
    ));
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn an_unsealed_directory_is_migrated_and_interrupted_runs_fail_after_install() {
    let dir = tempfile::tempdir().unwrap();
    let pending = approval(ApprovalStatus::Pending);
    {
        let plain = ApprovalStore::open(dir.path()).unwrap();
        plain.put(&pending).unwrap();
    }
    assert!(!is_sealed_text(
        &fs::read(file(dir.path(), pending.id)).unwrap()
    ));
    let m = mac(1);
    let store = ApprovalStore::open(dir.path()).unwrap();
    assert_eq!(store.install_integrity(&m).unwrap(), 1);
    assert_eq!(store.migrate().unwrap(), 1);
    assert!(is_sealed_text(
        &fs::read(file(dir.path(), pending.id)).unwrap()
    ));
    assert_eq!(store.get(pending.id).unwrap().unwrap(), pending);
    // An approval left executing in a sealed directory: open cannot read it
    // without the key, so it fails it once the key is installed.
    let mut executing = approval(ApprovalStatus::Executing);
    executing.created_at = Timestamp(5);
    store.put(&executing).unwrap();
    drop(store);
    let store = ApprovalStore::open(dir.path()).unwrap();
    assert_eq!(store.install_integrity(&m).unwrap(), 0);
    let after = store.get(executing.id).unwrap().unwrap();
    assert_eq!(after.status, ApprovalStatus::Failed);
    assert_eq!(m.failures(), 0);
}
