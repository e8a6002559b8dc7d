//! Checks of the changes to stored keys: rotation
//! ([`KeyStore::add_version`]), compare-and-swap, destruction and its
//! finality, re-wrapping; every refusal writes nothing.

#[cfg(doc)]
use crate::store::KeyStore;

use super::fixtures::{id, key, rotate, snapshot, tombstone, version};
use super::{Check, StoreFactory, due_ids, ok, open, same, unchanged};
use crate::model::{KeyRecord, KeyState, Timestamp, VersionRecord};
use crate::store::{KeyFilter, StoreError};

pub(super) const ADD_VERSION: Check = Check {
    name: "add_version adds the version and replaces the key record (schedule included) \
           in one write",
    run: |f| Box::pin(add_version(f)),
};
pub(super) const ADD_VERSION_REFUSALS: Check = Check {
    name: "add_version: inconsistent records are Corrupt, a stale key or a version that is \
           not the next one Conflict, a missing key NoSuchKey; none writes",
    run: |f| Box::pin(add_version_refusals(f)),
};
pub(super) const COMPARE_AND_SWAP: Check = Check {
    name: "compare_and_swap_key replaces an equal stored record; stale is Conflict, missing \
           NoSuchKey, a change of id, alias or primary version or to DESTROYED Corrupt",
    run: |f| Box::pin(compare_and_swap(f)),
};
pub(super) const DESTROY: Check = Check {
    name: "destroy_key stores the tombstone and erases every version; the alias stays \
           taken; refusals write nothing",
    run: |f| Box::pin(destroy(f)),
};
pub(super) const TOMBSTONE_IS_FINAL: Check = Check {
    name: "a tombstone is final: no compare-and-swap, destruction, rotation or re-wrap \
           changes it or its versions",
    run: |f| Box::pin(tombstone_is_final(f)),
};
pub(super) const REWRAP: Check = Check {
    name: "rewrap_version replaces an equal stored version's root key and material only; \
           refusals (Corrupt, Conflict, NoSuchVersion) write nothing",
    run: |f| Box::pin(rewrap(f)),
};

async fn add_version(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, store) = open(f).await?;
    let mut k = key(id(1), Some("a"));
    k.rotation_period_secs = Some(60);
    k.next_rotation_at = Some(Timestamp(10));
    ok("create_key", store.create_key(&k, &version(k.id, 1)).await)?;
    let mut updated = k.clone();
    updated.primary_version = 2;
    updated.next_rotation_at = Some(Timestamp(70));
    ok(
        "add_version",
        store.add_version(&k, &updated, &version(k.id, 2)).await,
    )?;
    same(
        "the key",
        ok("get_key", store.get_key(k.id).await)?,
        Some(updated.clone()),
    )?;
    same(
        "the versions",
        ok("list_versions", store.list_versions(k.id).await)?,
        vec![version(k.id, 1), version(k.id, 2)],
    )?;
    same("due at 69", due_ids(&*store, 69, 10).await?, vec![])?;
    same("due at 70", due_ids(&*store, 70, 10).await?, vec![k.id])?;
    let k3 = ok(
        "add_version",
        rotate(&*store, &updated, &version(k.id, 3)).await,
    )?;
    same(
        "the key",
        ok("get_key", store.get_key(k.id).await)?,
        Some(k3),
    )?;
    same(
        "list_versions ascends",
        ok("list_versions", store.list_versions(k.id).await)?
            .iter()
            .map(|v| v.version)
            .collect::<Vec<_>>(),
        vec![1, 2, 3],
    )
}

async fn add_version_refusals(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, store) = open(f).await?;
    let k = key(id(1), Some("a"));
    ok("create_key", store.create_key(&k, &version(k.id, 1)).await)?;
    let k2 = ok("add_version", rotate(&*store, &k, &version(k.id, 2)).await)?;
    let before = snapshot(&*store).await;

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
            store.add_version(&k2, updated, v).await,
            StoreError::Corrupt(_)
        )?;
        unchanged(&*store, &before, what).await?;
    }
    refused!(
        "a stale current",
        rotate(&*store, &k, &version(k.id, 2)).await,
        StoreError::Conflict(_)
    )?;
    unchanged(&*store, &before, "a rotation from a stale current").await?;
    for n in [1, 2, 4, u32::MAX] {
        refused!(
            &format!("version {n} after 2"),
            rotate(&*store, &k2, &version(k.id, n)).await,
            StoreError::Conflict(_)
        )?;
        unchanged(
            &*store,
            &before,
            "a rotation to a version that is not the next",
        )
        .await?;
    }
    let ghost = key(id(9), None);
    refused!(
        "a missing key",
        rotate(&*store, &ghost, &version(ghost.id, 2)).await,
        StoreError::NoSuchKey(_)
    )?;
    unchanged(&*store, &before, "a rotation of a missing key").await
}

