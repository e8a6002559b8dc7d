//! The server's mTLS: our own rustls configuration rather than tonic's, so
//! that client certificates are checked against a revocation list (CRL) that
//! can be reloaded while the server runs.
//!
//! - Client certificates are mandatory and verified by rustls'
//!   [`WebPkiClientVerifier`]: the chain must end at the configured client
//!   CA, every certificate must be within its validity period (an expired
//!   certificate is refused), and, when a CRL is configured, no certificate
//!   of the chain may be revoked. A certificate whose revocation status the
//!   CRLs cannot tell is refused (webpki's default: fail closed).
//! - The verifier sits behind [`ReloadableVerifier`], which delegates to the
//!   current one. [`ClientAuth::reload`] builds a new verifier from the CRL
//!   file and swaps it in for the next handshakes; a CRL that does not load
//!   leaves the previous verifier in place (never fail open). The client CA
//!   itself is read once at start: changing it needs a restart.
//! - TLS session resumption is off (no session cache, no tickets): a resumed
//!   session skips the client-certificate check, so every new connection
//!   gets a full handshake and meets the current CRL and the current time.
//!   gRPC connections are long-lived; the cost is negligible.
//! - Connections established before a revocation are not cut: the CRL
//!   applies to new connections.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{Context, anyhow, bail};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

/// How often the CRL file's modification time is checked, by default.
pub const DEFAULT_CRL_RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// The server's TLS material, PEM-encoded, and where the CRL is. Client
/// certificates are required and must chain to `client_ca_pem`.
#[derive(Clone)]
pub struct ServerTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: zeroize::Zeroizing<Vec<u8>>,
    pub client_ca_pem: Vec<u8>,
    /// A revocation list (PEM, possibly several, or one DER), re-read on
    /// [`ClientAuth::reload`]; `None`: no revocation checking.
    pub crl: Option<PathBuf>,
    /// How often the CRL file is checked for changes.
    pub crl_reload_interval: Duration,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("crl", &self.crl)
            .field("crl_reload_interval", &self.crl_reload_interval)
            .finish_non_exhaustive()
    }
}

/// The rustls configuration to serve with, and the handle that reloads its
/// client verification.
#[derive(Debug)]
pub struct PreparedTls {
    pub(super) config: Arc<ServerConfig>,
    client_auth: Arc<ClientAuth>,
}

impl PreparedTls {
    /// Parses the certificates, the key, the client CA and the CRL; any
    /// problem is an error here, at start.
    pub fn new(tls: &ServerTls) -> anyhow::Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());

        let certs = CertificateDer::pem_slice_iter(&tls.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow!("the server certificate is not valid PEM: {e}"))?;
        if certs.is_empty() {
            bail!("the server certificate file holds no certificate");
        }
        let key = PrivateKeyDer::from_pem_slice(&tls.key_pem)
            .map_err(|e| anyhow!("the server key is not a valid PEM private key: {e}"))?;

        let client_auth = Arc::new(ClientAuth::new(
            Arc::clone(&provider),
            &tls.client_ca_pem,
            tls.crl.clone(),
        )?);

        let verifier: Arc<dyn ClientCertVerifier> = Arc::clone(&client_auth.verifier) as _;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .context("the server certificate and key do not go together")?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        // No resumption: see the module documentation.
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Self {
            config: Arc::new(config),
            client_auth,
        })
    }

    /// The handle that reloads the CRL.
    pub fn client_auth(&self) -> Arc<ClientAuth> {
        Arc::clone(&self.client_auth)
    }
}

/// Client-certificate verification and its reload.
#[derive(Debug)]
pub struct ClientAuth {
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    /// The client CA certificates (DER), to check CRL signatures at load.
    cas: Vec<CertificateDer<'static>>,
    crl: Option<PathBuf>,
    verifier: Arc<ReloadableVerifier>,
    /// The CRL file's modification time and length when last read.
    seen: Mutex<Option<(SystemTime, u64)>>,
}

impl ClientAuth {
    fn new(
        provider: Arc<CryptoProvider>,
        client_ca_pem: &[u8],
        crl: Option<PathBuf>,
    ) -> anyhow::Result<Self> {
        let cas = CertificateDer::pem_slice_iter(client_ca_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow!("the client CA file is not valid PEM: {e}"))?;
        if cas.is_empty() {
            bail!("the client CA file holds no certificate");
        }
        let mut roots = RootCertStore::empty();
        for ca in &cas {
            roots
                .add(ca.clone())
                .context("the client CA certificate is not usable as a trust anchor")?;
        }
        let roots = Arc::new(roots);
        let stamp = crl.as_deref().map(file_stamp).transpose()?;
        let initial = build_verifier(&provider, &roots, &cas, crl.as_deref())?;
        let verifier = Arc::new(ReloadableVerifier {
            hints: initial.root_hint_subjects().to_vec(),
            current: RwLock::new(initial),
        });
        Ok(Self {
            provider,
            roots,
            cas,
            crl,
            verifier,
            seen: Mutex::new(stamp.flatten()),
        })
    }

    /// The CRL file, if one is configured.
    pub fn crl_path(&self) -> Option<&Path> {
        self.crl.as_deref()
    }

