//! `coffre decrypt --batch` and `coffre reencrypt --batch`: one request per
//! JSON line in, one result per JSON line out, in the same order.
//!
//! Input, one object per line (blank lines are skipped; a line's number is
//! its position in the file, from 1):
//!
//! ```text
//! {"blob": "<base64>", "context": {"k": "v"}, "key": "demo"}                        decrypt
//! {"blob": "<base64>", "context": {..}, "key": "..", "to": "..", "to_context": {..}} reencrypt
//! ```
//!
//! `blob` is required (`ciphertext_blob` is accepted too, so the output of
//! `datakey generate --json` items and of `reencrypt --batch` can be fed
//! back after `jq`); every other field defaults to the command's flag
//! (`--context`, `--key`, `--to`, `--to-context`); unknown fields are
//! refused (a typo must not become a default). Output, one object per
//! non-blank input line:
//!
//! ```text
//! {"line": 1, "ok": true, "plaintext": "<base64>", "key_id": "..", "key_version": 1}
//! {"line": 1, "ok": true, "ciphertext_blob": "<base64>", "key_id": "..", "key_version": 2,
//!  "source_key_id": "..", "source_key_version": 1}
//! {"line": 2, "ok": false, "error": {"code": "INVALID_ARGUMENT", "message": "..", "hint": ".."}}
//! ```
//!
//! Decrypt sends `BatchDecrypt` requests of up to [`DECRYPT_CHUNK`] lines
//! (one audit record each), [`DECRYPT_DEPTH`] in flight; reencrypt sends one
//! `ReEncrypt` per line, [`REENCRYPT_DEPTH`] in flight. Results are written
//! in input order whatever order the answers arrive in. A bad line gives an
//! error line and the run goes on; the exit status is non-zero if any line
//! failed, and the counts go to standard error. A progress line is drawn
//! on standard error only when it is a terminal.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use zeroize::{Zeroize, Zeroizing};

use super::args::ReencryptArgs;
use super::datakey::{blob_hint, client, context_map, decode_blob, is_stdout};
use super::{DataArgs, DecryptArgs};
use crate::grpc::pb;
use crate::grpc::pb::data_key_service_client::DataKeyServiceClient;
use crate::metrics::CODE_NAMES;

/// Lines per `BatchDecrypt` request (the RPC takes up to 1,000).
pub const DECRYPT_CHUNK: usize = 250;
/// `BatchDecrypt` requests in flight.
pub const DECRYPT_DEPTH: usize = 4;
/// `ReEncrypt` requests in flight.
pub const REENCRYPT_DEPTH: usize = 16;
/// Longest input line accepted (a blob is at most about 4 KiB).
const MAX_LINE: usize = 64 * 1024;

type Context = BTreeMap<String, String>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecryptLine {
    #[serde(alias = "ciphertext_blob")]
    blob: String,
    context: Option<Context>,
    key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReencryptLine {
    #[serde(alias = "ciphertext_blob")]
    blob: String,
    context: Option<Context>,
    key: Option<String>,
    to: Option<String>,
    to_context: Option<Context>,
}

/// One line's failure, as printed.
#[derive(Debug, Serialize)]
struct LineError {
    code: String,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    hint: Option<String>,
}

impl LineError {
    fn invalid(message: String) -> Self {
        Self {
            code: "INVALID_ARGUMENT".to_string(),
            message,
            hint: None,
        }
    }

    fn from_status(status: &tonic::Status) -> Self {
        Self::from_code(i32::from(status.code()), status.message())
    }

    fn from_code(code: i32, message: &str) -> Self {
        let name = usize::try_from(code)
            .ok()
            .and_then(|n| CODE_NAMES.get(n))
            .copied()
            .unwrap_or("UNKNOWN");
        Self {
            code: name.to_string(),
            message: message.to_string(),
            hint: None,
        }
    }

    /// Adds the hint for a refused blob (its key, the exact context).
    fn with_blob_hint(mut self, blob: &[u8], key: Option<&str>, context: &Context) -> Self {
        if self.code == "INVALID_ARGUMENT" {
            self.hint = blob_hint(blob, key, None, context);
        }
        self
    }
}

/// What one line gave: its output object, serialized (it may hold a
/// plaintext, so it is zeroized), or its error.
type Outcome = Result<Zeroizing<String>, LineError>;

#[derive(Serialize)]
struct ErrLine<'a> {
    line: u64,
    ok: bool,
    error: &'a LineError,
}

