//! Backends for the simulated HSM (`hsm-sim`). Neither is secure: both say so
//! through [`Hsm::is_secure`](super::Hsm::is_secure).
//!
//! - [`LocalSimHsm`] (`local.rs`): the simulator in-process, for `coffre dev`.
//! - [`RemoteSimHsm`] (`remote.rs`): a gRPC client of an `hsm-sim serve`
//!   process, with a per-call deadline and one re-login when the simulator
//!   has forgotten the session (it restarted).
//!
//! Error mapping ([`HsmError`]):
//!
//! | simulator says                                       | HsmError                 |
//! |------------------------------------------------------|--------------------------|
//! | outage, injected error, timeout, transport failure, internal error | `Unavailable` |
//! | unwrap authentication failure (`INVALID_ARGUMENT` on Unwrap) | `AuthenticationFailed` |
//! | tampered (reason `Tampered`, read by [`hsm_sim::status::reason`]) | `Tampered`  |
//! | wrong PIN, session lost again after a re-login       | `LoginFailed`            |
//! | other invalid argument or precondition               | `Rejected`               |
//!
//! The limits coffre states for every backend are the simulator's own: the
//! build fails if the two crates disagree.

mod local;
mod remote;

pub use local::LocalSimHsm;
pub use remote::RemoteSimHsm;

use hsm_sim::MAX_RANDOM_LEN;

use super::HsmError;

const _: () = {
    assert!(super::MAX_SEAL_LEN == hsm_sim::MAX_SEAL_LEN);
    assert!(super::MAX_OBJECT_NAME_LEN == hsm_sim::MAX_OBJECT_NAME_LEN);
    assert!(super::pkcs11::MAX_RANDOM_LEN == hsm_sim::MAX_RANDOM_LEN);
    assert!(super::pkcs11::MAX_PLAINTEXT_LEN == hsm_sim::format::MAX_PLAINTEXT_LEN);
};

fn check_random_len(len: usize) -> Result<(), HsmError> {
    if len == 0 || len > MAX_RANDOM_LEN {
        return Err(HsmError::Rejected(format!(
            "random length {len} outside 1..={MAX_RANDOM_LEN}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
