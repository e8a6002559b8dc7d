//! Per-principal rate limits: one token bucket per caller, so that a runaway
//! service gets `RESOURCE_EXHAUSTED` without starving the others.
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

/// The configured limits: a default for every principal, and overrides.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimits {
    pub default: Option<RateLimit>,
    #[serde(default)]
    pub principals: HashMap<String, RateLimit>,
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
    shards: Vec<Mutex<HashMap<String, Bucket>>>,
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
    pub fn check(&self, principal: &str) -> Result<(), Duration> {
        let Some(limit) = self
            .limits
            .principals
            .get(principal)
            .or(self.limits.default.as_ref())
        else {
            return Ok(());
        };
        let shard = usize::try_from(self.hasher.hash_one(principal) % SHARDS as u64).unwrap_or(0);
        let Some(shard) = self.shards.get(shard) else {
            return Ok(());
        };
        let mut buckets = shard.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let bucket = buckets.entry(principal.to_string()).or_insert(Bucket {
            tokens: limit.burst,
            last: now,
        });
        let elapsed = now.duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * limit.per_second).min(limit.burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / limit.per_second,
            ))
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
}
