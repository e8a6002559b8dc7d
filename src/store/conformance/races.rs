//! Races between two handles on one store ([`super::OpenStore::second_handle`]):
//! several threads on each, started together, make conflicting changes. Of
//! the calls based on one stored state exactly one wins, the others are
//! refused, and the store holds the winner's change.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use super::fixtures::{id, key, tombstone, version};
use super::{Check, OpenStore, StoreFactory, ensure, ok, open, same};
use crate::model::{KeyId, KeyState, Timestamp};
use crate::store::{KeyStore, StoreError, WrappedSecret};

pub(super) const CAS_ONE_WINNER: Check = Check {
    name: "two handles: of concurrent compare-and-swaps from one record exactly one wins, \
           the others get Conflict",
    run: |f| Box::pin(cas_one_winner(f)),
};
pub(super) const ROTATION_ONE_WINNER: Check = Check {
    name: "two handles: concurrent rotations store each version number once, the winner's",
    run: |f| Box::pin(rotation_one_winner(f)),
};
pub(super) const ALIAS_CLASH: Check = Check {
    name: "two handles: of concurrent creates of one alias or one id exactly one wins, the \
           others get AliasTaken or KeyExists",
    run: |f| Box::pin(alias_clash(f)),
};
pub(super) const DESTROY_AGAINST_CANCEL: Check = Check {
    name: "two handles: destroying a key while its deletion is cancelled: exactly one wins, \
           and the store holds its record and versions",
    run: |f| Box::pin(destroy_against_cancel(f)),
};
pub(super) const HANDLES_SEE_EACH_OTHER: Check = Check {
    name: "two handles: a change acknowledged through one is seen through the other",
    run: |f| Box::pin(handles_see_each_other(f)),
};

pub(super) const SECRET_ONE_WINNER: Check = Check {
    name: "two handles: of concurrent create_secret calls of one name exactly one value is \
           stored, and every caller gets it",
    run: |f| Box::pin(secret_one_winner(f)),
};

/// Threads per handle.
pub(super) const THREADS: usize = 2;
/// Rounds of each race.
const ROUNDS: usize = 8;

/// Runs `body(handle, task)` as `THREADS` concurrent tasks per handle,
/// all started together (polled as one set, so that none runs ahead of the
/// others), and returns their results in task order. The backends run
/// each call on tasks or threads of their own, so the calls do overlap in
/// the store.
pub(super) async fn race<T, F, Fut>(
    handles: &[Arc<dyn KeyStore>; 2],
    body: F,
) -> Result<Vec<T>, String>
where
    F: Fn(Arc<dyn KeyStore>, usize) -> Fut,
    Fut: Future<Output = T>,
{
    let n = handles.len() * THREADS;
    let mut running = Vec::with_capacity(n);
    for t in 0..n {
        let handle = handles.get(t % 2).ok_or("no handle for a task")?;
        running.push(body(Arc::clone(handle), t));
    }
    Ok(futures_util::future::join_all(running).await)
}

/// A store made for one check, and two handles on it.
pub(super) type TwoHandles = (Box<dyn OpenStore>, [Arc<dyn KeyStore>; 2]);

pub(super) async fn two_handles(factory: &dyn StoreFactory) -> Result<TwoHandles, String> {
    let (s, first) = open(factory).await?;
    let second = ok("second_handle", s.second_handle().await)?;
    Ok((s, [first, second]))
}

async fn cas_one_winner(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, handles) = two_handles(f).await?;
    let [a, _] = &handles;
    let k = key(id(1), Some("race"));
    ok("create_key", a.create_key(&k, &version(k.id, 1)).await)?;
    for round in 0..ROUNDS {
        let current = ok("get_key", a.get_key(k.id).await)?.ok_or("the key is missing")?;
        let current = &current;
        let results = race(&handles, move |store, t| async move {
            let mut new = current.clone();
            new.description = format!("round {round}, thread {t}");
            new.state = if t % 2 == 0 {
                KeyState::Disabled
            } else {
                KeyState::Enabled
            };
            (new.clone(), store.compare_and_swap_key(current, &new).await)
        })
        .await?;
        let winners: Vec<_> = results.iter().filter(|(_, r)| r.is_ok()).collect();
        let [(winner, _)] = winners.as_slice() else {
            return Err(format!(
                "round {round}: {} winners: {results:?}",
                winners.len()
            ));
        };
        for (_, r) in &results {
            ensure(matches!(r, Ok(()) | Err(StoreError::Conflict(_))), || {
                format!("round {round}: a loser got {r:?}, expected Conflict")
            })?;
        }
        for store in &handles {
            same(
                "the stored record",
                ok("get_key", store.get_key(k.id).await)?.as_ref(),
                Some(winner),
            )?;
        }
    }
    Ok(())
}

