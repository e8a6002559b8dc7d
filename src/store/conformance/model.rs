//! The model-based test of the [`KeyStore`] contract: random sequences of
//! creations, rotations, state changes, destructions, re-wraps, reopens and
//! compactions, each call's outcome compared with a model of the contract,
//! and the whole store compared with the model after each step (every
//! filter and page of `list_keys`, the due index, every key, version,
//! alias, and the root-rotation work list and counts).
//!
//! Built on proptest, a dev-dependency: a backend runs it from its unit
//! tests, as `proptest! { fn behaves_like_the_model(ops in ops()) { run(&factory, &ops)? } }`.

#![allow(clippy::unwrap_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::StoreFactory;
use super::fixtures::{id, key, version};
use crate::model::{KeyId, KeyRecord, KeyState, Timestamp, VersionRecord};
use crate::store::{KeyFilter, KeyStore, StoreError, VersionCounts};

const ALIASES: [&str; 3] = ["alias/a", "alias/b", "other/c"];
const IDS: u8 = 5;
/// Times around the interesting edges of the due index's encoding.
const TIMES: [i64; 7] = [i64::MIN, -5000, -1, 0, 1, 5000, i64::MAX];

#[derive(Clone, Debug)]
pub enum Op {
    Create {
        id: u8,
        alias: Option<usize>,
        consistent: bool,
        rotate_at: Option<i64>,
    },
    AddVersion {
        id: u8,
        stale: bool,
        skip: bool,
        rotate_at: Option<i64>,
    },
    /// A compare-and-swap to `state`, with `due` as the deletion time
    /// (PENDING_DELETION) or the next rotation (otherwise).
    SetState {
        id: u8,
        state: KeyState,
        stale: bool,
        due: Option<i64>,
    },
    Destroy {
        id: u8,
        stale: bool,
    },
    Rewrap {
        id: u8,
        version: u32,
        stale: bool,
        root: u32,
    },
    Reopen,
    Compact,
}

fn op() -> impl Strategy<Value = Op> {
    let state = prop_oneof![
        Just(KeyState::Enabled),
        Just(KeyState::Disabled),
        Just(KeyState::PendingDeletion),
        Just(KeyState::Destroyed),
    ];
    let time = || proptest::option::of(proptest::sample::select(TIMES.to_vec()));
    prop_oneof![
        4 => (0..IDS, proptest::option::of(0..ALIASES.len()), proptest::bool::weighted(0.9), time())
            .prop_map(|(id, alias, consistent, rotate_at)| Op::Create { id, alias, consistent, rotate_at }),
        3 => (0..IDS, proptest::bool::weighted(0.2), proptest::bool::weighted(0.2), time())
            .prop_map(|(id, stale, skip, rotate_at)| Op::AddVersion { id, stale, skip, rotate_at }),
        3 => (0..IDS, state, proptest::bool::weighted(0.2), time())
            .prop_map(|(id, state, stale, due)| Op::SetState { id, state, stale, due }),
        1 => (0..IDS, proptest::bool::weighted(0.2))
            .prop_map(|(id, stale)| Op::Destroy { id, stale }),
        2 => (0..IDS, 1..4u32, proptest::bool::weighted(0.2), 7..9u32)
            .prop_map(|(id, version, stale, root)| Op::Rewrap { id, version, stale, root }),
        1 => Just(Op::Reopen),
        1 => Just(Op::Compact),
    ]
}

/// Error variants, for comparing outcomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    KeyExists,
    AliasTaken,
    NoSuchKey,
    NoSuchVersion,
    Conflict,
    Corrupt,
}

