//! Unit tests of [`SledStore`]'s [`KeyStore`] methods: records, aliases,
//! batches, compare-and-swap, paging, the due index, destruction and
//! re-wrapping, and their refusals. The contract they share with every
//! backend is also checked by [`crate::store::conformance`].

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use super::test_support::*;
use super::*;
use crate::model::{KeyId, KeyRecord, KeyState, Timestamp, VersionRecord};
use crate::store::{KeyFilter, StoreError, VersionCounts};

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
