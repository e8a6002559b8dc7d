//! The data commands of the CLI with the real binary against `coffre dev`
//! (issue #16): raw output through pipes, `coffre reencrypt`, the batch
//! forms over JSON lines, and the errors that say what to do.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::common::binary::{COFFRE, run, run_json, start_dev};

/// Runs a client command with `stdin` as its standard input, stdout and
/// stderr piped; returns (success, stdout bytes, stderr).
fn run_with_stdin(
    dir: &Path,
    endpoint: &str,
    args: &[&str],
    stdin: &[u8],
) -> (bool, Vec<u8>, String) {
    let mut child = Command::new(COFFRE)
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .args(["--endpoint", endpoint])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `coffre encrypt` of `secret` under `key` with `context`; the base64 blob.
fn encrypt(dir: &Path, endpoint: &str, key: &str, context: &str, secret: &[u8]) -> String {
    let (ok, out, err) = run_with_stdin(
        dir,
        endpoint,
        &[
            "encrypt",
            "--key",
            key,
            "--in",
            "-",
            "--context",
            context,
            "--json",
        ],
        secret,
    );
    assert!(ok, "encrypt: {err}");
    let v: Value = serde_json::from_slice(&out).unwrap();
    v["ciphertext_blob"].as_str().unwrap().to_string()
}

fn create_key(dir: &Path, endpoint: &str, alias: &str) -> String {
    let key = run_json(dir, endpoint, &["key", "create", "--alias", alias]);
    key["key_id"].as_str().unwrap().to_string()
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The JSON lines of a batch run's output.
fn json_lines(out: &[u8]) -> Vec<Value> {
    String::from_utf8(out.to_vec())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[test]
fn encrypt_and_decrypt_out_dash_print_only_the_raw_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (_server, endpoint) = start_dev(data);
    create_key(data, &endpoint, "demo");

    // echo -n x | coffre encrypt --key demo --in - --out - | coffre decrypt --in - --out -
    let (ok, blob, err) = run_with_stdin(
        data,
        &endpoint,
        &["encrypt", "--key", "demo", "--in", "-", "--out", "-"],
        b"x",
    );
    assert!(ok, "encrypt: {err}");
    assert!(blob.starts_with(b"CF"), "not a raw blob: {blob:?}");
    let (ok, plain, err) = run_with_stdin(
        data,
        &endpoint,
        &["decrypt", "--in", "-", "--out", "-"],
        &blob,
    );
    assert!(ok, "decrypt: {err}");
    assert_eq!(plain, b"x");

    // The same with --json: still nothing but the bytes on stdout.
    let (ok, blob2, err) = run_with_stdin(
        data,
        &endpoint,
        &[
            "encrypt", "--key", "demo", "--in", "-", "--out", "-", "--json",
        ],
        b"y",
    );
    assert!(ok, "encrypt --json: {err}");
    let (ok, plain, err) = run_with_stdin(
        data,
        &endpoint,
        &["decrypt", "--in", "-", "--out", "-", "--json"],
        &blob2,
    );
    assert!(ok, "decrypt --json: {err}");
    assert_eq!(plain, b"y");
}

#[test]
fn reencrypt_moves_a_blob_to_another_key_and_context() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (_server, endpoint) = start_dev(data);
    let demo = create_key(data, &endpoint, "demo");
    let billing = create_key(data, &endpoint, "billing");
    let blob = encrypt(data, &endpoint, "demo", "tenant=acme", b"secret");

    let moved = run_json(
        data,
        &endpoint,
        &[
            "reencrypt",
            "--blob",
            &blob,
            "--context",
            "tenant=acme",
            "--to",
            "billing",
            "--to-context",
            "tenant=beta",
        ],
    );
    assert_eq!(moved["key_id"], billing.as_str());
    assert_eq!(moved["source_key_id"], demo.as_str());
    let new_blob = moved["ciphertext_blob"].as_str().unwrap();
    // It opens under the new key and context…
    let opened = run_json(
        data,
        &endpoint,
        &[
            "decrypt",
            "--blob",
            new_blob,
            "--context",
            "tenant=beta",
            "--key",
            "billing",
        ],
    );
    assert_eq!(opened["plaintext"], b64(b"secret").as_str());
    assert_eq!(opened["key_id"], billing.as_str());
    // …not under the old context, nor as a blob of the old key.
    let (ok, _, _) = run(
        data,
        &endpoint,
        &["decrypt", "--blob", new_blob, "--context", "tenant=acme"],
    );
    assert!(!ok, "the old context still opens the new blob");
    let (ok, _, _) = run(
        data,
        &endpoint,
        &[
            "decrypt",
            "--blob",
            new_blob,
            "--context",
            "tenant=beta",
            "--key",
            "demo",
        ],
    );
    assert!(!ok, "the new blob still passes as demo's");

    // Without --to: the newest version of its own key, same context.
    run_json(data, &endpoint, &["key", "rotate", "demo"]);
    let forward = run_json(
        data,
        &endpoint,
        &["reencrypt", "--blob", &blob, "--context", "tenant=acme"],
    );
    assert_eq!(forward["key_id"], demo.as_str());
    assert_eq!(forward["key_version"], 2);
    assert_eq!(forward["source_key_version"], 1);
    let opened = run_json(
        data,
        &endpoint,
        &[
            "decrypt",
            "--blob",
            forward["ciphertext_blob"].as_str().unwrap(),
            "--context",
            "tenant=acme",
        ],
    );
    assert_eq!(opened["key_version"], 2);
    assert_eq!(opened["plaintext"], b64(b"secret").as_str());

    // --out -: the raw new blob only, which decrypt --in - opens.
    let (ok, raw, err) = run_with_stdin(
        data,
        &endpoint,
        &[
            "reencrypt",
            "--blob",
            &blob,
            "--context",
            "tenant=acme",
            "--out",
            "-",
        ],
        b"",
    );
    assert!(ok, "reencrypt --out -: {err}");
    let (ok, plain, err) = run_with_stdin(
        data,
        &endpoint,
        &[
            "decrypt",
            "--in",
            "-",
            "--out",
            "-",
            "--context",
            "tenant=acme",
        ],
        &raw,
    );
    assert!(ok, "decrypt of the re-encrypted raw blob: {err}");
    assert_eq!(plain, b"secret");
}

#[test]
fn batch_decrypt_gives_one_result_per_line_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (_server, endpoint) = start_dev(data);
    let demo = create_key(data, &endpoint, "demo");
    let one = encrypt(data, &endpoint, "demo", "tenant=acme", b"one");
    let two = encrypt(data, &endpoint, "demo", "tenant=beta", b"two");
    let input = format!(
        "{{\"blob\": \"{one}\"}}\n\
         \n\
         {{\"blob\": \"{two}\", \"context\": {{\"tenant\": \"beta\"}}}}\n\
         {{\"blob\": \"not-base64!\"}}\n\
         {{\"blob\": \"{two}\"}}\n\
         {{\"blob\": \"{one}\", \"key\": \"demo\"}}\n"
    );
    // Piped stderr: no progress line.
    let (ok, out, err) = run_with_stdin(
        data,
        &endpoint,
        &["decrypt", "--batch", "-", "--context", "tenant=acme"],
        input.as_bytes(),
    );
    assert!(!ok, "a failed line must fail the run");
    let lines = json_lines(&out);
    let numbers: Vec<u64> = lines.iter().map(|l| l["line"].as_u64().unwrap()).collect();
    assert_eq!(numbers, [1, 3, 4, 5, 6], "{lines:?}");
    assert_eq!(lines[0]["ok"], true);
    assert_eq!(lines[0]["plaintext"], b64(b"one").as_str());
    assert_eq!(lines[0]["key_id"], demo.as_str());
    assert_eq!(lines[1]["plaintext"], b64(b"two").as_str());
    assert_eq!(lines[2]["ok"], false);
    assert_eq!(lines[2]["error"]["code"], "INVALID_ARGUMENT");
    let msg = lines[2]["error"]["message"].as_str().unwrap();
    assert!(msg.contains("standard base64 alphabet"), "{msg}");
    // A wrong context (the default, tenant=acme): the server's answer, and
    // the hint naming the blob's key.
    assert_eq!(lines[3]["ok"], false);
    assert_eq!(lines[3]["error"]["code"], "INVALID_ARGUMENT");
    let hint = lines[3]["error"]["hint"].as_str().unwrap();
    assert!(
        hint.contains(&demo) && hint.contains("must match exactly"),
        "{hint}"
    );
    assert_eq!(lines[4]["plaintext"], b64(b"one").as_str());
    assert!(err.contains("3 of 5 line(s) decrypted, 2 failed"), "{err}");
    assert!(
        !err.contains('\r') && !err.contains('['),
        "a progress bar went to a pipe: {err:?}"
    );

    // A request refused as a whole (an operator may not decrypt): every
    // line gets its error, in order.
    let (ok, out, _) = run_with_stdin(
        data,
        &endpoint,
        &[
            "decrypt",
            "--batch",
            "-",
            "--context",
            "tenant=acme",
            "--as",
            "operator",
        ],
        input.as_bytes(),
    );
    assert!(!ok);
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 5);
    assert_eq!(lines[0]["error"]["code"], "PERMISSION_DENIED", "{lines:?}");
    assert_eq!(lines[2]["error"]["code"], "INVALID_ARGUMENT", "{lines:?}");
    assert_eq!(lines[4]["error"]["code"], "PERMISSION_DENIED", "{lines:?}");

    // A file, to --out: the same results; all good lines: exit 0.
    let input_file = data.join("good.jsonl");
    std::fs::write(
        &input_file,
        format!("{{\"blob\": \"{one}\"}}\n{{\"blob\": \"{two}\", \"context\": {{\"tenant\": \"beta\"}}}}\n"),
    )
    .unwrap();
    let out_file = data.join("out.jsonl");
    let (ok, stdout, err) = run(
        data,
        &endpoint,
        &[
            "decrypt",
            "--batch",
            input_file.to_str().unwrap(),
            "--out",
            out_file.to_str().unwrap(),
            "--context",
            "tenant=acme",
        ],
    );
    assert!(ok, "{err}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(err.contains("2 of 2 line(s) decrypted, 0 failed"), "{err}");
    let lines = json_lines(&std::fs::read(&out_file).unwrap());
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["plaintext"], b64(b"two").as_str());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&out_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "plaintexts readable by others: {mode:o}");
    }
}