fn kind<T>(r: Result<T, StoreError>) -> Result<T, Kind> {
    r.map_err(|e| match e {
        StoreError::KeyExists(_) => Kind::KeyExists,
        StoreError::AliasTaken(_) => Kind::AliasTaken,
        StoreError::NoSuchKey(_) => Kind::NoSuchKey,
        StoreError::NoSuchVersion(..) => Kind::NoSuchVersion,
        StoreError::Conflict(_) => Kind::Conflict,
        StoreError::Corrupt(_) => Kind::Corrupt,
        StoreError::Io(m) => panic!("unexpected I/O error: {m}"),
        StoreError::IntegrityFailure(m) => panic!("unexpected integrity failure: {m}"),
        StoreError::RootKeyRetired(r) => panic!("unexpected retired root key {r}"),
        e @ (StoreError::ApprovalExists(_)
        | StoreError::NoSuchApproval(_)
        | StoreError::ApprovalConflict(_)) => panic!("unexpected approval error {e}"),
    })
}

#[derive(Debug, Default)]
struct Model {
    keys: BTreeMap<KeyId, KeyRecord>,
    versions: BTreeMap<(KeyId, u32), VersionRecord>,
    aliases: BTreeMap<String, KeyId>,
}

impl Model {
    fn create(&mut self, k: &KeyRecord, v: &VersionRecord) -> Result<(), Kind> {
        if v.key_id != k.id || v.version != k.primary_version {
            return Err(Kind::Corrupt);
        }
        if self.keys.contains_key(&k.id) {
            return Err(Kind::KeyExists);
        }
        if let Some(a) = &k.alias
            && self.aliases.contains_key(a)
        {
            return Err(Kind::AliasTaken);
        }
        self.keys.insert(k.id, k.clone());
        self.versions.insert((k.id, v.version), v.clone());
        if let Some(a) = &k.alias {
            self.aliases.insert(a.clone(), k.id);
        }
        Ok(())
    }

    fn check(&self, current: &KeyRecord) -> Result<(), Kind> {
        match self.keys.get(&current.id) {
            None => Err(Kind::NoSuchKey),
            Some(stored) if stored != current => Err(Kind::Conflict),
            Some(_) => Ok(()),
        }
    }

    fn add_version(
        &mut self,
        current: &KeyRecord,
        updated: &KeyRecord,
        v: &VersionRecord,
    ) -> Result<(), Kind> {
        if v.key_id != current.id
            || updated.id != current.id
            || updated.alias != current.alias
            || updated.primary_version != v.version
            || current.state == KeyState::Destroyed
            || updated.state == KeyState::Destroyed
        {
            return Err(Kind::Corrupt);
        }
        if current.primary_version.checked_add(1) != Some(v.version) {
            return Err(Kind::Conflict);
        }
        self.check(current)?;
        if self.versions.contains_key(&(current.id, v.version)) {
            return Err(Kind::Conflict);
        }
        self.versions.insert((current.id, v.version), v.clone());
        self.keys.insert(current.id, updated.clone());
        Ok(())
    }

    fn cas(&mut self, current: &KeyRecord, new: &KeyRecord) -> Result<(), Kind> {
        if current.state == KeyState::Destroyed || new.state == KeyState::Destroyed {
            return Err(Kind::Corrupt);
        }
        self.check(current)?;
        self.keys.insert(current.id, new.clone());
        Ok(())
    }

    fn destroy(&mut self, current: &KeyRecord, tombstone: &KeyRecord) -> Result<(), Kind> {
        if current.state == KeyState::Destroyed {
            return Err(Kind::Corrupt);
        }
        self.check(current)?;
        for ((id, _), v) in self.versions.iter_mut() {
            if *id == current.id {
                v.wrapped_material.clear();
                v.destroyed_at = tombstone.destroyed_at;
            }
        }
        self.keys.insert(current.id, tombstone.clone());
        Ok(())
    }

    fn rewrap(&mut self, current: &VersionRecord, new: &VersionRecord) -> Result<(), Kind> {
        if current.destroyed_at.is_some() {
            return Err(Kind::Conflict);
        }
        match self.versions.get(&(current.key_id, current.version)) {
            None => Err(Kind::NoSuchVersion),
            Some(stored) if stored != current => Err(Kind::Conflict),
            Some(_) => {
                self.versions
                    .insert((current.key_id, current.version), new.clone());
                Ok(())
            }
        }
    }

