//! The sealed message format, version 1 (DESIGN.md, "Sealed message
//! format, version 1"): the header, its strict parser, and the key
//! schedule. Big-endian, fixed widths, no optional fields.
//!
//! ```text
//! header
//!  0      2    3       4                36             40                44
//!  | "CS" | 01 | suite | message_id (32) | frame_len u32 | context_len u32 |
//!  44            44+C          46+C        46+C+W            78+C+W           94+C+W
//!  | context (C) | blob_len u16 | blob (W) | commitment (32) | header_tag (16) |
//! frames, i = 0, 1, …
//!  | ciphertext (frame_len, or 0..=frame_len for the last) | tag (16) |
//! ```
//!
//! Suite 1: `prk = HKDF-Extract(salt = message_id, ikm = data key)`, the
//! frame key `HKDF-Expand(prk, "coffre/seal/v1/key", 32)`, the commitment
//! `HKDF-Expand(prk, "coffre/seal/v1/commit", 32)`; AES-256-GCM with the
//! nonce `kind ‖ 00 00 00 ‖ u64be(i)` (kind 0 for the header tag, 1 for a
//! frame, 2 for the last frame) and, for frames, the AAD `SHA-256(header)`.
//! ring does the HKDF, SHA-256 and AES-GCM; nothing here is a primitive.

use std::collections::BTreeMap;
use std::io::Read;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::{digest, hkdf};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// The first two bytes of every sealed message.
pub const MAGIC: [u8; 2] = *b"CS";
/// The format version this crate writes and reads.
pub const VERSION: u8 = 1;
/// HKDF-SHA256 key schedule with key commitment, AES-256-GCM frames.
pub const SUITE_HKDF_SHA256_AES256GCM_COMMIT: u8 = 1;
pub const MESSAGE_ID_LEN: usize = 32;
pub const COMMITMENT_LEN: usize = 32;
pub const TAG_LEN: usize = 16;
/// A data key's length: AES-256.
pub const DATA_KEY_LEN: usize = 32;
/// Plaintext bytes per frame when the caller does not choose.
pub const DEFAULT_FRAME_LEN: u32 = 64 * 1024;
/// The smallest and largest frame lengths a message may declare.
pub const MIN_FRAME_LEN: u32 = 256;
pub const MAX_FRAME_LEN: u32 = 4 * 1024 * 1024;
/// At most this many frames (the nonce counter has 64 bits; this keeps
/// one message under 2^32 GCM invocations of its key, far below any bound).
pub const MAX_FRAMES: u64 = 1 << 32;
/// coffre's limits on an encryption context (the server refuses more).
pub const MAX_CONTEXT_ENTRIES: usize = 64;
pub const MAX_CONTEXT_KEY_LEN: usize = 256;
pub const MAX_CONTEXT_VALUE_LEN: usize = 1024;
/// The largest canonical context those limits allow.
pub const MAX_CONTEXT_LEN: usize =
    MAX_CONTEXT_ENTRIES * (8 + MAX_CONTEXT_KEY_LEN + MAX_CONTEXT_VALUE_LEN);
/// The wrapped data key: a coffre blob (format v1 is 116 bytes for 32).
pub const MAX_BLOB_LEN: usize = 1024;
/// The fixed part of a header: everything but the context and the blob.
pub const FIXED_HEADER_LEN: usize =
    2 + 1 + 1 + MESSAGE_ID_LEN + 4 + 4 + 2 + COMMITMENT_LEN + TAG_LEN;

const LABEL_KEY: &[u8] = b"coffre/seal/v1/key";
const LABEL_COMMIT: &[u8] = b"coffre/seal/v1/commit";

/// The nonce kinds: the header's tag, a frame, the last frame.
const KIND_HEADER: u8 = 0;
const KIND_FRAME: u8 = 1;
const KIND_LAST: u8 = 2;

