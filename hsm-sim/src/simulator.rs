//! The simulated token: sessions, root keys, key operations, faults.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use aes_gcm::{AeadInOut, Aes256Gcm, KeyInit, Nonce, Tag};
use ring::rand::{SecureRandom, SystemRandom};
use ring::{digest, hkdf};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

use crate::error::SimError;
use crate::format;
use crate::state::{self, FileKey, RootKey, Token};

/// Most sessions open at once. A login beyond evicts the least recently
/// used session (clients that never log out, e.g. after a restart, must not
/// lock everyone out); its holder then gets [`SimError::NotLoggedIn`].
pub const MAX_SESSIONS: usize = 4096;
/// Largest `generate_random` request.
pub const MAX_RANDOM_LEN: usize = 1024;
/// Largest plaintext of [`Simulator::seal_with_object`].
pub const MAX_SEAL_LEN: usize = 4300;

/// Where [`Simulator::seal_with_object`] seals: the object, the derivation
/// salt, the GCM IV and AAD.
#[derive(Clone, Copy, Debug)]
pub struct ObjectSeal<'a> {
    pub object: &'a str,
    pub salt: &'a [u8; 32],
    pub iv: &'a [u8; 12],
    pub aad: &'a [u8],
}

/// An opaque session handle: 16 random bytes, returned by
/// [`Simulator::login`]. It is a bearer token, so its `Debug` is redacted.
pub struct SessionId([u8; 16]);

impl SessionId {
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// Parses a handle received over the wire; `None` if not 16 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionId(<redacted>)")
    }
}

/// The open sessions, with their last use (a logical clock: every login and
/// every operation on a session ticks it), so the least recently used one
/// can be evicted when the table is full.
#[derive(Default)]
struct Sessions {
    last_use: HashMap<[u8; 16], u64>,
    by_use: BTreeMap<u64, [u8; 16]>,
    clock: u64,
}

impl Sessions {
    fn len(&self) -> usize {
        self.last_use.len()
    }

    fn tick(&mut self) -> u64 {
        self.clock = self.clock.wrapping_add(1);
        self.clock
    }

    /// Marks `id` used now; `false` if it is not open.
    fn touch(&mut self, id: &[u8; 16]) -> bool {
        let now = self.tick();
        let Some(last) = self.last_use.get_mut(id) else {
            return false;
        };
        self.by_use.remove(last);
        *last = now;
        self.by_use.insert(now, *id);
        true
    }

    /// Opens `id`, evicting the least recently used sessions if full.
    fn open(&mut self, id: [u8; 16]) {
        while self.len() >= MAX_SESSIONS {
            let Some((_, oldest)) = self.by_use.pop_first() else {
                break;
            };
            self.last_use.remove(&oldest);
            tracing::info!("session table full: evicted the least recently used session");
        }
        let now = self.tick();
        if let Some(old) = self.last_use.insert(id, now) {
            self.by_use.remove(&old);
        }
        self.by_use.insert(now, id);
    }

    fn close(&mut self, id: &[u8; 16]) -> bool {
        match self.last_use.remove(id) {
            Some(last) => {
                self.by_use.remove(&last);
                true
            }
            None => false,
        }
    }
}

/// Injected faults. They apply to `login` and every key operation; `info`
/// only observes the outage.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Faults {
    /// Added before every operation runs.
    pub latency: Duration,
    /// Share of operations failing with [`SimError::Unavailable`], `0.0..=1.0`.
    pub error_rate: f64,
    /// Every operation fails with [`SimError::Unavailable`].
    pub outage: bool,
}

/// Public facts about the token. Never key material.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimInfo {
    pub label: String,
    /// Ids of the root keys the token holds, ascending.
    pub root_key_ids: Vec<u32>,
    /// The root key new wraps use; `0` once tampered.
    pub current_root_key_id: u32,
    pub tampered: bool,
}

/// A simulated HSM token backed by one encrypted state file.
///
/// `Send + Sync`: share it as `Arc<Simulator>`. Locks are never held across
/// an `.await`. State-changing operations (rotate, destroy, tamper) write the
/// state file synchronously before they return: they are rare.
pub struct Simulator {
    path: PathBuf,
    file_key: FileKey,
    pin_digest: Zeroizing<[u8; 32]>,
    rng: SystemRandom,
    token: Mutex<Token>,
    sessions: Mutex<Sessions>,
    faults: Mutex<Faults>,
    /// Wrong PINs wait their turn here: see [`LOGIN_BACKOFF`].
    failed_logins: tokio::sync::Mutex<()>,
}

