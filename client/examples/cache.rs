//! Small objects sealed and opened with the data-key cache against without
//! it, on a running coffre, in one run (BENCHMARKS.md, "Client-side
//! encryption"):
//!
//! ```sh
//! coffre dev &                                 # or any coffre, with a service identity
//! coffre key create --alias bench-objects
//! cargo run --release -p coffre-client --example cache -- bench-objects 20000
//! ```
//!
//! Arguments: the key, the number of objects (default 20,000), their size
//! in bytes (default 1024), the tasks sealing at once (default 16). The
//! connection comes from `COFFRE_ENDPOINT` (default `https://127.0.0.1:7443`)
//! and the PKI of `COFFRE_DATA_DIR` (default `./coffre-dev`), as for the
//! `coffre` CLI's service identity.
//!
//! "Uncached" is [`Client`] alone: one GenerateDataKey per sealed object,
//! one Decrypt per opened one, the path a service without a cache takes.
//! "Cached" is a [`CachingClient`] with the default bounds. The objects are spread over ten tenants (ten encryption
//! contexts, so ten cache entries per direction). The RPC counts are the
//! cache's own (`CacheStats`): every miss is one RPC.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use coffre_client::{CacheLimits, CachingClient, Client, Connection};
use zeroize::Zeroizing;

const TENANTS: usize = 10;

fn context(i: usize) -> BTreeMap<String, String> {
    BTreeMap::from([("tenant".to_string(), format!("tenant-{}", i % TENANTS))])
}

struct Run {
    objects_per_s: f64,
    generate_calls: u64,
    decrypt_calls: u64,
}

/// A service's data-key path: coffre for every object, or the cache.
enum Keys {
    Uncached(Client, AtomicU64, AtomicU64),
    Cached(CachingClient),
}

impl Keys {
    async fn seal(&self, key: &str, context: &BTreeMap<String, String>, object: &[u8]) -> Vec<u8> {
        match self {
            Keys::Cached(cache) => cache.seal_bytes(key, context, object).await.unwrap(),
            Keys::Uncached(client, generated, _) => {
                generated.fetch_add(1, Ordering::Relaxed);
                let out = Vec::with_capacity(object.len() + 256);
                let (mut sealer, _) = client.sealer(key, context.clone(), out).await.unwrap();
                sealer.write_all(object).unwrap();
                sealer.finish().unwrap().0
            }
        }
    }

    async fn open(&self, message: &[u8], context: &BTreeMap<String, String>) -> Vec<u8> {
        match self {
            Keys::Cached(cache) => cache.open_bytes(message, Some(context)).await.unwrap().0,
            Keys::Uncached(client, _, decrypted) => {
                decrypted.fetch_add(1, Ordering::Relaxed);
                let (mut opener, _) = client.opener(message, Some(context)).await.unwrap();
                let mut plain = Vec::with_capacity(message.len());
                opener.read_to_end(&mut plain).unwrap();
                plain
            }
        }
    }

    /// (GenerateDataKey, Decrypt) calls so far.
    fn calls(&self) -> (u64, u64) {
        match self {
            Keys::Cached(cache) => {
                let s = cache.stats();
                (s.generate_calls, s.decrypt_calls)
            }
            Keys::Uncached(_, g, d) => (g.load(Ordering::Relaxed), d.load(Ordering::Relaxed)),
        }
    }
}

/// Seals `n` objects with `tasks` tasks, then opens them all; the sealing
/// rate, the opening rate, and the RPCs of each.
async fn run(keys: Keys, key: &str, n: usize, size: usize, tasks: usize) -> (Run, Run) {
    let cache = Arc::new(keys);
    let key: Arc<str> = Arc::from(key);
    let started = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (cache, key) = (Arc::clone(&cache), Arc::clone(&key));
        handles.push(tokio::spawn(async move {
            let object = vec![0x5a_u8; size];
            let mut sealed = Vec::new();
            for i in (t..n).step_by(tasks) {
                let message = cache.seal(&key, &context(i), &object).await;
                sealed.push((i, message));
            }
            sealed
        }));
    }
    let mut messages = Vec::with_capacity(n);
    for h in handles {
        messages.extend(h.await.unwrap());
    }
    let seal_secs = started.elapsed().as_secs_f64();
    let after_seal = cache.calls();

    let messages = Arc::new(messages);
    let started = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (cache, messages) = (Arc::clone(&cache), Arc::clone(&messages));
        handles.push(tokio::spawn(async move {
            for (i, message) in messages.iter().skip(t).step_by(tasks) {
                let plain = cache.open(message, &context(*i)).await;
                assert_eq!(plain.len(), size);
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let open_secs = started.elapsed().as_secs_f64();
    let after_open = cache.calls();
    (
        Run {
            objects_per_s: n as f64 / seal_secs,
            generate_calls: after_seal.0,
            decrypt_calls: after_seal.1,
        },
        Run {
            objects_per_s: n as f64 / open_secs,
            generate_calls: after_open.0 - after_seal.0,
            decrypt_calls: after_open.1 - after_seal.1,
        },
    )
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let key = args
        .next()
        .expect("usage: cache KEY [OBJECTS] [SIZE] [TASKS]");
    let mut number = |default: usize| {
        args.next()
            .map(|a| a.parse().expect("a number"))
            .unwrap_or(default)
    };
    let (n, size, tasks) = (number(20_000), number(1024), number(16));

    let dir = PathBuf::from(std::env::var("COFFRE_DATA_DIR").unwrap_or("./coffre-dev".into()));
    let pki = dir.join("pki");
    let read = |name: &str| {
        let path = pki.join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let connection = Connection {
        endpoint: std::env::var("COFFRE_ENDPOINT").unwrap_or("https://127.0.0.1:7443".into()),
        ca_pem: read("ca.pem"),
        cert_pem: read("service.pem"),
        key_pem: Zeroizing::new(read("service-key.pem")),
        timeout: Duration::from_secs(10),
    };
    let client = Client::connect(&connection).await.unwrap();

    let uncached = || Keys::Uncached(client.clone(), AtomicU64::new(0), AtomicU64::new(0));
    // Warm the connection and the server (not measured).
    run(uncached(), &key, 500.min(n), size, tasks).await;

    println!(
        "{n} objects of {size} B, {tasks} tasks, {TENANTS} contexts; default cache: {:?}",
        CacheLimits::default()
    );
    println!(
        "{:<10} {:<6} {:>10} {:>16} {:>13}",
        "cache", "side", "objects/s", "GenerateDataKey", "Decrypt"
    );
    let mut rates = Vec::new();
    let cached = || Keys::Cached(CachingClient::new(client.clone(), CacheLimits::default()));
    for (name, keys) in [("none", uncached()), ("default", cached())] {
        let (seal, open) = run(keys, &key, n, size, tasks).await;
        for (side, r) in [("seal", &seal), ("open", &open)] {
            println!(
                "{name:<10} {side:<6} {:>10.0} {:>16} {:>13}",
                r.objects_per_s, r.generate_calls, r.decrypt_calls
            );
        }
        rates.push((seal.objects_per_s, open.objects_per_s));
    }
    println!(
        "cached / uncached: seal {:.1}x, open {:.1}x",
        rates[1].0 / rates[0].0,
        rates[1].1 / rates[0].1
    );
}
