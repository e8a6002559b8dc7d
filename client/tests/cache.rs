//! The data-key cache against a stand-in for coffre that counts its calls
//! and can refuse a key as coffre does once the operator disabled it: the
//! calls saved, each bound (age, messages, bytes, entries), and a refusal
//! emptying the key's entries at once.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use coffre_client::{
    CacheLimits, CachingClient, ClientError, DataKey, DataKeySource, GeneratedKey,
};

/// Data keys as coffre would make them: random, wrapped in a "blob" that
/// names its key (bytes 4..20) and is remembered for Decrypt.
#[derive(Default)]
struct FakeCoffre {
    next: AtomicU64,
    keys: Mutex<HashMap<Vec<u8>, [u8; 32]>>,
    disabled: Mutex<HashSet<String>>,
}

fn key_id(name: &str) -> [u8; 16] {
    let mut id = [0u8; 16];
    for (i, b) in name.bytes().enumerate() {
        id[i % 16] ^= b;
    }
    id
}

impl FakeCoffre {
    fn disable(&self, key: &str) {
        self.disabled.lock().unwrap().insert(key.to_string());
    }
    fn enable(&self, key: &str) {
        self.disabled.lock().unwrap().remove(key);
    }
    fn is_disabled(&self, id: &[u8]) -> bool {
        self.disabled
            .lock()
            .unwrap()
            .iter()
            .any(|k| key_id(k)[..] == *id)
    }
}

impl DataKeySource for FakeCoffre {
    async fn generate_data_key(
        &self,
        key: &str,
        _context: &BTreeMap<String, String>,
    ) -> Result<GeneratedKey, ClientError> {
        if self.is_disabled(&key_id(key)) {
            return Err(ClientError::KeyUnusable(format!("key {key} is DISABLED")));
        }
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        let mut material = [0u8; 32];
        material[..8].copy_from_slice(&n.to_be_bytes());
        material[8] = 0x77;
        let mut blob = b"CF\x01\x01".to_vec();
        blob.extend_from_slice(&key_id(key));
        blob.extend_from_slice(&n.to_be_bytes());
        self.keys.lock().unwrap().insert(blob.clone(), material);
        Ok(GeneratedKey {
            data_key: DataKey::from_slice(&material).unwrap(),
            blob,
            key_id: key.to_string(),
            key_version: 1,
        })
    }

    async fn decrypt(
        &self,
        blob: &[u8],
        _context: &BTreeMap<String, String>,
    ) -> Result<DataKey, ClientError> {
        if self.is_disabled(&blob[4..20]) {
            return Err(ClientError::KeyUnusable("the key is DISABLED".into()));
        }
        let keys = self.keys.lock().unwrap();
        let material = keys
            .get(blob)
            .ok_or(ClientError::Invalid("unknown blob".into()))?;
        DataKey::from_slice(material).map_err(ClientError::from)
    }
}

fn ctx(tenant: &str) -> BTreeMap<String, String> {
    [("tenant".to_string(), tenant.to_string())].into()
}

fn limits() -> CacheLimits {
    CacheLimits {
        max_age: Duration::from_secs(3600),
        max_messages: 100,
        max_bytes: 1 << 20,
        max_entries: 10,
    }
}

#[tokio::test]
async fn sealing_many_objects_asks_for_one_data_key_per_bound() {
    let cache = CachingClient::new(FakeCoffre::default(), limits());
    let mut messages = Vec::new();
    for i in 0..250u32 {
        let object = format!("record {i}");
        messages.push(
            cache
                .seal_bytes("k", &ctx("acme"), object.as_bytes())
                .await
                .unwrap(),
        );
    }
    // 100 messages per data key: 3 keys for 250.
    let s = cache.stats();
    assert_eq!(s.generate_calls, 3, "{s:?}");
    assert_eq!(s.seal_hits, 247);
    // Another context is another data key.
    cache.seal_bytes("k", &ctx("globex"), b"x").await.unwrap();
    assert_eq!(cache.stats().generate_calls, 4);
    // Opening: one Decrypt per data key, then from the cache.
    for (i, m) in messages.iter().enumerate() {
        let (plain, header) = cache.open_bytes(m, Some(&ctx("acme"))).await.unwrap();
        assert_eq!(plain, format!("record {i}").as_bytes());
        assert_eq!(header.context, ctx("acme"));
    }
    let s = cache.stats();
    assert_eq!(s.decrypt_calls, 3, "{s:?}");
    assert_eq!(s.open_hits, 247);
    assert!(matches!(
        cache.open_bytes(&messages[0], Some(&ctx("globex"))).await,
        Err(ClientError::ContextMismatch { .. })
    ));
}

