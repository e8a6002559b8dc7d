//! The README, run as written. Every ```` ```sh ```` block of `README.md`,
//! in order, becomes one bash script run in a scratch directory that plays
//! the repository's root, with `./target/release/coffre` the binary under
//! test. A block the test cannot run (the commands that build coffre, a
//! production configuration) says so in the README, on the line before its
//! fence: `<!-- readme-test: skip: REASON -->`; every other block runs. A
//! block that needs something from the machine says so the same way,
//! `<!-- readme-test: needs: PostgreSQL -->`: those blocks run, in order,
//! as a script of their own in a test that needs it (NOT RUN without it).
//!
//! What the script does with the README's lines, and nothing more:
//! - `cargo run --release -- ARGS` is `coffre ARGS` (the binary is built);
//! - a `coffre dev …` line (terminal 1, or one ending in `&`) runs in the
//!   background, and the script waits for its banner before going on;
//!   `kill %%` (as the README says to stop it) stops it;
//! - a line whose comment begins `# refused:` or `# fails:` must exit
//!   non-zero and print the text after it (up to a `…`);
//! - the ports of the README (7443 to 7447, 8080, 8443, 9464) are ports free on this
//!   machine, so that the test runs beside others;
//! - at the end, the scratch directory must hold nothing but `target/`:
//!   the README cleans up after itself.

use std::path::Path;
use std::process::Command;

use crate::common::binary::{COFFRE, free_port};

/// A fenced `sh` block of the README.
#[derive(Debug)]
struct Block {
    /// 1-based line of its first command.
    line: usize,
    lines: Vec<String>,
    /// Why the test does not run it, from the README itself.
    skip: Option<String>,
    /// What the machine must have for it (`<!-- readme-test: needs: WHAT
    /// -->`): such blocks run apart, in a test that needs it.
    needs: Option<String>,
}

fn blocks(readme: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut previous = "";
    let mut current: Option<(Block, usize)> = None;
    for (n, raw) in readme.lines().enumerate() {
        let trimmed = raw.trim_start();
        if let Some((block, indent)) = &mut current {
            if trimmed.starts_with("```") {
                let (block, _) = current.take().unwrap();
                out.push(block);
            } else {
                let cut = raw.len().min(*indent);
                block.lines.push(raw.get(cut..).unwrap_or(raw).to_string());
            }
        } else if trimmed == "```sh" {
            let marker = |name: &str| {
                previous
                    .trim()
                    .strip_prefix(&format!("<!-- readme-test: {name}:"))
                    .and_then(|r| r.strip_suffix("-->"))
                    .map(|r| r.trim().to_string())
            };
            current = Some((
                Block {
                    line: n + 2,
                    lines: Vec::new(),
                    skip: marker("skip"),
                    needs: marker("needs"),
                },
                raw.len() - trimmed.len(),
            ));
        }
        if !raw.trim().is_empty() {
            previous = raw;
        }
    }
    assert!(current.is_none(), "README.md ends inside a code block");
    out
}

