//! The signed checkpoint: its encodings (v1, v2, v3), the key that signs it,
//! and the PEM form and fingerprint of that key's public half.
//!
//! # Checkpoint encoding, version 3 (a node of a cluster, #17)
//!
//! A node that shares its store with others (`[cluster] node_id`) names
//! itself in every checkpoint, inside what is signed:
//!
//! ```text
//! {"checkpoint":{"version":3,"log_id":L,"key_fingerprint":F,"node":N,"seq":S,"head_hash":H,"time":T,"signature":B}}
//! ```
//!
//! signing `coffre-audit-checkpoint/v3\n{L}\n{F}\n{N}\n{S}\n{H}\n{T}`, the
//! fields as in version 2 below, `N` the node id ([`is_node_id`]: 1 to 48
//! ASCII letters, digits, `.`, `_`, `-`, so it cannot hold a `\n`).
//!
//! Why a version 3 rather than version 2's `log_id` and a node → log id
//! mapping kept in the cluster digest: with the node inside the signature,
//!
//! - a node's file proves on its own whose it is: a file swapped with
//!   another node's, or a checkpoint moved between files, is refused by
//!   the per-file verifier, before and without any digest (the records
//!   after the last digest included);
//! - a checkpoint published to the database (`audit_checkpoints`) is
//!   self-authenticating, node included: the digest signer checks its
//!   signature before it lists it, so a row copied from one node's rows to
//!   another's cannot get into a signed digest (with v2, a database writer
//!   could pair node B with node A's log id, and only the offline check
//!   would notice);
//! - `coffre audit export --cluster` learns each endpoint's node from the
//!   checkpoint the node itself signs.
//!
//! `coffre dev` and single-node `coffre serve` keep writing version 2. A log
//! goes from v1 to v2 to v3 (a single node that joins a cluster), never
//! back, and all its v3 checkpoints name one node.
//!
//! # Checkpoint encoding, version 2 (written since #15)
//!
//! A checkpoint line is
//!
//! ```text
//! {"checkpoint":{"version":2,"log_id":L,"key_fingerprint":F,"seq":S,"head_hash":H,"time":T,"signature":B}}
//! ```
//!
//! where `L` is the log's identity (a random UUID v4 in lowercase hyphenated
//! form, drawn when the log gets its first v2 checkpoint and kept for the
//! log's life, retention pruning included), `F` the key fingerprint
//! ([`key_fingerprint`]: lowercase hex SHA-256 of the public key's DER
//! SubjectPublicKeyInfo, as `openssl pkey -pubin -outform DER | sha256sum`
//! prints it), `S` the `seq` of the record just before it, `H` that record's
//! `hash`, `T` milliseconds since the Unix epoch, and `B` the standard base64
//! (padded) Ed25519 signature over the UTF-8 string
//!
//! ```text
//! coffre-audit-checkpoint/v2\n{L}\n{F}\n{S}\n{H}\n{T}
//! ```
//!
//! with `S` and `T` in decimal, no trailing newline. The line is compact
//! JSON with the fields in exactly this order (the verifier refuses any
//! other encoding).
//!
//! # Checkpoint encoding, version 1 (logs written before #15)
//!
//! `{"checkpoint":{"seq":S,"head_hash":H,"time":T,"signature":B}}`, signing
//!
//! ```text
//! coffre-audit-checkpoint/v1\n{S}\n{H}\n{T}
//! ```
//!
//! It carries no log identity: a v1 checkpoint of one log cannot be told
//! from one of another log under the same key. Old logs keep verifying; a
//! log may go from v1 to v2 checkpoints (the upgrade), never back.
//!
//! The public key travels as an Ed25519 SubjectPublicKeyInfo PEM
//! (`BEGIN PUBLIC KEY`, RFC 8410): [`public_key_to_pem`],
//! [`public_key_from_pem`].

use std::fmt;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{self, Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};

