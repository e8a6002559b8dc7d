//! What every client command shares: the mTLS channel to the server, the
//! error a command ends with ([`CliError`]: a gRPC code, a message, the
//! server's request id) and what a failed connection means, and reading an
//! input file.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, bail};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use zeroize::Zeroizing;

use super::ConnectArgs;
use crate::grpc::REQUEST_ID_HEADER;
use crate::metrics::CODE_NAMES;
use crate::pki::PkiPaths;

/// Opens an mTLS channel as `default_identity` unless told otherwise.
pub async fn connect(args: &ConnectArgs, default_identity: &str) -> anyhow::Result<Channel> {
    if args.endpoints.len() > 1 {
        bail!(CliError::local(
            tonic::Code::InvalidArgument,
            format!(
                "--endpoint is given {} times; only `coffre audit export --cluster` takes one per \
                 node",
                args.endpoints.len()
            ),
        ));
    }
    let endpoint = match &args.node {
        Some(node) => super::cluster::node_endpoint(&args.data_dir, node)?,
        None => args.endpoint().to_string(),
    };
    let endpoint = endpoint.as_str();
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
    remember_peer(Peer {
        endpoint: endpoint.to_string(),
        data_dir: args.data_dir.clone(),
        ca: ca_path.clone(),
        cert: cert_path.clone(),
        ca_given: args.ca.is_some(),
        cert_given: args.cert.is_some(),
    });
    let ca = read(&ca_path, "CA certificate")?;
    let cert = read(&cert_path, "client certificate")?;
    let key = Zeroizing::new(read(&key_path, "client key")?);

    let uri: tonic::transport::Uri = endpoint.parse().map_err(|e| {
        CliError::local(
            tonic::Code::InvalidArgument,
            format!("invalid endpoint {endpoint:?}: {e}"),
        )
    })?;
    if uri.scheme_str() != Some("https") {
        bail!(CliError::local(
            tonic::Code::InvalidArgument,
            format!("the endpoint {endpoint:?} must start with https:// (coffre always uses TLS)"),
        ));
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
    let channel = Endpoint::from(uri)
        .tls_config(tls)
        .context("configuring TLS")?
        .timeout(Duration::from_secs(args.timeout.max(1)))
        .connect_timeout(Duration::from_secs(10));
    match channel.connect().await {
        Ok(channel) => Ok(channel),
        Err(e) => Err(match peer().and_then(|p| diagnose(&e, &p)) {
            Some(explained) => explained.into(),
            None => CliError::local(
                tonic::Code::Unavailable,
                format!("cannot connect to {endpoint}: {}", chain_text(&e)),
            )
            .into(),
        }),
    }
}

/// How a client command failed, as `main` reports it: a gRPC code (the
/// server's, or the one a local failure stands for: `INVALID_ARGUMENT` for
/// a bad input, `UNAVAILABLE` for no connection), the message, and the id
/// the server gave the request (its `x-request-id`, which the request's
/// audit record holds as `request_id`).
#[derive(Debug)]
pub struct CliError {
    pub code: tonic::Code,
    pub message: String,
    pub request_id: Option<String>,
    /// The command already printed its `--json` answer about this failure
    /// (`audit verify`'s report): `main` prints no second object.
    pub answered: bool,
}

impl CliError {
    /// A failure on this side: no request id.
    pub fn local(code: tonic::Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            request_id: None,
            answered: false,
        }
    }

    /// The same failure, its `--json` answer already printed.
    pub fn answered(mut self) -> Self {
        self.answered = true;
        self
    }

    /// The code's canonical name, e.g. `PERMISSION_DENIED`.
    pub fn code_name(&self) -> &'static str {
        code_name(self.code)
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let code = code_words(self.code);
        if self.message.is_empty() {
            write!(f, "{code} ({})", self.code_name())?;
        } else if code == "error" {
            // Not a code people are told by name: `main`'s `error:` says it.
            f.write_str(&self.message)?;
        } else {
            write!(f, "{code}: {}", self.message)?;
        }
        if let Some(id) = &self.request_id {
            write!(f, " (request id {id})")?;
        }
        Ok(())
    }
}

impl std::error::Error for CliError {}

