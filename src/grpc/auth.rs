//! Authentication: the caller's principal from its verified client
//! certificate. TLS (rustls, `super::tls`) has already verified the chain
//! against the client CAs, its validity period and the CRL; a connection
//! without a valid certificate never gets this far. Here:
//!
//! - the leaf must carry the extendedKeyUsage extension with clientAuth;
//! - the principal is its first URI SAN, else its CN, and a CN with `:` is
//!   refused (a CN never stands for a URI principal: `pki::client_identity`);
//! - a principal that has a role must present a chain that verifies against
//!   that role's CAs alone ([`IdentityBinding`]): a certificate for an
//!   operator's name issued by the services' CA is refused.
//!
//! A refusal is `UNAUTHENTICATED` with a message saying why; the pipeline
//! audits it like any refused request. What was accepted is cached by a
//! SHA-256 of the whole presented chain (leaf and intermediates), so the
//! checks run once per chain, not per request; and by the connection's own
//! copy of that chain (the `Arc` tonic hands every request of a connection),
//! so that a connection's later requests do not hash it again.

use std::sync::Arc;

use ring::digest;
use tonic::Request;
use tonic::transport::CertificateDer;

use super::tls::IdentityBinding;
use crate::authz::{Caller, Role};
use crate::pipeline::{Code, Failure};
use crate::pki::client_identity;
use crate::service::BoundedCache;

/// The chain a connection presented, as tonic gives it to each of its
/// requests.
type Chain = Arc<Vec<CertificateDer<'static>>>;

/// Principals already accepted, by SHA-256 of the presented chain: parsing
/// and verifying X.509 on every request would dominate a cached data-key
/// request. In front of it, by connection: hashing a chain of a few
/// kilobytes costs more than the rest of the lookup, and every request of
/// a connection carries the same `Arc` of it.
#[derive(Debug)]
pub struct PrincipalCache {
    accepted: BoundedCache<[u8; 32], Arc<str>>,
    /// By the address of the connection's chain, holding that `Arc`: while
    /// an entry lives its allocation cannot be freed, so no other chain can
    /// take the address. Evicted entries fall back to `accepted`.
    connections: BoundedCache<usize, (Chain, Arc<str>)>,
    binding: Arc<IdentityBinding>,
}

impl PrincipalCache {
    pub fn new(binding: Arc<IdentityBinding>) -> Self {
        Self {
            accepted: BoundedCache::new(10_000),
            connections: BoundedCache::new(1024),
            binding,
        }
    }
}

/// The caller of a request, from its client certificate chain; `role_of`
/// gives the configured role of a principal.
pub fn principal_of<T>(
    request: &Request<T>,
    cache: &PrincipalCache,
    role_of: impl FnOnce(&Caller) -> Option<Role>,
) -> Result<Caller, Failure> {
    let certs = request
        .peer_certs()
        .ok_or_else(|| Failure::unauthenticated("a client certificate is required"))?;
    let address = Arc::as_ptr(&certs) as usize;
    if let Some((chain, principal)) = cache.connections.get(&address) {
        if Arc::ptr_eq(&chain, &certs) {
            return Ok(Caller::new(principal.as_ref()));
        }
    }
    let (leaf, intermediates) = certs
        .split_first()
        .ok_or_else(|| Failure::unauthenticated("a client certificate is required"))?;
    let mut chain = digest::Context::new(&digest::SHA256);
    for cert in certs.iter() {
        chain.update(&(cert.as_ref().len() as u64).to_be_bytes());
        chain.update(cert.as_ref());
    }
    let mut fingerprint = [0u8; 32];
    fingerprint.copy_from_slice(chain.finish().as_ref());
    if let Some(p) = cache.accepted.get(&fingerprint) {
        cache
            .connections
            .insert(address, (Arc::clone(&certs), Arc::clone(&p)));
        return Ok(Caller::new(p.as_ref()));
    }
    let principal =
        client_identity(leaf.as_ref()).map_err(|e| Failure::unauthenticated(e.message()))?;
    let caller = Caller::new(principal);
    // A principal without a role needs no anchor: the core refuses it.
    if let Some(role) = role_of(&caller) {
        cache
            .binding
            .check(role, leaf, intermediates)
            .map_err(|why| Failure::new(Code::Unauthenticated, why))?;
    }
    let principal: Arc<str> = caller.principal.as_str().into();
    cache.accepted.insert(fingerprint, Arc::clone(&principal));
    cache
        .connections
        .insert(address, (Arc::clone(&certs), principal));
    Ok(caller)
}
