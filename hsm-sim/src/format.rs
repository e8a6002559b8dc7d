//! The wrapped-blob format, version 1.
//!
//! ```text
//!  0      2    3              7         19            len-16   len
//!  | "HS" | 01 | root_key_id  | iv (12) | ciphertext  | tag (16) |
//!                 u32 BE                  1..=1024 bytes
//! ```
//!
//! AES-256-GCM under the root key named in the header, with
//! AAD = the 19 header bytes ‖ the caller's AAD. Parsing is strict (magic,
//! version, lengths) and never panics; callers turn every failure into one
//! generic authentication error.

/// Magic bytes opening every wrapped blob.
pub const MAGIC: [u8; 2] = *b"HS";
/// The only format version so far.
pub const VERSION: u8 = 1;
/// Header length: magic, version, root key id, IV.
pub const HEADER_LEN: usize = 2 + 1 + 4 + IV_LEN;
pub const IV_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// Largest plaintext the simulator wraps (and smallest: 1 byte).
pub const MAX_PLAINTEXT_LEN: usize = 1024;

/// A parsed, not yet authenticated, wrapped blob.
#[derive(Debug)]
pub struct Parsed<'a> {
    pub header: &'a [u8; HEADER_LEN],
    pub root_key_id: u32,
    pub iv: [u8; IV_LEN],
    pub ciphertext: &'a [u8],
    pub tag: [u8; TAG_LEN],
}

/// Why a blob did not parse (kept for tests; callers report one generic
/// error).
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum ParseError {
    Length,
    Magic,
    Version,
}

/// Builds the header for a new blob.
pub fn header(root_key_id: u32, iv: &[u8; IV_LEN]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    let (magic, rest) = h.split_at_mut(2);
    magic.copy_from_slice(&MAGIC);
    let (version, rest) = rest.split_at_mut(1);
    version.copy_from_slice(&[VERSION]);
    let (id, iv_out) = rest.split_at_mut(4);
    id.copy_from_slice(&root_key_id.to_be_bytes());
    iv_out.copy_from_slice(iv);
    h
}

/// Splits a blob into its parts. Checks magic, version and lengths only.
pub fn parse(blob: &[u8]) -> Result<Parsed<'_>, ParseError> {
    if blob.len() < HEADER_LEN + 1 + TAG_LEN
        || blob.len() > HEADER_LEN + MAX_PLAINTEXT_LEN + TAG_LEN
    {
        return Err(ParseError::Length);
    }
    let (header, rest) = blob
        .split_first_chunk::<HEADER_LEN>()
        .ok_or(ParseError::Length)?;
    let (ciphertext, tag) = rest
        .split_last_chunk::<TAG_LEN>()
        .ok_or(ParseError::Length)?;
    let (magic, h) = header.split_first_chunk::<2>().ok_or(ParseError::Length)?;
    if *magic != MAGIC {
        return Err(ParseError::Magic);
    }
    let (version, h) = h.split_first().ok_or(ParseError::Length)?;
    if *version != VERSION {
        return Err(ParseError::Version);
    }
    let (id, iv) = h.split_first_chunk::<4>().ok_or(ParseError::Length)?;
    let iv: [u8; IV_LEN] = iv.try_into().map_err(|_| ParseError::Length)?;
    Ok(Parsed {
        header,
        root_key_id: u32::from_be_bytes(*id),
        iv,
        ciphertext,
        tag: *tag,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(ct_len: usize) -> Vec<u8> {
        let mut b = header(7, &[9; IV_LEN]).to_vec();
        b.extend(std::iter::repeat_n(0xAA, ct_len));
        b.extend([0xBB; TAG_LEN]);
        b
    }

    #[test]
    fn header_layout() {
        let h = header(0x0102_0304, &[5; IV_LEN]);
        assert_eq!(&h[..7], b"HS\x01\x01\x02\x03\x04");
        assert_eq!(&h[7..], &[5; IV_LEN]);
    }

    #[test]
    fn parse_round_trip() {
        let b = blob(3);
        let p = parse(&b).unwrap();
        assert_eq!(p.root_key_id, 7);
        assert_eq!(p.iv, [9; IV_LEN]);
        assert_eq!(p.ciphertext, &[0xAA; 3]);
        assert_eq!(p.tag, [0xBB; TAG_LEN]);
        assert_eq!(p.header.as_slice(), &b[..HEADER_LEN]);
    }

    #[test]
    fn parse_rejects_bad_input() {
        assert_eq!(parse(&blob(0)).unwrap_err(), ParseError::Length);
        assert_eq!(parse(&blob(1025)).unwrap_err(), ParseError::Length);
        assert!(parse(&blob(1024)).is_ok());
        let mut b = blob(4);
        b[0] = b'X';
        assert_eq!(parse(&b).unwrap_err(), ParseError::Magic);
        let mut b = blob(4);
        b[2] = 2;
        assert_eq!(parse(&b).unwrap_err(), ParseError::Version);
        for len in 0..HEADER_LEN + TAG_LEN + 2 {
            let _ = parse(&vec![0u8; len]);
            let mut b = blob(4);
            b.truncate(len.min(b.len()));
            let _ = parse(&b);
        }
    }
}
