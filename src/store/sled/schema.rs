//! The schema marker of a generation's sled database, and the migrations
//! from the schema before the due index and from the unsealed records.
//!
//! The `meta` tree's `b"schema"` entry (a `u32`, big endian) is written when
//! a directory is first opened; a directory with another schema, or with
//! data but no marker, is refused as [`StoreError::Corrupt`]. Schema 1 had
//! no `due` tree; opening a schema-1 store builds the index from the keys
//! and sets the marker to 2 in one transaction. Schema 2 has unsealed
//! records; schema 3 only sealed ones ([`crate::store::integrity`]). A new
//! store starts as 2; [`SledEngine::seal_records`] (the server's start,
//! with the MAC key) seals every record and sets 3 in one transaction.

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::layout::{Codec, decode, due_key, key_id_from_slice, parse_version_key};
use super::{Live, SledEngine, sled_error};
use crate::model::{KeyRecord, VersionRecord};
use crate::store::StoreError;
use crate::store::approvals::Approval;
use crate::store::integrity::{IntegrityState, RecordMac, Table, strip_seal_unchecked};

/// The on-disk schema of a store this build serves: 3, sealed records.
/// 2 added the `due` tree (a version-1 store is migrated when opened); 3
/// seals every key and version record (a version-2 store is sealed when
/// its MAC key is installed with migration allowed).
pub const SCHEMA_VERSION: u32 = 3;

/// The schema of a store whose records are not sealed (yet).
pub const UNSEALED_SCHEMA: u32 = 2;

/// The `meta` tree's key of the schema marker.
pub(super) const SCHEMA_KEY: &[u8] = b"schema";

impl SledEngine {
    /// Checks the schema marker, writing it in a new store and migrating a
    /// schema-1 store.
    pub(super) fn check_schema(&self) -> Result<(), StoreError> {
        let live = self.write_gate();
        let stored = live
            .sled
            .meta
            .get(SCHEMA_KEY)
            .map_err(|e| sled_error("reading the schema marker", e))?;
        match stored {
            Some(bytes) => {
                let version = <[u8; 4]>::try_from(bytes.as_ref())
                    .map(u32::from_be_bytes)
                    .map_err(|_| {
                        StoreError::Corrupt(format!(
                            "schema marker in {} is {} bytes, expected 4",
                            self.dir.display(),
                            bytes.len()
                        ))
                    })?;
                if version == SCHEMA_VERSION {
                    self.sealed.store(true, Ordering::Release);
                    Ok(())
                } else if version == UNSEALED_SCHEMA {
                    Ok(())
                } else if version == 1 {
                    self.migrate_from_v1(&live)
                } else {
                    Err(StoreError::Corrupt(format!(
                        "store {} has schema version {version}; this build supports \
                         versions 1 to {SCHEMA_VERSION}",
                        self.dir.display()
                    )))
                }
            }
            None => {
                if live.sled.holds_records() {
                    return Err(StoreError::Corrupt(format!(
                        "store {} holds data but no schema marker",
                        self.dir.display()
                    )));
                }
                let out = live
                    .sled
                    .meta
                    .insert(SCHEMA_KEY, &UNSEALED_SCHEMA.to_be_bytes())
                    .map_err(|e| sled_error("writing the schema marker", e))
                    .and_then(|_| self.make_durable(&live));
                if out.is_err() {
                    self.mark_failed();
                }
                out
            }
        }
    }

    /// Version 1 had no due index: builds it from the keys, and marks the
    /// store version 2 in the same transaction.
    fn migrate_from_v1(&self, live: &Live) -> Result<(), StoreError> {
        let sled = &live.sled;
        // Version 1 never wrote this tree; clear it in case a crashed
        // migration left part of it (the marker still says 1 then).
        sled.due
            .clear()
            .map_err(|e| sled_error("clearing the due index", e))?;
        let mut entries = Vec::new();
        for entry in sled.keys.iter() {
            let (k, v) = entry.map_err(|e| sled_error("reading keys to migrate", e))?;
            let id = key_id_from_slice("a key id in the keys tree", &k)?;
            if let Some(at) = (Codec { mac: None }).decode_key(id, &v)?.next_due() {
                entries.push(due_key(at, id));
            }
        }
        let result = (&sled.meta, &sled.due).transaction(|(meta, due)| {
            for k in &entries {
                due.insert(&k[..], &[][..])?;
            }
            meta.insert(SCHEMA_KEY, &UNSEALED_SCHEMA.to_be_bytes())?;
            Ok::<_, ConflictableTransactionError<StoreError>>(())
        });
        let out = match result {
            Ok(()) => self.make_durable(live),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(sled_error("migrating to schema 2", e)),
        };
        if out.is_err() {
            self.mark_failed();
        }
        out
    }

