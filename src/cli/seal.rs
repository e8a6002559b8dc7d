//! `coffre seal` and `coffre open`: client-side encryption of files and
//! streams with `coffre-client` (the sealed message format), as a hosted
//! service would do it. Only the data key's request and its wrapped form
//! reach coffre; the data stays here.
//!
//! A file named by `--out` appears only once complete: written beside it,
//! `fsync`ed, renamed (`fsutil::AtomicFile`); for `open`, only once every
//! frame verified. On standard output, `open` writes each frame as it
//! verifies, so a failure half-way leaves a prefix there: the exit status
//! says whether it is the whole.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use coffre_client::{Client, ClientError, FormatError};
use serde_json::json;
use tonic::Code;
use zeroize::Zeroizing;

use super::args::{DataArgs, OpenArgs, SealArgs};
use super::client::{CliError, connect};
use super::output::print_json;
use crate::fsutil::AtomicFile;

/// Inputs at least this large show their progress on a terminal.
const PROGRESS_FROM: u64 = 64 * 1024 * 1024;

pub async fn seal(args: SealArgs) -> anyhow::Result<()> {
    let json = args.connect.json;
    refuse_json_on_stdout(json, &args.output)?;
    let context = context(&args.data);
    let client = client(&args.data, &args.connect).await?;
    let (input, size) = open_input(&args.input)?;
    let output = Output::create(&args.output)?;
    let (mut sealer, generated) = client
        .sealer(&args.key, context.clone(), output)
        .await
        .map_err(cli_error)?;
    let mut progress = Progress::new("sealed", size, json);
    let copied = tokio::task::block_in_place(|| copy(input, &mut sealer, &mut progress));
    progress.finish();
    copied?;
    let (output, plaintext_len) = sealer.finish().map_err(|e| cli_error(e.into()))?;
    let written = output.commit()?;
    report(
        json,
        &args.output,
        json!({
            "operation": "seal",
            "key_id": generated.key_id,
            "key_version": generated.key_version,
            "context": context,
            "plaintext_bytes": plaintext_len,
            "sealed_bytes": written,
        }),
        || {
            format!(
                "sealed {plaintext_len} bytes into {} ({written} bytes) under key {} version {}",
                args.output.display(),
                generated.key_id,
                generated.key_version
            )
        },
    )
}

pub async fn open(args: OpenArgs) -> anyhow::Result<()> {
    let json = args.connect.json;
    refuse_json_on_stdout(json, &args.output)?;
    let expected = (!args.data.context.is_empty()).then(|| context(&args.data));
    let client = client(&args.data, &args.connect).await?;
    let (input, size) = open_input(&args.input)?;
    // The header is read before anything is created: a file that is not a
    // sealed message, or a refusal, leaves no output behind.
    let (mut opener, header) = client
        .opener(input, expected.as_ref())
        .await
        .map_err(cli_error)?;
    let mut output = Output::create(&args.output)?;
    let mut progress = Progress::new("opened", size, json);
    let copied = tokio::task::block_in_place(|| copy(&mut opener, &mut output, &mut progress));
    progress.finish();
    let plaintext_len = copied?;
    output.commit()?;
    report(
        json,
        &args.output,
        json!({
            "operation": "open",
            "context": header.context,
            "plaintext_bytes": plaintext_len,
        }),
        || {
            format!(
                "opened {plaintext_len} bytes into {}",
                args.output.display()
            )
        },
    )
}

fn refuse_json_on_stdout(json: bool, output: &Path) -> anyhow::Result<()> {
    if json && output == Path::new("-") {
        return Err(CliError::local(
            Code::InvalidArgument,
            "--json prints a summary on standard output, which carries the data here: give --out FILE",
        )
        .into());
    }
    Ok(())
}

fn context(data: &DataArgs) -> BTreeMap<String, String> {
    data.context.iter().cloned().collect()
}

async fn client(data: &DataArgs, connect_args: &super::ConnectArgs) -> anyhow::Result<Client> {
    let reason = coffre_client::AccessReason::try_from(data.justification as i32)
        .unwrap_or(coffre_client::AccessReason::Unspecified);
    Ok(Client::from_channel(connect(connect_args, "service").await?).with_reason(reason))
}

/// The input and its size when it is a file.
fn open_input(path: &Path) -> anyhow::Result<(Box<dyn Read + Send>, Option<u64>)> {
    if path == Path::new("-") {
        return Ok((Box::new(std::io::stdin()), None));
    }
    let file = std::fs::File::open(path).map_err(|e| {
        CliError::local(
            Code::InvalidArgument,
            format!("cannot open {}: {e}", path.display()),
        )
    })?;
    let size = file.metadata().ok().map(|m| m.len());
    Ok((
        Box::new(std::io::BufReader::with_capacity(256 * 1024, file)),
        size,
    ))
}

/// Standard output, or a file that appears once committed.
enum Output {
    Stdout(std::io::Stdout),
    File { file: AtomicFile, written: u64 },
}

