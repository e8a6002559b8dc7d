//! The offline verifier of a cluster's audit export (`coffre audit verify
//! --cluster DIR --public-key K`, design/several-nodes.md §6.3): a
//! directory with one `node-<id>.jsonl` per node (each node's own log, as
//! `coffre audit export` writes it) and `digests.jsonl` (the cluster
//! digest chain, [`super::digest`]). Like [`mod@super::verify`], it knows
//! the formats and nothing of the writer or the database.
//!
//! It checks, and stops at the first failure, naming the node, the file
//! and the digest or line:
//!
//! 1. `digests.jsonl`: every line the canonical encoding of a digest, every
//!    signature the audit key's, `n` contiguous from 1 (from the first
//!    digest with [`Policy::allow_anchored`]), every `prev` the hash of the
//!    digest before; per node, the log id never changes, the seq never
//!    goes back, and a node once listed is listed in every later digest
//!    (no node retirement yet).
//! 2. Every node a digest lists has its file; each file passes the
//!    single-log verifier and the [`Policy`], and its checkpoints name that
//!    node (version 3, [`super::checkpoint`]): a file swapped with another
//!    node's, renamed, or holding a checkpoint moved from another file is
//!    refused here.
//! 3. Every digest head `(node, log_id, seq, head_hash)` is in that node's
//!    verified chain: same log, and record `seq` has hash `head_hash`. A
//!    file cut before its last digested head is refused.
//!
//! What it cannot see: records written after a node's last digested head
//! (the per-file limit of [`super`], bounded by the digest interval), and
//! the newest digests themselves if they are removed from the end of
//! `digests.jsonl` (an auditor who keeps the last digest they saw can
//! check that it is still there: not implemented yet, `--known-digest`).
//! A node file that no digest lists is verified alone and reported.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use super::checkpoint::{is_node_id, key_fingerprint};
use super::digest::{Digest, GENESIS_DIGEST_HASH};
use super::verify::{Policy, PolicyFailure, VerifyError, VerifyReport, verify_collecting};

/// The digest chain's file in an export directory.
pub const DIGESTS_FILE: &str = "digests.jsonl";

/// The file of node `node` in an export directory.
pub fn node_file_name(node: &str) -> String {
    format!("node-{node}.jsonl")
}

/// What a successful verification found, per node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSummary {
    pub node: String,
    pub report: VerifyReport,
    /// The highest seq a digest lists for this node (`None`: in no digest).
    pub digested_seq: Option<u64>,
    /// Digest heads found in this node's chain.
    pub heads_checked: u64,
    /// Digest heads older than the file's anchor (retention): not
    /// checkable from this file.
    pub heads_before_anchor: u64,
}

/// What a successful verification found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterReport {
    pub digests: u64,
    pub first_digest: Option<u64>,
    pub last_digest: Option<Digest>,
    /// In node id order.
    pub nodes: Vec<NodeSummary>,
}