use super::AuditError;
use crate::model::Timestamp;
use crate::secret::SecretBytes;
/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE {
/// SEQUENCE { OID 1.3.101.112 }, BIT STRING (0 unused bits) } before the
/// 32-byte key.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// The checkpoint format a single node writes.
pub const CHECKPOINT_VERSION: u32 = 2;
/// The checkpoint format a node of a cluster writes (it names the node).
pub const CHECKPOINT_VERSION_NODE: u32 = 3;

/// The longest node id (as `cluster.node_id` allows it).
pub const MAX_NODE_ID_LEN: usize = 48;

/// A signed statement: the chain's head at `seq` was `head_hash` (and, from
/// version 2, in the log `log_id`, under the key `key_fingerprint`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// `Some(2)` for version 2; absent in version 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// The log's identity (version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_id: Option<String>,
    /// [`key_fingerprint`] of the signing key (version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_fingerprint: Option<String>,
    /// The node whose log this is (version 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
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

/// What a checkpoint says of its log, by format version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckpointIdentity<'a> {
    /// Version 1: no log identity.
    V1,
    /// Version 2: the log and the key.
    V2 {
        log_id: &'a str,
        key_fingerprint: &'a str,
    },
    /// Version 3: the log, the key and the node.
    V3 {
        log_id: &'a str,
        key_fingerprint: &'a str,
        node: &'a str,
    },
}

impl<'a> CheckpointIdentity<'a> {
    /// The log id (versions 2 and 3).
    pub fn log_id(&self) -> Option<&'a str> {
        match self {
            Self::V1 => None,
            Self::V2 { log_id, .. } | Self::V3 { log_id, .. } => Some(log_id),
        }
    }

    /// The key fingerprint (versions 2 and 3).
    pub fn key_fingerprint(&self) -> Option<&'a str> {
        match self {
            Self::V1 => None,
            Self::V2 {
                key_fingerprint, ..
            }
            | Self::V3 {
                key_fingerprint, ..
            } => Some(key_fingerprint),
        }
    }

    /// The node (version 3).
    pub fn node(&self) -> Option<&'a str> {
        match self {
            Self::V3 { node, .. } => Some(node),
            _ => None,
        }
    }
}

impl Checkpoint {
    /// The exact bytes a version 1 checkpoint signs (module docs).
    pub fn signed_message_v1(seq: u64, head_hash: &str, time: Timestamp) -> String {
        format!("coffre-audit-checkpoint/v1\n{seq}\n{head_hash}\n{}", time.0)
    }

    /// The exact bytes a version 2 checkpoint signs (module docs).
    pub fn signed_message_v2(
        log_id: &str,
        key_fingerprint: &str,
        seq: u64,
        head_hash: &str,
        time: Timestamp,
    ) -> String {
        format!(
            "coffre-audit-checkpoint/v2\n{log_id}\n{key_fingerprint}\n{seq}\n{head_hash}\n{}",
            time.0
        )
    }

    /// The exact bytes a version 3 checkpoint signs (module docs).
    pub fn signed_message_v3(
        log_id: &str,
        key_fingerprint: &str,
        node: &str,
        seq: u64,
        head_hash: &str,
        time: Timestamp,
    ) -> String {
        format!(
            "coffre-audit-checkpoint/v3\n{log_id}\n{key_fingerprint}\n{node}\n{seq}\n{head_hash}\n{}",
            time.0
        )
    }

