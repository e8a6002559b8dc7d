//! The tamper matrix, offline: a two-node export built with the real writer
//! (`AuditLog` with a node id, its checkpoints observed as the publisher
//! observes them) and digests signed with the real code, then each
//! tampering the verifier must refuse, with its message.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;
use crate::audit::checkpoint::{Checkpoint, CheckpointSigner};
use crate::audit::digest::{Digest, PublishedCheckpoint};
use crate::audit::log::{AuditLog, AuditLogOptions, CheckpointObserver, CheckpointPolicy};
use crate::audit::record::tests::entry;
use crate::audit::verify::VerifyFailure;
use crate::model::{Clock, ManualClock, Timestamp};

const SEED: [u8; 32] = [0x42; 32];

#[derive(Debug, Default)]
struct Published(Mutex<Vec<Checkpoint>>);

impl CheckpointObserver for Published {
    fn checkpointed(&self, checkpoint: &Checkpoint) {
        self.0.lock().unwrap().push(checkpoint.clone());
    }
}

fn signer() -> CheckpointSigner {
    CheckpointSigner::from_seed(&SEED).unwrap()
}

fn public_key() -> [u8; 32] {
    signer().public_key()
}

struct Node {
    log: AuditLog,
    published: Arc<Published>,
}

fn open_node(dir: &Path, node: &str, clock: &Arc<ManualClock>) -> Node {
    let published = Arc::new(Published::default());
    let options = AuditLogOptions {
        node: Some(node.to_string()),
        observer: Some(published.clone()),
        checkpoints: CheckpointPolicy {
            every_records: 4,
            every: Duration::from_secs(3600),
        },
        clock: clock.clone(),
        ..AuditLogOptions::default()
    };
    let log = AuditLog::open_with(&dir.join(node_file_name(node)), signer(), options).unwrap();
    Node { log, published }
}

/// Two nodes, three rounds: each appends records (n1 five, n2 three per
/// round) and checkpoints; then a digest lists both latest published
/// heads. After the last digest, n1 writes two more records and a
/// checkpoint (a tail no digest covers yet: allowed).
fn export() -> (tempfile::TempDir, Vec<Digest>) {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(Timestamp(1_765_000_000_000)));
    let mut nodes = [
        open_node(dir.path(), "n1", &clock),
        open_node(dir.path(), "n2", &clock),
    ];
    let digest_signer = signer();
    let mut digests: Vec<Digest> = Vec::new();
    for round in 0..3u64 {
        for (i, node) in nodes.iter_mut().enumerate() {
            let count = if i == 0 { 5 } else { 3 };
            for n in 0..count {
                clock.advance(Duration::from_millis(10));
                node.log.append(entry(round * 10 + n)).unwrap();
            }
            node.log.checkpoint().unwrap();
        }
        let heads = nodes
            .iter()
            .map(|node| {
                let cp = node.published.0.lock().unwrap().last().unwrap().clone();
                let published = PublishedCheckpoint::from_checkpoint(&cp).unwrap();
                assert!(published.signature_is_valid(&digest_signer.public_key()));
                published.head()
            })
            .collect();
        let unsigned = Digest::next(digests.last(), clock.now(), round, heads).unwrap();
        digests.push(digest_signer.sign_digest(unsigned).unwrap());
    }
    for n in 0..2 {
        nodes[0].log.append(entry(100 + n)).unwrap();
    }
    nodes[0].log.checkpoint().unwrap();
    write_digests(dir.path(), &digests);
    (dir, digests)
}

fn write_digests(dir: &Path, digests: &[Digest]) {
    let text: String = digests
        .iter()
        .map(|d| format!("{}\n", d.to_line().unwrap()))
        .collect();
    std::fs::write(dir.join(DIGESTS_FILE), text).unwrap();
}

fn verify(dir: &Path) -> Result<ClusterReport, ClusterFailure> {
    verify_cluster(dir, &public_key(), Policy::default())
}

