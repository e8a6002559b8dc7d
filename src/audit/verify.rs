//! The offline verifier: what an auditor runs on an exported log, with the
//! checkpoint public key obtained out of band.
//!
//! It checks, line by line: that the line is the canonical encoding of its
//! record or checkpoint, byte for byte (no whitespace, no other field order
//! or escape, no duplicate key: a parser that keeps the first of two
//! duplicate keys and one that keeps the last must never disagree on what a
//! verified line says); every record's `hash` (the canonical encoding in
//! [`super::record`]); that `seq` increases by exactly one; that each
//! `prev_hash` is the previous record's `hash` (64 zeros for seq 1); every
//! checkpoint's Ed25519 signature, and for a version 2 or 3 checkpoint
//! ([`super::checkpoint`]) that it names the key verified with and the same
//! log as every other checkpoint of the file (for version 3, the same node
//! too, and no checkpoint without a node after it); and that each checkpoint names
//! the chain head just before it (same `seq`, same `hash`). It stops at the
//! first failure and names its line (1-based) and, when known, its `seq`.
//!
//! What this detects and what it cannot is stated in [`super`]'s docs. In
//! short: any change to the records a surviving checkpoint covers is
//! detected; the tail after the last checkpoint can be truncated (or,
//! by someone who rewrites it whole, replaced) unnoticed unless the auditor
//! supplies a checkpoint obtained independently
//! ([`verify_with_checkpoints`]).
//!
//! A log that starts with a checkpoint is *anchored*: its records continue
//! from the anchor's `seq` and `head_hash`, and the records before it are not
//! checked. [`VerifyReport::anchor`] says so. The structural check above
//! accepts an anchored, an empty or an unsigned log (the writer opens such
//! logs: after retention, on a new data directory); what an auditor accepts
//! is [`Policy`]: by default a log must start at seq 1, hold at least one
//! record and one signed checkpoint, and end with at most
//! [`DEFAULT_MAX_UNSIGNED`] records after its last checkpoint.

use std::io::BufRead;

use super::checkpoint::{Checkpoint, CheckpointLine, key_fingerprint};
use super::record::{AuditRecord, GENESIS_HASH};

/// The default of `coffre audit verify --max-unsigned`: the writer
/// checkpoints every 1,000 records (or 60 s), so a healthy log written with
/// the default `audit.checkpoint_every_records` never ends with more than
/// 999 unsigned records; twice that leaves room for a checkpoint deferred by
/// a short HSM outage.
pub const DEFAULT_MAX_UNSIGNED: u64 = 2000;

/// What a successful verification found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    /// Number of records checked.
    pub records: u64,
    /// Number of checkpoints checked, the anchor included.
    pub checkpoints: u64,
    /// The checkpoint the log starts from, if it does not start at seq 1.
    pub anchor: Option<Checkpoint>,
    /// `seq` of the first record (`None` when there is none).
    pub first_seq: Option<u64>,
    /// `seq` of the last record (of the anchor if there are no records; 0
    /// for an empty log).
    pub last_seq: u64,
    /// `hash` of the last record (as for `last_seq`; 64 zeros when empty).
    pub head_hash: String,
    pub last_checkpoint: Option<Checkpoint>,
    /// The checkpoint before `last_checkpoint`, if any.
    pub previous_checkpoint: Option<Checkpoint>,
    /// Records after the last checkpoint: their truncation would not be
    /// detectable from this file alone.
    pub uncovered_records: u64,
    /// The log's identity, from its version 2 checkpoints (`None` if it has
    /// none: a log written before #15, or no checkpoint at all).
    pub log_id: Option<String>,
    /// Checkpoints of version 1 (no log identity).
    pub v1_checkpoints: u64,
    /// The node whose log this is, from its version 3 checkpoints (`None`
    /// if it has none: a single node's log).
    pub node: Option<String>,
}