#[derive(Serialize)]
struct Decrypted<'a> {
    plaintext: &'a str,
    key_id: &'a str,
    key_version: u32,
}

#[derive(Serialize)]
struct Reencrypted<'a> {
    ciphertext_blob: &'a str,
    key_id: &'a str,
    key_version: u32,
    source_key_id: &'a str,
    source_key_version: u32,
}

/// Serializes a successful line's fields (the `line` and `ok` are added
/// when written).
fn ok_fields<T: Serialize>(result: &T) -> Outcome {
    let mut buf = Zeroizing::new(Vec::with_capacity(512));
    serde_json::to_writer(&mut *buf, result)
        .map_err(|e| LineError::invalid(format!("cannot print the result: {e}")))?;
    let text = String::from_utf8(std::mem::take(&mut *buf))
        .map_err(|_| LineError::invalid("cannot print the result".to_string()))?;
    Ok(Zeroizing::new(text))
}

/// `coffre decrypt --batch FILE`.
pub async fn decrypt(args: &DecryptArgs, input: &Path) -> anyhow::Result<()> {
    let client = client(&args.connect).await?;
    let defaults = Defaults::new(&args.data, args.key.as_deref(), None, &[]);
    let justification = args.data.justification as i32;
    let mut run = Run::open(input, args.output.as_deref(), "decrypted")?;
    let mut inflight: VecDeque<JoinHandle<Vec<(u64, Outcome)>>> = VecDeque::new();
    let mut chunk: Vec<(u64, Result<Item, LineError>)> = Vec::new();
    while let Some((n, line)) = run.next_line()? {
        chunk.push((n, parse_decrypt(line, &defaults)));
        if chunk.len() == DECRYPT_CHUNK {
            let items = std::mem::take(&mut chunk);
            inflight.push_back(tokio::spawn(batch_decrypt(
                client.clone(),
                items,
                justification,
            )));
            if inflight.len() >= DECRYPT_DEPTH {
                run.write_all(inflight.pop_front()).await?;
            }
        }
    }
    if !chunk.is_empty() {
        inflight.push_back(tokio::spawn(batch_decrypt(
            client.clone(),
            chunk,
            justification,
        )));
    }
    while let Some(task) = inflight.pop_front() {
        run.write_all(Some(task)).await?;
    }
    run.finish()
}

/// `coffre reencrypt --batch FILE`.
pub async fn reencrypt(args: &ReencryptArgs, input: &Path) -> anyhow::Result<()> {
    let client = client(&args.connect).await?;
    let defaults = Defaults::new(
        &args.data,
        args.key.as_deref(),
        args.to.as_deref(),
        &args.to_context,
    );
    let justification = args.data.justification as i32;
    let mut run = Run::open(input, args.output.as_deref(), "re-encrypted")?;
    let mut inflight: VecDeque<JoinHandle<Vec<(u64, Outcome)>>> = VecDeque::new();
    while let Some((n, line)) = run.next_line()? {
        let task = match parse_reencrypt(line, &defaults) {
            Ok(item) => tokio::spawn(re_encrypt(client.clone(), n, item, justification)),
            Err(e) => tokio::spawn(async move { vec![(n, Err(e))] }),
        };
        inflight.push_back(task);
        if inflight.len() >= REENCRYPT_DEPTH {
            run.write_all(inflight.pop_front()).await?;
        }
    }
    while let Some(task) = inflight.pop_front() {
        run.write_all(Some(task)).await?;
    }
    run.finish()
}

