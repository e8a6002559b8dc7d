//! How a failed command is reported. On standard error for people: the
//! code in words, every context a command added, the server's request id
//! (to find the request's audit record), each message once. Under `--json`,
//! also one object on standard output for scripts:
//! `{"error": {"code": "PERMISSION_DENIED", "message": "...", "request_id": "..."}}`
//! (`request_id` null for a failure on this side). The exit status is 1
//! (2 for a bad command line, as clap's).

use std::io::IsTerminal;
use std::process::ExitCode;

use serde_json::json;

use super::client::{CliError, code_name, join_unrepeated};
use super::output::colour;

/// Whether the command that `matches` holds asks for `--json` (the leaf
/// subcommand's `json` flag, whichever command defines it).
pub fn json_flag(matches: &clap::ArgMatches) -> bool {
    let here = matches
        .try_get_one::<bool>("json")
        .ok()
        .flatten()
        .copied()
        .unwrap_or(false);
    here || matches.subcommand().is_some_and(|(_, sub)| json_flag(sub))
}

/// The `--field` of the leaf subcommand, if given.
pub fn field_arg(matches: &clap::ArgMatches) -> Option<String> {
    let here = matches
        .try_get_one::<String>("field")
        .ok()
        .flatten()
        .cloned();
    here.or_else(|| matches.subcommand().and_then(|(_, sub)| field_arg(sub)))
}

/// The command, if the line names one that prints a stream of JSON (lines
/// or progress) rather than one object.
pub fn streaming_command(matches: &clap::ArgMatches) -> Option<String> {
    let mut names = Vec::new();
    let mut at = matches;
    let mut batch = false;
    while let Some((name, sub)) = at.subcommand() {
        names.push(name.to_string());
        batch |= sub
            .try_get_one::<std::path::PathBuf>("batch")
            .ok()
            .flatten()
            .is_some();
        at = sub;
    }
    let path = names.join(" ");
    let streams = matches!(path.as_str(), "bench" | "audit tail" | "hsm rotate-root") || batch;
    streams.then(|| format!("coffre {path}{}", if batch { " --batch" } else { "" }))
}

/// A command line clap refused: its own report (help and version too), and
/// under `--json` an `INVALID_ARGUMENT` object as well.
pub fn usage_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let informational = matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    );
    // The line could not be parsed, so `--json` is looked for as a word.
    let json = std::env::args_os().any(|a| a == "--json");
    if informational || !json {
        e.exit()
    }
    let rendered = e.render().to_string();
    let first = rendered.lines().next().unwrap_or_default();
    let message = first.strip_prefix("error: ").unwrap_or(first);
    print_object(code_name(tonic::Code::InvalidArgument), message, None);
    let _ = e.print();
    ExitCode::from(2)
}

/// Reports the error a command ended with.
pub fn error(e: &anyhow::Error, json: bool) {
    let cli = e.chain().find_map(|c| c.downcast_ref::<CliError>());
    let text = join_unrepeated(e.chain().map(|c| c.to_string()));
    let prefix = if colour(std::io::stderr().is_terminal()) {
        "\x1b[1;31merror:\x1b[0m"
    } else {
        "error:"
    };
    eprintln!("{prefix} {text}");
    if !json || cli.is_some_and(|c| c.answered) {
        return;
    }
    // The message without the code (a field of its own) and the request id
    // (likewise): every context, then the failure's own words.
    let message = join_unrepeated(e.chain().map(|c| match c.downcast_ref::<CliError>() {
        Some(cli) => cli.message.clone(),
        None => c.to_string(),
    }));
    let code = cli.map_or_else(|| local_code(e), |c| c.code);
    print_object(
        code_name(code),
        &message,
        cli.and_then(|c| c.request_id.as_deref()),
    );
}

/// The code of a failure that no [`CliError`] names: an input that could
/// not be read or parsed is `INVALID_ARGUMENT`; anything else `UNKNOWN`.
fn local_code(e: &anyhow::Error) -> tonic::Code {
    let input = e.chain().any(|c| {
        c.is::<std::io::Error>()
            || c.is::<serde_json::Error>()
            || c.is::<std::string::FromUtf8Error>()
            || c.is::<base64::DecodeError>()
    });
    if input {
        tonic::Code::InvalidArgument
    } else {
        tonic::Code::Unknown
    }
}

fn print_object(code: &str, message: &str, request_id: Option<&str>) {
    let object = json!({
        "error": { "code": code, "message": message, "request_id": request_id }
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&object).unwrap_or_default()
    );
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, FromArgMatches};

    use super::*;
    use crate::cli::Cli;

    fn json_of(args: &[&str]) -> bool {
        let m = Cli::command().try_get_matches_from(args).unwrap();
        assert!(Cli::from_arg_matches(&m).is_ok());
        json_flag(&m)
    }

    #[test]
    fn the_json_flag_is_found_on_any_subcommand() {
        assert!(json_of(&["coffre", "key", "list", "--json"]));
        assert!(json_of(&["coffre", "key", "policy", "show", "k", "--json"]));
        assert!(json_of(&[
            "coffre",
            "audit",
            "verify",
            "f",
            "--public-key",
            "p",
            "--json"
        ]));
        assert!(!json_of(&["coffre", "key", "list"]));
        assert!(!json_of(&["coffre", "dev", "--log-json"]));
    }

    #[test]
    fn a_local_failure_reading_input_is_invalid_argument() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let e = anyhow::Error::new(io).context("opening policy.json");
        assert_eq!(local_code(&e), tonic::Code::InvalidArgument);
        assert_eq!(local_code(&anyhow::anyhow!("odd")), tonic::Code::Unknown);
    }
}
