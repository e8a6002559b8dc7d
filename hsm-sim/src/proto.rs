//! Generated messages, clients and services of `hsm_sim.v1`, re-exported for
//! clients (coffre's remote backend).
//!
//! Messages that carry a PIN, plaintext or random bytes have a hand-written
//! `Debug` that shows lengths only.

#![allow(
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::fmt;

tonic::include_proto!("hsm_sim.v1");

impl fmt::Debug for LoginRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoginRequest")
            .field("pin", &"<redacted>")
            .finish()
    }
}

impl fmt::Debug for WrapRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WrapRequest")
            .field("session", &"<redacted>")
            .field("plaintext_len", &self.plaintext.len())
            .field("aad_len", &self.aad.len())
            .finish()
    }
}

impl fmt::Debug for UnwrapResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnwrapResponse")
            .field("plaintext_len", &self.plaintext.len())
            .finish()
    }
}

impl fmt::Debug for GenerateRandomResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GenerateRandomResponse")
            .field("random_len", &self.random.len())
            .finish()
    }
}

impl fmt::Debug for SealWithObjectRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealWithObjectRequest")
            .field("session", &"<redacted>")
            .field("seal", &self.seal)
            .field("plaintext_len", &self.plaintext.len())
            .finish()
    }
}

impl fmt::Debug for OpenWithObjectResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenWithObjectResponse")
            .field("plaintext_len", &self.plaintext.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_messages_have_redacted_debug() {
        let shown = format!(
            "{:?} {:?} {:?} {:?}",
            LoginRequest {
                pin: "s3cr3t-pin".into()
            },
            WrapRequest {
                session: vec![1; 16],
                plaintext: vec![0xAB; 4],
                aad: vec![2],
            },
            UnwrapResponse {
                plaintext: vec![0xAB; 4]
            },
            GenerateRandomResponse {
                random: vec![0xAB; 4]
            },
        );
        let shown = format!(
            "{shown} {:?} {:?}",
            SealWithObjectRequest {
                session: vec![1; 16],
                seal: Some(ObjectSeal::default()),
                plaintext: vec![0xAB; 4],
            },
            OpenWithObjectResponse {
                plaintext: vec![0xAB; 4]
            },
        );
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(!shown.contains("171"), "{shown}");
        assert!(shown.contains("plaintext_len: 4"), "{shown}");
    }
}
