//! Checks of key creation: [`KeyStore::create_key`] and
//! [`KeyStore::create_keys`], what they store and what they refuse.

#[cfg(doc)]
use crate::store::KeyStore;

use super::fixtures::{id, key, snapshot, tombstone, version};
use super::{Check, StoreFactory, all, due_ids, ensure, ok, open, same, sorted, unchanged};
use crate::model::{KeyRecord, Timestamp, VersionRecord};
use crate::store::StoreError;

pub(super) const CREATE: Check = Check {
    name: "create_key stores the key, its version, its alias and its due entry; \
           unknown ids, versions and aliases read as absent",
    run: |f| Box::pin(create(f)),
};
pub(super) const CREATE_INCONSISTENT: Check = Check {
    name: "create_key: a version of another number or key, a DESTROYED key or a destroyed \
           version is Corrupt and writes nothing",
    run: |f| Box::pin(create_inconsistent(f)),
};
pub(super) const CREATE_CLASHES: Check = Check {
    name: "create_key: a taken id is KeyExists, a taken alias AliasTaken; neither writes anything",
    run: |f| Box::pin(create_clashes(f)),
};
pub(super) const CREATE_BATCH: Check = Check {
    name: "create_keys writes a whole batch or none of it: a clash with the store or within \
           the batch, or an inconsistent record, refuses it all",
    run: |f| Box::pin(create_batch(f)),
};

async fn create(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, store) = open(f).await?;
    let mut k = key(id(1), Some("alias/payments"));
    k.rotation_period_secs = Some(60);
    k.next_rotation_at = Some(Timestamp(100));
    let v = version(k.id, 1);
    ok("create_key", store.create_key(&k, &v).await)?;
    let plain = key(id(2), None);
    ok(
        "create_key",
        store.create_key(&plain, &version(plain.id, 1)).await,
    )?;

    same(
        "get_key",
        ok("get_key", store.get_key(k.id).await)?,
        Some(k.clone()),
    )?;
    same(
        "get_version",
        ok("get_version", store.get_version(k.id, 1).await)?,
        Some(v.clone()),
    )?;
    same(
        "list_versions",
        ok("list_versions", store.list_versions(k.id).await)?,
        vec![v],
    )?;
    same(
        "key_id_for_alias",
        ok(
            "key_id_for_alias",
            store.key_id_for_alias("alias/payments").await,
        )?,
        Some(k.id),
    )?;
    same("due at 100", due_ids(&*store, 100, 10).await?, vec![k.id])?;
    same("due at 99", due_ids(&*store, 99, 10).await?, vec![])?;
    same(
        "list_keys",
        all(&*store).await?,
        sorted(vec![k.clone(), plain]),
    )?;

    same(
        "get_key of an unknown id",
        ok("get_key", store.get_key(id(3)).await)?,
        None,
    )?;
    same(
        "get_version of an unknown version",
        ok("get_version", store.get_version(k.id, 2).await)?,
        None,
    )?;
    same(
        "list_versions of an unknown key",
        ok("list_versions", store.list_versions(id(3)).await)?,
        vec![],
    )?;
    same(
        "key_id_for_alias of an unknown alias",
        ok(
            "key_id_for_alias",
            store.key_id_for_alias("alias/payment").await,
        )?,
        None,
    )
}

async fn create_inconsistent(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, store) = open(f).await?;
    ok(
        "create_key",
        store
            .create_key(&key(id(9), None), &version(id(9), 1))
            .await,
    )?;
    let before = snapshot(&*store).await;
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
        refused!(*what, store.create_key(k, v).await, StoreError::Corrupt(_))?;
        unchanged(&*store, &before, what).await?;
        same(
            "the alias after a refused create",
            ok("key_id_for_alias", store.key_id_for_alias("a").await)?,
            None,
        )?;
    }
    Ok(())
}

async fn create_clashes(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, store) = open(f).await?;
    let k = key(id(1), Some("a"));
    ok("create_key", store.create_key(&k, &version(k.id, 1)).await)?;
    let before = snapshot(&*store).await;

    let mut same_id = key(id(1), Some("b"));
    same_id.description = "impostor".to_owned();
    let mut other_material = version(k.id, 1);
    other_material.wrapped_material = vec![0xee; 60];
    refused!(
        "a second key with the same id",
        store.create_key(&same_id, &other_material).await,
        StoreError::KeyExists(i) if *i == k.id
    )?;
    unchanged(&*store, &before, "a create with a taken id").await?;
    same(
        "the new alias of a refused create",
        ok("key_id_for_alias", store.key_id_for_alias("b").await)?,
        None,
    )?;

    let same_alias = key(id(2), Some("a"));
    refused!(
        "a second key with the same alias",
        store.create_key(&same_alias, &version(same_alias.id, 1)).await,
        StoreError::AliasTaken(a) if a == "a"
    )?;
    unchanged(&*store, &before, "a create with a taken alias").await?;
    same(
        "the alias after a refused create",
        ok("key_id_for_alias", store.key_id_for_alias("a").await)?,
        Some(k.id),
    )
}

async fn create_batch(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, store) = open(f).await?;
    let taken = key(id(1), Some("taken"));
    ok(
        "create_key",
        store.create_key(&taken, &version(taken.id, 1)).await,
    )?;
    let before = snapshot(&*store).await;

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
        let result = store
            .create_keys(&[(&k2, &v2), (&k3, &v3), (bad, &vb)])
            .await;
        ensure(result.as_ref().err().is_some_and(expected), || {
            format!("a batch clashing with {what}: got {result:?}")
        })?;
        unchanged(&*store, &before, &format!("a batch clashing with {what}")).await?;
        same(
            "an alias of a refused batch",
            ok("key_id_for_alias", store.key_id_for_alias("b").await)?,
            None,
        )?;
    }
    let (v2, wrong) = (version(k2.id, 1), version(k3.id, 2));
    refused!(
        "a batch with an inconsistent record",
        store.create_keys(&[(&k2, &v2), (&k3, &wrong)]).await,
        StoreError::Corrupt(_)
    )?;
    unchanged(&*store, &before, "a batch with an inconsistent record").await?;

    let batch: Vec<(KeyRecord, VersionRecord)> = (2..=40u8)
        .map(|n| {
            let alias = format!("bulk/{n}");
            let k = key(id(n), (n % 2 == 0).then_some(alias.as_str()));
            let v = version(k.id, 1);
            (k, v)
        })
        .collect();
    let pairs: Vec<_> = batch.iter().map(|(k, v)| (k, v)).collect();
    ok("create_keys", store.create_keys(&pairs).await)?;
    same("keys after a batch", all(&*store).await?.len(), 40)?;
    for (k, v) in &batch {
        same(
            "a key of the batch",
            ok("get_key", store.get_key(k.id).await)?,
            Some(k.clone()),
        )?;
        same(
            "a version of the batch",
            ok("list_versions", store.list_versions(k.id).await)?,
            vec![v.clone()],
        )?;
        if let Some(alias) = &k.alias {
            same(
                "an alias of the batch",
                ok("key_id_for_alias", store.key_id_for_alias(alias).await)?,
                Some(k.id),
            )?;
        }
    }
    Ok(())
}