/// The flags every line defaults to.
#[derive(Debug)]
struct Defaults {
    context: Context,
    key: Option<String>,
    to: Option<String>,
    to_context: Context,
}

impl Defaults {
    fn new(
        data: &DataArgs,
        key: Option<&str>,
        to: Option<&str>,
        to_context: &[(String, String)],
    ) -> Self {
        Self {
            context: context_map(data).into_iter().collect(),
            key: key.map(str::to_string),
            to: to.map(str::to_string),
            to_context: to_context.iter().cloned().collect(),
        }
    }
}

/// A line ready to send.
#[derive(Debug)]
struct Item {
    blob: Vec<u8>,
    context: Context,
    key: Option<String>,
    to: Option<String>,
    to_context: Context,
}

fn parse_decrypt(line: Result<String, LineError>, d: &Defaults) -> Result<Item, LineError> {
    let line = line?;
    let parsed: DecryptLine = serde_json::from_str(&line).map_err(|e| {
        LineError::invalid(format!(
            "not a request line ({}); expected {{\"blob\": BASE64, \"context\": {{..}}, \"key\": KEY}}",
            json_error(&e)
        ))
    })?;
    Ok(Item {
        blob: decode_blob(&parsed.blob).map_err(|e| LineError::invalid(format!("blob {e}")))?,
        context: parsed.context.unwrap_or_else(|| d.context.clone()),
        key: parsed.key.or_else(|| d.key.clone()),
        to: None,
        to_context: Context::new(),
    })
}

fn parse_reencrypt(line: Result<String, LineError>, d: &Defaults) -> Result<Item, LineError> {
    let line = line?;
    let parsed: ReencryptLine = serde_json::from_str(&line).map_err(|e| {
        LineError::invalid(format!(
            "not a request line ({}); expected {{\"blob\": BASE64, \"context\": {{..}}, \"key\": KEY, \"to\": KEY, \"to_context\": {{..}}}}",
            json_error(&e)
        ))
    })?;
    Ok(Item {
        blob: decode_blob(&parsed.blob).map_err(|e| LineError::invalid(format!("blob {e}")))?,
        context: parsed.context.unwrap_or_else(|| d.context.clone()),
        key: parsed.key.or_else(|| d.key.clone()),
        to: parsed.to.or_else(|| d.to.clone()),
        to_context: parsed.to_context.unwrap_or_else(|| d.to_context.clone()),
    })
}

/// A JSON error without serde's "at line 1 column C" (the line is ours).
fn json_error(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let what = text
        .rsplit_once(" at line ")
        .map_or(text.as_str(), |(w, _)| w);
    format!("{what}, at column {}", e.column())
}

/// One `BatchDecrypt` for the good lines of `chunk`; a failure of the whole
/// request becomes every one of its lines' error.
async fn batch_decrypt(
    mut client: DataKeyServiceClient<Channel>,
    chunk: Vec<(u64, Result<Item, LineError>)>,
    justification: i32,
) -> Vec<(u64, Outcome)> {
    let items: Vec<pb::BatchDecryptItem> = chunk
        .iter()
        .filter_map(|(_, item)| item.as_ref().ok())
        .map(|item| pb::BatchDecryptItem {
            ciphertext_blob: item.blob.clone(),
            encryption_context: item.context.clone().into_iter().collect(),
            key_id: item.key.clone().unwrap_or_default(),
        })
        .collect();
    let answer = if items.is_empty() {
        Ok(Vec::new())
    } else {
        client
            .batch_decrypt(pb::BatchDecryptRequest {
                items,
                justification,
            })
            .await
            .map(|r| r.into_inner().results)
    };
    let mut results = match answer {
        Ok(results) => Ok(results.into_iter()),
        Err(status) => Err(status),
    };
    chunk
        .into_iter()
        .map(|(n, item)| {
            let item = match item {
                Ok(item) => item,
                Err(e) => return (n, Err(e)),
            };
            let outcome = match &mut results {
                Err(status) => Err(LineError::from_status(status).with_blob_hint(
                    &item.blob,
                    item.key.as_deref(),
                    &item.context,
                )),
                Ok(results) => match results.next() {
                    None => Err(LineError::from_code(
                        i32::from(tonic::Code::Internal),
                        "the server answered fewer results than items",
                    )),
                    Some(r) => decrypted(r, &item),
                },
            };
            (n, outcome)
        })
        .collect()
}