/// The canonical upper-snake name of a gRPC code.
pub fn code_name(code: tonic::Code) -> &'static str {
    usize::try_from(i32::from(code))
        .ok()
        .and_then(|n| CODE_NAMES.get(n))
        .copied()
        .unwrap_or("UNKNOWN")
}

/// What `connect` was told, to explain a connection failure that surfaces
/// only at the first call (a client certificate refused by the server after
/// a TLS 1.3 handshake). A client command makes one connection.
#[derive(Debug)]
struct Peer {
    endpoint: String,
    data_dir: PathBuf,
    ca: PathBuf,
    cert: PathBuf,
    ca_given: bool,
    cert_given: bool,
}

static PEER: Mutex<Option<Peer>> = Mutex::new(None);

fn remember_peer(peer: Peer) {
    if let Ok(mut slot) = PEER.lock() {
        *slot = Some(peer);
    }
}

fn peer() -> Option<Peer> {
    let slot = PEER.lock().ok()?;
    slot.as_ref().map(|p| Peer {
        endpoint: p.endpoint.clone(),
        data_dir: p.data_dir.clone(),
        ca: p.ca.clone(),
        cert: p.cert.clone(),
        ca_given: p.ca_given,
        cert_given: p.cert_given,
    })
}

/// The errors of a source chain, from `err` down.
fn sources<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(err), |e| e.source())
}

/// The rustls error behind `e`, itself or inside an `io::Error` (which
/// tokio-rustls wraps it in, and whose `source()` skips it).
fn rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    e.downcast_ref::<rustls::Error>().or_else(|| {
        e.downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    })
}

/// A connection failure in words that say what to do, when it is one we
/// know: nothing listening, a server certificate from another CA (another
/// data directory's PKI), a client certificate the server refuses.
fn diagnose(err: &(dyn std::error::Error + 'static), peer: &Peer) -> Option<CliError> {
    let endpoint = &peer.endpoint;
    let dir = peer.data_dir.display();
    let unavailable = |message: String| Some(CliError::local(tonic::Code::Unavailable, message));
    let trust_hint = if peer.ca_given {
        "pass the --ca of the server you mean, or the --endpoint of the server that CA belongs to"
            .to_string()
    } else {
        format!(
            "pass the --data-dir of the `coffre dev` running at {endpoint}, or the --endpoint \
             of the server whose data directory is {dir}"
        )
    };
    for e in sources(err) {
        if let Some(tls) = rustls_error(e) {
            use rustls::CertificateError as C;
            return match tls {
                rustls::Error::InvalidCertificate(
                    C::BadSignature | C::UnknownIssuer | C::BadEncoding | C::Other(_),
                ) => unavailable(format!(
                    "the server at {endpoint} presented a certificate not signed by {} \
                     (the CA this client trusts): {trust_hint}",
                    peer.ca.display()
                )),
                rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
                    unavailable(format!(
                        "the certificate of the server at {endpoint} has expired \
                         (restart `coffre dev` to renew the dev PKI in {dir})"
                    ))
                }
                rustls::Error::InvalidCertificate(
                    C::NotValidForName | C::NotValidForNameContext { .. },
                ) => unavailable(format!(
                    "the certificate of the server at {endpoint} is not valid for that host \
                     name: use the name it was issued for (the dev PKI's is localhost or \
                     127.0.0.1)"
                )),
                rustls::Error::AlertReceived(_) => refused_client(peer, ""),
                _ => None,
            };
        }
        // A TLS alert from the server that only h2's error displays (it
        // hides its io::Error from `source()`).
        if e.to_string().contains("received fatal alert") {
            return refused_client(peer, "");
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    return unavailable(format!(
                        "cannot connect to {endpoint}: connection refused: is coffre running \
                         at {endpoint}? (start it with `coffre dev --data-dir {dir}`, or pass \
                         --endpoint)"
                    ));
                }
                std::io::ErrorKind::TimedOut => {
                    return unavailable(format!(
                        "cannot connect to {endpoint}: timed out: is coffre running at \
                         {endpoint}, and does a firewall let this client through?"
                    ));
                }
                _ => {}
            }
        }
    }
    None
}

