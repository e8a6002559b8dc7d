//! What every client command shares: the mTLS channel to the server, the
//! readable form of a gRPC error, and reading an input file.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use zeroize::Zeroizing;

use super::ConnectArgs;
use crate::metrics::CODE_NAMES;
use crate::pki::PkiPaths;

/// Opens an mTLS channel as `default_identity` unless told otherwise.
pub async fn connect(args: &ConnectArgs, default_identity: &str) -> anyhow::Result<Channel> {
    let paths = PkiPaths::new(&args.data_dir);
    let name = args.identity.as_deref().unwrap_or(default_identity);
    let ca_path = args.ca.clone().unwrap_or_else(|| paths.ca_cert());
    let (cert_path, key_path) = match (&args.cert, &args.cert_key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => (paths.client_cert(name), paths.client_key(name)),
    };
    let read = |p: &Path, what: &str| -> anyhow::Result<Vec<u8>> {
        std::fs::read(p).with_context(|| {
            format!(
                "cannot read the {what} {} (is `coffre dev` running with --data-dir {}? or pass --ca, --cert and --cert-key)",
                p.display(),
                args.data_dir.display()
            )
        })
    };
    let ca = read(&ca_path, "CA certificate")?;
    let cert = read(&cert_path, "client certificate")?;
    let key = Zeroizing::new(read(&key_path, "client key")?);

    let uri: tonic::transport::Uri = args
        .endpoint
        .parse()
        .with_context(|| format!("invalid endpoint {:?}", args.endpoint))?;
    if uri.scheme_str() != Some("https") {
        bail!("the endpoint must start with https:// (coffre always uses TLS)");
    }
    let host = uri
        .host()
        .unwrap_or("localhost")
        .trim_matches(['[', ']'])
        .to_string();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, &*key))
        .domain_name(host);
    let endpoint = Endpoint::from(uri)
        .tls_config(tls)
        .context("configuring TLS")?
        .timeout(Duration::from_secs(args.timeout.max(1)))
        .connect_timeout(Duration::from_secs(10));
    endpoint
        .connect()
        .await
        .with_context(|| format!("cannot connect to {}", args.endpoint))
}

/// The codes a user is told by name (in lower case, `not found`); any other
/// reads as a plain `error`.
const NAMED_CODES: [tonic::Code; 8] = [
    tonic::Code::InvalidArgument,
    tonic::Code::NotFound,
    tonic::Code::PermissionDenied,
    tonic::Code::FailedPrecondition,
    tonic::Code::Unavailable,
    tonic::Code::AlreadyExists,
    tonic::Code::Unauthenticated,
    tonic::Code::DeadlineExceeded,
];

/// A status code as the user reads it: `NOT_FOUND` is `not found`.
fn code_words(code: tonic::Code) -> String {
    let name = NAMED_CODES
        .contains(&code)
        .then(|| usize::try_from(i32::from(code)).ok())
        .flatten()
        .and_then(|n| CODE_NAMES.get(n));
    name.map_or_else(
        || "error".to_string(),
        |n| n.to_lowercase().replace('_', " "),
    )
}

/// A gRPC error, readable.
pub(super) fn rpc_error(status: tonic::Status) -> anyhow::Error {
    let code = code_words(status.code());
    let msg = status.message();
    if msg.is_empty() {
        anyhow::anyhow!("{code} ({:?})", status.code())
    } else {
        anyhow::anyhow!("{code}: {msg}")
    }
}

/// The bytes of `path`, or of standard input when it is `-`.
pub(super) fn read_input(path: &Path) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let mut buf = Zeroizing::new(Vec::new());
    if path == Path::new("-") {
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("reading standard input")?;
    } else {
        let mut f =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        f.read_to_end(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_codes_read_in_lower_case_words() {
        let cases = [
            (tonic::Code::InvalidArgument, "invalid argument"),
            (tonic::Code::NotFound, "not found"),
            (tonic::Code::PermissionDenied, "permission denied"),
            (tonic::Code::FailedPrecondition, "failed precondition"),
            (tonic::Code::Unavailable, "unavailable"),
            (tonic::Code::AlreadyExists, "already exists"),
            (tonic::Code::Unauthenticated, "unauthenticated"),
            (tonic::Code::DeadlineExceeded, "deadline exceeded"),
            (tonic::Code::Internal, "error"),
            (tonic::Code::ResourceExhausted, "error"),
            (tonic::Code::Ok, "error"),
        ];
        for (code, words) in cases {
            assert_eq!(code_words(code), words, "{code:?}");
        }
    }

    #[test]
    fn an_error_reads_its_code_then_its_message() {
        let e = rpc_error(tonic::Status::not_found("no key \"a\""));
        assert_eq!(e.to_string(), "not found: no key \"a\"");
        let e = rpc_error(tonic::Status::internal(""));
        assert_eq!(e.to_string(), "error (Internal)");
    }
}
