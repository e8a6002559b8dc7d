//! Unit tests of [`SledStore`]'s generations: compaction (no trace of
//! destroyed material), interrupted and failed compactions, inconsistent
//! layouts, and the migration from the layout before generations.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};

use super::generations::{CURRENT, CURRENT_TMP};
use super::layout::version_key;
use super::test_support::*;
use super::*;
use crate::model::KeyId;
use crate::store::StoreError;

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
    let db = open_raw(&live_path(dir.path()));
    let mut names: Vec<Vec<u8>> = db.tree_names().iter().map(|n| n.to_vec()).collect();
    names.sort();
    let expected: Vec<&[u8]> = vec![
        b"__sled__default",
        b"aliases",
        b"approvals",
        b"changes",
        b"due",
        b"key_gens",
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
        let db = open_raw(&live_path(dir.path()));
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
