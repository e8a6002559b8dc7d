//! The byte layouts the XKS proxy API fixes, apart from JSON and HTTP.
//!
//! - **The GCM AAD.** AWS KMS sends the caller's additional authenticated
//!   data and gets back (on encrypt) the proxy's `ciphertextMetadata`;
//!   both are bound into the AES-GCM tag, framed so that no two pairs give
//!   the same bytes:
//!
//!   ```text
//!   +----------------+-----------+---------------+-----------------+
//!   | len(aad): u16be | aad      | len(md): u8   | md              |
//!   +----------------+-----------+---------------+-----------------+
//!   ```
//!
//!   An absent field is empty, its length 0.
//! - **The ciphertext data integrity value** (CDIV, `SHA_256`): the SHA-256
//!   of `aad || ciphertextMetadata || iv || ciphertext || tag`, the raw
//!   fields concatenated as sent (not the framed AAD), standard base64 in
//!   the JSON. The proxy computes it before a verifying decrypt (the spec's
//!   Appendix C), so that what it vouches for is what AWS stores.

/// The largest AAD the API accepts, in bytes.
pub const MAX_AAD_LEN: usize = 8192;
/// The largest `ciphertextMetadata` AWS KMS accepts back from a proxy.
pub const MAX_METADATA_LEN: usize = 20;

/// A field too long for its frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("additionalAuthenticatedData is {0} bytes; at most {MAX_AAD_LEN} are accepted")]
    AadTooLong(usize),
    #[error("ciphertextMetadata is {0} bytes; at most {MAX_METADATA_LEN} are accepted")]
    MetadataTooLong(usize),
}

/// The AAD the AES-GCM operation authenticates: `aad` and `metadata`
/// framed as in the module docs.
pub fn gcm_aad(aad: &[u8], metadata: &[u8]) -> Result<Vec<u8>, FramingError> {
    if aad.len() > MAX_AAD_LEN {
        return Err(FramingError::AadTooLong(aad.len()));
    }
    if metadata.len() > MAX_METADATA_LEN {
        return Err(FramingError::MetadataTooLong(metadata.len()));
    }
    // Both lengths fit their fields: checked above.
    let aad_len = u16::try_from(aad.len()).map_err(|_| FramingError::AadTooLong(aad.len()))?;
    let md_len =
        u8::try_from(metadata.len()).map_err(|_| FramingError::MetadataTooLong(metadata.len()))?;
    let mut framed = Vec::with_capacity(3 + aad.len() + metadata.len());
    framed.extend_from_slice(&aad_len.to_be_bytes());
    framed.extend_from_slice(aad);
    framed.push(md_len);
    framed.extend_from_slice(metadata);
    Ok(framed)
}

/// The ciphertext data integrity value (SHA-256) over the raw fields.
pub fn integrity_value(
    aad: &[u8],
    metadata: &[u8],
    iv: &[u8],
    ciphertext: &[u8],
    tag: &[u8],
) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [aad, metadata, iv, ciphertext, tag] {
        ctx.update(part);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;

    use super::*;

    fn b64(s: &str) -> Vec<u8> {
        STANDARD.decode(s).unwrap()
    }

    /// The worked example of the specification (its encrypt response and
    /// Appendix C): AAD "project=nile,department=marketing", metadata
    /// "key_version=1".
    #[test]
    fn the_integrity_value_of_the_specifications_example() {
        let aad = b64("cHJvamVjdD1uaWxlLGRlcGFydG1lbnQ9bWFya2V0aW5n");
        assert_eq!(aad, b"project=nile,department=marketing");
        let metadata = b64("a2V5X3ZlcnNpb249MQ==");
        assert_eq!(metadata, b"key_version=1");
        let cdiv = integrity_value(
            &aad,
            &metadata,
            &b64("HMrlRw85cAJUd5Ax"),
            &b64("ghxkK1txeDNn3q8Y"),
            &b64("vBxN2ncH1oEkR8WVXpmyYQ=="),
        );
        assert_eq!(
            STANDARD.encode(cdiv),
            "qHA/ImC9h5HsLRXqCyPmWgYx7tzyoTplzILbP0fPXsc="
        );
        // Over the framed AAD it would differ: the raw fields count.
        let framed = gcm_aad(&aad, &metadata).unwrap();
        assert_ne!(
            integrity_value(
                &framed,
                &[],
                &b64("HMrlRw85cAJUd5Ax"),
                &b64("ghxkK1txeDNn3q8Y"),
                &b64("vBxN2ncH1oEkR8WVXpmyYQ==")
            ),
            cdiv
        );
    }

    #[test]
    fn the_aad_is_framed_with_both_lengths() {
        let framed = gcm_aad(b"ab", b"xyz").unwrap();
        assert_eq!(framed, [&[0u8, 2][..], b"ab", &[3], b"xyz"].concat());
        // Absent fields are empty, their lengths 0.
        assert_eq!(gcm_aad(b"", b"").unwrap(), [0, 0, 0]);
        assert_eq!(gcm_aad(b"", b"m").unwrap(), [0, 0, 1, b'm']);
        // No two pairs share a framing: the split moves the lengths.
        assert_ne!(gcm_aad(b"ab", b"c").unwrap(), gcm_aad(b"a", b"bc").unwrap());
        // 8 KiB of AAD fits, in big-endian order.
        let big = vec![7u8; MAX_AAD_LEN];
        let framed = gcm_aad(&big, b"").unwrap();
        assert_eq!(&framed[..2], &[0x20, 0x00]);
        assert_eq!(framed.len(), 2 + MAX_AAD_LEN + 1);
    }

    #[test]
    fn fields_beyond_the_limits_are_refused() {
        assert_eq!(
            gcm_aad(&vec![0; MAX_AAD_LEN + 1], b""),
            Err(FramingError::AadTooLong(MAX_AAD_LEN + 1))
        );
        assert_eq!(
            gcm_aad(b"", &[0; MAX_METADATA_LEN + 1]),
            Err(FramingError::MetadataTooLong(MAX_METADATA_LEN + 1))
        );
        assert!(gcm_aad(b"", &[0; MAX_METADATA_LEN]).is_ok());
    }
}
