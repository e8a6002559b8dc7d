//! The cryptography of wrapped data keys (suite 1 of format v1).
//!
//! For each wrap: a fresh 32-byte random salt and 12-byte IV;
//! `k = HKDF-SHA256(ikm = CMK version material, salt, info = "coffre/v1/wrap" ‖ key_id ‖ version)`;
//! then AES-256-GCM under `k` with
//! `AAD = header bytes (0..68) ‖ SHA-256(canonical encryption context)`.
//!
//! A fresh derived key per wrap keeps every AES-GCM key far below the 2^32
//! random-IV limit of NIST SP 800-38D, however many data keys a CMK wraps.
//! The derived key and the AES key schedule are zeroized when dropped.
//! Every authentication failure is the same [`AuthenticationFailed`]: no
//! oracle tells which part of the blob or context was wrong.
//!
//! Nothing here is a home-made primitive: HKDF, SHA-256 and the random
//! generator are ring's, AES-256-GCM is RustCrypto's `aes-gcm` (whose tag
//! check is constant-time).

use aes_gcm::AeadInOut;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use ring::digest;
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::envelope::{self, Header, IV_LEN, MAX_CIPHERTEXT_LEN, ParsedBlob, SALT_LEN, TAG_LEN};
use crate::model::{EncryptionContext, KeyId};
use crate::secret::{CMK_LEN, CmkMaterial, SecretBytes};

/// Length of a context digest (SHA-256).
pub const CONTEXT_DIGEST_LEN: usize = 32;
pub type ContextDigest = [u8; CONTEXT_DIGEST_LEN];

const WRAP_INFO_LABEL: &[u8] = b"coffre/v1/wrap";
/// The HKDF label of an XKS encryption's key (`xks_seal`): never the same
/// derived key as a wrapped data key's, whatever the salt.
const XKS_INFO_LABEL: &[u8] = b"coffre/xks/v1/encrypt";
/// Domain separation of the salt an XKS encryption derives its key from.
const XKS_SALT_LABEL: &[u8] = b"coffre/xks/v1/salt";

/// The one error for any failure to authenticate a blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("authentication failed")]
pub struct AuthenticationFailed;

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("plaintext must be 1 to {MAX_CIPHERTEXT_LEN} bytes, got {0}")]
    PlaintextLength(usize),
    #[error("the system random generator failed")]
    Random,
    #[error("AES-GCM refused the input")]
    Aead,
}

/// Canonical encoding of a context: entries sorted by key, each key and value
/// as a big-endian u32 length followed by its UTF-8 bytes.
pub fn canonical_context(context: &EncryptionContext) -> Vec<u8> {
    let size: usize = context
        .entries()
        .iter()
        .map(|(k, v)| 8 + k.len() + v.len())
        .sum();
    let mut out = Vec::with_capacity(size);
    feed_canonical_context(context, |piece| out.extend_from_slice(piece));
    out
}

/// The bytes of [`canonical_context`], piece by piece, for a digest to
/// take without building them (each request digests its context twice).
pub fn feed_canonical_context(context: &EncryptionContext, mut feed: impl FnMut(&[u8])) {
    // BTreeMap iterates in key order (byte-wise on UTF-8, which is what
    // "sorted by key" means here).
    for (k, v) in context.entries() {
        for bytes in [k.as_bytes(), v.as_bytes()] {
            // Context strings are bounded far below u32::MAX by
            // EncryptionContext.
            let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
            feed(&len.to_be_bytes());
            feed(bytes);
        }
    }
}

/// SHA-256 of the canonical context.
pub fn context_digest(context: &EncryptionContext) -> ContextDigest {
    let mut ctx = digest::Context::new(&digest::SHA256);
    feed_canonical_context(context, |piece| ctx.update(piece));
    let d = ctx.finish();
    let mut out = [0u8; CONTEXT_DIGEST_LEN];
    out.copy_from_slice(d.as_ref());
    out
}

/// A cryptographic random generator shared by the wraps of one process.
#[derive(Debug, Clone)]
pub struct Rng(SystemRandom);

impl Default for Rng {
    fn default() -> Self {
        Self(SystemRandom::new())
    }
}

impl Rng {
    pub fn fill(&self, dest: &mut [u8]) -> Result<(), SealError> {
        self.0.fill(dest).map_err(|_| SealError::Random)
    }
}

struct DerivedKeyLen;

impl hkdf::KeyType for DerivedKeyLen {
    fn len(&self) -> usize {
        CMK_LEN
    }
}

