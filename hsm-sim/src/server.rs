//! The gRPC face of a [`Simulator`]: the `hsm_sim.v1.Hsm` and
//! `hsm_sim.v1.FaultInjection` services.
//!
//! Errors are mapped once, in [`crate::status`], which also says how a
//! client reads them back.
//!
//! A malformed session handle (not 16 bytes) is `UNAUTHENTICATED`, like an
//! unknown one.
//!
//! The `FaultInjection` service is unauthenticated and can destroy every root
//! key (`Tamper`), so it is opt-in: unless [`ServerOptions::allow_fault_injection`]
//! is set (`hsm-sim serve --allow-fault-injection`), each of its calls is
//! refused with `PERMISSION_DENIED` ([`FAULT_INJECTION_DISABLED`]). The
//! in-process API ([`Simulator::set_faults`], [`Simulator::tamper`]) is not
//! affected: in-process callers are trusted.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::{Router, TcpIncoming};
use tonic::{Request, Response, Status};

use crate::proto;
use crate::proto::fault_injection_server::{FaultInjection, FaultInjectionServer};
use crate::proto::hsm_server::{Hsm, HsmServer};
use crate::status::to_status;
use crate::{Faults, ObjectSeal, SessionId, SimError, Simulator};

/// A request's [`proto::ObjectSeal`], its salt and IV checked for length.
struct SealParams<'a> {
    name: &'a str,
    salt: [u8; 32],
    iv: [u8; 12],
    aad: &'a [u8],
}

impl<'a> SealParams<'a> {
    fn parse(seal: &'a proto::ObjectSeal) -> Result<Self, Status> {
        let invalid = |m: &str| to_status(SimError::InvalidInput(m.to_owned()));
        Ok(Self {
            name: &seal.name,
            salt: seal
                .salt
                .as_slice()
                .try_into()
                .map_err(|_| invalid("salt must be 32 bytes"))?,
            iv: seal
                .iv
                .as_slice()
                .try_into()
                .map_err(|_| invalid("iv must be 12 bytes"))?,
            aad: &seal.aad,
        })
    }

    fn seal(&self) -> ObjectSeal<'_> {
        ObjectSeal {
            object: self.name,
            salt: &self.salt,
            iv: &self.iv,
            aad: self.aad,
        }
    }
}

/// The session a request names; a malformed handle is an unknown one.
fn session(bytes: &[u8]) -> Result<SessionId, Status> {
    SessionId::from_bytes(bytes).ok_or_else(|| to_status(SimError::NotLoggedIn))
}

/// The `Hsm` service.
#[derive(Debug, Clone)]
pub struct HsmService {
    sim: Arc<Simulator>,
}

/// The `FaultInjection` service. Refuses every call unless built with
/// [`ServerOptions::allow_fault_injection`].
#[derive(Debug, Clone)]
pub struct FaultService {
    sim: Arc<Simulator>,
    allowed: bool,
}

/// The message of the `PERMISSION_DENIED` status every `FaultInjection` call
/// gets when fault injection is not enabled.
pub const FAULT_INJECTION_DISABLED: &str =
    "fault injection is disabled; start hsm-sim with --allow-fault-injection";

/// How the gRPC server is set up. `Default` is the safe choice: fault
/// injection disabled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerOptions {
    /// Serve the `FaultInjection` service (`SetFaults`, `GetFaults`,
    /// `Tamper`) to anyone who reaches the port. Off by default: `Tamper`
    /// irreversibly destroys every root key.
    pub allow_fault_injection: bool,
}

impl ServerOptions {
    /// Options with fault injection enabled or not.
    pub fn with_fault_injection(mut self, allow: bool) -> Self {
        self.allow_fault_injection = allow;
        self
    }
}

#[tonic::async_trait]
impl Hsm for HsmService {
    async fn login(
        &self,
        req: Request<proto::LoginRequest>,
    ) -> Result<Response<proto::LoginResponse>, Status> {
        let req = req.into_inner();
        let pin = zeroize::Zeroizing::new(req.pin);
        let s = self.sim.login(&pin).await.map_err(to_status)?;
        Ok(Response::new(proto::LoginResponse {
            session: s.as_bytes().to_vec(),
        }))
    }

