//! The token's state file: root keys sealed under a key derived from the PIN.
//!
//! ```text
//!  0            8    9                13          29          41           len-16   len
//!  | "HSMSIMST" | 01 | iterations u32 | salt (16) | nonce (12) | ciphertext | tag (16) |
//! ```
//!
//! - file key = PBKDF2-HMAC-SHA256(PIN, salt, iterations), 32 bytes;
//! - AES-256-GCM, AAD = the 41 header bytes, a fresh random nonce per write;
//! - the plaintext body (big-endian, strict parsing, no trailing bytes):
//!
//! ```text
//!  tampered u8 | current u32 | next_id u32 | label_len u16 | label | count u32 | count × (id u32 | key (32))
//!  | objects u32 | objects × (name_len u16 | name | key (32))          (version 2 only)
//! ```
//!
//! Version 2 added the key objects (CMK versions kept in the token, for
//! coffre's protection level `HSM`). Version 1 files open (no objects); every
//! write is version 2.
//!
//! A tag failure means the PIN is wrong (or the file was altered: the two are
//! indistinguishable by design). Writes go to a temporary file in the same
//! directory (mode 0600), which is fsynced, renamed over the old file, and the
//! directory is fsynced: a crash leaves either the old or the new state.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::num::NonZeroU32;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use aes_gcm::{AeadInOut, Aes256Gcm, KeyInit, Nonce, Tag};
use ring::pbkdf2;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::error::SimError;

const MAGIC: [u8; 8] = *b"HSMSIMST";
const VERSION: u8 = 2;
/// The version before key objects; still read.
const VERSION_1: u8 = 1;
const SALT_LEN: usize = 16;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 8 + 1 + 4 + SALT_LEN + NONCE_LEN;
/// PBKDF2 iterations for new files. Files with fewer are refused; files with
/// absurdly many too (a crafted file must not hang the simulator).
pub const PBKDF2_ITERATIONS: u32 = 100_000;
const MAX_ITERATIONS: u32 = 10_000_000;
/// Length of a root key (AES-256).
pub const ROOT_KEY_LEN: usize = 32;
const MAX_LABEL_LEN: usize = 256;
/// Longest key-object name.
pub const MAX_OBJECT_NAME_LEN: usize = 128;

/// One root key's material. Boxed so moves leave no copies; zeroized on drop.
#[derive(Zeroize, ZeroizeOnDrop)]
pub(crate) struct RootKey(Box<[u8; ROOT_KEY_LEN]>);

impl RootKey {
    pub(crate) fn generate(rng: &SystemRandom) -> Result<Self, SimError> {
        let mut key = Box::new([0u8; ROOT_KEY_LEN]);
        rng.fill(&mut key[..]).map_err(|_| SimError::Random)?;
        Ok(Self(key))
    }

    pub(crate) fn cipher(&self) -> Result<Aes256Gcm, SimError> {
        Aes256Gcm::new_from_slice(&self.0[..]).map_err(|_| SimError::AuthenticationFailed)
    }

    /// The key material, for derivations inside the simulator.
    pub(crate) fn material(&self) -> &[u8; ROOT_KEY_LEN] {
        &self.0
    }
}

impl std::fmt::Debug for RootKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RootKey(<redacted>)")
    }
}

/// The token: what the state file holds.
#[derive(Debug)]
pub(crate) struct Token {
    pub(crate) label: String,
    pub(crate) keys: BTreeMap<u32, RootKey>,
    /// Key objects by name: CMK versions that never leave the token.
    pub(crate) objects: BTreeMap<String, RootKey>,
    pub(crate) current: u32,
    pub(crate) next_id: u32,
    pub(crate) tampered: bool,
}

