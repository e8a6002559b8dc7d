//! The `coffre` command: the server (`dev`, `serve`) and the operator
//! client (`key`, `datakey`, `encrypt`, `decrypt`, ...), all in one binary.
//!
//! Flags are parsed once by clap into the types of `args.rs`; the client
//! commands talk to the server over gRPC with mTLS, exactly as any other
//! client does. This file starts the runtime and sends each command to its
//! module.

mod approval;
mod args;
mod audit;
mod bench;
mod client;
mod cluster;
mod datakey;
mod hsm;
mod key;
mod lines;
mod output;
mod reencrypt;
mod report;
mod run;
mod seal;
mod store;
mod store_copy;
mod xks;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

use crate::server::dev::DevOptions;
pub use args::{
    ApprovalCommand, AuditCommand, Cli, ClusterCommand, Command, ConnectArgs, DataArgs,
    DatakeyCommand, DecryptArgs, DevArgs, DevAuditMode, EncryptArgs, HsmCommand, KeyCommand,
    LocalHsmArgs, OpenArgs, OutcomeArg, PolicyCommand, ProtectionArg, SealArgs, ServeArgs,
    StateFilter, StoreArgs, StoreCommand, StoreCopyArgs, TokenCommand, XksArgs, XksCommand,
};
pub use hsm::RELOGIN_CHECK;
use run::{init_logging, run_dev, run_serve};

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let (cli, json) = match parse() {
        Ok(parsed) => parsed,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Dev(args) => {
                init_logging(args.log_json);
                let nodes = args.nodes;
                if nodes > 1 {
                    return run::run_dev_cluster(DevOptions::from(args), nodes).await;
                }
                run_dev(DevOptions::from(args), std::future::pending()).await
            }
            Command::Serve(args) => {
                init_logging(args.log_json);
                let once = crate::server::production::StartOnce {
                    accept_audit_log_loss: args.accept_audit_log_loss,
                };
                run_serve(&args.config, args.allow_root, once, args.preload_keys).await
            }
            Command::Key(cmd) => key::run(cmd).await,
            Command::Datakey(cmd) => datakey::generate(cmd).await,
            Command::Hsm(cmd) => hsm::run(cmd).await,
            Command::Approval(cmd) => approval::run(cmd).await,
            Command::Audit(cmd) => audit::run(cmd).await,
            Command::Encrypt(args) => datakey::encrypt(args).await,
            Command::Decrypt(args) => datakey::decrypt(args).await,
            Command::Reencrypt(args) => reencrypt::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Store(cmd) => store::run(cmd).await,
            Command::Cluster(cmd) => cluster::run(cmd).await,
            Command::Xks(cmd) => xks::run(cmd).await,
            Command::Seal(args) => seal::seal(args).await,
            Command::Open(args) => seal::open(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report::error(&e, json);
            ExitCode::FAILURE
        }
    }
}

/// The command line, and whether it asks for `--json` (then an error is a
/// JSON object on stdout too). A bad command line under `--json` is an
/// `INVALID_ARGUMENT` object, exit status 2 as clap's own.
///
/// `--field NAME` implies `--json` (added to the line) and selects what
/// [`output::print_json`] prints; it is refused for the commands that print
/// a stream rather than one object.
fn parse() -> Result<(Cli, bool), ExitCode> {
    let mut line: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let field_given = line
        .iter()
        .any(|a| a == "--field" || a.to_string_lossy().starts_with("--field="));
    if field_given && !line.iter().any(|a| a == "--json") {
        line.push("--json".into());
    }
    let parsed = Cli::command().try_get_matches_from(line).and_then(|m| {
        if let Some(field) = report::field_arg(&m) {
            if let Some(stream) = report::streaming_command(&m) {
                return Err(Cli::command().error(
                    clap::error::ErrorKind::ArgumentConflict,
                    format!("--field selects from one JSON object; {stream} prints a stream"),
                ));
            }
            output::select_field(field);
        }
        Ok((Cli::from_arg_matches(&m)?, report::json_flag(&m)))
    });
    match parsed {
        Ok(parsed) => Ok(parsed),
        Err(e) => Err(report::usage_error(&e)),
    }
}