/// The first failure found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterFailure {
    #[error("cannot read {path}: {error}")]
    Io { path: PathBuf, error: String },
    #[error("the export has no {DIGESTS_FILE}: nothing ties the nodes' logs together")]
    NoDigests,
    #[error("{DIGESTS_FILE} holds no digest")]
    EmptyDigests,
    #[error("{DIGESTS_FILE} line {line}: not a digest: {why}")]
    DigestMalformed { line: u64, why: String },
    #[error(
        "digest {n} ({DIGESTS_FILE} line {line}) was signed by the key with fingerprint {named}, \
         not by the key given ({given})"
    )]
    DigestWrongKey {
        n: u64,
        line: u64,
        named: String,
        given: String,
    },
    #[error(
        "digest {n} ({DIGESTS_FILE} line {line}): the signature does not verify (the digest was \
         altered, or signed by another key)"
    )]
    DigestBadSignature { n: u64, line: u64 },
    #[error(
        "{DIGESTS_FILE} starts at digest {n}, not 1: the digests before it are not in the export \
         (accepted with --allow-anchored)"
    )]
    DigestsAnchored { n: u64 },
    #[error(
        "digest {expected} is missing: {DIGESTS_FILE} goes from digest {previous} to digest \
         {found} (line {line})"
    )]
    DigestGap {
        previous: u64,
        expected: u64,
        found: u64,
        line: u64,
    },
    #[error(
        "digest {n} ({DIGESTS_FILE} line {line}): prev is not the hash of digest {previous}: \
         the chain is broken"
    )]
    DigestBrokenChain { n: u64, line: u64, previous: u64 },
    #[error("digest 1 ({DIGESTS_FILE} line {line}): prev must be {GENESIS_DIGEST_HASH}")]
    DigestBadGenesis { line: u64 },
    #[error(
        "digest {n}: node {node}'s head goes back from seq {before} (digest {before_n}) to seq \
         {after}"
    )]
    HeadWentBack {
        n: u64,
        node: String,
        before: u64,
        before_n: u64,
        after: u64,
    },
    #[error(
        "digest {n}: node {node}'s log changed from {before} (digest {before_n}) to {after}: a \
         node's log was replaced"
    )]
    LogChanged {
        n: u64,
        node: String,
        before: String,
        before_n: u64,
        after: String,
    },
    #[error(
        "digest {n} lists node {node}'s head at seq {seq} with another hash than digest {other_n} \
         did"
    )]
    DigestsDisagree {
        n: u64,
        node: String,
        seq: u64,
        other_n: u64,
    },
    #[error(
        "digest {n} no longer lists node {node} (digest {last_n} did): a node cannot leave the \
         digests (node retirement is not supported yet)"
    )]
    NodeDropped { n: u64, node: String, last_n: u64 },
    #[error(
        "node {node} is listed in digest {n}, but the export has no {}: the node's log is missing",
        node_file_name(node)
    )]
    NodeFileMissing { node: String, n: u64 },
    #[error("{} does not verify: {error}", node_file_name(node))]
    NodeLog { node: String, error: VerifyError },
    #[error("{} is not accepted: {failure}", node_file_name(node))]
    NodePolicy {
        node: String,
        failure: PolicyFailure,
    },
    #[error(
        "{} holds node {found}'s log (its checkpoints name node {found}), not node {node}'s: \
         the files were swapped or renamed",
        node_file_name(node)
    )]
    NodeFileSwapped { node: String, found: String },
    #[error(
        "{}: its checkpoints name no node (a single node's log, checkpoint format v1 or v2), \
         so nothing shows it is node {node}'s",
        node_file_name(node)
    )]
    NodeUnnamed { node: String },
    #[error(
        "{} is log {found}, but digest {n} lists log {expected} for node {node}",
        node_file_name(node)
    )]
    LogIdMismatch {
        node: String,
        n: u64,
        expected: String,
        found: String,
    },
    #[error(
        "digest {n} lists node {node}'s head at seq {seq}, but {} ends at seq {last_seq}: the \
         log was cut after the digest",
        node_file_name(node)
    )]
    NodeCut {
        node: String,
        n: u64,
        seq: u64,
        last_seq: u64,
    },
    #[error(
        "digest {n} lists node {node}'s head at seq {seq}, but record {seq} of {} has another \
         hash: the log is not the one the digest saw",
        node_file_name(node)
    )]
    HeadMismatch { node: String, n: u64, seq: u64 },
}

impl ClusterFailure {
    /// The node it is about, if one.
    pub fn node(&self) -> Option<&str> {
        match self {
            Self::HeadWentBack { node, .. }
            | Self::LogChanged { node, .. }
            | Self::NodeDropped { node, .. }
            | Self::NodeFileMissing { node, .. }
            | Self::NodeLog { node, .. }
            | Self::NodePolicy { node, .. }
            | Self::NodeFileSwapped { node, .. }
            | Self::NodeUnnamed { node }
            | Self::LogIdMismatch { node, .. }
            | Self::NodeCut { node, .. }
            | Self::HeadMismatch { node, .. }
            | Self::DigestsDisagree { node, .. } => Some(node),
            _ => None,
        }
    }

    /// The digest it is about, if one.
    pub fn digest(&self) -> Option<u64> {
        match self {
            Self::DigestWrongKey { n, .. }
            | Self::DigestBadSignature { n, .. }
            | Self::DigestsAnchored { n }
            | Self::DigestBrokenChain { n, .. }
            | Self::HeadWentBack { n, .. }
            | Self::LogChanged { n, .. }
            | Self::NodeDropped { n, .. }
            | Self::NodeFileMissing { n, .. }
            | Self::LogIdMismatch { n, .. }
            | Self::NodeCut { n, .. }
            | Self::HeadMismatch { n, .. }
            | Self::DigestsDisagree { n, .. } => Some(*n),
            Self::DigestGap { expected, .. } => Some(*expected),
            _ => None,
        }
    }
}

