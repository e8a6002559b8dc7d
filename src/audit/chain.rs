//! The append-only writer, and the signed checkpoints.
//!
//! # Checkpoint encoding (v1)
//!
//! A checkpoint line is `{"checkpoint":{"seq":S,"head_hash":H,"time":T,"signature":B}}`
//! where `S` is the `seq` of the record just before it, `H` that record's
//! `hash`, `T` milliseconds since the Unix epoch, and `B` the standard base64
//! (padded) Ed25519 signature over the UTF-8 string
//!
//! ```text
//! coffre-audit-checkpoint/v1\n{S}\n{H}\n{T}
//! ```
//!
//! with `S` and `T` in decimal, no trailing newline.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::rand::SystemRandom;
use ring::signature::{self, Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};

use super::AuditError;
use super::record::{AuditEntry, AuditRecord};
use super::verify::verify;
use crate::model::{Clock, SystemClock, Timestamp};
use crate::secret::SecretBytes;

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE {
/// SEQUENCE { OID 1.3.101.112 }, BIT STRING (0 unused bits) } before the
/// 32-byte key.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// A signed statement: the chain's head at `seq` was `head_hash`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub seq: u64,
    pub head_hash: String,
    pub time: Timestamp,
    /// Base64 Ed25519 signature over [`Checkpoint::signed_message`].
    pub signature: String,
}

/// The on-disk wrapper: `{"checkpoint": {...}}`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CheckpointLine {
    pub(crate) checkpoint: Checkpoint,
}

impl Checkpoint {
    /// The exact bytes signed (module docs).
    pub fn signed_message(seq: u64, head_hash: &str, time: Timestamp) -> String {
        format!("coffre-audit-checkpoint/v1\n{seq}\n{head_hash}\n{}", time.0)
    }

    /// Whether the signature verifies under `public_key`.
    pub fn signature_is_valid(&self, public_key: &[u8; 32]) -> bool {
        let Ok(sig) = BASE64.decode(&self.signature) else {
            return false;
        };
        let msg = Self::signed_message(self.seq, &self.head_hash, self.time);
        signature::UnparsedPublicKey::new(&signature::ED25519, public_key)
            .verify(msg.as_bytes(), &sig)
            .is_ok()
    }
}

/// The checkpoint signing key (Ed25519). Secret: no `Clone`, redacted
/// `Debug`. Its PKCS#8 form is meant to be stored wrapped under the HSM root
/// key. (ring does not zeroize the key pair on drop; the PKCS#8 bytes we
/// hand out are in a zeroizing [`SecretBytes`].)
pub struct CheckpointSigner(Ed25519KeyPair);

impl CheckpointSigner {
    /// A new random key; returns the signer and its PKCS#8 (v2) document.
    pub fn generate() -> Result<(Self, SecretBytes), AuditError> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| AuditError::InvalidKey)?;
        let pkcs8 = SecretBytes::new(pkcs8.as_ref().to_vec());
        let signer = Self::from_pkcs8(pkcs8.expose())?;
        Ok((signer, pkcs8))
    }

    /// From a PKCS#8 v2 document, as produced by [`Self::generate`].
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, AuditError> {
        Ed25519KeyPair::from_pkcs8(pkcs8)
            .map(Self)
            .map_err(|_| AuditError::InvalidKey)
    }

    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.0.public_key().as_ref());
        out
    }

    /// The public key as a SubjectPublicKeyInfo PEM (`BEGIN PUBLIC KEY`).
    pub fn public_key_pem(&self) -> String {
        public_key_to_pem(&self.public_key())
    }

    /// Signs the chain head at `seq`.
    pub fn checkpoint(&self, seq: u64, head_hash: &str, time: Timestamp) -> Checkpoint {
        let msg = Checkpoint::signed_message(seq, head_hash, time);
        let sig = self.0.sign(msg.as_bytes());
        Checkpoint {
            seq,
            head_hash: head_hash.to_string(),
            time,
            signature: BASE64.encode(sig.as_ref()),
        }
    }
}

impl fmt::Debug for CheckpointSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CheckpointSigner(<redacted>)")
    }
}

/// An Ed25519 public key as SubjectPublicKeyInfo PEM.
pub fn public_key_to_pem(key: &[u8; 32]) -> String {
    let mut der = ED25519_SPKI_PREFIX.to_vec();
    der.extend_from_slice(key);
    format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        BASE64.encode(der)
    )
}

