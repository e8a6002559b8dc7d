//! The wrapped data-key format, version 1 (`ciphertext_blob`).
//!
//! Opaque to callers, self-describing to coffre. Big-endian, fixed widths:
//!
//! ```text
//!  0      2    3     4            20            24            56       68        len-16   len
//!  | "CF" | 01 | suite | key_id (16) | version u32 | salt (32) | iv (12) | ciphertext | tag (16) |
//! ```
//!
//! Suites: 1 (HKDF-SHA256 in coffre, then AES-256-GCM: protection level
//! `SOFTWARE`) and 2 (the same inside the HSM, under the CMK version's key
//! object: protection level `HSM`).
//!
//! Parsing is strict: wrong magic, unknown format version or suite, a
//! ciphertext outside `1..=MAX_CIPHERTEXT_LEN` bytes, or any trailing byte is
//! refused. The whole header (bytes `0..68`) is authenticated as AAD, together
//! with the digest of the encryption context (see [`crate::crypto`]).
//! Parsing never touches key material; authentication is the crypto layer's.

use crate::model::KeyId;

pub const MAGIC: [u8; 2] = *b"CF";
pub const FORMAT_VERSION: u8 = 1;
/// HKDF-SHA256 per-wrap key derivation, then AES-256-GCM.
pub const SUITE_HKDF_SHA256_AES256GCM: u8 = 1;
/// Protection level HSM: the HSM derives the per-wrap key from the CMK
/// version's key object and the salt, and runs AES-256-GCM, inside itself
/// (the derivation is the HSM backend's: `CKM_AES_CBC_ENCRYPT_DATA` over the
/// salt for PKCS#11, HKDF-SHA256 in the simulator). Same layout and AAD as
/// suite 1.
pub const SUITE_HSM_AES256GCM: u8 = 2;

pub const KEY_ID_LEN: usize = 16;
pub const SALT_LEN: usize = 32;
pub const IV_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// Bytes before the ciphertext: magic, version, suite, key id, key version,
/// salt, iv.
pub const HEADER_LEN: usize = 2 + 1 + 1 + KEY_ID_LEN + 4 + SALT_LEN + IV_LEN;
/// The largest plaintext coffre wraps (a caller secret of `Encrypt`).
pub const MAX_CIPHERTEXT_LEN: usize = 4096;
pub const MIN_BLOB_LEN: usize = HEADER_LEN + 1 + TAG_LEN;
pub const MAX_BLOB_LEN: usize = HEADER_LEN + MAX_CIPHERTEXT_LEN + TAG_LEN;

const _: () = assert!(HEADER_LEN == 68);

/// Why a blob did not parse. Only for tests and the server log: callers see
/// one generic error whatever the reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("blob is {0} bytes, outside {MIN_BLOB_LEN}..={MAX_BLOB_LEN}")]
    Length(usize),
    #[error("bad magic")]
    Magic,
    #[error("unknown format version {0}")]
    Version(u8),
    #[error("unknown suite {0}")]
    Suite(u8),
}

/// The fixed-width header of a v1 blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// [`SUITE_HKDF_SHA256_AES256GCM`] or [`SUITE_HSM_AES256GCM`].
    pub suite: u8,
    pub key_id: KeyId,
    pub key_version: u32,
    pub salt: [u8; SALT_LEN],
    pub iv: [u8; IV_LEN],
}

impl Header {
    /// The 68 header bytes, as they appear at the start of the blob.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        let mut w = Writer {
            buf: &mut out,
            pos: 0,
        };
        w.put(&MAGIC);
        w.put(&[FORMAT_VERSION, self.suite]);
        w.put(self.key_id.as_bytes());
        w.put(&self.key_version.to_be_bytes());
        w.put(&self.salt);
        w.put(&self.iv);
        out
    }
}

struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) {
        let end = self.pos + bytes.len();
        if let Some(dst) = self.buf.get_mut(self.pos..end) {
            dst.copy_from_slice(bytes);
        }
        self.pos = end;
    }
}

/// A parsed blob borrowing from the input.
#[derive(Debug, PartialEq, Eq)]
pub struct ParsedBlob<'a> {
    pub header: Header,
    /// Bytes `0..68` of the blob, authenticated as AAD.
    pub header_bytes: &'a [u8; HEADER_LEN],
    pub ciphertext: &'a [u8],
    pub tag: &'a [u8; TAG_LEN],
}

