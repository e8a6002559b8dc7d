//! The embedded store, on sled 0.34.7 in one data directory: the blocking
//! [`SledEngine`], and [`SledStore`], the async [`KeyStore`] over it
//! (`store.rs`).
//!
//! The directory holds generations, each a complete sled database, and a
//! `CURRENT` file naming the live one; opening recovers from an interrupted
//! compaction or migration, and [`KeyStore::compact`] copies the live
//! generation into the next so that no erased data remains in the files
//! (`generations.rs`). Inside a generation: the trees and their key
//! encodings (`layout.rs`), the schema marker and its migration
//! (`schema.rs`). Each mutating call is one sled transaction, made durable
//! by the `fsync`s of `files.rs` before it returns; the [`KeyStore`]
//! methods are in `key_store.rs`.
//!
//! This file holds the store itself: its gate (readers see only durable
//! states), the poisoning after a failed write, and `open`.

use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use sled::Transactional;
use sled::transaction::{ConflictableTransactionResult, TransactionError};

#[cfg(doc)]
use super::KeyStore;
use super::StoreError;
use super::integrity::RecordMac;
use crate::fsutil::sync_dir;
use files::{remove_if_present, sync_data_dir};
use generations::{
    CURRENT, CURRENT_TMP, generation_dirs, generation_name, holds_legacy_layout, lock_dir,
    read_current, remove_generations, remove_legacy_files, write_current,
};
use key_store::Tx;
use layout::Codec;

mod approvals;
mod export;
mod files;
mod generations;
mod key_store;
mod layout;
mod schema;
mod store;

pub use schema::SCHEMA_VERSION;
pub use store::SledStore;

#[cfg(test)]
mod compaction_tests;
#[cfg(test)]
mod conformance_tests;
#[cfg(test)]
mod fault_tests;
#[cfg(test)]
mod integrity_tests;
#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;

/// The sled store, blocking: each method is the [`KeyStore`] method of the
/// same name made blocking ([`SledStore`] runs them on tokio's blocking
/// pool).
///
/// A [`RwLock`], the gate, orders everything; it holds the live
/// generation's handles. A writer holds it exclusively across transaction,
/// flush and `fsync`, and a compaction across its whole copy and switch;
/// readers share it. Without this, a reader could see a change that is not
/// yet durable (sled makes a transaction visible in memory before the
/// flush), for instance wrap data keys under a new CMK version that a power
/// cut then erases — those ciphertexts would become undecryptable. With it,
/// a reader sees only durable states. Reads wait at most for one write's
/// `fsync`s, and the service caches key versions, so this is off the hot
/// path.
///
/// If a transaction fails in sled's storage layer, or a flush or an `fsync`
/// fails, the store marks itself failed and refuses every later call with
/// [`StoreError::Io`]: after a failed `fsync` the kernel may have dropped
/// the dirty pages, and the in-memory state may hold changes that are not on
/// disk. Reopening the directory (in a new process: see `Drop`) recovers
/// exactly what was durable. Such an `Io` error from a mutating call means
/// "outcome unknown": the change may or may not have been persisted.
pub struct SledEngine {
    dir: PathBuf,
    /// The live generation. Exclusive for a write through its `fsync`s and
    /// for a compaction, shared for reads.
    gate: RwLock<Live>,
    /// Set once a write may have left non-durable state in memory.
    failed: AtomicBool,
    /// The records' MAC key, once installed (`install_integrity`).
    mac: OnceLock<Arc<RecordMac>>,
    /// The schema marker says the records are sealed (schema 3).
    sealed: AtomicBool,
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

/// sled's handles, in an [`Arc`] so that [`SledEngine`]'s `Drop` can leak
/// them; see there.
struct Handles {
    db: sled::Db,
    meta: sled::Tree,
    keys: sled::Tree,
    versions: sled::Tree,
    aliases: sled::Tree,
    due: sled::Tree,
    approvals: sled::Tree,
    changes: sled::Tree,
    key_gens: sled::Tree,
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
            approvals: tree("approvals")?,
            changes: tree("changes")?,
            key_gens: tree("key_gens")?,
            db,
        })
    }

    /// Whether any data tree holds a record.
    fn holds_records(&self) -> bool {
        !(self.keys.is_empty()
            && self.versions.is_empty()
            && self.aliases.is_empty()
            && self.due.is_empty()
            && self.approvals.is_empty()
            && self.changes.is_empty())
    }
}

