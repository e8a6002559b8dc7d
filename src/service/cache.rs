//! A bounded, concurrent map with CLOCK (second-chance) eviction.
//!
//! Readers take a shared lock and set a reference bit; a writer inserting into
//! a full map evicts an entry not referenced since the hand last passed.
//! Values are usually `Arc`s: an evicted CMK version (`Arc<CmkMaterial>`) is
//! zeroized as soon as the last in-flight request using it finishes.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

struct Slot<V> {
    value: V,
    referenced: AtomicBool,
}

pub struct BoundedCache<K, V> {
    capacity: usize,
    map: RwLock<HashMap<K, Slot<V>>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl<K, V> fmt::Debug for BoundedCache<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoundedCache")
            .field("capacity", &self.capacity)
            .field("len", &self.map.read().map(|m| m.len()).unwrap_or(0))
            .finish()
    }
}

impl<K: Eq + Hash + Clone, V: Clone> BoundedCache<K, V> {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            map: RwLock::new(HashMap::new()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    // A poisoned lock only means another thread panicked while holding it;
    // the map itself is always left consistent by these short sections.
    fn read(&self) -> RwLockReadGuard<'_, HashMap<K, Slot<V>>> {
        self.map.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<K, Slot<V>>> {
        self.map.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, key: &K) -> Option<V> {
        let map = self.read();
        match map.get(key) {
            Some(slot) => {
                if !slot.referenced.load(Ordering::Relaxed) {
                    slot.referenced.store(true, Ordering::Relaxed);
                }
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(slot.value.clone())
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    pub fn insert(&self, key: K, value: V) {
        self.insert_if(key, value, || true);
    }

    /// Inserts only if `still_valid()` holds, evaluated under the map's
    /// write lock (so that no other insert can slip in between). Returns
    /// whether it inserted.
    pub fn insert_if(&self, key: K, value: V, still_valid: impl FnOnce() -> bool) -> bool {
        let mut map = self.write();
        if !still_valid() {
            return false;
        }
        if !map.contains_key(&key) && map.len() >= self.capacity {
            Self::evict_one(&mut map);
        }
        map.insert(
            key,
            Slot {
                value,
                referenced: AtomicBool::new(false),
            },
        );
        true
    }

    pub fn remove(&self, key: &K) {
        self.write().remove(key);
    }

    /// Removes every entry matching `pred`.
    pub fn remove_where(&self, mut pred: impl FnMut(&K) -> bool) {
        self.write().retain(|k, _| !pred(k));
    }

    pub fn clear(&self) {
        self.write().clear();
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// (hits, misses) since start.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    fn evict_one(map: &mut HashMap<K, Slot<V>>) {
        // Second chance: clear reference bits until an unreferenced entry
        // turns up; two passes at most.
        let victim = map
            .iter()
            .find(|(_, slot)| !slot.referenced.swap(false, Ordering::Relaxed))
            .map(|(k, _)| k.clone())
            .or_else(|| map.keys().next().cloned());
        if let Some(k) = victim {
            map.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Arc;

    use super::*;

    #[test]
    fn bounded_and_keeps_recently_used() {
        let cache = BoundedCache::new(3);
        for i in 0..3 {
            cache.insert(i, i * 10);
        }
        assert_eq!(cache.get(&0), Some(0));
        cache.insert(3, 30);
        assert_eq!(cache.len(), 3);
        assert_eq!(
            cache.get(&0),
            Some(0),
            "a referenced entry gets a second chance"
        );
        assert_eq!(cache.get(&3), Some(30));
        for i in 4..100 {
            cache.insert(i, i);
            assert!(cache.len() <= 3);
        }
    }

    #[test]
    fn evicted_values_are_dropped() {
        let cache = BoundedCache::new(1);
        let first = Arc::new(1u8);
        cache.insert(1, Arc::clone(&first));
        assert_eq!(Arc::strong_count(&first), 2);
        cache.insert(2, Arc::new(2u8));
        assert_eq!(Arc::strong_count(&first), 1, "the cache let go of it");
        cache.remove(&2);
        assert!(cache.is_empty());
    }
}