/// The inverse of [`public_key_to_pem`]; `None` unless it is exactly an
/// Ed25519 SubjectPublicKeyInfo.
pub fn public_key_from_pem(pem: &str) -> Option<[u8; 32]> {
    let body: String = pem
        .trim()
        .strip_prefix("-----BEGIN PUBLIC KEY-----")?
        .strip_suffix("-----END PUBLIC KEY-----")?
        .split_whitespace()
        .collect();
    let der = BASE64.decode(body).ok()?;
    let key = der.strip_prefix(&ED25519_SPKI_PREFIX[..])?;
    key.try_into().ok()
}

/// When an append is acknowledged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// The line has been handed to the OS (`write_all`): it survives a crash
    /// of coffre, not of the machine.
    #[default]
    Write,
    /// Also `sync_data` before returning: it survives a power loss.
    Fsync,
}

/// When a checkpoint is written: after `every_records` records since the
/// last one, or when `every` has passed since the last one (checked on
/// append, so an idle log writes none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointPolicy {
    pub every_records: u64,
    pub every: Duration,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        Self {
            every_records: 1000,
            every: Duration::from_secs(60),
        }
    }
}

#[derive(Clone, Debug)]
pub struct AuditLogOptions {
    pub durability: Durability,
    pub checkpoints: CheckpointPolicy,
    pub clock: Arc<dyn Clock>,
}

impl Default for AuditLogOptions {
    fn default() -> Self {
        Self {
            durability: Durability::default(),
            checkpoints: CheckpointPolicy::default(),
            clock: Arc::new(SystemClock),
        }
    }
}

/// The append-only writer over one JSON-lines file. Holds an exclusive
/// advisory lock on the file while open. Not internally synchronized: the
/// server will hold it behind a mutex, one append at a time.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: File,
    signer: CheckpointSigner,
    options: AuditLogOptions,
    /// `seq` of the last record (0 when empty).
    seq: u64,
    head_hash: String,
    since_checkpoint: u64,
    last_checkpoint_time: Timestamp,
    poisoned: bool,
}

impl AuditLog {
    /// [`Self::open_with`] with default options.
    pub fn open(path: &Path, signer: CheckpointSigner) -> Result<Self, AuditError> {
        Self::open_with(path, signer, AuditLogOptions::default())
    }

