//! [`SledStore`]: the embedded [`KeyStore`], on sled 0.34.7 in one data
//! directory.
//!
//! # Layout
//!
//! ```text
//! DIR/LOCK          flock'ed by the process that has the store open
//! DIR/CURRENT       "gen-NNNNNN\n": the live generation
//! DIR/gen-NNNNNN/   a sled database (db, conf, blobs/, snap.*)
//! ```
//!
//! A generation is a complete sled database; [`KeyStore::compact`] writes the
//! next one and switches `CURRENT` (see "Compaction"). `CURRENT` is replaced
//! atomically (written to `CURRENT.tmp`, `fsync`ed, renamed, then the
//! directory `fsync`ed), and only ever names a complete, durable generation.
//! [`SledStore::open`]:
//!
//! - with `CURRENT`: serves the generation it names (refused as
//!   [`StoreError::Corrupt`] if that holds no database), and erases
//!   everything else a crash may have left: `CURRENT.tmp`, every other
//!   `gen-*`, sled files at the top of `DIR`;
//! - without `CURRENT`, with sled's files at the top of `DIR` (the layout
//!   before generations): migrates, once, by the compaction's copy: erases
//!   any `gen-*` (a partial migration), opens the old database in place
//!   (and upgrades its schema if needed), copies it into `gen-000001`,
//!   writes `CURRENT`, erases the old files. A crash at any point leaves
//!   either no `CURRENT` and the old files intact (the migration starts
//!   over), or `CURRENT` naming the complete copy;
//! - without either: creates `gen-000001`, then `CURRENT`. A lone
//!   `gen-000001` without `CURRENT` is an interrupted creation and is
//!   adopted if it holds no record; generations holding records, or other
//!   generations, without `CURRENT` are refused (someone removed `CURRENT`:
//!   guessing could serve an old state).
//!
//! "Erases" means overwritten with zeros (best effort: a failure is logged)
//! and unlinked (a failure to unlink fails the open with [`StoreError::Io`]).
//!
//! ```text
//! tree       key                                   value
//! ---------  ------------------------------------  ----------------------------
//! meta       b"schema"                             u32 BE, currently 2
//! meta       b"secret/" || name                    JSON WrappedSecret
//! keys       KeyId (16 bytes)                      JSON KeyRecord
//! versions   KeyId (16 bytes) || version (u32 BE)  JSON VersionRecord
//! aliases    alias (UTF-8)                         KeyId (16 bytes)
//! due        due time (i64 BE, sign bit flipped)   empty
//!              || KeyId (16 bytes)
//! ```
//!
//! `due` indexes [`KeyRecord::next_due`]: one entry per key that has a due
//! time, written in the same transaction as the key record (the old entry
//! removed, the new one inserted), so the scheduler reads only what is due.
//! Flipping the sign bit makes byte order numeric order, negative times
//! included. Schema 1 had no `due` tree; opening a schema-1 store builds the
//! index from the keys and sets the marker to 2 in one transaction.
//!
//! Big-endian versions make a prefix scan of `versions` ascend by version, and
//! raw id bytes make `keys` ascend by id. Every decoded record is checked
//! against the key it was stored under (a record moved to another slot is
//! reported as [`StoreError::Corrupt`]). The `meta` tree's schema marker is
//! written when a directory is first opened; a directory with another schema,
//! or with data but no marker, is refused.
//!
//! # Atomicity
//!
//! Each mutating call is one sled transaction over `keys`, `versions`,
//! `aliases` and `due`. sled seals a transaction's writes as one batch in its log
//! (`Tree::transaction` → `pin_log` / `seal_batch`), and recovery replays a
//! batch entirely or not at all. A check that fails (key exists, alias taken,
//! stale `current`) aborts the transaction, and nothing is written.
//!
//! # Durability
//!
//! A mutating call returns `Ok` only once its change is on stable storage.
//! `Db::flush` is not enough: on Linux sled 0.34.7 writes its log with
//! `pwrite` and then `sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER)`
//! (`pagecache/iobuf.rs`), which pushes the data pages to the device but
//! neither commits the file's metadata (size, block allocation in the
//! file-system journal) nor flushes the device's volatile write cache. sled
//! also never syncs `conf` (written at creation) nor the `blobs/*` files
//! (values too large for a log segment). So after the transaction, each
//! write:
//!
//! 1. calls `Db::flush`, so every log write up to this point has been issued
//!    and has reached the page cache and the device queue;
//! 2. `fsync`s (`File::sync_all`) `db`, `conf`, every `snap.*`, every file
//!    under `blobs/` and the `blobs/` directory;
//! 3. `fsync`s the data directory, which makes new directory entries (a new
//!    blob, a renamed snapshot) durable.
//!
//! `fsync` of a file whose pages were already written forces the remaining
//! dirty pages, the inode metadata and a cache flush (FLUSH/FUA) to the
//! device, so after step 3 the batch survives a power cut, not only a process
//! crash. The cost is a few `fsync`s per write; writes are rare (key
//! creation, rotation, state changes), and data-key requests never write.
//!
//! # Concurrency
//!
//! A [`RwLock`] orders everything; it holds the live generation's handles. A
//! writer holds it exclusively across transaction, flush and `fsync`, and a
//! compaction across its whole copy and switch; readers share it. Without this, a reader
//! could see a change that is not yet durable (sled makes a transaction
//! visible in memory before the flush), for instance wrap data keys under a
//! new CMK version that a power cut then erases — those ciphertexts would
//! become undecryptable. With it, a reader sees only durable states. Reads
//! wait at most for one write's `fsync`s, and the service caches key
//! versions, so this is off the hot path.
//!
//! If a transaction fails in sled's storage layer, or a flush or an `fsync`
//! fails, the store marks itself failed and refuses every later call with
//! [`StoreError::Io`]: after a failed `fsync` the kernel may have dropped
//! the dirty pages, and the in-memory state may hold changes that are not on
//! disk. Reopening the directory (in a new process: see `Drop`) recovers
//! exactly what was durable. Such an
//! `Io` error from a mutating call means "outcome unknown": the change may or
//! may not have been persisted.
//!
//! # Erasure
//!
//! [`KeyStore::destroy_key`] empties every version record, but sled 0.34.7
//! keeps the old bytes in its files. Observed (a 60-byte wrapped material,
//! stored hex-encoded inside the JSON record, so a search for the raw bytes
//! finds nothing and proves nothing): after the destroy, its flush and
//! `fsync`, closing, reopening three times and 600 further writes, the hex
//! of the material is still in `db`. sled is log-structured: an update
//! appends a new fragment of the leaf page and leaves the old one in its
//! segment; a segment is rewritten only when the segment cleaner relocates
//! its live pages, and only wholly free segments are overwritten (with
//! `MessageKind::Corrupted` bytes, at recovery in
//! `SegmentAccountant::initialize_from_snapshot`), so a fragment sharing a
//! segment with live data survives indefinitely. Copying every tree into a
//! fresh sled directory leaves no trace there: that is what
//! [`KeyStore::compact`] does (checked by
//! `compaction_leaves_no_trace_of_destroyed_material`, which searches every
//! file for the raw bytes and the hex, before and after).
//!
//! Compaction cleans the store's files, not the blocks the old files
//! occupied (zero-filling before unlinking helps on file systems that
//! overwrite in place, such as ext4 or XFS, not on copy-on-write ones such as
//! btrfs or ZFS), nor SSD spare areas, snapshots or backups. Against those,
//! erasure is cryptographic: the destroyed material is wrapped under the HSM
//! root key, and rotating the root key (re-wrapping the live versions with
//! [`KeyStore::rewrap_version`], then destroying the old root key in the
//! HSM) makes every leftover copy undecryptable.
//!
//! # Compaction
//!
//! [`KeyStore::compact`] takes the gate exclusively (reads and writes wait:
//! about 2 s for 10,000 keys in a debug build), then:
//!
//! 1. copies every tree (`Db::tree_names`) into a new sled database in
//!    `gen-(N+1)`, compares the copy with the original entry by entry, and
//!    makes it durable as a write is (flush, `fsync` of its files, then of
//!    `DIR`);
//! 2. replaces `CURRENT` atomically, naming `gen-(N+1)`;
//! 3. serves the new database, closes the old one and erases `gen-N`, then
//!    `fsync`s `DIR`.
//!
//! A crash before step 2's rename leaves `gen-N` live and a partial
//! `gen-(N+1)`; after it, `gen-(N+1)` live and a stale `gen-N`: the next open
//! erases the leftover either way. A failure in step 1 or before the rename
//! leaves the store serving `gen-N` (the partial copy is erased, or left for
//! the next open). A failed `fsync` of `DIR` after the rename makes the store
//! failed (below), since either generation may be the durable one. A failure
//! in step 3's erasure returns [`StoreError::Io`] with the store serving
//! `gen-(N+1)`, and the next open retries.
//!
//! # Errors
//!
//! sled I/O errors (including a full or read-only disk) become
//! [`StoreError::Io`]; sled's own corruption errors and undecodable records
//! become [`StoreError::Corrupt`]. A request that would write an inconsistent
//! record (see [`KeyStore`]'s methods) is refused with
//! [`StoreError::Corrupt`] before anything is written.
//!
//! `tests/storage_faults.rs` runs `coffre dev` on a small ext4 file system
//! that fills up, then turns read-only under it: writes fail with `Io` and
//! poison the store, opening on the read-only file system fails with `Io`,
//! and a restart on the repaired file system holds every acknowledged key.
//! The two `#[ignore]`d tests below check the store alone, by hand.
//!
//! Known limitation of sled 0.34.7: its `Log` calls `sync_all().unwrap()`
//! when the database is dropped, so a disk that fails exactly at shutdown can
//! make sled itself panic in `Drop`. This code never panics.

use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde::Serialize;
use serde::de::DeserializeOwned;
use sled::Transactional;
use sled::transaction::{
    ConflictableTransactionError, ConflictableTransactionResult, TransactionError,
    TransactionalTree,
};

use super::{KeyFilter, KeyStore, StoreError, VersionCounts, WrappedSecret};
use crate::model::{KeyId, KeyRecord, KeyState, Timestamp, VersionRecord};

/// The on-disk schema this build reads and writes.
/// 2 added the `due` tree; a version-1 store is migrated when opened.
pub const SCHEMA_VERSION: u32 = 2;

const SCHEMA_KEY: &[u8] = b"schema";
const VERSION_KEY_LEN: usize = 16 + 4;
const DUE_KEY_LEN: usize = 8 + 16;

/// The file in the store directory that names the live generation.
const CURRENT: &str = "CURRENT";
/// Where the next content of [`CURRENT`] is written before its rename.
const CURRENT_TMP: &str = "CURRENT.tmp";
/// Locked (`flock`) by the process that has the store open.
const LOCK: &str = "LOCK";
const GENERATION_PREFIX: &str = "gen-";

/// The name of generation `n`'s directory, e.g. `gen-000001`.
fn generation_name(n: u32) -> String {
    format!("{GENERATION_PREFIX}{n:06}")
}

/// The inverse of [`generation_name`]; `None` for anything not spelled
/// exactly as it would write it.
fn parse_generation_name(name: &str) -> Option<u32> {
    let n = name.strip_prefix(GENERATION_PREFIX)?.parse().ok()?;
    (generation_name(n) == name && n > 0).then_some(n)
}

/// The sled-backed [`KeyStore`]. See the module docs for layout, durability
/// and concurrency.
pub struct SledStore {
    dir: PathBuf,
    /// The live generation. Exclusive for a write through its `fsync`s and
    /// for a compaction, shared for reads.
    gate: RwLock<Live>,
    /// Set once a write may have left non-durable state in memory.
    failed: AtomicBool,
    /// `DIR/LOCK`, locked for the store's lifetime: one process per
    /// directory. Last field, so released after sled's handles are closed.
    lock: File,
    #[cfg(test)]
    fail_compaction_at: std::sync::Mutex<Option<&'static str>>,
}

/// The generation the store serves.
struct Live {
    /// 0 is the layout before generations (sled directly in the store
    /// directory), only while it is being migrated.
    generation: u32,
    /// The sled directory of the generation.
    path: PathBuf,
    sled: Arc<Handles>,
}

/// sled's handles, in an [`Arc`] so that [`SledStore`]'s `Drop` can leak
/// them; see there.
struct Handles {
    db: sled::Db,
    meta: sled::Tree,
    keys: sled::Tree,
    versions: sled::Tree,
    aliases: sled::Tree,
    due: sled::Tree,
}

/// sled's page cache (its default is 1 GiB). The service caches the keys
/// and CMK versions in use in front of the store, so the store's own cache
/// only serves misses; a small one keeps a large store's memory bounded
/// (measured in BENCHMARKS.md, "A million keys").
const SLED_CACHE_BYTES: u64 = 16 * 1024 * 1024;

impl Handles {
    /// Opens (creating if needed) the sled database in `path`.
    fn open(path: &Path) -> Result<Handles, StoreError> {
        // The caller holds the store directory's own lock, so a sled lock
        // held by someone else belongs to a store of this process that was
        // just dropped: sled's flusher thread lets go of the database a
        // moment after the drop. Wait for it (bounded) rather than fail.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let db = loop {
            match sled::Config::new()
                .path(path)
                .cache_capacity(SLED_CACHE_BYTES)
                .open()
            {
                Ok(db) => break db,
                // sled 0.34.7 reports a held lock as an `Other` error
                // whose message names it (config.rs), not as `WouldBlock`.
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => return Err(sled_error(&format!("opening {}", path.display()), e)),
            }
        };
        let tree = |name: &str| {
            db.open_tree(name)
                .map_err(|e| sled_error(&format!("opening tree {name}"), e))
        };
        Ok(Handles {
            meta: tree("meta")?,
            keys: tree("keys")?,
            versions: tree("versions")?,
            aliases: tree("aliases")?,
            due: tree("due")?,
            db,
        })
    }

    /// Whether any data tree holds a record.
    fn holds_records(&self) -> bool {
        !(self.keys.is_empty()
            && self.versions.is_empty()
            && self.aliases.is_empty()
            && self.due.is_empty())
    }
}

