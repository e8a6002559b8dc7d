//! TEMPORARY STUB (replaced by the hsm branch).
use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;

use super::{Hsm, HsmError, HsmInfo, HsmWrapped};
use crate::secret::SecretBytes;

#[derive(Debug)]
pub struct LocalSimHsm;
#[derive(Debug)]
pub struct RemoteSimHsm;

impl LocalSimHsm {
    pub fn open(_: &Path, _: &str) -> Result<Self, HsmError> {
        Err(HsmError::Unavailable("stub".into()))
    }
}
impl RemoteSimHsm {
    pub async fn connect(_: &str, _: String, _: Duration) -> Result<Self, HsmError> {
        Err(HsmError::Unavailable("stub".into()))
    }
}

macro_rules! stub {
    ($t:ty) => {
        #[async_trait]
        impl Hsm for $t {
            fn is_secure(&self) -> bool {
                false
            }
            async fn info(&self) -> Result<HsmInfo, HsmError> {
                Err(HsmError::Unavailable("stub".into()))
            }
            async fn generate_random(&self, _: usize) -> Result<SecretBytes, HsmError> {
                Err(HsmError::Unavailable("stub".into()))
            }
            async fn wrap(&self, _: &[u8], _: &[u8]) -> Result<HsmWrapped, HsmError> {
                Err(HsmError::Unavailable("stub".into()))
            }
            async fn unwrap(&self, _: &[u8], _: &[u8]) -> Result<SecretBytes, HsmError> {
                Err(HsmError::Unavailable("stub".into()))
            }
        }
    };
}
stub!(LocalSimHsm);
stub!(RemoteSimHsm);