#[test]
fn batch_reencrypt_moves_every_good_line_and_reports_the_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (_server, endpoint) = start_dev(data);
    let demo = create_key(data, &endpoint, "demo");
    let billing = create_key(data, &endpoint, "billing");
    let blobs: Vec<String> = (0..20)
        .map(|i| {
            encrypt(
                data,
                &endpoint,
                "demo",
                "tenant=acme",
                format!("s{i}").as_bytes(),
            )
        })
        .collect();
    // 20 good lines with a bad one (wrong context) at line 7, more than
    // the requests in flight, so that order must be restored.
    let mut input = String::new();
    for (i, b) in blobs.iter().enumerate() {
        if i == 6 {
            input.push_str(&format!(
                "{{\"blob\": \"{b}\", \"context\": {{\"tenant\": \"nope\"}}}}\n"
            ));
        } else {
            input.push_str(&format!("{{\"blob\": \"{b}\"}}\n"));
        }
    }
    input.push_str("{\"blob\": \"x\", \"contxt\": {}}\n");
    let (ok, out, err) = run_with_stdin(
        data,
        &endpoint,
        &[
            "reencrypt",
            "--batch",
            "-",
            "--context",
            "tenant=acme",
            "--to",
            "billing",
            "--to-context",
            "tenant=beta",
        ],
        input.as_bytes(),
    );
    assert!(!ok, "failed lines must fail the run");
    assert!(
        err.contains("19 of 21 line(s) re-encrypted, 2 failed"),
        "{err}"
    );
    assert!(
        !err.contains('\r'),
        "a progress bar went to a pipe: {err:?}"
    );
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 21);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["line"], i + 1, "order: {line}");
        if i == 6 {
            assert_eq!(line["ok"], false);
            assert_eq!(line["error"]["code"], "INVALID_ARGUMENT");
            assert!(
                line["error"]["hint"].as_str().unwrap().contains(&demo),
                "{line}"
            );
            continue;
        }
        if i == 20 {
            assert_eq!(line["ok"], false);
            let msg = line["error"]["message"].as_str().unwrap();
            assert!(msg.contains("unknown field `contxt`"), "{msg}");
            continue;
        }
        assert_eq!(line["ok"], true, "{line}");
        assert_eq!(line["key_id"], billing.as_str());
        assert_eq!(line["source_key_id"], demo.as_str());
        // The new blob opens under billing and the new context only.
        if i == 0 || i == 19 {
            let opened = run_json(
                data,
                &endpoint,
                &[
                    "decrypt",
                    "--blob",
                    line["ciphertext_blob"].as_str().unwrap(),
                    "--context",
                    "tenant=beta",
                ],
            );
            assert_eq!(
                opened["plaintext"],
                b64(format!("s{i}").as_bytes()).as_str()
            );
            assert_eq!(opened["key_id"], billing.as_str());
        }
    }
}