/// Why a message cannot be read. Every cryptographic failure is the one
/// [`FormatError::NotAuthentic`]: no oracle says which part was wrong.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("not a coffre sealed message (it does not start with \"CS\")")]
    NotSealed,
    #[error("sealed message format version {0} is not supported (this build reads version 1)")]
    UnsupportedVersion(u8),
    #[error("sealed message suite {0} is not supported (this build knows suite 1)")]
    UnsupportedSuite(u8),
    #[error("the sealed message's header is malformed: {0}")]
    BadHeader(&'static str),
    #[error("the sealed message ends inside its header")]
    TruncatedHeader,
    #[error(
        "the sealed message is not authentic: it was tampered with or truncated, or it was not \
         sealed under this data key"
    )]
    NotAuthentic,
    #[error("the data key is {0} bytes; a sealed message needs {DATA_KEY_LEN}")]
    DataKeyLength(usize),
    #[error("{0}")]
    InvalidInput(&'static str),
    #[error("the system random generator failed")]
    Random,
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// A plaintext data key: zeroized on drop, no `Clone`, redacted `Debug`.
pub struct DataKey(Zeroizing<[u8; DATA_KEY_LEN]>);

impl DataKey {
    /// The data key from its bytes (what GenerateDataKey or Decrypt gave).
    pub fn from_slice(bytes: &[u8]) -> Result<Self, FormatError> {
        let mut key = Zeroizing::new([0u8; DATA_KEY_LEN]);
        if bytes.len() != DATA_KEY_LEN {
            return Err(FormatError::DataKeyLength(bytes.len()));
        }
        key.copy_from_slice(bytes);
        Ok(DataKey(key))
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

/// A message's header, parsed and bounded, not yet authenticated: its tag
/// and commitment are checked by [`Header::keys`] with the data key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub suite: u8,
    pub message_id: [u8; MESSAGE_ID_LEN],
    pub frame_len: u32,
    /// The encryption context the data key is bound to (not secret: it is
    /// in every message, in clear).
    pub context: BTreeMap<String, String>,
    /// The wrapped data key, for coffre's Decrypt.
    pub blob: Vec<u8>,
    pub commitment: [u8; COMMITMENT_LEN],
    pub tag: [u8; TAG_LEN],
}

/// The canonical encoding of a context: entries sorted by key, each key
/// and value as a u32be length then its UTF-8 bytes (as coffre's blobs).
pub fn canonical_context(context: &BTreeMap<String, String>) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in context {
        for part in [k, v] {
            out.extend_from_slice(&u32::try_from(part.len()).unwrap_or(u32::MAX).to_be_bytes());
            out.extend_from_slice(part.as_bytes());
        }
    }
    out
}

/// Checks a context against coffre's limits.
pub fn check_context(context: &BTreeMap<String, String>) -> Result<(), &'static str> {
    if context.len() > MAX_CONTEXT_ENTRIES {
        return Err("more than 64 context entries");
    }
    for (k, v) in context {
        if k.is_empty() || k.len() > MAX_CONTEXT_KEY_LEN {
            return Err("a context key is empty or longer than 256 bytes");
        }
        if v.len() > MAX_CONTEXT_VALUE_LEN {
            return Err("a context value is longer than 1024 bytes");
        }
    }
    Ok(())
}

/// Parses a canonical context: strictly increasing keys, valid UTF-8, the
/// limits above, nothing left over. So a context has one encoding only.
fn parse_context(mut bytes: &[u8]) -> Result<BTreeMap<String, String>, FormatError> {
    let bad = FormatError::BadHeader;
    let mut out = BTreeMap::new();
    let mut last: Option<String> = None;
    while !bytes.is_empty() {
        let mut part = || -> Result<String, FormatError> {
            let (len, rest) = bytes
                .split_first_chunk::<4>()
                .ok_or(bad("a context entry is cut"))?;
            let len =
                usize::try_from(u32::from_be_bytes(*len)).map_err(|_| bad("context length"))?;
            let text = rest.get(..len).ok_or(bad("a context entry is cut"))?;
            bytes = rest.get(len..).unwrap_or_default();
            String::from_utf8(text.to_vec()).map_err(|_| bad("a context entry is not UTF-8"))
        };
        let key = part()?;
        let value = part()?;
        if last.as_ref().is_some_and(|l| *l >= key) {
            return Err(bad("context keys are not in strictly increasing order"));
        }
        last = Some(key.clone());
        out.insert(key, value);
    }
    check_context(&out).map_err(bad)?;
    Ok(out)
}