fn decrypted(r: pb::BatchDecryptResult, item: &Item) -> Outcome {
    let pb::BatchDecryptResult {
        plaintext,
        key_id,
        key_version,
        error,
    } = r;
    let plaintext = Zeroizing::new(plaintext);
    if let Some(e) = error {
        return Err(LineError::from_code(e.code, &e.message).with_blob_hint(
            &item.blob,
            item.key.as_deref(),
            &item.context,
        ));
    }
    let plain64 = Zeroizing::new(B64.encode(&*plaintext));
    ok_fields(&Decrypted {
        plaintext: &plain64,
        key_id: &key_id,
        key_version,
    })
}

async fn re_encrypt(
    mut client: DataKeyServiceClient<Channel>,
    n: u64,
    item: Item,
    justification: i32,
) -> Vec<(u64, Outcome)> {
    let answer = client
        .re_encrypt(pb::ReEncryptRequest {
            ciphertext_blob: item.blob.clone(),
            source_encryption_context: item.context.clone().into_iter().collect(),
            destination_key_id: item.to.clone().unwrap_or_default(),
            destination_encryption_context: item.to_context.clone().into_iter().collect(),
            justification,
            source_key_id: item.key.clone().unwrap_or_default(),
        })
        .await;
    let outcome = match answer {
        Ok(resp) => {
            let r = resp.into_inner();
            let blob64 = B64.encode(&r.ciphertext_blob);
            ok_fields(&Reencrypted {
                ciphertext_blob: &blob64,
                key_id: &r.key_id,
                key_version: r.key_version,
                source_key_id: &r.source_key_id,
                source_key_version: r.source_key_version,
            })
        }
        Err(status) => Err(LineError::from_status(&status).with_blob_hint(
            &item.blob,
            item.key.as_deref(),
            &item.context,
        )),
    };
    vec![(n, outcome)]
}

/// A batch run: its input, its output, its counts and its progress line.
struct Run {
    input: Box<dyn BufRead>,
    line_no: u64,
    output: Box<dyn Write>,
    /// Output not yet written (zeroized: decrypt lines hold plaintexts).
    pending: Zeroizing<Vec<u8>>,
    done: u64,
    failed: u64,
    verb: &'static str,
    progress: Option<ProgressLine>,
}

impl Run {
    fn open(input: &Path, output: Option<&Path>, verb: &'static str) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let from_stdin = is_stdout(input);
        let reader: Box<dyn BufRead> = if from_stdin {
            Box::new(std::io::BufReader::new(std::io::stdin()))
        } else {
            let f = std::fs::File::open(input)
                .with_context(|| format!("opening {}", input.display()))?;
            Box::new(std::io::BufReader::new(f))
        };
        let writer: Box<dyn Write> = match output {
            None => Box::new(std::io::stdout()),
            Some(p) if is_stdout(p) => Box::new(std::io::stdout()),
            Some(p) => Box::new(create_private(p)?),
        };
        let progress = std::io::stderr().is_terminal().then(|| {
            // A file's lines are counted first, for a total; stdin has none.
            let total = (!from_stdin).then(|| count_lines(input)).flatten();
            ProgressLine::new(total)
        });
        Ok(Self {
            input: reader,
            line_no: 0,
            output: writer,
            pending: Zeroizing::new(Vec::with_capacity(64 * 1024)),
            done: 0,
            failed: 0,
            verb,
            progress,
        })
    }