    async fn logout(
        &self,
        req: Request<proto::LogoutRequest>,
    ) -> Result<Response<proto::LogoutResponse>, Status> {
        let s = session(&req.into_inner().session)?;
        self.sim.logout(&s).map_err(to_status)?;
        Ok(Response::new(proto::LogoutResponse {}))
    }

    async fn get_info(
        &self,
        _req: Request<proto::GetInfoRequest>,
    ) -> Result<Response<proto::GetInfoResponse>, Status> {
        let info = self.sim.info().map_err(to_status)?;
        Ok(Response::new(proto::GetInfoResponse {
            root_key_ids: info.root_key_ids,
            current_root_key_id: info.current_root_key_id,
            tampered: info.tampered,
            label: info.label,
        }))
    }

    async fn wrap(
        &self,
        req: Request<proto::WrapRequest>,
    ) -> Result<Response<proto::WrapResponse>, Status> {
        let req = req.into_inner();
        let s = session(&req.session)?;
        let plaintext = zeroize::Zeroizing::new(req.plaintext);
        let (wrapped, root_key_id) = self
            .sim
            .wrap(&s, &plaintext, &req.aad)
            .await
            .map_err(to_status)?;
        Ok(Response::new(proto::WrapResponse {
            wrapped,
            root_key_id,
        }))
    }

    async fn unwrap(
        &self,
        req: Request<proto::UnwrapRequest>,
    ) -> Result<Response<proto::UnwrapResponse>, Status> {
        let req = req.into_inner();
        let s = session(&req.session)?;
        let plaintext = self
            .sim
            .unwrap(&s, &req.wrapped, &req.aad)
            .await
            .map_err(to_status)?;
        // The encoded response owns a copy from here on; this one is wiped.
        Ok(Response::new(proto::UnwrapResponse {
            plaintext: plaintext.to_vec(),
        }))
    }

    async fn create_key_object(
        &self,
        req: Request<proto::CreateKeyObjectRequest>,
    ) -> Result<Response<proto::CreateKeyObjectResponse>, Status> {
        let req = req.into_inner();
        let s = session(&req.session)?;
        self.sim
            .create_key_object(&s, &req.name)
            .await
            .map_err(to_status)?;
        Ok(Response::new(proto::CreateKeyObjectResponse {}))
    }

    async fn seal_with_object(
        &self,
        req: Request<proto::SealWithObjectRequest>,
    ) -> Result<Response<proto::SealWithObjectResponse>, Status> {
        let req = req.into_inner();
        let s = session(&req.session)?;
        let wire = req.seal.unwrap_or_default();
        let seal = SealParams::parse(&wire)?;
        let sealed = self
            .sim
            .seal_with_object(&s, seal.seal(), &req.plaintext)
            .await
            .map_err(to_status)?;
        Ok(Response::new(proto::SealWithObjectResponse { sealed }))
    }

    async fn open_with_object(
        &self,
        req: Request<proto::OpenWithObjectRequest>,
    ) -> Result<Response<proto::OpenWithObjectResponse>, Status> {
        let req = req.into_inner();
        let s = session(&req.session)?;
        let wire = req.seal.unwrap_or_default();
        let seal = SealParams::parse(&wire)?;
        let plaintext = self
            .sim
            .open_with_object(&s, seal.seal(), &req.sealed)
            .await
            .map_err(to_status)?;
        Ok(Response::new(proto::OpenWithObjectResponse {
            plaintext: plaintext.to_vec(),
        }))
    }

    async fn destroy_key_object(
        &self,
        req: Request<proto::DestroyKeyObjectRequest>,
    ) -> Result<Response<proto::DestroyKeyObjectResponse>, Status> {
        let req = req.into_inner();
        let s = session(&req.session)?;
        self.sim
            .destroy_key_object(&s, &req.name)
            .await
            .map_err(to_status)?;
        Ok(Response::new(proto::DestroyKeyObjectResponse {}))
    }

    async fn generate_random(
        &self,
        req: Request<proto::GenerateRandomRequest>,
    ) -> Result<Response<proto::GenerateRandomResponse>, Status> {
        let req = req.into_inner();
        let s = session(&req.session)?;
        let len = usize::try_from(req.length)
            .map_err(|_| to_status(SimError::InvalidInput("length out of range".into())))?;
        let random = self.sim.generate_random(&s, len).await.map_err(to_status)?;
        Ok(Response::new(proto::GenerateRandomResponse {
            random: random.to_vec(),
        }))
    }