/// The first failure found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}{}: {failure}", seq.map(|s| format!(" (seq {s})")).unwrap_or_default())]
pub struct VerifyError {
    /// 1-based line number of the offending line (for `Truncated`, the
    /// number of lines read + 1; 0 for a known checkpoint that is itself
    /// invalid).
    pub line: u64,
    /// The `seq` of the offending record or checkpoint, when it parsed.
    pub seq: Option<u64>,
    pub failure: VerifyFailure,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyFailure {
    #[error("cannot read the log: {0}")]
    Io(String),
    #[error("not a valid record or checkpoint: {0}")]
    Malformed(String),
    #[error(
        "not the canonical encoding of its record or checkpoint (whitespace, field order, \
         escapes or a duplicate key differ from what coffre writes)"
    )]
    NotCanonical,
    #[error("record hash does not match its content")]
    HashMismatch,
    #[error("prev_hash is not the previous record's hash")]
    BrokenChain,
    #[error("expected seq {expected}, found {found}")]
    SeqGap { expected: u64, found: u64 },
    #[error("checkpoint signature does not verify")]
    BadSignature,
    #[error(
        "checkpoint was signed by the key with fingerprint {named}, not by the key given \
         ({given})"
    )]
    WrongKey { named: String, given: String },
    #[error("checkpoint names log {found}, but this log is {expected}")]
    LogIdMismatch { expected: String, found: String },
    #[error("a version 1 checkpoint (no log identity) after a version 2 one")]
    Downgrade,
    #[error("checkpoint names node {found}, but this log is node {expected}'s")]
    NodeMismatch { expected: String, found: String },
    #[error("a checkpoint that names no node after ones that name node {node}")]
    NodeDowngrade { node: String },
    #[error("checkpoint covers seq {checkpoint}, but the chain before it ends at {head}")]
    CheckpointSeqMismatch { checkpoint: u64, head: u64 },
    #[error("checkpoint head hash differs from the chain's")]
    CheckpointHashMismatch,
    #[error("the log ends at seq {last_seq}, before the known checkpoint at seq {expected}")]
    Truncated { expected: u64, last_seq: u64 },
    #[error("the known checkpoint is not part of this log")]
    KnownCheckpointMismatch,
}

/// Verifies a whole log read from `lines`. `progress` is called with the
/// number of records checked so far, after each record. Structural only:
/// apply a [`Policy`] to the report for an auditor's verdict.
pub fn verify(
    lines: impl BufRead,
    public_key: &[u8; 32],
    progress: impl FnMut(u64),
) -> Result<VerifyReport, VerifyError> {
    verify_inner(lines, public_key, &[], None, progress)
}

/// As [`verify`], and also returns the `hash` of every record (or anchor)
/// whose `seq` is in `wanted`, from the same pass: what the cluster
/// verifier compares a digest's heads with ([`super::cluster`]).
pub fn verify_collecting(
    lines: impl BufRead,
    public_key: &[u8; 32],
    wanted: &std::collections::BTreeSet<u64>,
    progress: impl FnMut(u64),
) -> Result<(VerifyReport, std::collections::BTreeMap<u64, String>), VerifyError> {
    let mut found = std::collections::BTreeMap::new();
    let report = verify_inner(lines, public_key, &[], Some((wanted, &mut found)), progress)?;
    Ok((report, found))
}

/// As [`verify`], and also requires the log to contain the chain head that
/// `known` (a checkpoint the auditor kept from before) signs: a log truncated
/// or rewritten before `known.seq` fails.
pub fn verify_with_checkpoint(
    lines: impl BufRead,
    public_key: &[u8; 32],
    known: &Checkpoint,
    progress: impl FnMut(u64),
) -> Result<VerifyReport, VerifyError> {
    verify_with_checkpoints(lines, public_key, std::slice::from_ref(known), progress)
}

/// As [`verify_with_checkpoint`], for every checkpoint of `known`: the log
/// must contain (or, for its last record, extend past) each of them, and a
/// version 2 one must name this log.
pub fn verify_with_checkpoints(
    lines: impl BufRead,
    public_key: &[u8; 32],
    known: &[Checkpoint],
    progress: impl FnMut(u64),
) -> Result<VerifyReport, VerifyError> {
    for k in known {
        if let Some(fp) = &k.key_fingerprint {
            let given = key_fingerprint(public_key);
            if *fp != given {
                return Err(VerifyError {
                    line: 0,
                    seq: Some(k.seq),
                    failure: VerifyFailure::WrongKey {
                        named: fp.clone(),
                        given,
                    },
                });
            }
        }
        if !k.signature_is_valid(public_key) {
            return Err(VerifyError {
                line: 0,
                seq: Some(k.seq),
                failure: VerifyFailure::BadSignature,
            });
        }
    }
    verify_inner(lines, public_key, known, None, progress)
}

/// What an auditor requires of a log beyond its structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Accept a log that starts from an anchor checkpoint (retention
    /// archived its older records) instead of seq 1.
    pub allow_anchored: bool,
    /// The most records allowed after the last checkpoint.
    pub max_unsigned: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            allow_anchored: false,
            max_unsigned: DEFAULT_MAX_UNSIGNED,
        }
    }
}

