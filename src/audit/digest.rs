//! The cluster digest (issue #17): a chain of signed statements, each
//! listing every node's latest published checkpoint, that ties the nodes'
//! separate logs together (design/several-nodes.md §6.2).
//!
//! Each node keeps its own hash-chained log and signs version 3 checkpoints
//! that name it ([`super::checkpoint`]); each checkpoint is published to the
//! database (`audit_checkpoints`) as a [`PublishedCheckpoint`]. Every
//! `digest_interval`, the holder of the `audit-digest` lease signs, with the
//! audit key, a [`Digest`] of every node's latest head, chained to the one
//! before it. [`super::cluster`] verifies the digests and the nodes' files
//! together, offline.
//!
//! # Digest encoding, version 1
//!
//! One line of `digests.jsonl` (and the `line` column of `audit_digests`):
//!
//! ```text
//! {"n":N,"time":T,"prev":P,"key_generation":G,"heads":[{"node":ID,"log_id":L,"seq":S,"head_hash":H},...],"key_fingerprint":F,"signature":B}
//! ```
//!
//! compact JSON, fields in this order (the verifier refuses any other
//! encoding), `heads` sorted by node id in byte order, one per node. `N` is
//! 1, 2, 3, ...; `T` milliseconds since the Unix epoch (the signer's
//! clock); `P` the lowercase hex SHA-256 of the previous digest's signed
//! message ([`Digest::hash`]), 64 zeros for `N` = 1; `G` the store's
//! `coffre_cluster.key_generation` when the digest was made (a rollback of
//! the key tables shows as a generation that goes down); `F` the key
//! fingerprint ([`super::key_fingerprint`]), a claim that is checked
//! against the key given (not signed: it only names the key in an error);
//! `B` the standard base64 Ed25519 signature, by the audit key, over
//!
//! ```text
//! coffre-audit-digest/v1\n{N}\n{T}\n{P}\n{G}\n
//!   then, per head in order: {ID}\n{L}\n{S}\n{H}\n
//! ```
//!
//! Every field is free of `\n` by construction (node ids, UUIDs, hex,
//! decimals), so the message parses one way only. It starts with
//! `coffre-audit-digest/`, a checkpoint's with `coffre-audit-checkpoint/`:
//! one cannot be replayed as the other.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::digest as sha;
use ring::signature;
use serde::{Deserialize, Serialize};

use super::AuditError;
use super::checkpoint::{
    CHECKPOINT_VERSION_NODE, Checkpoint, CheckpointIdentity, CheckpointSigner, is_log_id,
    is_node_id, key_fingerprint,
};
use super::record::GENESIS_HASH;
use crate::model::Timestamp;

/// What every digest's signed message starts with.
pub const DIGEST_MESSAGE_PREFIX: &str = "coffre-audit-digest/v1\n";

/// `prev` of the first digest.
pub const GENESIS_DIGEST_HASH: &str = GENESIS_HASH;

/// One node's head as a digest lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeHead {
    pub node: String,
    pub log_id: String,
    pub seq: u64,
    pub head_hash: String,
}

impl NodeHead {
    fn check(&self) -> Result<(), String> {
        if !is_node_id(&self.node) {
            return Err(format!("{:?} is not a node id", self.node));
        }
        if !is_log_id(&self.log_id) {
            return Err(format!(
                "node {}: log_id {:?} is not a lowercase UUID",
                self.node, self.log_id
            ));
        }
        if !is_hex64(&self.head_hash) {
            return Err(format!(
                "node {}: head_hash is not 64 lowercase hex digits",
                self.node
            ));
        }
        Ok(())
    }
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A node's checkpoint as published to the database (a row of
/// `audit_checkpoints`): a version 3 checkpoint without its key
/// fingerprint, which is the audit key's and so known to every reader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishedCheckpoint {
    pub node: String,
    pub log_id: String,
    pub seq: u64,
    pub head_hash: String,
    pub time: Timestamp,
    pub signature: String,
}

impl PublishedCheckpoint {
    /// The publication of a version 3 checkpoint; `None` for another
    /// version (a single node publishes nothing).
    pub fn from_checkpoint(cp: &Checkpoint) -> Option<Self> {
        match cp.identity().ok()? {
            CheckpointIdentity::V3 { log_id, node, .. } => Some(Self {
                node: node.to_string(),
                log_id: log_id.to_string(),
                seq: cp.seq,
                head_hash: cp.head_hash.clone(),
                time: cp.time,
                signature: cp.signature.clone(),
            }),
            _ => None,
        }
    }

    /// The checkpoint it was published from, under the key `public_key`.
    pub fn to_checkpoint(&self, public_key: &[u8; 32]) -> Checkpoint {
        Checkpoint {
            version: Some(CHECKPOINT_VERSION_NODE),
            log_id: Some(self.log_id.clone()),
            key_fingerprint: Some(key_fingerprint(public_key)),
            node: Some(self.node.clone()),
            seq: self.seq,
            head_hash: self.head_hash.clone(),
            time: self.time,
            signature: self.signature.clone(),
        }
    }

