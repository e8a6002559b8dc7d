//! Issue #19, item 4: the Python client (`clients/python`, package
//! `coffre_client`) against the real binary, `coffre dev` and the `coffre`
//! CLI: a file sealed by `coffre seal` opens with `python -m coffre_client
//! open` and one sealed by Python opens with `coffre open`, byte for byte,
//! from empty to several MiB, through files and pipes, the context
//! asserted; a disabled key refuses Python's open with the typed error, a
//! non-zero exit and a clear message; a tampered Python-sealed file fails
//! in both; and the package's own unittest suite passes.
//!
//! Environment-sensitive: needs a python that has the package installed
//! (`COFFRE_CLIENT_PYTHON`, else `python3`); ignored (not run) without it
//! unless `COFFRE_REQUIRE_PYTHON_CLIENT=1` (`build/needs.rs`; `.ci/run`
//! installs it in a virtual environment). The installed package must be
//! this checkout's `clients/python`, file for file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use crate::common::binary::{COFFRE, run, run_json, run_with_stdin, start_dev};
use crate::common::{self, needs};

/// The python with coffre_client (`COFFRE_CLIENT_PYTHON`, else `python3`).
fn python() -> String {
    std::env::var("COFFRE_CLIENT_PYTHON")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "python3".to_string())
}

/// The package's source in this checkout.
fn source_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/python")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Fails unless the python's coffre_client is this checkout's source, file
/// for file (not a stale install): run from `cwd`, outside the source tree.
fn assert_installed_package_is_the_source(cwd: &Path) {
    let out = Command::new(python())
        .args([
            "-c",
            "import os, coffre_client; print(os.path.dirname(os.path.abspath(coffre_client.__file__)))",
        ])
        .current_dir(cwd)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let installed = PathBuf::from(text(&out.stdout).trim());
    let source = source_dir().join("coffre_client");
    let mut stack = vec![source.clone()];
    let mut compared = 0;
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "__pycache__") {
                    stack.push(path);
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != "py") {
                continue;
            }
            let relative = path.strip_prefix(&source).unwrap();
            let theirs = std::fs::read(installed.join(relative)).unwrap_or_default();
            assert!(
                theirs == std::fs::read(&path).unwrap(),
                "{} differs from the installed {} ({}): reinstall the package under test: \
                 {} -m pip install --force-reinstall --no-deps {}",
                path.display(),
                installed.join(relative).display(),
                python(),
                python(),
                source_dir().display()
            );
            compared += 1;
        }
    }
    assert!(
        compared >= 8,
        "only {compared} files compared in {}",
        source.display()
    );
}

/// A coffre dev, its data directory and the directory the files go in.
struct Setup {
    dir: PathBuf,
    data: PathBuf,
    endpoint: String,
}

impl Setup {
    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// `python -m coffre_client ARGS --data-dir DATA --endpoint E`, from
    /// the test's directory (the installed package, never the source's).
    fn py(&self, args: &[&str]) -> Output {
        Command::new(python())
            .args(["-m", "coffre_client"])
            .args(args)
            .arg("--data-dir")
            .arg(&self.data)
            .args(["--endpoint", &self.endpoint])
            .current_dir(&self.dir)
            .env_remove("COFFRE_ENDPOINT")
            .env_remove("COFFRE_DATA_DIR")
            .output()
            .unwrap()
    }

    /// The same reaching coffre through `COFFRE_ENDPOINT` and
    /// `COFFRE_DATA_DIR`, as `coffre` does.
    fn py_env(&self, args: &[&str]) -> Output {
        Command::new(python())
            .args(["-m", "coffre_client"])
            .args(args)
            .current_dir(&self.dir)
            .env("COFFRE_ENDPOINT", &self.endpoint)
            .env("COFFRE_DATA_DIR", &self.data)
            .output()
            .unwrap()
    }

    /// [`Setup::py`] with `--json`, which must succeed; its summary.
    fn py_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.py(&all);
        assert!(
            out.status.success(),
            "python -m coffre_client {args:?} failed: {}",
            text(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(&out.stdout)))
    }

    /// [`Setup::py`] with `--json`, which must fail (exit status 1): its
    /// error object and standard error.
    fn py_refused(&self, args: &[&str]) -> (Value, String) {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.py(&all);
        assert_eq!(
            out.status.code(),
            Some(1),
            "python -m coffre_client {args:?}: {} {}",
            text(&out.stdout),
            text(&out.stderr)
        );
        let e: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(&out.stdout)));
        (e["error"].clone(), text(&out.stderr))
    }

    /// `coffre ARGS --json`, which must fail: its error object.
    fn coffre_refused(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let (ok, stdout, stderr) = run(&self.data, &self.endpoint, &all);
        assert!(!ok, "coffre {args:?} succeeded: {stdout}");
        let e: Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {stdout} {stderr}"));
        e["error"].clone()
    }
}

