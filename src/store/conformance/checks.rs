//! The checks of each [`KeyStore`] method's documented guarantees and
//! refusals, on one handle. Every refusal is also checked to write nothing.

use super::fixtures::{id, key, rotate, snapshot, tombstone, version};
use super::{Check, StoreFactory, ensure, ok, open, same};
use crate::model::{KeyId, KeyRecord, KeyState, Timestamp, VersionRecord};
use crate::store::{KeyFilter, KeyStore, StoreError, VersionCounts, WrappedSecret};

pub(super) const CREATE: Check = Check {
    name: "create_key stores the key, its version, its alias and its due entry; \
           unknown ids, versions and aliases read as absent",
    run: create,
};
pub(super) const CREATE_INCONSISTENT: Check = Check {
    name: "create_key: a version of another number or key, a DESTROYED key or a destroyed \
           version is Corrupt and writes nothing",
    run: create_inconsistent,
};
pub(super) const CREATE_CLASHES: Check = Check {
    name: "create_key: a taken id is KeyExists, a taken alias AliasTaken; neither writes anything",
    run: create_clashes,
};
pub(super) const CREATE_BATCH: Check = Check {
    name: "create_keys writes a whole batch or none of it: a clash with the store or within \
           the batch, or an inconsistent record, refuses it all",
    run: create_batch,
};
pub(super) const LIST_KEYS_PAGING: Check = Check {
    name: "list_keys: ascending id bytes, strictly after start_after, at most limit; \
           pages visit every key once",
    run: list_keys_paging,
};
pub(super) const LIST_KEYS_FILTERS: Check = Check {
    name: "list_keys filters by state and alias prefix; a key without an alias matches no \
           prefix; start_after need not pass the filter",
    run: list_keys_filters,
};
pub(super) const DUE_INDEX: Check = Check {
    name: "due_keys: due at or before now, earliest first, ties by id, at most limit; \
           follows every write of a key",
    run: due_index,
};
pub(super) const ADD_VERSION: Check = Check {
    name: "add_version adds the version and replaces the key record (schedule included) \
           in one write",
    run: add_version,
};
pub(super) const ADD_VERSION_REFUSALS: Check = Check {
    name: "add_version: inconsistent records are Corrupt, a stale key or a version that is \
           not the next one Conflict, a missing key NoSuchKey; none writes",
    run: add_version_refusals,
};
pub(super) const COMPARE_AND_SWAP: Check = Check {
    name: "compare_and_swap_key replaces an equal stored record; stale is Conflict, missing \
           NoSuchKey, a change of id, alias or primary version or to DESTROYED Corrupt",
    run: compare_and_swap,
};
pub(super) const DESTROY: Check = Check {
    name: "destroy_key stores the tombstone and erases every version; the alias stays \
           taken; refusals write nothing",
    run: destroy,
};
pub(super) const TOMBSTONE_IS_FINAL: Check = Check {
    name: "a tombstone is final: no compare-and-swap, destruction, rotation or re-wrap \
           changes it or its versions",
    run: tombstone_is_final,
};
pub(super) const REWRAP: Check = Check {
    name: "rewrap_version replaces an equal stored version's root key and material only; \
           refusals (Corrupt, Conflict, NoSuchVersion) write nothing",
    run: rewrap,
};
pub(super) const ROOT_ROTATION_WORK_LIST: Check = Check {
    name: "versions_not_under_root pages live versions under another root key in (id, \
           version) order; count_versions agrees",
    run: root_rotation_work_list,
};
pub(super) const COMPACT: Check = Check {
    name: "compact leaves every record as it was, and the store writable",
    run: compact,
};
pub(super) const SECRETS: Check = Check {
    name: "service secrets: put stores or replaces, get reads, list_secrets lists every one; \
           keys are untouched",
    run: secrets,
};
pub(super) const DURABLE: Check = Check {
    name: "every acknowledged change survives a reopen",
    run: durable,
};

fn all(store: &dyn KeyStore) -> Result<Vec<KeyRecord>, String> {
    ok(
        "list_keys",
        store.list_keys(&KeyFilter::default(), None, usize::MAX),
    )
}

fn sorted(mut keys: Vec<KeyRecord>) -> Vec<KeyRecord> {
    keys.sort_by_key(|k| *k.id.as_bytes());
    keys
}

fn due_ids(store: &dyn KeyStore, now: i64, limit: usize) -> Result<Vec<KeyId>, String> {
    let due = ok("due_keys", store.due_keys(Timestamp(now), limit))?;
    Ok(due.iter().map(|k| k.id).collect())
}

fn unchanged(store: &dyn KeyStore, before: &str, after: &str) -> Result<(), String> {
    ensure(snapshot(store) == before, || {
        format!("{after} changed the store")
    })
}