async fn secret_one_winner(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, handles) = two_handles(f).await?;
    let [a, _] = &handles;
    for round in 0..ROUNDS {
        let name = format!("first-start-{round}");
        let name = &name;
        let results = race(&handles, move |store, t| async move {
            let mine = WrappedSecret {
                hsm_root_key_id: 1,
                wrapped: vec![u8::try_from(t + 1).unwrap_or(u8::MAX); 48],
            };
            store.create_secret(name, &mine).await
        })
        .await?;
        let mut got = Vec::new();
        for r in results {
            got.push(ok("create_secret", r)?);
        }
        let stored = ok("get_secret", a.get_secret(name).await)?
            .ok_or_else(|| format!("round {round}: no secret stored"))?;
        for g in &got {
            ensure(*g == stored, || {
                format!("round {round}: a caller got {g:?}, the store holds {stored:?}")
            })?;
        }
    }
    Ok(())
}

async fn rotation_one_winner(f: &dyn StoreFactory) -> Result<(), String> {
    const WINS: u32 = 3;
    let (_s, handles) = two_handles(f).await?;
    let [a, _] = &handles;
    let k = key(id(1), None);
    ok("create_key", a.create_key(&k, &version(k.id, 1)).await)?;
    let k = &k;
    let results = race(&handles, move |store, t| async move {
        let mut landed = Vec::new();
        let mut tries = 0;
        while landed.len() < WINS as usize {
            tries += 1;
            if tries > 1000 {
                return Err("no progress in 1000 tries".to_owned());
            }
            let current = match store.get_key(k.id).await {
                Ok(Some(current)) => current,
                other => return Err(format!("get_key: {other:?}")),
            };
            let mut next = version(k.id, current.primary_version + 1);
            next.wrapped_material = vec![t as u8; 60];
            let mut updated = current.clone();
            updated.primary_version = next.version;
            match store.add_version(&current, &updated, &next).await {
                Ok(()) => landed.push(next),
                Err(StoreError::Conflict(_)) => {}
                Err(e) => return Err(format!("add_version: {e:?}")),
            }
        }
        Ok(landed)
    })
    .await?;
    let mut won = BTreeMap::new();
    won.insert(1, version(k.id, 1));
    for landed in results {
        for v in landed? {
            if let Some(other) = won.insert(v.version, v) {
                return Err(format!("version {} was won twice", other.version));
            }
        }
    }
    let total = 1 + WINS * (2 * THREADS) as u32;
    same(
        "the versions",
        ok("list_versions", a.list_versions(k.id).await)?,
        won.into_values().collect::<Vec<_>>(),
    )?;
    same(
        "the primary version",
        ok("get_key", a.get_key(k.id).await)?.map(|k| k.primary_version),
        Some(total),
    )
}

async fn alias_clash(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, handles) = two_handles(f).await?;
    let [a, _] = &handles;
    for round in 0..ROUNDS {
        let alias = format!("race/{round}");
        let alias = &alias;
        // One alias, a different id per thread.
        let results = race(&handles, move |store, _| async move {
            let k = key(KeyId::new_random(), Some(alias));
            let outcome = store.create_key(&k, &version(k.id, 1)).await;
            (k.id, outcome)
        })
        .await?;
        let winners: Vec<KeyId> = results
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(i, _)| *i)
            .collect();
        let [winner] = winners.as_slice() else {
            return Err(format!(
                "alias round {round}: winners {winners:?}: {results:?}"
            ));
        };
        for (loser, r) in &results {
            if loser == winner {
                continue;
            }
            ensure(
                matches!(r, Err(StoreError::AliasTaken(a)) if a == alias),
                || format!("alias round {round}: a loser got {r:?}, expected AliasTaken"),
            )?;
            same(
                "a loser's key",
                ok("get_key", a.get_key(*loser).await)?,
                None,
            )?;
        }
        same(
            "the alias",
            ok("key_id_for_alias", a.key_id_for_alias(alias).await)?,
            Some(*winner),
        )?;

        // One id, a different alias per thread.
        let shared = KeyId::new_random();
        let results = race(&handles, move |store, t| async move {
            let k = key(shared, Some(&format!("race/{round}/{t}")));
            (k.clone(), store.create_key(&k, &version(shared, 1)).await)
        })
        .await?;
        let winners: Vec<_> = results.iter().filter(|(_, r)| r.is_ok()).collect();
        let [(winner, _)] = winners.as_slice() else {
            return Err(format!(
                "id round {round}: {} winners: {results:?}",
                winners.len()
            ));
        };
        for (k, r) in &results {
            if k == winner {
                continue;
            }
            ensure(
                matches!(r, Err(StoreError::KeyExists(i)) if *i == shared),
                || format!("id round {round}: a loser got {r:?}, expected KeyExists"),
            )?;
            if let Some(alias) = &k.alias {
                same(
                    "a loser's alias",
                    ok("key_id_for_alias", a.key_id_for_alias(alias).await)?,
                    None,
                )?;
            }
        }
        same(
            "the key",
            ok("get_key", a.get_key(shared).await)?.as_ref(),
            Some(winner),
        )?;
    }
    Ok(())
}