    /// The next non-blank line and its number (an error for a line too
    /// long, skipped); None at the end.
    #[allow(clippy::type_complexity)]
    fn next_line(&mut self) -> anyhow::Result<Option<(u64, Result<String, LineError>)>> {
        use anyhow::Context as _;
        loop {
            let mut line = String::new();
            let limit = u64::try_from(MAX_LINE)
                .unwrap_or(u64::MAX)
                .saturating_add(1);
            let read = (&mut self.input)
                .take(limit)
                .read_line(&mut line)
                .with_context(|| format!("reading line {}", self.line_no.saturating_add(1)))?;
            if read == 0 {
                return Ok(None);
            }
            self.line_no = self.line_no.saturating_add(1);
            if line.len() > MAX_LINE && !line.ends_with('\n') {
                self.input
                    .skip_until(b'\n')
                    .with_context(|| format!("reading line {}", self.line_no))?;
                let e = LineError::invalid(format!(
                    "the line is longer than {MAX_LINE} bytes: one JSON object per line is expected"
                ));
                return Ok(Some((self.line_no, Err(e))));
            }
            if !line.trim().is_empty() {
                return Ok(Some((self.line_no, Ok(line))));
            }
        }
    }

    /// Waits for `task` and writes its lines.
    async fn write_all(
        &mut self,
        task: Option<JoinHandle<Vec<(u64, Outcome)>>>,
    ) -> anyhow::Result<()> {
        let Some(task) = task else { return Ok(()) };
        let outcomes = task
            .await
            .map_err(|e| anyhow::anyhow!("a batch task failed: {e}"))?;
        for (n, outcome) in outcomes {
            self.write_line(n, &outcome)?;
        }
        self.flush(false)?;
        if let Some(p) = &mut self.progress {
            p.draw(self.done, self.failed, false);
        }
        Ok(())
    }

    fn write_line(&mut self, n: u64, outcome: &Outcome) -> anyhow::Result<()> {
        self.done = self.done.saturating_add(1);
        match outcome {
            Ok(fields) => {
                // `{"line":N,"ok":true,` then the fields without their `{`.
                let head = format!("{{\"line\":{n},\"ok\":true,");
                self.pending.extend_from_slice(head.as_bytes());
                self.pending
                    .extend_from_slice(fields.strip_prefix('{').unwrap_or(fields).as_bytes());
            }
            Err(e) => {
                self.failed = self.failed.saturating_add(1);
                let line = serde_json::to_string(&ErrLine {
                    line: n,
                    ok: false,
                    error: e,
                })?;
                self.pending.extend_from_slice(line.as_bytes());
            }
        }
        self.pending.push(b'\n');
        Ok(())
    }

    fn flush(&mut self, force: bool) -> anyhow::Result<()> {
        if force || self.pending.len() >= 32 * 1024 {
            self.output
                .write_all(&self.pending)
                .and_then(|()| self.output.flush())
                .map_err(|e| anyhow::anyhow!("writing the results: {e}"))?;
            self.pending.zeroize();
        }
        Ok(())
    }

    /// Writes what is left; the counts on stderr, or as the error when a
    /// line failed (non-zero exit).
    fn finish(mut self) -> anyhow::Result<()> {
        self.flush(true)?;
        if let Some(p) = &mut self.progress {
            p.draw(self.done, self.failed, true);
        }
        let ok = self.done.saturating_sub(self.failed);
        let summary = format!(
            "{ok} of {} line(s) {}, {} failed",
            self.done, self.verb, self.failed
        );
        if self.failed > 0 {
            anyhow::bail!("{summary} (each failed line's result says why)");
        }
        eprintln!("{summary}");
        Ok(())
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run")
            .field("line_no", &self.line_no)
            .field("done", &self.done)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

/// Creates `path` for the results, mode 0600 (plaintexts may be in them).
fn create_private(path: &Path) -> anyhow::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
        .open(path)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", path.display()))
}

/// The non-blank lines of a file, for the progress line's total.
fn count_lines(path: &Path) -> Option<u64> {
    let f = std::fs::File::open(path).ok()?;
    let mut n = 0u64;
    for line in std::io::BufReader::new(f).lines() {
        if !line.ok()?.trim().is_empty() {
            n = n.saturating_add(1);
        }
    }
    Some(n)
}

/// The progress line on a terminal's standard error, redrawn in place at
/// most ten times a second.
#[derive(Debug)]
struct ProgressLine {
    total: Option<u64>,
    last: Option<Instant>,
}

impl ProgressLine {
    fn new(total: Option<u64>) -> Self {
        Self { total, last: None }
    }

