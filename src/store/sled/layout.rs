//! How records are laid out in a generation's sled trees: the key
//! encodings, and the JSON records checked against the slot they were read
//! from.
//!
//! ```text
//! tree       key                                   value
//! ---------  ------------------------------------  ----------------------------
//! meta       b"schema"                             u32 BE: 2 unsealed, 3 sealed
//! meta       b"secret/" || name                    JSON WrappedSecret
//! keys       KeyId (16 bytes)                      sealed JSON KeyRecord
//! versions   KeyId (16 bytes) || version (u32 BE)  sealed JSON VersionRecord
//! aliases    alias (UTF-8)                         KeyId (16 bytes)
//! due        due time (i64 BE, sign bit flipped)   empty
//!              || KeyId (16 bytes)
//! approvals  approval id (16 bytes)                sealed JSON Approval
//! meta       b"generation"                         u64 BE: the newest change
//! changes    generation (u64 BE)                   KeyId (16 bytes)
//! key_gens   KeyId (16 bytes)                      its last generation (u64 BE)
//! ```
//!
//! `changes` and `key_gens` are the change feed (`KeyStore::changes_since`):
//! each write of a key record takes the next generation in the same
//! transaction, moves the key's one entry in `changes` to it, and records
//! it in `key_gens` (so a key is listed once, at its last change).
//!
//! `due` indexes [`KeyRecord::next_due`]: one entry per key that has a due
//! time, written in the same transaction as the key record (the old entry
//! removed, the new one inserted), so the scheduler reads only what is due.
//! Flipping the sign bit makes byte order numeric order, negative times
//! included.
//!
//! Big-endian versions make a prefix scan of `versions` ascend by version, and
//! raw id bytes make `keys` ascend by id. Every decoded record is checked
//! against the key it was stored under (a record moved to another slot is
//! reported as [`StoreError::Corrupt`]), and an undecodable one is
//! [`StoreError::Corrupt`] too.
//!
//! "Sealed" is [`crate::store::integrity`]'s format: the record's JSON after
//! a MAC over the tree's name, the sled key (the slot) and the JSON. A store
//! of schema 3 holds only sealed records, and is read and written only once
//! its MAC key is installed ([`Codec`]). Schema 2 (unsealed) is what a new
//! store starts as, and what the store's own tests use; the server seals
//! it at its first start (`SledEngine::install_integrity`).

use serde::Serialize;
use serde::de::DeserializeOwned;

use uuid::Uuid;

use crate::model::{KeyId, KeyRecord, Timestamp, VersionRecord};
use crate::store::StoreError;
use crate::store::approvals::Approval;
use crate::store::integrity::{RecordMac, Table, is_sealed};

pub(super) const VERSION_KEY_LEN: usize = 16 + 4;
const DUE_KEY_LEN: usize = 8 + 16;

pub(super) fn encode<T: Serialize>(what: &str, record: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(record).map_err(|e| StoreError::Corrupt(format!("encoding {what}: {e}")))
}

pub(super) fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("decoding {what}: {e}")))
}

pub(super) fn version_key(id: KeyId, version: u32) -> [u8; VERSION_KEY_LEN] {
    let mut k = [0u8; VERSION_KEY_LEN];
    let (id_part, version_part) = k.split_at_mut(16);
    id_part.copy_from_slice(id.as_bytes());
    version_part.copy_from_slice(&version.to_be_bytes());
    k
}

pub(super) fn key_id_from_slice(what: &str, bytes: &[u8]) -> Result<KeyId, StoreError> {
    <[u8; 16]>::try_from(bytes)
        .map(KeyId::from_bytes)
        .map_err(|_| StoreError::Corrupt(format!("{what} is {} bytes, expected 16", bytes.len())))
}

/// How records are sealed and opened: with the store's MAC key once it is
/// installed, unsealed before (schema 2 only: a sealed record is refused
/// then, see `SledEngine::codec`).
#[derive(Clone, Copy, Debug)]
pub(super) struct Codec<'a> {
    pub(super) mac: Option<&'a RecordMac>,
}