    /// The format version and what it names, or why the fields do not form
    /// a known version (a v2 without its log id, a log id that is not a
    /// UUID, a v3 without a valid node, an unknown version).
    pub fn identity(&self) -> Result<CheckpointIdentity<'_>, String> {
        let check = |log_id: &str, fp: &str| {
            if !is_log_id(log_id) {
                return Err(format!("log_id {log_id:?} is not a lowercase UUID"));
            }
            if fp.len() != 64 || !fp.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                return Err("key_fingerprint is not 64 lowercase hex digits".to_string());
            }
            Ok(())
        };
        match (
            &self.version,
            &self.log_id,
            &self.key_fingerprint,
            &self.node,
        ) {
            (None, None, None, None) => Ok(CheckpointIdentity::V1),
            (Some(2), Some(log_id), Some(fp), None) => {
                check(log_id, fp)?;
                Ok(CheckpointIdentity::V2 {
                    log_id,
                    key_fingerprint: fp,
                })
            }
            (Some(2), _, _, Some(_)) => Err("a version 2 checkpoint names no node".into()),
            (Some(2), _, _, _) => {
                Err("a version 2 checkpoint needs log_id and key_fingerprint".into())
            }
            (Some(3), Some(log_id), Some(fp), Some(node)) => {
                check(log_id, fp)?;
                if !is_node_id(node) {
                    return Err(format!(
                        "node {node:?} is not a node id (1 to {MAX_NODE_ID_LEN} letters, digits, \
                         '.', '_' or '-')"
                    ));
                }
                Ok(CheckpointIdentity::V3 {
                    log_id,
                    key_fingerprint: fp,
                    node,
                })
            }
            (Some(3), _, _, _) => {
                Err("a version 3 checkpoint needs log_id, key_fingerprint and node".into())
            }
            (Some(v), _, _, _) => Err(format!("unknown checkpoint version {v}")),
            (None, _, _, _) => Err("log_id, key_fingerprint and node need a \"version\"".into()),
        }
    }

    /// The message this checkpoint's signature covers, by its version.
    fn message(&self) -> Option<String> {
        Some(match self.identity().ok()? {
            CheckpointIdentity::V1 => Self::signed_message_v1(self.seq, &self.head_hash, self.time),
            CheckpointIdentity::V2 {
                log_id,
                key_fingerprint,
            } => Self::signed_message_v2(
                log_id,
                key_fingerprint,
                self.seq,
                &self.head_hash,
                self.time,
            ),
            CheckpointIdentity::V3 {
                log_id,
                key_fingerprint,
                node,
            } => Self::signed_message_v3(
                log_id,
                key_fingerprint,
                node,
                self.seq,
                &self.head_hash,
                self.time,
            ),
        })
    }

    /// Whether the signature verifies under `public_key` (for versions 2
    /// and 3, the fingerprint it names must also be `public_key`'s).
    pub fn signature_is_valid(&self, public_key: &[u8; 32]) -> bool {
        let Ok(sig) = BASE64.decode(&self.signature) else {
            return false;
        };
        let Some(msg) = self.message() else {
            return false;
        };
        if let Some(fp) = &self.key_fingerprint {
            if *fp != key_fingerprint(public_key) {
                return false;
            }
        }
        signature::UnparsedPublicKey::new(&signature::ED25519, public_key)
            .verify(msg.as_bytes(), &sig)
            .is_ok()
    }

    /// The checkpoint as its log line, without the `\n`.
    pub fn to_line(&self) -> Result<String, AuditError> {
        serde_json::to_string(&CheckpointLine {
            checkpoint: self.clone(),
        })
        .map_err(|e| AuditError::Encode(e.to_string()))
    }

    /// A checkpoint from its log line (`{"checkpoint":{...}}`, as `coffre
    /// audit checkpoint --json` prints it) or from the bare object; the
    /// text must be its canonical encoding (surrounding whitespace aside).
    pub fn from_line(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.starts_with("{\"checkpoint\"") {
            let line: CheckpointLine = serde_json::from_str(text).map_err(|e| e.to_string())?;
            if line.checkpoint.to_line().ok().as_deref() != Some(text) {
                return Err("not the canonical encoding of a checkpoint".into());
            }
            Ok(line.checkpoint)
        } else {
            let cp: Checkpoint = serde_json::from_str(text).map_err(|e| e.to_string())?;
            if serde_json::to_string(&cp).ok().as_deref() != Some(text) {
                return Err("not the canonical encoding of a checkpoint".into());
            }
            Ok(cp)
        }
    }
}

/// Whether `s` is a node id: 1 to [`MAX_NODE_ID_LEN`] ASCII letters,
/// digits, `.`, `_` or `-` (what `cluster.node_id` accepts).
pub fn is_node_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NODE_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Whether `s` is a log id: a UUID in lowercase hyphenated form.
pub fn is_log_id(s: &str) -> bool {
    uuid::Uuid::parse_str(s).is_ok_and(|u| u.hyphenated().to_string() == s)
}

/// A fresh log id: a random UUID v4 (from ring's `SystemRandom`).
pub fn new_log_id() -> Result<String, AuditError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| AuditError::Encode("no randomness for a log id".into()))?;
    Ok(uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .hyphenated()
        .to_string())
}

/// The key's fingerprint: lowercase hex SHA-256 of its DER
/// SubjectPublicKeyInfo (what `openssl pkey -pubin -in KEY.pem -outform DER
/// | sha256sum` prints).
pub fn key_fingerprint(key: &[u8; 32]) -> String {
    let mut der = ED25519_SPKI_PREFIX.to_vec();
    der.extend_from_slice(key);
    hex::encode(digest::digest(&digest::SHA256, &der).as_ref())
}

/// An Ed25519 key held elsewhere (an HSM) that signs checkpoints.
pub trait ExternalSigner: Send + Sync + fmt::Debug {
    /// The 32-byte Ed25519 public key.
    fn public_key(&self) -> [u8; 32];
    /// An Ed25519 signature of `msg`, or why there is none (the HSM is
    /// unavailable, say). Bounded in time by the implementation.
    fn sign(&self, msg: &[u8]) -> Result<[u8; 64], String>;
}

