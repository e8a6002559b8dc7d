//! Quorum approvals in the sled store: the `approvals` tree, written in
//! the same transactions as the keys (an approved change and its
//! approval's outcome are one write).
//!
//! sled's transactions cannot scan a tree, so the search for a pending
//! twin reads the durable tree in [`SledEngine::write_prepared`]'s prepare
//! step: under the write gate, so no other write of this store comes
//! between the search and the insert (and only one process opens a store).

use uuid::Uuid;

use super::key_store::{Tx, abort};
use super::layout::Codec;
use super::{Handles, SledEngine, sled_error};
use crate::model::{KeyRecord, Timestamp};
use crate::store::StoreError;
use crate::store::approvals::{Approval, ApprovalStatus};
use crate::store::checks::{check_approval_and_key, check_approval_swap};
use sled::transaction::ConflictableTransactionResult;

fn uuid_from_slice(bytes: &[u8]) -> Result<Uuid, StoreError> {
    Uuid::from_slice(bytes).map_err(|_| {
        StoreError::Corrupt(format!(
            "an approval id is {} bytes, expected 16",
            bytes.len()
        ))
    })
}

impl Handles {
    /// Every approval whose record opens, and how many did not (integrity
    /// failures, left out; other errors fail the call).
    fn approvals_of(&self, codec: Codec<'_>) -> Result<Vec<Approval>, StoreError> {
        let mut out = Vec::new();
        for entry in self.approvals.iter() {
            let (k, v) = entry.map_err(|e| sled_error("reading approvals", e))?;
            let id = uuid_from_slice(&k)?;
            match codec.decode_approval(id, &v) {
                Ok(a) => out.push(a),
                Err(StoreError::IntegrityFailure(_)) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by_key(|a| (a.created_at, a.id));
        Ok(out)
    }
}

impl Tx<'_> {
    /// The stored approval `current.id` must equal `current`.
    fn check_approval(
        &self,
        codec: Codec<'_>,
        current: &Approval,
    ) -> ConflictableTransactionResult<(), StoreError> {
        let Some(bytes) = self.approvals.get(current.id.as_bytes())? else {
            return abort(StoreError::NoSuchApproval(current.id));
        };
        match codec.decode_approval(current.id, &bytes) {
            Ok(stored) if stored == *current => Ok(()),
            Ok(_) => abort(StoreError::ApprovalConflict(current.id)),
            Err(e) => abort(e),
        }
    }
}

impl SledEngine {
    /// [`crate::store::KeyStore::create_approval`], blocking.
    pub fn create_approval(
        &self,
        approval: &Approval,
        now: Timestamp,
    ) -> Result<Option<Approval>, StoreError> {
        let codec = self.codec()?;
        let bytes = codec.encode_approval(approval)?;
        let twin_of = |stored: &Approval| {
            stored.status == ApprovalStatus::Pending
                && now <= stored.expires_at
                && stored.operation == approval.operation
        };
        self.write_prepared(
            |h| Ok(h.approvals_of(codec)?.into_iter().find(twin_of)),
            |tx, twin| {
                if let Some(twin) = twin {
                    return Ok(Some(twin.clone()));
                }
                if tx.approvals.get(approval.id.as_bytes())?.is_some() {
                    return abort(StoreError::ApprovalExists(approval.id));
                }
                tx.approvals
                    .insert(approval.id.as_bytes(), bytes.as_slice())?;
                Ok(None)
            },
        )
    }

    /// [`crate::store::KeyStore::get_approval`], blocking.
    pub fn get_approval(&self, id: Uuid) -> Result<Option<Approval>, StoreError> {
        let codec = self.codec()?;
        let live = self.read_gate()?;
        let bytes = live
            .sled
            .approvals
            .get(id.as_bytes())
            .map_err(|e| sled_error("reading an approval", e))?;
        bytes.map(|b| codec.decode_approval(id, &b)).transpose()
    }

    /// [`crate::store::KeyStore::list_approvals`], blocking.
    pub fn list_approvals(&self) -> Result<Vec<Approval>, StoreError> {
        let codec = self.codec()?;
        let live = self.read_gate()?;
        live.sled.approvals_of(codec)
    }

    /// [`crate::store::KeyStore::swap_approval`], blocking.
    pub fn swap_approval(&self, current: &Approval, new: &Approval) -> Result<(), StoreError> {
        check_approval_swap(current, new)?;
        let codec = self.codec()?;
        let bytes = codec.encode_approval(new)?;
        self.write(|tx| {
            tx.check_approval(codec, current)?;
            tx.approvals.insert(new.id.as_bytes(), bytes.as_slice())?;
            Ok(())
        })
    }

    /// [`crate::store::KeyStore::swap_approval_and_key`], blocking.
    pub fn swap_approval_and_key(
        &self,
        (current, new): (&Approval, &Approval),
        (key, next): (&KeyRecord, &KeyRecord),
    ) -> Result<(), StoreError> {
        check_approval_and_key((current, new), (key, next))?;
        let codec = self.codec()?;
        let approval_bytes = codec.encode_approval(new)?;
        let key_bytes = codec.encode_key(next)?;
        self.write(|tx| {
            tx.check_approval(codec, current)?;
            tx.check_current(codec, key)?;
            tx.approvals
                .insert(new.id.as_bytes(), approval_bytes.as_slice())?;
            tx.put_key(Some(key), next, &key_bytes)
        })
    }
}
