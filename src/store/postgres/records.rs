//! How records sit in PostgreSQL's rows: the same JSON as the sled store
//! keeps, in `record`, and its MAC tag apart, in `record_mac`
//! ([`crate::store::integrity`], with the same table names and slot ids as
//! sled's, so that a record and its tag copy between backends), plus the
//! columns that queries select and order by, derived from the record.
//!
//! The derived columns (`alias`, `state`, `next_due_ms`, `hsm_root_key_id`,
//! `in_hsm`, `destroyed`, `status`, ...) are an index, not the truth: every
//! record read is checked against its MAC and its row's id, and a reader
//! that relies on a column checks it against the record too.

use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_postgres::Row;
use tokio_postgres::types::FromSql;
use uuid::Uuid;

use crate::model::{KeyId, KeyRecord, VersionRecord};
use crate::store::StoreError;
use crate::store::approvals::{Approval, ApprovalStatus};
use crate::store::integrity::{RecordMac, Table};

pub(super) fn encode<T: Serialize>(what: &str, record: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(record).map_err(|e| StoreError::Corrupt(format!("encoding {what}: {e}")))
}

pub(super) fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("decoding {what}: {e}")))
}

/// Column `i` of `row`, or [`StoreError::Corrupt`] naming `what`.
pub(super) fn col<'a, T: FromSql<'a>>(row: &'a Row, i: usize, what: &str) -> Result<T, StoreError> {
    row.try_get(i)
        .map_err(|e| StoreError::Corrupt(format!("reading {what} (column {i}): {e}")))
}

pub(super) fn uuid_of(id: KeyId) -> Uuid {
    Uuid::from_bytes(*id.as_bytes())
}

pub(super) fn key_id_of(id: Uuid) -> KeyId {
    KeyId::from_bytes(*id.as_bytes())
}

/// A version number as the `integer` column holds it: versions past
/// `i32::MAX` cannot be stored (refused before writing).
pub(super) fn version_col(id: KeyId, version: u32) -> Result<i32, StoreError> {
    i32::try_from(version).map_err(|_| {
        StoreError::Corrupt(format!(
            "refusing to write: version {version} of key {id} is beyond what the store holds \
             ({})",
            i32::MAX
        ))
    })
}

/// A root-key id in the `integer` columns: the u32's bits (only ever
/// compared for equality, so the sign does not matter).
pub(super) fn root_col(root: u32) -> i32 {
    root as i32
}

pub(super) fn root_of(col: i32) -> u32 {
    col as u32
}

/// A version's slot in the MAC input: key id ‖ version (u32 BE), as sled's
/// `versions` tree keys it.
pub(super) fn version_slot(id: KeyId, version: u32) -> [u8; 20] {
    let mut k = [0u8; 20];
    let (id_part, version_part) = k.split_at_mut(16);
    id_part.copy_from_slice(id.as_bytes());
    version_part.copy_from_slice(&version.to_be_bytes());
    k
}

/// An approval's `status` column.
pub(super) fn status_col(status: &ApprovalStatus) -> &'static str {
    match status {
        ApprovalStatus::Pending => "PENDING",
        ApprovalStatus::Executing => "EXECUTING",
        ApprovalStatus::Executed => "EXECUTED",
        ApprovalStatus::Rejected => "REJECTED",
        ApprovalStatus::Expired => "EXPIRED",
        ApprovalStatus::Failed => "FAILED",
    }
}

/// A record's JSON and its tag (empty while the store is not sealed).
#[derive(Clone, Debug)]
pub(super) struct Sealed {
    pub(super) json: Vec<u8>,
    pub(super) mac: Vec<u8>,
}

/// How records are sealed and checked: with the store's MAC key once it is
/// installed; before, only in a store that is not sealed yet (an empty
/// tag), as sled's schema 2.
#[derive(Clone, Debug)]
pub(super) struct Codec {
    pub(super) mac: Option<Arc<RecordMac>>,
}

impl Codec {
    fn seal(&self, table: Table, slot: &[u8], json: Vec<u8>) -> Sealed {
        let mac = match &self.mac {
            Some(mac) => mac.tag(table, slot, &json).to_vec(),
            None => Vec::new(),
        };
        Sealed { json, mac }
    }