/// `n` bytes that do not compress and differ with `seed`.
fn data(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The frame length both clients seal with by default.
const FRAME: usize = 64 * 1024;

/// The length of a message's header, from its context and blob lengths.
fn header_len(message: &[u8]) -> usize {
    let context_len = u32::from_be_bytes(message[40..44].try_into().unwrap()) as usize;
    let blob_at = 44 + context_len;
    let blob_len = u16::from_be_bytes(message[blob_at..blob_at + 2].try_into().unwrap()) as usize;
    blob_at + 2 + blob_len + 32 + 16
}

#[test]
#[cfg_attr(
    not(coffre_has_python_client),
    ignore = "not run: needs Python with the coffre_client package (COFFRE_CLIENT_PYTHON; .ci/run installs it)"
)]
fn python_and_rust_open_what_the_other_sealed_and_refuse_the_same() {
    common::require(&needs::PYTHON_CLIENT);
    let dir = tempfile::tempdir().unwrap();
    assert_installed_package_is_the_source(dir.path());
    let data_dir = dir.path().join("data");
    let (_dev, endpoint) = start_dev(&data_dir);
    let s = Setup {
        dir: dir.path().to_path_buf(),
        data: data_dir,
        endpoint,
    };
    let created = run_json(
        &s.data,
        &s.endpoint,
        &["key", "create", "--alias", "interop"],
    );
    let key_id = created["key_id"]
        .as_str()
        .or_else(|| created["key"]["key_id"].as_str())
        .unwrap_or_else(|| panic!("no key id in {created}"))
        .to_string();

    let sizes = [
        ("empty", 0),
        ("one-byte", 1),
        ("two-full-frames", 2 * FRAME),
        ("several-frames", 3 * FRAME + 17),
        ("multi-mib", 5 * 1024 * 1024 + 123),
    ];
    for (i, (name, n)) in sizes.into_iter().enumerate() {
        let plain = data(n, i as u64 + 1);
        let plain_path = s.path(&format!("{name}.bin"));
        std::fs::write(&plain_path, &plain).unwrap();
        let object = format!("object={name}");
        let ctx = ["--context", "tenant=acme", "--context", &object];

        // (a) Sealed by `coffre seal`, opened by Python (reaching coffre
        // through COFFRE_ENDPOINT and COFFRE_DATA_DIR), the context asserted.
        let rs_sealed = s.path(&format!("{name}.rs.cs"));
        let sealed = run_json(
            &s.data,
            &s.endpoint,
            &[
                &[
                    "seal",
                    "--key",
                    "interop",
                    "--in",
                    &plain_path,
                    "--out",
                    &rs_sealed,
                ][..],
                &ctx,
            ]
            .concat(),
        );
        assert_eq!(sealed["plaintext_bytes"], n as u64, "{name}");
        let py_out = s.path(&format!("{name}.py.out"));
        let out = s.py_env(
            &[
                &["open", "--in", &rs_sealed, "--out", &py_out, "--json"][..],
                &ctx,
            ]
            .concat(),
        );
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));
        let opened: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(opened["plaintext_bytes"], n as u64, "{name}");
        assert_eq!(opened["context"]["tenant"], "acme", "{name}");
        assert_eq!(opened["context"]["object"], name, "{name}");
        assert!(
            std::fs::read(&py_out).unwrap() == plain,
            "{name}: Python opened other bytes"
        );

        // (b) Sealed by Python, opened by `coffre open` with its context
        // asserted: the same bytes, the same message size as Rust's.
        let py_sealed = s.path(&format!("{name}.py.cs"));
        let summary = s.py_json(
            &[
                &[
                    "seal",
                    "--key",
                    "interop",
                    "--in",
                    &plain_path,
                    "--out",
                    &py_sealed,
                ][..],
                &ctx,
            ]
            .concat(),
        );
        assert_eq!(summary["key_id"], key_id.as_str(), "{summary}");
        assert_eq!(summary["plaintext_bytes"], n as u64);
        let message = std::fs::read(&py_sealed).unwrap();
        assert_eq!(summary["sealed_bytes"], message.len() as u64);
        assert_eq!(&message[..4], b"CS\x01\x01");
        assert_eq!(
            &message[36..40],
            &65_536u32.to_be_bytes(),
            "the default frame length"
        );
        let frames = n.div_ceil(FRAME).max(1);
        assert_eq!(
            message.len(),
            header_len(&message) + n + 16 * frames,
            "{name}"
        );
        assert_eq!(
            message.len() as u64,
            std::fs::metadata(&rs_sealed).unwrap().len(),
            "{name}: Python's message is not the size of Rust's"
        );
        let rs_out = s.path(&format!("{name}.rs.out"));
        let back = run_json(
            &s.data,
            &s.endpoint,
            &[&["open", "--in", &py_sealed, "--out", &rs_out][..], &ctx].concat(),
        );
        assert_eq!(back["plaintext_bytes"], n as u64);
        assert_eq!(back["context"]["tenant"], "acme");
        assert_eq!(back["context"]["object"], name);
        assert!(
            std::fs::read(&rs_out).unwrap() == plain,
            "{name}: coffre opened other bytes"
        );
        // Another context asserted: both refuse, nothing written.
        let never = s.path("never.out");
        let e = s.coffre_refused(&[
            "open",
            "--in",
            &py_sealed,
            "--out",
            &never,
            "--context",
            "tenant=globex",
        ]);
        assert_eq!(e["code"], "INVALID_ARGUMENT", "{e}");
        let (e, _) = s.py_refused(&[
            "open",
            "--in",
            &rs_sealed,
            "--out",
            &never,
            "--context",
            "tenant=globex",
        ]);
        assert_eq!(e["code"], "INVALID_ARGUMENT", "{e}");
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .contains("the message's context is object="),
            "{e}"
        );
        assert!(!Path::new(&never).exists());
    }

    // Pipes: Python seals standard input to standard output, `coffre open`
    // reads it from standard input; and the other way round.
    let plain = data(3 * FRAME + 5, 99);
    let sealed = pipe(
        Command::new(python())
            .args(["-m", "coffre_client", "seal", "--key", "interop"])
            .args(["--context", "tenant=acme", "--data-dir"])
            .arg(&s.data)
            .args(["--endpoint", &s.endpoint])
            .current_dir(&s.dir),
        plain.clone(),
    );
    let opened = pipe(
        Command::new(COFFRE)
            .args(["open", "--context", "tenant=acme", "--data-dir"])
            .arg(&s.data)
            .args(["--endpoint", &s.endpoint]),
        sealed,
    );
    assert!(
        opened == plain,
        "a piped Python message did not open to its plaintext"
    );
    let sealed = pipe(
        Command::new(COFFRE)
            .args(["seal", "--key", "interop", "--data-dir"])
            .arg(&s.data)
            .args(["--endpoint", &s.endpoint]),
        plain.clone(),
    );
    let opened = pipe(
        Command::new(python())
            .args(["-m", "coffre_client", "open", "--data-dir"])
            .arg(&s.data)
            .args(["--endpoint", &s.endpoint])
            .current_dir(&s.dir),
        sealed,
    );
    assert!(
        opened == plain,
        "a piped Rust message did not open in Python"
    );

    // (d) A Python-sealed file tampered with (a frame's byte, the
    // commitment, one byte cut off the end, a frame dropped) fails in both,
    // with DATA_LOSS and no output; the Rust-sealed one as well in Python.
    let message = std::fs::read(s.path("several-frames.py.cs")).unwrap();
    let hlen = header_len(&message);
    let mut flipped = message.clone();
    flipped[hlen + FRAME + 1000] ^= 0x04;
    let mut commitment = message.clone();
    commitment[hlen - 16 - 7] ^= 0x80;
    let cut = message[..message.len() - 1].to_vec();
    let dropped = [&message[..hlen], &message[hlen + FRAME + 16..]].concat();
    let mut rust_flipped = std::fs::read(s.path("multi-mib.rs.cs")).unwrap();
    let at = rust_flipped.len() / 2;
    rust_flipped[at] ^= 0x01;
    let never = s.path("never.out");
    for (what, bytes, in_rust) in [
        ("a frame byte flipped", flipped, true),
        ("the commitment flipped", commitment, true),
        ("one byte cut off", cut, true),
        ("a frame dropped", dropped, true),
        ("a Rust-sealed file flipped", rust_flipped, false),
    ] {
        let path = s.path("tampered.cs");
        std::fs::write(&path, &bytes).unwrap();
        if in_rust {
            let e = s.coffre_refused(&["open", "--in", &path, "--out", &never]);
            assert_eq!(e["code"], "DATA_LOSS", "coffre open, {what}: {e}");
            assert!(
                e["message"].as_str().unwrap().contains("not authentic"),
                "{e}"
            );
        }
        let (e, stderr) = s.py_refused(&["open", "--in", &path, "--out", &never]);
        assert_eq!(e["code"], "DATA_LOSS", "python open, {what}: {e}");
        assert!(
            e["message"].as_str().unwrap().contains("not authentic"),
            "{e}"
        );
        assert!(
            stderr.starts_with("error: the sealed message is not authentic"),
            "{stderr}"
        );
        assert!(!Path::new(&never).exists(), "{what} left {never}");
    }
    // No temporary file of either left beside the outputs.
    let leftovers: Vec<String> = std::fs::read_dir(&s.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // (c) The operator's kill switch: Python's open fails with the typed
    // error (the API's KeyDisabledError, a KeyUnusableError), exit status
    // 1 and a clear message naming the key, its state and the request id.
    run_json(&s.data, &s.endpoint, &["key", "disable", "interop"]);
    let rs_sealed = s.path("one-byte.rs.cs");
    let (e, stderr) = s.py_refused(&["open", "--in", &rs_sealed, "--out", &never]);
    assert_eq!(e["code"], "FAILED_PRECONDITION", "{e}");
    assert_eq!(e["message"], format!("key {key_id} is DISABLED"), "{e}");
    let request_id = e["request_id"].as_str().unwrap_or_default();
    assert!(!request_id.is_empty(), "{e}");
    // One line says it (whatever gRPC's own logging adds around it).
    let said: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(
        said,
        [format!(
            "error: failed precondition: key {key_id} is DISABLED (request id {request_id})"
        )],
        "{stderr}"
    );
    assert!(!Path::new(&never).exists());
    let out = s.py(&["open", "--in", &rs_sealed, "--out", &never]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).is_empty(), "{}", text(&out.stdout));
    let (e, _) = s.py_refused(&[
        "seal", "--key", "interop", "--in", &rs_sealed, "--out", &never,
    ]);
    assert_eq!(e["code"], "FAILED_PRECONDITION", "{e}");
    let api = Command::new(python())
        .args(["-c", DISABLED_BY_THE_API])
        .arg(&s.data)
        .arg(&s.endpoint)
        .arg(&rs_sealed)
        .current_dir(&s.dir)
        .output()
        .unwrap();
    assert_eq!(
        api.status.code(),
        Some(3),
        "{} {}",
        text(&api.stdout),
        text(&api.stderr)
    );
    let said = text(&api.stdout);
    assert!(
        said.starts_with(&format!(
            "KeyDisabledError DISABLED FAILED_PRECONDITION: the key cannot be used now: key \
             {key_id} is DISABLED (request id "
        )),
        "{said}"
    );
    // And the undoing.
    run_json(&s.data, &s.endpoint, &["key", "enable", "interop"]);
    let again = s.path("again.out");
    s.py_json(&["open", "--in", &rs_sealed, "--out", &again]);
    assert_eq!(std::fs::read(&again).unwrap(), data(1, 2));
}