/// The server ended the handshake with an alert (`how` empty), or closed
/// the connection before answering (`how` says so): it does not accept this
/// client's certificate.
fn refused_client(peer: &Peer, how: &str) -> Option<CliError> {
    let dir = peer.data_dir.display();
    let what = if how.is_empty() {
        format!(
            "refused this client's certificate {} (a TLS alert)",
            peer.cert.display()
        )
    } else {
        format!(
            "{how}: it may have refused this client's certificate {}",
            peer.cert.display()
        )
    };
    let hint = if peer.cert_given {
        "pass a --cert and --cert-key that server's role CAs issued".to_string()
    } else {
        format!(
            "pass that server's data directory as --data-dir (not {dir}), or pass --cert and \
             --cert-key"
        )
    };
    Some(CliError::local(
        tonic::Code::Unavailable,
        format!(
            "the server at {} {what}: it takes only certificates issued by its own role CAs; \
             {hint}",
            peer.endpoint,
        ),
    ))
}

/// The messages of an error's source chain joined by ": ", each said once:
/// a message that an earlier one already contains is dropped, and one that
/// extends the previous one replaces it.
pub fn chain_text(err: &(dyn std::error::Error + 'static)) -> String {
    join_unrepeated(sources(err).map(|e| e.to_string()))
}

/// `parts` joined by ": ", without the repeats [`chain_text`] drops.
pub fn join_unrepeated(parts: impl IntoIterator<Item = String>) -> String {
    let mut kept: Vec<String> = Vec::new();
    for part in parts {
        let part = part.trim().to_string();
        if part.is_empty() || kept.iter().any(|k| k.contains(part.as_str())) {
            continue;
        }
        match kept.last_mut() {
            Some(last) if part.starts_with(last.as_str()) => *last = part,
            _ => kept.push(part),
        }
    }
    kept.join(": ")
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

/// A gRPC error as the [`CliError`] `main` reports: the status's code and
/// message and the request id from its metadata; a transport failure
/// explained as [`connect`] explains one.
pub(super) fn rpc_error(status: tonic::Status) -> anyhow::Error {
    let request_id = status
        .metadata()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let source = std::error::Error::source(&status);
    let parts = std::iter::once(status.message().to_string())
        .chain(source.into_iter().flat_map(sources).map(|e| e.to_string()));
    let message = join_unrepeated(parts);
    // No request id: the server never answered; a transport failure.
    if let (None, Some(source), Some(peer)) = (&request_id, source, peer()) {
        if let Some(explained) = diagnose(source, &peer) {
            return explained.into();
        }
        let closed = ["connection closed", "connection reset", "broken pipe"];
        if closed.iter().any(|c| message.contains(c)) {
            if let Some(explained) = refused_client(&peer, "closed the connection before answering")
            {
                return explained.into();
            }
        }
    }
    CliError {
        code: status.code(),
        message,
        request_id,
        answered: false,
    }
    .into()
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
        assert_eq!(e.to_string(), "error (INTERNAL)");
    }

    #[test]
    fn an_error_carries_the_request_id_the_server_sent() {
        let mut status = tonic::Status::permission_denied("no");
        status
            .metadata_mut()
            .insert(REQUEST_ID_HEADER, "abc-123".parse().unwrap());
        let e = rpc_error(status);
        assert_eq!(e.to_string(), "permission denied: no (request id abc-123)");
        let cli = e.downcast_ref::<CliError>().unwrap();
        assert_eq!(cli.code_name(), "PERMISSION_DENIED");
        assert_eq!(cli.request_id.as_deref(), Some("abc-123"));
    }

    #[test]
    fn repeated_messages_are_said_once() {
        let parts = [
            "transport error",
            "transport error: invalid peer certificate: BadSignature",
            "invalid peer certificate: BadSignature",
            "invalid peer certificate: BadSignature",
        ]
        .map(String::from);
        assert_eq!(
            join_unrepeated(parts),
            "transport error: invalid peer certificate: BadSignature"
        );
        let parts = ["cannot connect", "refused", "", "refused"].map(String::from);
        assert_eq!(join_unrepeated(parts), "cannot connect: refused");
    }
}
