//! Per-principal rate limits: one token bucket per caller, so that a runaway
//! service gets `RESOURCE_EXHAUSTED` without starving the others.
//!
//! The request pipeline charges them first, before any field of a request
//! is converted ([`RateLimiter::admit`]): a request costs one token, a batch
//! one token per item (and as many from the principal's `batch` bucket), and
//! a request whose certificate names no principal draws from one bucket
//! shared by all of them (`unauthenticated`). The core does not charge again.
//!
//! Buckets live in 16 independently locked shards (hashed by principal): a
//! check is a short critical section on one shard, never a global lock.
//! Time is monotonic (`Instant`), not the injectable wall clock: a limit is
//! about elapsed time, which a wall-clock jump must not refill.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// A sustained rate and the burst allowed above it.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: f64,
}

impl RateLimit {
    pub fn validate(&self) -> Result<(), String> {
        let ok = self.per_second.is_finite()
            && self.per_second > 0.0
            && self.burst.is_finite()
            && self.burst >= 1.0;
        if ok {
            Ok(())
        } else {
            Err("a rate limit needs per_second > 0 and burst >= 1".into())
        }
    }
}

/// The configured limits: a default for every principal, overrides, the
/// bucket of callers without a principal, and the batch-item bucket.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimits {
    pub default: Option<RateLimit>,
    #[serde(default)]
    pub principals: HashMap<String, RateLimit>,
    /// One bucket shared by every request whose certificate names no
    /// principal (default: `default`'s limit).
    pub unauthenticated: Option<RateLimit>,
    /// Items of batch requests, per principal, charged on top of the
    /// principal's own bucket (none: batch items cost only that).
    pub batch: Option<RateLimit>,
}

impl RateLimits {
    /// Every limit set, named as the configuration names it.
    pub fn all(&self) -> impl Iterator<Item = (String, &RateLimit)> {
        let named = [
            ("default", &self.default),
            ("unauthenticated", &self.unauthenticated),
            ("batch", &self.batch),
        ];
        named
            .into_iter()
            .filter_map(|(n, l)| l.as_ref().map(|l| (n.to_string(), l)))
            .chain(self.principals.iter().map(|(p, l)| (p.clone(), l)))
    }
}

/// A request the limiter refused: how long until it could pass, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    pub retry_in: Duration,
    /// The request needs more tokens than the bucket ever holds (a batch
    /// larger than the burst): it never passes.
    pub never: bool,
}