/// The API's view of a disabled key (argv: data dir, endpoint, message):
/// prints the error's class, state and code, exits 3.
const DISABLED_BY_THE_API: &str = r#"
import io, sys
import coffre_client as cc
data, endpoint, path = sys.argv[1:4]
with cc.Client.from_data_dir(data, endpoint) as client, open(path, "rb") as f:
    try:
        cc.open(client, f, io.BytesIO())
    except cc.KeyDisabledError as e:
        assert isinstance(e, cc.KeyUnusableError) and isinstance(e, cc.ClientError), type(e)
        assert e.request_id, e
        print(type(e).__name__, e.key_state, f"{e.code}:", e)
        sys.exit(3)
print("opened a message under a disabled key")
"#;

/// Runs `cmd` with `stdin` fed from a thread; its standard output, which
/// it must succeed with.
fn pipe(cmd: &mut Command, stdin: Vec<u8>) -> Vec<u8> {
    let out = run_with_stdin(cmd, stdin);
    assert!(out.status.success(), "{cmd:?}: {}", text(&out.stderr));
    out.stdout
}

/// (e) `clients/python/tests`, standard-library unittest, on the
/// installed package: golden messages, the tamper matrix, frame boundaries,
/// the RPCs' requests and errors, the CLI.
#[test]
#[cfg_attr(
    not(coffre_has_python_client),
    ignore = "not run: needs Python with the coffre_client package (COFFRE_CLIENT_PYTHON; .ci/run installs it)"
)]
fn the_python_packages_unittest_suite_passes() {
    common::require(&needs::PYTHON_CLIENT);
    let tests = source_dir().join("tests");
    assert_installed_package_is_the_source(&tests);
    // From the tests' directory: `coffre_client` is the installed one.
    let out = Command::new(python())
        .args(["-m", "unittest", "discover", "-v", "-s"])
        .arg(&tests)
        .arg("-t")
        .arg(&tests)
        .current_dir(&tests)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap();
    let report = text(&out.stderr);
    println!("{report}");
    assert!(
        out.status.success(),
        "the Python unittest suite failed:\n{report}"
    );
    let ran: usize = report
        .lines()
        .find_map(|l| {
            l.strip_prefix("Ran ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no \"Ran N tests\" line:\n{report}"));
    assert!(ran >= 40, "only {ran} Python tests ran:\n{report}");
    assert!(
        report.lines().any(|l| l == "OK" || l.starts_with("OK (")),
        "{report}"
    );
}