impl Header {
    /// Every header byte before the tag.
    pub fn authenticated_bytes(&self) -> Vec<u8> {
        let context = canonical_context(&self.context);
        let mut out = Vec::with_capacity(FIXED_HEADER_LEN + context.len() + self.blob.len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(self.suite);
        out.extend_from_slice(&self.message_id);
        out.extend_from_slice(&self.frame_len.to_be_bytes());
        out.extend_from_slice(
            &u32::try_from(context.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        out.extend_from_slice(&context);
        out.extend_from_slice(
            &u16::try_from(self.blob.len())
                .unwrap_or(u16::MAX)
                .to_be_bytes(),
        );
        out.extend_from_slice(&self.blob);
        out.extend_from_slice(&self.commitment);
        out
    }

    /// The whole header, as written.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.authenticated_bytes();
        out.extend_from_slice(&self.tag);
        out
    }

    /// Reads exactly one header from `input`, strictly: magic, version,
    /// suite, bounds, a canonical context, a blob that looks like coffre's.
    pub fn read_from(input: &mut impl Read) -> Result<Self, FormatError> {
        let mut fixed = [0u8; 2 + 1 + 1 + MESSAGE_ID_LEN + 4 + 4];
        // What the message is, first: a short file that is no sealed
        // message is said to be that, not a truncated one.
        let (start, more) = fixed.split_at_mut(4);
        let got = read_up_to(input, start)?;
        if !MAGIC.starts_with(start.get(..got.min(2)).unwrap_or_default()) {
            return Err(FormatError::NotSealed);
        }
        if got < 4 {
            return Err(FormatError::TruncatedHeader);
        }
        read_exact_or(input, more, FormatError::TruncatedHeader)?;
        let (magic, rest) = fixed.split_at(2);
        if magic != MAGIC {
            return Err(FormatError::NotSealed);
        }
        let (version, rest) = rest.split_first().ok_or(FormatError::TruncatedHeader)?;
        if *version != VERSION {
            return Err(FormatError::UnsupportedVersion(*version));
        }
        let (suite, rest) = rest.split_first().ok_or(FormatError::TruncatedHeader)?;
        if *suite != SUITE_HKDF_SHA256_AES256GCM_COMMIT {
            return Err(FormatError::UnsupportedSuite(*suite));
        }
        let (message_id, rest) = rest
            .split_first_chunk::<MESSAGE_ID_LEN>()
            .ok_or(FormatError::TruncatedHeader)?;
        let (frame_len, rest) = rest
            .split_first_chunk::<4>()
            .ok_or(FormatError::TruncatedHeader)?;
        let frame_len = u32::from_be_bytes(*frame_len);
        if !(MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&frame_len) {
            return Err(FormatError::BadHeader("frame length out of range"));
        }
        let context_len = rest
            .first_chunk::<4>()
            .map(|b| u32::from_be_bytes(*b))
            .ok_or(FormatError::TruncatedHeader)?;
        let context_len = usize::try_from(context_len).unwrap_or(usize::MAX);
        if context_len > MAX_CONTEXT_LEN {
            return Err(FormatError::BadHeader("context too long"));
        }
        let mut context = vec![0u8; context_len];
        read_exact_or(input, &mut context, FormatError::TruncatedHeader)?;
        let context = parse_context(&context)?;
        let mut blob_len = [0u8; 2];
        read_exact_or(input, &mut blob_len, FormatError::TruncatedHeader)?;
        let blob_len = usize::from(u16::from_be_bytes(blob_len));
        if blob_len == 0 || blob_len > MAX_BLOB_LEN {
            return Err(FormatError::BadHeader(
                "wrapped data key length out of range",
            ));
        }
        let mut blob = vec![0u8; blob_len];
        read_exact_or(input, &mut blob, FormatError::TruncatedHeader)?;
        if !blob.starts_with(b"CF") {
            return Err(FormatError::BadHeader(
                "the wrapped data key is not a coffre blob",
            ));
        }
        let mut tail = [0u8; COMMITMENT_LEN + TAG_LEN];
        read_exact_or(input, &mut tail, FormatError::TruncatedHeader)?;
        let (commitment, tag) = tail.split_at(COMMITMENT_LEN);
        Ok(Header {
            suite: *suite,
            message_id: *message_id,
            frame_len,
            context,
            blob,
            commitment: commitment
                .try_into()
                .map_err(|_| FormatError::TruncatedHeader)?,
            tag: tag.try_into().map_err(|_| FormatError::TruncatedHeader)?,
        })
    }

    /// The frame key, once the commitment and the header's tag check out
    /// under `data_key`; [`FormatError::NotAuthentic`] otherwise.
    pub fn keys(&self, data_key: &DataKey) -> Result<FrameKeys, FormatError> {
        let (key, commitment) = schedule(data_key, &self.message_id)?;
        if !bool::from(commitment.ct_eq(&self.commitment)) {
            return Err(FormatError::NotAuthentic);
        }
        let authenticated = self.authenticated_bytes();
        let mut tag = self.tag;
        key.open_in_place(nonce(KIND_HEADER, 0), Aad::from(&authenticated), &mut tag)
            .map_err(|_| FormatError::NotAuthentic)?;
        let mut header_bytes = authenticated;
        header_bytes.extend_from_slice(&self.tag);
        Ok(FrameKeys {
            key,
            aad: digest_of(&header_bytes),
        })
    }

    /// A new header for `context` and `blob` (the data key's wrapped form),
    /// sealed under `data_key` with a random message id; its frame keys.
    pub fn seal(
        data_key: &DataKey,
        context: BTreeMap<String, String>,
        blob: Vec<u8>,
        frame_len: u32,
    ) -> Result<(Header, FrameKeys), FormatError> {
        if !(MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&frame_len) {
            return Err(FormatError::InvalidInput(
                "the frame length must be 256 bytes to 4 MiB",
            ));
        }
        check_context(&context).map_err(FormatError::InvalidInput)?;
        if blob.is_empty() || blob.len() > MAX_BLOB_LEN || !blob.starts_with(b"CF") {
            return Err(FormatError::InvalidInput(
                "the wrapped data key must be a coffre blob of at most 1024 bytes",
            ));
        }
        let mut message_id = [0u8; MESSAGE_ID_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut message_id)
            .map_err(|_| FormatError::Random)?;
        Self::seal_with_id(data_key, context, blob, frame_len, message_id)
    }

    /// [`Header::seal`] with a given message id: for the golden messages
    /// only (a message id must be random and never reused).
    #[doc(hidden)]
    pub fn seal_with_id(
        data_key: &DataKey,
        context: BTreeMap<String, String>,
        blob: Vec<u8>,
        frame_len: u32,
        message_id: [u8; MESSAGE_ID_LEN],
    ) -> Result<(Header, FrameKeys), FormatError> {
        let (key, commitment) = schedule(data_key, &message_id)?;
        let mut header = Header {
            suite: SUITE_HKDF_SHA256_AES256GCM_COMMIT,
            message_id,
            frame_len,
            context,
            blob,
            commitment,
            tag: [0u8; TAG_LEN],
        };
        let tag = key
            .seal_in_place_separate_tag(
                nonce(KIND_HEADER, 0),
                Aad::from(header.authenticated_bytes()),
                &mut [],
            )
            .map_err(|_| FormatError::NotAuthentic)?;
        header.tag.copy_from_slice(tag.as_ref());
        let aad = digest_of(&header.to_bytes());
        Ok((header, FrameKeys { key, aad }))
    }
}

/// The frame key of one message and the frames' AAD (the header's digest).
pub struct FrameKeys {
    key: LessSafeKey,
    aad: [u8; 32],
}

impl std::fmt::Debug for FrameKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FrameKeys(<redacted>)")
    }
}