/// Why a structurally valid log is not accepted by a [`Policy`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyFailure {
    #[error("the log holds no record")]
    Empty,
    #[error(
        "the log does not start at seq 1: it starts from an anchor checkpoint at seq {seq}, \
         signed {time}; the records before it are not in this file (a retention anchor is \
         accepted with --allow-anchored)"
    )]
    Anchored { seq: u64, time: String },
    #[error(
        "the log holds no signed checkpoint: nothing in it is signed, so it proves nothing \
         (export it with `coffre audit export`, which signs its end, or run `coffre audit \
         checkpoint` first)"
    )]
    NoCheckpoint,
    #[error(
        "{records} records after the last signed checkpoint, more than --max-unsigned {max}: \
         the unsigned tail could have been rewritten"
    )]
    UnsignedTail { records: u64, max: u64 },
}

impl Policy {
    /// Whether `report` satisfies the policy.
    pub fn check(&self, report: &VerifyReport) -> Result<(), PolicyFailure> {
        if let Some(anchor) = &report.anchor {
            if !self.allow_anchored {
                return Err(PolicyFailure::Anchored {
                    seq: anchor.seq,
                    time: anchor.time.to_rfc3339(),
                });
            }
        }
        if report.records == 0 {
            return Err(PolicyFailure::Empty);
        }
        if report.last_checkpoint.is_none() {
            return Err(PolicyFailure::NoCheckpoint);
        }
        if report.uncovered_records > self.max_unsigned {
            return Err(PolicyFailure::UnsignedTail {
                records: report.uncovered_records,
                max: self.max_unsigned,
            });
        }
        Ok(())
    }
}

enum Line {
    Record(Box<AuditRecord>),
    Checkpoint(Checkpoint),
}

/// Parses one line strictly (typed, so a duplicate field is an error) and
/// requires it to be its own canonical encoding.
fn parse_line(bytes: &[u8]) -> Result<Line, VerifyFailure> {
    let malformed = |e: serde_json::Error| VerifyFailure::Malformed(e.to_string());
    let is_checkpoint = bytes.starts_with(b"{\"checkpoint\"");
    let (line, canonical) = if is_checkpoint {
        let cp: CheckpointLine = serde_json::from_slice(bytes).map_err(malformed)?;
        let canonical = cp.checkpoint.to_line().ok();
        (Line::Checkpoint(cp.checkpoint), canonical)
    } else {
        match serde_json::from_slice::<AuditRecord>(bytes) {
            Ok(r) => {
                let canonical = r.to_line().ok();
                (Line::Record(Box::new(r)), canonical)
            }
            Err(e) => match serde_json::from_slice::<CheckpointLine>(bytes) {
                // A checkpoint in another encoding (leading whitespace).
                Ok(_) => return Err(VerifyFailure::NotCanonical),
                Err(_) => return Err(malformed(e)),
            },
        }
    };
    if canonical.as_deref().map(str::as_bytes) != Some(bytes) {
        return Err(VerifyFailure::NotCanonical);
    }
    Ok(line)
}

/// Seqs whose hash the caller wants, and where they go.
type Collect<'a> = Option<(
    &'a std::collections::BTreeSet<u64>,
    &'a mut std::collections::BTreeMap<u64, String>,
)>;