    /// Whether its signature is the audit key's (`public_key`), node and
    /// log included: what the digest signer checks before it lists it.
    pub fn signature_is_valid(&self, public_key: &[u8; 32]) -> bool {
        self.to_checkpoint(public_key)
            .signature_is_valid(public_key)
    }

    pub fn head(&self) -> NodeHead {
        NodeHead {
            node: self.node.clone(),
            log_id: self.log_id.clone(),
            seq: self.seq,
            head_hash: self.head_hash.clone(),
        }
    }
}

/// A digest before it is signed: [`Digest::next`], then
/// [`CheckpointSigner::sign_digest`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnsignedDigest {
    pub n: u64,
    pub time: Timestamp,
    pub prev: String,
    pub key_generation: u64,
    /// Sorted by node id (byte order), one per node.
    pub heads: Vec<NodeHead>,
}

impl UnsignedDigest {
    /// The exact bytes the signature covers (module docs); an error if a
    /// field could not be encoded unambiguously.
    pub fn signed_message(&self) -> Result<String, String> {
        if self.n == 0 {
            return Err("n starts at 1".into());
        }
        if !is_hex64(&self.prev) {
            return Err("prev is not 64 lowercase hex digits".into());
        }
        let mut msg = format!(
            "{DIGEST_MESSAGE_PREFIX}{}\n{}\n{}\n{}\n",
            self.n, self.time.0, self.prev, self.key_generation
        );
        let mut last: Option<&str> = None;
        for head in &self.heads {
            head.check()?;
            if last.is_some_and(|l| l.as_bytes() >= head.node.as_bytes()) {
                return Err(format!(
                    "heads are not sorted by node id, one per node (at {})",
                    head.node
                ));
            }
            last = Some(&head.node);
            msg.push_str(&format!(
                "{}\n{}\n{}\n{}\n",
                head.node, head.log_id, head.seq, head.head_hash
            ));
        }
        Ok(msg)
    }
}

/// A signed digest (module docs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Digest {
    pub n: u64,
    pub time: Timestamp,
    pub prev: String,
    pub key_generation: u64,
    pub heads: Vec<NodeHead>,
    pub key_fingerprint: String,
    pub signature: String,
}

impl Digest {
    /// The digest that follows `last` (or the first one), listing `heads`
    /// in node order.
    pub fn next(
        last: Option<&Digest>,
        time: Timestamp,
        key_generation: u64,
        mut heads: Vec<NodeHead>,
    ) -> Result<UnsignedDigest, String> {
        heads.sort_by(|a, b| a.node.as_bytes().cmp(b.node.as_bytes()));
        let (n, prev) = match last {
            None => (1, GENESIS_DIGEST_HASH.to_string()),
            Some(d) => (d.n.saturating_add(1), d.hash()?),
        };
        Ok(UnsignedDigest {
            n,
            time,
            prev,
            key_generation,
            heads,
        })
    }

    pub fn unsigned(&self) -> UnsignedDigest {
        UnsignedDigest {
            n: self.n,
            time: self.time,
            prev: self.prev.clone(),
            key_generation: self.key_generation,
            heads: self.heads.clone(),
        }
    }

    /// The signed message (module docs).
    pub fn signed_message(&self) -> Result<String, String> {
        self.unsigned().signed_message()
    }

    /// Lowercase hex SHA-256 of the signed message: the next digest's
    /// `prev`.
    pub fn hash(&self) -> Result<String, String> {
        let msg = self.signed_message()?;
        Ok(hex::encode(
            sha::digest(&sha::SHA256, msg.as_bytes()).as_ref(),
        ))
    }

    /// Whether the signature verifies under `public_key` (and the
    /// fingerprint it claims is `public_key`'s).
    pub fn signature_is_valid(&self, public_key: &[u8; 32]) -> bool {
        if self.key_fingerprint != key_fingerprint(public_key) {
            return false;
        }
        let (Ok(msg), Ok(sig)) = (self.signed_message(), BASE64.decode(&self.signature)) else {
            return false;
        };
        signature::UnparsedPublicKey::new(&signature::ED25519, public_key)
            .verify(msg.as_bytes(), &sig)
            .is_ok()
    }

    /// The digest as its line, without the `\n`.
    pub fn to_line(&self) -> Result<String, AuditError> {
        serde_json::to_string(self).map_err(|e| AuditError::Encode(e.to_string()))
    }

    /// A digest from its line, which must be its canonical encoding
    /// (surrounding whitespace and a final `\n` aside).
    pub fn from_line(text: &str) -> Result<Self, String> {
        let text = text.trim_end_matches('\n');
        let digest: Digest = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if digest.to_line().ok().as_deref() != Some(text) {
            return Err("not the canonical encoding of a digest".into());
        }
        Ok(digest)
    }
}