async fn compare_and_swap(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, store) = open(f).await?;
    let k = key(id(1), Some("a"));
    ok("create_key", store.create_key(&k, &version(k.id, 1)).await)?;
    let mut disabled = k.clone();
    disabled.state = KeyState::Disabled;
    ok(
        "compare_and_swap_key",
        store.compare_and_swap_key(&k, &disabled).await,
    )?;
    same(
        "the key",
        ok("get_key", store.get_key(k.id).await)?,
        Some(disabled.clone()),
    )?;
    let before = snapshot(&*store).await;

    let mut pending = k.clone();
    pending.state = KeyState::PendingDeletion;
    refused!(
        "a stale current",
        store.compare_and_swap_key(&k, &pending).await,
        StoreError::Conflict(_)
    )?;
    unchanged(&*store, &before, "a stale compare-and-swap").await?;
    let ghost = key(id(3), None);
    refused!(
        "a missing key",
        store.compare_and_swap_key(&ghost, &ghost).await,
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
            store.compare_and_swap_key(&disabled, new).await,
            StoreError::Corrupt(_)
        )?;
        unchanged(&*store, &before, what).await?;
    }
    same(
        "a refused new alias",
        ok("key_id_for_alias", store.key_id_for_alias("b").await)?,
        None,
    )?;
    same(
        "a refused new id",
        ok("get_key", store.get_key(id(2)).await)?,
        None,
    )
}

async fn destroy(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, store) = open(f).await?;
    let mut k = key(id(1), Some("a"));
    k.rotation_period_secs = Some(60);
    k.next_rotation_at = Some(Timestamp(5));
    ok("create_key", store.create_key(&k, &version(k.id, 1)).await)?;
    let k = ok("add_version", rotate(&*store, &k, &version(k.id, 2)).await)?;
    let other = key(id(2), None);
    ok(
        "create_key",
        store.create_key(&other, &version(other.id, 1)).await,
    )?;
    let tomb = tombstone(&k, 42);
    let before = snapshot(&*store).await;

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
        refused!(
            *what,
            store.destroy_key(&k, t).await,
            StoreError::Corrupt(_)
        )?;
        unchanged(&*store, &before, what).await?;
    }
    let mut stale = k.clone();
    stale.description = "old".to_owned();
    refused!(
        "a stale current",
        store.destroy_key(&stale, &tomb).await,
        StoreError::Conflict(_)
    )?;
    let ghost = key(id(9), None);
    refused!(
        "a missing key",
        store.destroy_key(&ghost, &tombstone(&ghost, 1)).await,
        StoreError::NoSuchKey(_)
    )?;
    unchanged(&*store, &before, "a refused destruction").await?;

    ok("destroy_key", store.destroy_key(&k, &tomb).await)?;
    same(
        "the tombstone",
        ok("get_key", store.get_key(k.id).await)?,
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
        ok("list_versions", store.list_versions(k.id).await)?,
        erased.clone(),
    )?;
    same(
        "get_version of an erased version",
        ok("get_version", store.get_version(k.id, 2).await)?,
        erased.get(1).cloned(),
    )?;
    same(
        "the alias of a destroyed key",
        ok("key_id_for_alias", store.key_id_for_alias("a").await)?,
        Some(k.id),
    )?;
    same(
        "due after destruction",
        due_ids(&*store, i64::MAX, 10).await?,
        vec![],
    )?;
    same(
        "the other key's versions",
        ok("list_versions", store.list_versions(other.id).await)?,
        vec![version(other.id, 1)],
    )?;
    refused!(
        "a new key with a destroyed key's alias",
        store
            .create_key(&key(id(3), Some("a")), &version(id(3), 1))
            .await,
        StoreError::AliasTaken(_)
    )?;
    same(
        "DESTROYED keys are listed",
        ok(
            "list_keys",
            store
                .list_keys(
                    &KeyFilter {
                        state: Some(KeyState::Destroyed),
                        alias_prefix: None,
                    },
                    None,
                    10,
                )
                .await,
        )?,
        vec![tomb],
    )
}