impl Output {
    fn create(path: &Path) -> anyhow::Result<Self> {
        if path == Path::new("-") {
            return Ok(Output::Stdout(std::io::stdout()));
        }
        let file = AtomicFile::create(path, true).map_err(|e| {
            CliError::local(
                Code::InvalidArgument,
                format!("cannot write beside {}: {e}", path.display()),
            )
        })?;
        Ok(Output::File { file, written: 0 })
    }

    /// Flushes, and for a file makes it appear; the bytes written there.
    fn commit(self) -> anyhow::Result<u64> {
        match self {
            Output::Stdout(mut out) => {
                out.flush().context("writing standard output")?;
                Ok(0)
            }
            Output::File { file, written } => {
                file.commit().context("writing the output file")?;
                Ok(written)
            }
        }
    }
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Output::Stdout(out) => out.write(buf),
            Output::File { file, written } => {
                let n = file.write(buf)?;
                *written += n as u64;
                Ok(n)
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Output::Stdout(out) => out.flush(),
            Output::File { file, .. } => file.flush(),
        }
    }
}

/// Copies through a zeroized buffer; a sealed-format error inside an I/O
/// error comes out as what it is.
fn copy(
    mut input: impl Read,
    output: &mut impl Write,
    progress: &mut Progress,
) -> anyhow::Result<u64> {
    let mut buf = Zeroizing::new(vec![0u8; 256 * 1024]);
    let mut total = 0u64;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_failure(e, "reading the input")),
        };
        output
            .write_all(buf.get(..n).unwrap_or_default())
            .map_err(|e| io_failure(e, "writing the output"))?;
        total += n as u64;
        progress.update(total);
    }
}

fn io_failure(e: std::io::Error, doing: &str) -> anyhow::Error {
    if e.get_ref().is_some_and(|inner| inner.is::<FormatError>()) {
        let message = e.get_ref().map(ToString::to_string).unwrap_or_default();
        return CliError::local(Code::DataLoss, message).into();
    }
    anyhow::Error::new(e).context(doing.to_string())
}

/// The gRPC code closest to a client error, with its message.
fn cli_error(e: ClientError) -> anyhow::Error {
    let code = match &e {
        ClientError::KeyUnusable(_) => Code::FailedPrecondition,
        ClientError::Refused(_) => Code::PermissionDenied,
        ClientError::Invalid(_) | ClientError::ContextMismatch { .. } => Code::InvalidArgument,
        ClientError::Throttled(_) => Code::ResourceExhausted,
        ClientError::Unavailable(_) => Code::Unavailable,
        ClientError::Unauthenticated(_) => Code::Unauthenticated,
        ClientError::Format(FormatError::NotAuthentic | FormatError::TruncatedHeader) => {
            Code::DataLoss
        }
        ClientError::Format(FormatError::Io(_)) => Code::Unknown,
        ClientError::Format(_) | ClientError::Connect(_) => Code::InvalidArgument,
        ClientError::Other(_) => Code::Unknown,
    };
    let message = match &e {
        ClientError::ContextMismatch { found } => format!(
            "the message's context is {}, not the --context given",
            found
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        ),
        // The server's message already says what it is.
        ClientError::KeyUnusable(m)
        | ClientError::Refused(m)
        | ClientError::Invalid(m)
        | ClientError::Throttled(m)
        | ClientError::Unavailable(m)
        | ClientError::Unauthenticated(m) => m.clone(),
        other => other.to_string(),
    };
    CliError::local(code, message).into()
}

/// A progress line on standard error, for large files on a terminal.
struct Progress {
    verb: &'static str,
    total: Option<u64>,
    enabled: bool,
    last: Instant,
    shown: bool,
}

impl Progress {
    fn new(verb: &'static str, total: Option<u64>, json: bool) -> Self {
        let enabled =
            !json && std::io::stderr().is_terminal() && total.is_some_and(|t| t >= PROGRESS_FROM);
        Progress {
            verb,
            total,
            enabled,
            last: Instant::now(),
            shown: false,
        }
    }

    fn update(&mut self, done: u64) {
        if !self.enabled || self.last.elapsed() < Duration::from_millis(250) {
            return;
        }
        self.last = Instant::now();
        let total = self.total.unwrap_or(1).max(1);
        eprint!(
            "\r{} {} MiB of {} MiB ({}%)",
            self.verb,
            done >> 20,
            total >> 20,
            done.saturating_mul(100) / total
        );
        self.shown = true;
    }

    fn finish(&mut self) {
        if self.shown {
            eprintln!();
        }
    }
}

/// The summary: JSON on standard output, or a line (on standard error
/// when standard output carries the data).
fn report(
    json: bool,
    output: &PathBuf,
    value: serde_json::Value,
    line: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    if json {
        return print_json(&value);
    }
    if output == Path::new("-") {
        return Ok(());
    }
    println!("{}", line());
    Ok(())
}
