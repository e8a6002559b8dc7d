//! [`RemoteSimHsm`]: a gRPC client of an `hsm-sim serve` process.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use hsm_sim::proto::hsm_client::HsmClient;
use hsm_sim::proto::{
    CreateKeyObjectRequest, DestroyKeyObjectRequest, DestroyRootKeyRequest, GenerateRandomRequest,
    GetInfoRequest, LoginRequest, OpenWithObjectRequest, RotateRootKeyRequest,
    SealWithObjectRequest, UnwrapRequest, WrapRequest,
};
use hsm_sim::status::{Reason, reason};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Response, Status};
use zeroize::Zeroizing;

use super::check_random_len;
use crate::hsm::{Hsm, HsmError, HsmInfo, HsmWrapped, ObjectSeal};
use crate::secret::SecretBytes;

/// A client of an `hsm-sim serve` process over gRPC (plain TCP: the
/// simulator is for testing).
pub struct RemoteSimHsm {
    client: HsmClient<Channel>,
    endpoint: String,
    pin: Zeroizing<String>,
    /// The current session; the lock also serialises re-logins.
    session: tokio::sync::Mutex<Zeroizing<Vec<u8>>>,
    timeout: Duration,
}

impl fmt::Debug for RemoteSimHsm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteSimHsm")
            .field("endpoint", &self.endpoint)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Which call a status came from: `INVALID_ARGUMENT` means an
/// authentication failure only on Unwrap.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Login,
    Info,
    Wrap,
    Unwrap,
    Random,
    RootKey,
    Object,
    /// Opening with a key object: `INVALID_ARGUMENT` is an authentication
    /// failure, as for Unwrap.
    OpenObject,
}

/// The [`HsmError`] for a status of a call of kind `op`: from the
/// simulator, whose [`Reason`] says what happened where the code alone does
/// not (a tamper response), or from the transport on the way to it.
fn map_status(endpoint: &str, op: Op, status: &Status) -> HsmError {
    if reason(status) == Some(Reason::Tampered) {
        return HsmError::Tampered;
    }
    let msg = status.message();
    match status.code() {
        Code::InvalidArgument if matches!(op, Op::Unwrap | Op::OpenObject) => {
            HsmError::AuthenticationFailed
        }
        Code::Unauthenticated => HsmError::LoginFailed(msg.to_owned()),
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::NotFound
        | Code::OutOfRange
        | Code::PermissionDenied
        | Code::Unimplemented => HsmError::Rejected(format!("hsm-sim: {msg}")),
        code => HsmError::Unavailable(format!("hsm-sim at {endpoint} ({code:?}): {msg}")),
    }
}

impl RemoteSimHsm {
    /// Connects to `endpoint` (`http://host:port`, or `host:port`) and logs
    /// in. Every call, connecting included, gets `timeout` as its deadline.
    /// An unreachable simulator is [`HsmError::Unavailable`]; a wrong PIN
    /// [`HsmError::LoginFailed`].
    pub async fn connect(endpoint: &str, pin: String, timeout: Duration) -> Result<Self, HsmError> {
        let pin = Zeroizing::new(pin);
        let url = if endpoint.contains("://") {
            endpoint.to_owned()
        } else {
            format!("http://{endpoint}")
        };
        let channel = Endpoint::from_shared(url.clone())
            .map_err(|e| HsmError::Rejected(format!("invalid hsm-sim endpoint {url:?}: {e}")))?
            .connect_timeout(timeout)
            .timeout(timeout)
            .connect()
            .await
            .map_err(|e| HsmError::Unavailable(format!("cannot reach hsm-sim at {url}: {e}")))?;
        let hsm = Self {
            client: HsmClient::new(channel),
            endpoint: url,
            pin,
            session: tokio::sync::Mutex::new(Zeroizing::new(Vec::new())),
            timeout,
        };
        let session = hsm.login().await?;
        *hsm.session.lock().await = session;
        Ok(hsm)
    }

    async fn deadline<T>(
        &self,
        call: impl Future<Output = Result<Response<T>, Status>>,
    ) -> Result<T, Status> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => r.map(Response::into_inner),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no answer within {:?}",
                self.timeout
            ))),
        }
    }

    async fn login(&self) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        let mut client = self.client.clone();
        let request = LoginRequest {
            pin: self.pin.as_str().to_owned(),
        };
        let response = self
            .deadline(client.login(request))
            .await
            .map_err(|s| map_status(&self.endpoint, Op::Login, &s))?;
        Ok(Zeroizing::new(response.session))
    }

    /// Logs in again unless another call already replaced `stale`.
    async fn relogin(&self, stale: &[u8]) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        let mut current = self.session.lock().await;
        if current.as_slice() == stale {
            tracing::info!(endpoint = %self.endpoint, "hsm-sim session lost; logging in again");
            *current = self.login().await?;
        }
        Ok(current.clone())
    }

    /// Runs a session call; on `UNAUTHENTICATED` (the simulator restarted
    /// and forgot the session) logs in once more and retries once.
    async fn call<T, F, Fut>(&self, op: Op, f: F) -> Result<T, HsmError>
    where
        F: Fn(HsmClient<Channel>, Vec<u8>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let session = self.session.lock().await.clone();
        let first = self
            .deadline(f(self.client.clone(), session.to_vec()))
            .await;
        match first {
            Err(s) if s.code() == Code::Unauthenticated => {
                let session = self.relogin(&session).await?;
                self.deadline(f(self.client.clone(), session.to_vec()))
                    .await
                    .map_err(|s| map_status(&self.endpoint, op, &s))
            }
            other => other.map_err(|s| map_status(&self.endpoint, op, &s)),
        }
    }
}