fn create(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, store) = open(f)?;
    let mut k = key(id(1), Some("alias/payments"));
    k.rotation_period_secs = Some(60);
    k.next_rotation_at = Some(Timestamp(100));
    let v = version(k.id, 1);
    ok("create_key", store.create_key(&k, &v))?;
    let plain = key(id(2), None);
    ok(
        "create_key",
        store.create_key(&plain, &version(plain.id, 1)),
    )?;

    same(
        "get_key",
        ok("get_key", store.get_key(k.id))?,
        Some(k.clone()),
    )?;
    same(
        "get_version",
        ok("get_version", store.get_version(k.id, 1))?,
        Some(v.clone()),
    )?;
    same(
        "list_versions",
        ok("list_versions", store.list_versions(k.id))?,
        vec![v],
    )?;
    same(
        "key_id_for_alias",
        ok("key_id_for_alias", store.key_id_for_alias("alias/payments"))?,
        Some(k.id),
    )?;
    same("due at 100", due_ids(&*store, 100, 10)?, vec![k.id])?;
    same("due at 99", due_ids(&*store, 99, 10)?, vec![])?;
    same("list_keys", all(&*store)?, sorted(vec![k.clone(), plain]))?;

    same(
        "get_key of an unknown id",
        ok("get_key", store.get_key(id(3)))?,
        None,
    )?;
    same(
        "get_version of an unknown version",
        ok("get_version", store.get_version(k.id, 2))?,
        None,
    )?;
    same(
        "list_versions of an unknown key",
        ok("list_versions", store.list_versions(id(3)))?,
        vec![],
    )?;
    same(
        "key_id_for_alias of an unknown alias",
        ok("key_id_for_alias", store.key_id_for_alias("alias/payment"))?,
        None,
    )
}

fn create_inconsistent(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, store) = open(f)?;
    ok(
        "create_key",
        store.create_key(&key(id(9), None), &version(id(9), 1)),
    )?;
    let before = snapshot(&*store);
    let k = key(id(1), Some("a"));
    let destroyed = tombstone(&k, 1);
    let mut erased = version(k.id, 1);
    erased.wrapped_material.clear();
    erased.destroyed_at = Some(Timestamp(1));
    let cases: [(&str, &KeyRecord, VersionRecord); 4] = [
        ("a version of another number", &k, version(k.id, 2)),
        ("a version of another key", &k, version(id(2), 1)),
        ("a DESTROYED key", &destroyed, version(k.id, 1)),
        ("a destroyed version", &k, erased),
    ];
    for (what, k, v) in &cases {
        refused!(*what, store.create_key(k, v), StoreError::Corrupt(_))?;
        unchanged(&*store, &before, what)?;
        same(
            "the alias after a refused create",
            ok("key_id_for_alias", store.key_id_for_alias("a"))?,
            None,
        )?;
    }
    Ok(())
}

fn create_clashes(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, store) = open(f)?;
    let k = key(id(1), Some("a"));
    ok("create_key", store.create_key(&k, &version(k.id, 1)))?;
    let before = snapshot(&*store);

    let mut same_id = key(id(1), Some("b"));
    same_id.description = "impostor".to_owned();
    let mut other_material = version(k.id, 1);
    other_material.wrapped_material = vec![0xee; 60];
    refused!(
        "a second key with the same id",
        store.create_key(&same_id, &other_material),
        StoreError::KeyExists(i) if *i == k.id
    )?;
    unchanged(&*store, &before, "a create with a taken id")?;
    same(
        "the new alias of a refused create",
        ok("key_id_for_alias", store.key_id_for_alias("b"))?,
        None,
    )?;

    let same_alias = key(id(2), Some("a"));
    refused!(
        "a second key with the same alias",
        store.create_key(&same_alias, &version(same_alias.id, 1)),
        StoreError::AliasTaken(a) if a == "a"
    )?;
    unchanged(&*store, &before, "a create with a taken alias")?;
    same(
        "the alias after a refused create",
        ok("key_id_for_alias", store.key_id_for_alias("a"))?,
        Some(k.id),
    )
}

fn create_batch(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, store) = open(f)?;
    let taken = key(id(1), Some("taken"));
    ok(
        "create_key",
        store.create_key(&taken, &version(taken.id, 1)),
    )?;
    let before = snapshot(&*store);

    let (k2, k3) = (key(id(2), Some("b")), key(id(3), Some("c")));
    type Expected = fn(&StoreError) -> bool;
    let clashes: [(&str, KeyRecord, Expected); 4] = [
        (
            "a stored alias",
            key(id(4), Some("taken")),
            |e| matches!(e, StoreError::AliasTaken(a) if a == "taken"),
        ),
        ("a stored id", key(id(1), None), |e| {
            matches!(e, StoreError::KeyExists(_))
        }),
        (
            "an alias earlier in the batch",
            key(id(4), Some("b")),
            |e| matches!(e, StoreError::AliasTaken(a) if a == "b"),
        ),
        (
            "an id earlier in the batch",
            key(id(2), None),
            |e| matches!(e, StoreError::KeyExists(i) if *i == id(2)),
        ),
    ];
    for (what, bad, expected) in &clashes {
        let (v2, v3, vb) = (version(k2.id, 1), version(k3.id, 1), version(bad.id, 1));
        let result = store.create_keys(&[(&k2, &v2), (&k3, &v3), (bad, &vb)]);
        ensure(result.as_ref().err().is_some_and(expected), || {
            format!("a batch clashing with {what}: got {result:?}")
        })?;
        unchanged(&*store, &before, &format!("a batch clashing with {what}"))?;
        same(
            "an alias of a refused batch",
            ok("key_id_for_alias", store.key_id_for_alias("b"))?,
            None,
        )?;
    }
    let (v2, wrong) = (version(k2.id, 1), version(k3.id, 2));
    refused!(
        "a batch with an inconsistent record",
        store.create_keys(&[(&k2, &v2), (&k3, &wrong)]),
        StoreError::Corrupt(_)
    )?;
    unchanged(&*store, &before, "a batch with an inconsistent record")?;

    let batch: Vec<(KeyRecord, VersionRecord)> = (2..=40u8)
        .map(|n| {
            let alias = format!("bulk/{n}");
            let k = key(id(n), (n % 2 == 0).then_some(alias.as_str()));
            let v = version(k.id, 1);
            (k, v)
        })
        .collect();
    let pairs: Vec<_> = batch.iter().map(|(k, v)| (k, v)).collect();
    ok("create_keys", store.create_keys(&pairs))?;
    same("keys after a batch", all(&*store)?.len(), 40)?;
    for (k, v) in &batch {
        same(
            "a key of the batch",
            ok("get_key", store.get_key(k.id))?,
            Some(k.clone()),
        )?;
        same(
            "a version of the batch",
            ok("list_versions", store.list_versions(k.id))?,
            vec![v.clone()],
        )?;
        if let Some(alias) = &k.alias {
            same(
                "an alias of the batch",
                ok("key_id_for_alias", store.key_id_for_alias(alias))?,
                Some(k.id),
            )?;
        }
    }
    Ok(())
}

