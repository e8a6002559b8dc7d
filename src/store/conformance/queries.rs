//! Checks of the queries over many keys: [`KeyStore::list_keys`] (paging
//! and filters) and [`KeyStore::due_keys`] (the due index).

use super::fixtures::{id, key, tombstone, version};
use super::{Check, StoreFactory, due_ids, ensure, ok, open, same, sorted};
use crate::model::{KeyId, KeyRecord, KeyState, Timestamp, VersionRecord};
use crate::store::{KeyFilter, KeyStore};

pub(super) const LIST_KEYS_PAGING: Check = Check {
    name: "list_keys: ascending id bytes, strictly after start_after, at most limit; \
           pages visit every key once",
    run: |f| Box::pin(list_keys_paging(f)),
};
pub(super) const LIST_KEYS_FILTERS: Check = Check {
    name: "list_keys filters by state and alias prefix; a key without an alias matches no \
           prefix; start_after need not pass the filter",
    run: |f| Box::pin(list_keys_filters(f)),
};
pub(super) const DUE_INDEX: Check = Check {
    name: "due_keys: due at or before now, earliest first, ties by id, at most limit; \
           follows every write of a key",
    run: |f| Box::pin(due_index(f)),
};

async fn list_keys_paging(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, store) = open(f).await?;
    let keys: Vec<(KeyRecord, VersionRecord)> = (0..45)
        .map(|n| {
            let k = key(KeyId::new_random(), Some(&format!("k{n}")));
            let v = version(k.id, 1);
            (k, v)
        })
        .collect();
    let pairs: Vec<_> = keys.iter().map(|(k, v)| (k, v)).collect();
    ok("create_keys", store.create_keys(&pairs).await)?;
    let mut ids: Vec<KeyId> = keys.iter().map(|(k, _)| k.id).collect();
    ids.sort_by_key(|i| *i.as_bytes());

    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = ok(
            "list_keys",
            store.list_keys(&KeyFilter::default(), cursor, 10).await,
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
        ok(
            "list_keys",
            store.list_keys(&KeyFilter::default(), None, 0).await,
        )?,
        vec![],
    )?;
    let (Some(&last), Some(&before_last)) = (ids.last(), ids.iter().rev().nth(1)) else {
        return Err("no keys".to_owned());
    };
    same(
        "after the last key",
        ok(
            "list_keys",
            store.list_keys(&KeyFilter::default(), Some(last), 10).await,
        )?,
        vec![],
    )?;
    let tail = ok(
        "list_keys",
        store
            .list_keys(&KeyFilter::default(), Some(before_last), 10)
            .await,
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
            store
                .list_keys(&KeyFilter::default(), Some(KeyId::from_bytes(probe)), 10)
                .await,
        )?;
        same(
            "after an id that is not stored",
            got.iter().map(|k| k.id).collect::<Vec<_>>(),
            vec![last],
        )?;
    }
    Ok(())
}

async fn list_keys_filters(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, store) = open(f).await?;
    for (n, alias) in [
        (1, Some("app/x")),
        (2, Some("app/y")),
        (3, None),
        (4, Some("db/z")),
    ] {
        ok(
            "create_key",
            store
                .create_key(&key(id(n), alias), &version(id(n), 1))
                .await,
        )?;
    }
    let k2 = key(id(2), Some("app/y"));
    let mut disabled = k2.clone();
    disabled.state = KeyState::Disabled;
    ok(
        "compare_and_swap_key",
        store.compare_and_swap_key(&k2, &disabled).await,
    )?;
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
        ids(&*store, &KeyFilter::default(), None, 10).await?,
        expect(&[1, 2, 3, 4]),
    )?;
    same(
        "prefix app/",
        ids(&*store, &prefix("app/"), None, 10).await?,
        expect(&[1, 2]),
    )?;
    same(
        "the empty prefix",
        ids(&*store, &prefix(""), None, 10).await?,
        expect(&[1, 2, 4]),
    )?;
    same(
        "DISABLED",
        ids(&*store, &state(KeyState::Disabled), None, 10).await?,
        expect(&[2]),
    )?;
    same(
        "ENABLED",
        ids(&*store, &state(KeyState::Enabled), None, 10).await?,
        expect(&[1, 3, 4]),
    )?;
    same(
        "ENABLED and app/",
        ids(&*store, &both, None, 10).await?,
        expect(&[1]),
    )?;
    same(
        "limit 0",
        ids(&*store, &prefix("app/"), None, 0).await?,
        vec![],
    )?;
    same(
        "limit 1",
        ids(&*store, &prefix("app/"), None, 1).await?.len(),
        1,
    )?;
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
            store
                .list_keys(&state(KeyState::Enabled), Some(after), usize::MAX)
                .await,
        )?
        .iter()
        .map(|k| k.id)
        .collect();
        same("ENABLED after a key", got, want)?;
    }
    Ok(())
}

