//! [`SledEngine::export`]: the whole store as stored, for `coffre store
//! copy` ([`crate::store::copy`]).

use std::sync::atomic::Ordering;

use uuid::Uuid;

use super::layout::{
    GENERATION_KEY, RETIRED_PREFIX, SECRET_PREFIX, decode, key_id_from_slice, parse_u64,
    parse_version_key,
};
use super::{SledEngine, sled_error};
use crate::model::{KeyRecord, VersionRecord};
use crate::store::StoreError;
use crate::store::approvals::Approval;
use crate::store::checks::{key_in_slot, version_in_slot};
use crate::store::copy::{StoreDump, StoredRecord};
use crate::store::integrity::{Table, describe_id, split_sealed_unchecked};

/// A sealed value's tag and JSON, unchecked (the MAC key is not needed: the
/// target checks it); an unsealed value in a sealed store is refused.
fn split(table: Table, slot: &[u8], bytes: &[u8]) -> Result<(Vec<u8>, Vec<u8>), StoreError> {
    match split_sealed_unchecked(bytes) {
        Some((tag, json)) => Ok((tag.to_vec(), json.to_vec())),
        None => Err(StoreError::IntegrityFailure(format!(
            "{} record {} is not sealed in a sealed store",
            table.name(),
            describe_id(table, slot)
        ))),
    }
}

impl SledEngine {
    /// Whether the records are sealed (schema 3): a store some coffre
    /// server has started on. Only such a store can be copied.
    pub fn is_sealed(&self) -> bool {
        self.sealed.load(Ordering::Acquire)
    }

    /// Every key (with its change-feed generation), version, approval,
    /// service secret and root-key fence marker, exactly as stored, read
    /// under the gate (one consistent state; the caller holds the
    /// directory's lock, so no other process writes).
    ///
    /// Needs no MAC key: tags are taken as they are and checked by the
    /// target. Each record must decode and belong to its slot
    /// ([`StoreError::Corrupt`] otherwise), and be sealed
    /// ([`StoreError::IntegrityFailure`]). A key the change feed never
    /// listed (a store from before the feed) gets a generation after the
    /// newest, so the target's feed still covers it.
    pub fn export(&self) -> Result<StoreDump, StoreError> {
        if !self.is_sealed() {
            return Err(StoreError::Corrupt(format!(
                "the records of store {} are not sealed (schema 2): start coffre on it once, \
                 which seals them, then copy",
                self.dir.display()
            )));
        }
        let live = self.read_gate()?;
        let sled = &live.sled;
        let mut dump = StoreDump {
            generation: match sled
                .meta
                .get(GENERATION_KEY)
                .map_err(|e| sled_error("reading the feed's generation", e))?
            {
                Some(b) => parse_u64("the feed's generation", &b)?,
                None => 0,
            },
            ..StoreDump::default()
        };
        let mut unlisted = Vec::new();
        for entry in sled.keys.iter() {
            let (k, v) = entry.map_err(|e| sled_error("reading keys", e))?;
            let id = key_id_from_slice("a key id", &k)?;
            let (tag, json) = split(Table::Keys, &k, &v)?;
            let record: KeyRecord = key_in_slot(id, decode(&format!("key {id}"), &json)?)?;
            let generation = match sled
                .key_gens
                .get(&k)
                .map_err(|e| sled_error("reading the feed", e))?
            {
                Some(b) => parse_u64("a key's generation", &b)?,
                None => 0,
            };
            if generation == 0 {
                unlisted.push(dump.keys.len());
            }
            dump.generation = dump.generation.max(generation);
            dump.keys
                .push((StoredRecord { record, json, tag }, generation));
        }
        for i in unlisted {
            dump.generation += 1;
            if let Some((_, generation)) = dump.keys.get_mut(i) {
                *generation = dump.generation;
            }
        }
        for entry in sled.versions.iter() {
            let (k, v) = entry.map_err(|e| sled_error("reading versions", e))?;
            let (id, number) = parse_version_key(&k)?;
            let (tag, json) = split(Table::Versions, &k, &v)?;
            let record: VersionRecord = version_in_slot(
                id,
                number,
                decode(&format!("version {number} of key {id}"), &json)?,
            )?;
            dump.versions.push(StoredRecord { record, json, tag });
        }
        for entry in sled.approvals.iter() {
            let (k, v) = entry.map_err(|e| sled_error("reading approvals", e))?;
            let id = Uuid::from_bytes(*key_id_from_slice("an approval id", &k)?.as_bytes());
            let (tag, json) = split(Table::Approvals, &k, &v)?;
            let record: Approval = decode(&format!("approval {id}"), &json)?;
            if record.id != id {
                return Err(StoreError::Corrupt(format!(
                    "approval stored under {id} has id {}",
                    record.id
                )));
            }
            dump.approvals.push(StoredRecord { record, json, tag });
        }
        for entry in sled.meta.scan_prefix(SECRET_PREFIX) {
            let (k, v) = entry.map_err(|e| sled_error("reading service secrets", e))?;
            let name = std::str::from_utf8(k.get(SECRET_PREFIX.len()..).unwrap_or_default())
                .map_err(|_| StoreError::Corrupt("a service secret's name is not UTF-8".into()))?;
            let secret = decode(&format!("service secret {name:?}"), &v)?;
            dump.secrets.push((name.to_string(), secret));
        }
        for entry in sled.meta.scan_prefix(RETIRED_PREFIX) {
            let (k, _) = entry.map_err(|e| sled_error("reading the root-key fence", e))?;
            let id = k
                .get(RETIRED_PREFIX.len()..)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(u32::from_be_bytes)
                .ok_or_else(|| {
                    StoreError::Corrupt("a root-key fence marker is not 4 bytes".into())
                })?;
            dump.retired_root_keys.push(id);
        }
        Ok(dump)
    }
}