    fn draw(&mut self, done: u64, failed: u64, last: bool) {
        let now = Instant::now();
        if !last
            && self
                .last
                .is_some_and(|t| now.duration_since(t) < Duration::from_millis(100))
        {
            return;
        }
        self.last = Some(now);
        let line = match self.total {
            Some(total) if total > 0 => {
                let width = 30u64;
                let filled = (done.min(total).saturating_mul(width) / total).min(width);
                let filled = usize::try_from(filled).unwrap_or(0);
                format!(
                    "[{}{}] {done}/{total} lines, {failed} failed",
                    "#".repeat(filled),
                    " ".repeat(30usize.saturating_sub(filled))
                )
            }
            _ => format!("{done} lines, {failed} failed"),
        };
        eprint!("\r{line}");
        if last {
            eprintln!();
        }
        let _ = std::io::stderr().flush();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn defaults() -> Defaults {
        Defaults {
            context: [("tenant".to_string(), "acme".to_string())].into(),
            key: Some("demo".to_string()),
            to: Some("billing".to_string()),
            to_context: Context::new(),
        }
    }

    #[test]
    fn a_line_takes_the_flags_for_what_it_does_not_say() {
        let d = defaults();
        let item = parse_decrypt(Ok(r#"{"blob": "Q0YB"}"#.to_string()), &d).unwrap();
        assert_eq!(item.blob, b"CF\x01");
        assert_eq!(item.context, d.context);
        assert_eq!(item.key.as_deref(), Some("demo"));
        // Its own fields win; an empty context is a context.
        let item = parse_reencrypt(
            Ok(r#"{"ciphertext_blob": "Q0YB", "context": {}, "to": "x", "to_context": {"a": "b"}}"#
                .to_string()),
            &d,
        )
        .unwrap();
        assert!(item.context.is_empty());
        assert_eq!(item.to.as_deref(), Some("x"));
        assert_eq!(item.to_context.get("a").map(String::as_str), Some("b"));
    }

    #[test]
    fn a_bad_line_says_what_is_expected() {
        let d = defaults();
        let e = parse_decrypt(Ok(r#"{"blob": "Q0YB", "to": "x"}"#.to_string()), &d).unwrap_err();
        assert_eq!(e.code, "INVALID_ARGUMENT");
        assert!(e.message.contains("unknown field `to`"), "{}", e.message);
        assert!(!e.message.contains("at line 1"), "{}", e.message);
        let e = parse_decrypt(Ok("not json".to_string()), &d).unwrap_err();
        assert!(
            e.message.contains("expected {\"blob\": BASE64"),
            "{}",
            e.message
        );
        let e = parse_reencrypt(Ok(r#"{"blob": "%%"}"#.to_string()), &d).unwrap_err();
        assert!(
            e.message.contains("standard base64 alphabet"),
            "{}",
            e.message
        );
    }

    #[test]
    fn item_errors_carry_the_code_by_name() {
        let e = LineError::from_code(7, "no");
        assert_eq!(e.code, "PERMISSION_DENIED");
        assert_eq!(LineError::from_code(99, "?").code, "UNKNOWN");
        let line = serde_json::to_string(&ErrLine {
            line: 4,
            ok: false,
            error: &e,
        })
        .unwrap();
        assert_eq!(
            line,
            r#"{"line":4,"ok":false,"error":{"code":"PERMISSION_DENIED","message":"no"}}"#
        );
    }
}