fn list_keys_paging(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, store) = open(f)?;
    let keys: Vec<(KeyRecord, VersionRecord)> = (0..45)
        .map(|n| {
            let k = key(KeyId::new_random(), Some(&format!("k{n}")));
            let v = version(k.id, 1);
            (k, v)
        })
        .collect();
    let pairs: Vec<_> = keys.iter().map(|(k, v)| (k, v)).collect();
    ok("create_keys", store.create_keys(&pairs))?;
    let mut ids: Vec<KeyId> = keys.iter().map(|(k, _)| k.id).collect();
    ids.sort_by_key(|i| *i.as_bytes());

    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = ok(
            "list_keys",
            store.list_keys(&KeyFilter::default(), cursor, 10),
        )?;
        ensure(page.len() <= 10, || {
            format!("a page of {} keys", page.len())
        })?;
        let Some(last) = page.last() else { break };
        cursor = Some(last.id);
        seen.extend(page.iter().map(|k| k.id));
        ensure(seen.len() <= ids.len(), || "paging does not end".to_owned())?;
    }
    same("the keys seen by paging", &seen, &ids)?;
    same(
        "limit 0",
        ok("list_keys", store.list_keys(&KeyFilter::default(), None, 0))?,
        vec![],
    )?;
    let (Some(&last), Some(&before_last)) = (ids.last(), ids.iter().rev().nth(1)) else {
        return Err("no keys".to_owned());
    };
    same(
        "after the last key",
        ok(
            "list_keys",
            store.list_keys(&KeyFilter::default(), Some(last), 10),
        )?,
        vec![],
    )?;
    let tail = ok(
        "list_keys",
        store.list_keys(&KeyFilter::default(), Some(before_last), 10),
    )?;
    same(
        "after the last key but one",
        tail.iter().map(|k| k.id).collect::<Vec<_>>(),
        vec![last],
    )?;
    // start_after an id that is not stored: the keys above it.
    let mut probe = *before_last.as_bytes();
    if let Some(low) = probe.last_mut() {
        *low = low.wrapping_add(1);
    }
    if probe != *last.as_bytes() && probe > *before_last.as_bytes() {
        let got = ok(
            "list_keys",
            store.list_keys(&KeyFilter::default(), Some(KeyId::from_bytes(probe)), 10),
        )?;
        same(
            "after an id that is not stored",
            got.iter().map(|k| k.id).collect::<Vec<_>>(),
            vec![last],
        )?;
    }
    Ok(())
}