/// The per-wrap AES-256-GCM key. The cipher (and thus its key schedule)
/// zeroizes on drop through aes-gcm's `zeroize` feature.
fn derive_cipher(
    cmk: &CmkMaterial,
    key_id: KeyId,
    key_version: u32,
    salt: &[u8; SALT_LEN],
) -> Result<Aes256Gcm, AuthenticationFailed> {
    derive_labelled(WRAP_INFO_LABEL, cmk, key_id, key_version, salt)
}

fn derive_labelled(
    label: &[u8],
    cmk: &CmkMaterial,
    key_id: KeyId,
    key_version: u32,
    salt: &[u8; SALT_LEN],
) -> Result<Aes256Gcm, AuthenticationFailed> {
    let version = key_version.to_be_bytes();
    let info: [&[u8]; 3] = [label, key_id.as_bytes(), &version];
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(cmk.expose());
    let okm = prk
        .expand(&info, DerivedKeyLen)
        .map_err(|_| AuthenticationFailed)?;
    let mut key = Zeroizing::new([0u8; CMK_LEN]);
    okm.fill(&mut key[..]).map_err(|_| AuthenticationFailed)?;
    Aes256Gcm::new_from_slice(&key[..]).map_err(|_| AuthenticationFailed)
}

/// The AAD of a blob: its header bytes ‖ the context digest (both suites).
pub fn blob_aad(
    header_bytes: &[u8],
    digest: &ContextDigest,
) -> [u8; envelope::HEADER_LEN + CONTEXT_DIGEST_LEN] {
    aad(header_bytes, digest)
}

fn aad(
    header_bytes: &[u8],
    digest: &ContextDigest,
) -> [u8; envelope::HEADER_LEN + CONTEXT_DIGEST_LEN] {
    let mut aad = [0u8; envelope::HEADER_LEN + CONTEXT_DIGEST_LEN];
    let (h, d) = aad.split_at_mut(envelope::HEADER_LEN);
    h.copy_from_slice(header_bytes);
    d.copy_from_slice(digest);
    aad
}

/// Wraps `plaintext` (1..=4096 bytes) under CMK version `key_version` of
/// `key_id`, bound to the context digest. Returns a v1 blob.
pub fn seal(
    rng: &Rng,
    cmk: &CmkMaterial,
    key_id: KeyId,
    key_version: u32,
    digest: &ContextDigest,
    plaintext: &[u8],
) -> Result<Vec<u8>, SealError> {
    if plaintext.is_empty() || plaintext.len() > MAX_CIPHERTEXT_LEN {
        return Err(SealError::PlaintextLength(plaintext.len()));
    }
    // One draw for both (one system call instead of two).
    let mut random = [0u8; SALT_LEN + IV_LEN];
    rng.fill(&mut random)?;
    let (salt_part, iv_part) = random.split_at(SALT_LEN);
    let mut salt = [0u8; SALT_LEN];
    let mut iv = [0u8; IV_LEN];
    salt.copy_from_slice(salt_part);
    iv.copy_from_slice(iv_part);
    let header = Header {
        suite: envelope::SUITE_HKDF_SHA256_AES256GCM,
        key_id,
        key_version,
        salt,
        iv,
    };
    seal_with_header(cmk, &header, digest, plaintext)
}

/// [`seal`] with a caller-chosen salt and IV. Only for known-answer tests and
/// golden vectors: reusing an IV under the same salt breaks AES-GCM.
#[doc(hidden)]
pub fn seal_with_header(
    cmk: &CmkMaterial,
    header: &Header,
    digest: &ContextDigest,
    plaintext: &[u8],
) -> Result<Vec<u8>, SealError> {
    if plaintext.is_empty() || plaintext.len() > MAX_CIPHERTEXT_LEN {
        return Err(SealError::PlaintextLength(plaintext.len()));
    }
    let cipher = derive_cipher(cmk, header.key_id, header.key_version, &header.salt)
        .map_err(|_| SealError::Aead)?;
    let header_bytes = header.to_bytes();
    let aad = aad(&header_bytes, digest);
    // Holds the plaintext until it is encrypted in place: zeroized if
    // encryption fails.
    let mut blob = Zeroizing::new(Vec::with_capacity(
        envelope::HEADER_LEN + plaintext.len() + TAG_LEN,
    ));
    blob.extend_from_slice(&header_bytes);
    blob.extend_from_slice(plaintext);
    let body = blob
        .get_mut(envelope::HEADER_LEN..)
        .ok_or(SealError::Aead)?;
    let tag = encrypt_in_place(&cipher, &header.iv, &aad, body)?;
    blob.extend_from_slice(&tag);
    Ok(std::mem::take(&mut *blob))
}

