//! A bounded data-key cache, so that a service sealing many small objects
//! does not ask coffre for a data key each time, without letting a cached
//! key outlive the operator's decision for long.
//!
//! - Sealing: one data key per (key, context) serves new messages until
//!   it is `max_age` old, has sealed `max_messages` messages or
//!   `max_bytes` bytes of plaintext, whichever comes first; then a new one
//!   is asked for. The bytes are charged when a message is begun, with
//!   the size the caller declares.
//! - Opening: the data key of a wrapped key (blob, context) is kept for
//!   `max_age`, so that reading the same object again asks coffre once.
//! - Any refusal from coffre for a key (disabled, pending deletion, policy)
//!   empties every entry of that key at once; [`CachingClient::clear`]
//!   empties them all. Between two calls to coffre a disable is only seen
//!   at the next one: a cached key is used at most `max_age` after the
//!   operator disabled it. The default age is short (30 s).
//!
//! Entries hold the data key in a [`DataKey`] (zeroized on drop); at most
//! `max_entries` entries, the oldest evicted first.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::format::{DEFAULT_FRAME_LEN, DataKey, FormatError, Header};
use crate::rpc::{Client, ClientError, GeneratedKey};
use crate::stream::{Opener, Sealer};

/// Where data keys come from: coffre ([`Client`]), or a stand-in in tests.
pub trait DataKeySource: Send + Sync {
    fn generate_data_key(
        &self,
        key: &str,
        context: &BTreeMap<String, String>,
    ) -> impl std::future::Future<Output = Result<GeneratedKey, ClientError>> + Send;
    fn decrypt(
        &self,
        blob: &[u8],
        context: &BTreeMap<String, String>,
    ) -> impl std::future::Future<Output = Result<DataKey, ClientError>> + Send;
}

impl DataKeySource for Client {
    async fn generate_data_key(
        &self,
        key: &str,
        context: &BTreeMap<String, String>,
    ) -> Result<GeneratedKey, ClientError> {
        Client::generate_data_key(self, key, context).await
    }

    async fn decrypt(
        &self,
        blob: &[u8],
        context: &BTreeMap<String, String>,
    ) -> Result<DataKey, ClientError> {
        Client::decrypt(self, blob, context).await
    }
}

/// The cache's bounds.
#[derive(Debug, Clone, Copy)]
pub struct CacheLimits {
    /// How long an entry serves: the longest a cached key may be used
    /// after the operator disabled it.
    pub max_age: Duration,
    /// Messages one sealing data key may begin.
    pub max_messages: u64,
    /// Plaintext bytes one sealing data key may seal.
    pub max_bytes: u64,
    /// Entries kept (sealing and opening together).
    pub max_entries: usize,
}

impl Default for CacheLimits {
    fn default() -> Self {
        CacheLimits {
            max_age: Duration::from_secs(30),
            max_messages: 10_000,
            max_bytes: 1 << 30,
            max_entries: 1000,
        }
    }
}

/// What the cache saved and what it asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub generate_calls: u64,
    pub decrypt_calls: u64,
    pub seal_hits: u64,
    pub open_hits: u64,
    /// Entries dropped because coffre refused a key.
    pub purged: u64,
}

struct SealEntry {
    key: Arc<GeneratedKey>,
    born: Instant,
    messages: u64,
    bytes: u64,
}

struct OpenEntry {
    /// The coffre key named by the blob (its 16-byte id, in clear in the
    /// blob's header), to purge by key.
    key_id: Vec<u8>,
    data_key: Arc<DataKey>,
    born: Instant,
}

#[derive(Default)]
struct Entries {
    seal: HashMap<(String, BTreeMap<String, String>), SealEntry>,
    open: HashMap<(Vec<u8>, BTreeMap<String, String>), OpenEntry>,
    stats: CacheStats,
}