/// How long a wrong PIN holds the gate before its refusal is answered.
/// Wrong PINs pass the gate one at a time, so that guessing runs at most
/// one PIN per `LOGIN_BACKOFF` however many callers try at once, while a
/// right PIN never waits (a guesser cannot lock coffre out).
pub const LOGIN_BACKOFF: std::time::Duration = std::time::Duration::from_millis(500);

impl fmt::Debug for Simulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let token = lock(&self.token);
        f.debug_struct("Simulator")
            .field("path", &self.path)
            .field("label", &token.label)
            .field("root_key_ids", &token.keys.keys().collect::<Vec<_>>())
            .field("current_root_key_id", &token.current)
            .field("tampered", &token.tampered)
            .field("sessions", &lock(&self.sessions).len())
            .field("faults", &*lock(&self.faults))
            .finish_non_exhaustive()
    }
}

/// A poisoned lock only means another thread panicked mid-operation; every
/// operation here leaves the data consistent before it can panic, so the
/// data is still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn pin_digest(pin: &str) -> Zeroizing<[u8; 32]> {
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(digest::digest(&digest::SHA256, pin.as_bytes()).as_ref());
    out
}

/// Builds `header ‖ ciphertext ‖ tag` in `blob` (cleared first), with
/// `encrypt` turning the body, a copy of `plaintext`, into ciphertext in
/// place and returning the tag. The copy of `plaintext` lives only in
/// `blob`, which the caller keeps in [`Zeroizing`]; if encryption fails
/// (or the tag has the wrong length) it is also wiped before this returns,
/// so no clear material outlives the error.
fn seal_blob<T: AsRef<[u8]>>(
    blob: &mut Zeroizing<Vec<u8>>,
    header: &[u8; format::HEADER_LEN],
    plaintext: &[u8],
    encrypt: impl FnOnce(&mut [u8]) -> Option<T>,
) -> Result<(), SimError> {
    blob.zeroize();
    blob.reserve_exact(format::HEADER_LEN + plaintext.len() + format::TAG_LEN);
    blob.extend_from_slice(header);
    blob.extend_from_slice(plaintext);
    let tag = blob
        .get_mut(format::HEADER_LEN..)
        .and_then(encrypt)
        .filter(|tag| tag.as_ref().len() == format::TAG_LEN);
    match tag {
        Some(tag) => {
            blob.extend_from_slice(tag.as_ref());
            Ok(())
        }
        None => {
            blob.as_mut_slice().zeroize();
            Err(SimError::InvalidInput("AES-GCM refused the input".into()))
        }
    }
}

impl Simulator {
    /// Opens the token whose state lives in `state_path`, creating it (root
    /// key 1, labelled `label`) if the file does not exist. An existing file
    /// keeps its own label. A PIN that does not open the file is
    /// [`SimError::BadPin`].
    pub fn open(state_path: &Path, pin: &str, label: &str) -> Result<Self, SimError> {
        if pin.is_empty() {
            return Err(SimError::InvalidInput("empty PIN".into()));
        }
        let rng = SystemRandom::new();
        let (file_key, token) = match std::fs::read(state_path) {
            Ok(bytes) => FileKey::open(pin, &bytes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let token = Token::init(label, &rng)?;
                let file_key = FileKey::generate(pin, &rng)?;
                state::write_atomic(state_path, &file_key.seal(&token, &rng)?)?;
                (file_key, token)
            }
            Err(e) => return Err(SimError::storage("read state file", e)),
        };
        Ok(Self {
            path: state_path.to_path_buf(),
            file_key,
            pin_digest: pin_digest(pin),
            rng,
            token: Mutex::new(token),
            sessions: Mutex::new(Sessions::default()),
            failed_logins: tokio::sync::Mutex::new(()),
            faults: Mutex::new(Faults::default()),
        })
    }

    fn persist(&self, token: &Token) -> Result<(), SimError> {
        let bytes = self.file_key.seal(token, &self.rng)?;
        state::write_atomic(&self.path, &bytes)
    }

    fn random_array<const N: usize>(&self) -> Result<[u8; N], SimError> {
        let mut out = [0u8; N];
        self.rng.fill(&mut out).map_err(|_| SimError::Random)?;
        Ok(out)
    }