    /// Opens or creates the log. The existing content is verified in full
    /// (hashes, chain, checkpoint signatures under `signer`'s public key):
    /// coffre never appends to a chain it cannot vouch for. A last line
    /// without its `\n` (a write torn by a crash, never acknowledged) is
    /// truncated away with a warning; anything else invalid is an error.
    pub fn open_with(
        path: &Path,
        signer: CheckpointSigner,
        options: AuditLogOptions,
    ) -> Result<Self, AuditError> {
        let existed = path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        if fs2::FileExt::try_lock_exclusive(&file).is_err() {
            return Err(AuditError::Locked);
        }
        let mut content = Vec::new();
        file.read_to_end(&mut content)?;
        let complete = content
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        if complete < content.len() {
            tracing::warn!(
                file = %path.display(),
                bytes = content.len() - complete,
                "audit log ends in a torn line (a write interrupted by a crash); truncating it"
            );
            file.set_len(complete as u64)?;
            file.sync_data()?;
            content.truncate(complete);
        }
        let report = verify(content.as_slice(), &signer.public_key(), |_| {})?;
        if !existed && options.durability == Durability::Fsync {
            sync_parent_dir(path)?;
        }
        let now = options.clock.now();
        let (since_checkpoint, last_checkpoint_time) = match &report.last_checkpoint {
            Some(cp) => (report.last_seq.saturating_sub(cp.seq), cp.time),
            None => (report.records, now),
        };
        Ok(Self {
            path: path.to_path_buf(),
            file,
            signer,
            options,
            seq: report.last_seq,
            head_hash: report.head_hash,
            since_checkpoint,
            last_checkpoint_time,
            poisoned: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `seq` of the last record (0 for an empty log).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// `hash` of the last record (64 zeros for an empty log).
    pub fn head_hash(&self) -> &str {
        &self.head_hash
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.signer.public_key()
    }

    /// Appends one record and returns it; a checkpoint follows it if the
    /// policy says so. When this returns `Ok`, the record (and checkpoint)
    /// have reached the OS, and with [`Durability::Fsync`] the disk. On `Err`
    /// the caller must refuse the request (fail closed); after a failed
    /// write the log stays [`AuditError::Poisoned`] until reopened.
    pub fn append(&mut self, entry: AuditEntry) -> Result<AuditRecord, AuditError> {
        if self.poisoned {
            return Err(AuditError::Poisoned);
        }
        let time = self.options.clock.now();
        let record = AuditRecord::new(self.seq + 1, time, self.head_hash.clone(), entry);
        let mut line =
            serde_json::to_vec(&record).map_err(|e| AuditError::Encode(e.to_string()))?;
        line.push(b'\n');
        self.write_line(&line)?;
        self.seq = record.seq;
        self.head_hash.clone_from(&record.hash);
        self.since_checkpoint += 1;
        let policy = self.options.checkpoints;
        let due_by_time = time.0.saturating_sub(self.last_checkpoint_time.0)
            >= i64::try_from(policy.every.as_millis()).unwrap_or(i64::MAX);
        if self.since_checkpoint >= policy.every_records || due_by_time {
            self.checkpoint()?;
        }
        Ok(record)
    }

    /// Writes a checkpoint of the current head now (e.g. at shutdown, so
    /// the whole log is covered). Does nothing on an empty log.
    pub fn checkpoint(&mut self) -> Result<Option<Checkpoint>, AuditError> {
        if self.poisoned {
            return Err(AuditError::Poisoned);
        }
        if self.seq == 0 {
            return Ok(None);
        }
        let time = self.options.clock.now();
        let checkpoint = self.signer.checkpoint(self.seq, &self.head_hash, time);
        let wrapped = CheckpointLine { checkpoint };
        let mut line =
            serde_json::to_vec(&wrapped).map_err(|e| AuditError::Encode(e.to_string()))?;
        line.push(b'\n');
        self.write_line(&line)?;
        self.since_checkpoint = 0;
        self.last_checkpoint_time = time;
        Ok(Some(wrapped.checkpoint))
    }

    fn write_line(&mut self, line: &[u8]) -> Result<(), AuditError> {
        let result = self.file.write_all(line).and_then(|()| {
            if self.options.durability == Durability::Fsync {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        if result.is_err() {
            // Part of the line may be in the file: appending after it would
            // corrupt the log. Reopening truncates the torn line.
            self.poisoned = true;
        }
        Ok(result?)
    }
}

/// Makes a newly created file's directory entry durable.
fn sync_parent_dir(path: &Path) -> Result<(), AuditError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::audit::record::GENESIS_HASH;
    use crate::audit::record::tests::entry;
    use crate::model::ManualClock;

    pub(crate) fn test_signer() -> (CheckpointSigner, [u8; 32]) {
        let (signer, _pkcs8) = CheckpointSigner::generate().unwrap();
        let pk = signer.public_key();
        (signer, pk)
    }

    pub(crate) fn options(every_records: u64) -> (AuditLogOptions, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new(Timestamp(1_700_000_000_000)));
        let opts = AuditLogOptions {
            durability: Durability::Write,
            checkpoints: CheckpointPolicy {
                every_records,
                every: Duration::from_secs(3600),
            },
            clock: clock.clone(),
        };
        (opts, clock)
    }

    #[test]
    fn append_and_reopen_continue_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (signer, pkcs8) = CheckpointSigner::generate().unwrap();
        let pkcs8 = pkcs8.expose().to_vec();
        let (opts, _clock) = options(3);
        let mut log = AuditLog::open_with(&path, signer, opts.clone()).unwrap();
        let first = log.append(entry(1)).unwrap();
        assert_eq!((first.seq, first.prev_hash.as_str()), (1, GENESIS_HASH));
        let mut last = first;
        for n in 2..=5 {
            let r = log.append(entry(n)).unwrap();
            assert_eq!(r.prev_hash, last.hash);
            last = r;
        }
        drop(log);

        let signer = CheckpointSigner::from_pkcs8(&pkcs8).unwrap();
        let mut log = AuditLog::open_with(&path, signer, opts).unwrap();
        assert_eq!((log.seq(), log.head_hash()), (5, last.hash.as_str()));
        let r = log.append(entry(6)).unwrap();
        assert_eq!((r.seq, &r.prev_hash), (6, &last.hash));
        // Checkpoint after record 3 and after record 6: the count carried
        // over the reopen (2 records since the first checkpoint).
        let text = std::fs::read_to_string(&path).unwrap();
        let kinds: Vec<bool> = text
            .lines()
            .map(|l| l.starts_with("{\"checkpoint\""))
            .collect();
        assert_eq!(
            kinds,
            [false, false, false, true, false, false, false, true]
        );
        let report = verify(text.as_bytes(), &log.public_key(), |_| {}).unwrap();
        assert_eq!(
            (report.records, report.checkpoints, report.last_seq),
            (6, 2, 6)
        );
        assert_eq!(report.uncovered_records, 0);
    }

    #[test]
    fn checkpoints_by_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (signer, pk) = test_signer();
        let (mut opts, clock) = options(u64::MAX);
        opts.checkpoints.every = Duration::from_secs(10);
        let mut log = AuditLog::open_with(&path, signer, opts).unwrap();
        log.append(entry(1)).unwrap();
        clock.advance(Duration::from_secs(11));
        log.append(entry(2)).unwrap();
        log.append(entry(3)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let report = verify(text.as_bytes(), &pk, |_| {}).unwrap();
        assert_eq!(report.checkpoints, 1);
        assert_eq!(report.last_checkpoint.unwrap().seq, 2);
        assert_eq!(report.uncovered_records, 1);
    }

    #[test]
    fn torn_last_line_is_truncated_but_other_damage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (_, pkcs8) = CheckpointSigner::generate().unwrap();
        let pkcs8 = pkcs8.expose().to_vec();
        let (opts, _) = options(100);
        let mut log = AuditLog::open_with(
            &path,
            CheckpointSigner::from_pkcs8(&pkcs8).unwrap(),
            opts.clone(),
        )
        .unwrap();
        log.append(entry(1)).unwrap();
        let second = log.append(entry(2)).unwrap();
        drop(log);
        let good_len = std::fs::metadata(&path).unwrap().len();
        // A crash in the middle of writing record 3.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":3,\"time\":17000").unwrap();
        drop(f);
        let mut log = AuditLog::open_with(
            &path,
            CheckpointSigner::from_pkcs8(&pkcs8).unwrap(),
            opts.clone(),
        )
        .unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good_len);
        assert_eq!(log.head_hash(), second.hash);
        assert_eq!(log.append(entry(3)).unwrap().seq, 3);
        drop(log);

        // A complete but invalid line is not a torn write: refuse to open.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"not json\n").unwrap();
        drop(f);
        let err = AuditLog::open_with(&path, CheckpointSigner::from_pkcs8(&pkcs8).unwrap(), opts)
            .unwrap_err();
        assert!(
            matches!(err, AuditError::Corrupt(ref e) if e.line == 4),
            "{err}"
        );
    }

    #[test]
    fn a_second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (a, _) = test_signer();
        let (b, _) = test_signer();
        let _log = AuditLog::open(&path, a).unwrap();
        assert!(matches!(AuditLog::open(&path, b), Err(AuditError::Locked)));
    }

    #[test]
    fn a_log_signed_by_another_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (a, _) = test_signer();
        let (opts, _) = options(1);
        let mut log = AuditLog::open_with(&path, a, opts.clone()).unwrap();
        log.append(entry(1)).unwrap();
        drop(log);
        let (b, _) = test_signer();
        assert!(matches!(
            AuditLog::open_with(&path, b, opts),
            Err(AuditError::Corrupt(_))
        ));
    }

    #[test]
    fn signer_is_redacted_and_pem_round_trips() {
        let (signer, pk) = test_signer();
        assert_eq!(format!("{signer:?}"), "CheckpointSigner(<redacted>)");
        let pem = signer.public_key_pem();
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA"));
        assert_eq!(public_key_from_pem(&pem), Some(pk));
        assert!(
            public_key_from_pem("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----")
                .is_none()
        );
        let cp = signer.checkpoint(7, GENESIS_HASH, Timestamp(5));
        assert!(cp.signature_is_valid(&pk));
        assert!(!cp.signature_is_valid(&[0u8; 32]));
    }
}