impl Token {
    /// A fresh token with root key 1.
    pub(crate) fn init(label: &str, rng: &SystemRandom) -> Result<Self, SimError> {
        if label.len() > MAX_LABEL_LEN {
            return Err(SimError::InvalidInput(format!(
                "label longer than {MAX_LABEL_LEN} bytes"
            )));
        }
        let mut keys = BTreeMap::new();
        keys.insert(1, RootKey::generate(rng)?);
        Ok(Self {
            label: label.to_owned(),
            keys,
            objects: BTreeMap::new(),
            current: 1,
            next_id: 2,
            tampered: false,
        })
    }

    fn encode(&self) -> Result<Zeroizing<Vec<u8>>, SimError> {
        let label_len = u16::try_from(self.label.len())
            .map_err(|_| SimError::storage("encode", "label too long"))?;
        let count = u32::try_from(self.keys.len())
            .map_err(|_| SimError::storage("encode", "too many keys"))?;
        let mut out = Zeroizing::new(Vec::with_capacity(
            15 + self.label.len() + self.keys.len() * (4 + ROOT_KEY_LEN),
        ));
        out.push(u8::from(self.tampered));
        out.extend_from_slice(&self.current.to_be_bytes());
        out.extend_from_slice(&self.next_id.to_be_bytes());
        out.extend_from_slice(&label_len.to_be_bytes());
        out.extend_from_slice(self.label.as_bytes());
        out.extend_from_slice(&count.to_be_bytes());
        for (id, key) in &self.keys {
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(&key.0[..]);
        }
        let objects = u32::try_from(self.objects.len())
            .map_err(|_| SimError::storage("encode", "too many objects"))?;
        out.extend_from_slice(&objects.to_be_bytes());
        for (name, key) in &self.objects {
            let len = u16::try_from(name.len())
                .map_err(|_| SimError::storage("encode", "object name too long"))?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&key.0[..]);
        }
        Ok(out)
    }

    fn decode(body: &[u8], version: u8) -> Result<Self, SimError> {
        let bad = || SimError::storage("decode", "malformed state body");
        let mut r = Reader(body);
        let tampered = match r.take::<1>().ok_or_else(bad)? {
            [0] => false,
            [1] => true,
            _ => return Err(bad()),
        };
        let current = u32::from_be_bytes(r.take().ok_or_else(bad)?);
        let next_id = u32::from_be_bytes(r.take().ok_or_else(bad)?);
        let label_len = usize::from(u16::from_be_bytes(r.take().ok_or_else(bad)?));
        let label = r.slice(label_len).ok_or_else(bad)?;
        let label = String::from_utf8(label.to_vec()).map_err(|_| bad())?;
        let count = u32::from_be_bytes(r.take().ok_or_else(bad)?);
        let mut keys = BTreeMap::new();
        for _ in 0..count {
            let id = u32::from_be_bytes(r.take().ok_or_else(bad)?);
            let material = r.slice(ROOT_KEY_LEN).ok_or_else(bad)?;
            // Wrapped in RootKey at once, so it is zeroized on every path
            // (a bare Box dropped by an early return would not be).
            let mut key = RootKey(Box::new([0u8; ROOT_KEY_LEN]));
            key.0.copy_from_slice(material);
            if id == 0 || id >= next_id || keys.insert(id, key).is_some() {
                return Err(bad());
            }
        }
        let mut objects = BTreeMap::new();
        if version != VERSION_1 {
            let count = u32::from_be_bytes(r.take().ok_or_else(bad)?);
            for _ in 0..count {
                let len = usize::from(u16::from_be_bytes(r.take().ok_or_else(bad)?));
                if len == 0 || len > MAX_OBJECT_NAME_LEN {
                    return Err(bad());
                }
                let name = r.slice(len).ok_or_else(bad)?;
                let name = String::from_utf8(name.to_vec()).map_err(|_| bad())?;
                let material = r.slice(ROOT_KEY_LEN).ok_or_else(bad)?;
                let mut key = RootKey(Box::new([0u8; ROOT_KEY_LEN]));
                key.0.copy_from_slice(material);
                if objects.insert(name, key).is_some() {
                    return Err(bad());
                }
            }
        }
        if !r.0.is_empty() {
            return Err(bad());
        }
        // Untampered tokens always have their current key.
        if !tampered && !keys.contains_key(&current) {
            return Err(bad());
        }
        Ok(Self {
            label,
            keys,
            objects,
            current,
            next_id,
            tampered,
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }

    fn slice(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }
}

/// The key that seals the state file, derived from the PIN.
pub(crate) struct FileKey {
    salt: [u8; SALT_LEN],
    iterations: NonZeroU32,
    key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for FileKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileKey")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

impl FileKey {
    fn derive(pin: &str, salt: [u8; SALT_LEN], iterations: NonZeroU32) -> Self {
        let mut key = Zeroizing::new([0u8; 32]);
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            iterations,
            &salt,
            pin.as_bytes(),
            &mut key[..],
        );
        Self {
            salt,
            iterations,
            key,
        }
    }

    /// A key with a new random salt, for a new state file.
    pub(crate) fn generate(pin: &str, rng: &SystemRandom) -> Result<Self, SimError> {
        let mut salt = [0u8; SALT_LEN];
        rng.fill(&mut salt).map_err(|_| SimError::Random)?;
        let iterations = NonZeroU32::new(PBKDF2_ITERATIONS).ok_or(SimError::Random)?;
        Ok(Self::derive(pin, salt, iterations))
    }

    /// Opens an existing state file. A wrong PIN is [`SimError::BadPin`].
    pub(crate) fn open(pin: &str, file: &[u8]) -> Result<(Self, Token), SimError> {
        let bad = |what: &str| SimError::storage("state file", what);
        let (header, rest) = file
            .split_first_chunk::<HEADER_LEN>()
            .ok_or_else(|| bad("too short"))?;
        let (ciphertext, tag) = rest
            .split_last_chunk::<TAG_LEN>()
            .ok_or_else(|| bad("too short"))?;
        let mut h = Reader(header);
        if h.take::<8>() != Some(MAGIC) {
            return Err(bad("not an hsm-sim state file"));
        }
        let version = match h.take::<1>() {
            Some([v @ (VERSION | VERSION_1)]) => v,
            _ => return Err(bad("unsupported version")),
        };
        let iterations = u32::from_be_bytes(h.take().ok_or_else(|| bad("too short"))?);
        if !(PBKDF2_ITERATIONS..=MAX_ITERATIONS).contains(&iterations) {
            return Err(bad("PBKDF2 iteration count out of range"));
        }
        let iterations = NonZeroU32::new(iterations).ok_or_else(|| bad("zero iterations"))?;
        let salt: [u8; SALT_LEN] = h.take().ok_or_else(|| bad("too short"))?;
        let nonce: [u8; NONCE_LEN] = h.take().ok_or_else(|| bad("too short"))?;
        let fk = Self::derive(pin, salt, iterations);
        let cipher = Aes256Gcm::new_from_slice(&fk.key[..]).map_err(|_| SimError::BadPin)?;
        let mut body = Zeroizing::new(ciphertext.to_vec());
        cipher
            .decrypt_inout_detached(
                &Nonce::from(nonce),
                header,
                body.as_mut_slice().into(),
                &Tag::from(*tag),
            )
            .map_err(|_| SimError::BadPin)?;
        let token = Token::decode(&body, version)?;
        Ok((fk, token))
    }

    /// Seals `token` into the bytes of a state file.
    pub(crate) fn seal(&self, token: &Token, rng: &SystemRandom) -> Result<Vec<u8>, SimError> {
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill(&mut nonce).map_err(|_| SimError::Random)?;
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(&MAGIC);
        header.push(VERSION);
        header.extend_from_slice(&self.iterations.get().to_be_bytes());
        header.extend_from_slice(&self.salt);
        header.extend_from_slice(&nonce);
        // The clear body (root keys) is Zeroizing until, and whether or not,
        // encryption succeeds.
        let mut body = token.encode()?;
        let cipher =
            Aes256Gcm::new_from_slice(&self.key[..]).map_err(|e| SimError::storage("seal", e))?;
        let tag = cipher
            .encrypt_inout_detached(&Nonce::from(nonce), &header, body.as_mut_slice().into())
            .map_err(|e| SimError::storage("seal", e))?;
        let mut out = header;
        out.extend_from_slice(&body);
        out.extend_from_slice(tag.as_slice());
        Ok(out)
    }
}

/// Crash-safe replacement of `path` with `bytes`, mode 0600.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SimError> {
    fn io(what: &'static str) -> impl Fn(std::io::Error) -> SimError {
        move |e| SimError::storage(what, e)
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| SimError::storage("state path", "has no file name"))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("create temporary state file"))?;
    f.write_all(bytes).map_err(io("write state file"))?;
    f.sync_all().map_err(io("fsync state file"))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io("rename state file"))?;
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync state directory"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_wrong_pin() {
        let rng = SystemRandom::new();
        let mut token = Token::init("lab", &rng).unwrap();
        token.keys.insert(2, RootKey::generate(&rng).unwrap());
        token.current = 2;
        token.next_id = 3;
        let fk = FileKey::generate("1234", &rng).unwrap();
        let bytes = fk.seal(&token, &rng).unwrap();
        let (_, back) = FileKey::open("1234", &bytes).unwrap();
        assert_eq!(back.label, "lab");
        assert_eq!(back.current, 2);
        assert_eq!(back.keys.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(back.keys[&2].0, token.keys[&2].0);
        assert!(matches!(
            FileKey::open("4321", &bytes),
            Err(SimError::BadPin)
        ));
        // Any flipped byte is refused, never a panic.
        for i in [0, 8, 9, 20, HEADER_LEN, bytes.len() - 1] {
            let mut b = bytes.clone();
            b[i] ^= 1;
            assert!(FileKey::open("1234", &b).is_err());
        }
        for len in [0, 10, HEADER_LEN, HEADER_LEN + TAG_LEN, bytes.len() - 1] {
            assert!(FileKey::open("1234", &bytes[..len]).is_err());
        }
    }

    #[test]
    fn decode_rejects_trailing_bytes() {
        let rng = SystemRandom::new();
        let token = Token::init("x", &rng).unwrap();
        let mut body = token.encode().unwrap().to_vec();
        assert!(Token::decode(&body, VERSION).is_ok());
        body.push(0);
        assert!(Token::decode(&body, VERSION).is_err());
    }

    #[test]
    fn key_objects_round_trip_and_version_1_bodies_still_open() {
        let rng = SystemRandom::new();
        let mut token = Token::init("x", &rng).unwrap();
        let v2_empty = token.encode().unwrap().to_vec();
        // A version-1 body is the same without the object count.
        let v1 = &v2_empty[..v2_empty.len() - 4];
        let old = Token::decode(v1, VERSION_1).unwrap();
        assert!(old.objects.is_empty());
        assert!(
            Token::decode(v1, VERSION).is_err(),
            "v2 needs the object count"
        );

        token
            .objects
            .insert("cmk-a".into(), RootKey::generate(&rng).unwrap());
        token
            .objects
            .insert("cmk-b".into(), RootKey::generate(&rng).unwrap());
        let fk = FileKey::generate("1234", &rng).unwrap();
        let (_, back) = FileKey::open("1234", &fk.seal(&token, &rng).unwrap()).unwrap();
        assert_eq!(
            back.objects.keys().collect::<Vec<_>>(),
            vec!["cmk-a", "cmk-b"]
        );
        assert_eq!(back.objects["cmk-b"].0, token.objects["cmk-b"].0);
    }

    #[test]
    fn root_key_debug_is_redacted() {
        let key = RootKey(Box::new([0xAB; ROOT_KEY_LEN]));
        assert_eq!(format!("{key:?}"), "RootKey(<redacted>)");
    }
}