impl FrameKeys {
    /// Seals frame `index` in place; appends its tag.
    pub fn seal_frame(&self, index: u64, last: bool, buf: &mut Vec<u8>) -> Result<(), FormatError> {
        let kind = if last { KIND_LAST } else { KIND_FRAME };
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(kind, index), Aad::from(self.aad), buf)
            .map_err(|_| FormatError::NotAuthentic)?;
        buf.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Opens frame `index` (ciphertext ‖ tag) in place; the plaintext's
    /// length. Nothing of it may be used if this fails.
    pub fn open_frame(&self, index: u64, last: bool, buf: &mut [u8]) -> Result<usize, FormatError> {
        let kind = if last { KIND_LAST } else { KIND_FRAME };
        let plain = self
            .key
            .open_in_place(nonce(kind, index), Aad::from(self.aad), buf)
            .map_err(|_| FormatError::NotAuthentic)?;
        Ok(plain.len())
    }
}

fn nonce(kind: u8, index: u64) -> Nonce {
    let mut n = [0u8; aead::NONCE_LEN];
    if let Some(first) = n.first_mut() {
        *first = kind;
    }
    if let Some(counter) = n.get_mut(4..) {
        counter.copy_from_slice(&index.to_be_bytes());
    }
    Nonce::assume_unique_for_key(n)
}

fn digest_of(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, bytes).as_ref());
    out
}

struct Len32;

impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

/// The frame key and the commitment of (data key, message id).
fn schedule(
    data_key: &DataKey,
    message_id: &[u8; MESSAGE_ID_LEN],
) -> Result<(LessSafeKey, [u8; COMMITMENT_LEN]), FormatError> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, message_id).extract(&data_key.0[..]);
    let mut key = Zeroizing::new([0u8; 32]);
    let mut commitment = [0u8; COMMITMENT_LEN];
    prk.expand(&[LABEL_KEY], Len32)
        .and_then(|okm| okm.fill(&mut key[..]))
        .map_err(|_| FormatError::NotAuthentic)?;
    prk.expand(&[LABEL_COMMIT], Len32)
        .and_then(|okm| okm.fill(&mut commitment))
        .map_err(|_| FormatError::NotAuthentic)?;
    let unbound =
        UnboundKey::new(&aead::AES_256_GCM, &key[..]).map_err(|_| FormatError::NotAuthentic)?;
    Ok((LessSafeKey::new(unbound), commitment))
}

/// Reads until `buf` is full or the input ends; the bytes read.
fn read_up_to(input: &mut impl Read, buf: &mut [u8]) -> Result<usize, FormatError> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(buf.get_mut(got..).unwrap_or_default()) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FormatError::Io(e)),
        }
    }
    Ok(got)
}

/// `read_exact`, with an early end of input reported as `eof`.
fn read_exact_or(
    input: &mut impl Read,
    buf: &mut [u8],
    eof: FormatError,
) -> Result<(), FormatError> {
    match input.read_exact(buf) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(eof),
        Err(e) => Err(FormatError::Io(e)),
    }
}
