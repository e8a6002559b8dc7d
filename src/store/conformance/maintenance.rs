//! Checks of what the service does to the store as a whole: the
//! root-rotation work list and counts, compaction, the service secrets, and
//! durability across a reopen.

#[cfg(doc)]
use crate::store::KeyStore;

use super::fixtures::{id, key, rotate, snapshot, tombstone, version};
use super::{Check, StoreFactory, due_ids, ensure, ok, open, same, unchanged};
use crate::model::{KeyState, Timestamp};
use crate::store::{VersionCounts, WrappedSecret};

pub(super) const ROOT_ROTATION_WORK_LIST: Check = Check {
    name: "versions_not_under_root pages live versions under another root key in (id, \
           version) order; count_versions agrees",
    run: |f| Box::pin(root_rotation_work_list(f)),
};
pub(super) const COMPACT: Check = Check {
    name: "compact leaves every record as it was, and the store writable",
    run: |f| Box::pin(compact(f)),
};
pub(super) const SECRETS: Check = Check {
    name: "service secrets: put stores or replaces, get reads, list_secrets lists every one; \
           keys are untouched",
    run: |f| Box::pin(secrets(f)),
};
pub(super) const SECRETS_CREATE_AND_SWAP: Check = Check {
    name: "service secrets: create_secret stores only if absent and returns the stored one; \
           swap_secret replaces only from the current value",
    run: |f| Box::pin(secrets_create_and_swap(f)),
};
pub(super) const ROOT_FENCE: Check = Check {
    name: "fence_root_keys retires old root keys only once nothing live is under them, and \
           from then on (across a reopen) refuses versions and secrets wrapped under them",
    run: |f| Box::pin(root_fence(f)),
};
pub(super) const DURABLE: Check = Check {
    name: "every acknowledged change survives a reopen",
    run: |f| Box::pin(durable(f)),
};

async fn root_rotation_work_list(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, store) = open(f).await?;
    for n in 1..=3 {
        let k = key(id(n), None);
        ok("create_key", store.create_key(&k, &version(k.id, 1)).await)?;
        ok("add_version", rotate(&*store, &k, &version(k.id, 2)).await)?;
    }
    // Key 2 destroyed; version 1 of key 3 already under root 8; key 4's
    // only version held by the HSM, wrapped by no root key.
    let k2 = ok("get_key", store.get_key(id(2)).await)?.ok_or("key 2 is missing")?;
    ok(
        "destroy_key",
        store.destroy_key(&k2, &tombstone(&k2, 1)).await,
    )?;
    let mut moved = version(id(3), 1);
    moved.hsm_root_key_id = 8;
    ok(
        "rewrap_version",
        store.rewrap_version(&version(id(3), 1), &moved).await,
    )?;
    let mut in_hsm = version(id(4), 1);
    in_hsm.hsm_root_key_id = 0;
    in_hsm.wrapped_material.clear();
    in_hsm.hsm_object = Some(crate::model::hsm_object_name(id(4), 1, &[7; 8]));
    ok(
        "create_key",
        store.create_key(&key(id(4), None), &in_hsm).await,
    )?;

    let mut expected = vec![(id(1), 1), (id(1), 2), (id(3), 2)];
    expected.sort_by_key(|(i, n)| (*i.as_bytes(), *n));
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = ok(
            "versions_not_under_root",
            store.versions_not_under_root(8, cursor, 2).await,
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
            store.versions_not_under_root(8, None, 0).await,
        )?,
        vec![],
    )?;
    same(
        "count_versions(8)",
        ok("count_versions", store.count_versions(8).await)?,
        VersionCounts {
            live: 5,
            not_under_root: 3,
            destroyed: 2,
        },
    )?;
    same(
        "count_versions(7)",
        ok("count_versions", store.count_versions(7).await)?,
        VersionCounts {
            live: 5,
            not_under_root: 1,
            destroyed: 2,
        },
    )
}