/// The checkpoint signing key (Ed25519): in coffre's memory, or in an HSM.
/// Secret: no `Clone`, redacted `Debug`. The in-memory key's PKCS#8 form is
/// meant to be stored wrapped under the HSM root key. (ring does not zeroize
/// the key pair on drop; the PKCS#8 bytes we hand out are in a zeroizing
/// [`SecretBytes`].)
pub struct CheckpointSigner(SignerKind);

enum SignerKind {
    Local(Ed25519KeyPair),
    External(Arc<dyn ExternalSigner>),
}

impl CheckpointSigner {
    /// A new random key; returns the signer and its PKCS#8 (v2) document.
    pub fn generate() -> Result<(Self, SecretBytes), AuditError> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| AuditError::InvalidKey)?;
        let pkcs8 = SecretBytes::new(pkcs8.as_ref().to_vec());
        let signer = Self::from_pkcs8(pkcs8.expose())?;
        Ok((signer, pkcs8))
    }

    /// From a 32-byte Ed25519 seed (as kept, HSM-wrapped, in the key store).
    pub fn from_seed(seed: &[u8]) -> Result<Self, AuditError> {
        Ed25519KeyPair::from_seed_unchecked(seed)
            .map(|k| Self(SignerKind::Local(k)))
            .map_err(|_| AuditError::InvalidKey)
    }

    /// From a PKCS#8 v2 document, as produced by [`Self::generate`].
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, AuditError> {
        Ed25519KeyPair::from_pkcs8(pkcs8)
            .map(|k| Self(SignerKind::Local(k)))
            .map_err(|_| AuditError::InvalidKey)
    }

    /// A key held by an HSM.
    pub fn external(signer: Arc<dyn ExternalSigner>) -> Self {
        Self(SignerKind::External(signer))
    }

    /// Whether the key is held outside coffre's memory.
    pub fn is_external(&self) -> bool {
        matches!(self.0, SignerKind::External(_))
    }

    pub fn public_key(&self) -> [u8; 32] {
        match &self.0 {
            SignerKind::Local(k) => {
                let mut out = [0u8; 32];
                out.copy_from_slice(k.public_key().as_ref());
                out
            }
            SignerKind::External(s) => s.public_key(),
        }
    }

    /// The public key as a SubjectPublicKeyInfo PEM (`BEGIN PUBLIC KEY`).
    pub fn public_key_pem(&self) -> String {
        public_key_to_pem(&self.public_key())
    }

    /// [`key_fingerprint`] of the public key.
    pub fn fingerprint(&self) -> String {
        key_fingerprint(&self.public_key())
    }

    /// Signs the chain head at `seq` of the log `log_id` (a version 2
    /// checkpoint). Only an external key can fail.
    pub fn checkpoint(
        &self,
        log_id: &str,
        seq: u64,
        head_hash: &str,
        time: Timestamp,
    ) -> Result<Checkpoint, AuditError> {
        self.checkpoint_of(None, log_id, seq, head_hash, time)
    }

    /// Signs the chain head at `seq` of the log `log_id`: of the node `node`
    /// (a version 3 checkpoint), or of a single node (`None`: version 2).
    /// Only an external key can fail; a node id that [`is_node_id`] refuses
    /// is [`AuditError::Encode`].
    pub fn checkpoint_of(
        &self,
        node: Option<&str>,
        log_id: &str,
        seq: u64,
        head_hash: &str,
        time: Timestamp,
    ) -> Result<Checkpoint, AuditError> {
        let fingerprint = self.fingerprint();
        let (version, msg) = match node {
            None => (
                CHECKPOINT_VERSION,
                Checkpoint::signed_message_v2(log_id, &fingerprint, seq, head_hash, time),
            ),
            Some(node) => {
                if !is_node_id(node) {
                    return Err(AuditError::Encode(format!("{node:?} is not a node id")));
                }
                (
                    CHECKPOINT_VERSION_NODE,
                    Checkpoint::signed_message_v3(log_id, &fingerprint, node, seq, head_hash, time),
                )
            }
        };
        let signature = self.sign(&msg)?;
        Ok(Checkpoint {
            version: Some(version),
            log_id: Some(log_id.to_string()),
            key_fingerprint: Some(fingerprint),
            node: node.map(str::to_string),
            seq,
            head_hash: head_hash.to_string(),
            time,
            signature,
        })
    }

    /// Signs `msg` with the audit key, for the cluster digest
    /// ([`super::digest`]): its messages start with
    /// `coffre-audit-digest/`, checkpoints' with `coffre-audit-checkpoint/`,
    /// so that one can never pass for the other.
    pub(crate) fn sign_digest_message(&self, msg: &str) -> Result<String, AuditError> {
        if !msg.starts_with(super::digest::DIGEST_MESSAGE_PREFIX) {
            return Err(AuditError::Encode("not a digest message".into()));
        }
        self.sign(msg)
    }

    /// A version 1 checkpoint, as logs before #15 hold: for tests of the
    /// old format only.
    #[cfg(test)]
    pub(crate) fn checkpoint_v1(
        &self,
        seq: u64,
        head_hash: &str,
        time: Timestamp,
    ) -> Result<Checkpoint, AuditError> {
        let msg = Checkpoint::signed_message_v1(seq, head_hash, time);
        Ok(Checkpoint {
            version: None,
            log_id: None,
            key_fingerprint: None,
            node: None,
            seq,
            head_hash: head_hash.to_string(),
            time,
            signature: self.sign(&msg)?,
        })
    }

    fn sign(&self, msg: &str) -> Result<String, AuditError> {
        Ok(match &self.0 {
            SignerKind::Local(k) => BASE64.encode(k.sign(msg.as_bytes()).as_ref()),
            SignerKind::External(s) => {
                BASE64.encode(s.sign(msg.as_bytes()).map_err(AuditError::Signing)?)
            }
        })
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::audit::record::GENESIS_HASH;

    pub(crate) const TEST_LOG_ID: &str = "9d1f0c52-6a1e-4b7e-8f3a-2c4d5e6f7a8b";

    pub(crate) fn test_signer() -> (CheckpointSigner, [u8; 32]) {
        let (signer, _pkcs8) = CheckpointSigner::generate().unwrap();
        let pk = signer.public_key();
        (signer, pk)
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
        let cp = signer
            .checkpoint(TEST_LOG_ID, 7, GENESIS_HASH, Timestamp(5))
            .unwrap();
        assert!(cp.signature_is_valid(&pk));
        assert!(!cp.signature_is_valid(&[0u8; 32]));
    }

    #[test]
    fn a_version_3_checkpoint_names_its_node_in_the_signature() {
        let (signer, pk) = test_signer();
        let fp = key_fingerprint(&pk);
        assert_eq!(
            Checkpoint::signed_message_v3(TEST_LOG_ID, &fp, "n1", 7, GENESIS_HASH, Timestamp(5)),
            format!("coffre-audit-checkpoint/v3\n{TEST_LOG_ID}\n{fp}\nn1\n7\n{GENESIS_HASH}\n5")
        );
        let cp = signer
            .checkpoint_of(Some("n1"), TEST_LOG_ID, 7, GENESIS_HASH, Timestamp(5))
            .unwrap();
        let line = cp.to_line().unwrap();
        assert_eq!(
            line,
            format!(
                "{{\"checkpoint\":{{\"version\":3,\"log_id\":\"{TEST_LOG_ID}\",\"key_fingerprint\":\"{fp}\",\
                 \"node\":\"n1\",\"seq\":7,\"head_hash\":\"{GENESIS_HASH}\",\"time\":5,\"signature\":\"{}\"}}}}",
                cp.signature
            )
        );
        assert_eq!(Checkpoint::from_line(&line).unwrap(), cp);
        assert!(cp.signature_is_valid(&pk));
        // Another node's name on it: the signature fails.
        let mut moved = cp.clone();
        moved.node = Some("n2".into());
        assert!(!moved.signature_is_valid(&pk));
        // Malformed identities are refused by name.
        let mut bad = cp.clone();
        bad.node = Some("n 1".into());
        assert!(bad.identity().unwrap_err().contains("not a node id"));
        let mut bad = cp.clone();
        bad.version = Some(2);
        assert!(bad.identity().is_err());
        let mut bad = cp;
        bad.node = None;
        assert!(bad.identity().is_err());
        assert!(
            signer
                .checkpoint_of(Some("a\nb"), TEST_LOG_ID, 1, GENESIS_HASH, Timestamp(0))
                .is_err()
        );
        // Only digest messages are signed by `sign_digest_message`.
        assert!(
            signer
                .sign_digest_message("coffre-audit-checkpoint/v2\n")
                .is_err()
        );
    }
}
