//! The files of a sled database: the `fsync`s that make a write durable,
//! and the removal that zero-fills first.
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
//! Steps 2 and 3 are [`sync_data_dir`].
//!
//! Zero-filling before unlinking ([`scrub_remove`]) helps on file systems
//! that overwrite in place, such as ext4 or XFS, not on copy-on-write ones
//! such as btrfs or ZFS.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

use crate::fsutil::sync_dir;

pub(super) fn remove_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Overwrites every regular file under `path` with zeros (best effort: a
/// failure is logged), then removes `path`, a file or a directory tree.
/// Symbolic links are removed, not followed.
pub(super) fn scrub_remove(path: &Path) -> io::Result<()> {
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
pub(super) fn sync_data_dir(dir: &Path) -> io::Result<()> {
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
    sync_dir(dir)
}

fn sync_if_present(path: &Path) -> io::Result<()> {
    match File::open(path) {
        Ok(f) => f.sync_all(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
