//! Wrapped-key format v1: golden vectors, Wycheproof, properties, tamper matrix.
//!
//! - [`aes_gcm_known_answers`]: Wycheproof AES-256-GCM through coffre's own AEAD calls.
//! - [`golden`]: the frozen v1 blobs of `tests/data/golden-v1.json`, also rebuilt
//!   from DESIGN.md with ring alone.
//! - [`properties`]: proptest round trips, a parser that never panics, the
//!   canonical encryption context.
//! - [`tamper`]: every bit flip, truncation, extension, context or key change
//!   is refused, with one generic error once the blob parses.

mod aes_gcm_known_answers;
mod golden;
mod properties;
mod tamper;

use coffre::crypto::{self, AuthenticationFailed};
use coffre::envelope::{self, ParseError};
use coffre::model::EncryptionContext;
use coffre::secret::CmkMaterial;

/// An encryption context (the domain type) from string pairs, which must
/// make a valid one.
fn encryption_context(pairs: &[(&str, &str)]) -> EncryptionContext {
    EncryptionContext::new(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .expect("valid context")
}

fn cmk(bytes: [u8; 32]) -> CmkMaterial {
    CmkMaterial::from_slice(&bytes).expect("32 bytes")
}

/// Why an unwrap failed: the parser's reason, or the one authentication error.
#[derive(Debug, PartialEq, Eq)]
enum Rejection {
    Parse(ParseError),
    Auth(AuthenticationFailed),
}

/// Parses then opens, as the service does with a caller's blob.
fn unwrap_blob(
    cmk: &CmkMaterial,
    blob: &[u8],
    context: &EncryptionContext,
) -> Result<Vec<u8>, Rejection> {
    let parsed = envelope::parse(blob).map_err(Rejection::Parse)?;
    let plaintext =
        crypto::open(cmk, &parsed, &crypto::context_digest(context)).map_err(Rejection::Auth)?;
    Ok(plaintext.expose().to_vec())
}

/// The canonical context as DESIGN.md states it, written without coffre's
/// code: entries sorted by key (byte-wise), each key and value as a
/// big-endian u32 length then its UTF-8 bytes.
fn reference_canonical_context(pairs: &[(String, String)]) -> Vec<u8> {
    let mut sorted: Vec<&(String, String)> = pairs.iter().collect();
    sorted.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut out = Vec::new();
    for (k, v) in sorted {
        out.extend_from_slice(&(k.len() as u32).to_be_bytes());
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(&(v.len() as u32).to_be_bytes());
        out.extend_from_slice(v.as_bytes());
    }
    out
}
