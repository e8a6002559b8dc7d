//! Golden audit logs: every released format in `tests/data/` keeps verifying.
//!
//! `COFFRE_WRITE_AUDIT_GOLDEN=N` writes `tests/data/audit-vN.log` (and its
//! anchored copy and public key) with the *current* writer; run it once per
//! new format, then never again for that N (the files are frozen).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::checkpoint::CheckpointSigner;
use super::log::{AuditLog, AuditLogOptions, CheckpointPolicy, Durability};
use super::record::{AuditEntry, Outcome};
use crate::model::{ManualClock, Timestamp};

/// The golden logs' signing key seed (public: these logs prove nothing).
const SEED: [u8; 32] = [0x5a; 32];

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

fn entries() -> Vec<AuditEntry> {
    let key = "7f0c7d0e-2f5b-4d55-9f0a-4b8e8f1d2c3a";
    let base = |n: u32, op: &str| AuditEntry {
        request_id: format!("golden-{n}"),
        principal: "spiffe://coffre.dev/service".into(),
        role: Some("service".into()),
        operation: op.into(),
        key_id: Some(key.into()),
        key_version: Some(1),
        outcome: Outcome::Allowed,
        status_code: "OK".into(),
        ..AuditEntry::empty()
    };
    let mut out = Vec::new();
    let mut e = base(1, "CreateKey");
    e.principal = "spiffe://coffre.dev/operator".into();
    e.role = Some("operator".into());
    e.detail = Some("alias golden/key".into());
    out.push(e);
    let mut e = base(2, "GenerateDataKey");
    e.context_digest = Some("ab".repeat(32));
    e.justification = Some("CUSTOMER_INITIATED_ACCESS".into());
    e.context = Some([("tenant".to_string(), "acme \"quoted\" \u{e9}\t".to_string())].into());
    out.push(e);
    let mut e = base(3, "Decrypt");
    e.justification = Some("THIRD_PARTY_DATA_REQUEST".into());
    e.outcome = Outcome::Refused;
    e.status_code = "PERMISSION_DENIED".into();
    out.push(e);
    let mut e = base(4, "GetKey");
    e.principal = String::new();
    e.role = None;
    e.key_id = Some("golden/alias".into());
    e.key_version = None;
    e.outcome = Outcome::Refused;
    e.status_code = "UNAUTHENTICATED".into();
    out.push(e);
    let mut e = base(5, "Encrypt");
    e.outcome = Outcome::Failed;
    e.status_code = "UNAVAILABLE".into();
    out.push(e);
    for n in 6..=8 {
        out.push(base(n, "GenerateDataKey"));
    }
    out
}

/// The entries of the current format: v1's, and a record naming its key by
/// an alias (`key_name`, added in v2).
fn entries_v2() -> Vec<AuditEntry> {
    let mut out = entries();
    let mut e = out[2].clone();
    e.request_id = "golden-9".into();
    e.key_name = Some("golden/key".into());
    out.push(e);
    out
}

/// Writes the golden files of the current format as `audit-v{version}`.
fn write_golden(version: &str) {
    let dir = data_dir();
    let path = dir.join(format!("audit-v{version}.log"));
    let _ = std::fs::remove_file(&path);
    let clock = Arc::new(ManualClock::new(Timestamp(1_765_000_000_000)));
    let options = AuditLogOptions {
        durability: Durability::Write,
        checkpoints: CheckpointPolicy {
            every_records: 3,
            every: Duration::from_secs(3600),
        },
        clock: clock.clone(),
        ..AuditLogOptions::default()
    };
    let signer = CheckpointSigner::from_seed(&SEED).unwrap();
    std::fs::write(
        dir.join(format!("audit-v{version}-fixture-public-key.pem")),
        signer.public_key_pem(),
    )
    .unwrap();
    let mut log = AuditLog::open_with(&path, signer, options).unwrap();
    let entries = if version == "1" {
        entries()
    } else {
        entries_v2()
    };
    for e in entries {
        clock.advance(Duration::from_secs(1));
        log.append(e).unwrap();
    }
    log.checkpoint().unwrap();
    drop(log);
    // The anchored copy: the first checkpoint's records archived away.
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let first_cp = lines
        .iter()
        .position(|l| l.starts_with("{\"checkpoint\""))
        .unwrap();
    let anchored: String = lines[first_cp..].iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(dir.join(format!("audit-v{version}-anchored.log")), anchored).unwrap();
}

#[test]
fn write_golden_logs_when_asked() {
    if let Ok(version) = std::env::var("COFFRE_WRITE_AUDIT_GOLDEN") {
        write_golden(&version);
    }
}

fn verify_golden(name: &str) -> super::VerifyReport {
    let dir = data_dir();
    let version = name
        .trim_start_matches("audit-")
        .split(['-', '.'])
        .next()
        .unwrap();
    let pem = std::fs::read_to_string(dir.join(format!("audit-{version}-fixture-public-key.pem")))
        .unwrap();
    let key = super::public_key_from_pem(&pem).unwrap();
    let text = std::fs::read(dir.join(name)).unwrap();
    super::verify(&text[..], &key, |_| {}).unwrap()
}

#[test]
fn golden_logs_of_every_format_verify() {
    use super::verify::{Policy, PolicyFailure};
    let strict = Policy::default();
    let anchored = Policy {
        allow_anchored: true,
        ..strict
    };
    // Format v1 (before #15): no log identity.
    let v1 = verify_golden("audit-v1.log");
    assert_eq!((v1.records, v1.checkpoints, v1.v1_checkpoints), (8, 3, 3));
    assert_eq!(
        (v1.first_seq, v1.last_seq, v1.log_id.as_deref()),
        (Some(1), 8, None)
    );
    strict.check(&v1).unwrap();
    let v1a = verify_golden("audit-v1-anchored.log");
    assert_eq!(v1a.anchor.as_ref().map(|a| a.seq), Some(3));
    assert!(matches!(
        strict.check(&v1a),
        Err(PolicyFailure::Anchored { seq: 3, .. })
    ));
    anchored.check(&v1a).unwrap();
    // Format v2: checkpoints name the log and the key.
    let v2 = verify_golden("audit-v2.log");
    assert_eq!((v2.records, v2.checkpoints, v2.v1_checkpoints), (9, 3, 0));
    let id = v2.log_id.clone().unwrap();
    assert!(super::checkpoint::is_log_id(&id));
    strict.check(&v2).unwrap();
    let v2a = verify_golden("audit-v2-anchored.log");
    assert_eq!(v2a.log_id.as_deref(), Some(id.as_str()));
    anchored.check(&v2a).unwrap();
}