impl Codec<'_> {
    fn seal(&self, table: Table, slot: &[u8], json: Vec<u8>) -> Vec<u8> {
        match self.mac {
            Some(mac) => mac.seal(table, slot, &json),
            None => json,
        }
    }

    fn open<'b>(&self, table: Table, slot: &[u8], bytes: &'b [u8]) -> Result<&'b [u8], StoreError> {
        match self.mac {
            Some(mac) => mac.open(table, slot, bytes),
            None if is_sealed(bytes) => Err(StoreError::IntegrityFailure(format!(
                "a sealed {} record, and no integrity key installed",
                table.name()
            ))),
            None => Ok(bytes),
        }
    }

    pub(super) fn encode_key(&self, record: &KeyRecord) -> Result<Vec<u8>, StoreError> {
        let json = encode("key record", record)?;
        Ok(self.seal(Table::Keys, record.id.as_bytes(), json))
    }

    pub(super) fn encode_version(&self, record: &VersionRecord) -> Result<Vec<u8>, StoreError> {
        let json = encode("version record", record)?;
        let slot = version_key(record.key_id, record.version);
        Ok(self.seal(Table::Versions, &slot, json))
    }

    pub(super) fn encode_approval(&self, record: &Approval) -> Result<Vec<u8>, StoreError> {
        let json = encode("approval", record)?;
        Ok(self.seal(Table::Approvals, record.id.as_bytes(), json))
    }

    /// Opens an approval and checks that it belongs where it was found.
    pub(super) fn decode_approval(&self, id: Uuid, bytes: &[u8]) -> Result<Approval, StoreError> {
        let json = self.open(Table::Approvals, id.as_bytes(), bytes)?;
        let record: Approval = decode(&format!("approval {id}"), json)?;
        if record.id != id {
            return Err(StoreError::Corrupt(format!(
                "approval stored under {id} has id {}",
                record.id
            )));
        }
        Ok(record)
    }

    /// Opens a key record and checks that it belongs where it was found.
    pub(super) fn decode_key(&self, id: KeyId, bytes: &[u8]) -> Result<KeyRecord, StoreError> {
        let json = self.open(Table::Keys, id.as_bytes(), bytes)?;
        crate::store::checks::key_in_slot(id, decode(&format!("key {id}"), json)?)
    }

    /// Opens a version record and checks that it belongs where it was found.
    pub(super) fn decode_version(
        &self,
        id: KeyId,
        version: u32,
        bytes: &[u8],
    ) -> Result<VersionRecord, StoreError> {
        let json = self.open(Table::Versions, &version_key(id, version), bytes)?;
        let record = decode(&format!("version {version} of key {id}"), json)?;
        crate::store::checks::version_in_slot(id, version, record)
    }
}

/// The due-index key: the time as an `i64` with its sign bit flipped, big
/// endian (so byte order is numeric order, negatives first), then the id.
pub(super) fn due_key(at: Timestamp, id: KeyId) -> [u8; DUE_KEY_LEN] {
    let mut k = [0u8; DUE_KEY_LEN];
    let (time_part, id_part) = k.split_at_mut(8);
    time_part.copy_from_slice(&((at.as_millis() as u64) ^ (1 << 63)).to_be_bytes());
    id_part.copy_from_slice(id.as_bytes());
    k
}

pub(super) fn parse_due_key(bytes: &[u8]) -> Result<(Timestamp, KeyId), StoreError> {
    let corrupt = || {
        StoreError::Corrupt(format!(
            "a due-index key is {} bytes, expected {DUE_KEY_LEN}",
            bytes.len()
        ))
    };
    if bytes.len() != DUE_KEY_LEN {
        return Err(corrupt());
    }
    let (time_part, id_part) = bytes.split_at(8);
    let time = <[u8; 8]>::try_from(time_part).map_err(|_| corrupt())?;
    let at = Timestamp((u64::from_be_bytes(time) ^ (1 << 63)) as i64);
    Ok((at, key_id_from_slice("a key id in the due index", id_part)?))
}

pub(super) fn parse_version_key(bytes: &[u8]) -> Result<(KeyId, u32), StoreError> {
    if bytes.len() != VERSION_KEY_LEN {
        return Err(StoreError::Corrupt(format!(
            "a version key is {} bytes, expected {VERSION_KEY_LEN}",
            bytes.len()
        )));
    }
    let (id_part, number) = bytes.split_at(16);
    let id = key_id_from_slice("a key id in the versions tree", id_part)?;
    let number = <[u8; 4]>::try_from(number)
        .map(u32::from_be_bytes)
        .map_err(|_| StoreError::Corrupt("a version number is not 4 bytes".to_owned()))?;
    Ok((id, number))
}

pub(super) const SECRET_PREFIX: &[u8] = b"secret/";

/// The newest generation of the change feed, in `meta`.
pub(super) const GENERATION_KEY: &[u8] = b"generation";

/// A u64 stored big-endian (a generation).
pub(super) fn parse_u64(what: &str, bytes: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(bytes)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt(format!("{what} is {} bytes, expected 8", bytes.len())))
}

/// The prefix of the root-key fence's markers, in `meta`.
pub(super) const RETIRED_PREFIX: &[u8] = b"root/retired/";

/// The marker of a root key fenced off by a rotation, in `meta`.
pub(super) fn retired_root_key(id: u32) -> Vec<u8> {
    let mut key = RETIRED_PREFIX.to_vec();
    key.extend_from_slice(&id.to_be_bytes());
    key
}

pub(super) fn secret_key(name: &str) -> Vec<u8> {
    let mut key = SECRET_PREFIX.to_vec();
    key.extend_from_slice(name.as_bytes());
    key
}
