//! The offline verifier: what an auditor runs on an exported log, with the
//! checkpoint public key obtained out of band.
//!
//! It checks, line by line: every record's `hash` (the canonical encoding in
//! [`super::record`]); that `seq` increases by exactly one; that each
//! `prev_hash` is the previous record's `hash` (64 zeros for seq 1); every
//! checkpoint's Ed25519 signature; and that each checkpoint names the chain
//! head just before it (same `seq`, same `hash`). It stops at the first
//! failure and names its line (1-based) and, when known, its `seq`.
//!
//! What this detects and what it cannot is stated in [`super`]'s docs. In
//! short: any change to the records a surviving checkpoint covers is
//! detected; the tail after the last checkpoint can be truncated (or,
//! by someone who rewrites it whole, replaced) unnoticed unless the auditor
//! supplies a checkpoint obtained independently
//! ([`verify_with_checkpoint`]).
//!
//! A log that starts with a checkpoint is *anchored*: its records continue
//! from the anchor's `seq` and `head_hash`, and the records before it are not
//! checked. [`VerifyReport::anchor`] says so; an auditor who expects a full
//! log (from seq 1) must check that it is `None`, as a prefix of a log cut
//! just before one of its checkpoints looks like an anchored log.

use std::io::BufRead;

use super::checkpoint::{Checkpoint, CheckpointLine};
use super::record::{AuditRecord, GENESIS_HASH};

/// What a successful verification found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    /// Number of records checked.
    pub records: u64,
    /// Number of checkpoints checked, the anchor included.
    pub checkpoints: u64,
    /// The checkpoint the log starts from, if it does not start at seq 1.
    pub anchor: Option<Checkpoint>,
    /// `seq` of the last record (of the anchor if there are no records; 0
    /// for an empty log).
    pub last_seq: u64,
    /// `hash` of the last record (as for `last_seq`; 64 zeros when empty).
    pub head_hash: String,
    pub last_checkpoint: Option<Checkpoint>,
    /// Records after the last checkpoint: their truncation would not be
    /// detectable from this file alone.
    pub uncovered_records: u64,
}

/// The first failure found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}{}: {failure}", seq.map(|s| format!(" (seq {s})")).unwrap_or_default())]
pub struct VerifyError {
    /// 1-based line number of the offending line (for `Truncated`, the
    /// number of lines read + 1).
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
    #[error("record hash does not match its content")]
    HashMismatch,
    #[error("prev_hash is not the previous record's hash")]
    BrokenChain,
    #[error("expected seq {expected}, found {found}")]
    SeqGap { expected: u64, found: u64 },
    #[error("checkpoint signature does not verify")]
    BadSignature,
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
/// number of records checked so far, after each record.
pub fn verify(
    lines: impl BufRead,
    public_key: &[u8; 32],
    progress: impl FnMut(u64),
) -> Result<VerifyReport, VerifyError> {
    verify_inner(lines, public_key, None, progress)
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
    if !known.signature_is_valid(public_key) {
        return Err(VerifyError {
            line: 0,
            seq: Some(known.seq),
            failure: VerifyFailure::BadSignature,
        });
    }
    verify_inner(lines, public_key, Some(known), progress)
}

enum Line {
    Record(Box<AuditRecord>),
    Checkpoint(Checkpoint),
}

fn parse_line(bytes: &[u8]) -> Result<Line, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if value.get("checkpoint").is_some() {
        let cp: CheckpointLine = serde_json::from_value(value).map_err(|e| e.to_string())?;
        Ok(Line::Checkpoint(cp.checkpoint))
    } else {
        let r: AuditRecord = serde_json::from_value(value).map_err(|e| e.to_string())?;
        Ok(Line::Record(Box::new(r)))
    }
}

fn verify_inner(
    mut input: impl BufRead,
    public_key: &[u8; 32],
    known: Option<&Checkpoint>,
    mut progress: impl FnMut(u64),
) -> Result<VerifyReport, VerifyError> {
    let mut report = VerifyReport {
        records: 0,
        checkpoints: 0,
        anchor: None,
        last_seq: 0,
        head_hash: GENESIS_HASH.to_string(),
        last_checkpoint: None,
        uncovered_records: 0,
    };
    let mut known_seen = false;
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
        match parse_line(content).map_err(|e| fail(None, VerifyFailure::Malformed(e)))? {
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
                if let Some(k) = known {
                    if k.seq == r.seq {
                        if k.head_hash != r.hash {
                            return Err(fail(seq, VerifyFailure::KnownCheckpointMismatch));
                        }
                        known_seen = true;
                    }
                }
                report.records += 1;
                report.uncovered_records += 1;
                report.last_seq = r.seq;
                report.head_hash = r.hash;
                progress(report.records);
            }
            Line::Checkpoint(cp) => {
                let seq = Some(cp.seq);
                if !cp.signature_is_valid(public_key) {
                    return Err(fail(seq, VerifyFailure::BadSignature));
                }
                if line_no == 1 {
                    // An anchor: the log continues from here.
                    report.last_seq = cp.seq;
                    report.head_hash.clone_from(&cp.head_hash);
                    report.anchor = Some(cp.clone());
                    if known.is_some_and(|k| k.seq == cp.seq) {
                        known_seen = known.is_some_and(|k| k.head_hash == cp.head_hash);
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
                report.last_checkpoint = Some(cp);
            }
        }
    }
    if let Some(k) = known {
        if !known_seen {
            let failure = if report.last_seq < k.seq {
                VerifyFailure::Truncated {
                    expected: k.seq,
                    last_seq: report.last_seq,
                }
            } else {
                // Before the anchor: this log cannot vouch for it.
                VerifyFailure::KnownCheckpointMismatch
            };
            return Err(VerifyError {
                line: line_no + 1,
                seq: None,
                failure,
            });
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::checkpoint::tests::test_signer;
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
                let checkpoint = signer.checkpoint(n, &head, time).unwrap();
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
        // An empty log is valid.
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
        let cp = other
            .checkpoint(6, &c6.checkpoint.head_hash, c6.checkpoint.time)
            .unwrap();
        forged[7] = serde_json::to_string(&CheckpointLine { checkpoint: cp }).unwrap();
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
        let (lines, _pk) = exported_log();
        let (_, other_pk) = test_signer();
        assert_eq!(
            fails_at(run(&lines, &other_pk), 4, 3),
            VerifyFailure::BadSignature
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
}