async fn compact(f: &dyn StoreFactory) -> Result<(), String> {
    let (mut s, store) = open(f).await?;
    let k = key(id(1), Some("a"));
    ok("create_key", store.create_key(&k, &version(k.id, 1)).await)?;
    let k = ok("add_version", rotate(&*store, &k, &version(k.id, 2)).await)?;
    let doomed = key(id(2), Some("b"));
    ok(
        "create_key",
        store.create_key(&doomed, &version(doomed.id, 1)).await,
    )?;
    ok(
        "destroy_key",
        store.destroy_key(&doomed, &tombstone(&doomed, 9)).await,
    )?;
    let secret = WrappedSecret {
        hsm_root_key_id: 7,
        wrapped: vec![3; 40],
    };
    ok("put_secret", store.put_secret("audit", &secret).await)?;
    let before = snapshot(&*store).await;

    ok("compact", store.compact().await)?;
    s.check_compacted()?;
    unchanged(&*store, &before, "compact").await?;
    same(
        "the secrets after compact",
        ok("list_secrets", store.list_secrets().await)?,
        vec![("audit".to_owned(), secret)],
    )?;
    same(
        "an alias after compact",
        ok("key_id_for_alias", store.key_id_for_alias("b").await)?,
        Some(doomed.id),
    )?;
    let k3 = ok("add_version", rotate(&*store, &k, &version(k.id, 3)).await)?;
    let after = snapshot(&*store).await;
    drop(store);
    ok("reopen", s.reopen().await)?;
    let store = s.handle();
    unchanged(&*store, &after, "a reopen after compact").await?;
    same(
        "a write after compact",
        ok("get_key", store.get_key(k.id).await)?,
        Some(k3),
    )?;
    ok("compact", store.compact().await)?;
    s.check_compacted()?;
    unchanged(&*store, &after, "a second compact").await
}

async fn secrets(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, store) = open(f).await?;
    let k = key(id(1), None);
    ok("create_key", store.create_key(&k, &version(k.id, 1)).await)?;
    let before = snapshot(&*store).await;
    same(
        "no secrets",
        ok("list_secrets", store.list_secrets().await)?,
        vec![],
    )?;
    same(
        "an absent secret",
        ok("get_secret", store.get_secret("audit").await)?,
        None,
    )?;
    let one = |n: u8| WrappedSecret {
        hsm_root_key_id: 7,
        wrapped: vec![n; 48],
    };
    ok("put_secret", store.put_secret("audit", &one(1)).await)?;
    ok("put_secret", store.put_secret("audit/hmac", &one(2)).await)?;
    same(
        "get_secret",
        ok("get_secret", store.get_secret("audit").await)?,
        Some(one(1)),
    )?;
    ok("put_secret", store.put_secret("audit", &one(3)).await)?;
    same(
        "a replaced secret",
        ok("get_secret", store.get_secret("audit").await)?,
        Some(one(3)),
    )?;
    let mut listed = ok("list_secrets", store.list_secrets().await)?;
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
        ok("get_secret", store.get_secret("aud").await)?,
        None,
    )?;
    unchanged(&*store, &before, "storing service secrets").await
}

async fn secrets_create_and_swap(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, store) = open(f).await?;
    let one = |n: u8| WrappedSecret {
        hsm_root_key_id: 7,
        wrapped: vec![n; 48],
    };
    same(
        "create_secret on an absent name returns it",
        ok("create_secret", store.create_secret("audit", &one(1)).await)?,
        one(1),
    )?;
    same(
        "create_secret on a stored name returns the stored one",
        ok("create_secret", store.create_secret("audit", &one(2)).await)?,
        one(1),
    )?;
    same(
        "the secret after a second create",
        ok("get_secret", store.get_secret("audit").await)?,
        Some(one(1)),
    )?;
    same(
        "swap_secret from the current value",
        ok(
            "swap_secret",
            store.swap_secret("audit", &one(1), &one(3)).await,
        )?,
        true,
    )?;
    same(
        "the swapped secret",
        ok("get_secret", store.get_secret("audit").await)?,
        Some(one(3)),
    )?;
    same(
        "swap_secret from a stale value",
        ok(
            "swap_secret",
            store.swap_secret("audit", &one(1), &one(4)).await,
        )?,
        false,
    )?;
    same(
        "swap_secret of an absent name",
        ok(
            "swap_secret",
            store.swap_secret("absent", &one(1), &one(4)).await,
        )?,
        false,
    )?;
    same(
        "the secrets after refused swaps",
        ok("list_secrets", store.list_secrets().await)?,
        vec![("audit".to_owned(), one(3))],
    )
}

