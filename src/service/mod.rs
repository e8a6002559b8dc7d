//! The service core: authorization, key lifecycle and data-key operations.
//!
//! It knows the seams ([`Hsm`], [`KeyStore`], [`Authorizer`], [`Clock`]) and
//! the domain types, never tonic or sled. Every public method takes the
//! authenticated [`Caller`] and checks it first.
//!
//! Hot path: a data-key request whose key record and CMK version are cached
//! does no storage or HSM I/O, takes only shared locks, and needs no
//! store call. A miss loads the record from the (async) store
//! and unwraps the version in the HSM, then caches both.
//!
//! Consistency: this process is the only writer of its store. Every key
//! change (create, rotate, disable, enable) is serialized by `write_lock`,
//! made durable in the store first, and only then published to the cache;
//! data-key requests that start after the change returns see it.
//!
//! A reader that misses the cache and loads a record from the store must not
//! put a stale copy back after a writer published a newer one (that would
//! undo a `DisableKey`). Writers make `write_epoch` odd for the whole of
//! their change; a reader caches what it read only if the epoch was even
//! before its read and is unchanged when it inserts — checked under the
//! cache's lock, which the writer's publish also takes. Otherwise it uses the
//! record for its own request (it overlapped the write) without caching it.
//!
//! On a shared store, the change feed's poller forgets keys another node
//! changed (`freshness`). It does not wait for this node's writers (a
//! write holds its guard through HSM calls and a commit, and a poll that
//! waited would let the node's freshness lapse): it bumps `feed_epoch`
//! first, then forgets. A reader caches only if `feed_epoch` too is
//! unchanged since before its read, and a writer publishes only if it is
//! unchanged since its guard was taken; otherwise the writer drops its
//! key from the cache, and the next read loads the store's truth.

mod audit_keys;
pub use audit_keys::{
    AUDIT_MARK_NAME, INTEGRITY_OPERATION, INTEGRITY_PRINCIPAL, node_audit_mark_name,
};
mod audit_reads;
mod cache;
pub mod canonical;
mod datakeys;
mod durable;
pub mod freshness;
mod keys;
mod lifecycle;
mod policy;
mod quorum;
mod ratelimit;
mod rootkey;
pub mod xks;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{Mutex, MutexGuard};

pub use audit_reads::{AuditCheckpoint, AuditReader, DEFAULT_AUDIT_PAGE, MAX_AUDIT_PAGE};
pub use cache::BoundedCache;
pub use datakeys::{
    BatchDataKeys, DEFAULT_DATA_KEY_BYTES, DataKeyItem, DataKeyOutput, DecryptItem, DecryptOutput,
    MAX_BATCH_ITEMS, MAX_DATA_KEY_BYTES, MIN_DATA_KEY_BYTES, ReEncryptOutput,
};
pub use keys::{CreateKeyInput, KeyPage, KeyView};
pub use lifecycle::{
    Announce, DEFAULT_DELETION_DAYS, MAX_DELETION_DAYS, MAX_ROTATION_PERIOD, MIN_DELETION_DAYS,
    MIN_ROTATION_PERIOD, SchedulerReport, check_rotation_period,
};
pub use quorum::{QuorumOptions, parse_approval_id};
pub use ratelimit::{RateLimit, RateLimits, Refusal};
pub use rootkey::RootRotationProgress;

use crate::authz::{Authorizer, Caller, Operation, Role};
use crate::crypto::Rng;
use crate::error::{Error, Result};
use crate::hsm::{Hsm, HsmError};
use crate::model::{Clock, KeyId, KeyRecord, KeyRef, cmk_wrap_aad};
use crate::secret::CmkMaterial;
use crate::store::KeyStore;

/// Tunables of the core.
#[derive(Clone, Debug)]
pub struct KmsOptions {
    /// Key records kept in memory.
    pub key_cache_capacity: usize,
    /// Unwrapped CMK versions kept in memory.
    pub material_cache_capacity: usize,
    /// The policy of a key created without one.
    pub default_policy: crate::model::KeyPolicy,
    /// Per-principal rate limits (none by default: `coffre serve` sets its
    /// own, see `crate::config`), charged by the pipeline.
    pub rate_limits: RateLimits,
    /// M-of-N approvals for sensitive operations (none by default).
    pub quorum: QuorumOptions,
}

