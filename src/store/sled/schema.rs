//! The schema marker of a generation's sled database, and the migration
//! from the schema before the due index.
//!
//! The `meta` tree's `b"schema"` entry (a `u32`, big endian) is written when
//! a directory is first opened; a directory with another schema, or with
//! data but no marker, is refused as [`StoreError::Corrupt`]. Schema 1 had
//! no `due` tree; opening a schema-1 store builds the index from the keys
//! and sets the marker to 2 in one transaction.

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::layout::{decode_key, due_key, key_id_from_slice};
use super::{Live, SledStore, sled_error};
use crate::store::StoreError;

/// The on-disk schema this build reads and writes.
/// 2 added the `due` tree; a version-1 store is migrated when opened.
pub const SCHEMA_VERSION: u32 = 2;

/// The `meta` tree's key of the schema marker.
pub(super) const SCHEMA_KEY: &[u8] = b"schema";

impl SledStore {
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
                    Ok(())
                } else if version == 1 {
                    self.migrate_from_v1(&live)
                } else {
                    Err(StoreError::Corrupt(format!(
                        "store {} has schema version {version}; this build supports only \
                         version {SCHEMA_VERSION}",
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
                    .insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())
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
            if let Some(at) = decode_key(id, &v)?.next_due() {
                entries.push(due_key(at, id));
            }
        }
        let result = (&sled.meta, &sled.due).transaction(|(meta, due)| {
            for k in &entries {
                due.insert(&k[..], &[][..])?;
            }
            meta.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())?;
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
}