    /// A uniform draw in `[0, 1)`.
    fn draw(&self) -> Result<f64, SimError> {
        let bits = u64::from_be_bytes(self.random_array()?) >> 11;
        #[allow(clippy::cast_precision_loss)] // 53 bits: exact in an f64
        Ok(bits as f64 / (1u64 << 53) as f64)
    }

    async fn inject_faults(&self) -> Result<(), SimError> {
        let faults = self.faults();
        if faults.outage {
            return Err(SimError::Unavailable("outage (injected)"));
        }
        if !faults.latency.is_zero() {
            tokio::time::sleep(faults.latency).await;
        }
        if faults.error_rate > 0.0 && self.draw()? < faults.error_rate {
            return Err(SimError::Unavailable("random error (injected)"));
        }
        Ok(())
    }

    /// Checks the session is open and marks it used.
    fn check_session(&self, session: &SessionId) -> Result<(), SimError> {
        if lock(&self.sessions).touch(&session.0) {
            Ok(())
        } else {
            Err(SimError::NotLoggedIn)
        }
    }

    /// Faults, then session: the order a network HSM would see them in.
    async fn enter(&self, session: &SessionId) -> Result<(), SimError> {
        self.inject_faults().await?;
        self.check_session(session)
    }

    /// Opens a session. The PIN's SHA-256 digest is compared in constant
    /// time with the token's. With [`MAX_SESSIONS`] open, the least recently
    /// used one is closed to make room.
    pub async fn login(&self, pin: &str) -> Result<SessionId, SimError> {
        self.inject_faults().await?;
        let offered = pin_digest(pin);
        if !bool::from(offered.ct_eq(&*self.pin_digest)) {
            let _gate = self.failed_logins.lock().await;
            tokio::time::sleep(LOGIN_BACKOFF).await;
            return Err(SimError::BadPin);
        }
        let id = self.random_array::<16>()?;
        lock(&self.sessions).open(id);
        Ok(SessionId(id))
    }

    /// Closes a session.
    pub fn logout(&self, session: &SessionId) -> Result<(), SimError> {
        if lock(&self.sessions).close(&session.0) {
            Ok(())
        } else {
            Err(SimError::NotLoggedIn)
        }
    }

