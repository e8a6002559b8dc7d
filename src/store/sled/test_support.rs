//! Fixtures of sled's unit tests: stores in temporary directories, and
//! looks behind the store's back at its files and trees.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};

use tempfile::TempDir;

use super::SledStore;
use super::generations::{CURRENT, LOCK, generation_name, read_current};
use crate::model::{KeyId, KeyRecord, KeyState, Timestamp, VersionRecord};
use crate::store::StoreError;
use crate::store::conformance::fixtures;
pub(super) use crate::store::conformance::fixtures::{id, key, version};

/// Runs `future` to its end on a runtime of its own: sled's tests are
/// synchronous, and call the async [`crate::store::KeyStore`] only
/// through the suite's fixtures.
pub(super) fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

/// [`fixtures::snapshot`], blocking.
pub(super) fn snapshot(store: &SledStore) -> String {
    block_on(fixtures::snapshot(store))
}

/// [`fixtures::rotate`], blocking.
pub(super) fn rotate(
    store: &SledStore,
    current: &KeyRecord,
    v: &VersionRecord,
) -> Result<KeyRecord, StoreError> {
    block_on(fixtures::rotate(store, current, v))
}

pub(super) fn new_store() -> (TempDir, SledStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    (dir, store)
}

/// The sled directory of the live generation (`dir` itself if there is
/// no CURRENT: the layout before generations).
pub(super) fn live_path(dir: &Path) -> PathBuf {
    match read_current(dir).unwrap() {
        Some(n) => dir.join(generation_name(n)),
        None => dir.to_path_buf(),
    }
}

/// Writes raw bytes into one of the store's trees, behind its back.
pub(super) fn poke(dir: &Path, tree: &str, k: &[u8], v: &[u8]) {
    let db = open_raw(&live_path(dir));
    db.open_tree(tree).unwrap().insert(k, v).unwrap();
    db.flush().unwrap();
}

pub(super) fn due_ids(store: &SledStore, now: i64) -> Vec<KeyId> {
    store
        .due_keys(Timestamp(now), usize::MAX)
        .unwrap()
        .iter()
        .map(|k| k.id)
        .collect()
}

/// A recognizable wrapped material, unlike the tests' usual `[n; 60]`.
pub(super) fn secret_material() -> Vec<u8> {
    (0..60u8).map(|i| i.wrapping_mul(37) ^ 0xa5).collect()
}

/// The files under `dir` (recursively) that contain `needle`.
pub(super) fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
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
pub(super) fn traces(dir: &Path, material: &[u8]) -> Vec<PathBuf> {
    let mut out = files_containing(dir, material);
    out.extend(files_containing(dir, hex::encode(material).as_bytes()));
    out
}

pub(super) fn destroy(store: &SledStore, id: KeyId) -> KeyRecord {
    let current = store.get_key(id).unwrap().unwrap();
    let mut tomb = current.clone();
    tomb.state = KeyState::Destroyed;
    tomb.destroyed_at = Some(Timestamp(1_800_000_000_000));
    store.destroy_key(&current, &tomb).unwrap();
    tomb
}

pub(super) fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Moves the live generation's files to the top of `dir` and removes
/// CURRENT and LOCK: the layout before generations.
pub(super) fn to_legacy_layout(dir: &Path) {
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
pub(super) fn populate(store: &SledStore) {
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

/// sled's database at `path`, once a store just dropped has let go of
/// it: sled's flusher thread releases the lock a moment after the drop
/// (as `Handles::open` waits for too).
pub(super) fn open_raw(path: &Path) -> sled::Db {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match sled::open(path) {
            Ok(db) => return db,
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => panic!("opening {}: {e}", path.display()),
        }
    }
}