    /// [`crate::store::KeyStore::install_integrity`] for sled: a sealed
    /// store (schema 3) gets its key; an unsealed one, with `migrate`, has
    /// every key and version record sealed under `mac` (from its JSON,
    /// checked to decode and to belong to its slot; a seal under another
    /// key is replaced: migration trusts what is stored) and its marker set
    /// to 3, in one transaction made durable before the key is installed.
    /// With `migrate` a sealed store is sealed anew the same way.
    pub(super) fn seal_records(
        &self,
        mac: &Arc<RecordMac>,
        migrate: bool,
    ) -> Result<IntegrityState, StoreError> {
        let live = self.write_gate();
        self.check_usable()?;
        if self.mac.get().is_some() {
            return Err(StoreError::Corrupt(format!(
                "the integrity key of store {} is already installed",
                self.dir.display()
            )));
        }
        if !migrate {
            if !self.sealed.load(Ordering::Acquire) {
                return Ok(IntegrityState::NeedsMigration);
            }
            let _ = self.mac.set(Arc::clone(mac));
            return Ok(IntegrityState::Sealed);
        }
        let sled = &live.sled;
        let mut keys = Vec::new();
        for entry in sled.keys.iter() {
            let (k, v) = entry.map_err(|e| sled_error("reading keys to seal", e))?;
            let id = key_id_from_slice("a key id in the keys tree", &k)?;
            let json = strip_seal_unchecked(&v);
            let record: KeyRecord = decode(&format!("key {id}"), json)?;
            if record.id != id {
                return Err(StoreError::Corrupt(format!(
                    "key record stored under {id} has id {}",
                    record.id
                )));
            }
            let sealed = mac.seal(Table::Keys, id.as_bytes(), json);
            keys.push((k, sealed));
        }
        let mut versions = Vec::new();
        for entry in sled.versions.iter() {
            let (k, v) = entry.map_err(|e| sled_error("reading versions to seal", e))?;
            let (id, number) = parse_version_key(&k)?;
            let json = strip_seal_unchecked(&v);
            let record: VersionRecord = decode(&format!("version {number} of key {id}"), json)?;
            if record.key_id != id || record.version != number {
                return Err(StoreError::Corrupt(format!(
                    "version record stored as {id} v{number} claims {} v{}",
                    record.key_id, record.version
                )));
            }
            let sealed = mac.seal(Table::Versions, &k, json);
            versions.push((k, sealed));
        }
        let mut approvals = Vec::new();
        for entry in sled.approvals.iter() {
            let (k, v) = entry.map_err(|e| sled_error("reading approvals to seal", e))?;
            let json = strip_seal_unchecked(&v);
            let record: Approval = decode("an approval", json)?;
            if record.id.as_bytes().as_slice() != k.as_ref() {
                return Err(StoreError::Corrupt(format!(
                    "approval {} is stored under another id",
                    record.id
                )));
            }
            let sealed = mac.seal(Table::Approvals, &k, json);
            approvals.push((k, sealed));
        }
        let result = (&sled.meta, &sled.keys, &sled.versions, &sled.approvals).transaction(
            |(meta, k, v, a)| {
                for (slot, sealed) in &keys {
                    k.insert(slot, sealed.as_slice())?;
                }
                for (slot, sealed) in &versions {
                    v.insert(slot, sealed.as_slice())?;
                }
                for (slot, sealed) in &approvals {
                    a.insert(slot, sealed.as_slice())?;
                }
                meta.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())?;
                Ok::<_, ConflictableTransactionError<StoreError>>(())
            },
        );
        let out = match result {
            Ok(()) => self.make_durable(&live),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(sled_error("sealing the records", e)),
        };
        if let Err(e) = out {
            self.mark_failed();
            return Err(e);
        }
        self.sealed.store(true, Ordering::Release);
        let _ = self.mac.set(Arc::clone(mac));
        Ok(IntegrityState::Migrated {
            records: u64::try_from(keys.len() + versions.len() + approvals.len())
                .unwrap_or(u64::MAX),
        })
    }
}