fn list_keys_filters(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, store) = open(f)?;
    for (n, alias) in [
        (1, Some("app/x")),
        (2, Some("app/y")),
        (3, None),
        (4, Some("db/z")),
    ] {
        ok(
            "create_key",
            store.create_key(&key(id(n), alias), &version(id(n), 1)),
        )?;
    }
    let k2 = key(id(2), Some("app/y"));
    let mut disabled = k2.clone();
    disabled.state = KeyState::Disabled;
    ok(
        "compare_and_swap_key",
        store.compare_and_swap_key(&k2, &disabled),
    )?;
    let ids = |filter: &KeyFilter, after: Option<KeyId>, limit: usize| {
        let mut got: Vec<KeyId> = ok("list_keys", store.list_keys(filter, after, limit))?
            .iter()
            .map(|k| k.id)
            .collect();
        got.sort_by_key(|i| *i.as_bytes());
        Ok::<_, String>(got)
    };
    let expect = |ns: &[u8]| {
        let mut want: Vec<KeyId> = ns.iter().map(|n| id(*n)).collect();
        want.sort_by_key(|i| *i.as_bytes());
        want
    };
    let prefix = |p: &str| KeyFilter {
        alias_prefix: Some(p.to_owned()),
        ..KeyFilter::default()
    };
    let state = |s| KeyFilter {
        state: Some(s),
        ..KeyFilter::default()
    };
    let both = KeyFilter {
        state: Some(KeyState::Enabled),
        alias_prefix: Some("app/".to_owned()),
    };
    same(
        "no filter",
        ids(&KeyFilter::default(), None, 10)?,
        expect(&[1, 2, 3, 4]),
    )?;
    same(
        "prefix app/",
        ids(&prefix("app/"), None, 10)?,
        expect(&[1, 2]),
    )?;
    same(
        "the empty prefix",
        ids(&prefix(""), None, 10)?,
        expect(&[1, 2, 4]),
    )?;
    same(
        "DISABLED",
        ids(&state(KeyState::Disabled), None, 10)?,
        expect(&[2]),
    )?;
    same(
        "ENABLED",
        ids(&state(KeyState::Enabled), None, 10)?,
        expect(&[1, 3, 4]),
    )?;
    same("ENABLED and app/", ids(&both, None, 10)?, expect(&[1]))?;
    same("limit 0", ids(&prefix("app/"), None, 0)?, vec![])?;
    same("limit 1", ids(&prefix("app/"), None, 1)?.len(), 1)?;
    // Paging after a key the filter rejects (key 3 has no alias).
    let enabled = sorted(vec![
        key(id(1), Some("app/x")),
        key(id(3), None),
        key(id(4), Some("db/z")),
    ]);
    for after in [id(2), id(3)] {
        let want: Vec<KeyId> = enabled
            .iter()
            .filter(|k| *k.id.as_bytes() > *after.as_bytes())
            .map(|k| k.id)
            .collect();
        let got: Vec<KeyId> = ok(
            "list_keys",
            store.list_keys(&state(KeyState::Enabled), Some(after), usize::MAX),
        )?
        .iter()
        .map(|k| k.id)
        .collect();
        same("ENABLED after a key", got, want)?;
    }
    Ok(())
}

fn due_index(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, store) = open(f)?;
    // id(3) sorts before id(1), which sorts before id(2).
    let mut a = key(id(1), None);
    a.rotation_period_secs = Some(60);
    a.next_rotation_at = Some(Timestamp(300));
    let mut b = key(id(2), None);
    b.rotation_period_secs = Some(60);
    b.next_rotation_at = Some(Timestamp(-100));
    let mut c = key(id(3), None);
    c.rotation_period_secs = Some(60);
    c.next_rotation_at = Some(Timestamp(300));
    let mut never = key(id(4), None);
    never.next_rotation_at = None;
    for k in [&a, &b, &c, &never] {
        ok("create_key", store.create_key(k, &version(k.id, 1)))?;
    }
    same("due at i64::MIN", due_ids(&*store, i64::MIN, 10)?, vec![])?;
    same("due at -101", due_ids(&*store, -101, 10)?, vec![])?;
    same("due at 299", due_ids(&*store, 299, 10)?, vec![id(2)])?;
    same(
        "due at 300, a tie in id order",
        due_ids(&*store, 300, 10)?,
        vec![id(2), id(3), id(1)],
    )?;
    same(
        "due at 300, limit 2",
        due_ids(&*store, 300, 2)?,
        vec![id(2), id(3)],
    )?;
    same("limit 0", due_ids(&*store, i64::MAX, 0)?, vec![])?;
    same(
        "due_keys returns the records",
        ok("due_keys", store.due_keys(Timestamp(-100), 10))?,
        vec![b.clone()],
    )?;

    // A rotation moves the schedule in the same write.
    let mut a2 = a.clone();
    a2.primary_version = 2;
    a2.next_rotation_at = Some(Timestamp(360));
    ok("add_version", store.add_version(&a, &a2, &version(a.id, 2)))?;
    same(
        "due at 300 after a rotation",
        due_ids(&*store, 300, 10)?,
        vec![id(2), id(3)],
    )?;
    // DISABLED is never due; PENDING_DELETION is due at deletion_at.
    let mut b2 = b.clone();
    b2.state = KeyState::Disabled;
    ok("compare_and_swap_key", store.compare_and_swap_key(&b, &b2))?;
    same(
        "due after disabling",
        due_ids(&*store, 300, 10)?,
        vec![id(3)],
    )?;
    let mut b3 = b2.clone();
    b3.state = KeyState::PendingDeletion;
    b3.deletion_at = Some(Timestamp(1000));
    ok("compare_and_swap_key", store.compare_and_swap_key(&b2, &b3))?;
    same("due at 999", due_ids(&*store, 999, 10)?, vec![id(3), id(1)])?;
    same(
        "due at i64::MAX",
        due_ids(&*store, i64::MAX, 10)?,
        vec![id(3), id(1), id(2)],
    )?;
    // Destruction takes the key out of the index.
    ok("destroy_key", store.destroy_key(&b3, &tombstone(&b3, 1000)))?;
    same(
        "due after a destruction",
        due_ids(&*store, i64::MAX, 10)?,
        vec![id(3), id(1)],
    )
}