impl CheckpointSigner {
    /// Signs a digest with the audit key. Only an external key can fail
    /// (or a digest whose fields cannot be encoded).
    pub fn sign_digest(&self, unsigned: UnsignedDigest) -> Result<Digest, AuditError> {
        let msg = unsigned.signed_message().map_err(AuditError::Encode)?;
        let signature = self.sign_digest_message(&msg)?;
        Ok(Digest {
            n: unsigned.n,
            time: unsigned.time,
            prev: unsigned.prev,
            key_generation: unsigned.key_generation,
            heads: unsigned.heads,
            key_fingerprint: self.fingerprint(),
            signature,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::checkpoint::tests::{TEST_LOG_ID, test_signer};

    fn head(node: &str, seq: u64) -> NodeHead {
        NodeHead {
            node: node.into(),
            log_id: TEST_LOG_ID.into(),
            seq,
            head_hash: "ab".repeat(32),
        }
    }

    #[test]
    fn the_signed_message_is_the_documented_one() {
        let unsigned = Digest::next(
            None,
            Timestamp(1_765_000_000_000),
            42,
            vec![head("n2", 9), head("n1", 7)],
        )
        .unwrap();
        let expected = format!(
            "coffre-audit-digest/v1\n1\n1765000000000\n{zeros}\n42\n\
             n1\n{TEST_LOG_ID}\n7\n{ab}\nn2\n{TEST_LOG_ID}\n9\n{ab}\n",
            zeros = "0".repeat(64),
            ab = "ab".repeat(32),
        );
        assert_eq!(unsigned.signed_message().unwrap(), expected);
        // Byte order: "N" < "n" < "n1" < "n1a" < "n2".
        let unsigned = Digest::next(
            None,
            Timestamp(0),
            0,
            vec![head("n2", 1), head("n1a", 1), head("N", 1), head("n1", 1)],
        )
        .unwrap();
        let order: Vec<&str> = unsigned.heads.iter().map(|h| h.node.as_str()).collect();
        assert_eq!(order, ["N", "n1", "n1a", "n2"]);
        // Two heads of one node, or a node id with a newline: refused.
        let mut twice = unsigned.clone();
        twice.heads[1] = head("N", 2);
        assert!(twice.signed_message().is_err());
        let mut injected = unsigned;
        injected.heads[0].node = "n0\nn9".into();
        assert!(injected.signed_message().is_err());
    }

    #[test]
    fn a_digest_signs_verifies_and_chains() {
        let (signer, pk) = test_signer();
        let first = signer
            .sign_digest(Digest::next(None, Timestamp(1), 3, vec![head("n1", 1)]).unwrap())
            .unwrap();
        assert!(first.signature_is_valid(&pk));
        let line = first.to_line().unwrap();
        assert!(
            line.starts_with("{\"n\":1,\"time\":1,\"prev\":\"0000"),
            "{line}"
        );
        assert_eq!(Digest::from_line(&line).unwrap(), first);
        assert!(Digest::from_line(&line.replacen("\"n\":1", "\"n\": 1", 1)).is_err());
        let second = signer
            .sign_digest(Digest::next(Some(&first), Timestamp(2), 3, vec![head("n1", 5)]).unwrap())
            .unwrap();
        assert_eq!(second.n, 2);
        assert_eq!(second.prev, first.hash().unwrap());
        assert!(second.signature_is_valid(&pk));
        // Any change to what is signed breaks the signature.
        let mut altered = second.clone();
        altered.heads[0].seq = 4;
        assert!(!altered.signature_is_valid(&pk));
        let mut altered = second.clone();
        altered.key_generation = 2;
        assert!(!altered.signature_is_valid(&pk));
        // Another key: refused, whatever fingerprint it claims.
        let (other, other_pk) = test_signer();
        let mut forged = other.sign_digest(second.unsigned()).unwrap();
        assert!(!forged.signature_is_valid(&pk));
        assert!(forged.signature_is_valid(&other_pk));
        forged.key_fingerprint = key_fingerprint(&pk);
        assert!(!forged.signature_is_valid(&pk));
    }

    #[test]
    fn a_published_checkpoint_carries_its_node_in_the_signature() {
        let (signer, pk) = test_signer();
        let cp = signer
            .checkpoint_of(Some("n1"), TEST_LOG_ID, 7, &"cd".repeat(32), Timestamp(5))
            .unwrap();
        let published = PublishedCheckpoint::from_checkpoint(&cp).unwrap();
        assert_eq!(published.to_checkpoint(&pk), cp);
        assert!(published.signature_is_valid(&pk));
        // Moved to another node's rows: refused.
        let mut moved = published.clone();
        moved.node = "n2".into();
        assert!(!moved.signature_is_valid(&pk));
        // A single node's checkpoint is not published.
        let v2 = signer
            .checkpoint(TEST_LOG_ID, 7, &"cd".repeat(32), Timestamp(5))
            .unwrap();
        assert_eq!(PublishedCheckpoint::from_checkpoint(&v2), None);
    }
}