impl Default for KmsOptions {
    fn default() -> Self {
        Self {
            key_cache_capacity: 100_000,
            material_cache_capacity: 100_000,
            default_policy: crate::model::KeyPolicy::default(),
            rate_limits: RateLimits::default(),
            quorum: QuorumOptions::default(),
        }
    }
}

/// The key management service.
#[derive(Debug)]
pub struct Kms {
    store: Arc<dyn KeyStore>,
    hsm: Arc<dyn Hsm>,
    authz: Arc<dyn Authorizer>,
    clock: Arc<dyn Clock>,
    rng: Rng,
    default_policy: crate::model::KeyPolicy,
    limiter: ratelimit::RateLimiter,
    quorum: QuorumOptions,
    /// The approval files of a data directory from before approvals were
    /// in the store: imported into the store once, at start.
    legacy_approvals: Option<Arc<crate::store::approvals::ApprovalStore>>,
    /// This process's id, which an approval it is executing names.
    incarnation: uuid::Uuid,
    keys: BoundedCache<KeyId, Arc<KeyRecord>>,
    aliases: BoundedCache<String, KeyId>,
    materials: BoundedCache<(KeyId, u32), Arc<CmkMaterial>>,
    /// The HSM object of each version of protection level HSM, as its
    /// record names it (immutable once written).
    objects: BoundedCache<(KeyId, u32), Arc<str>>,
    /// Ids and aliases the store did not know, and when it said so: a
    /// lookup of one within [`NEGATIVE_TTL`] does no store read (see
    /// [`Kms::resolve`]).
    missing: BoundedCache<Missing, std::time::Instant>,
    write_lock: Mutex<()>,
    /// Odd while a key change is in progress; see the module docs.
    write_epoch: AtomicU64,
    /// Bumped by each pass of the change feed that forgets keys changed
    /// by another node, before it forgets them; see the module docs.
    feed_epoch: AtomicU64,
    /// One HSM root-key rotation at a time.
    root_rotation: Mutex<()>,
    /// The scheduler has checked, since start, whether a compaction is owed.
    started_compaction_check: std::sync::atomic::AtomicBool,
    /// A compaction failed and must be retried.
    compaction_due: std::sync::atomic::AtomicBool,
    /// Calls to the HSM, counted and timed by the `MeteredHsm` around it.
    hsm_counters: Arc<crate::metrics::HsmCounters>,
    /// The audit log, for its read side (`audit_reads.rs`).
    audit_log: std::sync::OnceLock<Arc<crate::audit::AuditTrail>>,
    /// Set when other nodes share the store (`freshness.rs`).
    freshness: Option<freshness::Freshness>,
    /// Leases for the work one node at a time does (root-key rotation),
    /// and the durability barrier.
    coordination: Arc<dyn crate::cluster::Coordination>,
    /// Versions not yet known to survive a failover (`durable.rs`).
    unconfirmed: durable::Unconfirmed,
}

/// How long "no such key" is believed without asking the store again.
pub const NEGATIVE_TTL: std::time::Duration = std::time::Duration::from_secs(2);
/// How many unknown ids and aliases are remembered at most.
const NEGATIVE_CAPACITY: usize = 10_000;

/// A key the store did not have, as it was named.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Missing {
    Id(KeyId),
    Alias(String),
}

/// Held for the whole of a key change: serializes writers and keeps the
/// write epoch odd until dropped.
struct WriteGuard<'a> {
    epoch: &'a AtomicU64,
    /// The feed epoch when the change began: publishing is refused once a
    /// feed pass has forgotten keys since.
    feed_epoch: u64,
    _lock: MutexGuard<'a, ()>,
}

/// What a reader notes before a store read, for [`Kms::cache_if_current`]
/// and [`Kms::remember_missing`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ReadEpoch {
    write: u64,
    feed: u64,
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }
}