impl Drop for SledEngine {
    /// After a failed write, sled 0.34.7 can no longer flush: its `Tree`'s
    /// `Drop` calls `flush`, which then waits forever for the log buffer that
    /// failed (observed on a full file system). So a failed store leaks its
    /// sled handles (and sled's threads) instead of hanging the shutdown,
    /// and its directory lock with them. The process must exit before the
    /// directory can be opened again.
    ///
    /// Known limitation of sled 0.34.7: its `Log` calls `sync_all().unwrap()`
    /// when the database is dropped, so a disk that fails exactly at shutdown
    /// can make sled itself panic in `Drop`. This code never panics.
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

impl fmt::Debug for SledEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SledEngine")
            .field("dir", &self.dir)
            .field("failed", &self.failed.load(Ordering::Relaxed))
            .field("sealed", &self.sealed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn io_error(context: &str, path: &Path, e: io::Error) -> StoreError {
    StoreError::Io(format!("{context} {}: {e}", path.display()))
}

impl SledEngine {
    /// Opens (creating if needed) the store in `dir`; see `generations.rs`
    /// for the layout, and what opening cleans up or migrates.
    ///
    /// Fails with [`StoreError::Io`] if the directory cannot be used (not a
    /// directory, read-only, locked by another process, a leftover that
    /// cannot be removed) and with [`StoreError::Corrupt`] if it holds
    /// another schema version or an inconsistent layout (`CURRENT` naming a
    /// missing generation, generations without `CURRENT`).
    pub fn open(dir: &Path) -> Result<SledEngine, StoreError> {
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
            let store = SledEngine::serving(dir, lock, generation, path)?;
            store.check_schema()?;
            return Ok(store);
        }
        if holds_legacy_layout(dir).map_err(|e| leftovers("reading", e))? {
            // Without CURRENT, any generation is a partial migration.
            remove_generations(dir, None)
                .and_then(|()| sync_dir(dir))
                .map_err(|e| leftovers("removing stale generations from", e))?;
            let store = SledEngine::serving(dir, lock, 0, dir.to_path_buf())?;
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
        let store = SledEngine::serving(dir, lock, 1, dir.join(&first))?;
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
    ) -> Result<SledEngine, StoreError> {
        let sled = Arc::new(Handles::open(&path)?);
        Ok(SledEngine {
            dir: dir.to_path_buf(),
            gate: RwLock::new(Live {
                generation,
                path,
                sled,
            }),
            failed: AtomicBool::new(false),
            mac: OnceLock::new(),
            sealed: AtomicBool::new(false),
            lock,
            #[cfg(test)]
            fail_compaction_at: std::sync::Mutex::new(None),
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
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

    /// How records are sealed: with the installed MAC key; unsealed only in
    /// a store that is not sealed yet. A sealed store without its key is
    /// refused, reads and writes alike.
    fn codec(&self) -> Result<Codec<'_>, StoreError> {
        match self.mac.get() {
            Some(mac) => Ok(Codec { mac: Some(mac) }),
            None if self.sealed.load(Ordering::Acquire) => {
                Err(StoreError::IntegrityFailure(format!(
                    "the records of store {} are sealed and no integrity key is installed",
                    self.dir.display()
                )))
            }
            None => Ok(Codec { mac: None }),
        }
    }

    /// The records' MAC key, if installed (for its failure count).
    pub fn integrity(&self) -> Option<&Arc<RecordMac>> {
        self.mac.get()
    }

    fn mark_failed(&self) {
        self.failed.store(true, Ordering::Release);
    }

    /// Runs `body` as one transaction over keys, versions, aliases, the
    /// due index and approvals, then makes it durable.
    ///
    /// sled seals a transaction's writes as one batch in its log
    /// (`Tree::transaction` → `pin_log` / `seal_batch`), and recovery replays
    /// a batch entirely or not at all. A check that fails (key exists, alias
    /// taken, stale `current`) aborts the transaction, and nothing is
    /// written. The durability that follows is [`files::sync_data_dir`]'s.
    fn write<T>(
        &self,
        body: impl Fn(&Tx<'_>) -> ConflictableTransactionResult<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.write_prepared(|_| Ok(()), |tx, ()| body(tx))
    }

    /// Like [`SledEngine::write`], with a `prepare` step that reads the
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
        let result = (
            &sled.keys,
            &sled.versions,
            &sled.aliases,
            &sled.due,
            &sled.approvals,
            &sled.meta,
            &sled.changes,
            &sled.key_gens,
        )
            .transaction(
                |(keys, versions, aliases, due, approvals, meta, changes, key_gens)| {
                    body(
                        &Tx {
                            keys,
                            versions,
                            aliases,
                            due,
                            approvals,
                            meta,
                            changes,
                            key_gens,
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

    /// `Db::flush` then `fsync` of sled's files and directories: see
    /// [`files`] for why both.
    fn make_durable(&self, live: &Live) -> Result<(), StoreError> {
        live.sled
            .db
            .flush()
            .map_err(|e| sled_error("flushing the log", e))?;
        sync_data_dir(&live.path).map_err(|e| io_error("syncing", &live.path, e))
    }

    /// Test hook: writes `value` under `key` in `tree` of the live
    /// generation behind the store's back (as someone with the files
    /// would), bypassing every check.
    #[cfg(test)]
    pub(crate) fn write_raw(&self, tree: &str, key: &[u8], value: &[u8]) {
        let live = self.write_gate();
        let tree = live.sled.db.open_tree(tree).unwrap_or_else(|e| {
            unreachable!("opening a tree in a test: {e}");
        });
        let _ = tree.insert(key, value);
        let _ = live.sled.db.flush();
    }

    /// Test hook: the bytes under `key` in `tree`, read behind the store's back.
    #[cfg(test)]
    pub(crate) fn read_raw(&self, tree: &str, key: &[u8]) -> Option<Vec<u8>> {
        let live = self.write_gate();
        let tree = live.sled.db.open_tree(tree).ok()?;
        tree.get(key).ok().flatten().map(|v| v.to_vec())
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
}

/// sled I/O errors (including a full or read-only disk) become
/// [`StoreError::Io`]; sled's own corruption errors become
/// [`StoreError::Corrupt`].
fn sled_error(context: &str, e: sled::Error) -> StoreError {
    match e {
        sled::Error::Corruption { .. } => StoreError::Corrupt(format!("{context}: {e}")),
        _ => StoreError::Io(format!("{context}: {e}")),
    }
}
