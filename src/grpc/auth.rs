//! Authentication: the caller's principal from its verified client
//! certificate. TLS (rustls, `super::tls`) has already verified the chain
//! against the configured client CA, its validity period and the CRL; a
//! connection without a valid certificate never gets this far.

use ring::digest;
use tonic::Request;

use crate::authz::Caller;
use crate::pipeline::Failure;
use crate::pki::principal_from_cert;
use crate::service::BoundedCache;

/// Principals already extracted, by SHA-256 of the certificate: parsing X.509
/// on every request would dominate a cached data-key request.
#[derive(Debug)]
pub struct PrincipalCache(BoundedCache<[u8; 32], std::sync::Arc<str>>);

impl Default for PrincipalCache {
    fn default() -> Self {
        Self(BoundedCache::new(10_000))
    }
}

/// The caller of a request, from its client certificate.
pub fn principal_of<T>(request: &Request<T>, cache: &PrincipalCache) -> Result<Caller, Failure> {
    let certs = request
        .peer_certs()
        .ok_or_else(|| Failure::unauthenticated("a client certificate is required"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Failure::unauthenticated("a client certificate is required"))?;
    let mut fingerprint = [0u8; 32];
    fingerprint.copy_from_slice(digest::digest(&digest::SHA256, leaf.as_ref()).as_ref());
    if let Some(p) = cache.0.get(&fingerprint) {
        return Ok(Caller::new(p.as_ref()));
    }
    let principal = principal_from_cert(leaf.as_ref()).ok_or_else(|| {
        Failure::unauthenticated("the client certificate names no principal (URI SAN or CN)")
    })?;
    cache.0.insert(fingerprint, principal.as_str().into());
    Ok(Caller::new(principal))
}
