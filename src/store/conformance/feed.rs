//! Checks of the change feed ([`KeyStore::changes_since`]): each write of
//! a key record takes the next generation, a key is listed once at its
//! last change, refused writes and re-wraps take none, paging, durability,
//! and no gap between two handles writing at once.

use std::collections::BTreeSet;

use super::fixtures::{id, key, rotate, tombstone, version};
use super::races::{race, two_handles};
use super::{Check, StoreFactory, ensure, ok, open, same};
use crate::model::{KeyId, KeyState};
use crate::store::{ChangePage, KeyChange, KeyStore, StoreError};

pub(super) const CHANGE_FEED: Check = Check {
    name: "changes_since lists each changed key once, at the generation of its last change, \
           in order; refused writes and re-wraps take no generation; it pages and survives a \
           reopen",
    run: |f| Box::pin(change_feed(f)),
};
pub(super) const CHANGE_FEED_NO_GAP: Check = Check {
    name: "two handles: concurrent key writes take distinct generations with no gap, and the \
           feed lists every key written",
    run: |f| Box::pin(change_feed_no_gap(f)),
};

async fn feed(store: &dyn KeyStore, after: u64) -> Result<ChangePage, String> {
    ok(
        "changes_since",
        store.changes_since(after, usize::MAX).await,
    )
}

fn entries(page: &ChangePage) -> Vec<(u64, KeyId)> {
    page.changes
        .iter()
        .map(|c| (c.generation, c.key_id))
        .collect()
}

async fn change_feed(f: &dyn StoreFactory) -> Result<(), String> {
    let (mut s, store) = open(f).await?;
    same(
        "an empty store's feed",
        feed(&*store, 0).await?,
        ChangePage::default(),
    )?;
    let k1 = key(id(1), Some("one"));
    ok(
        "create_key",
        store.create_key(&k1, &version(k1.id, 1)).await,
    )?;
    let (k2, k3) = (key(id(2), None), key(id(3), Some("three")));
    ok(
        "create_keys",
        store
            .create_keys(&[(&k2, &version(k2.id, 1)), (&k3, &version(k3.id, 1))])
            .await,
    )?;
    let page = feed(&*store, 0).await?;
    same("head after three creations", page.head, 3)?;
    let created: BTreeSet<KeyId> = page.changes.iter().map(|c| c.key_id).collect();
    same(
        "the keys created",
        created,
        BTreeSet::from([k1.id, k2.id, k3.id]),
    )?;
    same(
        "generations 1 to 3",
        page.changes
            .iter()
            .map(|c| c.generation)
            .collect::<Vec<_>>(),
        vec![1, 2, 3],
    )?;
    same(
        "the first creation",
        page.changes.first().copied(),
        Some(KeyChange {
            generation: 1,
            key_id: k1.id,
        }),
    )?;

    // A change moves the key to the next generation.
    let mut disabled = k1.clone();
    disabled.state = KeyState::Disabled;
    ok(
        "compare_and_swap_key",
        store.compare_and_swap_key(&k1, &disabled).await,
    )?;
    let page = feed(&*store, 0).await?;
    same("head after a change", page.head, 4)?;
    same(
        "a changed key is listed once, at its last change",
        page.changes.last().copied(),
        Some(KeyChange {
            generation: 4,
            key_id: k1.id,
        }),
    )?;
    same("entries after a change", page.changes.len(), 3)?;
    same(
        "changes after 3",
        entries(&feed(&*store, 3).await?),
        vec![(4, k1.id)],
    )?;

    // Refused writes take no generation.
    let mut stale = k1.clone();
    stale.description = "stale".into();
    refused!(
        "a stale compare-and-swap",
        store.compare_and_swap_key(&k1, &stale).await,
        StoreError::Conflict(_)
    )?;
    refused!(
        "a clashing create",
        store.create_key(&k1, &version(k1.id, 1)).await,
        StoreError::KeyExists(_)
    )?;
    same("head after refused writes", feed(&*store, 0).await?.head, 4)?;

    // A rotation and a destruction take one each; a re-wrap none.
    ok(
        "add_version",
        rotate(&*store, &k2, &version(k2.id, 2)).await,
    )?;
    ok(
        "destroy_key",
        store.destroy_key(&k3, &tombstone(&k3, 9)).await,
    )?;
    let mut moved = version(k1.id, 1);
    moved.hsm_root_key_id = 8;
    ok(
        "rewrap_version",
        store.rewrap_version(&version(k1.id, 1), &moved).await,
    )?;
    let page = feed(&*store, 4).await?;
    same(
        "a rotation and a destruction",
        entries(&page),
        vec![(5, k2.id), (6, k3.id)],
    )?;
    same("head after a re-wrap", page.head, 6)?;

    // Paging.
    let first = ok("changes_since", store.changes_since(0, 2).await)?;
    same(
        "a page of two",
        entries(&first),
        vec![(4, k1.id), (5, k2.id)],
    )?;
    same("the head of a page", first.head, 6)?;
    same(
        "the page after",
        entries(&ok("changes_since", store.changes_since(5, 2).await)?),
        vec![(6, k3.id)],
    )?;
    same(
        "nothing after the head",
        entries(&feed(&*store, 6).await?),
        vec![],
    )?;

    let before = feed(&*store, 0).await?;
    drop(store);
    ok("reopen", s.reopen().await)?;
    let store = s.handle();
    same("the feed after a reopen", feed(&*store, 0).await?, before)?;
    let again = key(id(4), None);
    ok(
        "create_key after a reopen",
        store.create_key(&again, &version(again.id, 1)).await,
    )?;
    same(
        "generations go on after a reopen",
        entries(&feed(&*store, 6).await?),
        vec![(7, again.id)],
    )
}

async fn change_feed_no_gap(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, handles) = two_handles(f).await?;
    let [a, _] = &handles;
    for round in 0..4u8 {
        let start = feed(&**a, 0).await?.head;
        let results = race(&handles, move |store, t| async move {
            let k = key(KeyId::new_random(), None);
            let created = store.create_key(&k, &version(k.id, 1)).await;
            let mut disabled = k.clone();
            disabled.state = KeyState::Disabled;
            let changed = store.compare_and_swap_key(&k, &disabled).await;
            (t, k.id, created.and(changed))
        })
        .await?;
        let mut written = BTreeSet::new();
        for (t, k, r) in results {
            ok(&format!("round {round}, task {t}"), r)?;
            written.insert(k);
        }
        let page = feed(&**a, start).await?;
        let n = written.len() as u64;
        same("the head", page.head, start + 2 * n)?;
        let listed: BTreeSet<KeyId> = page.changes.iter().map(|c| c.key_id).collect();
        same("the keys listed", listed, written)?;
        let gens: Vec<u64> = page.changes.iter().map(|c| c.generation).collect();
        ensure(gens.is_sorted_by(|a, b| a < b), || {
            format!("round {round}: generations out of order: {gens:?}")
        })?;
        ensure(
            gens.iter().all(|g| *g > start && *g <= start + 2 * n),
            || {
                format!(
                    "round {round}: generations {gens:?} outside ({start}, {}]",
                    start + 2 * n
                )
            },
        )?;
    }
    Ok(())
}
