//! Checks of sealed records (`store::integrity`) that need no look behind
//! the backend's back: records are bound to the MAC key they were written
//! under, and the key is installed once. Edits of the stored bytes are
//! backend-specific and tested beside each backend (sled:
//! `store/sled/integrity_tests.rs`).

use std::sync::Arc;

use super::fixtures::{id, key, version};
use super::{Check, StoreFactory, ensure, ok, open, refused, same};
use crate::store::StoreError;
use crate::store::approvals::SensitiveOperation;
use crate::store::integrity::{RECORD_MAC_KEY_LEN, RecordMac};

pub(super) const SEALED_UNDER_ITS_KEY: Check = Check {
    name: "records (keys, versions, approvals) written under one integrity key are refused \
           under another, and readable again under their own; the key is installed once",
    run: |f| Box::pin(sealed_under_its_key(f)),
};

async fn sealed_under_its_key(f: &dyn StoreFactory) -> Result<(), String> {
    let (mut opened, store) = open(f).await?;
    let k = key(id(1), Some("sealed"));
    ok("create_key", store.create_key(&k, &version(k.id, 1)).await)?;
    let a = super::approvals::approval(SensitiveOperation::EnableKey { key_id: k.id }, 1);
    ok(
        "create_approval",
        store.create_approval(&a, crate::model::Timestamp(1)).await,
    )?;
    let again = Arc::new(ok(
        "a MAC key",
        RecordMac::new(&[0xee; RECORD_MAC_KEY_LEN]),
    )?);
    ensure(store.install_integrity(&again, true).await.is_err(), || {
        "a second install_integrity was accepted".to_owned()
    })?;
    drop(store);
    let other = Arc::new(ok(
        "a MAC key",
        RecordMac::new(&[0x11; RECORD_MAC_KEY_LEN]),
    )?);
    ok(
        "reopening under another integrity key",
        opened.reopen_under_integrity_key(&other).await,
    )?;
    let wrong = opened.handle();
    let integrity = |e: &StoreError| matches!(e, StoreError::IntegrityFailure(_));
    refused!(
        "get_key under another key",
        wrong.get_key(k.id).await,
        StoreError::IntegrityFailure(_)
    )?;
    refused(
        "get_version under another key",
        "IntegrityFailure",
        wrong.get_version(k.id, 1).await,
        integrity,
    )?;
    refused(
        "list_keys under another key",
        "IntegrityFailure",
        wrong.list_keys(&Default::default(), None, 10).await,
        integrity,
    )?;
    refused(
        "key_id_for_alias under another key",
        "IntegrityFailure",
        wrong.key_id_for_alias("sealed").await,
        integrity,
    )?;
    refused!(
        "get_approval under another key",
        wrong.get_approval(a.id).await,
        StoreError::IntegrityFailure(_)
    )?;
    same(
        "list_approvals under another key leaves it out",
        ok("list_approvals", wrong.list_approvals().await)?,
        vec![],
    )?;
    ensure(other.failures() >= 6, || {
        format!(
            "{} integrity failures counted, expected 6",
            other.failures()
        )
    })?;
    drop(wrong);
    ok("reopening", opened.reopen().await)?;
    let store = opened.handle();
    same(
        "the approval under its own key",
        ok("get_approval", store.get_approval(a.id).await)?,
        Some(a),
    )?;
    same(
        "the key under its own key",
        ok("get_key", store.get_key(k.id).await)?,
        Some(k),
    )
}