    /// Wraps `plaintext` (1..=1024 bytes) under the current root key, bound
    /// to `aad`. Returns the blob (see [`crate::format`]) and the root key id.
    pub async fn wrap(
        &self,
        session: &SessionId,
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<(Vec<u8>, u32), SimError> {
        self.enter(session).await?;
        if plaintext.is_empty() || plaintext.len() > format::MAX_PLAINTEXT_LEN {
            return Err(SimError::InvalidInput(format!(
                "plaintext must be 1..={} bytes",
                format::MAX_PLAINTEXT_LEN
            )));
        }
        let iv = self.random_array::<{ format::IV_LEN }>()?;
        let token = lock(&self.token);
        if token.tampered {
            return Err(SimError::Tampered);
        }
        let id = token.current;
        let cipher = token.keys.get(&id).ok_or(SimError::Tampered)?.cipher()?;
        drop(token);
        let header = format::header(id, &iv);
        let mut full_aad = Vec::with_capacity(format::HEADER_LEN + aad.len());
        full_aad.extend_from_slice(&header);
        full_aad.extend_from_slice(aad);
        // Clear material until encryption succeeds: zeroized if it fails.
        let mut blob = Zeroizing::new(Vec::new());
        seal_blob(&mut blob, &header, plaintext, |body| {
            cipher
                .encrypt_inout_detached(&Nonce::from(iv), &full_aad, body.into())
                .ok()
        })?;
        // Ciphertext from here on: hand the buffer out, leaving an empty one.
        Ok((std::mem::take(&mut *blob), id))
    }

    /// Unwraps a blob made by [`Simulator::wrap`] with the same `aad`. Any
    /// parse or authentication failure, including a blob whose root key was
    /// destroyed, is [`SimError::AuthenticationFailed`].
    pub async fn unwrap(
        &self,
        session: &SessionId,
        wrapped: &[u8],
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, SimError> {
        self.enter(session).await?;
        let (parsed, cipher) = {
            let token = lock(&self.token);
            if token.tampered {
                return Err(SimError::Tampered);
            }
            let parsed = format::parse(wrapped).map_err(|_| SimError::AuthenticationFailed)?;
            let cipher = token
                .keys
                .get(&parsed.root_key_id)
                .ok_or(SimError::AuthenticationFailed)?
                .cipher()?;
            (parsed, cipher)
        };
        let mut full_aad = Vec::with_capacity(format::HEADER_LEN + aad.len());
        full_aad.extend_from_slice(parsed.header);
        full_aad.extend_from_slice(aad);
        let mut out = Zeroizing::new(parsed.ciphertext.to_vec());
        cipher
            .decrypt_inout_detached(
                &Nonce::from(parsed.iv),
                &full_aad,
                out.as_mut_slice().into(),
                &Tag::from(parsed.tag),
            )
            .map_err(|_| SimError::AuthenticationFailed)?;
        Ok(out)
    }

    /// `len` (1..=1024) bytes from the system generator.
    pub async fn generate_random(
        &self,
        session: &SessionId,
        len: usize,
    ) -> Result<Zeroizing<Vec<u8>>, SimError> {
        self.enter(session).await?;
        if len == 0 || len > MAX_RANDOM_LEN {
            return Err(SimError::InvalidInput(format!(
                "length must be 1..={MAX_RANDOM_LEN}"
            )));
        }
        if lock(&self.token).tampered {
            return Err(SimError::Tampered);
        }
        let mut out = Zeroizing::new(vec![0u8; len]);
        self.rng.fill(&mut out).map_err(|_| SimError::Random)?;
        Ok(out)
    }

    /// Creates a root key and makes it current; older ones keep unwrapping.
    /// Returns the new id. The state file is written before this returns; if
    /// that fails, nothing changes.
    pub async fn rotate_root_key(&self, session: &SessionId) -> Result<u32, SimError> {
        self.enter(session).await?;
        let key = RootKey::generate(&self.rng)?;
        let mut token = lock(&self.token);
        if token.tampered {
            return Err(SimError::Tampered);
        }
        let id = token.next_id;
        let next = id
            .checked_add(1)
            .ok_or_else(|| SimError::InvalidInput("root key ids exhausted".into()))?;
        let previous = token.current;
        token.keys.insert(id, key);
        token.current = id;
        token.next_id = next;
        if let Err(e) = self.persist(&token) {
            token.keys.remove(&id);
            token.current = previous;
            token.next_id = id;
            return Err(e);
        }
        Ok(id)
    }

    /// Destroys a root key that is not the current one, for good: blobs it
    /// wrapped no longer unwrap.
    pub async fn destroy_root_key(&self, session: &SessionId, id: u32) -> Result<(), SimError> {
        self.enter(session).await?;
        let mut token = lock(&self.token);
        if token.tampered {
            return Err(SimError::Tampered);
        }
        if id == token.current {
            return Err(SimError::CurrentRootKey(id));
        }
        let key = token.keys.remove(&id).ok_or(SimError::UnknownRootKey(id))?;
        if let Err(e) = self.persist(&token) {
            token.keys.insert(id, key);
            return Err(e);
        }
        Ok(())
    }

    // --- Key objects: CMK versions kept in the token -----------------------

    /// Generates a 256-bit key object named `name` (1..=128 bytes). It never
    /// leaves the token. A taken name is refused. The state file is written
    /// before this returns.
    pub async fn create_key_object(&self, session: &SessionId, name: &str) -> Result<(), SimError> {
        self.enter(session).await?;
        if name.is_empty() || name.len() > state::MAX_OBJECT_NAME_LEN {
            return Err(SimError::InvalidInput(format!(
                "object name must be 1..={} bytes",
                state::MAX_OBJECT_NAME_LEN
            )));
        }
        let key = RootKey::generate(&self.rng)?;
        let mut token = lock(&self.token);
        if token.tampered {
            return Err(SimError::Tampered);
        }
        if token.objects.contains_key(name) {
            return Err(SimError::InvalidInput(format!("object {name:?} exists")));
        }
        token.objects.insert(name.to_owned(), key);
        if let Err(e) = self.persist(&token) {
            token.objects.remove(name);
            return Err(e);
        }
        Ok(())
    }

    /// Destroys a key object; an unknown name is not an error.
    pub async fn destroy_key_object(
        &self,
        session: &SessionId,
        name: &str,
    ) -> Result<(), SimError> {
        self.enter(session).await?;
        let mut token = lock(&self.token);
        if token.tampered {
            return Err(SimError::Tampered);
        }
        let Some(key) = token.objects.remove(name) else {
            return Ok(());
        };
        if let Err(e) = self.persist(&token) {
            token.objects.insert(name.to_owned(), key);
            return Err(e);
        }
        Ok(())
    }

    /// The per-seal cipher: HKDF-SHA256(object key, salt, info =
    /// "hsm-sim/v1/object-seal" ‖ name), as AES-256-GCM.
    fn object_cipher(&self, name: &str, salt: &[u8; 32]) -> Result<Aes256Gcm, SimError> {
        struct Len32;
        impl hkdf::KeyType for Len32 {
            fn len(&self) -> usize {
                32
            }
        }
        let token = lock(&self.token);
        if token.tampered {
            return Err(SimError::Tampered);
        }
        let object = token
            .objects
            .get(name)
            .ok_or(SimError::AuthenticationFailed)?;
        let info = [b"hsm-sim/v1/object-seal".as_slice(), name.as_bytes()];
        let mut key = Zeroizing::new([0u8; 32]);
        hkdf::Salt::new(hkdf::HKDF_SHA256, salt)
            .extract(object.material())
            .expand(&info, Len32)
            .and_then(|okm| okm.fill(&mut key[..]))
            .map_err(|_| SimError::InvalidInput("HKDF refused the input".into()))?;
        Aes256Gcm::new_from_slice(&key[..]).map_err(|_| SimError::AuthenticationFailed)
    }

    /// Seals `plaintext` (1..=MAX_SEAL_LEN bytes) under a key derived from the object
    /// and `salt`, AES-256-GCM with `iv` and `aad`: ciphertext ‖ tag.
    pub async fn seal_with_object(
        &self,
        session: &SessionId,
        seal: ObjectSeal<'_>,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, SimError> {
        self.enter(session).await?;
        if plaintext.is_empty() || plaintext.len() > MAX_SEAL_LEN {
            return Err(SimError::InvalidInput(format!(
                "plaintext must be 1..={MAX_SEAL_LEN} bytes"
            )));
        }
        let cipher = match self.object_cipher(seal.object, seal.salt) {
            Err(SimError::AuthenticationFailed) => {
                return Err(SimError::InvalidInput(format!(
                    "no object {:?}",
                    seal.object
                )));
            }
            other => other?,
        };
        let mut out = Zeroizing::new(plaintext.to_vec());
        let tag = cipher
            .encrypt_inout_detached(&Nonce::from(*seal.iv), seal.aad, out.as_mut_slice().into())
            .map_err(|_| SimError::InvalidInput("AES-GCM refused the input".into()))?;
        let mut sealed = std::mem::take(&mut *out);
        sealed.extend_from_slice(tag.as_slice());
        Ok(sealed)
    }

    /// Opens what [`Simulator::seal_with_object`] sealed. Any mismatch, or an
    /// unknown object, is [`SimError::AuthenticationFailed`].
    pub async fn open_with_object(
        &self,
        session: &SessionId,
        seal: ObjectSeal<'_>,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, SimError> {
        self.enter(session).await?;
        let (body, tag) = sealed
            .split_last_chunk::<{ format::TAG_LEN }>()
            .filter(|(body, _)| !body.is_empty() && body.len() <= MAX_SEAL_LEN)
            .ok_or(SimError::AuthenticationFailed)?;
        let cipher = self.object_cipher(seal.object, seal.salt)?;
        let mut out = Zeroizing::new(body.to_vec());
        cipher
            .decrypt_inout_detached(
                &Nonce::from(*seal.iv),
                seal.aad,
                out.as_mut_slice().into(),
                &Tag::from(*tag),
            )
            .map_err(|_| SimError::AuthenticationFailed)?;
        Ok(out)
    }

    /// Public facts about the token. Fails only during an injected outage.
    pub fn info(&self) -> Result<SimInfo, SimError> {
        if self.faults().outage {
            return Err(SimError::Unavailable("outage (injected)"));
        }
        Ok(self.info_unchecked())
    }

    fn info_unchecked(&self) -> SimInfo {
        let token = lock(&self.token);
        SimInfo {
            label: token.label.clone(),
            root_key_ids: token.keys.keys().copied().collect(),
            current_root_key_id: if token.tampered { 0 } else { token.current },
            tampered: token.tampered,
        }
    }

    /// Whether the tamper response has run.
    pub fn is_tampered(&self) -> bool {
        lock(&self.token).tampered
    }

    /// Replaces the injected faults. `error_rate` must be within `0.0..=1.0`.
    pub fn set_faults(&self, faults: Faults) -> Result<(), SimError> {
        if !(0.0..=1.0).contains(&faults.error_rate) {
            return Err(SimError::InvalidInput(
                "error_rate must be within 0.0..=1.0".into(),
            ));
        }
        *lock(&self.faults) = faults;
        Ok(())
    }

    /// The injected faults in force.
    pub fn faults(&self) -> Faults {
        *lock(&self.faults)
    }

    /// The tamper response: zeroizes every root key in memory and rewrites
    /// the state file without them. Irreversible: every key operation then
    /// fails with [`SimError::Tampered`]. The memory is wiped even if the
    /// file cannot be rewritten (the error is returned).
    pub fn tamper(&self) -> Result<(), SimError> {
        let mut token = lock(&self.token);
        token.keys.clear(); // RootKey zeroizes on drop
        token.objects.clear();
        token.tampered = true;
        self.persist(&token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulator_is_send_sync_and_debug_is_redacted() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Simulator>();
        let dir = tempfile::tempdir().unwrap();
        let sim = Simulator::open(&dir.path().join("s"), "pin-1234", "lbl").unwrap();
        let shown = format!("{sim:?}");
        assert!(shown.contains("lbl"));
        assert!(!shown.contains("pin-1234"));
        // Key bytes would show as arrays of numbers.
        assert!(!shown.contains("RootKey"), "{shown}");
        assert!(!shown.contains("[0,") && !shown.contains(", 0,"), "{shown}");
        let token = lock(&sim.token);
        let key_shown = format!("{:?}", *token);
        assert!(key_shown.contains("<redacted>"));
        assert!(!key_shown.contains("key: ["), "{key_shown}");
    }

    const CLEAR: &[u8] = b"clear key material, never to linger";

    #[test]
    fn seal_blob_wipes_the_clear_copy_when_encryption_fails() {
        let header = format::header(1, &[7; format::IV_LEN]);
        let mut blob = Zeroizing::new(Vec::new());
        let mut seen = Vec::new();
        let err = seal_blob(&mut blob, &header, CLEAR, |body| {
            seen = body.to_vec();
            None::<[u8; format::TAG_LEN]>
        })
        .unwrap_err();
        assert!(matches!(err, SimError::InvalidInput(_)), "{err:?}");
        // The clear copy was in the buffer when encryption ran...
        assert_eq!(seen, CLEAR);
        // ...and is gone once the error is returned.
        assert!(blob.iter().all(|b| *b == 0), "{:?}", &blob[..]);
        assert!(!blob.windows(4).any(|w| w == &CLEAR[..4]));

        // A tag of the wrong length is a failure too, wiped the same way.
        let err = seal_blob(&mut blob, &header, CLEAR, |_| Some([1u8; 3]));
        assert!(err.is_err());
        assert!(blob.iter().all(|b| *b == 0));
    }

    #[test]
    fn seal_blob_lays_out_header_ciphertext_tag() {
        let header = format::header(9, &[3; format::IV_LEN]);
        let mut blob = Zeroizing::new(b"stale".to_vec());
        seal_blob(&mut blob, &header, CLEAR, |body| {
            body.iter_mut().for_each(|b| *b ^= 0xFF);
            Some([0xEE; format::TAG_LEN])
        })
        .unwrap();
        assert_eq!(
            blob.len(),
            format::HEADER_LEN + CLEAR.len() + format::TAG_LEN
        );
        assert_eq!(&blob[..format::HEADER_LEN], &header);
        let body = &blob[format::HEADER_LEN..format::HEADER_LEN + CLEAR.len()];
        assert!(body.iter().zip(CLEAR).all(|(c, p)| *c == p ^ 0xFF));
        assert_eq!(
            &blob[blob.len() - format::TAG_LEN..],
            &[0xEE; format::TAG_LEN]
        );
    }

    #[tokio::test]
    async fn draw_is_in_unit_interval() {
        let dir = tempfile::tempdir().unwrap();
        let sim = Simulator::open(&dir.path().join("s"), "p", "l").unwrap();
        for _ in 0..1000 {
            let d = sim.draw().unwrap();
            assert!((0.0..1.0).contains(&d));
        }
        assert_eq!(format!("{:?}", SessionId([7; 16])), "SessionId(<redacted>)");
    }
}
