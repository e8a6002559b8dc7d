//! `coffre audit verify`: offline verification of an exported audit log.
//! It needs no server: only the file and the audit public key.

use std::fs::File;
use std::io::{BufReader, IsTerminal};

use anyhow::{Context, bail};
use serde_json::json;

use super::AuditCommand;
use crate::audit::chain::public_key_from_pem;
use crate::audit::verify;

pub fn run(cmd: AuditCommand) -> anyhow::Result<()> {
    match cmd {
        AuditCommand::Verify {
            file,
            public_key,
            json,
        } => {
            let pem = std::fs::read_to_string(&public_key)
                .with_context(|| format!("reading {}", public_key.display()))?;
            let key = public_key_from_pem(&pem).with_context(|| {
                format!(
                    "{} is not an Ed25519 public key (PEM)",
                    public_key.display()
                )
            })?;
            let total = std::fs::metadata(&file)
                .with_context(|| format!("reading {}", file.display()))?
                .len();
            let reader = BufReader::new(
                File::open(&file).with_context(|| format!("opening {}", file.display()))?,
            );
            // Progress on a terminal, every 50,000 records.
            let tty = !json && std::io::stderr().is_terminal();
            let progress = |n: u64| {
                if tty && n % 50_000 == 0 {
                    eprint!("\rverified {n} records of a {total}-byte log…");
                }
            };
            let outcome = verify(reader, &key, progress);
            if tty {
                eprintln!();
            }
            match outcome {
                Ok(report) => {
                    let covered = report.last_checkpoint.as_ref().map_or(0, |c| c.seq);
                    let uncovered = report.last_seq.saturating_sub(covered);
                    if json {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&json!({
                                "valid": true,
                                "records": report.records,
                                "checkpoints": report.checkpoints,
                                "last_seq": report.last_seq,
                                "head_hash": report.head_hash,
                                "last_checkpoint_seq": covered,
                                "records_after_last_checkpoint": uncovered,
                            }))?
                        );
                    } else {
                        println!(
                            "OK: {} records, {} checkpoints; chain head at seq {} ({})",
                            report.records, report.checkpoints, report.last_seq, report.head_hash
                        );
                        println!(
                            "the last signed checkpoint covers seq {covered}; {uncovered} later records are chained but not yet signed"
                        );
                    }
                    Ok(())
                }
                Err(e) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&json!({
                                "valid": false,
                                "line": e.line,
                                "seq": e.seq,
                                "failure": e.failure.to_string(),
                            }))?
                        );
                    }
                    let seq = e.seq.map(|s| format!(" (seq {s})")).unwrap_or_default();
                    bail!(
                        "the audit log does not verify: line {}{seq}: {}",
                        e.line,
                        e.failure
                    )
                }
            }
        }
    }
}
