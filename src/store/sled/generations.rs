//! The generations of a store directory: its layout, what opening
//! recovers, and the compaction that writes the next generation.
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
//! [`SledEngine::open`]:
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
//! and unlinked (a failure to unlink fails the open with [`StoreError::Io`]):
//! [`super::files::scrub_remove`].
//!
//! # Compaction
//!
//! [`KeyStore::destroy_key`] empties every version record, but sled 0.34.7
//! keeps the old bytes in its files (it is log-structured: see SECURITY.md,
//! "Destroyed material and the store's files"). Copying every tree into a
//! fresh sled directory leaves no trace there: that is what
//! [`KeyStore::compact`] does, checked by
//! `compaction_leaves_no_trace_of_destroyed_material`, which searches every
//! file for the raw bytes and the hex, before and after. It takes the gate
//! exclusively (reads and writes wait: about 2 s for 10,000 keys in a debug
//! build), then:
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
//! failed, since either generation may be the durable one. A failure in step
//! 3's erasure returns [`StoreError::Io`] with the store serving
//! `gen-(N+1)`, and the next open retries.
//!
//! Compaction cleans the store's files, not the blocks the old files
//! occupied, nor SSD spare areas, snapshots or backups: against those,
//! erasure is cryptographic (rotating the HSM root key away, see
//! SECURITY.md).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::files::{scrub_remove, sync_data_dir};
use super::{Handles, Live, SledEngine, io_error, sled_error};
use crate::fsutil::{sync_dir, write_synced};
#[cfg(doc)]
use crate::store::KeyStore;
use crate::store::StoreError;

/// The file in the store directory that names the live generation.
pub(super) const CURRENT: &str = "CURRENT";
/// Where the next content of [`CURRENT`] is written before its rename.
pub(super) const CURRENT_TMP: &str = "CURRENT.tmp";
/// Locked (`flock`) by the process that has the store open.
pub(super) const LOCK: &str = "LOCK";
const GENERATION_PREFIX: &str = "gen-";

/// The name of generation `n`'s directory, e.g. `gen-000001`.
pub(super) fn generation_name(n: u32) -> String {
    format!("{GENERATION_PREFIX}{n:06}")
}

/// The inverse of [`generation_name`]; `None` for anything not spelled
/// exactly as it would write it.
fn parse_generation_name(name: &str) -> Option<u32> {
    let n = name.strip_prefix(GENERATION_PREFIX)?.parse().ok()?;
    (generation_name(n) == name && n > 0).then_some(n)
}

impl SledEngine {
    /// Copies the live generation into the next one, makes that one live
    /// (CURRENT, then memory) and removes the old one. See
    /// [`KeyStore::compact`] and the module docs' "Compaction".
    pub(super) fn switch_generation(&self, live: &mut Live) -> Result<(), StoreError> {
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
            .and_then(|()| replace_current(&self.dir, next));
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
/// sled's `Drop` may hang (see [`SledEngine`]'s `Drop`).
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

const LOCK_TRIES: u32 = 20;
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(25);

/// Takes `DIR/LOCK` (`flock`, released when the file is closed).
pub(super) fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(LOCK);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| io_error("opening", &path, e))?;
    // A few tries: a process that forks (to run a program) while this one
    // closes its lock holds a copy of the descriptor, and so the lock,
    // until its child execs; a store reopened at that instant is not
    // held by another process. One that is still locked after this is.
    let mut tries = LOCK_TRIES;
    loop {
        match fs2::FileExt::try_lock_exclusive(&file) {
            Ok(()) => return Ok(file),
            Err(_) if tries > 1 => {
                tries -= 1;
                std::thread::sleep(LOCK_RETRY);
            }
            Err(e) => {
                return Err(StoreError::Io(format!(
                    "locking {} (is the store open in another process?): {e}",
                    path.display()
                )));
            }
        }
    }
}

fn current_content(generation: u32) -> String {
    format!("{}\n", generation_name(generation))
}

/// The generation `DIR/CURRENT` names, `None` if there is no such file.
pub(super) fn read_current(dir: &Path) -> Result<Option<u32>, StoreError> {
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
pub(super) fn write_current(dir: &Path, generation: u32) -> io::Result<()> {
    replace_current(dir, generation)?;
    sync_dir(dir)
}

/// Writes `DIR/CURRENT.tmp`, `fsync`s it and renames it over `DIR/CURRENT`;
/// the rename is durable only once `DIR` is `fsync`ed.
fn replace_current(dir: &Path, generation: u32) -> io::Result<()> {
    let tmp = dir.join(CURRENT_TMP);
    write_synced(&tmp, current_content(generation).as_bytes())?;
    std::fs::rename(&tmp, dir.join(CURRENT))
}

/// The names of the `gen-*` entries of `dir`, sorted.
pub(super) fn generation_dirs(dir: &Path) -> io::Result<Vec<String>> {
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
pub(super) fn remove_generations(dir: &Path, keep: Option<u32>) -> io::Result<()> {
    let keep = keep.map(generation_name);
    for name in generation_dirs(dir)? {
        if keep.as_ref() != Some(&name) {
            scrub_remove(&dir.join(name))?;
        }
    }
    Ok(())
}

/// Whether `dir` holds sled's files directly: the layout before generations.
pub(super) fn holds_legacy_layout(dir: &Path) -> io::Result<bool> {
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
pub(super) fn remove_legacy_files(dir: &Path) -> io::Result<()> {
    for path in legacy_entries(dir)? {
        scrub_remove(&path)?;
    }
    Ok(())
}
