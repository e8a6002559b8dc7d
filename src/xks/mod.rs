//! The AWS KMS External Key Store (XKS) proxy API v1 front (issue #18,
//! `design/xks.md`). Built in steps; what is here so far is the wire
//! arithmetic every encrypt and decrypt rests on ([`wire`]). The HTTPS
//! listener, SigV4 and the pipeline come next.

pub mod sigv4;
pub mod wire;
