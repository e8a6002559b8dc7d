//! The "PK" blob, version 1: CMK material sealed inside the token with
//! `CKM_AES_GCM` under a root key.
//!
//! ```text
//!  0      2     3                7                       19             len-16     len
//!  +------+-----+----------------+-----------------------+--------------+----------+
//!  | "PK" | 01  | root key id    | IV                    | ciphertext   | tag      |
//!  |      |     | u32 big-endian | 12 bytes, the token's | 1..=1024     | 16 bytes |
//!  |      |     |                | random generator      |              |          |
//!  +------+-----+----------------+-----------------------+--------------+----------+
//!  \_________________ header (19 bytes) ________________/
//!
//!  GCM AAD = the 19 header bytes ‖ the caller's AAD
//! ```
//!
//! The header is authenticated with the caller's AAD, so a blob cannot be
//! moved to another root key id, IV or version. The parser takes exactly
//! this layout and nothing longer than the largest plaintext allows.
//!
//! Random IVs bound one root key to 2^32 wraps (NIST SP 800-38D); coffre
//! wraps once per CMK version created or re-wrapped, far below that.

/// Largest plaintext [`Hsm::wrap`](crate::hsm::Hsm::wrap) accepts.
pub const MAX_PLAINTEXT_LEN: usize = 1024;

/// The GCM IV length (96 bits).
pub(super) const IV_LEN: usize = 12;
/// The GCM tag length (128 bits).
pub(super) const TAG_LEN: usize = 16;

const MAGIC: [u8; 2] = *b"PK";
const FORMAT_VERSION: u8 = 1;
const HEADER_LEN: usize = 2 + 1 + 4 + IV_LEN;

/// The header of a blob wrapped under `root_key_id` with `iv`.
pub(super) fn header(root_key_id: u32, iv: &[u8; IV_LEN]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    let (magic, rest) = h.split_at_mut(2);
    magic.copy_from_slice(&MAGIC);
    let (version, rest) = rest.split_at_mut(1);
    version.copy_from_slice(&[FORMAT_VERSION]);
    let (id, iv_out) = rest.split_at_mut(4);
    id.copy_from_slice(&root_key_id.to_be_bytes());
    iv_out.copy_from_slice(iv);
    h
}

/// The blob: `header` followed by what the token sealed (ciphertext ‖ tag).
pub(super) fn encode(header: &[u8; HEADER_LEN], sealed: &[u8]) -> Vec<u8> {
    let mut blob = Vec::with_capacity(HEADER_LEN + sealed.len());
    blob.extend_from_slice(header);
    blob.extend_from_slice(sealed);
    blob
}

/// A parsed blob: header, root key id, IV, ciphertext with its tag.
pub(super) struct Parsed<'a> {
    pub(super) header: &'a [u8],
    pub(super) root_key_id: u32,
    pub(super) iv: [u8; IV_LEN],
    pub(super) sealed: &'a [u8],
}

/// Parses a blob; `None` for anything but a version 1 blob whose length a
/// plaintext of 1..=[`MAX_PLAINTEXT_LEN`] bytes gives.
pub(super) fn parse(blob: &[u8]) -> Option<Parsed<'_>> {
    if blob.len() < HEADER_LEN + 1 + TAG_LEN
        || blob.len() > HEADER_LEN + MAX_PLAINTEXT_LEN + TAG_LEN
    {
        return None;
    }
    let (header, sealed) = blob.split_at(HEADER_LEN);
    let (magic, rest) = header.split_at(2);
    let (version, rest) = rest.split_at(1);
    let (id, iv) = rest.split_at(4);
    if magic != MAGIC || version != [FORMAT_VERSION] {
        return None;
    }
    Some(Parsed {
        header,
        root_key_id: u32::from_be_bytes(id.try_into().ok()?),
        iv: iv.try_into().ok()?,
        sealed,
    })
}

/// The AAD the token's GCM authenticates: the blob's header, then the
/// caller's AAD.
pub(super) fn gcm_aad(header: &[u8], aad: &[u8]) -> Vec<u8> {
    let mut full = Vec::with_capacity(header.len() + aad.len());
    full.extend_from_slice(header);
    full.extend_from_slice(aad);
    full
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_header_round_trips_and_parsing_is_strict() {
        let iv = [7u8; IV_LEN];
        let h = header(42, &iv);
        let blob = encode(&h, &[1u8; 32 + TAG_LEN]);
        let p = parse(&blob).expect("parses");
        assert_eq!(p.root_key_id, 42);
        assert_eq!(p.iv, iv);
        assert_eq!(p.header, &h[..]);
        assert_eq!(p.sealed.len(), 32 + TAG_LEN);

        let mut wrong_magic = blob.clone();
        wrong_magic[0] = b'H';
        assert!(parse(&wrong_magic).is_none());
        let mut wrong_version = blob.clone();
        wrong_version[2] = 2;
        assert!(parse(&wrong_version).is_none());
        assert!(
            parse(&blob[..HEADER_LEN + TAG_LEN]).is_none(),
            "no ciphertext"
        );
        assert!(parse(&[]).is_none());
        let long = vec![0u8; HEADER_LEN + MAX_PLAINTEXT_LEN + TAG_LEN + 1];
        assert!(parse(&long).is_none());
    }

    #[test]
    fn the_gcm_aad_is_the_header_then_the_callers_aad() {
        let h = header(7, &[9u8; IV_LEN]);
        let aad = gcm_aad(&h, b"caller");
        assert_eq!(&aad[..HEADER_LEN], &h[..]);
        assert_eq!(&aad[HEADER_LEN..], b"caller");
        assert_eq!(&h[..7], b"PK\x01\x00\x00\x00\x07");
    }
}
