//! Request ids.

use std::sync::atomic::{AtomicU64, Ordering};

/// Request ids: UUIDs (version 4 layout) made of a random 128-bit base
/// drawn at start plus a counter, so that a request costs no system call
/// for randomness. Unique within a process (2^62 requests) and, with 122
/// random bits per start, across restarts; not secret, not unpredictable.
#[derive(Debug)]
pub struct RequestIds {
    base: u128,
    next: AtomicU64,
}

impl RequestIds {
    pub fn new() -> Self {
        let mut seed = [0u8; 16];
        // Without randomness the ids stay unique within this process.
        if crate::crypto::Rng::default().fill(&mut seed).is_err() {
            tracing::warn!("no randomness for request ids: counter only");
        }
        Self {
            base: u128::from_be_bytes(seed),
            next: AtomicU64::new(0),
        }
    }

    pub fn next(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let low = (self.base as u64).wrapping_add(n);
        let id = (self.base & !u128::from(u64::MAX)) | u128::from(low);
        uuid::Builder::from_random_bytes(id.to_be_bytes())
            .into_uuid()
            .hyphenated()
            .to_string()
    }
}

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::RequestIds;

    #[test]
    fn request_ids_are_distinct_version_4_uuids() {
        let ids = RequestIds::new();
        let other = RequestIds::new();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let id = ids.next();
            let parsed = uuid::Uuid::parse_str(&id).unwrap_or_default();
            assert_eq!(parsed.get_version_num(), 4, "{id}");
            assert_eq!(parsed.get_variant(), uuid::Variant::RFC4122, "{id}");
            assert!(seen.insert(id));
        }
        // Another process start draws another base.
        assert!(!seen.contains(&other.next()));
    }
}
