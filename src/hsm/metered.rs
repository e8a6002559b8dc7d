//! An [`Hsm`] that counts and times every call to the one it wraps, for
//! the metrics page. Kms wraps its HSM in one.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use async_trait::async_trait;

use super::{Hsm, HsmError, HsmInfo, HsmWrapped, ObjectSeal};
use crate::metrics::HsmCounters;
use crate::secret::SecretBytes;

#[derive(Debug)]
pub struct MeteredHsm {
    inner: Arc<dyn Hsm>,
    counters: Arc<HsmCounters>,
}

impl MeteredHsm {
    pub fn new(inner: Arc<dyn Hsm>, counters: Arc<HsmCounters>) -> Self {
        Self { inner, counters }
    }

    fn count<T>(&self, call: usize, started: Instant, result: &Result<T, HsmError>) {
        if let Some(c) = self.counters.calls.get(call) {
            c.latency.observe(started.elapsed());
            if result.is_err() {
                c.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

// Indexes into `metrics::HSM_CALLS`.
const INFO: usize = 0;
const RANDOM: usize = 1;
const WRAP: usize = 2;
const UNWRAP: usize = 3;
const ROTATE: usize = 4;
const DESTROY: usize = 5;
const CREATE_OBJECT: usize = 6;
const SEAL: usize = 7;
const OPEN: usize = 8;
const DESTROY_OBJECT: usize = 9;

#[async_trait]
impl Hsm for MeteredHsm {
    fn is_secure(&self) -> bool {
        self.inner.is_secure()
    }

    async fn info(&self) -> Result<HsmInfo, HsmError> {
        let t = Instant::now();
        let r = self.inner.info().await;
        self.count(INFO, t, &r);
        r
    }

    async fn generate_random(&self, len: usize) -> Result<SecretBytes, HsmError> {
        let t = Instant::now();
        let r = self.inner.generate_random(len).await;
        self.count(RANDOM, t, &r);
        r
    }

    async fn wrap(&self, plaintext: &[u8], aad: &[u8]) -> Result<HsmWrapped, HsmError> {
        let t = Instant::now();
        let r = self.inner.wrap(plaintext, aad).await;
        self.count(WRAP, t, &r);
        r
    }

    async fn unwrap(&self, wrapped: &[u8], aad: &[u8]) -> Result<SecretBytes, HsmError> {
        let t = Instant::now();
        let r = self.inner.unwrap(wrapped, aad).await;
        self.count(UNWRAP, t, &r);
        r
    }

    async fn rotate_root_key(&self) -> Result<u32, HsmError> {
        let t = Instant::now();
        let r = self.inner.rotate_root_key().await;
        self.count(ROTATE, t, &r);
        r
    }

    async fn destroy_root_key(&self, root_key_id: u32) -> Result<(), HsmError> {
        let t = Instant::now();
        let r = self.inner.destroy_root_key(root_key_id).await;
        self.count(DESTROY, t, &r);
        r
    }

    fn supports_key_objects(&self) -> bool {
        self.inner.supports_key_objects()
    }

    async fn create_key_object(&self, name: &str) -> Result<(), HsmError> {
        let t = Instant::now();
        let r = self.inner.create_key_object(name).await;
        self.count(CREATE_OBJECT, t, &r);
        r
    }

    async fn seal_with_object(
        &self,
        seal: ObjectSeal<'_>,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        let t = Instant::now();
        let r = self.inner.seal_with_object(seal, plaintext).await;
        self.count(SEAL, t, &r);
        r
    }

    async fn open_with_object(
        &self,
        seal: ObjectSeal<'_>,
        sealed: &[u8],
    ) -> Result<SecretBytes, HsmError> {
        let t = Instant::now();
        let r = self.inner.open_with_object(seal, sealed).await;
        self.count(OPEN, t, &r);
        r
    }

    async fn destroy_key_object(&self, name: &str) -> Result<(), HsmError> {
        let t = Instant::now();
        let r = self.inner.destroy_key_object(name).await;
        self.count(DESTROY_OBJECT, t, &r);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hsm::sim::LocalSimHsm;

    #[tokio::test]
    async fn counts_calls_and_errors() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
        let sim = LocalSimHsm::open(&dir.path().join("hsm.state"), "1234")
            .unwrap_or_else(|e| unreachable!("{e}"));
        let counters = Arc::new(HsmCounters::default());
        let hsm = MeteredHsm::new(Arc::new(sim), Arc::clone(&counters));
        let wrapped = hsm.wrap(&[7; 32], b"aad").await;
        assert!(wrapped.is_ok());
        let blob = wrapped.map(|w| w.blob).unwrap_or_default();
        assert!(hsm.unwrap(&blob, b"aad").await.is_ok());
        assert!(hsm.unwrap(&blob, b"other").await.is_err());
        let calls = |i: usize| {
            counters
                .calls
                .get(i)
                .map(|c| (c.latency.count(), c.errors.load(Ordering::Relaxed)))
        };
        assert_eq!(calls(WRAP), Some((1, 0)));
        assert_eq!(calls(UNWRAP), Some((2, 1)));
        assert_eq!(calls(INFO), Some((0, 0)));
    }
}