#[test]
fn decrypt_errors_name_the_blob_s_key_and_the_context_rule() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (_server, endpoint) = start_dev(data);
    let demo = create_key(data, &endpoint, "demo");
    create_key(data, &endpoint, "billing");
    let blob = encrypt(data, &endpoint, "demo", "tenant=acme", b"secret");

    // The blob of demo, said to be billing's.
    let (ok, _, err) = run(
        data,
        &endpoint,
        &[
            "decrypt",
            "--blob",
            &blob,
            "--key",
            "billing",
            "--context",
            "tenant=acme",
        ],
    );
    assert!(!ok);
    assert!(
        err.contains(&format!("the blob belongs to key {demo} (alias \"demo\")")),
        "{err}"
    );
    assert!(err.contains("not to --key billing"), "{err}");

    // A wrong context: the reminder that it must match exactly.
    let (ok, _, err) = run(
        data,
        &endpoint,
        &["decrypt", "--blob", &blob, "--context", "tenant=other"],
    );
    assert!(!ok);
    assert!(
        err.contains("the encryption context must match exactly, key by key"),
        "{err}"
    );
    assert!(err.contains("given: tenant=other"), "{err}");
    assert!(err.contains(&demo), "{err}");
}

#[test]
fn base64_errors_name_the_expected_form() {
    let dir = tempfile::tempdir().unwrap();
    // No server needed: the blob is refused before any connection.
    for cmd in ["decrypt", "reencrypt"] {
        let (ok, _, err) = run(
            dir.path(),
            "https://127.0.0.1:1",
            &[cmd, "--blob", "Q0YB-AQ_", "--context", "a=b"],
        );
        assert!(!ok);
        assert!(
            err.contains("standard base64 alphabet (A-Z a-z 0-9 + /) with `=` padding"),
            "{cmd}: {err}"
        );
        assert!(err.contains("character 5 is '-'"), "{cmd}: {err}");
        assert!(!err.contains("Invalid symbol"), "{cmd}: {err}");
        assert!(!err.contains("45"), "{cmd}: an ASCII code: {err}");
    }
}