impl Refusal {
    /// The message a refused caller reads.
    pub fn message(&self, principal: Option<&str>) -> String {
        let who = principal.map_or_else(
            || "callers without a principal".to_string(),
            |p| p.to_string(),
        );
        if self.never {
            format!(
                "rate limit exceeded for {who}: the request needs more tokens than the burst allows"
            )
        } else {
            format!(
                "rate limit exceeded for {who}; retry in {} ms",
                self.retry_in.as_millis().max(1)
            )
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Principal,
    Unauthenticated,
    Batch,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

const SHARDS: usize = 16;

#[derive(Debug)]
pub struct RateLimiter {
    limits: RateLimits,
    hasher: RandomState,
    shards: Vec<Mutex<HashMap<(Kind, String), Bucket>>>,
}

impl RateLimiter {
    pub fn new(limits: RateLimits) -> Self {
        Self {
            limits,
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// Takes one token for `principal`; when none is left, how long until
    /// one is.
    #[cfg(test)]
    pub fn check(&self, principal: &str) -> Result<(), Duration> {
        self.admit(Some(principal), 1, false)
            .map_err(|r| r.retry_in)
    }

    /// Admits a request of `items` items (1 unless a batch) from
    /// `principal` (`None`: a certificate without one): `items` tokens from
    /// the principal's bucket (or the shared unauthenticated one), and for
    /// a batch as many from its batch bucket. All or nothing: a refused
    /// request takes no token.
    pub fn admit(&self, principal: Option<&str>, items: u32, batch: bool) -> Result<(), Refusal> {
        let n = f64::from(items.max(1));
        let (kind, key, limit) = match principal {
            Some(p) => (
                Kind::Principal,
                p,
                self.limits
                    .principals
                    .get(p)
                    .or(self.limits.default.as_ref()),
            ),
            None => (
                Kind::Unauthenticated,
                "",
                self.limits
                    .unauthenticated
                    .as_ref()
                    .or(self.limits.default.as_ref()),
            ),
        };
        let batch_limit = if batch {
            self.limits.batch.as_ref()
        } else {
            None
        };
        if let Some(limit) = batch_limit {
            self.take(Kind::Batch, key, limit, n)?;
        }
        if let Some(limit) = limit
            && let Err(refused) = self.take(kind, key, limit, n)
        {
            if let Some(limit) = batch_limit {
                self.give_back(Kind::Batch, key, limit, n);
            }
            return Err(refused);
        }
        Ok(())
    }

    fn shard(&self, kind: Kind, key: &str) -> Option<&Mutex<HashMap<(Kind, String), Bucket>>> {
        let h = self.hasher.hash_one((kind, key));
        self.shards
            .get(usize::try_from(h % SHARDS as u64).unwrap_or(0))
    }

    fn take(&self, kind: Kind, key: &str, limit: &RateLimit, n: f64) -> Result<(), Refusal> {
        let Some(shard) = self.shard(kind, key) else {
            return Ok(());
        };
        let mut buckets = shard.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let bucket = buckets.entry((kind, key.to_string())).or_insert(Bucket {
            tokens: limit.burst,
            last: now,
        });
        let elapsed = now.duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * limit.per_second).min(limit.burst);
        bucket.last = now;
        if bucket.tokens >= n {
            bucket.tokens -= n;
            Ok(())
        } else {
            Err(Refusal {
                retry_in: Duration::from_secs_f64(
                    ((n - bucket.tokens) / limit.per_second).min(86_400.0),
                ),
                never: n > limit.burst,
            })
        }
    }

    fn give_back(&self, kind: Kind, key: &str, limit: &RateLimit, n: f64) {
        if let Some(shard) = self.shard(kind, key) {
            let mut buckets = shard.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(bucket) = buckets.get_mut(&(kind, key.to_string())) {
                bucket.tokens = (bucket.tokens + n).min(limit.burst);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(default: Option<RateLimit>, overrides: &[(&str, RateLimit)]) -> RateLimits {
        RateLimits {
            default,
            principals: overrides.iter().map(|(p, l)| (p.to_string(), *l)).collect(),
            ..RateLimits::default()
        }
    }

    #[test]
    fn a_burst_then_refusal_per_principal() {
        let slow = RateLimit {
            per_second: 0.001,
            burst: 3.0,
        };
        let limiter = RateLimiter::new(limits(Some(slow), &[]));
        for _ in 0..3 {
            assert!(limiter.check("runaway").is_ok());
        }
        let wait = limiter.check("runaway").unwrap_err();
        assert!(wait > Duration::from_secs(100), "{wait:?}");
        // Another principal has its own bucket.
        for _ in 0..3 {
            assert!(limiter.check("polite").is_ok());
        }
    }

    #[test]
    fn overrides_and_no_limit() {
        let tight = RateLimit {
            per_second: 0.001,
            burst: 1.0,
        };
        let limiter = RateLimiter::new(limits(None, &[("batch", tight)]));
        assert!(limiter.check("batch").is_ok());
        assert!(limiter.check("batch").is_err());
        for _ in 0..1000 {
            assert!(
                limiter.check("anyone else").is_ok(),
                "no default: unlimited"
            );
        }
    }

    #[test]
    fn tokens_come_back_with_time() {
        let fast = RateLimit {
            per_second: 1000.0,
            burst: 1.0,
        };
        let limiter = RateLimiter::new(limits(Some(fast), &[]));
        assert!(limiter.check("p").is_ok());
        std::thread::sleep(Duration::from_millis(20));
        assert!(limiter.check("p").is_ok(), "refilled after 20 ms at 1000/s");
    }

    #[test]
    fn invalid_limits_are_refused() {
        for (per_second, burst) in [
            (0.0, 1.0),
            (1.0, 0.5),
            (f64::NAN, 1.0),
            (1.0, f64::INFINITY),
        ] {
            assert!(RateLimit { per_second, burst }.validate().is_err());
        }
    }

    const SLOW: f64 = 0.001;

    #[test]
    fn a_batch_costs_one_token_per_item_all_or_nothing() {
        let limits = RateLimits {
            default: Some(RateLimit {
                per_second: SLOW,
                burst: 1000.0,
            }),
            batch: Some(RateLimit {
                per_second: SLOW,
                burst: 1500.0,
            }),
            ..RateLimits::default()
        };
        let limiter = RateLimiter::new(limits);
        assert!(limiter.admit(Some("svc"), 1000, true).is_ok());
        // The principal's bucket is empty: the next batch is refused, and
        // the batch bucket gets its tokens back.
        let refused = limiter.admit(Some("svc"), 500, true).unwrap_err();
        assert!(!refused.never);
        assert!(limiter.check("svc").is_err());
        // A batch larger than the burst never passes.
        let other = limiter.admit(Some("other"), 1001, true).unwrap_err();
        assert!(other.never, "{other:?}");
        // Nothing was taken by the refusal: 1000 items still pass.
        assert!(limiter.admit(Some("other"), 1000, true).is_ok());
    }

    #[test]
    fn the_batch_bucket_refuses_on_its_own() {
        let limits = RateLimits {
            default: Some(RateLimit {
                per_second: SLOW,
                burst: 10_000.0,
            }),
            batch: Some(RateLimit {
                per_second: SLOW,
                burst: 999.0,
            }),
            ..RateLimits::default()
        };
        let limiter = RateLimiter::new(limits);
        assert!(limiter.admit(Some("svc"), 1000, true).unwrap_err().never);
        assert!(limiter.admit(Some("svc"), 999, true).is_ok());
        assert!(limiter.admit(Some("svc"), 1, true).is_err());
        // Single requests do not draw from the batch bucket, and the
        // refused batches took nothing from the principal's.
        for _ in 0..9000 {
            assert!(limiter.admit(Some("svc"), 1, false).is_ok());
        }
    }

    #[test]
    fn callers_without_a_principal_share_one_bucket() {
        let limits = RateLimits {
            unauthenticated: Some(RateLimit {
                per_second: SLOW,
                burst: 2.0,
            }),
            ..RateLimits::default()
        };
        let limiter = RateLimiter::new(limits);
        assert!(limiter.admit(None, 1, false).is_ok());
        assert!(limiter.admit(None, 1, false).is_ok());
        assert!(limiter.admit(None, 1, false).is_err());
        // A principal named "" is not the unauthenticated bucket, and no
        // default means no limit for principals.
        assert!(limiter.admit(Some(""), 1, false).is_ok());
    }
}