fn add_version(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, store) = open(f)?;
    let mut k = key(id(1), Some("a"));
    k.rotation_period_secs = Some(60);
    k.next_rotation_at = Some(Timestamp(10));
    ok("create_key", store.create_key(&k, &version(k.id, 1)))?;
    let mut updated = k.clone();
    updated.primary_version = 2;
    updated.next_rotation_at = Some(Timestamp(70));
    ok(
        "add_version",
        store.add_version(&k, &updated, &version(k.id, 2)),
    )?;
    same(
        "the key",
        ok("get_key", store.get_key(k.id))?,
        Some(updated.clone()),
    )?;
    same(
        "the versions",
        ok("list_versions", store.list_versions(k.id))?,
        vec![version(k.id, 1), version(k.id, 2)],
    )?;
    same("due at 69", due_ids(&*store, 69, 10)?, vec![])?;
    same("due at 70", due_ids(&*store, 70, 10)?, vec![k.id])?;
    let k3 = ok("add_version", rotate(&*store, &updated, &version(k.id, 3)))?;
    same("the key", ok("get_key", store.get_key(k.id))?, Some(k3))?;
    same(
        "list_versions ascends",
        ok("list_versions", store.list_versions(k.id))?
            .iter()
            .map(|v| v.version)
            .collect::<Vec<_>>(),
        vec![1, 2, 3],
    )
}

fn add_version_refusals(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, store) = open(f)?;
    let k = key(id(1), Some("a"));
    ok("create_key", store.create_key(&k, &version(k.id, 1)))?;
    let k2 = ok("add_version", rotate(&*store, &k, &version(k.id, 2)))?;
    let before = snapshot(&*store);

    let next = |change: fn(&mut KeyRecord)| {
        let mut u = k2.clone();
        u.primary_version = 3;
        change(&mut u);
        u
    };
    let corrupt: [(&str, KeyRecord, VersionRecord); 6] = [
        ("another key's version", next(|_| {}), version(id(9), 3)),
        (
            "a new alias",
            next(|u| u.alias = Some("b".to_owned())),
            version(k.id, 3),
        ),
        ("a new id", next(|u| u.id = id(2)), version(k.id, 3)),
        (
            "a primary other than the new version",
            next(|u| u.primary_version = 4),
            version(k.id, 3),
        ),
        (
            "an update to DESTROYED",
            next(|u| u.state = KeyState::Destroyed),
            version(k.id, 3),
        ),
        ("a destroyed version", next(|_| {}), {
            let mut v = version(k.id, 3);
            v.destroyed_at = Some(Timestamp(1));
            v
        }),
    ];
    for (what, updated, v) in &corrupt {
        refused!(
            *what,
            store.add_version(&k2, updated, v),
            StoreError::Corrupt(_)
        )?;
        unchanged(&*store, &before, what)?;
    }
    refused!(
        "a stale current",
        rotate(&*store, &k, &version(k.id, 2)),
        StoreError::Conflict(_)
    )?;
    unchanged(&*store, &before, "a rotation from a stale current")?;
    for n in [1, 2, 4, u32::MAX] {
        refused!(
            &format!("version {n} after 2"),
            rotate(&*store, &k2, &version(k.id, n)),
            StoreError::Conflict(_)
        )?;
        unchanged(
            &*store,
            &before,
            "a rotation to a version that is not the next",
        )?;
    }
    let ghost = key(id(9), None);
    refused!(
        "a missing key",
        rotate(&*store, &ghost, &version(ghost.id, 2)),
        StoreError::NoSuchKey(_)
    )?;
    unchanged(&*store, &before, "a rotation of a missing key")
}

fn compare_and_swap(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, store) = open(f)?;
    let k = key(id(1), Some("a"));
    ok("create_key", store.create_key(&k, &version(k.id, 1)))?;
    let mut disabled = k.clone();
    disabled.state = KeyState::Disabled;
    ok(
        "compare_and_swap_key",
        store.compare_and_swap_key(&k, &disabled),
    )?;
    same(
        "the key",
        ok("get_key", store.get_key(k.id))?,
        Some(disabled.clone()),
    )?;
    let before = snapshot(&*store);

    let mut pending = k.clone();
    pending.state = KeyState::PendingDeletion;
    refused!(
        "a stale current",
        store.compare_and_swap_key(&k, &pending),
        StoreError::Conflict(_)
    )?;
    unchanged(&*store, &before, "a stale compare-and-swap")?;
    let ghost = key(id(3), None);
    refused!(
        "a missing key",
        store.compare_and_swap_key(&ghost, &ghost),
        StoreError::NoSuchKey(_)
    )?;
    let change = |f: fn(&mut KeyRecord)| {
        let mut r = disabled.clone();
        f(&mut r);
        r
    };
    let corrupt = [
        ("a new alias", change(|r| r.alias = Some("b".to_owned()))),
        ("a new id", change(|r| r.id = id(2))),
        ("a new primary version", change(|r| r.primary_version = 2)),
        ("DESTROYED", tombstone(&disabled, 5)),
    ];
    for (what, new) in &corrupt {
        refused!(
            *what,
            store.compare_and_swap_key(&disabled, new),
            StoreError::Corrupt(_)
        )?;
        unchanged(&*store, &before, what)?;
    }
    same(
        "a refused new alias",
        ok("key_id_for_alias", store.key_id_for_alias("b"))?,
        None,
    )?;
    same(
        "a refused new id",
        ok("get_key", store.get_key(id(2)))?,
        None,
    )
}