async fn tombstone_is_final(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, store) = open(f).await?;
    let k = key(id(1), Some("a"));
    ok("create_key", store.create_key(&k, &version(k.id, 1)).await)?;
    let tomb = tombstone(&k, 42);
    ok("destroy_key", store.destroy_key(&k, &tomb).await)?;
    let before = snapshot(&*store).await;

    let mut revived = tomb.clone();
    revived.state = KeyState::Enabled;
    revived.destroyed_at = None;
    refused!(
        "a compare-and-swap from a tombstone",
        store.compare_and_swap_key(&tomb, &revived).await,
        StoreError::Corrupt(_)
    )?;
    let mut touched = tomb.clone();
    touched.description = "edited".to_owned();
    refused!(
        "a compare-and-swap of a tombstone to a tombstone",
        store.compare_and_swap_key(&tomb, &touched).await,
        StoreError::Corrupt(_)
    )?;
    refused!(
        "destroying a tombstone",
        store.destroy_key(&tomb, &tomb).await,
        StoreError::Corrupt(_)
    )?;
    refused!(
        "rotating a tombstone",
        rotate(&*store, &tomb, &version(k.id, 2)).await,
        StoreError::Corrupt(_)
    )?;
    let erased = ok("list_versions", store.list_versions(k.id).await)?
        .first()
        .cloned()
        .ok_or("no version after destruction")?;
    let mut rewrapped = erased.clone();
    rewrapped.wrapped_material = vec![1; 60];
    refused!(
        "re-wrapping an erased version",
        store.rewrap_version(&erased, &rewrapped).await,
        StoreError::Conflict(_)
    )?;
    // A caller holding the version as it was before the destruction.
    let live = version(k.id, 1);
    let mut rewrapped = live.clone();
    rewrapped.hsm_root_key_id = 8;
    refused!(
        "re-wrapping a version erased since it was read",
        store.rewrap_version(&live, &rewrapped).await,
        StoreError::Conflict(_)
    )?;
    unchanged(&*store, &before, "a change of a tombstone").await
}

async fn rewrap(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, store) = open(f).await?;
    let k = key(id(1), None);
    ok("create_key", store.create_key(&k, &version(k.id, 1)).await)?;
    let current = version(k.id, 1);
    let mut new = current.clone();
    new.hsm_root_key_id = 8;
    new.wrapped_material = vec![0xab; 61];
    let before = snapshot(&*store).await;

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
            store.rewrap_version(&current, bad).await,
            StoreError::Corrupt(_)
        )?;
        unchanged(&*store, &before, what).await?;
    }
    let mut stale = current.clone();
    stale.hsm_root_key_id = 6;
    let mut from_stale = new.clone();
    from_stale.hsm_root_key_id = 8;
    refused!(
        "a stale current",
        store.rewrap_version(&stale, &from_stale).await,
        StoreError::Conflict(_)
    )?;
    let missing = version(k.id, 2);
    let mut missing_new = missing.clone();
    missing_new.hsm_root_key_id = 8;
    refused!(
        "a missing version",
        store.rewrap_version(&missing, &missing_new).await,
        StoreError::NoSuchVersion(i, 2) if *i == k.id
    )?;
    unchanged(&*store, &before, "a refused re-wrap").await?;

    ok("rewrap_version", store.rewrap_version(&current, &new).await)?;
    same(
        "the re-wrapped version",
        ok("get_version", store.get_version(k.id, 1).await)?,
        Some(new.clone()),
    )?;
    same(
        "the key record",
        ok("get_key", store.get_key(k.id).await)?,
        Some(k),
    )?;
    refused!(
        "the version as it was before the re-wrap",
        store.rewrap_version(&current, &new).await,
        StoreError::Conflict(_)
    )
}