/// Per node, what the digests say: its log, and each listed seq with its
/// hash and the first digest that listed it.
#[derive(Default)]
struct Listed {
    log_id: String,
    /// The first digest that listed the node.
    first_n: u64,
    /// seq → (head_hash, digest n).
    heads: BTreeMap<u64, (String, u64)>,
}

/// Checks `digests.jsonl` (step 1 of the module docs).
fn verify_digests(
    input: impl BufRead,
    public_key: &[u8; 32],
    policy: Policy,
) -> Result<(Vec<Digest>, BTreeMap<String, Listed>), ClusterFailure> {
    let given = key_fingerprint(public_key);
    let mut digests: Vec<Digest> = Vec::new();
    let mut listed: BTreeMap<String, Listed> = BTreeMap::new();
    // node → (log_id, seq, n) of its last listing.
    let mut last: BTreeMap<String, (String, u64, u64)> = BTreeMap::new();
    for (i, line) in input.lines().enumerate() {
        let line_no = i as u64 + 1;
        let text = line.map_err(|e| ClusterFailure::Io {
            path: DIGESTS_FILE.into(),
            error: e.to_string(),
        })?;
        let digest = Digest::from_line(&text)
            .map_err(|why| ClusterFailure::DigestMalformed { line: line_no, why })?;
        let n = digest.n;
        if digest.key_fingerprint != given {
            return Err(ClusterFailure::DigestWrongKey {
                n,
                line: line_no,
                named: digest.key_fingerprint.clone(),
                given,
            });
        }
        if let Err(why) = digest.signed_message() {
            return Err(ClusterFailure::DigestMalformed { line: line_no, why });
        }
        if !digest.signature_is_valid(public_key) {
            return Err(ClusterFailure::DigestBadSignature { n, line: line_no });
        }
        match digests.last() {
            None if n == 1 && digest.prev != GENESIS_DIGEST_HASH => {
                return Err(ClusterFailure::DigestBadGenesis { line: line_no });
            }
            None if n == 1 || policy.allow_anchored => {}
            None => return Err(ClusterFailure::DigestsAnchored { n }),
            Some(previous) => {
                if n != previous.n.saturating_add(1) {
                    return Err(ClusterFailure::DigestGap {
                        previous: previous.n,
                        expected: previous.n.saturating_add(1),
                        found: n,
                        line: line_no,
                    });
                }
                if previous.hash().ok().as_deref() != Some(digest.prev.as_str()) {
                    return Err(ClusterFailure::DigestBrokenChain {
                        n,
                        line: line_no,
                        previous: previous.n,
                    });
                }
            }
        }
        let here: BTreeSet<&str> = digest.heads.iter().map(|h| h.node.as_str()).collect();
        if let Some((node, (_, _, last_n))) =
            last.iter().find(|(node, _)| !here.contains(node.as_str()))
        {
            return Err(ClusterFailure::NodeDropped {
                n,
                node: node.clone(),
                last_n: *last_n,
            });
        }
        for head in &digest.heads {
            if let Some((log_id, seq, before_n)) = last.get(&head.node) {
                if *log_id != head.log_id {
                    return Err(ClusterFailure::LogChanged {
                        n,
                        node: head.node.clone(),
                        before: log_id.clone(),
                        before_n: *before_n,
                        after: head.log_id.clone(),
                    });
                }
                if head.seq < *seq {
                    return Err(ClusterFailure::HeadWentBack {
                        n,
                        node: head.node.clone(),
                        before: *seq,
                        before_n: *before_n,
                        after: head.seq,
                    });
                }
            }
            last.insert(head.node.clone(), (head.log_id.clone(), head.seq, n));
            let entry = listed.entry(head.node.clone()).or_insert_with(|| Listed {
                log_id: head.log_id.clone(),
                first_n: n,
                heads: BTreeMap::new(),
            });
            match entry.heads.get(&head.seq) {
                Some((hash, other_n)) if *hash != head.head_hash => {
                    return Err(ClusterFailure::DigestsDisagree {
                        n,
                        node: head.node.clone(),
                        seq: head.seq,
                        other_n: *other_n,
                    });
                }
                Some(_) => {}
                None => {
                    entry.heads.insert(head.seq, (head.head_hash.clone(), n));
                }
            }
        }
        digests.push(digest);
    }
    if digests.is_empty() {
        return Err(ClusterFailure::EmptyDigests);
    }
    Ok((digests, listed))
}