async fn root_fence(f: &dyn StoreFactory) -> Result<(), String> {
    use crate::store::StoreError;
    let (mut s, store) = open(f).await?;
    // Root key 7 (the fixtures'), then a rotation to 9.
    let a = key(id(1), None);
    ok("create_key", store.create_key(&a, &version(a.id, 1)).await)?;
    let old_secret = WrappedSecret {
        hsm_root_key_id: 7,
        wrapped: vec![1; 48],
    };
    ok("put_secret", store.put_secret("audit", &old_secret).await)?;
    same(
        "fence_root_keys with a version and a secret under the old root key",
        ok("fence_root_keys", store.fence_root_keys(9, &[7]).await)?,
        2,
    )?;
    // Refused fence: nothing recorded, root key 7 still writable.
    let b = key(id(2), None);
    ok(
        "create_key under root key 7",
        store.create_key(&b, &version(b.id, 1)).await,
    )?;
    for k in [&a, &b] {
        let current = version(k.id, 1);
        let mut next = current.clone();
        next.hsm_root_key_id = 9;
        next.wrapped_material = vec![9; 60];
        ok(
            "rewrap_version",
            store.rewrap_version(&current, &next).await,
        )?;
    }
    let new_secret = WrappedSecret {
        hsm_root_key_id: 9,
        wrapped: vec![2; 48],
    };
    same(
        "swap_secret to the current root key",
        ok(
            "swap_secret",
            store.swap_secret("audit", &old_secret, &new_secret).await,
        )?,
        true,
    )?;
    same(
        "fence_root_keys once everything is under the current root key",
        ok("fence_root_keys", store.fence_root_keys(9, &[7]).await)?,
        0,
    )?;
    drop(store);
    ok("reopen", s.reopen().await)?;
    let store = s.handle();
    let retired = |what: &str, r: Result<(), StoreError>| match r {
        Err(StoreError::RootKeyRetired(7)) => Ok(()),
        other => Err(format!("{what} under a retired root key: {other:?}")),
    };
    let c = key(id(3), None);
    retired("create_key", store.create_key(&c, &version(c.id, 1)).await)?;
    let mut under_7 = version(a.id, 2);
    under_7.hsm_root_key_id = 7;
    let mut a2 = a.clone();
    a2.primary_version = 2;
    retired("add_version", store.add_version(&a, &a2, &under_7).await)?;
    retired("put_secret", store.put_secret("other", &old_secret).await)?;
    same(
        "the store after refused writes",
        ok("get_key", store.get_key(c.id).await)?,
        None,
    )?;
    let mut under_9 = version(c.id, 1);
    under_9.hsm_root_key_id = 9;
    ok(
        "create_key under the current root key",
        store.create_key(&c, &under_9).await,
    )
}

async fn durable(f: &dyn StoreFactory) -> Result<(), String> {
    let (mut s, store) = open(f).await?;
    let mut a = key(id(1), Some("a"));
    a.rotation_period_secs = Some(60);
    a.next_rotation_at = Some(Timestamp(50));
    ok("create_key", store.create_key(&a, &version(a.id, 1)).await)?;
    let a2 = ok("add_version", rotate(&*store, &a, &version(a.id, 2)).await)?;
    let b = key(id(2), None);
    let c = key(id(3), Some("c"));
    ok(
        "create_keys",
        store
            .create_keys(&[(&b, &version(b.id, 1)), (&c, &version(c.id, 1))])
            .await,
    )?;
    let mut disabled = b.clone();
    disabled.state = KeyState::Disabled;
    ok(
        "compare_and_swap_key",
        store.compare_and_swap_key(&b, &disabled).await,
    )?;
    ok(
        "destroy_key",
        store.destroy_key(&c, &tombstone(&c, 77)).await,
    )?;
    let mut moved = version(a.id, 1);
    moved.hsm_root_key_id = 8;
    ok(
        "rewrap_version",
        store.rewrap_version(&version(a.id, 1), &moved).await,
    )?;
    let secret = WrappedSecret {
        hsm_root_key_id: 8,
        wrapped: vec![5; 32],
    };
    ok("put_secret", store.put_secret("audit", &secret).await)?;
    let before = snapshot(&*store).await;
    drop(store);

    ok("reopen", s.reopen().await)?;
    let store = s.handle();
    unchanged(&*store, &before, "a reopen").await?;
    same(
        "the rotated key",
        ok("get_key", store.get_key(a.id).await)?,
        Some(a2),
    )?;
    same(
        "an alias",
        ok("key_id_for_alias", store.key_id_for_alias("a").await)?,
        Some(a.id),
    )?;
    same(
        "a destroyed key's alias",
        ok("key_id_for_alias", store.key_id_for_alias("c").await)?,
        Some(c.id),
    )?;
    same(
        "the due index",
        due_ids(&*store, i64::MAX, 10).await?,
        vec![a.id],
    )?;
    same(
        "a secret",
        ok("get_secret", store.get_secret("audit").await)?,
        Some(secret),
    )?;
    // And the reopened store takes writes.
    let e = key(id(4), None);
    ok("create_key", store.create_key(&e, &version(e.id, 1)).await)
}