/// The README's ports, each mapped to one free here.
struct Ports(Vec<(&'static str, u16)>);

impl Ports {
    fn new() -> Self {
        Self(
            [
                "7443", "7444", "7445", "7446", "7447", "8080", "8443", "9464",
            ]
            .into_iter()
            .map(|p| (p, free_port()))
            .collect(),
        )
    }
    fn apply(&self, line: &str) -> String {
        let mut line = line.to_string();
        for (from, to) in &self.0 {
            line = line.replace(&format!(":{from}"), &format!(":{to}"));
        }
        line
    }
    fn of(&self, port: &str) -> u16 {
        self.0.iter().find(|(p, _)| *p == port).unwrap().1
    }
}

/// The terminator of a heredoc the line opens (`<<'WORD'`, `<<WORD`).
fn heredoc_end(line: &str) -> Option<String> {
    let rest = line
        .split("<<")
        .nth(1)?
        .trim_start_matches('-')
        .trim_start();
    let word: String = rest
        .trim_start_matches(['\'', '"'])
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    (!word.is_empty()).then_some(word)
}

fn single_quoted(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// One README command line as the script runs it.
fn translate(line: &str, n: usize, ports: &Ports) -> String {
    let line = ports.apply(line);
    let line = line.replace("cargo run --release -- ", "coffre ");
    let (command, comment) = match line.find(" # ") {
        Some(i) => (line[..i].trim_end(), line[i + 3..].trim()),
        None => (line.trim_end(), ""),
    };
    let marker = format!("__line={n}");
    if command.trim_start().starts_with('#') || command.trim().is_empty() {
        return line.to_string();
    }
    let expected = comment
        .strip_prefix("refused:")
        .or_else(|| comment.strip_prefix("fails:"));
    if let Some(expected) = expected {
        let expected = expected.split('…').next().unwrap_or("").trim();
        return format!(
            "{marker}; __refused {} {}",
            single_quoted(expected),
            command
        );
    }
    let words: Vec<&str> = command.split_whitespace().collect();
    if words.first() == Some(&"coffre") && words.get(1) == Some(&"dev") {
        let command = command.trim_end_matches('&').trim_end();
        return format!("{marker}; __dev {command}");
    }
    format!("{marker}; {command}")
}

/// The script's prologue: the helpers the translated lines call.
fn prologue() -> String {
    r#"set -euo pipefail
shopt -s expand_aliases
export PATH="$PWD/target/release:$PATH"
export NO_COLOR=1
__line=0
trap 'echo "README.md line $__line failed (exit $?)" >&2' ERR
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true' EXIT
# A coffre dev in the background; wait for its banner (or its exit).
__dev() {
  local log
  log=$(mktemp "${TMPDIR:-/tmp}/readme-dev.XXXXXX")
  "$@" >"$log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 600); do
    if grep -q '^coffre dev is running on ' "$log"; then return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "README.md line $__line: coffre dev exited:" >&2; cat "$log" >&2; return 1
    fi
    sleep 0.1
  done
  echo "README.md line $__line: coffre dev did not start in 60 s" >&2; cat "$log" >&2; return 1
}
# A command that must fail and say something.
__refused() {
  local want="$1"; shift
  local out
  if out=$("$@" 2>&1); then
    echo "README.md line $__line: succeeded, but the README says it is refused: $*" >&2
    echo "$out" >&2; return 1
  fi
  if [[ "$out" != *"$want"* ]]; then
    echo "README.md line $__line: expected «$want» in:" >&2; echo "$out" >&2; return 1
  fi
}
"#
    .to_string()
}

/// `target/release/coffre` in the scratch directory: the binary under test,
/// its default listen address and endpoint moved to the port that stands
/// for 7443.
fn install_binary(root: &Path, ports: &Ports) {
    let dir = root.join("target/release");
    std::fs::create_dir_all(&dir).unwrap();
    let port = ports.of("7443");
    let wrapper = format!(
        r#"#!/usr/bin/env bash
if [ "${{1:-}}" = dev ]; then
  case " $* " in *" --listen "*) ;; *) set -- "$@" --listen 127.0.0.1:{port} ;; esac
fi
export COFFRE_ENDPOINT="${{COFFRE_ENDPOINT:-https://127.0.0.1:{port}}}"
exec {bin} "$@"
"#,
        bin = single_quoted(COFFRE),
    );
    let path = dir.join("coffre");
    std::fs::write(&path, wrapper).unwrap();
    // The hosted-store example the README builds, as the tests built it.
    let store = dir.join("hosted-store");
    std::fs::write(
        &store,
        format!(
            "#!/usr/bin/env bash\nexec {} \"$@\"\n",
            single_quoted(
                &crate::common::binary::workspace_binary("hosted-store")
                    .display()
                    .to_string()
            )
        ),
    )
    .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for p in [&path, &store] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
}

/// Runs the README's blocks that `needs` selects (those without a `needs`
/// marker, or those with this one), in order, as one script in a scratch
/// directory, and checks that it succeeds and cleans up after itself.
/// Fails if fewer than `at_least` blocks ran.
fn run_readme(needs: Option<&str>, at_least: usize) {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let blocks = blocks(&readme);
    let ports = Ports::new();
    let mut script = prologue();
    let mut skipped = Vec::new();
    let mut ran = 0;
    for block in &blocks {
        if block.needs.as_deref() != needs {
            if let (None, Some(what)) = (needs, &block.needs) {
                skipped.push(format!(
                    "README.md:{}: needs {what}: run by its own test",
                    block.line
                ));
            }
            continue;
        }
        if let Some(why) = &block.skip {
            skipped.push(format!("README.md:{}: {why}", block.line));
            continue;
        }
        ran += 1;
        let mut pending = String::new();
        let mut start = block.line;
        let mut heredoc: Option<String> = None;
        for (i, line) in block.lines.iter().enumerate() {
            // A heredoc's body is copied as it is, up to its terminator.
            if let Some(end) = &heredoc {
                script.push_str(line);
                script.push('\n');
                if line.trim() == end {
                    heredoc = None;
                }
                continue;
            }
            if pending.is_empty() {
                start = block.line + i;
            }
            if let Some(stripped) = line.strip_suffix('\\') {
                pending.push_str(stripped);
                continue;
            }
            pending.push_str(line);
            heredoc = heredoc_end(&pending);
            script.push_str(&translate(&pending, start, &ports));
            script.push('\n');
            pending.clear();
        }
        assert!(pending.is_empty(), "README.md:{start}: a line ends in \\");
        assert!(
            heredoc.is_none(),
            "README.md:{start}: a heredoc is not closed"
        );
    }
    assert!(
        ran >= at_least,
        "only {ran} README blocks ran (needing {needs:?}); is a marker overused or lost?"
    );

    let scratch = tempfile::tempdir().unwrap();
    install_binary(scratch.path(), &ports);
    std::fs::write(scratch.path().join("readme.sh"), &script).unwrap();
    let out = Command::new("bash")
        .arg("readme.sh")
        .current_dir(scratch.path())
        .env_remove("COFFRE_ENDPOINT")
        .env_remove("COFFRE_DATA_DIR")
        .env("TMPDIR", scratch.path().join("target"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the README does not run as written\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n\
         --- script\n{script}"
    );
    std::fs::remove_file(scratch.path().join("readme.sh")).unwrap();
    let left: Vec<String> = std::fs::read_dir(scratch.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name != "target")
        .collect();
    assert!(
        left.is_empty(),
        "the README leaves files behind in the working tree: {left:?}"
    );
    // What the test did not run is said, with the README's reasons.
    eprintln!(
        "README: {ran} blocks run, {} not run:\n  {}",
        skipped.len(),
        skipped.join("\n  ")
    );
}

#[test]
fn the_readme_runs_as_written() {
    run_readme(None, 10);
}

/// The section on `coffre dev --nodes 3`: a private PostgreSQL server, a
/// key disabled on one node and refused on another, the cluster's audit
/// exported and verified, a node killed while the others serve.
#[test]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
fn the_readme_on_several_nodes_runs_as_written() {
    crate::common::require(&crate::common::needs::POSTGRES);
    run_readme(Some("PostgreSQL"), 2);
}

#[test]
fn readme_blocks_are_found_with_their_skip_reasons() {
    let text = "intro\n<!-- readme-test: skip: builds coffre -->\n```sh\ncargo test\n```\n\n\
                - a list\n\n  ```sh\n  coffre key list\n  ```\n\
                <!-- readme-test: needs: PostgreSQL -->\n```sh\ncoffre dev --nodes 3 &\n```\n";
    let found = blocks(text);
    assert_eq!(found.len(), 3, "{found:?}");
    assert_eq!(found[2].needs.as_deref(), Some("PostgreSQL"));
    assert_eq!(found[2].skip, None);
    assert_eq!(found[0].skip.as_deref(), Some("builds coffre"));
    assert_eq!(found[0].needs, None);
    assert_eq!(found[0].lines, ["cargo test"]);
    assert_eq!(found[1].skip, None);
    assert_eq!(found[1].lines, ["coffre key list"]);
    assert_eq!(found[1].line, 10);
    let ports = Ports::new();
    let refused = translate(
        "coffre key disable demo --as service   # refused: permission denied …",
        7,
        &ports,
    );
    assert_eq!(
        refused,
        "__line=7; __refused 'permission denied' coffre key disable demo --as service"
    );
    let dev = translate("cargo run --release -- dev --quorum 2 &", 3, &ports);
    assert_eq!(dev, "__line=3; __dev coffre dev --quorum 2");
    assert_eq!(
        heredoc_end("cat > p.json <<'JSON'").as_deref(),
        Some("JSON")
    );
    assert_eq!(heredoc_end("coffre key list"), None);
}