    async fn rotate_root_key(
        &self,
        req: Request<proto::RotateRootKeyRequest>,
    ) -> Result<Response<proto::RotateRootKeyResponse>, Status> {
        let s = session(&req.into_inner().session)?;
        let root_key_id = self.sim.rotate_root_key(&s).await.map_err(to_status)?;
        Ok(Response::new(proto::RotateRootKeyResponse { root_key_id }))
    }

    async fn destroy_root_key(
        &self,
        req: Request<proto::DestroyRootKeyRequest>,
    ) -> Result<Response<proto::DestroyRootKeyResponse>, Status> {
        let req = req.into_inner();
        let s = session(&req.session)?;
        self.sim
            .destroy_root_key(&s, req.root_key_id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(proto::DestroyRootKeyResponse {}))
    }
}

impl FaultService {
    fn check_allowed(&self) -> Result<(), Status> {
        if self.allowed {
            Ok(())
        } else {
            tracing::warn!("fault injection call refused: not enabled");
            Err(Status::permission_denied(FAULT_INJECTION_DISABLED))
        }
    }

    fn state(&self) -> proto::FaultState {
        let f = self.sim.faults();
        proto::FaultState {
            latency_ms: u32::try_from(f.latency.as_millis()).unwrap_or(u32::MAX),
            error_rate: f.error_rate,
            outage: f.outage,
            tampered: self.sim.is_tampered(),
        }
    }
}

#[tonic::async_trait]
impl FaultInjection for FaultService {
    async fn set_faults(
        &self,
        req: Request<proto::SetFaultsRequest>,
    ) -> Result<Response<proto::FaultState>, Status> {
        self.check_allowed()?;
        let req = req.into_inner();
        self.sim
            .set_faults(Faults {
                latency: Duration::from_millis(u64::from(req.latency_ms)),
                error_rate: req.error_rate,
                outage: req.outage,
            })
            .map_err(to_status)?;
        tracing::info!(faults = ?self.sim.faults(), "faults set");
        Ok(Response::new(self.state()))
    }

    async fn get_faults(
        &self,
        _req: Request<proto::GetFaultsRequest>,
    ) -> Result<Response<proto::FaultState>, Status> {
        self.check_allowed()?;
        Ok(Response::new(self.state()))
    }

    async fn tamper(
        &self,
        _req: Request<proto::TamperRequest>,
    ) -> Result<Response<proto::TamperResponse>, Status> {
        self.check_allowed()?;
        tracing::warn!("tamper response triggered: zeroizing every root key");
        self.sim.tamper().map_err(to_status)?;
        Ok(Response::new(proto::TamperResponse {}))
    }
}

/// Both services, ready to add to a tonic server. The `FaultInjection`
/// service is always registered (so clients get a clear refusal rather than
/// `UNIMPLEMENTED`) but refuses every call unless `options` allow it.
pub fn services(
    sim: Arc<Simulator>,
    options: ServerOptions,
) -> (HsmServer<HsmService>, FaultInjectionServer<FaultService>) {
    (
        HsmServer::new(HsmService { sim: sim.clone() }),
        FaultInjectionServer::new(FaultService {
            sim,
            allowed: options.allow_fault_injection,
        }),
    )
}

/// A tonic router serving both services (see [`services`]).
pub fn router(sim: Arc<Simulator>, options: ServerOptions) -> Router {
    let (hsm, faults) = services(sim, options);
    Server::builder().add_service(hsm).add_service(faults)
}

/// Serves `sim` on `listener` until `shutdown` completes, then drains
/// in-flight calls. Fault injection over gRPC is refused unless `options`
/// allow it. Connections run with `TCP_NODELAY`: a reply is written in
/// pieces (headers, message, trailers), and with Nagle's algorithm the last
/// piece would wait for the client's delayed ACK — tens of milliseconds per
/// call, which made every key creation on a remote simulator that slow.
pub async fn serve(
    listener: TcpListener,
    sim: Arc<Simulator>,
    options: ServerOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    router(sim, options)
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
}