fn lines(dir: &Path, node: &str) -> Vec<String> {
    std::fs::read_to_string(dir.join(node_file_name(node)))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(dir: &Path, node: &str, lines: &[String]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(dir.join(node_file_name(node)), text).unwrap();
}

#[test]
fn the_untampered_export_verifies() {
    let (dir, digests) = export();
    let report = verify(dir.path()).unwrap();
    assert_eq!(report.digests, 3);
    assert_eq!(report.first_digest, Some(1));
    assert_eq!(report.last_digest.as_ref(), digests.last());
    let summary: Vec<_> = report
        .nodes
        .iter()
        .map(|n| {
            (
                n.node.as_str(),
                n.report.last_seq,
                n.digested_seq,
                n.heads_checked,
            )
        })
        .collect();
    assert_eq!(summary, [("n1", 17, Some(15), 3), ("n2", 9, Some(9), 3)]);
    assert!(
        report
            .nodes
            .iter()
            .all(|n| n.report.node.as_deref() == Some(n.node.as_str()))
    );
    // The checkpoints name their node, in the signature (format v3).
    let first_cp = lines(dir.path(), "n2")
        .into_iter()
        .find(|l| l.starts_with("{\"checkpoint\""))
        .unwrap();
    assert!(
        first_cp.starts_with("{\"checkpoint\":{\"version\":3,\"log_id\":"),
        "{first_cp}"
    );
    assert!(first_cp.contains(",\"node\":\"n2\",\"seq\":"), "{first_cp}");
}

#[test]
fn a_node_file_cut_before_its_last_digested_head_is_refused() {
    let (dir, _) = export();
    let mut n1 = lines(dir.path(), "n1");
    // Keep up to the checkpoint at seq 10 (digest 2's head): it verifies
    // alone, but digest 3 lists seq 15.
    let cut = n1
        .iter()
        .position(|l| l.contains("\"seq\":10,") && l.starts_with("{\"checkpoint\""))
        .unwrap();
    n1.truncate(cut + 1);
    write_lines(dir.path(), "n1", &n1);
    let failure = verify(dir.path()).unwrap_err();
    assert_eq!(
        failure,
        ClusterFailure::NodeCut {
            node: "n1".into(),
            n: 3,
            seq: 15,
            last_seq: 10
        }
    );
    assert_eq!(
        failure.to_string(),
        "digest 3 lists node n1's head at seq 15, but node-n1.jsonl ends at seq 10: the log \
         was cut after the digest"
    );
}

#[test]
fn a_missing_node_file_is_refused() {
    let (dir, _) = export();
    std::fs::remove_file(dir.path().join("node-n2.jsonl")).unwrap();
    let failure = verify(dir.path()).unwrap_err();
    assert_eq!(
        failure,
        ClusterFailure::NodeFileMissing {
            node: "n2".into(),
            n: 1
        }
    );
    assert!(
        failure.to_string().contains("has no node-n2.jsonl"),
        "{failure}"
    );
}

#[test]
fn swapped_node_files_are_refused() {
    let (dir, _) = export();
    let (a, b) = (
        dir.path().join("node-n1.jsonl"),
        dir.path().join("node-n2.jsonl"),
    );
    let tmp = dir.path().join("swap");
    std::fs::rename(&a, &tmp).unwrap();
    std::fs::rename(&b, &a).unwrap();
    std::fs::rename(&tmp, &b).unwrap();
    let failure = verify(dir.path()).unwrap_err();
    assert_eq!(
        failure,
        ClusterFailure::NodeFileSwapped {
            node: "n1".into(),
            found: "n2".into()
        }
    );
    assert_eq!(
        failure.to_string(),
        "node-n1.jsonl holds node n2's log (its checkpoints name node n2), not node n1's: the \
         files were swapped or renamed"
    );
}

#[test]
fn a_checkpoint_moved_between_node_files_is_refused() {
    let (dir, _) = export();
    let n1 = lines(dir.path(), "n1");
    let n2 = lines(dir.path(), "n2");
    // n2's first checkpoint (after its seq 3) put after n1's record 6,
    // where n1's own checkpoints came before it.
    let cp = n2
        .iter()
        .find(|l| l.starts_with("{\"checkpoint\""))
        .unwrap()
        .clone();
    let at = n1
        .iter()
        .position(|l| l.starts_with("{\"seq\":6,"))
        .unwrap();
    let mut tampered = n1.clone();
    tampered.insert(at + 1, cp);
    write_lines(dir.path(), "n1", &tampered);
    let failure = verify(dir.path()).unwrap_err();
    let ClusterFailure::NodeLog { node, error } = &failure else {
        panic!("{failure}");
    };
    assert_eq!(node, "n1");
    assert_eq!(error.line, at as u64 + 2);
    assert_eq!(
        error.failure,
        VerifyFailure::NodeMismatch {
            expected: "n1".into(),
            found: "n2".into()
        }
    );
    assert!(
        failure
            .to_string()
            .starts_with("node-n1.jsonl does not verify: line "),
        "{failure}"
    );
    // Its node rewritten to n1: the signature no longer verifies.
    let mut cp: Checkpoint = Checkpoint::from_line(&tampered[at + 1]).unwrap();
    cp.node = Some("n1".into());
    tampered[at + 1] = cp.to_line().unwrap();
    write_lines(dir.path(), "n1", &tampered);
    let failure = verify(dir.path()).unwrap_err();
    assert!(
        matches!(&failure, ClusterFailure::NodeLog { node, error }
            if node == "n1" && matches!(error.failure, VerifyFailure::LogIdMismatch { .. } | VerifyFailure::BadSignature)),
        "{failure}"
    );
}

#[test]
fn a_removed_digest_is_refused() {
    let (dir, digests) = export();
    // From the middle.
    write_digests(dir.path(), &[digests[0].clone(), digests[2].clone()]);
    let failure = verify(dir.path()).unwrap_err();
    assert_eq!(
        failure,
        ClusterFailure::DigestGap {
            previous: 1,
            expected: 2,
            found: 3,
            line: 2
        }
    );
    assert_eq!(
        failure.to_string(),
        "digest 2 is missing: digests.jsonl goes from digest 1 to digest 3 (line 2)"
    );
    // From the start.
    write_digests(dir.path(), &digests[1..]);
    assert_eq!(
        verify(dir.path()).unwrap_err(),
        ClusterFailure::DigestsAnchored { n: 2 }
    );
    // ...which --allow-anchored accepts (the prev of the first is not
    // checkable).
    let anchored = Policy {
        allow_anchored: true,
        ..Policy::default()
    };
    verify_cluster(dir.path(), &public_key(), anchored).unwrap();
    // All of them.
    write_digests(dir.path(), &[]);
    assert_eq!(
        verify(dir.path()).unwrap_err(),
        ClusterFailure::EmptyDigests
    );
    std::fs::remove_file(dir.path().join(DIGESTS_FILE)).unwrap();
    assert_eq!(verify(dir.path()).unwrap_err(), ClusterFailure::NoDigests);
}

#[test]
fn an_altered_digest_is_refused() {
    let (dir, digests) = export();
    let mut altered = digests.clone();
    altered[1].heads[0].seq -= 1;
    write_digests(dir.path(), &altered);
    let failure = verify(dir.path()).unwrap_err();
    assert_eq!(
        failure,
        ClusterFailure::DigestBadSignature { n: 2, line: 2 }
    );
    assert_eq!(
        failure.to_string(),
        "digest 2 (digests.jsonl line 2): the signature does not verify (the digest was \
         altered, or signed by another key)"
    );
    // Its key generation (a store rollback hidden).
    let mut altered = digests.clone();
    altered[2].key_generation = 0;
    write_digests(dir.path(), &altered);
    assert_eq!(
        verify(dir.path()).unwrap_err(),
        ClusterFailure::DigestBadSignature { n: 3, line: 3 }
    );
    // A line that is not canonical.
    let mut text: Vec<String> = digests.iter().map(|d| d.to_line().unwrap()).collect();
    text[0] = text[0].replacen("{\"n\":1,", "{\"n\": 1,", 1);
    std::fs::write(dir.path().join(DIGESTS_FILE), text.join("\n") + "\n").unwrap();
    assert!(matches!(
        verify(dir.path()).unwrap_err(),
        ClusterFailure::DigestMalformed { line: 1, .. }
    ));
}

#[test]
fn a_digest_signed_by_another_key_is_refused() {
    let (dir, digests) = export();
    let (other, _) = CheckpointSigner::generate().unwrap();
    let mut forged = digests.clone();
    forged[1] = other.sign_digest(digests[1].unsigned()).unwrap();
    write_digests(dir.path(), &forged);
    let failure = verify(dir.path()).unwrap_err();
    assert_eq!(
        failure,
        ClusterFailure::DigestWrongKey {
            n: 2,
            line: 2,
            named: other.fingerprint(),
            given: key_fingerprint(&public_key()),
        }
    );
    assert!(
        failure
            .to_string()
            .starts_with("digest 2 (digests.jsonl line 2) was signed by the key with fingerprint "),
        "{failure}"
    );
    // Claiming the audit key's fingerprint does not help.
    forged[1].key_fingerprint = key_fingerprint(&public_key());
    write_digests(dir.path(), &forged);
    assert_eq!(
        verify(dir.path()).unwrap_err(),
        ClusterFailure::DigestBadSignature { n: 2, line: 2 }
    );
    // A whole chain forged under another key: refused at its first digest.
    let mut chain: Vec<Digest> = Vec::new();
    for d in &digests {
        let unsigned =
            Digest::next(chain.last(), d.time, d.key_generation, d.heads.clone()).unwrap();
        chain.push(other.sign_digest(unsigned).unwrap());
    }
    write_digests(dir.path(), &chain);
    assert!(matches!(
        verify(dir.path()).unwrap_err(),
        ClusterFailure::DigestWrongKey { n: 1, .. }
    ));
}

#[test]
fn a_digest_chain_out_of_order_or_inconsistent_is_refused() {
    let (dir, digests) = export();
    let signer = signer();
    // Re-signed with the audit key (an insider with the key is out of
    // scope, but the signer's own mistakes are caught): a head that goes
    // back, a node dropped, a broken prev.
    let resign = |heads: Vec<crate::audit::NodeHead>| {
        let unsigned = Digest::next(Some(&digests[1]), Timestamp(9), 2, heads).unwrap();
        signer.sign_digest(unsigned).unwrap()
    };
    let mut back = digests[2].heads.clone();
    back[1].seq = 3;
    write_digests(
        dir.path(),
        &[digests[0].clone(), digests[1].clone(), resign(back)],
    );
    assert_eq!(
        verify(dir.path()).unwrap_err(),
        ClusterFailure::HeadWentBack {
            n: 3,
            node: "n2".into(),
            before: 6,
            before_n: 2,
            after: 3
        }
    );
    let dropped = vec![digests[2].heads[0].clone()];
    write_digests(
        dir.path(),
        &[digests[0].clone(), digests[1].clone(), resign(dropped)],
    );
    assert_eq!(
        verify(dir.path()).unwrap_err(),
        ClusterFailure::NodeDropped {
            n: 3,
            node: "n2".into(),
            last_n: 2
        }
    );
    let mut unlinked = digests[2].unsigned();
    unlinked.prev = "ee".repeat(32);
    let unlinked = signer.sign_digest(unlinked).unwrap();
    write_digests(
        dir.path(),
        &[digests[0].clone(), digests[1].clone(), unlinked],
    );
    assert_eq!(
        verify(dir.path()).unwrap_err(),
        ClusterFailure::DigestBrokenChain {
            n: 3,
            line: 3,
            previous: 2
        }
    );
    // A head whose hash is not in the node's chain.
    let mut wrong = digests[2].heads.clone();
    wrong[1].head_hash = "ee".repeat(32);
    write_digests(
        dir.path(),
        &[digests[0].clone(), digests[1].clone(), resign(wrong)],
    );
    assert_eq!(
        verify(dir.path()).unwrap_err(),
        ClusterFailure::HeadMismatch {
            node: "n2".into(),
            n: 3,
            seq: 9
        }
    );
}

#[test]
fn a_single_nodes_log_in_a_node_file_is_refused() {
    let (dir, _) = export();
    // A v2 log (no node in its checkpoints) under n2's name.
    let path = dir.path().join("node-n2.jsonl");
    std::fs::remove_file(&path).unwrap();
    let mut log = AuditLog::open(&path, signer()).unwrap();
    for n in 0..9 {
        log.append(entry(n)).unwrap();
    }
    log.checkpoint().unwrap();
    drop(log);
    assert_eq!(
        verify(dir.path()).unwrap_err(),
        ClusterFailure::NodeUnnamed { node: "n2".into() }
    );
}

#[test]
fn the_writer_keeps_a_nodes_log_that_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    // A single node's log (v2) joins a cluster as n1: v3 from then on.
    let mut log = AuditLog::open(&path, signer()).unwrap();
    log.append(entry(1)).unwrap();
    log.checkpoint().unwrap();
    drop(log);
    let as_node = |node: &str| AuditLogOptions {
        node: Some(node.to_string()),
        ..AuditLogOptions::default()
    };
    let mut log = AuditLog::open_with(&path, signer(), as_node("n1")).unwrap();
    log.append(entry(2)).unwrap();
    let cp = log.checkpoint().unwrap().unwrap();
    assert_eq!((cp.version, cp.node.as_deref()), (Some(3), Some("n1")));
    drop(log);
    let text = std::fs::read(&path).unwrap();
    let report = crate::audit::verify(&text[..], &public_key(), |_| {}).unwrap();
    assert_eq!(report.node.as_deref(), Some("n1"));
    // Another node, or a single node, cannot continue it.
    for options in [as_node("n2"), AuditLogOptions::default()] {
        let err = AuditLog::open_with(&path, signer(), options).unwrap_err();
        assert!(
            matches!(err, crate::audit::AuditError::WrongNode(_)),
            "{err}"
        );
    }
    AuditLog::open_with(&path, signer(), as_node("n1")).unwrap();
}