async fn due_index(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, store) = open(f).await?;
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
        ok("create_key", store.create_key(k, &version(k.id, 1)).await)?;
    }
    same(
        "due at i64::MIN",
        due_ids(&*store, i64::MIN, 10).await?,
        vec![],
    )?;
    same("due at -101", due_ids(&*store, -101, 10).await?, vec![])?;
    same("due at 299", due_ids(&*store, 299, 10).await?, vec![id(2)])?;
    same(
        "due at 300, a tie in id order",
        due_ids(&*store, 300, 10).await?,
        vec![id(2), id(3), id(1)],
    )?;
    same(
        "due at 300, limit 2",
        due_ids(&*store, 300, 2).await?,
        vec![id(2), id(3)],
    )?;
    same("limit 0", due_ids(&*store, i64::MAX, 0).await?, vec![])?;
    same(
        "due_keys returns the records",
        ok("due_keys", store.due_keys(Timestamp(-100), 10).await)?,
        vec![b.clone()],
    )?;

    // A rotation moves the schedule in the same write.
    let mut a2 = a.clone();
    a2.primary_version = 2;
    a2.next_rotation_at = Some(Timestamp(360));
    ok(
        "add_version",
        store.add_version(&a, &a2, &version(a.id, 2)).await,
    )?;
    same(
        "due at 300 after a rotation",
        due_ids(&*store, 300, 10).await?,
        vec![id(2), id(3)],
    )?;
    // DISABLED is never due; PENDING_DELETION is due at deletion_at.
    let mut b2 = b.clone();
    b2.state = KeyState::Disabled;
    ok(
        "compare_and_swap_key",
        store.compare_and_swap_key(&b, &b2).await,
    )?;
    same(
        "due after disabling",
        due_ids(&*store, 300, 10).await?,
        vec![id(3)],
    )?;
    let mut b3 = b2.clone();
    b3.state = KeyState::PendingDeletion;
    b3.deletion_at = Some(Timestamp(1000));
    ok(
        "compare_and_swap_key",
        store.compare_and_swap_key(&b2, &b3).await,
    )?;
    same(
        "due at 999",
        due_ids(&*store, 999, 10).await?,
        vec![id(3), id(1)],
    )?;
    same(
        "due at i64::MAX",
        due_ids(&*store, i64::MAX, 10).await?,
        vec![id(3), id(1), id(2)],
    )?;
    // Destruction takes the key out of the index.
    ok(
        "destroy_key",
        store.destroy_key(&b3, &tombstone(&b3, 1000)).await,
    )?;
    same(
        "due after a destruction",
        due_ids(&*store, i64::MAX, 10).await?,
        vec![id(3), id(1)],
    )
}

/// The ids `list_keys(filter, after, limit)` returns, in byte order.
async fn ids(
    store: &dyn KeyStore,
    filter: &KeyFilter,
    after: Option<KeyId>,
    limit: usize,
) -> Result<Vec<KeyId>, String> {
    let mut got: Vec<KeyId> = ok("list_keys", store.list_keys(filter, after, limit).await)?
        .iter()
        .map(|k| k.id)
        .collect();
    got.sort_by_key(|i| *i.as_bytes());
    Ok(got)
}