/// AES-256-GCM (96-bit IV, 128-bit tag) encryption in place: the one call
/// that [`seal_with_header`] and [`aes256gcm_seal`] share.
fn encrypt_in_place(
    cipher: &Aes256Gcm,
    iv: &[u8; IV_LEN],
    aad: &[u8],
    buf: &mut [u8],
) -> Result<[u8; TAG_LEN], SealError> {
    let tag = cipher
        .encrypt_inout_detached(&Nonce::from(*iv), aad, buf.into())
        .map_err(|_| SealError::Aead)?;
    Ok(tag.into())
}

/// AES-256-GCM decryption in place, tag checked in constant time: the one
/// call that [`open`] and [`aes256gcm_open`] share.
fn decrypt_in_place(
    cipher: &Aes256Gcm,
    iv: &[u8; IV_LEN],
    aad: &[u8],
    buf: &mut [u8],
    tag: &[u8; TAG_LEN],
) -> Result<(), AuthenticationFailed> {
    cipher
        .decrypt_inout_detached(&Nonce::from(*iv), aad, buf.into(), &Tag::from(*tag))
        .map_err(|_| AuthenticationFailed)
}

/// Raw AES-256-GCM under an explicit key, through the same code as
/// [`seal_with_header`]; returns `ciphertext ‖ tag`. Only for known-answer
/// tests (Wycheproof): coffre never encrypts under a key it did not derive.
#[doc(hidden)]
pub fn aes256gcm_seal(
    key: &[u8; CMK_LEN],
    iv: &[u8; IV_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, SealError> {
    let cipher = Aes256Gcm::new_from_slice(key).map_err(|_| SealError::Aead)?;
    let mut out = Vec::with_capacity(plaintext.len() + TAG_LEN);
    out.extend_from_slice(plaintext);
    let tag = encrypt_in_place(&cipher, iv, aad, &mut out)?;
    out.extend_from_slice(&tag);
    Ok(out)
}

/// Raw AES-256-GCM decryption under an explicit key, through the same code
/// as [`open`]. Only for known-answer tests (Wycheproof).
#[doc(hidden)]
pub fn aes256gcm_open(
    key: &[u8; CMK_LEN],
    iv: &[u8; IV_LEN],
    aad: &[u8],
    ciphertext: &[u8],
    tag: &[u8; TAG_LEN],
) -> Result<SecretBytes, AuthenticationFailed> {
    let cipher = Aes256Gcm::new_from_slice(key).map_err(|_| AuthenticationFailed)?;
    let mut out = SecretBytes::new(ciphertext.to_vec());
    decrypt_in_place(&cipher, iv, aad, out.expose_mut(), tag)?;
    Ok(out)
}

/// The 32-byte derivation salt of one XKS encryption, from the short
/// random nonce its `ciphertextMetadata` carries:
/// `SHA-256("coffre/xks/v1/salt" ‖ key_id ‖ u32be(version) ‖ nonce)`.
/// The same salt, in the HSM, for a key of protection level HSM: the label
/// keeps it apart from any salt of a wrapped data key.
pub fn xks_salt(key_id: KeyId, key_version: u32, nonce: &[u8]) -> [u8; SALT_LEN] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(XKS_SALT_LABEL);
    ctx.update(key_id.as_bytes());
    ctx.update(&key_version.to_be_bytes());
    ctx.update(nonce);
    let mut salt = [0u8; SALT_LEN];
    salt.copy_from_slice(ctx.finish().as_ref());
    salt
}

/// AES-256-GCM for the XKS front under a key derived from CMK version
/// `key_version` and `salt` (label `coffre/xks/v1/encrypt`); returns the
/// ciphertext and the tag apart, as the XKS API carries them.
pub fn xks_seal(
    cmk: &CmkMaterial,
    key_id: KeyId,
    key_version: u32,
    salt: &[u8; SALT_LEN],
    iv: &[u8; IV_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<(Vec<u8>, [u8; TAG_LEN]), SealError> {
    let cipher = derive_labelled(XKS_INFO_LABEL, cmk, key_id, key_version, salt)
        .map_err(|_| SealError::Aead)?;
    let mut out = Zeroizing::new(plaintext.to_vec());
    let tag = encrypt_in_place(&cipher, iv, aad, &mut out)?;
    Ok((std::mem::take(&mut *out), tag))
}

/// Opens what [`xks_seal`] sealed with the same parameters.
#[allow(clippy::too_many_arguments)]
pub fn xks_open(
    cmk: &CmkMaterial,
    key_id: KeyId,
    key_version: u32,
    salt: &[u8; SALT_LEN],
    iv: &[u8; IV_LEN],
    aad: &[u8],
    ciphertext: &[u8],
    tag: &[u8; TAG_LEN],
) -> Result<SecretBytes, AuthenticationFailed> {
    let cipher = derive_labelled(XKS_INFO_LABEL, cmk, key_id, key_version, salt)?;
    let mut out = SecretBytes::new(ciphertext.to_vec());
    decrypt_in_place(&cipher, iv, aad, out.expose_mut(), tag)?;
    Ok(out)
}

/// Unwraps a parsed blob with the CMK version it names. The caller has
/// already checked that `cmk` is the material of the blob's key and version.
pub fn open(
    cmk: &CmkMaterial,
    blob: &ParsedBlob<'_>,
    digest: &ContextDigest,
) -> Result<SecretBytes, AuthenticationFailed> {
    // A suite-2 blob is opened by the HSM, never with material in memory.
    if blob.header.suite != envelope::SUITE_HKDF_SHA256_AES256GCM {
        return Err(AuthenticationFailed);
    }
    let cipher = derive_cipher(
        cmk,
        blob.header.key_id,
        blob.header.key_version,
        &blob.header.salt,
    )?;
    let aad = aad(blob.header_bytes, digest);
    let mut out = SecretBytes::new(blob.ciphertext.to_vec());
    decrypt_in_place(&cipher, &blob.header.iv, &aad, out.expose_mut(), blob.tag)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(pairs: &[(&str, &str)]) -> EncryptionContext {
        EncryptionContext::new(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string()))).unwrap()
    }

    #[test]
    fn canonical_context_is_sorted_and_length_prefixed() {
        let c = ctx(&[("b", "2"), ("a", "xy")]);
        assert_eq!(
            canonical_context(&c),
            [
                &[0, 0, 0, 1][..],
                b"a",
                &[0, 0, 0, 2],
                b"xy",
                &[0, 0, 0, 1],
                b"b",
                &[0, 0, 0, 1],
                b"2",
            ]
            .concat()
        );
        assert!(canonical_context(&EncryptionContext::default()).is_empty());
        // Fed piece by piece, the same bytes: the digests take them so.
        let mut fed = Vec::new();
        feed_canonical_context(&c, |piece| fed.extend_from_slice(piece));
        assert_eq!(fed, canonical_context(&c));
        assert_eq!(
            context_digest(&c)[..],
            *digest::digest(&digest::SHA256, &canonical_context(&c)).as_ref()
        );
    }

    #[test]
    fn length_prefixes_prevent_ambiguity() {
        assert_ne!(
            context_digest(&ctx(&[("ab", "c")])),
            context_digest(&ctx(&[("a", "bc")]))
        );
    }

    #[test]
    fn seal_then_open() {
        let rng = Rng::default();
        let cmk = CmkMaterial::from_slice(&[5; 32]).unwrap();
        let id = KeyId::new_random();
        let d = context_digest(&ctx(&[("tenant", "t1")]));
        let blob = seal(&rng, &cmk, id, 3, &d, b"secret data key").unwrap();
        let parsed = envelope::parse(&blob).unwrap();
        assert_eq!(parsed.header.key_id, id);
        assert_eq!(parsed.header.key_version, 3);
        assert_eq!(
            open(&cmk, &parsed, &d).unwrap().expose(),
            b"secret data key"
        );
        let other = context_digest(&ctx(&[("tenant", "t2")]));
        assert_eq!(
            open(&cmk, &parsed, &other).unwrap_err(),
            AuthenticationFailed
        );
    }

    #[test]
    fn seal_refuses_bad_lengths() {
        let rng = Rng::default();
        let cmk = CmkMaterial::from_slice(&[5; 32]).unwrap();
        let d = [0u8; 32];
        let id = KeyId::new_random();
        assert_eq!(
            seal(&rng, &cmk, id, 1, &d, b""),
            Err(SealError::PlaintextLength(0))
        );
        assert_eq!(
            seal(&rng, &cmk, id, 1, &d, &[0; 4097]),
            Err(SealError::PlaintextLength(4097))
        );
        assert!(seal(&rng, &cmk, id, 1, &d, &[0; 4096]).is_ok());
    }
}