    fn check(&self, table: Table, slot: &[u8], json: &[u8], tag: &[u8]) -> Result<(), StoreError> {
        match &self.mac {
            Some(mac) => mac.verify(table, slot, json, tag),
            None if !tag.is_empty() => Err(StoreError::IntegrityFailure(format!(
                "a sealed {} record, and no integrity key installed",
                table.name()
            ))),
            None => Ok(()),
        }
    }

    pub(super) fn encode_key(&self, record: &KeyRecord) -> Result<Sealed, StoreError> {
        let json = encode("key record", record)?;
        Ok(self.seal(Table::Keys, record.id.as_bytes(), json))
    }

    pub(super) fn encode_version(&self, record: &VersionRecord) -> Result<Sealed, StoreError> {
        let json = encode("version record", record)?;
        let slot = version_slot(record.key_id, record.version);
        Ok(self.seal(Table::Versions, &slot, json))
    }

    pub(super) fn encode_approval(&self, record: &Approval) -> Result<Sealed, StoreError> {
        let json = encode("approval", record)?;
        Ok(self.seal(Table::Approvals, record.id.as_bytes(), json))
    }

    /// A key record read from row `id`: its MAC, then its id.
    pub(super) fn decode_key(
        &self,
        id: KeyId,
        json: &[u8],
        tag: &[u8],
    ) -> Result<KeyRecord, StoreError> {
        self.check(Table::Keys, id.as_bytes(), json, tag)?;
        crate::store::checks::key_in_slot(id, decode(&format!("key {id}"), json)?)
    }

    /// A version record read from row (`id`, `version`).
    pub(super) fn decode_version(
        &self,
        id: KeyId,
        version: u32,
        json: &[u8],
        tag: &[u8],
    ) -> Result<VersionRecord, StoreError> {
        self.check(Table::Versions, &version_slot(id, version), json, tag)?;
        let record = decode(&format!("version {version} of key {id}"), json)?;
        crate::store::checks::version_in_slot(id, version, record)
    }

    /// An approval read from row `id`.
    pub(super) fn decode_approval(
        &self,
        id: Uuid,
        json: &[u8],
        tag: &[u8],
    ) -> Result<Approval, StoreError> {
        self.check(Table::Approvals, id.as_bytes(), json, tag)?;
        let record: Approval = decode(&format!("approval {id}"), json)?;
        if record.id != id {
            return Err(StoreError::Corrupt(format!(
                "approval stored under {id} has id {}",
                record.id
            )));
        }
        Ok(record)
    }

    /// A key row selected as `(id, record, record_mac, ...)`.
    pub(super) fn key_row(&self, row: &Row) -> Result<KeyRecord, StoreError> {
        let id: Uuid = col(row, 0, "a key id")?;
        let json: &[u8] = col(row, 1, "a key record")?;
        let tag: &[u8] = col(row, 2, "a key record's MAC")?;
        self.decode_key(key_id_of(id), json, tag)
    }

    /// A version row selected as `(key_id, version, record, record_mac, ...)`.
    pub(super) fn version_row(&self, row: &Row) -> Result<VersionRecord, StoreError> {
        let id: Uuid = col(row, 0, "a version's key id")?;
        let number: i32 = col(row, 1, "a version number")?;
        let number = u32::try_from(number)
            .map_err(|_| StoreError::Corrupt(format!("version number {number} is negative")))?;
        let json: &[u8] = col(row, 2, "a version record")?;
        let tag: &[u8] = col(row, 3, "a version record's MAC")?;
        self.decode_version(key_id_of(id), number, json, tag)
    }

    /// An approval row selected as `(id, record, record_mac)`.
    pub(super) fn approval_row(&self, row: &Row) -> Result<Approval, StoreError> {
        let id: Uuid = col(row, 0, "an approval id")?;
        let json: &[u8] = col(row, 1, "an approval")?;
        let tag: &[u8] = col(row, 2, "an approval's MAC")?;
        self.decode_approval(id, json, tag)
    }
}