async fn destroy_against_cancel(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, handles) = two_handles(f).await?;
    let [a, _] = &handles;
    for round in 0..ROUNDS as u8 {
        let k = key(id(round), None);
        ok("create_key", a.create_key(&k, &version(k.id, 1)).await)?;
        let mut pending = k.clone();
        pending.state = KeyState::PendingDeletion;
        pending.deletion_at = Some(Timestamp(1_000));
        ok(
            "compare_and_swap_key",
            a.compare_and_swap_key(&k, &pending).await,
        )?;
        let mut cancelled = pending.clone();
        cancelled.state = KeyState::Disabled;
        cancelled.deletion_at = None;
        let tomb = tombstone(&pending, 2_000);
        let (pending, cancelled, tomb) = (&pending, &cancelled, &tomb);
        // Even threads destroy, odd ones cancel, on both handles.
        let results = race(&handles, move |store, t| async move {
            if t % 2 == 0 {
                (true, store.destroy_key(pending, tomb).await)
            } else {
                (false, store.compare_and_swap_key(pending, cancelled).await)
            }
        })
        .await?;
        let winners: Vec<bool> = results
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(destroyed, _)| *destroyed)
            .collect();
        let [destroyed] = winners.as_slice() else {
            return Err(format!("round {round}: winners {winners:?}: {results:?}"));
        };
        for (_, r) in &results {
            ensure(matches!(r, Ok(()) | Err(StoreError::Conflict(_))), || {
                format!("round {round}: a loser got {r:?}, expected Conflict")
            })?;
        }
        let mut v = version(k.id, 1);
        let expected = if *destroyed {
            v.wrapped_material.clear();
            v.destroyed_at = tomb.destroyed_at;
            tomb.clone()
        } else {
            cancelled.clone()
        };
        for store in &handles {
            same(
                "the key",
                ok("get_key", store.get_key(k.id).await)?,
                Some(expected.clone()),
            )?;
            same(
                "the versions",
                ok("list_versions", store.list_versions(k.id).await)?,
                vec![v.clone()],
            )?;
        }
        same(
            "due keys",
            ok("due_keys", a.due_keys(Timestamp(i64::MAX), 10).await)?,
            vec![],
        )?;
    }
    Ok(())
}

async fn handles_see_each_other(f: &dyn StoreFactory) -> Result<(), String> {
    let (_s, [a, b]) = two_handles(f).await?;
    let k = key(id(1), Some("a"));
    ok("create_key", a.create_key(&k, &version(k.id, 1)).await)?;
    same(
        "a create through A, read through B",
        ok("get_key", b.get_key(k.id).await)?,
        Some(k.clone()),
    )?;
    same(
        "an alias created through A, read through B",
        ok("key_id_for_alias", b.key_id_for_alias("a").await)?,
        Some(k.id),
    )?;
    let mut disabled = k.clone();
    disabled.state = KeyState::Disabled;
    ok(
        "compare_and_swap_key",
        b.compare_and_swap_key(&k, &disabled).await,
    )?;
    same(
        "a compare-and-swap through B, read through A",
        ok("get_key", a.get_key(k.id).await)?,
        Some(disabled.clone()),
    )?;
    let mut enabled = disabled.clone();
    enabled.state = KeyState::Enabled;
    refused!(
        "a compare-and-swap through A from the record B replaced",
        a.compare_and_swap_key(&k, &enabled).await,
        StoreError::Conflict(_)
    )?;
    same(
        "the whole store through each handle",
        super::fixtures::snapshot(&*a).await,
        super::fixtures::snapshot(&*b).await,
    )
}