impl Kms {
    pub fn new(
        store: Arc<dyn KeyStore>,
        hsm: Arc<dyn Hsm>,
        authz: Arc<dyn Authorizer>,
        clock: Arc<dyn Clock>,
        options: KmsOptions,
    ) -> Self {
        let hsm_counters = Arc::new(crate::metrics::HsmCounters::default());
        let hsm: Arc<dyn Hsm> = Arc::new(crate::hsm::metered::MeteredHsm::new(
            hsm,
            Arc::clone(&hsm_counters),
        ));
        Self {
            store,
            hsm,
            authz,
            clock,
            rng: Rng::default(),
            default_policy: options.default_policy.clone(),
            limiter: ratelimit::RateLimiter::new(options.rate_limits.clone()),
            quorum: options.quorum.clone(),
            legacy_approvals: None,
            incarnation: uuid::Uuid::new_v4(),
            keys: BoundedCache::new(options.key_cache_capacity),
            aliases: BoundedCache::new(options.key_cache_capacity),
            materials: BoundedCache::new(options.material_cache_capacity),
            objects: BoundedCache::new(options.material_cache_capacity),
            missing: BoundedCache::new(NEGATIVE_CAPACITY),
            write_lock: Mutex::new(()),
            write_epoch: AtomicU64::new(0),
            feed_epoch: AtomicU64::new(0),
            root_rotation: Mutex::new(()),
            started_compaction_check: std::sync::atomic::AtomicBool::new(false),
            compaction_due: std::sync::atomic::AtomicBool::new(false),
            hsm_counters,
            audit_log: std::sync::OnceLock::new(),
            freshness: None,
            coordination: Arc::new(crate::cluster::LocalCoordination::default()),
            unconfirmed: durable::Unconfirmed::default(),
        }
    }

    /// The core's metric families: caches and HSM calls.
    pub fn render_metrics(&self, out: &mut String) {
        let caches = [
            ("key", self.keys.stats()),
            ("alias", self.aliases.stats()),
            ("material", self.materials.stats()),
            ("missing", self.missing.stats()),
        ];
        let hits: Vec<_> = caches
            .iter()
            .map(|(name, (h, _))| (format!("cache=\"{name}\""), *h as f64))
            .collect();
        let misses: Vec<_> = caches
            .iter()
            .map(|(name, (_, m))| (format!("cache=\"{name}\""), *m as f64))
            .collect();
        fn as_refs(v: &[(String, f64)]) -> Vec<(&str, f64)> {
            v.iter().map(|(l, n)| (l.as_str(), *n)).collect()
        }
        crate::metrics::render_value(
            out,
            "coffre_cache_hits_total",
            "counter",
            "Lookups answered by a cache.",
            &as_refs(&hits),
        );
        crate::metrics::render_value(
            out,
            "coffre_cache_misses_total",
            "counter",
            "Lookups a cache could not answer.",
            &as_refs(&misses),
        );
        self.hsm_counters.render(out);
        if let Some((stale_requests, overdue)) = self.staleness() {
            crate::metrics::render_value(
                out,
                "coffre_cluster_staleness_seconds",
                "gauge",
                "How long this node's freshness has run out (0 while its caches are known \
                 current with the other nodes' changes).",
                &[("", overdue)],
            );
            crate::metrics::render_value(
                out,
                "coffre_cluster_stale_requests_total",
                "counter",
                "Data-key requests that met this node stale (refused in strict mode).",
                &[("", stale_requests as f64)],
            );
        }
    }

    /// The leases of the cluster this core's node belongs to (alone on
    /// its store by default: every lease its own).
    pub fn with_coordination(
        mut self,
        coordination: Arc<dyn crate::cluster::Coordination>,
    ) -> Self {
        self.coordination = coordination;
        self
    }

    /// The approvals directory of a data directory from before approvals
    /// were kept in the key store: [`Kms::store_integrity`] moves them in.
    pub fn with_legacy_approvals(mut self, files: crate::store::approvals::ApprovalStore) -> Self {
        self.legacy_approvals = Some(Arc::new(files));
        self
    }

    pub fn hsm(&self) -> &Arc<dyn Hsm> {
        &self.hsm
    }

    /// (hits, misses) of the CMK version cache.
    pub fn material_cache_stats(&self) -> (u64, u64) {
        self.materials.stats()
    }

    /// Readiness: the HSM performs a key operation in a session (a tampered
    /// token or a refused login fails here), and the store answers a read.
    ///
    /// A tamper response found here (the server probes every second) also
    /// drops every cached CMK version: see [`Kms::forget_materials_if_tampered`].
    pub async fn check_ready(&self) -> Result<()> {
        self.check_hsm().await?;
        self.check_store().await?;
        self.check_fresh_for_readiness()
    }

    /// The HSM half of [`Kms::check_ready`]: a key operation in a session.
    pub async fn check_hsm(&self) -> Result<()> {
        if let Err(e) = self.hsm.generate_random(16).await {
            self.forget_materials_if_tampered(&e);
            return Err(e.into());
        }
        Ok(())
    }