#[tokio::test]
async fn the_byte_bound_and_the_age_bound_each_renew_the_data_key() {
    let cache = CachingClient::new(
        FakeCoffre::default(),
        CacheLimits {
            max_bytes: 1000,
            ..limits()
        },
    );
    for _ in 0..5 {
        cache.seal_bytes("k", &ctx("a"), &[7u8; 400]).await.unwrap();
    }
    // 400 + 400 fit in 1000, a third does not: a key per two messages.
    assert_eq!(cache.stats().generate_calls, 3);
    // Larger than the bound alone: sealed, never cached.
    cache
        .seal_bytes("k", &ctx("b"), &[7u8; 1001])
        .await
        .unwrap();
    cache
        .seal_bytes("k", &ctx("b"), &[7u8; 1001])
        .await
        .unwrap();
    assert_eq!(cache.stats().generate_calls, 5);

    let cache = CachingClient::new(
        FakeCoffre::default(),
        CacheLimits {
            max_age: Duration::from_millis(50),
            ..limits()
        },
    );
    let m = cache.seal_bytes("k", &ctx("a"), b"x").await.unwrap();
    cache.seal_bytes("k", &ctx("a"), b"x").await.unwrap();
    cache.open_bytes(&m, None).await.unwrap();
    cache.open_bytes(&m, None).await.unwrap();
    assert_eq!(cache.stats().generate_calls, 1);
    assert_eq!(cache.stats().decrypt_calls, 1);
    tokio::time::sleep(Duration::from_millis(80)).await;
    cache.seal_bytes("k", &ctx("a"), b"x").await.unwrap();
    cache.open_bytes(&m, None).await.unwrap();
    assert_eq!(cache.stats().generate_calls, 2);
    assert_eq!(cache.stats().decrypt_calls, 2);
}

#[tokio::test]
async fn a_disabled_key_is_refused_within_the_age_and_its_entries_go_at_the_first_refusal() {
    let cache = CachingClient::new(
        FakeCoffre::default(),
        CacheLimits {
            max_age: Duration::from_millis(1000),
            ..limits()
        },
    );
    let a = cache.seal_bytes("k", &ctx("a"), b"first").await.unwrap();
    let b = cache.seal_bytes("k", &ctx("b"), b"second").await.unwrap();
    let other = cache
        .seal_bytes("other", &ctx("a"), b"third")
        .await
        .unwrap();
    cache.open_bytes(&a, None).await.unwrap();
    cache.open_bytes(&b, None).await.unwrap();
    cache.open_bytes(&other, None).await.unwrap();
    // The operator disables k: coffre refuses from now on.
    source_of(&cache).disable("k");
    // Within the age, cached entries still serve (the documented bound)…
    cache.open_bytes(&a, None).await.unwrap();
    // …until the age passes: then coffre is asked and refuses.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(matches!(
        cache.open_bytes(&a, None).await,
        Err(ClientError::KeyUnusable(_))
    ));
    // The refusal emptied every entry of k (b's too), not other's.
    let before = cache.stats();
    assert!(before.purged >= 1, "{before:?}");
    assert!(matches!(
        cache.seal_bytes("k", &ctx("b"), b"x").await,
        Err(ClientError::KeyUnusable(_))
    ));
    // Enabled again: served again, with new calls.
    source_of(&cache).enable("k");
    cache.seal_bytes("k", &ctx("b"), b"x").await.unwrap();
    cache.open_bytes(&b, None).await.unwrap();
}

#[tokio::test]
async fn a_refusal_purges_entries_still_young() {
    let cache = CachingClient::new(FakeCoffre::default(), limits());
    let a = cache.seal_bytes("k", &ctx("a"), b"one").await.unwrap();
    cache.open_bytes(&a, None).await.unwrap();
    source_of(&cache).disable("k");
    // A new context for k needs coffre, which refuses: k's other entries,
    // young as they are, go with it.
    assert!(cache.seal_bytes("k", &ctx("new"), b"x").await.is_err());
    assert!(matches!(
        cache.open_bytes(&a, None).await,
        Err(ClientError::KeyUnusable(_))
    ));
    assert!(matches!(
        cache.seal_bytes("k", &ctx("a"), b"x").await,
        Err(ClientError::KeyUnusable(_))
    ));
}

#[tokio::test]
async fn entries_are_bounded_in_number() {
    let cache = CachingClient::new(
        FakeCoffre::default(),
        CacheLimits {
            max_entries: 3,
            ..limits()
        },
    );
    for t in ["a", "b", "c", "d"] {
        cache.seal_bytes("k", &ctx(t), b"x").await.unwrap();
    }
    // "a" was the oldest: evicted, asked for again.
    cache.seal_bytes("k", &ctx("a"), b"x").await.unwrap();
    assert_eq!(cache.stats().generate_calls, 5);
    cache.seal_bytes("k", &ctx("d"), b"x").await.unwrap();
    assert_eq!(cache.stats().generate_calls, 5);
    cache.clear();
    cache.seal_bytes("k", &ctx("d"), b"x").await.unwrap();
    assert_eq!(cache.stats().generate_calls, 6);
}

/// The stand-in behind the cache (the cache lends it out for tests).
fn source_of(c: &CachingClient<FakeCoffre>) -> &FakeCoffre {
    c.source()
}