/// Checks one node's file against what the digests list (steps 2 and 3).
fn verify_node(
    node: &str,
    input: impl BufRead,
    public_key: &[u8; 32],
    policy: Policy,
    listed: Option<&Listed>,
) -> Result<NodeSummary, ClusterFailure> {
    let wanted: BTreeSet<u64> = listed
        .map(|l| l.heads.keys().copied().collect())
        .unwrap_or_default();
    let (report, found) =
        verify_collecting(input, public_key, &wanted, |_| {}).map_err(|error| {
            ClusterFailure::NodeLog {
                node: node.to_string(),
                error,
            }
        })?;
    match &report.node {
        Some(found) if found != node => {
            return Err(ClusterFailure::NodeFileSwapped {
                node: node.to_string(),
                found: found.clone(),
            });
        }
        Some(_) => {}
        None => {
            return Err(ClusterFailure::NodeUnnamed {
                node: node.to_string(),
            });
        }
    }
    policy
        .check(&report)
        .map_err(|failure| ClusterFailure::NodePolicy {
            node: node.to_string(),
            failure,
        })?;
    let mut summary = NodeSummary {
        node: node.to_string(),
        digested_seq: None,
        heads_checked: 0,
        heads_before_anchor: 0,
        report,
    };
    let Some(listed) = listed else {
        return Ok(summary);
    };
    if summary.report.log_id.as_deref() != Some(listed.log_id.as_str()) {
        return Err(ClusterFailure::LogIdMismatch {
            node: node.to_string(),
            n: listed.first_n,
            expected: listed.log_id.clone(),
            found: summary.report.log_id.clone().unwrap_or_default(),
        });
    }
    let anchor_seq = summary.report.anchor.as_ref().map_or(0, |a| a.seq);
    for (seq, (hash, n)) in &listed.heads {
        if *seq > summary.report.last_seq {
            return Err(ClusterFailure::NodeCut {
                node: node.to_string(),
                n: *n,
                seq: *seq,
                last_seq: summary.report.last_seq,
            });
        }
        match found.get(seq) {
            Some(h) if h == hash => summary.heads_checked += 1,
            None if *seq < anchor_seq => summary.heads_before_anchor += 1,
            _ => {
                return Err(ClusterFailure::HeadMismatch {
                    node: node.to_string(),
                    n: *n,
                    seq: *seq,
                });
            }
        }
        summary.digested_seq = Some(*seq);
    }
    Ok(summary)
}

/// The node files of `dir`: `node-<id>.jsonl` for every valid node id
/// (other files are ignored).
fn node_files(dir: &Path) -> Result<BTreeMap<String, PathBuf>, ClusterFailure> {
    let io = |e: std::io::Error| ClusterFailure::Io {
        path: dir.to_path_buf(),
        error: e.to_string(),
    };
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        let Some(node) = name
            .strip_prefix("node-")
            .and_then(|n| n.strip_suffix(".jsonl"))
        else {
            continue;
        };
        if is_node_id(node) {
            files.insert(node.to_string(), entry.path());
        }
    }
    Ok(files)
}

/// Verifies the export in `dir` under the audit key `public_key`; each
/// node's log must satisfy `policy` (whose `allow_anchored` also accepts a
/// digest chain that does not start at 1).
pub fn verify_cluster(
    dir: &Path,
    public_key: &[u8; 32],
    policy: Policy,
) -> Result<ClusterReport, ClusterFailure> {
    let open = |path: &Path| {
        File::open(path)
            .map(BufReader::new)
            .map_err(|e| ClusterFailure::Io {
                path: path.to_path_buf(),
                error: e.to_string(),
            })
    };
    let digests_path = dir.join(DIGESTS_FILE);
    if !digests_path.exists() {
        return Err(ClusterFailure::NoDigests);
    }
    let (digests, listed) = verify_digests(open(&digests_path)?, public_key, policy)?;
    let files = node_files(dir)?;
    if let Some((node, l)) = listed.iter().find(|(node, _)| !files.contains_key(*node)) {
        return Err(ClusterFailure::NodeFileMissing {
            node: node.clone(),
            n: l.first_n,
        });
    }
    let mut nodes = Vec::with_capacity(files.len());
    for (node, path) in &files {
        nodes.push(verify_node(
            node,
            open(path)?,
            public_key,
            policy,
            listed.get(node),
        )?);
    }
    Ok(ClusterReport {
        digests: digests.len() as u64,
        first_digest: digests.first().map(|d| d.n),
        last_digest: digests.last().cloned(),
        nodes,
    })
}

#[cfg(test)]
mod tests;