    /// The store half of [`Kms::check_ready`]: a read that decodes no key
    /// record. One record failing its MAC is that record's problem
    /// (refused, counted when it is used), not a reason to report the
    /// whole node NOT_SERVING every second.
    pub async fn check_store(&self) -> Result<()> {
        self.store
            .get_secret(crate::audit::keys::AUDIT_SECRET_NAME)
            .await?;
        Ok(())
    }

    /// Starts a key change (see the module docs).
    async fn begin_write(&self) -> WriteGuard<'_> {
        let lock = self.write_lock.lock().await;
        self.write_epoch.fetch_add(1, Ordering::SeqCst);
        WriteGuard {
            epoch: &self.write_epoch,
            feed_epoch: self.feed_epoch.load(Ordering::SeqCst),
            _lock: lock,
        }
    }

    /// The epochs to pass to [`Kms::cache_if_current`] after a store read.
    fn read_epoch(&self) -> ReadEpoch {
        ReadEpoch {
            write: self.write_epoch.load(Ordering::SeqCst),
            feed: self.feed_epoch.load(Ordering::SeqCst),
        }
    }

    /// Whether no key change, here or from the feed, overlapped a read
    /// that started at `epoch`.
    fn still_current(&self, epoch: ReadEpoch) -> bool {
        epoch.write % 2 == 0 && self.read_epoch() == epoch
    }

    /// Caches a record read from the store if no key change overlapped the
    /// read that started at `epoch`.
    fn cache_if_current(&self, record: &Arc<KeyRecord>, epoch: ReadEpoch) {
        if epoch.write % 2 == 1 {
            return;
        }
        self.keys
            .insert_if(record.id, Arc::clone(record), || self.still_current(epoch));
    }

    /// The caller's role on this server, if any (for audit records).
    pub fn role_of(&self, caller: &Caller) -> Option<Role> {
        self.authz.role_of(caller)
    }

    /// Charges the rate limits for a request of `items` items (1 unless a
    /// batch) from `principal` (`None`: a certificate without one). The
    /// request pipeline calls this first, before any field is converted;
    /// the core's own [`Kms::authorize`] does not charge again.
    pub fn admit(
        &self,
        principal: Option<&str>,
        items: u32,
        batch: bool,
    ) -> std::result::Result<(), Refusal> {
        self.limiter.admit(principal, items, batch)
    }

    /// Authorizes an operation before the core is given its items (a batch
    /// whose items are converted one by one): the role.
    pub fn authorize_only(&self, caller: &Caller, op: Operation) -> Result<Role> {
        self.authorize(caller, op)
    }

    /// The role check. The rate limit was charged before the request
    /// reached the core (`Kms::admit`, by the pipeline).
    fn authorize(&self, caller: &Caller, op: Operation) -> Result<Role> {
        self.authz.authorize(caller, op).map_err(|denied| {
            tracing::warn!(principal = %caller.principal, operation = op.name(), reason = %denied, "request refused");
            Error::PermissionDenied(denied.0)
        })
    }

    /// The key a caller names, from the cache or the store.
    ///
    /// "No such key" is cached too, for [`NEGATIVE_TTL`], so that a stream
    /// of requests naming keys that do not exist costs no store reads, and a
    /// refusal for an unknown key does the same work as one for a key the
    /// caller may not use: a cache lookup (security review L4, M3). A key
    /// created meanwhile is found at once: [`Kms::publish`] forgets the
    /// negative entries of its id and alias, and a reader whose lookup
    /// overlapped a key change does not cache its "no such key" (the write
    /// epoch, as for records).
    async fn resolve(&self, key: &KeyRef) -> Result<Arc<KeyRecord>> {
        let id = match key {
            KeyRef::Id(id) => *id,
            KeyRef::Alias(alias) => match self.aliases.get(alias) {
                Some(id) => id,
                None => {
                    let missing = Missing::Alias(alias.clone());
                    if self.known_missing(&missing) {
                        return Err(Error::KeyNotFound(key.to_string()));
                    }
                    let epoch = self.read_epoch();
                    let lookup = alias.clone();
                    let found = self.store.key_id_for_alias(&lookup).await?;
                    let Some(id) = found else {
                        self.remember_missing(missing, epoch);
                        return Err(Error::KeyNotFound(key.to_string()));
                    };
                    self.aliases.insert(alias.clone(), id);
                    id
                }
            },
        };
        self.record(id)
            .await?
            .ok_or_else(|| Error::KeyNotFound(key.to_string()))
    }

    async fn record(&self, id: KeyId) -> Result<Option<Arc<KeyRecord>>> {
        if let Some(record) = self.keys.get(&id) {
            return Ok(Some(record));
        }
        if self.known_missing(&Missing::Id(id)) {
            return Ok(None);
        }
        let epoch = self.read_epoch();
        let Some(record) = self.store.get_key(id).await? else {
            self.remember_missing(Missing::Id(id), epoch);
            return Ok(None);
        };
        let record = Arc::new(record);
        self.cache_if_current(&record, epoch);
        Ok(Some(record))
    }

    /// The store said, less than [`NEGATIVE_TTL`] ago, that it has no such key.
    fn known_missing(&self, missing: &Missing) -> bool {
        self.missing
            .get(missing)
            .is_some_and(|at| at.elapsed() < NEGATIVE_TTL)
    }

    /// Caches "no such key" from a read that started at `epoch`, unless a
    /// key change overlapped it.
    fn remember_missing(&self, missing: Missing, epoch: ReadEpoch) {
        if epoch.write % 2 == 1 {
            return;
        }
        self.missing
            .insert_if(missing, std::time::Instant::now(), || {
                self.still_current(epoch)
            });
    }

    /// Forgets that the key's id and alias were missing: a writer calls
    /// this, holding its [`WriteGuard`], once the key is durable.
    fn forget_missing(&self, record: &KeyRecord) {
        if let Some(alias) = &record.alias {
            self.missing.remove(&Missing::Alias(alias.clone()));
        }
        self.missing.remove(&Missing::Id(record.id));
    }

    /// Publishes a record that is durable in the store. Only writers call
    /// this, holding their [`WriteGuard`]. If the change feed forgot keys
    /// since the guard was taken, another node may have changed this one
    /// after this write: the record is returned to the caller but not
    /// cached (and any older copy is dropped), so the next read loads the
    /// store's truth.
    fn publish(&self, writing: &WriteGuard<'_>, record: KeyRecord) -> Arc<KeyRecord> {
        let record = Arc::new(record);
        self.forget_missing(&record);
        if let Some(alias) = &record.alias {
            self.aliases.insert(alias.clone(), record.id);
        }
        let unchanged = || self.feed_epoch.load(Ordering::SeqCst) == writing.feed_epoch;
        if !self
            .keys
            .insert_if(record.id, Arc::clone(&record), unchanged)
        {
            self.keys.remove(&record.id);
        }
        record
    }

    /// After a tamper response the HSM has destroyed its root keys to make
    /// every key unusable; the CMK versions cached here would defeat that,
    /// so they are dropped (and zeroized) too, and data-key requests fail
    /// with `UNAVAILABLE` from then on. An outage, by contrast, leaves the
    /// cache alone (SECURITY.md, "HSM faults").
    fn forget_materials_if_tampered(&self, e: &HsmError) {
        if matches!(e, HsmError::Tampered) && !self.materials.is_empty() {
            tracing::error!(
                cached = self.materials.len(),
                "the HSM reports a tamper response: dropping every cached CMK version"
            );
            self.materials.clear();
        }
    }

    /// The material of one CMK version: cached, else unwrapped by the HSM.
    async fn material(&self, id: KeyId, version: u32) -> Result<Arc<CmkMaterial>> {
        if let Some(m) = self.materials.get(&(id, version)) {
            return Ok(m);
        }
        let mark = self.version_mark();
        let record = self.store.get_version(id, version).await?.ok_or_else(|| {
            Error::Internal(format!(
                "version {version} of key {id} is missing from the store"
            ))
        })?;
        if record.hsm_object.is_some() {
            return Err(Error::Internal(format!(
                "version {version} of key {id} is held by the HSM: its material is never unwrapped"
            )));
        }
        let clear = self
            .hsm
            .unwrap(&record.wrapped_material, &cmk_wrap_aad(id, version))
            .await
            .inspect_err(|e| self.forget_materials_if_tampered(e))?;
        let material = CmkMaterial::from_slice(clear.expose()).ok_or_else(|| {
            Error::Internal(format!(
                "version {version} of key {id} unwrapped to {} bytes",
                clear.len()
            ))
        })?;
        let material = Arc::new(material);
        self.note_version(id, version, mark);
        self.materials.insert((id, version), Arc::clone(&material));
        Ok(material)
    }
}

#[cfg(test)]
mod freshness_tests;
#[cfg(test)]
mod lifecycle_tests;
#[cfg(test)]
mod quorum_tests;
#[cfg(test)]
mod tests;