    /// What a caller would pass as `current`: the stored record, a stale
    /// copy of it, or a record for a key that does not exist.
    fn current(&self, id: KeyId, stale: bool) -> KeyRecord {
        let mut k = self.keys.get(&id).cloned().unwrap_or_else(|| key(id, None));
        if stale {
            k.description.push_str(" (old)");
        }
        k
    }

    fn due_keys(&self, now: Timestamp) -> Vec<KeyRecord> {
        let mut due: Vec<KeyRecord> = self
            .keys
            .values()
            .filter(|k| k.next_due().is_some_and(|at| at <= now))
            .cloned()
            .collect();
        // Stable: ties stay in id order.
        due.sort_by_key(|k| k.next_due());
        due
    }
}

fn filters() -> Vec<KeyFilter> {
    let states = [
        None,
        Some(KeyState::Enabled),
        Some(KeyState::Disabled),
        Some(KeyState::PendingDeletion),
        Some(KeyState::Destroyed),
    ];
    let prefixes = [None, Some(""), Some("alias/"), Some("alias/a"), Some("x")];
    let mut out = Vec::new();
    for state in states {
        for prefix in prefixes {
            out.push(KeyFilter {
                state,
                alias_prefix: prefix.map(str::to_owned),
            });
        }
    }
    out
}

async fn assert_same_state(store: &dyn KeyStore, model: &Model) -> Result<(), TestCaseError> {
    for filter in filters() {
        let all: Vec<KeyRecord> = model
            .keys
            .values()
            .filter(|k| filter.matches(k))
            .cloned()
            .collect();
        prop_assert_eq!(
            &store.list_keys(&filter, None, usize::MAX).await.unwrap(),
            &all
        );
        // Paging after any key, matching the filter or not.
        for n in 0..IDS {
            let expected: Vec<KeyRecord> = all
                .iter()
                .filter(|k| *k.id.as_bytes() > *id(n).as_bytes())
                .take(2)
                .cloned()
                .collect();
            prop_assert_eq!(
                store.list_keys(&filter, Some(id(n)), 2).await.unwrap(),
                expected
            );
        }
    }
    for now in TIMES {
        let due = model.due_keys(Timestamp(now));
        prop_assert_eq!(
            &store.due_keys(Timestamp(now), usize::MAX).await.unwrap(),
            &due
        );
        prop_assert_eq!(
            store.due_keys(Timestamp(now), 2).await.unwrap(),
            due[..due.len().min(2)].to_vec()
        );
    }
    for n in 0..IDS {
        let i = id(n);
        prop_assert_eq!(store.get_key(i).await.unwrap(), model.keys.get(&i).cloned());
        let versions: Vec<VersionRecord> = model
            .versions
            .range((i, 0)..=(i, u32::MAX))
            .map(|(_, v)| v.clone())
            .collect();
        prop_assert_eq!(store.list_versions(i).await.unwrap(), versions);
    }
    for a in ALIASES {
        prop_assert_eq!(
            store.key_id_for_alias(a).await.unwrap(),
            model.aliases.get(a).copied()
        );
    }
    for root in [7, 8] {
        let todo: Vec<VersionRecord> = model
            .versions
            .values()
            .filter(|v| v.destroyed_at.is_none() && v.hsm_root_key_id != root)
            .cloned()
            .collect();
        prop_assert_eq!(
            &store
                .versions_not_under_root(root, None, usize::MAX)
                .await
                .unwrap(),
            &todo
        );
        if let Some(first) = todo.first() {
            prop_assert_eq!(
                &store
                    .versions_not_under_root(root, Some((first.key_id, first.version)), 2)
                    .await
                    .unwrap()[..],
                &todo[1..todo.len().min(3)]
            );
        }
        let destroyed = model
            .versions
            .values()
            .filter(|v| v.destroyed_at.is_some())
            .count() as u64;
        prop_assert_eq!(
            store.count_versions(root).await.unwrap(),
            VersionCounts {
                live: model.versions.len() as u64 - destroyed,
                not_under_root: todo.len() as u64,
                destroyed,
            }
        );
    }
    Ok(())
}