fn destroy(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, store) = open(f)?;
    let mut k = key(id(1), Some("a"));
    k.rotation_period_secs = Some(60);
    k.next_rotation_at = Some(Timestamp(5));
    ok("create_key", store.create_key(&k, &version(k.id, 1)))?;
    let k = ok("add_version", rotate(&*store, &k, &version(k.id, 2)))?;
    let other = key(id(2), None);
    ok(
        "create_key",
        store.create_key(&other, &version(other.id, 1)),
    )?;
    let tomb = tombstone(&k, 42);
    let before = snapshot(&*store);

    let change = |f: fn(&mut KeyRecord)| {
        let mut t = tomb.clone();
        f(&mut t);
        t
    };
    let corrupt = [
        (
            "a tombstone that is not DESTROYED",
            change(|t| t.state = KeyState::Disabled),
        ),
        (
            "a tombstone without destroyed_at",
            change(|t| t.destroyed_at = None),
        ),
        ("a tombstone without the alias", change(|t| t.alias = None)),
        (
            "a tombstone with another primary",
            change(|t| t.primary_version = 1),
        ),
        ("a tombstone with another id", change(|t| t.id = id(2))),
    ];
    for (what, t) in &corrupt {
        refused!(*what, store.destroy_key(&k, t), StoreError::Corrupt(_))?;
        unchanged(&*store, &before, what)?;
    }
    let mut stale = k.clone();
    stale.description = "old".to_owned();
    refused!(
        "a stale current",
        store.destroy_key(&stale, &tomb),
        StoreError::Conflict(_)
    )?;
    let ghost = key(id(9), None);
    refused!(
        "a missing key",
        store.destroy_key(&ghost, &tombstone(&ghost, 1)),
        StoreError::NoSuchKey(_)
    )?;
    unchanged(&*store, &before, "a refused destruction")?;

    ok("destroy_key", store.destroy_key(&k, &tomb))?;
    same(
        "the tombstone",
        ok("get_key", store.get_key(k.id))?,
        Some(tomb.clone()),
    )?;
    let erased: Vec<VersionRecord> = [1, 2]
        .iter()
        .map(|n| {
            let mut v = version(k.id, *n);
            v.wrapped_material.clear();
            v.destroyed_at = Some(Timestamp(42));
            v
        })
        .collect();
    same(
        "the erased versions",
        ok("list_versions", store.list_versions(k.id))?,
        erased.clone(),
    )?;
    same(
        "get_version of an erased version",
        ok("get_version", store.get_version(k.id, 2))?,
        erased.get(1).cloned(),
    )?;
    same(
        "the alias of a destroyed key",
        ok("key_id_for_alias", store.key_id_for_alias("a"))?,
        Some(k.id),
    )?;
    same(
        "due after destruction",
        due_ids(&*store, i64::MAX, 10)?,
        vec![],
    )?;
    same(
        "the other key's versions",
        ok("list_versions", store.list_versions(other.id))?,
        vec![version(other.id, 1)],
    )?;
    refused!(
        "a new key with a destroyed key's alias",
        store.create_key(&key(id(3), Some("a")), &version(id(3), 1)),
        StoreError::AliasTaken(_)
    )?;
    same(
        "DESTROYED keys are listed",
        ok(
            "list_keys",
            store.list_keys(
                &KeyFilter {
                    state: Some(KeyState::Destroyed),
                    alias_prefix: None,
                },
                None,
                10,
            ),
        )?,
        vec![tomb],
    )
}

fn tombstone_is_final(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, store) = open(f)?;
    let k = key(id(1), Some("a"));
    ok("create_key", store.create_key(&k, &version(k.id, 1)))?;
    let tomb = tombstone(&k, 42);
    ok("destroy_key", store.destroy_key(&k, &tomb))?;
    let before = snapshot(&*store);

    let mut revived = tomb.clone();
    revived.state = KeyState::Enabled;
    revived.destroyed_at = None;
    refused!(
        "a compare-and-swap from a tombstone",
        store.compare_and_swap_key(&tomb, &revived),
        StoreError::Corrupt(_)
    )?;
    let mut touched = tomb.clone();
    touched.description = "edited".to_owned();
    refused!(
        "a compare-and-swap of a tombstone to a tombstone",
        store.compare_and_swap_key(&tomb, &touched),
        StoreError::Corrupt(_)
    )?;
    refused!(
        "destroying a tombstone",
        store.destroy_key(&tomb, &tomb),
        StoreError::Corrupt(_)
    )?;
    refused!(
        "rotating a tombstone",
        rotate(&*store, &tomb, &version(k.id, 2)),
        StoreError::Corrupt(_)
    )?;
    let erased = ok("list_versions", store.list_versions(k.id))?
        .first()
        .cloned()
        .ok_or("no version after destruction")?;
    let mut rewrapped = erased.clone();
    rewrapped.wrapped_material = vec![1; 60];
    refused!(
        "re-wrapping an erased version",
        store.rewrap_version(&erased, &rewrapped),
        StoreError::Conflict(_)
    )?;
    // A caller holding the version as it was before the destruction.
    let live = version(k.id, 1);
    let mut rewrapped = live.clone();
    rewrapped.hsm_root_key_id = 8;
    refused!(
        "re-wrapping a version erased since it was read",
        store.rewrap_version(&live, &rewrapped),
        StoreError::Conflict(_)
    )?;
    unchanged(&*store, &before, "a change of a tombstone")
}