/// Parses a v1 blob. Never panics, whatever the input.
pub fn parse(blob: &[u8]) -> Result<ParsedBlob<'_>, ParseError> {
    if !(MIN_BLOB_LEN..=MAX_BLOB_LEN).contains(&blob.len()) {
        return Err(ParseError::Length(blob.len()));
    }
    let (header_bytes, rest) = blob
        .split_first_chunk::<HEADER_LEN>()
        .ok_or(ParseError::Length(blob.len()))?;
    let (ciphertext, tag) = rest
        .split_last_chunk::<TAG_LEN>()
        .ok_or(ParseError::Length(blob.len()))?;

    let mut r = Reader(header_bytes);
    let magic: [u8; 2] = r.take();
    if magic != MAGIC {
        return Err(ParseError::Magic);
    }
    let [version]: [u8; 1] = r.take();
    if version != FORMAT_VERSION {
        return Err(ParseError::Version(version));
    }
    let [suite]: [u8; 1] = r.take();
    if suite != SUITE_HKDF_SHA256_AES256GCM && suite != SUITE_HSM_AES256GCM {
        return Err(ParseError::Suite(suite));
    }
    let key_id = KeyId::from_bytes(r.take());
    let key_version = u32::from_be_bytes(r.take());
    let salt = r.take();
    let iv = r.take();

    Ok(ParsedBlob {
        header: Header {
            suite,
            key_id,
            key_version,
            salt,
            iv,
        },
        header_bytes,
        ciphertext,
        tag,
    })
}

/// Reads fixed-size fields from the (fixed-size) header. The caller reads
/// exactly `HEADER_LEN` bytes in total, so the fallback never happens.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        match self.0.split_first_chunk::<N>() {
            Some((head, rest)) => {
                self.0 = rest;
                *head
            }
            None => [0u8; N],
        }
    }
}

/// Assembles a blob from its parts. `ciphertext` must be 1..=4096 bytes
/// (checked by the caller, [`crate::crypto::seal`]).
pub fn encode(header: &Header, ciphertext: &[u8], tag: &[u8; TAG_LEN]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + ciphertext.len() + TAG_LEN);
    out.extend_from_slice(&header.to_bytes());
    out.extend_from_slice(ciphertext);
    out.extend_from_slice(tag);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Header, Vec<u8>) {
        let header = Header {
            suite: SUITE_HKDF_SHA256_AES256GCM,
            key_id: KeyId::from_bytes([7; 16]),
            key_version: 0x0102_0304,
            salt: [9; 32],
            iv: [3; 12],
        };
        let blob = encode(&header, &[0xAA; 32], &[0xBB; 16]);
        (header, blob)
    }

    #[test]
    fn layout_matches_the_diagram() {
        let (_, blob) = sample();
        assert_eq!(blob.len(), 68 + 32 + 16);
        assert_eq!(&blob[0..2], b"CF");
        assert_eq!(blob[2], 1);
        assert_eq!(blob[3], 1);
        assert_eq!(&blob[4..20], &[7; 16]);
        assert_eq!(&blob[20..24], &[1, 2, 3, 4]);
        assert_eq!(&blob[24..56], &[9; 32]);
        assert_eq!(&blob[56..68], &[3; 12]);
        assert_eq!(&blob[68..100], &[0xAA; 32]);
        assert_eq!(&blob[100..116], &[0xBB; 16]);
    }

    #[test]
    fn round_trip() {
        let (header, blob) = sample();
        let parsed = parse(&blob).unwrap();
        assert_eq!(parsed.header, header);
        assert_eq!(parsed.ciphertext, &[0xAA; 32]);
        assert_eq!(parsed.tag, &[0xBB; 16]);
        assert_eq!(&parsed.header_bytes[..], &blob[..68]);
    }

    #[test]
    fn strict_parsing() {
        let (_, blob) = sample();
        let mut bad = blob.clone();
        bad[0] = b'X';
        assert_eq!(parse(&bad), Err(ParseError::Magic));
        let mut bad = blob.clone();
        bad[2] = 2;
        assert_eq!(parse(&bad), Err(ParseError::Version(2)));
        for suite in [0u8, 3, 0xFF] {
            let mut bad = blob.clone();
            bad[3] = suite;
            assert_eq!(parse(&bad), Err(ParseError::Suite(suite)));
        }
        // Suite 2 (protection level HSM) parses, and says so.
        let mut hsm = blob.clone();
        hsm[3] = SUITE_HSM_AES256GCM;
        assert_eq!(parse(&hsm).map(|p| p.header.suite), Ok(SUITE_HSM_AES256GCM));
        assert_eq!(
            parse(&blob[..MIN_BLOB_LEN - 1]),
            Err(ParseError::Length(84))
        );
        assert_eq!(parse(&[]), Err(ParseError::Length(0)));
        let long = vec![0u8; MAX_BLOB_LEN + 1];
        assert_eq!(parse(&long), Err(ParseError::Length(MAX_BLOB_LEN + 1)));
    }
}