#[async_trait]
impl Hsm for RemoteSimHsm {
    fn is_secure(&self) -> bool {
        false
    }

    async fn info(&self) -> Result<HsmInfo, HsmError> {
        let mut client = self.client.clone();
        let info = self
            .deadline(client.get_info(GetInfoRequest {}))
            .await
            .map_err(|s| map_status(&self.endpoint, Op::Info, &s))?;
        Ok(HsmInfo {
            backend: format!("hsm-sim ({})", self.endpoint),
            label: info.label,
            current_root_key_id: info.current_root_key_id,
            root_key_ids: info.root_key_ids,
        })
    }

    async fn generate_random(&self, len: usize) -> Result<SecretBytes, HsmError> {
        check_random_len(len)?;
        let length = u32::try_from(len).map_err(|_| HsmError::Rejected("length".into()))?;
        let response = self
            .call(Op::Random, |mut c, session| async move {
                c.generate_random(GenerateRandomRequest { session, length })
                    .await
            })
            .await?;
        Ok(SecretBytes::new(response.random))
    }

    async fn wrap(&self, plaintext: &[u8], aad: &[u8]) -> Result<HsmWrapped, HsmError> {
        let response = self
            .call(Op::Wrap, |mut c, session| async move {
                c.wrap(WrapRequest {
                    session,
                    plaintext: plaintext.to_vec(),
                    aad: aad.to_vec(),
                })
                .await
            })
            .await?;
        Ok(HsmWrapped {
            blob: response.wrapped,
            root_key_id: response.root_key_id,
        })
    }

    async fn unwrap(&self, wrapped: &[u8], aad: &[u8]) -> Result<SecretBytes, HsmError> {
        let response = self
            .call(Op::Unwrap, |mut c, session| async move {
                c.unwrap(UnwrapRequest {
                    session,
                    wrapped: wrapped.to_vec(),
                    aad: aad.to_vec(),
                })
                .await
            })
            .await?;
        Ok(SecretBytes::new(response.plaintext))
    }

    async fn rotate_root_key(&self) -> Result<u32, HsmError> {
        let response = self
            .call(Op::RootKey, |mut c, session| async move {
                c.rotate_root_key(RotateRootKeyRequest { session }).await
            })
            .await?;
        Ok(response.root_key_id)
    }

    async fn destroy_root_key(&self, root_key_id: u32) -> Result<(), HsmError> {
        self.call(Op::RootKey, |mut c, session| async move {
            c.destroy_root_key(DestroyRootKeyRequest {
                session,
                root_key_id,
            })
            .await
        })
        .await?;
        Ok(())
    }

    fn supports_key_objects(&self) -> bool {
        true
    }

    async fn create_key_object(&self, name: &str) -> Result<(), HsmError> {
        self.call(Op::Object, |mut c, session| async move {
            c.create_key_object(CreateKeyObjectRequest {
                session,
                name: name.to_owned(),
            })
            .await
        })
        .await?;
        Ok(())
    }

    async fn seal_with_object(
        &self,
        seal: ObjectSeal<'_>,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        let response = self
            .call(Op::Object, |mut c, session| async move {
                c.seal_with_object(SealWithObjectRequest {
                    session,
                    seal: Some(object_seal(seal)),
                    plaintext: plaintext.to_vec(),
                })
                .await
            })
            .await?;
        Ok(response.sealed)
    }

    async fn open_with_object(
        &self,
        seal: ObjectSeal<'_>,
        sealed: &[u8],
    ) -> Result<SecretBytes, HsmError> {
        let response = self
            .call(Op::OpenObject, |mut c, session| async move {
                c.open_with_object(OpenWithObjectRequest {
                    session,
                    seal: Some(object_seal(seal)),
                    sealed: sealed.to_vec(),
                })
                .await
            })
            .await?;
        Ok(SecretBytes::new(response.plaintext))
    }

    async fn destroy_key_object(&self, name: &str) -> Result<(), HsmError> {
        self.call(Op::Object, |mut c, session| async move {
            c.destroy_key_object(DestroyKeyObjectRequest {
                session,
                name: name.to_owned(),
            })
            .await
        })
        .await?;
        Ok(())
    }
}

/// Where to seal or open, as the simulator's protocol says it.
fn object_seal(seal: ObjectSeal<'_>) -> hsm_sim::proto::ObjectSeal {
    hsm_sim::proto::ObjectSeal {
        name: seal.object.to_owned(),
        salt: seal.salt.to_vec(),
        iv: seal.iv.to_vec(),
        aad: seal.aad.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use hsm_sim::SimError;
    use hsm_sim::status::{REASON_KEY, to_status};
    use tonic::metadata::MetadataValue;

    use super::*;

    #[test]
    fn a_tamper_is_known_by_its_reason_not_its_message() {
        let map = |op, status: &Status| map_status("http://sim", op, status);
        assert!(matches!(
            map(Op::Unwrap, &to_status(SimError::Tampered)),
            HsmError::Tampered
        ));
        let mut reworded = Status::failed_precondition("keys zeroized");
        reworded
            .metadata_mut()
            .insert(REASON_KEY, MetadataValue::from_static("tampered"));
        assert!(matches!(map(Op::Wrap, &reworded), HsmError::Tampered));

        // The words without the reason: a refused precondition, not a tamper.
        let prose = Status::failed_precondition("token tampered: root keys destroyed");
        assert!(matches!(map(Op::Wrap, &prose), HsmError::Rejected(_)));
        assert!(matches!(
            map(Op::RootKey, &to_status(SimError::CurrentRootKey(1))),
            HsmError::Rejected(_)
        ));
    }
}