fn rewrap(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, store) = open(f)?;
    let k = key(id(1), None);
    ok("create_key", store.create_key(&k, &version(k.id, 1)))?;
    let current = version(k.id, 1);
    let mut new = current.clone();
    new.hsm_root_key_id = 8;
    new.wrapped_material = vec![0xab; 61];
    let before = snapshot(&*store);

    let change = |f: fn(&mut VersionRecord)| {
        let mut v = new.clone();
        f(&mut v);
        v
    };
    let corrupt = [
        ("an empty material", change(|v| v.wrapped_material.clear())),
        (
            "a new creation time",
            change(|v| v.created_at = Timestamp(1)),
        ),
        ("a new version number", change(|v| v.version = 2)),
        ("a new key id", change(|v| v.key_id = id(2))),
        (
            "a destruction time",
            change(|v| v.destroyed_at = Some(Timestamp(1))),
        ),
        (
            "an HSM object",
            change(|v| v.hsm_object = Some("object".to_owned())),
        ),
    ];
    for (what, bad) in &corrupt {
        refused!(
            *what,
            store.rewrap_version(&current, bad),
            StoreError::Corrupt(_)
        )?;
        unchanged(&*store, &before, what)?;
    }
    let mut stale = current.clone();
    stale.hsm_root_key_id = 6;
    let mut from_stale = new.clone();
    from_stale.hsm_root_key_id = 8;
    refused!(
        "a stale current",
        store.rewrap_version(&stale, &from_stale),
        StoreError::Conflict(_)
    )?;
    let missing = version(k.id, 2);
    let mut missing_new = missing.clone();
    missing_new.hsm_root_key_id = 8;
    refused!(
        "a missing version",
        store.rewrap_version(&missing, &missing_new),
        StoreError::NoSuchVersion(i, 2) if *i == k.id
    )?;
    unchanged(&*store, &before, "a refused re-wrap")?;

    ok("rewrap_version", store.rewrap_version(&current, &new))?;
    same(
        "the re-wrapped version",
        ok("get_version", store.get_version(k.id, 1))?,
        Some(new.clone()),
    )?;
    same(
        "the key record",
        ok("get_key", store.get_key(k.id))?,
        Some(k),
    )?;
    refused!(
        "the version as it was before the re-wrap",
        store.rewrap_version(&current, &new),
        StoreError::Conflict(_)
    )
}

fn root_rotation_work_list(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, store) = open(f)?;
    for n in 1..=3 {
        let k = key(id(n), None);
        ok("create_key", store.create_key(&k, &version(k.id, 1)))?;
        ok("add_version", rotate(&*store, &k, &version(k.id, 2)))?;
    }
    // Key 2 destroyed; version 1 of key 3 already under root 8; key 4's
    // only version held by the HSM, wrapped by no root key.
    let k2 = ok("get_key", store.get_key(id(2)))?.ok_or("key 2 is missing")?;
    ok("destroy_key", store.destroy_key(&k2, &tombstone(&k2, 1)))?;
    let mut moved = version(id(3), 1);
    moved.hsm_root_key_id = 8;
    ok(
        "rewrap_version",
        store.rewrap_version(&version(id(3), 1), &moved),
    )?;
    let mut in_hsm = version(id(4), 1);
    in_hsm.hsm_root_key_id = 0;
    in_hsm.wrapped_material.clear();
    in_hsm.hsm_object = Some(crate::model::hsm_object_name(id(4), 1));
    ok("create_key", store.create_key(&key(id(4), None), &in_hsm))?;

    let mut expected = vec![(id(1), 1), (id(1), 2), (id(3), 2)];
    expected.sort_by_key(|(i, n)| (*i.as_bytes(), *n));
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = ok(
            "versions_not_under_root",
            store.versions_not_under_root(8, cursor, 2),
        )?;
        ensure(page.len() <= 2, || {
            format!("a page of {} versions", page.len())
        })?;
        let Some(last) = page.last() else { break };
        cursor = Some((last.key_id, last.version));
        seen.extend(page.iter().map(|v| (v.key_id, v.version)));
        ensure(seen.len() <= expected.len(), || {
            format!("paging returned more than expected: {seen:?}")
        })?;
    }
    same("the work list for root 8", seen, expected)?;
    same(
        "limit 0",
        ok(
            "versions_not_under_root",
            store.versions_not_under_root(8, None, 0),
        )?,
        vec![],
    )?;
    same(
        "count_versions(8)",
        ok("count_versions", store.count_versions(8))?,
        VersionCounts {
            live: 5,
            not_under_root: 3,
            destroyed: 2,
        },
    )?;
    same(
        "count_versions(7)",
        ok("count_versions", store.count_versions(7))?,
        VersionCounts {
            live: 5,
            not_under_root: 1,
            destroyed: 2,
        },
    )
}