    /// Re-reads the CRL and, if it loads, verifies new connections with it.
    /// If it does not, the previous verifier stays and the error is returned.
    pub fn reload(&self) -> anyhow::Result<()> {
        let Some(path) = self.crl.as_deref() else {
            return Ok(());
        };
        // The stamp is taken before reading, so a write during the read is
        // seen as a change at the next check.
        let stamp = file_stamp(path).ok().flatten();
        *self.seen.lock().unwrap_or_else(PoisonError::into_inner) = stamp;
        let verifier = build_verifier(&self.provider, &self.roots, &self.cas, Some(path))?;
        self.verifier.set(verifier);
        Ok(())
    }

    /// Reloads if the CRL file's modification time or length changed since
    /// it was last read. `Ok(true)` when it reloaded.
    pub fn reload_if_changed(&self) -> anyhow::Result<bool> {
        let Some(path) = self.crl.as_deref() else {
            return Ok(false);
        };
        let now = file_stamp(path)?;
        let changed = *self.seen.lock().unwrap_or_else(PoisonError::into_inner) != now;
        if changed {
            self.reload()?;
        }
        Ok(changed)
    }
}

/// A file's modification time and length; `None` if the file system does
/// not report a modification time.
fn file_stamp(path: &Path) -> anyhow::Result<Option<(SystemTime, u64)>> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("reading the CRL {}", path.display()))?;
    Ok(meta.modified().ok().map(|m| (m, meta.len())))
}

fn build_verifier(
    provider: &Arc<CryptoProvider>,
    roots: &Arc<RootCertStore>,
    cas: &[CertificateDer<'static>],
    crl: Option<&Path>,
) -> anyhow::Result<Arc<dyn ClientCertVerifier>> {
    let mut builder =
        WebPkiClientVerifier::builder_with_provider(Arc::clone(roots), Arc::clone(provider));
    if let Some(path) = crl {
        let crls =
            read_crls(path, cas).with_context(|| format!("in the CRL {}", path.display()))?;
        builder = builder.with_crls(crls);
    }
    builder
        .build()
        .map_err(|e| anyhow!("building the client certificate verifier: {e}"))
}

/// Reads a CRL file: PEM (one or more `X509 CRL` blocks) or one DER CRL.
/// Each must parse, and one issued by a configured client CA must carry a
/// valid signature from it: a CRL that would make webpki refuse everyone, or
/// nobody, is refused here instead.
fn read_crls(
    path: &Path,
    cas: &[CertificateDer<'static>],
) -> anyhow::Result<Vec<CertificateRevocationListDer<'static>>> {
    let bytes = std::fs::read(path).context("reading the file")?;
    let is_pem = bytes.trim_ascii_start().starts_with(b"-----BEGIN");
    let crls = if is_pem {
        CertificateRevocationListDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow!("not valid PEM: {e}"))?
    } else {
        vec![CertificateRevocationListDer::from(bytes)]
    };
    if crls.is_empty() {
        bail!("no CRL in the file (expected -----BEGIN X509 CRL----- or DER)");
    }
    let mut revoked = 0;
    for der in &crls {
        let (rest, crl) = CertificateRevocationList::from_der(der.as_ref())
            .map_err(|e| anyhow!("not a valid X.509 CRL: {e}"))?;
        if !rest.is_empty() {
            bail!("trailing bytes after the CRL");
        }
        let issuer = cas.iter().find_map(|ca| {
            X509Certificate::from_der(ca.as_ref())
                .ok()
                .map(|(_, c)| c)
                .filter(|c| c.subject().as_raw() == crl.issuer().as_raw())
        });
        match issuer {
            Some(ca) => crl
                .verify_signature(ca.public_key())
                .map_err(|e| anyhow!("its signature does not verify with the client CA: {e}"))?,
            // Issued by an intermediate CA: webpki checks the signature
            // during the handshake, against the chain the client presents.
            None => tracing::warn!(
                issuer = %crl.issuer(),
                "the CRL is not issued by a configured client CA; its signature is checked at each handshake"
            ),
        }
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        if let Some(next) = crl.next_update().filter(|n| n.timestamp() < now) {
            tracing::warn!(issuer = %crl.issuer(), next_update = %next, "the CRL is past its nextUpdate: publish a fresh one");
        }
        revoked += crl.iter_revoked_certificates().count();
    }
    tracing::info!(
        crls = crls.len(),
        revoked,
        "loaded the client certificate revocation list"
    );
    Ok(crls)
}

/// A client-certificate verifier that delegates to the current one, which
/// [`ClientAuth::reload`] replaces. Client authentication is mandatory
/// whatever the delegate says.
#[derive(Debug)]
struct ReloadableVerifier {
    current: RwLock<Arc<dyn ClientCertVerifier>>,
    /// The CA names offered to clients: fixed, as the client CA is.
    hints: Vec<DistinguishedName>,
}

impl ReloadableVerifier {
    fn get(&self) -> Arc<dyn ClientCertVerifier> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn set(&self, verifier: Arc<dyn ClientCertVerifier>) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = verifier;
    }
}

impl ClientCertVerifier for ReloadableVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.get()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.get().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.get().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.get().supported_verify_schemes()
    }
}