fn verify_inner(
    mut input: impl BufRead,
    public_key: &[u8; 32],
    known: &[Checkpoint],
    mut collect: Collect<'_>,
    mut progress: impl FnMut(u64),
) -> Result<VerifyReport, VerifyError> {
    let mut report = VerifyReport {
        records: 0,
        checkpoints: 0,
        anchor: None,
        first_seq: None,
        last_seq: 0,
        head_hash: GENESIS_HASH.to_string(),
        last_checkpoint: None,
        previous_checkpoint: None,
        uncovered_records: 0,
        log_id: None,
        v1_checkpoints: 0,
        node: None,
    };
    let fingerprint = key_fingerprint(public_key);
    let mut known_seen = vec![false; known.len()];
    let mut buf = Vec::new();
    let mut line_no: u64 = 0;
    loop {
        buf.clear();
        let n = input.read_until(b'\n', &mut buf).map_err(|e| VerifyError {
            line: line_no + 1,
            seq: None,
            failure: VerifyFailure::Io(e.to_string()),
        })?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let content = buf.strip_suffix(b"\n").unwrap_or(&buf);
        let fail = |seq, failure| VerifyError {
            line: line_no,
            seq,
            failure,
        };
        match parse_line(content).map_err(|f| fail(None, f))? {
            Line::Record(r) => {
                let seq = Some(r.seq);
                let expected = report.last_seq + 1;
                if r.seq != expected {
                    return Err(fail(
                        seq,
                        VerifyFailure::SeqGap {
                            expected,
                            found: r.seq,
                        },
                    ));
                }
                if !r.hash_is_valid() {
                    return Err(fail(seq, VerifyFailure::HashMismatch));
                }
                if r.prev_hash != report.head_hash {
                    return Err(fail(seq, VerifyFailure::BrokenChain));
                }
                for (k, seen) in known.iter().zip(known_seen.iter_mut()) {
                    if k.seq == r.seq {
                        if k.head_hash != r.hash {
                            return Err(fail(seq, VerifyFailure::KnownCheckpointMismatch));
                        }
                        *seen = true;
                    }
                }
                if let Some((wanted, found)) = collect.as_mut() {
                    if wanted.contains(&r.seq) {
                        found.insert(r.seq, r.hash.clone());
                    }
                }
                report.first_seq.get_or_insert(r.seq);
                report.records += 1;
                report.uncovered_records += 1;
                report.last_seq = r.seq;
                report.head_hash = r.hash;
                progress(report.records);
            }
            Line::Checkpoint(cp) => {
                let seq = Some(cp.seq);
                let identity = cp
                    .identity()
                    .map_err(|e| fail(seq, VerifyFailure::Malformed(e)))?;
                if let Some(named) = identity.key_fingerprint() {
                    if named != fingerprint {
                        return Err(fail(
                            seq,
                            VerifyFailure::WrongKey {
                                named: named.to_string(),
                                given: fingerprint.clone(),
                            },
                        ));
                    }
                }
                match (identity.node(), &report.node) {
                    (Some(found), Some(expected)) if expected != found => {
                        return Err(fail(
                            seq,
                            VerifyFailure::NodeMismatch {
                                expected: expected.clone(),
                                found: found.to_string(),
                            },
                        ));
                    }
                    (Some(_), Some(_)) => {}
                    (Some(found), None) => report.node = Some(found.to_string()),
                    (None, Some(expected)) => {
                        return Err(fail(
                            seq,
                            VerifyFailure::NodeDowngrade {
                                node: expected.clone(),
                            },
                        ));
                    }
                    (None, None) => {}
                }
                match (identity.log_id(), &report.log_id) {
                    (None, Some(_)) => return Err(fail(seq, VerifyFailure::Downgrade)),
                    (None, None) => report.v1_checkpoints += 1,
                    (Some(found), Some(expected)) if expected != found => {
                        return Err(fail(
                            seq,
                            VerifyFailure::LogIdMismatch {
                                expected: expected.clone(),
                                found: found.to_string(),
                            },
                        ));
                    }
                    (Some(_), Some(_)) => {}
                    (Some(found), None) => report.log_id = Some(found.to_string()),
                }
                if !cp.signature_is_valid(public_key) {
                    return Err(fail(seq, VerifyFailure::BadSignature));
                }
                if line_no == 1 {
                    // An anchor: the log continues from here.
                    report.last_seq = cp.seq;
                    report.head_hash.clone_from(&cp.head_hash);
                    report.anchor = Some(cp.clone());
                    if let Some((wanted, found)) = collect.as_mut() {
                        if wanted.contains(&cp.seq) {
                            found.insert(cp.seq, cp.head_hash.clone());
                        }
                    }
                    for (k, seen) in known.iter().zip(known_seen.iter_mut()) {
                        if k.seq == cp.seq {
                            if k.head_hash != cp.head_hash {
                                return Err(fail(seq, VerifyFailure::KnownCheckpointMismatch));
                            }
                            *seen = true;
                        }
                    }
                } else {
                    if cp.seq != report.last_seq {
                        return Err(fail(
                            seq,
                            VerifyFailure::CheckpointSeqMismatch {
                                checkpoint: cp.seq,
                                head: report.last_seq,
                            },
                        ));
                    }
                    if cp.head_hash != report.head_hash {
                        return Err(fail(seq, VerifyFailure::CheckpointHashMismatch));
                    }
                }
                report.checkpoints += 1;
                report.uncovered_records = 0;
                report.previous_checkpoint = report.last_checkpoint.replace(cp);
            }
        }
    }
    for (k, seen) in known.iter().zip(&known_seen) {
        let other_log = match (&k.log_id, &report.log_id) {
            (Some(a), Some(b)) => a != b,
            _ => false,
        };
        if !seen || other_log {
            let failure = if !seen && report.last_seq < k.seq {
                VerifyFailure::Truncated {
                    expected: k.seq,
                    last_seq: report.last_seq,
                }
            } else {
                // Another log, or before the anchor: this log cannot vouch
                // for it.
                VerifyFailure::KnownCheckpointMismatch
            };
            return Err(VerifyError {
                line: line_no + 1,
                seq: Some(k.seq),
                failure,
            });
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::checkpoint::key_fingerprint;
    use crate::audit::checkpoint::tests::{TEST_LOG_ID, test_signer};
    use crate::audit::record::tests::entry;
    use crate::model::Timestamp;

    /// Nine records, a checkpoint every three, built from the formats alone
    /// (the writer's own logs are verified in `log.rs`'s tests):
    /// lines r1 r2 r3 C3 r4 r5 r6 C6 r7 r8 r9 C9 (r5 is line 6, C6 line 8).
    fn exported_log() -> (Vec<String>, [u8; 32]) {
        let (signer, pk) = test_signer();
        let time = Timestamp(1_700_000_000_000);
        let mut lines = Vec::new();
        let mut head = GENESIS_HASH.to_string();
        for n in 1..=9 {
            let record = AuditRecord::new(n, time, head, entry(n));
            head = record.hash.clone();
            lines.push(line_of(&record));
            if n % 3 == 0 {
                let checkpoint = signer.checkpoint(TEST_LOG_ID, n, &head, time).unwrap();
                lines.push(serde_json::to_string(&CheckpointLine { checkpoint }).unwrap());
            }
        }
        (lines, pk)
    }

    fn run(lines: &[String], pk: &[u8; 32]) -> Result<VerifyReport, VerifyError> {
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        verify(text.as_bytes(), pk, |_| {})
    }

    fn record(line: &str) -> AuditRecord {
        serde_json::from_str(line).unwrap()
    }

    fn line_of(r: &AuditRecord) -> String {
        serde_json::to_string(r).unwrap()
    }

    fn fails_at(result: Result<VerifyReport, VerifyError>, line: u64, seq: u64) -> VerifyFailure {
        let err = result.expect_err("tampering not detected");
        assert_eq!((err.line, err.seq), (line, Some(seq)), "{err}");
        err.failure
    }

    #[test]
    fn a_clean_log_verifies() {
        let (lines, pk) = exported_log();
        assert_eq!(lines.len(), 12);
        let mut seen = Vec::new();
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        let report = verify(text.as_bytes(), &pk, |n| seen.push(n)).unwrap();
        assert_eq!(seen, (1..=9).collect::<Vec<_>>());
        assert_eq!(
            (report.records, report.checkpoints, report.last_seq),
            (9, 3, 9)
        );
        assert_eq!(report.uncovered_records, 0);
        assert_eq!(report.anchor, None);
        assert_eq!(report.head_hash, record(&lines[10]).hash);
        // An empty log is structurally valid (the writer opens one); the
        // auditor's policy refuses it (below).
        assert_eq!(verify(&b""[..], &pk, |_| {}).unwrap().records, 0);
    }

    #[test]
    fn an_edited_field_is_detected() {
        let (mut lines, pk) = exported_log();
        let mut r5 = record(&lines[5]);
        r5.principal = "CN=someone-else".into();
        lines[5] = line_of(&r5);
        assert_eq!(
            fails_at(run(&lines, &pk), 6, 5),
            VerifyFailure::HashMismatch
        );
    }

    #[test]
    fn a_deleted_record_is_detected() {
        let (mut lines, pk) = exported_log();
        lines.remove(5);
        assert_eq!(
            fails_at(run(&lines, &pk), 6, 6),
            VerifyFailure::SeqGap {
                expected: 5,
                found: 6
            }
        );
    }

    #[test]
    fn an_inserted_record_is_detected() {
        let (mut lines, pk) = exported_log();
        let r4 = record(&lines[4]);
        let forged = AuditRecord::new(5, r4.time, r4.hash.clone(), entry(99));
        lines.insert(5, line_of(&forged));
        // The forgery chains correctly; the genuine record 5 after it does not.
        assert_eq!(
            fails_at(run(&lines, &pk), 7, 5),
            VerifyFailure::SeqGap {
                expected: 6,
                found: 5
            }
        );
    }

    #[test]
    fn a_rewritten_and_rechained_record_is_caught_by_the_checkpoint() {
        let (mut lines, pk) = exported_log();
        let r4 = record(&lines[4]);
        let r6 = record(&lines[6]);
        let mut e = entry(5);
        e.outcome = crate::audit::Outcome::Refused;
        let forged5 = AuditRecord::new(5, r4.time, r4.hash.clone(), e);
        let e6 = crate::audit::AuditEntry {
            request_id: r6.request_id.clone(),
            ..entry(6)
        };
        let forged6 = AuditRecord::new(6, r6.time, forged5.hash.clone(), e6);
        lines[5] = line_of(&forged5);
        lines[6] = line_of(&forged6);
        assert_eq!(
            fails_at(run(&lines, &pk), 8, 6),
            VerifyFailure::CheckpointHashMismatch
        );
    }

    #[test]
    fn swapped_records_are_detected() {
        let (mut lines, pk) = exported_log();
        lines.swap(5, 6);
        assert_eq!(
            fails_at(run(&lines, &pk), 6, 6),
            VerifyFailure::SeqGap {
                expected: 5,
                found: 6
            }
        );
    }

    #[test]
    fn truncation_inside_the_checkpointed_range_is_detected() {
        let (mut lines, pk) = exported_log();
        // Records 7..9 removed, their checkpoint kept.
        lines.drain(8..11);
        assert_eq!(
            fails_at(run(&lines, &pk), 9, 9),
            VerifyFailure::CheckpointSeqMismatch {
                checkpoint: 9,
                head: 6
            }
        );
    }

    #[test]
    fn tail_truncation_is_detected_only_against_a_known_checkpoint() {
        let (mut lines, pk) = exported_log();
        let known: CheckpointLine = serde_json::from_str(&lines[11]).unwrap();
        let full: String = lines.iter().map(|l| format!("{l}\n")).collect();
        verify_with_checkpoint(full.as_bytes(), &pk, &known.checkpoint, |_| {}).unwrap();
        // Cut after C6: valid on its own (documented limitation)...
        lines.truncate(8);
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        let report = verify(text.as_bytes(), &pk, |_| {}).unwrap();
        assert_eq!(report.last_seq, 6);
        // ...but not against the checkpoint the auditor kept.
        let err =
            verify_with_checkpoint(text.as_bytes(), &pk, &known.checkpoint, |_| {}).unwrap_err();
        assert_eq!(
            err.failure,
            VerifyFailure::Truncated {
                expected: 9,
                last_seq: 6
            }
        );
    }

    #[test]
    fn a_forged_checkpoint_is_detected() {
        let (lines, pk) = exported_log();
        // Signed by another key.
        let (other, _) = test_signer();
        let mut forged = lines.clone();
        let c6: CheckpointLine = serde_json::from_str(&lines[7]).unwrap();
        let mut cp = other
            .checkpoint(TEST_LOG_ID, 6, &c6.checkpoint.head_hash, c6.checkpoint.time)
            .unwrap();
        forged[7] = cp.to_line().unwrap();
        assert!(matches!(
            fails_at(run(&forged, &pk), 8, 6),
            VerifyFailure::WrongKey { .. }
        ));
        // Claiming the right key's fingerprint does not help.
        cp.key_fingerprint = Some(key_fingerprint(&pk));
        forged[7] = cp.to_line().unwrap();
        assert_eq!(
            fails_at(run(&forged, &pk), 8, 6),
            VerifyFailure::BadSignature
        );
        // A genuine signature moved onto other content.
        let mut moved = c6;
        moved.checkpoint.seq = 7;
        let mut forged = lines.clone();
        forged[7] = serde_json::to_string(&moved).unwrap();
        assert_eq!(
            fails_at(run(&forged, &pk), 8, 7),
            VerifyFailure::BadSignature
        );
    }

    #[test]
    fn another_public_key_fails_at_the_first_checkpoint() {
        let (lines, pk) = exported_log();
        let (_, other_pk) = test_signer();
        // A version 2 checkpoint names its key: the failure says which.
        assert_eq!(
            fails_at(run(&lines, &other_pk), 4, 3),
            VerifyFailure::WrongKey {
                named: key_fingerprint(&pk),
                given: key_fingerprint(&other_pk)
            }
        );
    }

    #[test]
    fn a_log_may_start_from_an_anchor_checkpoint() {
        let (lines, pk) = exported_log();
        let report = run(&lines[3..], &pk).unwrap();
        assert_eq!(report.anchor.map(|a| a.seq), Some(3));
        assert_eq!((report.records, report.last_seq), (6, 9));
        // Without its anchor, a suffix does not verify.
        assert_eq!(
            fails_at(run(&lines[4..], &pk), 1, 4),
            VerifyFailure::SeqGap {
                expected: 1,
                found: 4
            }
        );
    }

    #[test]
    fn malformed_lines_are_named() {
        let (mut lines, pk) = exported_log();
        lines[2] = lines[2].replacen('{', "{\"extra\":1,", 1);
        let err = run(&lines, &pk).unwrap_err();
        assert_eq!((err.line, err.seq), (3, None));
        assert!(matches!(err.failure, VerifyFailure::Malformed(_)));
    }

    fn lines_text(lines: &[String]) -> String {
        lines.iter().map(|l| format!("{l}\n")).collect()
    }

    fn policy_failure(lines: &[String], pk: &[u8; 32], policy: Policy) -> Option<PolicyFailure> {
        let report = run(lines, pk).unwrap();
        policy.check(&report).err()
    }

    #[test]
    fn a_line_must_be_its_canonical_encoding() {
        let (lines, pk) = exported_log();
        let r5 = &lines[5];
        let edits: Vec<(&str, String)> = vec![
            // First-wins parsers would read "innocent".
            (
                "duplicate key",
                r5.replacen(
                    "\"principal\":",
                    "\"principal\":\"CN=innocent\",\"principal\":",
                    1,
                ),
            ),
            (
                "space after a colon",
                r5.replacen("\"seq\":5", "\"seq\": 5", 1),
            ),
            ("trailing space", format!("{r5} ")),
            ("leading space", format!(" {r5}")),
            (
                "reordered fields",
                r5.replacen("{\"seq\":5,\"time\":", "{\"time\":", 1)
                    .replacen("\"request_id\"", "\"seq\":5,\"request_id\"", 1),
            ),
            (
                "another escape",
                r5.replacen("CN=svc-a", "CN=svc-\\u0061", 1),
            ),
            ("a CR", format!("{r5}\r")),
        ];
        for (what, edited) in edits {
            assert_ne!(&edited, r5, "{what}");
            let mut tampered = lines.clone();
            tampered[5] = edited;
            let err = run(&tampered, &pk).expect_err(what);
            assert_eq!(err.line, 6, "{what}: {err}");
            assert!(
                matches!(
                    err.failure,
                    VerifyFailure::NotCanonical | VerifyFailure::Malformed(_)
                ),
                "{what}: {err}"
            );
        }
        // A checkpoint line too.
        let mut tampered = lines.clone();
        tampered[7] = tampered[7].replacen("{\"checkpoint\":{", "{\"checkpoint\": {", 1);
        assert_eq!(
            run(&tampered, &pk).unwrap_err().failure,
            VerifyFailure::NotCanonical
        );
        let mut tampered = lines.clone();
        tampered[7] = tampered[7].replacen("\"seq\":6", "\"seq\":6,\"seq\":6", 1);
        let err = run(&tampered, &pk).unwrap_err();
        assert!(
            matches!(err.failure, VerifyFailure::Malformed(ref m) if m.contains("duplicate")),
            "{err}"
        );
        // A duplicate key inside the context map.
        let mut e = entry(1);
        e.context = Some([("a".to_string(), "1".to_string())].into());
        let r = AuditRecord::new(1, Timestamp(0), GENESIS_HASH.into(), e);
        let line = line_of(&r).replacen("{\"a\":\"1\"}", "{\"a\":\"2\",\"a\":\"1\"}", 1);
        assert_eq!(
            run(&[line], &pk).unwrap_err().failure,
            VerifyFailure::NotCanonical
        );
    }

    #[test]
    fn the_default_policy_refuses_front_cut_empty_and_unsigned_logs() {
        let (lines, pk) = exported_log();
        let strict = Policy::default();
        assert_eq!(policy_failure(&lines, &pk, strict), None);
        let report = run(&lines, &pk).unwrap();
        assert_eq!((report.first_seq, report.last_seq), (Some(1), 9));
        // Cut from the front, at a checkpoint: refused unless anchored logs
        // are accepted, and the anchor is reported.
        assert!(matches!(
            policy_failure(&lines[3..], &pk, strict),
            Some(PolicyFailure::Anchored { seq: 3, .. })
        ));
        let anchored = Policy {
            allow_anchored: true,
            ..strict
        };
        assert_eq!(policy_failure(&lines[3..], &pk, anchored), None);
        assert_eq!(run(&lines[3..], &pk).unwrap().first_seq, Some(4));
        // Only the last checkpoint left: an anchor with no record.
        assert!(matches!(
            policy_failure(&lines[11..], &pk, strict),
            Some(PolicyFailure::Anchored { seq: 9, .. })
        ));
        assert_eq!(
            policy_failure(&lines[11..], &pk, anchored),
            Some(PolicyFailure::Empty)
        );
        // Empty.
        assert_eq!(policy_failure(&[], &pk, strict), Some(PolicyFailure::Empty));
        // Cut before the first checkpoint.
        assert_eq!(
            policy_failure(&lines[..3], &pk, strict),
            Some(PolicyFailure::NoCheckpoint)
        );
        // A long unsigned tail.
        let tail = Policy {
            max_unsigned: 1,
            ..strict
        };
        assert_eq!(
            policy_failure(&lines[..10], &pk, tail),
            Some(PolicyFailure::UnsignedTail { records: 2, max: 1 })
        );
        assert_eq!(policy_failure(&lines[..9], &pk, tail), None);
    }

    #[test]
    fn checkpoints_name_their_log_and_key() {
        let (lines, pk) = exported_log();
        let report = run(&lines, &pk).unwrap();
        assert_eq!(report.log_id.as_deref(), Some(TEST_LOG_ID));
        assert_eq!(report.v1_checkpoints, 0);
        let c6: CheckpointLine = serde_json::from_str(&lines[7]).unwrap();
        assert_eq!(
            c6.checkpoint.key_fingerprint.as_deref(),
            Some(key_fingerprint(&pk).as_str())
        );
        // A checkpoint of another log under the same key, for the same head.
        let other_log = "0b7c0e7e-1111-4222-8333-444455556666";
        let (signer, pk) = test_signer();
        let time = Timestamp(1);
        let mut lines = Vec::new();
        let mut head = GENESIS_HASH.to_string();
        for n in 1..=4 {
            let record = AuditRecord::new(n, time, head, entry(n));
            head = record.hash.clone();
            lines.push(line_of(&record));
            if n % 2 == 0 {
                let log = if n == 4 { other_log } else { TEST_LOG_ID };
                let checkpoint = signer.checkpoint(log, n, &head, time).unwrap();
                lines.push(checkpoint.to_line().unwrap());
            }
        }
        assert_eq!(
            fails_at(run(&lines, &pk), 6, 4),
            VerifyFailure::LogIdMismatch {
                expected: TEST_LOG_ID.into(),
                found: other_log.into()
            }
        );
        // A v1 checkpoint after a v2 one: a downgrade.
        lines[5] = signer
            .checkpoint_v1(4, &head, time)
            .unwrap()
            .to_line()
            .unwrap();
        assert_eq!(fails_at(run(&lines, &pk), 6, 4), VerifyFailure::Downgrade);
        // v1 then v2 (a log upgraded in place) is fine.
        let c2: CheckpointLine = serde_json::from_str(&lines[2]).unwrap();
        lines[2] = signer
            .checkpoint_v1(2, &c2.checkpoint.head_hash, time)
            .unwrap()
            .to_line()
            .unwrap();
        lines[5] = signer
            .checkpoint(TEST_LOG_ID, 4, &head, time)
            .unwrap()
            .to_line()
            .unwrap();
        let report = run(&lines, &pk).unwrap();
        assert_eq!(
            (report.v1_checkpoints, report.log_id.as_deref()),
            (1, Some(TEST_LOG_ID))
        );
    }

    #[test]
    fn every_known_checkpoint_must_be_in_the_log() {
        let (lines, pk) = exported_log();
        let cp = |i: usize| {
            serde_json::from_str::<CheckpointLine>(&lines[i])
                .unwrap()
                .checkpoint
        };
        let (c3, c6, c9) = (cp(3), cp(7), cp(11));
        let text = lines_text(&lines);
        verify_with_checkpoints(
            text.as_bytes(),
            &pk,
            &[c3.clone(), c6.clone(), c9.clone()],
            |_| {},
        )
        .unwrap();
        // Cut after C6: C9 is missing.
        let cut = lines_text(&lines[..8]);
        let err = verify_with_checkpoints(cut.as_bytes(), &pk, &[c3.clone(), c9.clone()], |_| {})
            .unwrap_err();
        assert_eq!(
            err.failure,
            VerifyFailure::Truncated {
                expected: 9,
                last_seq: 6
            }
        );
        // A known checkpoint of another log (same key, same head).
        let mut forged = c6.clone();
        forged.log_id = Some("0b7c0e7e-1111-4222-8333-444455556666".into());
        let err = verify_with_checkpoints(text.as_bytes(), &pk, &[forged], |_| {}).unwrap_err();
        assert_eq!((err.line, err.failure), (0, VerifyFailure::BadSignature));
        // Before the anchor: this log cannot vouch for it.
        let anchored = lines_text(&lines[7..]);
        let err = verify_with_checkpoints(anchored.as_bytes(), &pk, &[c3], |_| {}).unwrap_err();
        assert_eq!(err.failure, VerifyFailure::KnownCheckpointMismatch);
        verify_with_checkpoints(anchored.as_bytes(), &pk, &[c6, c9], |_| {}).unwrap();
    }
}