/// Sequences of 1 to 39 operations.
pub fn ops() -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(op(), 1..40)
}

/// Runs `ops` on a new store from `factory`, and on the model.
pub async fn run(factory: &dyn StoreFactory, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut opened = factory
        .open()
        .await
        .map_err(|e| TestCaseError::fail(format!("opening a new store: {e:?}")))?;
    let mut store = opened.handle();
    let mut model = Model::default();
    for op in ops.iter().cloned() {
        match op {
            Op::Create {
                id: n,
                alias,
                consistent,
                rotate_at,
            } => {
                let mut k = key(id(n), alias.map(|a| ALIASES[a]));
                k.description = format!("key {n}");
                k.rotation_period_secs = rotate_at.map(|_| 86_400);
                k.next_rotation_at = rotate_at.map(Timestamp);
                let v = version(k.id, if consistent { 1 } else { 2 });
                prop_assert_eq!(kind(store.create_key(&k, &v).await), model.create(&k, &v));
            }
            Op::AddVersion {
                id: n,
                stale,
                skip,
                rotate_at,
            } => {
                let current = model.current(id(n), stale);
                let next = current.primary_version + if skip { 2 } else { 1 };
                let v = version(current.id, next);
                let mut updated = model.current(id(n), false);
                updated.primary_version = next;
                updated.next_rotation_at = rotate_at.map(Timestamp);
                prop_assert_eq!(
                    kind(store.add_version(&current, &updated, &v).await),
                    model.add_version(&current, &updated, &v)
                );
            }
            Op::SetState {
                id: n,
                state,
                stale,
                due,
            } => {
                let current = model.current(id(n), stale);
                let mut new = model.current(id(n), false);
                new.state = state;
                if state == KeyState::PendingDeletion {
                    new.deletion_at = due.map(Timestamp);
                } else {
                    new.deletion_at = None;
                    new.next_rotation_at = due.map(Timestamp);
                }
                prop_assert_eq!(
                    kind(store.compare_and_swap_key(&current, &new).await),
                    model.cas(&current, &new)
                );
            }
            Op::Destroy { id: n, stale } => {
                let current = model.current(id(n), stale);
                let mut tombstone = model.current(id(n), false);
                tombstone.state = KeyState::Destroyed;
                tombstone.deletion_at = None;
                tombstone.destroyed_at = Some(Timestamp(1_800_000_000_000));
                prop_assert_eq!(
                    kind(store.destroy_key(&current, &tombstone).await),
                    model.destroy(&current, &tombstone)
                );
            }
            Op::Rewrap {
                id: n,
                version: number,
                stale,
                root,
            } => {
                let mut current = model
                    .versions
                    .get(&(id(n), number))
                    .cloned()
                    .unwrap_or_else(|| version(id(n), number));
                if stale {
                    current.wrapped_material.push(0);
                }
                let mut new = current.clone();
                new.hsm_root_key_id = root;
                new.wrapped_material = vec![0xa0 | root as u8; 61];
                prop_assert_eq!(
                    kind(store.rewrap_version(&current, &new).await),
                    model.rewrap(&current, &new)
                );
            }
            Op::Reopen => {
                drop(store);
                opened
                    .reopen()
                    .await
                    .map_err(|e| TestCaseError::fail(format!("reopen: {e:?}")))?;
                store = opened.handle();
            }
            Op::Compact => {
                store
                    .compact()
                    .await
                    .map_err(|e| TestCaseError::fail(format!("compact: {e:?}")))?;
                opened.check_compacted().map_err(TestCaseError::fail)?;
            }
        }
        assert_same_state(&*store, &model).await?;
    }
    Ok(())
}