#[test]
fn data_commands_help_reads_well() {
    let help = |args: &[&str]| {
        let out = Command::new(COFFRE).args(args).output().unwrap();
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // `encrypt --key` has a help line.
    let (out, _) = help(&["encrypt", "--help"]);
    let key_line = out
        .lines()
        .find(|l| l.trim_start().starts_with("--key <KEY>"))
        .unwrap();
    assert!(
        key_line.contains("UUID") && key_line.contains("alias"),
        "{key_line}"
    );
    // `datakey generate`: --context is optional in the usage line.
    let (out, _) = help(&["datakey", "generate", "--help"]);
    let usage = out.lines().find(|l| l.starts_with("Usage:")).unwrap();
    assert!(!usage.contains("--context"), "{usage}");
    assert!(out.contains("--context <KEY=VALUE>"), "{out}");
    // --batch prints JSON lines: --json is refused rather than mixed in.
    let (_, err) = help(&["decrypt", "--batch", "-", "--json"]);
    assert!(err.contains("cannot be used with"), "{err}");
    // decrypt and reencrypt name their three sources in the usage.
    for cmd in ["decrypt", "reencrypt"] {
        let (_, err) = help(&[cmd]);
        assert!(
            err.contains("<--blob <BASE64>|--in <FILE>|--batch <FILE>>"),
            "{cmd}: {err}"
        );
    }
}