impl Drop for SledStore {
    /// After a failed write, sled 0.34.7 can no longer flush: its `Tree`'s
    /// `Drop` calls `flush`, which then waits forever for the log buffer that
    /// failed (observed on a full file system). So a failed store leaks its
    /// sled handles (and sled's threads) instead of hanging the shutdown,
    /// and its directory lock with them. The process must exit before the
    /// directory can be opened again.
    fn drop(&mut self) {
        if self.failed.load(Ordering::Acquire) {
            let live = self.gate.get_mut().unwrap_or_else(|p| p.into_inner());
            std::mem::forget(Arc::clone(&live.sled));
            if let Ok(lock) = self.lock.try_clone() {
                std::mem::forget(lock);
            }
        }
    }
}

impl fmt::Debug for SledStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SledStore")
            .field("dir", &self.dir)
            .field("failed", &self.failed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn io_error(context: &str, path: &Path, e: io::Error) -> StoreError {
    StoreError::Io(format!("{context} {}: {e}", path.display()))
}

impl SledStore {
    /// Opens (creating if needed) the store in `dir`; see the module docs'
    /// "Layout" for the generations, and what opening cleans up or migrates.
    ///
    /// Fails with [`StoreError::Io`] if the directory cannot be used (not a
    /// directory, read-only, locked by another process, a leftover that
    /// cannot be removed) and with [`StoreError::Corrupt`] if it holds
    /// another schema version or an inconsistent layout (`CURRENT` naming a
    /// missing generation, generations without `CURRENT`).
    pub fn open(dir: &Path) -> Result<SledStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| io_error("creating", dir, e))?;
        let lock = lock_dir(dir)?;
        remove_if_present(&dir.join(CURRENT_TMP))
            .map_err(|e| io_error("removing", &dir.join(CURRENT_TMP), e))?;
        let leftovers = |what: &str, e: io::Error| io_error(what, dir, e);
        if let Some(generation) = read_current(dir)? {
            let path = dir.join(generation_name(generation));
            if !path.join("db").is_file() {
                return Err(StoreError::Corrupt(format!(
                    "{} names {}, which holds no sled database",
                    dir.join(CURRENT).display(),
                    path.display()
                )));
            }
            // Leftovers of an interrupted compaction or migration.
            remove_generations(dir, Some(generation))
                .and_then(|()| remove_legacy_files(dir))
                .and_then(|()| sync_dir(dir))
                .map_err(|e| leftovers("removing stale generations from", e))?;
            let store = SledStore::serving(dir, lock, generation, path)?;
            store.check_schema()?;
            return Ok(store);
        }
        if holds_legacy_layout(dir).map_err(|e| leftovers("reading", e))? {
            // Without CURRENT, any generation is a partial migration.
            remove_generations(dir, None)
                .and_then(|()| sync_dir(dir))
                .map_err(|e| leftovers("removing stale generations from", e))?;
            let store = SledStore::serving(dir, lock, 0, dir.to_path_buf())?;
            store.check_schema()?;
            store.compact()?;
            return Ok(store);
        }
        // A new store. `gen-000001` without CURRENT is an interrupted
        // creation: it holds no record, and is adopted.
        let generations = generation_dirs(dir).map_err(|e| leftovers("reading", e))?;
        let first = generation_name(1);
        if generations.iter().any(|name| *name != first) {
            return Err(StoreError::Corrupt(format!(
                "{} holds generations ({}) but no CURRENT file naming the live one",
                dir.display(),
                generations.join(", ")
            )));
        }
        let store = SledStore::serving(dir, lock, 1, dir.join(&first))?;
        if store.read_gate()?.sled.holds_records() {
            return Err(StoreError::Corrupt(format!(
                "{} holds records but {} has no CURRENT file naming it",
                dir.join(&first).display(),
                dir.display()
            )));
        }
        store.check_schema()?;
        // The new directory entry first, then CURRENT naming it.
        sync_dir(dir)
            .and_then(|()| write_current(dir, 1))
            .map_err(|e| io_error("writing CURRENT in", dir, e))?;
        Ok(store)
    }

    fn serving(
        dir: &Path,
        lock: File,
        generation: u32,
        path: PathBuf,
    ) -> Result<SledStore, StoreError> {
        let sled = Arc::new(Handles::open(&path)?);
        Ok(SledStore {
            dir: dir.to_path_buf(),
            gate: RwLock::new(Live {
                generation,
                path,
                sled,
            }),
            failed: AtomicBool::new(false),
            lock,
            #[cfg(test)]
            fail_compaction_at: std::sync::Mutex::new(None),
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn check_schema(&self) -> Result<(), StoreError> {
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

    fn read_gate(&self) -> Result<RwLockReadGuard<'_, Live>, StoreError> {
        // Nothing panics while holding the gate, and `Live` is replaced
        // whole: a poisoned lock protects no broken data.
        let guard = self.gate.read().unwrap_or_else(|p| p.into_inner());
        self.check_usable()?;
        Ok(guard)
    }

    fn write_gate(&self) -> RwLockWriteGuard<'_, Live> {
        self.gate.write().unwrap_or_else(|p| p.into_inner())
    }

    fn check_usable(&self) -> Result<(), StoreError> {
        if self.failed.load(Ordering::Acquire) {
            Err(StoreError::Io(format!(
                "store {} is unusable after a failed write or sync; reopen it to recover \
                 the durable state",
                self.dir.display()
            )))
        } else {
            Ok(())
        }
    }

    fn mark_failed(&self) {
        self.failed.store(true, Ordering::Release);
    }

    /// Runs `body` as one transaction over keys, versions, aliases and the
    /// due index, then makes it durable; see the module docs.
    fn write<T>(
        &self,
        body: impl Fn(&Tx<'_>) -> ConflictableTransactionResult<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.write_prepared(|_| Ok(()), |tx, ()| body(tx))
    }

    /// Like [`SledStore::write`], with a `prepare` step that reads the
    /// (durable) trees outside the transaction but under the write gate, so
    /// that no other write of this store comes between it and `body`.
    fn write_prepared<P, T>(
        &self,
        prepare: impl FnOnce(&Handles) -> Result<P, StoreError>,
        body: impl Fn(&Tx<'_>, &P) -> ConflictableTransactionResult<T, StoreError>,
    ) -> Result<T, StoreError> {
        let live = self.write_gate();
        self.check_usable()?;
        let sled = &live.sled;
        let prepared = prepare(sled)?;
        let result = (&sled.keys, &sled.versions, &sled.aliases, &sled.due).transaction(
            |(keys, versions, aliases, due)| {
                body(
                    &Tx {
                        keys,
                        versions,
                        aliases,
                        due,
                    },
                    &prepared,
                )
            },
        );
        let out = match result {
            Ok(out) => out,
            Err(TransactionError::Abort(e)) => return Err(e),
            Err(TransactionError::Storage(e)) => {
                self.mark_failed();
                return Err(sled_error("transaction", e));
            }
        };
        if let Err(e) = self.make_durable(&live) {
            self.mark_failed();
            return Err(e);
        }
        Ok(out)
    }

    /// `Db::flush` then `fsync` of sled's files and directories.
    fn make_durable(&self, live: &Live) -> Result<(), StoreError> {
        live.sled
            .db
            .flush()
            .map_err(|e| sled_error("flushing the log", e))?;
        sync_data_dir(&live.path).map_err(|e| io_error("syncing", &live.path, e))
    }

    /// Test hook: makes the compaction step `step` fail once.
    #[cfg(test)]
    fn fail_compaction_at(&self, step: &'static str) {
        *self
            .fail_compaction_at
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(step);
    }

    /// Fails if a test asked `step` to fail.
    fn injected_failure(&self, step: &str) -> io::Result<()> {
        #[cfg(test)]
        {
            let mut at = self
                .fail_compaction_at
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if *at == Some(step) {
                *at = None;
                return Err(io::Error::other(format!("injected failure at {step}")));
            }
        }
        #[cfg(not(test))]
        let _ = step;
        Ok(())
    }

    /// Copies the live generation into the next one, makes that one live
    /// (CURRENT, then memory) and removes the old one. See
    /// [`KeyStore::compact`] and the module docs' "Compaction".
    fn switch_generation(&self, live: &mut Live) -> Result<(), StoreError> {
        let next = live.generation.checked_add(1).ok_or_else(|| {
            StoreError::Io(format!(
                "{}: generation numbers exhausted",
                self.dir.display()
            ))
        })?;
        let path = self.dir.join(generation_name(next));
        // An earlier failed compaction of this process may have left it.
        scrub_remove(&path).map_err(|e| io_error("removing", &path, e))?;

        // 1. The copy, durable. A failure leaves the old generation live.
        let copied = self
            .injected_failure("copy")
            .map_err(|e| io_error("copying into", &path, e))
            .and_then(|()| copy_generation(&live.sled, &path))
            .and_then(|handles| match sync_dir(&self.dir) {
                Ok(()) => Ok(handles),
                Err(e) => Err(io_error("syncing", &self.dir, e)),
            });
        let handles = match copied {
            Ok(handles) => handles,
            Err(e) => {
                // Best effort: the next open removes it otherwise.
                let _ = scrub_remove(&path);
                return Err(e);
            }
        };

        // 2. CURRENT names it. Until the rename, the old generation is live.
        let tmp = self.dir.join(CURRENT_TMP);
        let renamed = self
            .injected_failure("current")
            .and_then(|()| write_synced(&tmp, current_content(next).as_bytes()))
            .and_then(|()| std::fs::rename(&tmp, self.dir.join(CURRENT)));
        if let Err(e) = renamed {
            drop(handles);
            let _ = std::fs::remove_file(&tmp);
            let _ = scrub_remove(&path);
            return Err(io_error("writing CURRENT in", &self.dir, e));
        }
        if let Err(e) = self
            .injected_failure("sync-current")
            .and_then(|()| sync_dir(&self.dir))
        {
            // After a crash CURRENT may name either generation: both are
            // complete and equal, but from now on they would diverge.
            self.mark_failed();
            return Err(io_error(
                "syncing CURRENT in (the store is unusable until reopened)",
                &self.dir,
                e,
            ));
        }

        // 3. Serve the new generation, close and erase the old one.
        let old = std::mem::replace(
            live,
            Live {
                generation: next,
                path,
                sled: Arc::new(handles),
            },
        );
        let (old_generation, old_path) = (old.generation, old.path.clone());
        drop(old);
        let removed = if old_generation == 0 {
            remove_legacy_files(&self.dir)
        } else {
            scrub_remove(&old_path)
        };
        removed
            .and_then(|()| self.injected_failure("remove-old"))
            .and_then(|()| sync_dir(&self.dir))
            .map_err(|e| {
                StoreError::Io(format!(
                    "{}: compaction switched to {} but removing the previous generation \
                     failed (the next open retries): {e}",
                    self.dir.display(),
                    generation_name(next)
                ))
            })
    }
}

/// Copies every tree of `from` into a new sled database in `path` (which
/// must not exist), checks the copy, makes it durable and returns it open.
/// On failure the new database is leaked, not dropped: after a failed write
/// sled's `Drop` may hang (see [`SledStore`]'s `Drop`).
fn copy_generation(from: &Handles, path: &Path) -> Result<Handles, StoreError> {
    std::fs::create_dir(path).map_err(|e| io_error("creating", path, e))?;
    let to = Handles::open(path)?;
    let copied = copy_trees(&from.db, &to.db).and_then(|()| {
        to.db
            .flush()
            .map_err(|e| sled_error("flushing the copy", e))?;
        sync_data_dir(path).map_err(|e| io_error("syncing", path, e))
    });
    match copied {
        Ok(()) => Ok(to),
        Err(e) => {
            std::mem::forget(to);
            Err(e)
        }
    }
}

fn copy_trees(from: &sled::Db, to: &sled::Db) -> Result<(), StoreError> {
    let names = from.tree_names();
    for name in &names {
        let what = String::from_utf8_lossy(name);
        let src = from
            .open_tree(name)
            .map_err(|e| sled_error(&format!("opening tree {what}"), e))?;
        let dst = to
            .open_tree(name)
            .map_err(|e| sled_error(&format!("creating tree {what} in the copy"), e))?;
        for entry in src.iter() {
            let (k, v) = entry.map_err(|e| sled_error(&format!("reading tree {what}"), e))?;
            dst.insert(k, v)
                .map_err(|e| sled_error(&format!("copying tree {what}"), e))?;
        }
    }
    // Check the copy entry by entry before it replaces the original.
    for name in &names {
        let what = String::from_utf8_lossy(name);
        let src = from
            .open_tree(name)
            .map_err(|e| sled_error(&format!("opening tree {what}"), e))?;
        let dst = to
            .open_tree(name)
            .map_err(|e| sled_error(&format!("opening tree {what} in the copy"), e))?;
        let mut a = src.iter();
        let mut b = dst.iter();
        loop {
            match (a.next().transpose(), b.next().transpose()) {
                (Ok(None), Ok(None)) => break,
                (Ok(x), Ok(y)) if x == y => {}
                (Err(e), _) | (_, Err(e)) => {
                    return Err(sled_error(&format!("checking the copy of tree {what}"), e));
                }
                _ => {
                    return Err(StoreError::Corrupt(format!(
                        "the compacted copy of tree {what} differs from the original"
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Takes `DIR/LOCK` (`flock`, released when the file is closed).
fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(LOCK);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| io_error("opening", &path, e))?;
    fs2::FileExt::try_lock_exclusive(&file).map_err(|e| {
        StoreError::Io(format!(
            "locking {} (is the store open in another process?): {e}",
            path.display()
        ))
    })?;
    Ok(file)
}

fn current_content(generation: u32) -> String {
    format!("{}\n", generation_name(generation))
}

/// The generation `DIR/CURRENT` names, `None` if there is no such file.
fn read_current(dir: &Path) -> Result<Option<u32>, StoreError> {
    let path = dir.join(CURRENT);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            return Err(StoreError::Corrupt(format!(
                "{} is not text",
                path.display()
            )));
        }
        Err(e) => return Err(io_error("reading", &path, e)),
    };
    match text.strip_suffix('\n').and_then(parse_generation_name) {
        Some(n) => Ok(Some(n)),
        None => Err(StoreError::Corrupt(format!(
            "{} holds {text:?}, expected a generation name such as \"gen-000001\"",
            path.display()
        ))),
    }
}

/// Replaces `DIR/CURRENT` atomically and durably.
fn write_current(dir: &Path, generation: u32) -> io::Result<()> {
    let tmp = dir.join(CURRENT_TMP);
    write_synced(&tmp, current_content(generation).as_bytes())?;
    std::fs::rename(&tmp, dir.join(CURRENT))?;
    sync_dir(dir)
}

fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The names of the `gen-*` entries of `dir`, sorted.
fn generation_dirs(dir: &Path) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with(GENERATION_PREFIX) {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// Erases every `gen-*` entry but `keep`.
fn remove_generations(dir: &Path, keep: Option<u32>) -> io::Result<()> {
    let keep = keep.map(generation_name);
    for name in generation_dirs(dir)? {
        if keep.as_ref() != Some(&name) {
            scrub_remove(&dir.join(name))?;
        }
    }
    Ok(())
}

/// Whether `dir` holds sled's files directly: the layout before generations.
fn holds_legacy_layout(dir: &Path) -> io::Result<bool> {
    Ok(legacy_entries(dir)?.next().is_some())
}

fn legacy_entries(dir: &Path) -> io::Result<impl Iterator<Item = PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if matches!(name.as_str(), "db" | "conf" | "blobs") || name.starts_with("snap.") {
            out.push(entry.path());
        }
    }
    Ok(out.into_iter())
}

/// Erases sled's files of the layout before generations from `dir`.
fn remove_legacy_files(dir: &Path) -> io::Result<()> {
    for path in legacy_entries(dir)? {
        scrub_remove(&path)?;
    }
    Ok(())
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Overwrites every regular file under `path` with zeros (best effort: a
/// failure is logged), then removes `path`, a file or a directory tree.
/// Symbolic links are removed, not followed.
fn scrub_remove(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if meta.is_dir() {
        zero_fill_tree(path);
        std::fs::remove_dir_all(path)
    } else {
        if meta.is_file() {
            zero_fill(path, meta.len());
        }
        std::fs::remove_file(path)
    }
}

fn zero_fill_tree(dir: &Path) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot list a directory to zero-fill");
            return;
        }
    };
    for entry in entries.flatten() {
        match entry.file_type() {
            Ok(t) if t.is_dir() => zero_fill_tree(&entry.path()),
            Ok(t) if t.is_file() => {
                let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
                zero_fill(&entry.path(), len);
            }
            _ => {}
        }
    }
}

fn zero_fill(path: &Path, len: u64) {
    let result = (|| {
        let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
        let zeros = [0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(zeros.len() as u64);
            file.write_all(zeros.get(..n as usize).unwrap_or(&zeros))?;
            left -= n;
        }
        file.sync_all()
    })();
    if let Err(e) = result {
        tracing::warn!(file = %path.display(), error = %e, "cannot zero-fill a file before removing it");
    }
}

/// `fsync`s every file sled 0.34.7 keeps in `dir`, then the directories.
fn sync_data_dir(dir: &Path) -> io::Result<()> {
    // The log: must exist.
    File::open(dir.join("db"))?.sync_all()?;
    sync_if_present(&dir.join("conf"))?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with("snap.") {
            // sled may delete or rename an old snapshot meanwhile.
            sync_if_present(&entry.path())?;
        }
    }
    let blobs = dir.join("blobs");
    if blobs.is_dir() {
        for entry in std::fs::read_dir(&blobs)? {
            sync_if_present(&entry?.path())?;
        }
        sync_if_present(&blobs)?;
    }
    // Directory entries (new blobs, renamed snapshots) live in the directory.
    File::open(dir)?.sync_all()
}

fn sync_if_present(path: &Path) -> io::Result<()> {
    match File::open(path) {
        Ok(f) => f.sync_all(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn sled_error(context: &str, e: sled::Error) -> StoreError {
    match e {
        sled::Error::Corruption { .. } => StoreError::Corrupt(format!("{context}: {e}")),
        _ => StoreError::Io(format!("{context}: {e}")),
    }
}

fn encode<T: Serialize>(what: &str, record: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(record).map_err(|e| StoreError::Corrupt(format!("encoding {what}: {e}")))
}

fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("decoding {what}: {e}")))
}

fn version_key(id: KeyId, version: u32) -> [u8; VERSION_KEY_LEN] {
    let mut k = [0u8; VERSION_KEY_LEN];
    let (id_part, version_part) = k.split_at_mut(16);
    id_part.copy_from_slice(id.as_bytes());
    version_part.copy_from_slice(&version.to_be_bytes());
    k
}

fn key_id_from_slice(what: &str, bytes: &[u8]) -> Result<KeyId, StoreError> {
    <[u8; 16]>::try_from(bytes)
        .map(KeyId::from_bytes)
        .map_err(|_| StoreError::Corrupt(format!("{what} is {} bytes, expected 16", bytes.len())))
}

/// Decodes a key record and checks that it belongs where it was found.
fn decode_key(id: KeyId, bytes: &[u8]) -> Result<KeyRecord, StoreError> {
    let record: KeyRecord = decode(&format!("key {id}"), bytes)?;
    if record.id != id {
        return Err(StoreError::Corrupt(format!(
            "key record stored under {id} has id {}",
            record.id
        )));
    }
    Ok(record)
}

/// Decodes a version record and checks that it belongs where it was found.
fn decode_version(id: KeyId, version: u32, bytes: &[u8]) -> Result<VersionRecord, StoreError> {
    let record: VersionRecord = decode(&format!("version {version} of key {id}"), bytes)?;
    if record.key_id != id || record.version != version {
        return Err(StoreError::Corrupt(format!(
            "version record stored as {id} v{version} claims {} v{}",
            record.key_id, record.version
        )));
    }
    Ok(record)
}

/// The trees of one transaction.
struct Tx<'a> {
    keys: &'a TransactionalTree,
    versions: &'a TransactionalTree,
    aliases: &'a TransactionalTree,
    due: &'a TransactionalTree,
}

impl Tx<'_> {
    /// The stored record of `current.id` must equal `current`.
    fn check_current(&self, current: &KeyRecord) -> ConflictableTransactionResult<(), StoreError> {
        let Some(bytes) = self.keys.get(current.id.as_bytes())? else {
            return abort(StoreError::NoSuchKey(current.id));
        };
        match decode_key(current.id, &bytes) {
            Ok(stored) if stored == *current => Ok(()),
            Ok(_) => abort(StoreError::Conflict(current.id)),
            Err(e) => abort(e),
        }
    }

    /// Writes `new` over `old` (`None`: a new key) in `keys` and moves its
    /// due-index entry.
    fn put_key(
        &self,
        old: Option<&KeyRecord>,
        new: &KeyRecord,
        new_bytes: &[u8],
    ) -> ConflictableTransactionResult<(), StoreError> {
        if let Some(at) = old.and_then(KeyRecord::next_due) {
            self.due.remove(&due_key(at, new.id)[..])?;
        }
        if let Some(at) = new.next_due() {
            self.due.insert(&due_key(at, new.id)[..], &[][..])?;
        }
        self.keys.insert(new.id.as_bytes(), new_bytes)?;
        Ok(())
    }
}

fn abort<T>(e: StoreError) -> ConflictableTransactionResult<T, StoreError> {
    Err(ConflictableTransactionError::Abort(e))
}

/// The due-index key: the time as an `i64` with its sign bit flipped, big
/// endian (so byte order is numeric order, negatives first), then the id.
fn due_key(at: Timestamp, id: KeyId) -> [u8; DUE_KEY_LEN] {
    let mut k = [0u8; DUE_KEY_LEN];
    let (time_part, id_part) = k.split_at_mut(8);
    time_part.copy_from_slice(&((at.as_millis() as u64) ^ (1 << 63)).to_be_bytes());
    id_part.copy_from_slice(id.as_bytes());
    k
}

fn parse_due_key(bytes: &[u8]) -> Result<(Timestamp, KeyId), StoreError> {
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

fn parse_version_key(bytes: &[u8]) -> Result<(KeyId, u32), StoreError> {
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

fn refuse<T>(message: String) -> Result<T, StoreError> {
    Err(StoreError::Corrupt(format!("refusing to write: {message}")))
}

const SECRET_PREFIX: &[u8] = b"secret/";

fn secret_key(name: &str) -> Vec<u8> {
    let mut key = SECRET_PREFIX.to_vec();
    key.extend_from_slice(name.as_bytes());
    key
}

impl KeyStore for SledStore {
    fn get_secret(&self, name: &str) -> Result<Option<WrappedSecret>, StoreError> {
        let live = self.read_gate()?;
        let bytes = live
            .sled
            .meta
            .get(secret_key(name))
            .map_err(|e| sled_error("reading a service secret", e))?;
        bytes.map(|b| decode("service secret", &b)).transpose()
    }

    fn put_secret(&self, name: &str, secret: &WrappedSecret) -> Result<(), StoreError> {
        if name.is_empty() || secret.wrapped.is_empty() {
            return refuse(format!("an empty service secret {name:?}"));
        }
        let value = encode("service secret", secret)?;
        let live = self.write_gate();
        self.check_usable()?;
        if let Err(e) = live.sled.meta.insert(secret_key(name), value) {
            self.mark_failed();
            return Err(sled_error("writing a service secret", e));
        }
        if let Err(e) = self.make_durable(&live) {
            self.mark_failed();
            return Err(e);
        }
        Ok(())
    }

    fn list_secrets(&self) -> Result<Vec<(String, WrappedSecret)>, StoreError> {
        let live = self.read_gate()?;
        let mut out = Vec::new();
        for entry in live.sled.meta.scan_prefix(SECRET_PREFIX) {
            let (k, v) = entry.map_err(|e| sled_error("listing service secrets", e))?;
            let name = std::str::from_utf8(k.get(SECRET_PREFIX.len()..).unwrap_or_default())
                .map_err(|_| StoreError::Corrupt("a service secret's name is not UTF-8".into()))?;
            out.push((name.to_string(), decode("service secret", &v)?));
        }
        Ok(out)
    }

    fn create_keys(&self, keys: &[(&KeyRecord, &VersionRecord)]) -> Result<(), StoreError> {
        let mut encoded = Vec::with_capacity(keys.len());
        for &(key, first_version) in keys {
            if first_version.key_id != key.id || first_version.version != key.primary_version {
                return refuse(format!(
                    "key {} (primary version {}) with version {} of key {}",
                    key.id, key.primary_version, first_version.version, first_version.key_id
                ));
            }
            if key.state == KeyState::Destroyed || first_version.destroyed_at.is_some() {
                return refuse(format!("key {} created destroyed", key.id));
            }
            encoded.push((
                key,
                encode("key record", key)?,
                version_key(key.id, first_version.version),
                encode("version record", first_version)?,
            ));
        }
        // Each check sees the batch's earlier inserts (a transaction reads
        // its own writes), so two keys of one batch cannot share an id or
        // an alias either.
        self.write(|tx| {
            for (key, key_bytes, vkey, version_bytes) in &encoded {
                if tx.keys.get(key.id.as_bytes())?.is_some() {
                    return abort(StoreError::KeyExists(key.id));
                }
                if let Some(alias) = &key.alias
                    && tx.aliases.get(alias.as_bytes())?.is_some()
                {
                    return abort(StoreError::AliasTaken(alias.clone()));
                }
                if tx.versions.get(vkey)?.is_some() {
                    return abort(StoreError::Corrupt(format!(
                        "version {} of key {} exists without its key",
                        key.primary_version, key.id
                    )));
                }
                tx.put_key(None, key, key_bytes)?;
                tx.versions.insert(vkey, version_bytes.as_slice())?;
                if let Some(alias) = &key.alias {
                    tx.aliases.insert(alias.as_bytes(), key.id.as_bytes())?;
                }
            }
            Ok(())
        })
    }

    fn get_key(&self, id: KeyId) -> Result<Option<KeyRecord>, StoreError> {
        let live = self.read_gate()?;
        let bytes = live
            .sled
            .keys
            .get(id.as_bytes())
            .map_err(|e| sled_error("reading a key", e))?;
        bytes.map(|b| decode_key(id, &b)).transpose()
    }

    fn key_id_for_alias(&self, alias: &str) -> Result<Option<KeyId>, StoreError> {
        let live = self.read_gate()?;
        let bytes = live
            .sled
            .aliases
            .get(alias.as_bytes())
            .map_err(|e| sled_error("reading an alias", e))?;
        bytes
            .map(|b| key_id_from_slice(&format!("the key id of alias {alias:?}"), &b))
            .transpose()
    }

    fn list_keys(
        &self,
        filter: &KeyFilter,
        start_after: Option<KeyId>,
        limit: usize,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        let live = self.read_gate()?;
        let lower = match start_after {
            Some(id) => Bound::Excluded(id.as_bytes().to_vec()),
            None => Bound::Unbounded,
        };
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        for entry in live
            .sled
            .keys
            .range::<Vec<u8>, _>((lower, Bound::Unbounded))
        {
            let (k, v) = entry.map_err(|e| sled_error("listing keys", e))?;
            let id = key_id_from_slice("a key id in the keys tree", &k)?;
            let record = decode_key(id, &v)?;
            if filter.matches(&record) {
                out.push(record);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    fn due_keys(&self, now: Timestamp, limit: usize) -> Result<Vec<KeyRecord>, StoreError> {
        let live = self.read_gate()?;
        let upper = due_key(now, KeyId::from_bytes([0xff; 16]));
        let mut out = Vec::new();
        for entry in live.sled.due.range(..=&upper[..]).take(limit) {
            let (k, _) = entry.map_err(|e| sled_error("reading the due index", e))?;
            let (at, id) = parse_due_key(&k)?;
            let bytes = live
                .sled
                .keys
                .get(id.as_bytes())
                .map_err(|e| sled_error("reading a due key", e))?
                .ok_or_else(|| {
                    StoreError::Corrupt(format!("the due index names key {id}, which is missing"))
                })?;
            let record = decode_key(id, &bytes)?;
            if record.next_due() != Some(at) {
                return Err(StoreError::Corrupt(format!(
                    "the due index says key {id} is due at {}, the key says {:?}",
                    at.as_millis(),
                    record.next_due().map(Timestamp::as_millis)
                )));
            }
            out.push(record);
        }
        Ok(out)
    }

    fn add_version(
        &self,
        current: &KeyRecord,
        updated: &KeyRecord,
        version: &VersionRecord,
    ) -> Result<(), StoreError> {
        if version.key_id != current.id {
            return refuse(format!(
                "a version of key {} added to key {}",
                version.key_id, current.id
            ));
        }
        if updated.id != current.id
            || updated.alias != current.alias
            || updated.primary_version != version.version
        {
            return refuse(format!(
                "rotation of key {} to an updated record with another id, alias or primary \
                 version than the new version {}",
                current.id, version.version
            ));
        }
        if current.state == KeyState::Destroyed
            || updated.state == KeyState::Destroyed
            || version.destroyed_at.is_some()
        {
            return refuse(format!(
                "rotation of key {} from, to or with destroyed records",
                current.id
            ));
        }
        if current.primary_version.checked_add(1) != Some(version.version) {
            return Err(StoreError::Conflict(current.id));
        }
        let key_bytes = encode("key record", updated)?;
        let version_bytes = encode("version record", version)?;
        let vkey = version_key(current.id, version.version);
        self.write(|tx| {
            tx.check_current(current)?;
            if tx.versions.get(vkey)?.is_some() {
                return abort(StoreError::Conflict(current.id));
            }
            tx.versions.insert(&vkey, version_bytes.as_slice())?;
            tx.put_key(Some(current), updated, &key_bytes)
        })
    }

    fn get_version(&self, id: KeyId, version: u32) -> Result<Option<VersionRecord>, StoreError> {
        let live = self.read_gate()?;
        let bytes = live
            .sled
            .versions
            .get(version_key(id, version))
            .map_err(|e| sled_error("reading a version", e))?;
        bytes.map(|b| decode_version(id, version, &b)).transpose()
    }

    fn list_versions(&self, id: KeyId) -> Result<Vec<VersionRecord>, StoreError> {
        let live = self.read_gate()?;
        live.sled.versions_of(id)
    }

    fn compare_and_swap_key(&self, current: &KeyRecord, new: &KeyRecord) -> Result<(), StoreError> {
        if new.id != current.id
            || new.alias != current.alias
            || new.primary_version != current.primary_version
        {
            return refuse(format!(
                "a change of the id, alias or primary version of key {} by compare-and-swap",
                current.id
            ));
        }
        if current.state == KeyState::Destroyed || new.state == KeyState::Destroyed {
            return refuse(format!(
                "a compare-and-swap from or to DESTROYED of key {} (destruction goes through \
                 destroy_key and is final)",
                current.id
            ));
        }
        let key_bytes = encode("key record", new)?;
        self.write(|tx| {
            tx.check_current(current)?;
            tx.put_key(Some(current), new, &key_bytes)
        })
    }

    fn destroy_key(&self, current: &KeyRecord, tombstone: &KeyRecord) -> Result<(), StoreError> {
        if tombstone.id != current.id
            || tombstone.alias != current.alias
            || tombstone.primary_version != current.primary_version
        {
            return refuse(format!(
                "a tombstone with another id, alias or primary version for key {}",
                current.id
            ));
        }
        if tombstone.state != KeyState::Destroyed || tombstone.destroyed_at.is_none() {
            return refuse(format!(
                "a tombstone of key {} that is not DESTROYED with a destruction time",
                current.id
            ));
        }
        if current.state == KeyState::Destroyed {
            return refuse(format!("destroying key {} twice", current.id));
        }
        let key_bytes = encode("key record", tombstone)?;
        let id = current.id;
        self.write_prepared(
            // Versions are only ever added, as the new primary, while the
            // stored key changes: if the transaction finds the stored key
            // equal to `current`, this list is still complete.
            |sled| {
                sled.versions_of(id)?
                    .into_iter()
                    .map(|mut v| {
                        v.wrapped_material = Vec::new();
                        v.destroyed_at = tombstone.destroyed_at;
                        Ok((version_key(id, v.version), encode("version record", &v)?))
                    })
                    .collect::<Result<Vec<_>, StoreError>>()
            },
            |tx, erased| {
                tx.check_current(current)?;
                for (vkey, bytes) in erased {
                    tx.versions.insert(&vkey[..], bytes.as_slice())?;
                }
                tx.put_key(Some(current), tombstone, &key_bytes)
            },
        )
    }

    fn rewrap_version(
        &self,
        current: &VersionRecord,
        new: &VersionRecord,
    ) -> Result<(), StoreError> {
        let mut unchanged = new.clone();
        unchanged.hsm_root_key_id = current.hsm_root_key_id;
        unchanged.wrapped_material = current.wrapped_material.clone();
        if unchanged != *current || new.wrapped_material.is_empty() {
            return refuse(format!(
                "a re-wrap of version {} of key {} that changes more than its wrapped material \
                 and root key id, or erases the material",
                current.version, current.key_id
            ));
        }
        if current.destroyed_at.is_some() {
            return Err(StoreError::Conflict(current.key_id));
        }
        let (id, number) = (current.key_id, current.version);
        let vkey = version_key(id, number);
        let new_bytes = encode("version record", new)?;
        self.write(|tx| {
            let Some(bytes) = tx.versions.get(vkey)? else {
                return abort(StoreError::NoSuchVersion(id, number));
            };
            match decode_version(id, number, &bytes) {
                Ok(stored) if stored == *current => {}
                Ok(_) => return abort(StoreError::Conflict(id)),
                Err(e) => return abort(e),
            }
            tx.versions.insert(&vkey, new_bytes.as_slice())?;
            Ok(())
        })
    }

    fn versions_not_under_root(
        &self,
        root_key_id: u32,
        start_after: Option<(KeyId, u32)>,
        limit: usize,
    ) -> Result<Vec<VersionRecord>, StoreError> {
        let live = self.read_gate()?;
        let lower = match start_after {
            Some((id, n)) => Bound::Excluded(version_key(id, n).to_vec()),
            None => Bound::Unbounded,
        };
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        for entry in live
            .sled
            .versions
            .range::<Vec<u8>, _>((lower, Bound::Unbounded))
        {
            let (k, v) = entry.map_err(|e| sled_error("listing versions", e))?;
            let (id, number) = parse_version_key(&k)?;
            let record = decode_version(id, number, &v)?;
            // Versions held by the HSM itself are wrapped by no root key.
            if record.destroyed_at.is_none()
                && record.hsm_object.is_none()
                && record.hsm_root_key_id != root_key_id
            {
                out.push(record);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    fn count_versions(&self, root_key_id: u32) -> Result<VersionCounts, StoreError> {
        let live = self.read_gate()?;
        let mut counts = VersionCounts::default();
        for entry in live.sled.versions.iter() {
            let (k, v) = entry.map_err(|e| sled_error("counting versions", e))?;
            let (id, number) = parse_version_key(&k)?;
            let record = decode_version(id, number, &v)?;
            if record.destroyed_at.is_some() {
                counts.destroyed += 1;
            } else {
                counts.live += 1;
                if record.hsm_object.is_none() && record.hsm_root_key_id != root_key_id {
                    counts.not_under_root += 1;
                }
            }
        }
        Ok(counts)
    }

    fn compact(&self) -> Result<(), StoreError> {
        let mut live = self.write_gate();
        self.check_usable()?;
        self.switch_generation(&mut live)
    }
}

impl Handles {
    /// Every version of `id`, read outside any transaction.
    fn versions_of(&self, id: KeyId) -> Result<Vec<VersionRecord>, StoreError> {
        let mut out = Vec::new();
        for entry in self.versions.scan_prefix(id.as_bytes()) {
            let (k, v) = entry.map_err(|e| sled_error("listing versions", e))?;
            let (_, number) = parse_version_key(&k)?;
            out.push(decode_version(id, number, &v)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use tempfile::TempDir;

    use super::*;
    use crate::model::{KeyState, ProtectionLevel, Timestamp};

    /// Ids whose byte order differs from their creation order.
    fn id(n: u8) -> KeyId {
        let mut b = [0u8; 16];
        b[0] = n.wrapping_mul(97);
        b[15] = n;
        KeyId::from_bytes(b)
    }

    fn key(id: KeyId, alias: Option<&str>) -> KeyRecord {
        KeyRecord {
            id,
            alias: alias.map(str::to_owned),
            description: "test key".to_owned(),
            state: KeyState::Enabled,
            protection_level: ProtectionLevel::Software,
            created_at: Timestamp(1_700_000_000_000),
            created_by: "tester".to_owned(),
            primary_version: 1,
            min_decryption_version: 1,
            labels: BTreeMap::from([("team".to_owned(), "infra".to_owned())]),
            rotation_period_secs: None,
            next_rotation_at: None,
            deletion_at: None,
            destroyed_at: None,
            policy: crate::model::KeyPolicy::default(),
        }
    }

    fn version(id: KeyId, n: u32) -> VersionRecord {
        VersionRecord {
            key_id: id,
            version: n,
            created_at: Timestamp(1_700_000_000_000 + i64::from(n)),
            hsm_root_key_id: 7,
            wrapped_material: vec![n as u8; 60],
            destroyed_at: None,
            hsm_object: None,
        }
    }

    /// Rotation as the service does it: `current` with the new primary.
    fn rotate(
        store: &SledStore,
        current: &KeyRecord,
        v: &VersionRecord,
    ) -> Result<KeyRecord, StoreError> {
        let mut updated = current.clone();
        updated.primary_version = v.version;
        store.add_version(current, &updated, v)?;
        Ok(updated)
    }

    fn new_store() -> (TempDir, SledStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        (dir, store)
    }

    /// The sled directory of the live generation (`dir` itself if there is
    /// no CURRENT: the layout before generations).
    fn live_path(dir: &Path) -> PathBuf {
        match read_current(dir).unwrap() {
            Some(n) => dir.join(generation_name(n)),
            None => dir.to_path_buf(),
        }
    }

    /// Writes raw bytes into one of the store's trees, behind its back.
    fn poke(dir: &Path, tree: &str, k: &[u8], v: &[u8]) {
        let db = sled::open(live_path(dir)).unwrap();
        db.open_tree(tree).unwrap().insert(k, v).unwrap();
        db.flush().unwrap();
    }

    #[test]
    fn create_get_and_alias() {
        let (_dir, store) = new_store();
        let k = key(id(1), Some("alias/payments"));
        store.create_key(&k, &version(k.id, 1)).unwrap();
        assert_eq!(store.get_key(k.id).unwrap(), Some(k.clone()));
        assert_eq!(
            store.key_id_for_alias("alias/payments").unwrap(),
            Some(k.id)
        );
        assert_eq!(store.key_id_for_alias("alias/other").unwrap(), None);
        assert_eq!(store.get_key(id(2)).unwrap(), None);
        assert_eq!(store.get_version(k.id, 1).unwrap(), Some(version(k.id, 1)));
        assert_eq!(store.get_version(k.id, 2).unwrap(), None);
        assert_eq!(store.list_versions(k.id).unwrap(), vec![version(k.id, 1)]);
        assert!(format!("{store:?}").contains("SledStore"));
    }

    #[test]
    fn duplicates_are_refused_and_write_nothing() {
        let (_dir, store) = new_store();
        let k = key(id(1), Some("a"));
        store.create_key(&k, &version(k.id, 1)).unwrap();

        // Same id, new alias, different version material.
        let mut dup = key(id(1), Some("b"));
        dup.description = "impostor".to_owned();
        let mut v = version(k.id, 1);
        v.wrapped_material = vec![0xee; 60];
        let err = store.create_key(&dup, &v).unwrap_err();
        assert!(
            matches!(err, StoreError::KeyExists(i) if i == k.id),
            "{err:?}"
        );
        assert_eq!(store.key_id_for_alias("b").unwrap(), None);
        assert_eq!(store.get_key(k.id).unwrap(), Some(k.clone()));
        assert_eq!(store.list_versions(k.id).unwrap(), vec![version(k.id, 1)]);

        // Same alias, new id.
        let other = key(id(2), Some("a"));
        let err = store.create_key(&other, &version(other.id, 1)).unwrap_err();
        assert!(
            matches!(&err, StoreError::AliasTaken(a) if a == "a"),
            "{err:?}"
        );
        assert_eq!(store.get_key(other.id).unwrap(), None);
        assert_eq!(store.list_versions(other.id).unwrap(), vec![]);
        assert_eq!(store.key_id_for_alias("a").unwrap(), Some(k.id));
        assert_eq!(
            store.list_keys(&KeyFilter::default(), None, 10).unwrap(),
            vec![k]
        );
    }

    #[test]
    fn a_batch_of_keys_is_created_whole_or_not_at_all() {
        let (dir, store) = new_store();
        let taken = key(id(1), Some("taken"));
        store.create_key(&taken, &version(taken.id, 1)).unwrap();
        let all = |store: &SledStore| store.list_keys(&KeyFilter::default(), None, 100).unwrap();

        // A clash anywhere in the batch — with a stored alias, a stored id,
        // or between two keys of the batch — writes none of it.
        let (k2, k3) = (key(id(2), Some("b")), key(id(3), Some("c")));
        type Expected = fn(&StoreError) -> bool;
        let clashes: [(KeyRecord, Expected); 4] = [
            (
                key(id(4), Some("taken")),
                |e| matches!(e, StoreError::AliasTaken(a) if a == "taken"),
            ),
            (key(id(1), None), |e| matches!(e, StoreError::KeyExists(_))),
            (
                key(id(4), Some("b")),
                |e| matches!(e, StoreError::AliasTaken(a) if a == "b"),
            ),
            (
                key(id(2), None),
                |e| matches!(e, StoreError::KeyExists(i) if *i == id(2)),
            ),
        ];
        for (bad, expected) in clashes {
            let (v2, v3, vb) = (version(k2.id, 1), version(k3.id, 1), version(bad.id, 1));
            let err = store
                .create_keys(&[(&k2, &v2), (&k3, &v3), (&bad, &vb)])
                .unwrap_err();
            assert!(expected(&err), "{bad:?}: {err:?}");
            assert_eq!(all(&store), vec![taken.clone()]);
            assert_eq!(store.key_id_for_alias("b").unwrap(), None);
            assert_eq!(store.list_versions(k3.id).unwrap(), vec![]);
        }
        // An inconsistent record anywhere refuses the batch before writing.
        let (v2, wrong) = (version(k2.id, 1), version(k2.id, 2));
        let err = store.create_keys(&[(&k2, &v2), (&k3, &wrong)]).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
        assert_eq!(all(&store), vec![taken.clone()]);

        // A good batch: every key, version and alias, durable across reopen.
        let batch: Vec<(KeyRecord, VersionRecord)> = (2..=60)
            .map(|n| {
                let alias = format!("bulk/{n}");
                let k = key(id(n), (n % 2 == 0).then_some(alias.as_str()));
                let v = version(k.id, 1);
                (k, v)
            })
            .collect();
        let pairs: Vec<_> = batch.iter().map(|(k, v)| (k, v)).collect();
        store.create_keys(&pairs).unwrap();
        drop(store);
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(all(&store).len(), 60);
        for (k, v) in &batch {
            assert_eq!(store.get_key(k.id).unwrap().as_ref(), Some(k));
            assert_eq!(store.list_versions(k.id).unwrap(), vec![v.clone()]);
            if let Some(alias) = &k.alias {
                assert_eq!(store.key_id_for_alias(alias).unwrap(), Some(k.id));
            }
        }
    }

    /// sled lets go of a dropped database's lock a moment later, from its
    /// flusher thread; opening meanwhile waits instead of failing.
    #[test]
    fn open_waits_for_a_lock_that_is_about_to_be_released() {
        let dir = tempfile::tempdir().unwrap();
        let held = sled::open(dir.path()).unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(held);
        });
        let opened = Handles::open(dir.path());
        release.join().unwrap();
        assert!(opened.is_ok(), "{:?}", opened.err());
    }

    #[test]
    fn inconsistent_create_is_refused() {
        let (_dir, store) = new_store();
        let k = key(id(1), Some("a"));
        let err = store.create_key(&k, &version(k.id, 2)).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
        let err = store.create_key(&k, &version(id(2), 1)).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
        assert_eq!(
            store.list_keys(&KeyFilter::default(), None, 10).unwrap(),
            vec![]
        );
        assert_eq!(store.key_id_for_alias("a").unwrap(), None);
        assert_eq!(store.list_versions(id(2)).unwrap(), vec![]);
    }

    #[test]
    fn add_version_and_its_conflicts() {
        let (_dir, store) = new_store();
        let k = key(id(1), None);
        store.create_key(&k, &version(k.id, 1)).unwrap();

        let k2 = rotate(&store, &k, &version(k.id, 2)).unwrap();
        assert_eq!(k2.primary_version, 2);
        assert_eq!(store.get_key(k.id).unwrap(), Some(k2.clone()));
        assert_eq!(
            store.list_versions(k.id).unwrap(),
            vec![version(k.id, 1), version(k.id, 2)]
        );

        // Stale `current`.
        let err = rotate(&store, &k, &version(k.id, 2)).unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
        // Not the next number.
        for n in [1, 2, 4, u32::MAX] {
            let err = rotate(&store, &k2, &version(k.id, n)).unwrap_err();
            assert!(matches!(err, StoreError::Conflict(_)), "{n}: {err:?}");
        }
        // Another key's version.
        let err = rotate(&store, &k2, &version(id(9), 3)).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
        // A key that does not exist.
        let ghost = key(id(9), None);
        let err = rotate(&store, &ghost, &version(ghost.id, 2)).unwrap_err();
        assert!(matches!(err, StoreError::NoSuchKey(_)), "{err:?}");

        assert_eq!(store.get_key(k.id).unwrap(), Some(k2));
        assert_eq!(store.list_versions(k.id).unwrap().len(), 2);
        assert_eq!(store.list_versions(ghost.id).unwrap(), vec![]);
    }

    #[test]
    fn compare_and_swap() {
        let (_dir, store) = new_store();
        let k = key(id(1), Some("a"));
        store.create_key(&k, &version(k.id, 1)).unwrap();

        let mut disabled = k.clone();
        disabled.state = KeyState::Disabled;
        store.compare_and_swap_key(&k, &disabled).unwrap();
        assert_eq!(store.get_key(k.id).unwrap(), Some(disabled.clone()));

        // Stale `current`.
        let mut pending = k.clone();
        pending.state = KeyState::PendingDeletion;
        let err = store.compare_and_swap_key(&k, &pending).unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");

        // Changing the id, alias or primary version is refused.
        let mut renamed = disabled.clone();
        renamed.alias = Some("b".to_owned());
        let mut moved = disabled.clone();
        moved.id = id(2);
        let mut rotated = disabled.clone();
        rotated.primary_version = 2;
        for bad in [renamed, moved, rotated] {
            let err = store.compare_and_swap_key(&disabled, &bad).unwrap_err();
            assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
        }
        let ghost = key(id(3), None);
        let err = store.compare_and_swap_key(&ghost, &ghost).unwrap_err();
        assert!(matches!(err, StoreError::NoSuchKey(_)), "{err:?}");

        assert_eq!(store.get_key(k.id).unwrap(), Some(disabled));
        assert_eq!(store.key_id_for_alias("b").unwrap(), None);
        assert_eq!(store.get_key(id(2)).unwrap(), None);
    }

    #[test]
    fn list_keys_pages_every_key_once_in_order() {
        let (_dir, store) = new_store();
        let mut ids = Vec::new();
        for n in 0..250u32 {
            let k = key(KeyId::new_random(), Some(&format!("k{n}")));
            store.create_key(&k, &version(k.id, 1)).unwrap();
            ids.push(k.id);
        }
        ids.sort_by_key(|i| *i.as_bytes());

        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let page = store.list_keys(&KeyFilter::default(), cursor, 100).unwrap();
            assert!(page.len() <= 100);
            let Some(last) = page.last() else { break };
            cursor = Some(last.id);
            seen.extend(page.iter().map(|k| k.id));
        }
        assert_eq!(seen, ids);
        assert_eq!(
            store.list_keys(&KeyFilter::default(), None, 0).unwrap(),
            vec![]
        );
        assert_eq!(
            store
                .list_keys(&KeyFilter::default(), Some(ids[249]), 100)
                .unwrap(),
            vec![]
        );
        let tail = store
            .list_keys(&KeyFilter::default(), Some(ids[247]), 100)
            .unwrap();
        assert_eq!(tail.iter().map(|k| k.id).collect::<Vec<_>>(), ids[248..]);
    }

    #[test]
    fn reopen_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let (k2, disabled) = {
            let store = SledStore::open(dir.path()).unwrap();
            let k = key(id(1), Some("a"));
            store.create_key(&k, &version(k.id, 1)).unwrap();
            let k2 = rotate(&store, &k, &version(k.id, 2)).unwrap();
            let mut disabled = key(id(2), None);
            store
                .create_key(&disabled, &version(disabled.id, 1))
                .unwrap();
            let before = disabled.clone();
            disabled.state = KeyState::Disabled;
            store.compare_and_swap_key(&before, &disabled).unwrap();
            (k2, disabled)
        };
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(store.get_key(k2.id).unwrap(), Some(k2.clone()));
        assert_eq!(store.get_key(disabled.id).unwrap(), Some(disabled.clone()));
        assert_eq!(store.key_id_for_alias("a").unwrap(), Some(k2.id));
        assert_eq!(
            store.list_versions(k2.id).unwrap(),
            vec![version(k2.id, 1), version(k2.id, 2)]
        );
        let mut all = vec![k2, disabled];
        all.sort_by_key(|k| *k.id.as_bytes());
        assert_eq!(
            store.list_keys(&KeyFilter::default(), None, 10).unwrap(),
            all
        );
    }

    #[test]
    fn corrupt_records_are_reported_not_panicked_on() {
        let dir = tempfile::tempdir().unwrap();
        let k = key(id(1), Some("a"));
        {
            let store = SledStore::open(dir.path()).unwrap();
            store.create_key(&k, &version(k.id, 1)).unwrap();
            let other = key(id(2), None);
            store.create_key(&other, &version(other.id, 1)).unwrap();
        }
        poke(dir.path(), "keys", k.id.as_bytes(), b"\x00garbage{");
        poke(dir.path(), "aliases", b"a", b"short");
        poke(dir.path(), "versions", &version_key(k.id, 1), b"[1,2");
        // A valid record in the wrong slot.
        let moved = serde_json::to_vec(&key(id(3), None)).unwrap();
        poke(dir.path(), "keys", id(2).as_bytes(), &moved);
        let wrong = serde_json::to_vec(&version(k.id, 5)).unwrap();
        poke(dir.path(), "versions", &version_key(id(2), 1), &wrong);

        let store = SledStore::open(dir.path()).unwrap();
        let is_corrupt = |r: Result<(), StoreError>| matches!(r, Err(StoreError::Corrupt(_)));
        assert!(is_corrupt(store.get_key(k.id).map(drop)));
        assert!(is_corrupt(store.get_key(id(2)).map(drop)));
        assert!(is_corrupt(
            store.list_keys(&KeyFilter::default(), None, 10).map(drop)
        ));
        assert!(is_corrupt(store.key_id_for_alias("a").map(drop)));
        assert!(is_corrupt(store.get_version(k.id, 1).map(drop)));
        assert!(is_corrupt(store.list_versions(k.id).map(drop)));
        assert!(is_corrupt(store.get_version(id(2), 1).map(drop)));
        // Writes that must read the corrupt record refuse too.
        assert!(is_corrupt(rotate(&store, &k, &version(k.id, 2)).map(drop)));
        let mut changed = k.clone();
        changed.state = KeyState::Disabled;
        assert!(is_corrupt(store.compare_and_swap_key(&k, &changed)));
    }

    #[test]
    fn unknown_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(SledStore::open(dir.path()).unwrap());
        poke(dir.path(), "meta", SCHEMA_KEY, &3u32.to_be_bytes());
        let err = SledStore::open(dir.path()).unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt(m) if m.contains("schema version 3")),
            "{err:?}"
        );
    }

    #[test]
    fn data_without_schema_marker_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        poke(dir.path(), "keys", id(1).as_bytes(), b"{}");
        let err = SledStore::open(dir.path()).unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt(m) if m.contains("no schema")),
            "{err:?}"
        );
    }

    #[test]
    fn unusable_directory_is_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let err = SledStore::open(&file).unwrap_err();
        assert!(matches!(err, StoreError::Io(_)), "{err:?}");
        let err = SledStore::open(&file.join("below")).unwrap_err();
        assert!(matches!(err, StoreError::Io(_)), "{err:?}");
    }

    #[test]
    fn second_open_of_a_live_store_is_an_io_error() {
        let (dir, _store) = new_store();
        let err = SledStore::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Io(_)), "{err:?}");
    }

    #[test]
    fn a_failed_store_refuses_everything() {
        let (_dir, store) = new_store();
        let k = key(id(1), None);
        store.create_key(&k, &version(k.id, 1)).unwrap();
        store.mark_failed();
        let is_io = |r: Result<(), StoreError>| matches!(r, Err(StoreError::Io(_)));
        assert!(is_io(store.get_key(k.id).map(drop)));
        assert!(is_io(
            store.list_keys(&KeyFilter::default(), None, 1).map(drop)
        ));
        assert!(is_io(store.key_id_for_alias("a").map(drop)));
        assert!(is_io(store.list_versions(k.id).map(drop)));
        assert!(is_io(rotate(&store, &k, &version(k.id, 2)).map(drop)));
        let other = key(id(2), None);
        assert!(is_io(store.create_key(&other, &version(other.id, 1))));
    }

    #[test]
    fn durability_sync_covers_sled_files() {
        let (dir, store) = new_store();
        // A value bigger than a quarter segment goes to blobs/.
        let k = key(id(1), None);
        let mut v = version(k.id, 1);
        v.wrapped_material = vec![0x5a; 200 * 1024];
        store.create_key(&k, &v).unwrap();
        let path = live_path(dir.path());
        assert!(path.join("db").is_file());
        assert!(path.join("conf").is_file());
        let blobs = std::fs::read_dir(path.join("blobs")).unwrap().count();
        assert!(blobs > 0, "expected the big value in blobs/");
        sync_data_dir(&path).unwrap();
        assert_eq!(store.get_version(k.id, 1).unwrap(), Some(v));
    }

    #[test]
    fn concurrent_rotations_each_land_once() {
        let (_dir, store) = new_store();
        let k = key(id(1), None);
        store.create_key(&k, &version(k.id, 1)).unwrap();
        let store = std::sync::Arc::new(store);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let mut won = 0;
                    while won < 5 {
                        let current = store.get_key(id(1)).unwrap().unwrap();
                        let next = version(current.id, current.primary_version + 1);
                        match rotate(&store, &current, &next) {
                            Ok(_) => won += 1,
                            Err(StoreError::Conflict(_)) => {}
                            Err(e) => panic!("{e:?}"),
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let versions = store.list_versions(id(1)).unwrap();
        assert_eq!(
            versions.iter().map(|v| v.version).collect::<Vec<_>>(),
            (1..=21).collect::<Vec<_>>()
        );
        assert_eq!(store.get_key(id(1)).unwrap().unwrap().primary_version, 21);
    }

    /// Needs a small file system: `mount -t tmpfs -o size=1m tmpfs DIR`, then
    /// `COFFRE_FULL_DISK_DIR=DIR cargo test -p coffre --lib full_disk -- --ignored`.
    #[test]
    #[ignore = "needs COFFRE_FULL_DISK_DIR on a small file system"]
    fn full_disk_is_an_error_not_a_panic() {
        let Some(base) = std::env::var_os("COFFRE_FULL_DISK_DIR") else {
            return;
        };
        let dir = tempfile::tempdir_in(base).unwrap();
        let store = match SledStore::open(dir.path()) {
            Ok(store) => store,
            Err(e) => {
                assert!(matches!(e, StoreError::Io(_)), "{e:?}");
                return;
            }
        };
        for n in 0..=255u8 {
            let k = key(KeyId::new_random(), None);
            let mut v = version(k.id, 1);
            v.wrapped_material = vec![n; 16 * 1024];
            if let Err(e) = store.create_key(&k, &v) {
                assert!(matches!(e, StoreError::Io(_)), "{e:?}");
                assert!(n > 0, "the disk was full before the first write");
                // Poisoned: nothing more is accepted.
                assert!(matches!(store.get_key(k.id), Err(StoreError::Io(_))));
                return;
            }
        }
        panic!("the file system never filled up");
    }

    /// Needs a directory made by this test on a file system then remounted
    /// read-only: run once with `COFFRE_READ_ONLY_DIR=DIR` on a writable
    /// file system (it creates `DIR/store`), `mount -o remount,ro`, run again.
    #[test]
    #[ignore = "needs COFFRE_READ_ONLY_DIR on a file system remounted read-only"]
    fn read_only_disk_is_an_error_not_a_panic() {
        let Some(base) = std::env::var_os("COFFRE_READ_ONLY_DIR") else {
            return;
        };
        let dir = Path::new(&base).join("store");
        if !dir.exists() {
            let store = SledStore::open(&dir).unwrap();
            let k = key(id(1), None);
            store.create_key(&k, &version(k.id, 1)).unwrap();
            return;
        }
        let err = SledStore::open(&dir).unwrap_err();
        assert!(matches!(err, StoreError::Io(_)), "{err:?}");
    }

    /// Everything a store holds about the first few test ids, for "nothing
    /// changed" checks.
    fn snapshot(store: &SledStore) -> String {
        let mut out = format!(
            "{:?}\n{:?}\n",
            store.list_keys(&KeyFilter::default(), None, usize::MAX),
            store.due_keys(Timestamp(i64::MAX), usize::MAX)
        );
        for n in 0..10 {
            out.push_str(&format!("{:?}\n", store.list_versions(id(n))));
            for v in store.list_versions(id(n)).unwrap() {
                out.push_str(&hex::encode(&v.wrapped_material));
            }
        }
        out
    }

    fn due_ids(store: &SledStore, now: i64) -> Vec<KeyId> {
        store
            .due_keys(Timestamp(now), usize::MAX)
            .unwrap()
            .iter()
            .map(|k| k.id)
            .collect()
    }

    #[test]
    fn due_index_follows_every_write_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path()).unwrap();
            let mut a = key(id(1), None);
            a.rotation_period_secs = Some(60);
            a.next_rotation_at = Some(Timestamp(300));
            store.create_key(&a, &version(a.id, 1)).unwrap();
            let mut b = key(id(2), None);
            b.next_rotation_at = Some(Timestamp(-100));
            store.create_key(&b, &version(b.id, 1)).unwrap();
            store
                .create_key(&key(id(3), None), &version(id(3), 1))
                .unwrap();
            assert_eq!(due_ids(&store, 299), vec![id(2)]);
            assert_eq!(due_ids(&store, 300), vec![id(2), id(1)]);
            assert_eq!(store.due_keys(Timestamp(300), 1).unwrap(), vec![b.clone()]);

            // Automatic rotation moves the schedule in the same write.
            let mut a2 = a.clone();
            a2.primary_version = 2;
            a2.next_rotation_at = Some(Timestamp(360));
            store.add_version(&a, &a2, &version(a.id, 2)).unwrap();
            assert_eq!(due_ids(&store, 300), vec![id(2)]);
            // Disabled keys are never due; pending deletion is due at deletion_at.
            let mut b2 = b.clone();
            b2.state = KeyState::Disabled;
            store.compare_and_swap_key(&b, &b2).unwrap();
            let mut b3 = b2.clone();
            b3.state = KeyState::PendingDeletion;
            b3.deletion_at = Some(Timestamp(1000));
            store.compare_and_swap_key(&b2, &b3).unwrap();
            assert_eq!(due_ids(&store, 999), vec![id(1)]);
            assert_eq!(due_ids(&store, i64::MAX), vec![id(1), id(2)]);
        }
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(due_ids(&store, 999), vec![id(1)]);
        assert_eq!(due_ids(&store, 1000), vec![id(1), id(2)]);
        // Destruction takes the key out of the index.
        let b = store.get_key(id(2)).unwrap().unwrap();
        let mut tomb = b.clone();
        tomb.state = KeyState::Destroyed;
        tomb.destroyed_at = Some(Timestamp(1000));
        store.destroy_key(&b, &tomb).unwrap();
        assert_eq!(due_ids(&store, i64::MAX), vec![id(1)]);
        assert_eq!(store.due_keys(Timestamp(i64::MAX), 0).unwrap(), vec![]);
    }

    #[test]
    fn schema_1_store_is_migrated_with_its_due_index() {
        let dir = tempfile::tempdir().unwrap();
        let mut k = key(id(1), None);
        k.next_rotation_at = Some(Timestamp(5));
        {
            let store = SledStore::open(dir.path()).unwrap();
            store.create_key(&k, &version(k.id, 1)).unwrap();
            store
                .create_key(&key(id(2), None), &version(id(2), 1))
                .unwrap();
        }
        // What a schema-1 build left: no due tree, and no generations.
        to_legacy_layout(dir.path());
        {
            let db = sled::open(dir.path()).unwrap();
            assert!(db.drop_tree("due").unwrap());
            db.open_tree("meta")
                .unwrap()
                .insert(SCHEMA_KEY, &1u32.to_be_bytes())
                .unwrap();
            db.flush().unwrap();
        }
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(store.due_keys(Timestamp(5), 10).unwrap(), vec![k]);
        drop(store);
        assert_eq!(live_path(dir.path()), dir.path().join("gen-000001"));
        let db = sled::open(live_path(dir.path())).unwrap();
        let marker = db.open_tree("meta").unwrap().get(SCHEMA_KEY).unwrap();
        assert_eq!(marker.as_deref(), Some(&2u32.to_be_bytes()[..]));
    }

    #[test]
    fn add_version_with_an_updated_record_and_its_refusals() {
        let (_dir, store) = new_store();
        let k = key(id(1), Some("a"));
        store.create_key(&k, &version(k.id, 1)).unwrap();
        let before = snapshot(&store);
        let good = |f: &dyn Fn(&mut KeyRecord)| {
            let mut u = k.clone();
            u.primary_version = 2;
            f(&mut u);
            u
        };
        let refusals = [
            good(&|u| u.alias = Some("b".to_owned())),
            good(&|u| u.id = id(2)),
            good(&|u| u.primary_version = 3),
            good(&|u| u.state = KeyState::Destroyed),
        ];
        for updated in &refusals {
            let err = store
                .add_version(&k, updated, &version(k.id, 2))
                .unwrap_err();
            assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
        }
        let mut erased = version(k.id, 2);
        erased.destroyed_at = Some(Timestamp(1));
        let err = store.add_version(&k, &good(&|_| {}), &erased).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
        assert_eq!(snapshot(&store), before);

        let updated = good(&|u| u.next_rotation_at = Some(Timestamp(9)));
        store.add_version(&k, &updated, &version(k.id, 2)).unwrap();
        assert_eq!(store.get_key(k.id).unwrap(), Some(updated));
    }

    #[test]
    fn list_keys_filters_by_state_and_alias_prefix() {
        let (_dir, store) = new_store();
        for (n, alias) in [
            (1, Some("app/x")),
            (2, Some("app/y")),
            (3, None),
            (4, Some("db/z")),
        ] {
            store
                .create_key(&key(id(n), alias), &version(id(n), 1))
                .unwrap();
        }
        let k2 = store.get_key(id(2)).unwrap().unwrap();
        let mut disabled = k2.clone();
        disabled.state = KeyState::Disabled;
        store.compare_and_swap_key(&k2, &disabled).unwrap();
        let ids = |f: KeyFilter, after: Option<KeyId>, limit: usize| {
            let mut got: Vec<u8> = store
                .list_keys(&f, after, limit)
                .unwrap()
                .iter()
                .map(|k| k.id.as_bytes()[15])
                .collect();
            got.sort_unstable();
            got
        };
        let prefix = |p: &str| KeyFilter {
            alias_prefix: Some(p.to_owned()),
            ..KeyFilter::default()
        };
        let state = |s| KeyFilter {
            state: Some(s),
            ..KeyFilter::default()
        };
        assert_eq!(ids(KeyFilter::default(), None, 10), vec![1, 2, 3, 4]);
        assert_eq!(ids(prefix("app/"), None, 10), vec![1, 2]);
        assert_eq!(ids(prefix(""), None, 10), vec![1, 2, 4]);
        assert_eq!(ids(state(KeyState::Disabled), None, 10), vec![2]);
        assert_eq!(ids(state(KeyState::Enabled), None, 10), vec![1, 3, 4]);
        let both = KeyFilter {
            state: Some(KeyState::Enabled),
            alias_prefix: Some("app/".to_owned()),
        };
        assert_eq!(ids(both, None, 10), vec![1]);
        assert_eq!(ids(prefix("app/"), None, 0), Vec::<u8>::new());
        assert_eq!(ids(prefix("app/"), None, 1).len(), 1);
    }

    #[test]
    fn destroy_key_erases_every_version_and_keeps_the_alias() {
        let (_dir, store) = new_store();
        let k = key(id(1), Some("a"));
        store.create_key(&k, &version(k.id, 1)).unwrap();
        let k = rotate(&store, &k, &version(k.id, 2)).unwrap();
        let other = key(id(2), None);
        store.create_key(&other, &version(other.id, 1)).unwrap();
        let mut tomb = k.clone();
        tomb.state = KeyState::Destroyed;
        tomb.destroyed_at = Some(Timestamp(42));

        // Refusals write nothing.
        let before = snapshot(&store);
        let mut bad = Vec::new();
        for f in [
            (|t: &mut KeyRecord| t.state = KeyState::Disabled) as fn(&mut KeyRecord),
            |t| t.destroyed_at = None,
            |t| t.alias = None,
            |t| t.primary_version = 1,
            |t| t.id = id(2),
        ] {
            let mut t = tomb.clone();
            f(&mut t);
            bad.push(t);
        }
        for t in &bad {
            let err = store.destroy_key(&k, t).unwrap_err();
            assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
        }
        let mut stale = k.clone();
        stale.description = "old".to_owned();
        let err = store.destroy_key(&stale, &tomb).unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
        let ghost = key(id(9), None);
        let mut ghost_tomb = ghost.clone();
        ghost_tomb.state = KeyState::Destroyed;
        ghost_tomb.destroyed_at = Some(Timestamp(1));
        let err = store.destroy_key(&ghost, &ghost_tomb).unwrap_err();
        assert!(matches!(err, StoreError::NoSuchKey(_)), "{err:?}");
        assert_eq!(snapshot(&store), before);

        store.destroy_key(&k, &tomb).unwrap();
        assert_eq!(store.get_key(k.id).unwrap(), Some(tomb.clone()));
        assert_eq!(store.key_id_for_alias("a").unwrap(), Some(k.id));
        let versions = store.list_versions(k.id).unwrap();
        assert_eq!(versions.len(), 2);
        for (n, v) in versions.iter().enumerate() {
            let mut expected = version(k.id, n as u32 + 1);
            expected.wrapped_material.clear();
            expected.destroyed_at = Some(Timestamp(42));
            assert_eq!(*v, expected);
        }
        // The other key is untouched; the alias cannot be reused.
        assert_eq!(
            store.list_versions(other.id).unwrap(),
            vec![version(other.id, 1)]
        );
        let err = store
            .create_key(&key(id(3), Some("a")), &version(id(3), 1))
            .unwrap_err();
        assert!(matches!(err, StoreError::AliasTaken(_)), "{err:?}");

        // A tombstone is final.
        let after = snapshot(&store);
        let mut revived = tomb.clone();
        revived.state = KeyState::Enabled;
        assert!(matches!(
            store.compare_and_swap_key(&tomb, &revived),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            store.destroy_key(&tomb, &tomb),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            rotate(&store, &tomb, &version(k.id, 3)),
            Err(StoreError::Corrupt(_))
        ));
        let mut erased = versions[0].clone();
        let mut rewrapped = erased.clone();
        rewrapped.wrapped_material = vec![1; 60];
        assert!(matches!(
            store.rewrap_version(&erased, &rewrapped),
            Err(StoreError::Conflict(_))
        ));
        erased.destroyed_at = None;
        let mut rewrapped = erased.clone();
        rewrapped.wrapped_material = vec![1; 60];
        assert!(matches!(
            store.rewrap_version(&erased, &rewrapped),
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(snapshot(&store), after);
    }

    #[test]
    fn rewrap_version_and_its_refusals() {
        let (_dir, store) = new_store();
        let k = key(id(1), None);
        store.create_key(&k, &version(k.id, 1)).unwrap();
        let current = version(k.id, 1);
        let mut new = current.clone();
        new.hsm_root_key_id = 8;
        new.wrapped_material = vec![0xab; 61];

        let before = snapshot(&store);
        for f in [
            (|v: &mut VersionRecord| v.wrapped_material.clear()) as fn(&mut VersionRecord),
            |v| v.created_at = Timestamp(1),
            |v| v.version = 2,
            |v| v.key_id = id(2),
            |v| v.destroyed_at = Some(Timestamp(1)),
        ] {
            let mut bad = new.clone();
            f(&mut bad);
            let err = store.rewrap_version(&current, &bad).unwrap_err();
            assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
        }
        let mut stale = current.clone();
        stale.hsm_root_key_id = 6;
        let mut from_stale = new.clone();
        from_stale.hsm_root_key_id = 8;
        let err = store.rewrap_version(&stale, &from_stale).unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
        let missing = version(k.id, 2);
        let mut missing_new = missing.clone();
        missing_new.hsm_root_key_id = 8;
        let err = store.rewrap_version(&missing, &missing_new).unwrap_err();
        assert!(matches!(err, StoreError::NoSuchVersion(_, 2)), "{err:?}");
        assert_eq!(snapshot(&store), before);

        store.rewrap_version(&current, &new).unwrap();
        assert_eq!(store.get_version(k.id, 1).unwrap(), Some(new.clone()));
        assert_eq!(store.get_key(k.id).unwrap(), Some(k));
        // The old `current` is now stale.
        let err = store.rewrap_version(&current, &new).unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    }

    #[test]
    fn root_rotation_pages_and_counts() {
        let (_dir, store) = new_store();
        for n in 1..=3 {
            let k = key(id(n), None);
            store.create_key(&k, &version(k.id, 1)).unwrap();
            rotate(&store, &k, &version(k.id, 2)).unwrap();
        }
        // Key 2 destroyed; version 1 of key 3 already under root 8.
        let k2 = store.get_key(id(2)).unwrap().unwrap();
        let mut tomb = k2.clone();
        tomb.state = KeyState::Destroyed;
        tomb.destroyed_at = Some(Timestamp(1));
        store.destroy_key(&k2, &tomb).unwrap();
        let mut moved = version(id(3), 1);
        moved.hsm_root_key_id = 8;
        store.rewrap_version(&version(id(3), 1), &moved).unwrap();

        let mut expected = vec![(id(1), 1), (id(1), 2), (id(3), 2)];
        expected.sort_by_key(|(i, n)| (*i.as_bytes(), *n));
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let page = store.versions_not_under_root(8, cursor, 2).unwrap();
            assert!(page.len() <= 2);
            let Some(last) = page.last() else { break };
            cursor = Some((last.key_id, last.version));
            seen.extend(page.iter().map(|v| (v.key_id, v.version)));
        }
        assert_eq!(seen, expected);
        assert_eq!(store.versions_not_under_root(8, None, 0).unwrap(), vec![]);
        assert_eq!(
            store.count_versions(8).unwrap(),
            VersionCounts {
                live: 4,
                not_under_root: 3,
                destroyed: 2
            }
        );
        assert_eq!(
            store.count_versions(7).unwrap(),
            VersionCounts {
                live: 4,
                not_under_root: 1,
                destroyed: 2
            }
        );
    }

    // ---- Compaction, generations, migration ----

    /// A recognizable wrapped material, unlike the tests' usual `[n; 60]`.
    fn secret_material() -> Vec<u8> {
        (0..60u8).map(|i| i.wrapping_mul(37) ^ 0xa5).collect()
    }

    /// The files under `dir` (recursively) that contain `needle`.
    fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                out.extend(files_containing(&path, needle));
            } else {
                let bytes = std::fs::read(&path).unwrap();
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    out.push(path);
                }
            }
        }
        out
    }

    /// The material's raw bytes and its hex (as stored, in the JSON record).
    fn traces(dir: &Path, material: &[u8]) -> Vec<PathBuf> {
        let mut out = files_containing(dir, material);
        out.extend(files_containing(dir, hex::encode(material).as_bytes()));
        out
    }

    fn destroy(store: &SledStore, id: KeyId) -> KeyRecord {
        let current = store.get_key(id).unwrap().unwrap();
        let mut tomb = current.clone();
        tomb.state = KeyState::Destroyed;
        tomb.destroyed_at = Some(Timestamp(1_800_000_000_000));
        store.destroy_key(&current, &tomb).unwrap();
        tomb
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// Moves the live generation's files to the top of `dir` and removes
    /// CURRENT and LOCK: the layout before generations.
    fn to_legacy_layout(dir: &Path) {
        let path = live_path(dir);
        for entry in std::fs::read_dir(&path).unwrap() {
            let entry = entry.unwrap();
            std::fs::rename(entry.path(), dir.join(entry.file_name())).unwrap();
        }
        std::fs::remove_dir(&path).unwrap();
        std::fs::remove_file(dir.join(CURRENT)).unwrap();
        std::fs::remove_file(dir.join(LOCK)).unwrap();
    }

    /// Two live keys (one rotated, with an alias and a due time) and key 3,
    /// which holds `secret_material` and is destroyed.
    fn populate(store: &SledStore) {
        let mut a = key(id(1), Some("alias/a"));
        a.next_rotation_at = Some(Timestamp(50));
        store.create_key(&a, &version(a.id, 1)).unwrap();
        rotate(store, &a, &version(a.id, 2)).unwrap();
        store
            .create_key(&key(id(2), None), &version(id(2), 1))
            .unwrap();
        let doomed = key(id(3), Some("alias/doomed"));
        let mut v = version(doomed.id, 1);
        v.wrapped_material = secret_material();
        store.create_key(&doomed, &v).unwrap();
        destroy(store, doomed.id);
    }

    #[test]
    fn a_new_store_has_one_generation() {
        let (dir, store) = new_store();
        assert_eq!(entries(dir.path()), ["CURRENT", "LOCK", "gen-000001"]);
        assert_eq!(
            std::fs::read_to_string(dir.path().join(CURRENT)).unwrap(),
            "gen-000001\n"
        );
        drop(store);
        // Reopening keeps it.
        let _store = SledStore::open(dir.path()).unwrap();
        assert_eq!(entries(dir.path()), ["CURRENT", "LOCK", "gen-000001"]);
    }

    #[test]
    fn compaction_leaves_no_trace_of_destroyed_material() {
        let (dir, store) = new_store();
        populate(&store);
        let material = secret_material();
        // Without compaction, sled keeps the destroyed material: the check
        // below can fail.
        let before = traces(dir.path(), &material);
        assert!(!before.is_empty(), "expected the material in sled's files");
        assert!(
            before
                .iter()
                .all(|p| p.starts_with(dir.path().join("gen-000001")))
        );
        let state = snapshot(&store);
        assert!(!state.contains(&hex::encode(&material)));

        store.compact().unwrap();
        assert_eq!(snapshot(&store), state);
        assert_eq!(entries(dir.path()), ["CURRENT", "LOCK", "gen-000002"]);
        assert_eq!(traces(dir.path(), &material), Vec::<PathBuf>::new());
        // Writes go to the new generation.
        let k2 = store.get_key(id(2)).unwrap().unwrap();
        let k2 = rotate(&store, &k2, &version(id(2), 2)).unwrap();
        let state = snapshot(&store);
        drop(store);

        assert_eq!(traces(dir.path(), &material), Vec::<PathBuf>::new());
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(snapshot(&store), state);
        assert_eq!(store.get_key(id(2)).unwrap(), Some(k2));
        assert_eq!(store.key_id_for_alias("alias/doomed").unwrap(), Some(id(3)));
        assert_eq!(due_ids(&store, 50), vec![id(1)]);
        // Compacting again (nothing to erase) changes nothing.
        store.compact().unwrap();
        assert_eq!(snapshot(&store), state);
        drop(store);
        assert_eq!(entries(dir.path()), ["CURRENT", "LOCK", "gen-000003"]);
        assert_eq!(traces(dir.path(), &material), Vec::<PathBuf>::new());
    }

    #[test]
    fn compaction_keeps_blobs_and_every_tree() {
        let (dir, store) = new_store();
        let k = key(id(1), None);
        let mut v = version(k.id, 1);
        v.wrapped_material = vec![0x5a; 200 * 1024];
        store.create_key(&k, &v).unwrap();
        store.compact().unwrap();
        drop(store);
        let db = sled::open(live_path(dir.path())).unwrap();
        let mut names: Vec<Vec<u8>> = db.tree_names().iter().map(|n| n.to_vec()).collect();
        names.sort();
        let expected: Vec<&[u8]> = vec![
            b"__sled__default",
            b"aliases",
            b"due",
            b"keys",
            b"meta",
            b"versions",
        ];
        assert_eq!(names, expected);
        drop(db);
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(store.get_version(k.id, 1).unwrap(), Some(v));
    }

    #[test]
    fn open_removes_leftovers_of_an_interrupted_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let material = secret_material();
        let state = {
            let store = SledStore::open(dir.path()).unwrap();
            populate(&store);
            snapshot(&store)
        };
        // A crash during the copy: a partial next generation, and a CURRENT.tmp
        // naming it that was never renamed.
        let partial = dir.path().join("gen-000002");
        std::fs::create_dir_all(partial.join("blobs")).unwrap();
        std::fs::write(partial.join("db"), hex::encode(&material)).unwrap();
        std::fs::write(partial.join("blobs").join("7"), &material).unwrap();
        std::fs::write(dir.path().join(CURRENT_TMP), "gen-000002\n").unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(entries(dir.path()), ["CURRENT", "LOCK", "gen-000001"]);
        assert_eq!(snapshot(&store), state);
        // The next compaction uses the same number.
        store.compact().unwrap();
        assert_eq!(entries(dir.path()), ["CURRENT", "LOCK", "gen-000002"]);
        assert_eq!(snapshot(&store), state);
        drop(store);

        // A crash after the switch, before the old generation was erased.
        let old = dir.path().join("gen-000001");
        std::fs::create_dir(&old).unwrap();
        std::fs::write(old.join("db"), hex::encode(&material)).unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(entries(dir.path()), ["CURRENT", "LOCK", "gen-000002"]);
        assert_eq!(snapshot(&store), state);
        drop(store);
        assert_eq!(traces(dir.path(), &material), Vec::<PathBuf>::new());
    }

    #[test]
    fn failed_compaction_keeps_serving_the_old_generation() {
        let (dir, store) = new_store();
        populate(&store);
        let state = snapshot(&store);
        for step in ["copy", "current"] {
            store.fail_compaction_at(step);
            let err = store.compact().unwrap_err();
            assert!(
                matches!(&err, StoreError::Io(m) if m.contains("injected")),
                "{err:?}"
            );
            assert_eq!(
                entries(dir.path()),
                ["CURRENT", "LOCK", "gen-000001"],
                "{step}"
            );
            assert_eq!(snapshot(&store), state);
        }
        // Still writable, and the writes last.
        let k = store.get_key(id(1)).unwrap().unwrap();
        rotate(&store, &k, &version(k.id, 3)).unwrap();
        let state = snapshot(&store);

        // Failing to remove the old generation: the new one serves, the next
        // open finishes the job.
        store.fail_compaction_at("remove-old");
        let err = store.compact().unwrap_err();
        assert!(
            matches!(&err, StoreError::Io(m) if m.contains("next open")),
            "{err:?}"
        );
        assert_eq!(snapshot(&store), state);
        drop(store);
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(entries(dir.path()), ["CURRENT", "LOCK", "gen-000002"]);
        assert_eq!(snapshot(&store), state);
    }

    #[test]
    fn failed_switch_sync_poisons_the_store() {
        let (dir, store) = new_store();
        populate(&store);
        store.fail_compaction_at("sync-current");
        let err = store.compact().unwrap_err();
        assert!(matches!(err, StoreError::Io(_)), "{err:?}");
        assert!(matches!(store.get_key(id(1)), Err(StoreError::Io(_))));
        // Both generations are complete; CURRENT names one of them.
        assert_eq!(
            entries(dir.path()),
            ["CURRENT", "LOCK", "gen-000001", "gen-000002"]
        );
        // (Reopening needs a new process: the failed store leaks its locks.)
    }

    #[test]
    fn inconsistent_generations_are_refused() {
        // CURRENT naming a missing generation.
        let dir = tempfile::tempdir().unwrap();
        drop(SledStore::open(dir.path()).unwrap());
        std::fs::write(dir.path().join(CURRENT), "gen-000007\n").unwrap();
        let err = SledStore::open(dir.path()).unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt(m) if m.contains("gen-000007")),
            "{err:?}"
        );
        assert!(dir.path().join("gen-000001").is_dir(), "nothing removed");
        // CURRENT that is not a generation name.
        std::fs::write(dir.path().join(CURRENT), "../elsewhere\n").unwrap();
        let err = SledStore::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");

        // Generations with records, but no CURRENT: refused, not reset.
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path()).unwrap();
            populate(&store);
        }
        std::fs::remove_file(dir.path().join(CURRENT)).unwrap();
        let err = SledStore::open(dir.path()).unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt(m) if m.contains("no CURRENT")),
            "{err:?}"
        );
        std::fs::rename(dir.path().join("gen-000001"), dir.path().join("gen-000004")).unwrap();
        let err = SledStore::open(dir.path()).unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt(m) if m.contains("no CURRENT")),
            "{err:?}"
        );
        assert!(dir.path().join("gen-000004").join("db").is_file());
    }

    #[test]
    fn an_interrupted_creation_is_adopted() {
        let dir = tempfile::tempdir().unwrap();
        drop(SledStore::open(dir.path()).unwrap());
        // The crash came before CURRENT was written.
        std::fs::remove_file(dir.path().join(CURRENT)).unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(entries(dir.path()), ["CURRENT", "LOCK", "gen-000001"]);
        store
            .create_key(&key(id(1), None), &version(id(1), 1))
            .unwrap();
    }

    #[test]
    fn the_layout_before_generations_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let material = secret_material();
        let state = {
            let store = SledStore::open(dir.path()).unwrap();
            populate(&store);
            snapshot(&store)
        };
        to_legacy_layout(dir.path());
        assert!(dir.path().join("db").is_file());
        assert!(!traces(dir.path(), &material).is_empty());

        // An interrupted migration left a partial generation.
        std::fs::create_dir(dir.path().join("gen-000001")).unwrap();
        std::fs::write(dir.path().join("gen-000001").join("db"), b"partial").unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(entries(dir.path()), ["CURRENT", "LOCK", "gen-000001"]);
        assert_eq!(snapshot(&store), state);
        // The migration is a compaction.
        assert_eq!(traces(dir.path(), &material), Vec::<PathBuf>::new());
        drop(store);

        // A migration interrupted after CURRENT: the old files are removed.
        let store = SledStore::open(dir.path()).unwrap();
        let k = key(id(9), None);
        store.create_key(&k, &version(k.id, 1)).unwrap();
        let state = snapshot(&store);
        drop(store);
        let db = sled::open(dir.path()).unwrap();
        db.open_tree("keys")
            .unwrap()
            .insert(b"x", hex::encode(&material).as_bytes())
            .unwrap();
        db.flush().unwrap();
        drop(db);
        assert!(dir.path().join("conf").is_file());
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(entries(dir.path()), ["CURRENT", "LOCK", "gen-000001"]);
        assert_eq!(snapshot(&store), state);
        drop(store);
        assert_eq!(traces(dir.path(), &material), Vec::<PathBuf>::new());
    }

    /// `cargo test -p coffre --lib compaction_timing -- --ignored --nocapture`
    #[test]
    #[ignore = "a timing, not a check"]
    fn compaction_timing() {
        const KEYS: u32 = 10_000;
        let dir = tempfile::tempdir().unwrap();
        drop(SledStore::open(dir.path()).unwrap());
        {
            // Filled behind the store's back: 10,000 durable writes would
            // take minutes.
            let db = sled::open(live_path(dir.path())).unwrap();
            let keys = db.open_tree("keys").unwrap();
            let versions = db.open_tree("versions").unwrap();
            let aliases = db.open_tree("aliases").unwrap();
            for n in 0..KEYS {
                let k = key(KeyId::new_random(), Some(&format!("alias/{n}")));
                let v = version(k.id, 1);
                keys.insert(k.id.as_bytes(), serde_json::to_vec(&k).unwrap())
                    .unwrap();
                versions
                    .insert(version_key(k.id, 1), serde_json::to_vec(&v).unwrap())
                    .unwrap();
                aliases
                    .insert(k.alias.unwrap().as_bytes(), k.id.as_bytes())
                    .unwrap();
            }
            db.flush().unwrap();
        }
        let store = SledStore::open(dir.path()).unwrap();
        let size = |dir: &Path| -> u64 {
            fn walk(p: &Path) -> u64 {
                std::fs::read_dir(p)
                    .unwrap()
                    .map(|e| {
                        let e = e.unwrap();
                        if e.file_type().unwrap().is_dir() {
                            walk(&e.path())
                        } else {
                            e.metadata().unwrap().len()
                        }
                    })
                    .sum()
            }
            walk(dir)
        };
        let before = size(dir.path());
        let start = std::time::Instant::now();
        store.compact().unwrap();
        let took = start.elapsed();
        println!(
            "compact() of {KEYS} keys: {took:?} ({before} bytes before, {} after)",
            size(dir.path())
        );
        assert_eq!(store.count_versions(7).unwrap().live, u64::from(KEYS));
    }

    // ---- Model-based test ----

    const ALIASES: [&str; 3] = ["alias/a", "alias/b", "other/c"];
    const IDS: u8 = 5;
    /// Times around the interesting edges of the due index's encoding.
    const TIMES: [i64; 7] = [i64::MIN, -5000, -1, 0, 1, 5000, i64::MAX];

    #[derive(Clone, Debug)]
    enum Op {
        Create {
            id: u8,
            alias: Option<usize>,
            consistent: bool,
            rotate_at: Option<i64>,
        },
        AddVersion {
            id: u8,
            stale: bool,
            skip: bool,
            rotate_at: Option<i64>,
        },
        /// A compare-and-swap to `state`, with `due` as the deletion time
        /// (PENDING_DELETION) or the next rotation (otherwise).
        SetState {
            id: u8,
            state: KeyState,
            stale: bool,
            due: Option<i64>,
        },
        Destroy {
            id: u8,
            stale: bool,
        },
        Rewrap {
            id: u8,
            version: u32,
            stale: bool,
            root: u32,
        },
        Reopen,
        Compact,
    }

    fn op() -> impl Strategy<Value = Op> {
        let state = prop_oneof![
            Just(KeyState::Enabled),
            Just(KeyState::Disabled),
            Just(KeyState::PendingDeletion),
            Just(KeyState::Destroyed),
        ];
        let time = || proptest::option::of(proptest::sample::select(TIMES.to_vec()));
        prop_oneof![
            4 => (0..IDS, proptest::option::of(0..ALIASES.len()), proptest::bool::weighted(0.9), time())
                .prop_map(|(id, alias, consistent, rotate_at)| Op::Create { id, alias, consistent, rotate_at }),
            3 => (0..IDS, proptest::bool::weighted(0.2), proptest::bool::weighted(0.2), time())
                .prop_map(|(id, stale, skip, rotate_at)| Op::AddVersion { id, stale, skip, rotate_at }),
            3 => (0..IDS, state, proptest::bool::weighted(0.2), time())
                .prop_map(|(id, state, stale, due)| Op::SetState { id, state, stale, due }),
            1 => (0..IDS, proptest::bool::weighted(0.2))
                .prop_map(|(id, stale)| Op::Destroy { id, stale }),
            2 => (0..IDS, 1..4u32, proptest::bool::weighted(0.2), 7..9u32)
                .prop_map(|(id, version, stale, root)| Op::Rewrap { id, version, stale, root }),
            1 => Just(Op::Reopen),
            1 => Just(Op::Compact),
        ]
    }

    /// Error variants, for comparing outcomes.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Kind {
        KeyExists,
        AliasTaken,
        NoSuchKey,
        NoSuchVersion,
        Conflict,
        Corrupt,
    }

    fn kind<T>(r: Result<T, StoreError>) -> Result<T, Kind> {
        r.map_err(|e| match e {
            StoreError::KeyExists(_) => Kind::KeyExists,
            StoreError::AliasTaken(_) => Kind::AliasTaken,
            StoreError::NoSuchKey(_) => Kind::NoSuchKey,
            StoreError::NoSuchVersion(..) => Kind::NoSuchVersion,
            StoreError::Conflict(_) => Kind::Conflict,
            StoreError::Corrupt(_) => Kind::Corrupt,
            StoreError::Io(m) => panic!("unexpected I/O error: {m}"),
        })
    }

    #[derive(Debug, Default)]
    struct Model {
        keys: BTreeMap<KeyId, KeyRecord>,
        versions: BTreeMap<(KeyId, u32), VersionRecord>,
        aliases: BTreeMap<String, KeyId>,
    }

    impl Model {
        fn create(&mut self, k: &KeyRecord, v: &VersionRecord) -> Result<(), Kind> {
            if v.key_id != k.id || v.version != k.primary_version {
                return Err(Kind::Corrupt);
            }
            if self.keys.contains_key(&k.id) {
                return Err(Kind::KeyExists);
            }
            if let Some(a) = &k.alias
                && self.aliases.contains_key(a)
            {
                return Err(Kind::AliasTaken);
            }
            self.keys.insert(k.id, k.clone());
            self.versions.insert((k.id, v.version), v.clone());
            if let Some(a) = &k.alias {
                self.aliases.insert(a.clone(), k.id);
            }
            Ok(())
        }

        fn check(&self, current: &KeyRecord) -> Result<(), Kind> {
            match self.keys.get(&current.id) {
                None => Err(Kind::NoSuchKey),
                Some(stored) if stored != current => Err(Kind::Conflict),
                Some(_) => Ok(()),
            }
        }

        fn add_version(
            &mut self,
            current: &KeyRecord,
            updated: &KeyRecord,
            v: &VersionRecord,
        ) -> Result<(), Kind> {
            if v.key_id != current.id
                || updated.id != current.id
                || updated.alias != current.alias
                || updated.primary_version != v.version
                || current.state == KeyState::Destroyed
                || updated.state == KeyState::Destroyed
            {
                return Err(Kind::Corrupt);
            }
            if current.primary_version.checked_add(1) != Some(v.version) {
                return Err(Kind::Conflict);
            }
            self.check(current)?;
            if self.versions.contains_key(&(current.id, v.version)) {
                return Err(Kind::Conflict);
            }
            self.versions.insert((current.id, v.version), v.clone());
            self.keys.insert(current.id, updated.clone());
            Ok(())
        }

        fn cas(&mut self, current: &KeyRecord, new: &KeyRecord) -> Result<(), Kind> {
            if current.state == KeyState::Destroyed || new.state == KeyState::Destroyed {
                return Err(Kind::Corrupt);
            }
            self.check(current)?;
            self.keys.insert(current.id, new.clone());
            Ok(())
        }

        fn destroy(&mut self, current: &KeyRecord, tombstone: &KeyRecord) -> Result<(), Kind> {
            if current.state == KeyState::Destroyed {
                return Err(Kind::Corrupt);
            }
            self.check(current)?;
            for ((id, _), v) in self.versions.iter_mut() {
                if *id == current.id {
                    v.wrapped_material.clear();
                    v.destroyed_at = tombstone.destroyed_at;
                }
            }
            self.keys.insert(current.id, tombstone.clone());
            Ok(())
        }

        fn rewrap(&mut self, current: &VersionRecord, new: &VersionRecord) -> Result<(), Kind> {
            if current.destroyed_at.is_some() {
                return Err(Kind::Conflict);
            }
            match self.versions.get(&(current.key_id, current.version)) {
                None => Err(Kind::NoSuchVersion),
                Some(stored) if stored != current => Err(Kind::Conflict),
                Some(_) => {
                    self.versions
                        .insert((current.key_id, current.version), new.clone());
                    Ok(())
                }
            }
        }

        /// What a caller would pass as `current`: the stored record, a stale
        /// copy of it, or a record for a key that does not exist.
        fn current(&self, id: KeyId, stale: bool) -> KeyRecord {
            let mut k = self.keys.get(&id).cloned().unwrap_or_else(|| key(id, None));
            if stale {
                k.description.push_str(" (old)");
            }
            k
        }

        fn due_keys(&self, now: Timestamp) -> Vec<KeyRecord> {
            let mut due: Vec<KeyRecord> = self
                .keys
                .values()
                .filter(|k| k.next_due().is_some_and(|at| at <= now))
                .cloned()
                .collect();
            // Stable: ties stay in id order.
            due.sort_by_key(|k| k.next_due());
            due
        }
    }

    fn filters() -> Vec<KeyFilter> {
        let states = [
            None,
            Some(KeyState::Enabled),
            Some(KeyState::Disabled),
            Some(KeyState::PendingDeletion),
            Some(KeyState::Destroyed),
        ];
        let prefixes = [None, Some(""), Some("alias/"), Some("alias/a"), Some("x")];
        let mut out = Vec::new();
        for state in states {
            for prefix in prefixes {
                out.push(KeyFilter {
                    state,
                    alias_prefix: prefix.map(str::to_owned),
                });
            }
        }
        out
    }

    fn assert_same_state(store: &SledStore, model: &Model) -> Result<(), TestCaseError> {
        for filter in filters() {
            let all: Vec<KeyRecord> = model
                .keys
                .values()
                .filter(|k| filter.matches(k))
                .cloned()
                .collect();
            prop_assert_eq!(&store.list_keys(&filter, None, usize::MAX).unwrap(), &all);
            // Paging after any key, matching the filter or not.
            for n in 0..IDS {
                let expected: Vec<KeyRecord> = all
                    .iter()
                    .filter(|k| *k.id.as_bytes() > *id(n).as_bytes())
                    .take(2)
                    .cloned()
                    .collect();
                prop_assert_eq!(store.list_keys(&filter, Some(id(n)), 2).unwrap(), expected);
            }
        }
        for now in TIMES {
            let due = model.due_keys(Timestamp(now));
            prop_assert_eq!(&store.due_keys(Timestamp(now), usize::MAX).unwrap(), &due);
            prop_assert_eq!(
                store.due_keys(Timestamp(now), 2).unwrap(),
                due[..due.len().min(2)].to_vec()
            );
        }
        for n in 0..IDS {
            let i = id(n);
            prop_assert_eq!(store.get_key(i).unwrap(), model.keys.get(&i).cloned());
            let versions: Vec<VersionRecord> = model
                .versions
                .range((i, 0)..=(i, u32::MAX))
                .map(|(_, v)| v.clone())
                .collect();
            prop_assert_eq!(store.list_versions(i).unwrap(), versions);
        }
        for a in ALIASES {
            prop_assert_eq!(
                store.key_id_for_alias(a).unwrap(),
                model.aliases.get(a).copied()
            );
        }
        for root in [7, 8] {
            let todo: Vec<VersionRecord> = model
                .versions
                .values()
                .filter(|v| v.destroyed_at.is_none() && v.hsm_root_key_id != root)
                .cloned()
                .collect();
            prop_assert_eq!(
                &store
                    .versions_not_under_root(root, None, usize::MAX)
                    .unwrap(),
                &todo
            );
            if let Some(first) = todo.first() {
                prop_assert_eq!(
                    &store
                        .versions_not_under_root(root, Some((first.key_id, first.version)), 2)
                        .unwrap()[..],
                    &todo[1..todo.len().min(3)]
                );
            }
            let destroyed = model
                .versions
                .values()
                .filter(|v| v.destroyed_at.is_some())
                .count() as u64;
            prop_assert_eq!(
                store.count_versions(root).unwrap(),
                VersionCounts {
                    live: model.versions.len() as u64 - destroyed,
                    not_under_root: todo.len() as u64,
                    destroyed,
                }
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn behaves_like_the_model(ops in proptest::collection::vec(op(), 1..40)) {
            let dir = tempfile::tempdir().unwrap();
            let mut store = SledStore::open(dir.path()).unwrap();
            let mut model = Model::default();
            for op in ops {
                match op {
                    Op::Create { id: n, alias, consistent, rotate_at } => {
                        let mut k = key(id(n), alias.map(|a| ALIASES[a]));
                        k.description = format!("key {n}");
                        k.rotation_period_secs = rotate_at.map(|_| 86_400);
                        k.next_rotation_at = rotate_at.map(Timestamp);
                        let v = version(k.id, if consistent { 1 } else { 2 });
                        prop_assert_eq!(kind(store.create_key(&k, &v)), model.create(&k, &v));
                    }
                    Op::AddVersion { id: n, stale, skip, rotate_at } => {
                        let current = model.current(id(n), stale);
                        let next = current.primary_version + if skip { 2 } else { 1 };
                        let v = version(current.id, next);
                        let mut updated = model.current(id(n), false);
                        updated.primary_version = next;
                        updated.next_rotation_at = rotate_at.map(Timestamp);
                        prop_assert_eq!(
                            kind(store.add_version(&current, &updated, &v)),
                            model.add_version(&current, &updated, &v)
                        );
                    }
                    Op::SetState { id: n, state, stale, due } => {
                        let current = model.current(id(n), stale);
                        let mut new = model.current(id(n), false);
                        new.state = state;
                        if state == KeyState::PendingDeletion {
                            new.deletion_at = due.map(Timestamp);
                        } else {
                            new.deletion_at = None;
                            new.next_rotation_at = due.map(Timestamp);
                        }
                        prop_assert_eq!(
                            kind(store.compare_and_swap_key(&current, &new)),
                            model.cas(&current, &new)
                        );
                    }
                    Op::Destroy { id: n, stale } => {
                        let current = model.current(id(n), stale);
                        let mut tombstone = model.current(id(n), false);
                        tombstone.state = KeyState::Destroyed;
                        tombstone.deletion_at = None;
                        tombstone.destroyed_at = Some(Timestamp(1_800_000_000_000));
                        prop_assert_eq!(
                            kind(store.destroy_key(&current, &tombstone)),
                            model.destroy(&current, &tombstone)
                        );
                    }
                    Op::Rewrap { id: n, version: number, stale, root } => {
                        let mut current = model
                            .versions
                            .get(&(id(n), number))
                            .cloned()
                            .unwrap_or_else(|| version(id(n), number));
                        if stale {
                            current.wrapped_material.push(0);
                        }
                        let mut new = current.clone();
                        new.hsm_root_key_id = root;
                        new.wrapped_material = vec![0xa0 | root as u8; 61];
                        prop_assert_eq!(
                            kind(store.rewrap_version(&current, &new)),
                            model.rewrap(&current, &new)
                        );
                    }
                    Op::Reopen => {
                        drop(store);
                        store = SledStore::open(dir.path()).unwrap();
                    }
                    Op::Compact => {
                        store.compact().unwrap();
                        let live = live_path(dir.path());
                        for name in generation_dirs(dir.path()).unwrap() {
                            prop_assert_eq!(dir.path().join(name), live.clone());
                        }
                    }
                }
                assert_same_state(&store, &model)?;
            }
        }
    }
}