/// A [`DataKeySource`] with a bounded cache in front of it.
pub struct CachingClient<S: DataKeySource = Client> {
    source: S,
    limits: CacheLimits,
    entries: Mutex<Entries>,
}

impl<S: DataKeySource> std::fmt::Debug for CachingClient<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachingClient")
            .field("limits", &self.limits)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// The key id a coffre blob names (bytes 4..20 of format v1).
fn blob_key_id(blob: &[u8]) -> Vec<u8> {
    blob.get(4..20).unwrap_or_default().to_vec()
}

impl<S: DataKeySource> CachingClient<S> {
    pub fn new(source: S, limits: CacheLimits) -> Self {
        CachingClient {
            source,
            limits,
            entries: Mutex::new(Entries::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where the data keys come from.
    pub fn source(&self) -> &S {
        &self.source
    }

    pub fn stats(&self) -> CacheStats {
        self.lock().stats
    }

    /// Forgets every cached data key.
    pub fn clear(&self) {
        let mut e = self.lock();
        e.seal.clear();
        e.open.clear();
    }

    /// After a refusal naming `key` (as the caller named it) or `key_id`
    /// (a blob's): every entry of that key goes.
    fn purge(&self, key: Option<&str>, key_id: Option<&[u8]>) {
        let mut e = self.lock();
        let before = e.seal.len() + e.open.len();
        let mut ids: Vec<Vec<u8>> = key_id.map(<[u8]>::to_vec).into_iter().collect();
        if let Some(key) = key {
            ids.extend(
                e.seal
                    .iter()
                    .filter(|((k, _), _)| k == key)
                    .map(|(_, entry)| blob_key_id(&entry.key.blob)),
            );
            e.seal.retain(|(k, _), _| k != key);
        }
        e.seal
            .retain(|_, entry| !ids.contains(&blob_key_id(&entry.key.blob)));
        e.open.retain(|_, entry| !ids.contains(&entry.key_id));
        let after = e.seal.len() + e.open.len();
        e.stats.purged += (before - after) as u64;
    }

    fn evict_if_full(e: &mut Entries, max: usize) {
        while e.seal.len() + e.open.len() >= max.max(1) {
            let oldest_seal = e
                .seal
                .iter()
                .min_by_key(|(_, v)| v.born)
                .map(|(k, v)| (k.clone(), v.born));
            let oldest_open = e
                .open
                .iter()
                .min_by_key(|(_, v)| v.born)
                .map(|(k, v)| (k.clone(), v.born));
            match (oldest_seal, oldest_open) {
                (Some((k, a)), Some((_, b))) if a <= b => {
                    e.seal.remove(&k);
                }
                (_, Some((k, _))) => {
                    e.open.remove(&k);
                }
                (Some((k, _)), None) => {
                    e.seal.remove(&k);
                }
                (None, None) => return,
            }
        }
    }

    /// A data key of `key` for `context` to seal a message of about
    /// `len` bytes: a cached one within the limits, else a new one.
    pub async fn sealing_key(
        &self,
        key: &str,
        context: &BTreeMap<String, String>,
        len: u64,
    ) -> Result<Arc<GeneratedKey>, ClientError> {
        let id = (key.to_string(), context.clone());
        {
            let mut e = self.lock();
            let l = self.limits;
            let usable = e.seal.get(&id).is_some_and(|entry| {
                entry.born.elapsed() < l.max_age
                    && entry.messages < l.max_messages
                    && entry.bytes.saturating_add(len) <= l.max_bytes
            });
            if usable {
                e.stats.seal_hits += 1;
                if let Some(entry) = e.seal.get_mut(&id) {
                    entry.messages += 1;
                    entry.bytes = entry.bytes.saturating_add(len);
                    return Ok(Arc::clone(&entry.key));
                }
            }
            e.seal.remove(&id);
            e.stats.generate_calls += 1;
        }
        let generated = match self.source.generate_data_key(key, context).await {
            Ok(g) => Arc::new(g),
            Err(err) => {
                if refuses_the_key(&err) {
                    self.purge(Some(key), None);
                }
                return Err(err);
            }
        };
        if len <= self.limits.max_bytes {
            let mut e = self.lock();
            Self::evict_if_full(&mut e, self.limits.max_entries);
            e.seal.insert(
                id,
                SealEntry {
                    key: Arc::clone(&generated),
                    born: Instant::now(),
                    messages: 1,
                    bytes: len,
                },
            );
        }
        Ok(generated)
    }

    /// The data key of `blob` for `context`: cached for `max_age`, else
    /// coffre's Decrypt.
    pub async fn opening_key(
        &self,
        blob: &[u8],
        context: &BTreeMap<String, String>,
    ) -> Result<Arc<DataKey>, ClientError> {
        let id = (blob.to_vec(), context.clone());
        {
            let mut e = self.lock();
            if let Some(entry) = e.open.get(&id) {
                if entry.born.elapsed() < self.limits.max_age {
                    let key = Arc::clone(&entry.data_key);
                    e.stats.open_hits += 1;
                    return Ok(key);
                }
            }
            e.open.remove(&id);
            e.stats.decrypt_calls += 1;
        }
        let data_key = match self.source.decrypt(blob, context).await {
            Ok(k) => Arc::new(k),
            Err(err) => {
                if refuses_the_key(&err) {
                    self.purge(None, Some(&blob_key_id(blob)));
                }
                return Err(err);
            }
        };
        let mut e = self.lock();
        Self::evict_if_full(&mut e, self.limits.max_entries);
        e.open.insert(
            id,
            OpenEntry {
                key_id: blob_key_id(blob),
                data_key: Arc::clone(&data_key),
                born: Instant::now(),
            },
        );
        Ok(data_key)
    }

    /// Seals `plaintext` (a small object) into a new message.
    pub async fn seal_bytes(
        &self,
        key: &str,
        context: &BTreeMap<String, String>,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, ClientError> {
        crate::format::check_context(context).map_err(FormatError::InvalidInput)?;
        let generated = self
            .sealing_key(key, context, plaintext.len() as u64)
            .await?;
        let mut out = Vec::with_capacity(plaintext.len() + 256);
        let mut sealer = Sealer::new(
            &mut out,
            &generated.data_key,
            context.clone(),
            generated.blob.clone(),
            DEFAULT_FRAME_LEN,
        )?;
        sealer.write_all(plaintext).map_err(FormatError::Io)?;
        sealer.finish()?;
        Ok(out)
    }

    /// Opens a whole message; its plaintext and its header.
    pub async fn open_bytes(
        &self,
        message: &[u8],
        expected: Option<&BTreeMap<String, String>>,
    ) -> Result<(Vec<u8>, Header), ClientError> {
        let mut input = message;
        let header = Header::read_from(&mut input)?;
        if let Some(expected) = expected {
            if *expected != header.context {
                return Err(ClientError::ContextMismatch {
                    found: header.context.clone(),
                });
            }
        }
        let data_key = self.opening_key(&header.blob, &header.context).await?;
        let mut opener = Opener::new(input, &header, &data_key)?;
        // Zeroized if opening fails half-way; the caller's once returned.
        let mut out = zeroize::Zeroizing::new(Vec::with_capacity(message.len()));
        opener.read_to_end(&mut out).map_err(unwrap_io)?;
        Ok((std::mem::take(&mut *out), header))
    }
}

/// A refusal that says the key may not be used now: its entries go.
fn refuses_the_key(e: &ClientError) -> bool {
    matches!(e, ClientError::KeyUnusable(_) | ClientError::Refused(_))
}

fn unwrap_io(e: std::io::Error) -> ClientError {
    if e.get_ref().is_some_and(|inner| inner.is::<FormatError>()) {
        return ClientError::Format(FormatError::NotAuthentic);
    }
    ClientError::Format(FormatError::Io(e))
}
