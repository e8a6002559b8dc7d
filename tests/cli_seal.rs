//! Issue #19: `coffre seal` and `coffre open` with the real binary against
//! `coffre dev`: files and pipes, several frames, the sealed file holding
//! nothing of the plaintext, and a clear refusal (with nothing written) for
//! a wrong context, a truncated or tampered file, a file that is no sealed
//! message, a disabled key and a justification the policy refuses.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::common::binary::{COFFRE, run, run_json, run_with_stdin, start_dev};

/// A client command fed `stdin` (from a thread: the output may be large);
/// (success, stdout, stderr).
fn piped(dir: &Path, endpoint: &str, args: &[&str], stdin: Vec<u8>) -> (bool, Vec<u8>, String) {
    let out = run_with_stdin(
        Command::new(COFFRE)
            .args(args)
            .arg("--data-dir")
            .arg(dir)
            .args(["--endpoint", endpoint]),
        stdin,
    );
    (
        out.status.success(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The JSON error a refused `--json` command prints.
fn refusal(dir: &Path, endpoint: &str, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let (ok, stdout, stderr) = run(dir, endpoint, &all);
    assert!(!ok, "coffre {args:?} succeeded: {stdout}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout} {stderr}"))
}

/// 1 MiB and a bit of records a provider must not be able to read.
fn records() -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0u32;
    while out.len() < (1 << 20) + 12_345 {
        out.extend_from_slice(format!("customer-{i:07};IBAN FR76 3000 6000 {i:011}\n").as_bytes());
        i += 1;
    }
    out
}

#[test]
fn seal_and_open_files_and_pipes_and_refuse_what_they_must() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (_dev, endpoint) = start_dev(&data);
    let p = |name: &str| dir.path().join(name).display().to_string();
    run_json(&data, &endpoint, &["key", "create", "--alias", "files"]);

    let plain = records();
    std::fs::write(p("plain.txt"), &plain).unwrap();
    let sealed = run_json(
        &data,
        &endpoint,
        &[
            "seal",
            "--key",
            "files",
            "--context",
            "tenant=acme",
            "--in",
            &p("plain.txt"),
            "--out",
            &p("plain.cs"),
        ],
    );
    assert_eq!(sealed["plaintext_bytes"], plain.len() as u64);
    assert_eq!(sealed["context"]["tenant"], "acme");
    let message = std::fs::read(p("plain.cs")).unwrap();
    assert_eq!(sealed["sealed_bytes"], message.len() as u64);
    // What the provider's disk holds: nothing of the records.
    for needle in [&b"customer-"[..], b"IBAN", b"FR76"] {
        assert!(
            !message.windows(needle.len()).any(|w| w == needle),
            "{} in the sealed file",
            String::from_utf8_lossy(needle)
        );
    }
    let opened = run_json(
        &data,
        &endpoint,
        &[
            "open",
            "--in",
            &p("plain.cs"),
            "--out",
            &p("back.txt"),
            "--context",
            "tenant=acme",
        ],
    );
    assert_eq!(opened["plaintext_bytes"], plain.len() as u64);
    assert_eq!(std::fs::read(p("back.txt")).unwrap(), plain);

    // Pipes: seal from stdin to stdout, open from stdin to stdout.
    let (ok, piped_message, err) = piped(
        &data,
        &endpoint,
        &["seal", "--key", "files", "--context", "tenant=acme"],
        plain.clone(),
    );
    assert!(ok, "{err}");
    assert_ne!(piped_message, message, "a new data key and message id");
    let (ok, back, err) = piped(&data, &endpoint, &["open"], piped_message);
    assert!(ok, "{err}");
    assert_eq!(back, plain);

    // Refusals: a clear error, and no output file.
    let truncated = p("truncated.cs");
    std::fs::write(&truncated, &message[..message.len() - 100]).unwrap();
    let tampered = p("tampered.cs");
    let mut bad = message.clone();
    bad[200_000] ^= 0x20;
    std::fs::write(&tampered, &bad).unwrap();
    let out = p("never.txt");
    for (args, code, words) in [
        (
            vec![
                "open",
                "--in",
                &p("plain.cs"),
                "--out",
                &out,
                "--context",
                "tenant=globex",
            ],
            "INVALID_ARGUMENT",
            "the message's context is tenant=acme",
        ),
        (
            vec!["open", "--in", &truncated, "--out", &out],
            "DATA_LOSS",
            "not authentic",
        ),
        (
            vec!["open", "--in", &tampered, "--out", &out],
            "DATA_LOSS",
            "not authentic",
        ),
        (
            vec!["open", "--in", &p("plain.txt"), "--out", &out],
            "INVALID_ARGUMENT",
            "not a coffre sealed message",
        ),
        (
            vec![
                "open",
                "--in",
                &p("plain.cs"),
                "--out",
                &out,
                "--justification",
                "third-party-data-request",
            ],
            "PERMISSION_DENIED",
            "THIRD_PARTY_DATA_REQUEST",
        ),
        (
            vec![
                "seal",
                "--key",
                "nope",
                "--in",
                &p("plain.txt"),
                "--out",
                &out,
            ],
            "PERMISSION_DENIED",
            "does not exist or you are not allowed",
        ),
    ] {
        let e = refusal(&data, &endpoint, &args);
        assert_eq!(e["error"]["code"], code, "{args:?}: {e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains(words),
            "{args:?}: {e}"
        );
        assert!(!Path::new(&out).exists(), "{args:?} left {out}");
    }
    let e = refusal(
        &data,
        &endpoint,
        &["seal", "--key", "files", "--in", &p("plain.txt")],
    );
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--out FILE"),
        "{e}"
    );

    // The operator's kill switch, then its undoing.
    run_json(&data, &endpoint, &["key", "disable", "files"]);
    let e = refusal(
        &data,
        &endpoint,
        &["open", "--in", &p("plain.cs"), "--out", &out],
    );
    assert_eq!(e["error"]["code"], "FAILED_PRECONDITION", "{e}");
    assert!(!Path::new(&out).exists());
    run_json(&data, &endpoint, &["key", "enable", "files"]);
    run_json(
        &data,
        &endpoint,
        &["open", "--in", &p("plain.cs"), "--out", &out],
    );
    assert_eq!(std::fs::read(&out).unwrap(), plain);
    // Nothing but what the test named is left beside the files.
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "back.txt",
            "data",
            "never.txt",
            "plain.cs",
            "plain.txt",
            "tampered.cs",
            "truncated.cs"
        ]
    );
}