fn compact(f: &dyn StoreFactory) -> Result<(), String> {
    let (mut s, store) = open(f)?;
    let k = key(id(1), Some("a"));
    ok("create_key", store.create_key(&k, &version(k.id, 1)))?;
    let k = ok("add_version", rotate(&*store, &k, &version(k.id, 2)))?;
    let doomed = key(id(2), Some("b"));
    ok(
        "create_key",
        store.create_key(&doomed, &version(doomed.id, 1)),
    )?;
    ok(
        "destroy_key",
        store.destroy_key(&doomed, &tombstone(&doomed, 9)),
    )?;
    let secret = WrappedSecret {
        hsm_root_key_id: 7,
        wrapped: vec![3; 40],
    };
    ok("put_secret", store.put_secret("audit", &secret))?;
    let before = snapshot(&*store);

    ok("compact", store.compact())?;
    s.check_compacted()?;
    unchanged(&*store, &before, "compact")?;
    same(
        "the secrets after compact",
        ok("list_secrets", store.list_secrets())?,
        vec![("audit".to_owned(), secret)],
    )?;
    same(
        "an alias after compact",
        ok("key_id_for_alias", store.key_id_for_alias("b"))?,
        Some(doomed.id),
    )?;
    let k3 = ok("add_version", rotate(&*store, &k, &version(k.id, 3)))?;
    let after = snapshot(&*store);
    drop(store);
    ok("reopen", s.reopen())?;
    let store = s.handle();
    unchanged(&*store, &after, "a reopen after compact")?;
    same(
        "a write after compact",
        ok("get_key", store.get_key(k.id))?,
        Some(k3),
    )?;
    ok("compact", store.compact())?;
    s.check_compacted()?;
    unchanged(&*store, &after, "a second compact")
}

fn secrets(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, store) = open(f)?;
    let k = key(id(1), None);
    ok("create_key", store.create_key(&k, &version(k.id, 1)))?;
    let before = snapshot(&*store);
    same(
        "no secrets",
        ok("list_secrets", store.list_secrets())?,
        vec![],
    )?;
    same(
        "an absent secret",
        ok("get_secret", store.get_secret("audit"))?,
        None,
    )?;
    let one = |n: u8| WrappedSecret {
        hsm_root_key_id: 7,
        wrapped: vec![n; 48],
    };
    ok("put_secret", store.put_secret("audit", &one(1)))?;
    ok("put_secret", store.put_secret("audit/hmac", &one(2)))?;
    same(
        "get_secret",
        ok("get_secret", store.get_secret("audit"))?,
        Some(one(1)),
    )?;
    ok("put_secret", store.put_secret("audit", &one(3)))?;
    same(
        "a replaced secret",
        ok("get_secret", store.get_secret("audit"))?,
        Some(one(3)),
    )?;
    let mut listed = ok("list_secrets", store.list_secrets())?;
    listed.sort_by(|a, b| a.0.cmp(&b.0));
    same(
        "list_secrets",
        listed,
        vec![
            ("audit".to_owned(), one(3)),
            ("audit/hmac".to_owned(), one(2)),
        ],
    )?;
    same(
        "a secret whose name is a prefix of another's",
        ok("get_secret", store.get_secret("aud"))?,
        None,
    )?;
    unchanged(&*store, &before, "storing service secrets")
}

fn durable(f: &dyn StoreFactory) -> Result<(), String> {
    let (mut s, store) = open(f)?;
    let mut a = key(id(1), Some("a"));
    a.rotation_period_secs = Some(60);
    a.next_rotation_at = Some(Timestamp(50));
    ok("create_key", store.create_key(&a, &version(a.id, 1)))?;
    let a2 = ok("add_version", rotate(&*store, &a, &version(a.id, 2)))?;
    let b = key(id(2), None);
    let c = key(id(3), Some("c"));
    ok(
        "create_keys",
        store.create_keys(&[(&b, &version(b.id, 1)), (&c, &version(c.id, 1))]),
    )?;
    let mut disabled = b.clone();
    disabled.state = KeyState::Disabled;
    ok(
        "compare_and_swap_key",
        store.compare_and_swap_key(&b, &disabled),
    )?;
    ok("destroy_key", store.destroy_key(&c, &tombstone(&c, 77)))?;
    let mut moved = version(a.id, 1);
    moved.hsm_root_key_id = 8;
    ok(
        "rewrap_version",
        store.rewrap_version(&version(a.id, 1), &moved),
    )?;
    let secret = WrappedSecret {
        hsm_root_key_id: 8,
        wrapped: vec![5; 32],
    };
    ok("put_secret", store.put_secret("audit", &secret))?;
    let before = snapshot(&*store);
    drop(store);

    ok("reopen", s.reopen())?;
    let store = s.handle();
    unchanged(&*store, &before, "a reopen")?;
    same(
        "the rotated key",
        ok("get_key", store.get_key(a.id))?,
        Some(a2),
    )?;
    same(
        "an alias",
        ok("key_id_for_alias", store.key_id_for_alias("a"))?,
        Some(a.id),
    )?;
    same(
        "a destroyed key's alias",
        ok("key_id_for_alias", store.key_id_for_alias("c"))?,
        Some(c.id),
    )?;
    same("the due index", due_ids(&*store, i64::MAX, 10)?, vec![a.id])?;
    same(
        "a secret",
        ok("get_secret", store.get_secret("audit"))?,
        Some(secret),
    )?;
    // And the reopened store takes writes.
    let e = key(id(4), None);
    ok("create_key", store.create_key(&e, &version(e.id, 1)))
}
