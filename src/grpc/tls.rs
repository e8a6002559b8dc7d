//! The server's mTLS: our own rustls configuration rather than tonic's, so
//! that client certificates are checked against a revocation list (CRL) that
//! can be reloaded while the server runs, and bound to the CA of their role.
//!
//! - Client certificates are mandatory and verified by rustls'
//!   [`WebPkiClientVerifier`]: the chain must end at one of the configured
//!   client CAs (the union of the role CAs, or the shared `client_ca`),
//!   every certificate must be within its validity period (an expired
//!   certificate is refused), and, when a CRL is configured, no certificate
//!   of the chain may be revoked. A certificate whose revocation status the
//!   CRLs cannot tell is refused (webpki's default: fail closed).
//! - Which role CA a chain must end at depends on the principal, which the
//!   handshake does not know: [`IdentityBinding`] checks it after the
//!   handshake (`super::auth`), with rustls' verifier over the role's CAs
//!   alone. [`PreparedTls::new`] refuses role CAs where the service CA and
//!   the operator or auditor CA are one anchor (same certificate or key, or
//!   one issued by the other) unless `allow_shared_client_ca` says so.
//! - The verifier sits behind [`ReloadableVerifier`], which delegates to the
//!   current one. [`ClientAuth::reload`] builds a new verifier from the CRL
//!   file and swaps it in for the next handshakes; a CRL that does not load
//!   leaves the previous verifier in place (never fail open). The client CAs
//!   themselves are read once at start: changing them needs a restart.
//! - CRL freshness: a CRL without a nextUpdate, or past its nextUpdate by
//!   more than the configured grace (`tls.crl_grace_secs`, default 0), is
//!   refused at load, and a loaded CRL that becomes stale makes every new
//!   handshake fail (fail closed; rustls' `enforce_revocation_expiration`
//!   with no grace).
//! - CRL rollback: a CRL whose `crlNumber` (or, without one, `thisUpdate`)
//!   is lower than the highest seen from its issuer is refused (the previous
//!   CRL stays, the error is logged and counted), so a replayed old CRL
//!   cannot lift a revocation. This covers CRLs issued by a configured
//!   client CA, whose signature is checked at load; one from an
//!   intermediate CA is checked by webpki at each handshake only, so its
//!   number is not trusted at load and not tracked. The highest seen per issuer is persisted in
//!   the data directory (`crl-state.json`), so a restart does not forget it.
//! - TLS session resumption is off (no session cache, no tickets): a resumed
//!   session skips the client-certificate check, so every new connection
//!   gets a full handshake and meets the current CRL and the current time.
//!   gRPC connections are long-lived; the cost is negligible.
//! - Connections established before a revocation are not cut: the CRL
//!   applies to new connections.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
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
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};
use serde::{Deserialize, Serialize};
use x509_parser::num_bigint::BigUint;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use crate::authz::Role;

/// How often the CRL file's modification time is checked, by default.
pub const DEFAULT_CRL_RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// The client CAs, PEM-encoded.
#[derive(Clone, Debug)]
pub enum ClientCaPems {
    /// One bundle for every role (`tls.client_ca`).
    Shared(Vec<u8>),
    /// A bundle per role (`tls.operator_ca`, …).
    PerRole(Vec<(Role, Vec<u8>)>),
}

/// The server's TLS material, PEM-encoded, and where the CRL is. Client
/// certificates are required and must chain to a client CA.
#[derive(Clone)]
pub struct ServerTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: zeroize::Zeroizing<Vec<u8>>,
    pub client_cas: ClientCaPems,
    /// `tls.allow_shared_client_ca`: a shared CA, or role CAs that overlap,
    /// are accepted (with a warning).
    pub allow_shared_client_ca: bool,
    /// A revocation list (PEM, possibly several, or one DER), re-read on
    /// [`ClientAuth::reload`]; `None`: no revocation checking.
    pub crl: Option<PathBuf>,
    /// How often the CRL file is checked for changes.
    pub crl_reload_interval: Duration,
    /// How long past its nextUpdate a CRL is still accepted.
    pub crl_grace: Duration,
    /// Where the highest CRL number seen per issuer is kept
    /// (`DataDir::crl_state`); `None`: in memory only.
    pub crl_state: Option<PathBuf>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("allow_shared_client_ca", &self.allow_shared_client_ca)
            .field("crl", &self.crl)
            .field("crl_reload_interval", &self.crl_reload_interval)
            .field("crl_grace", &self.crl_grace)
            .field("crl_state", &self.crl_state)
            .finish_non_exhaustive()
    }
}

/// The rustls configuration to serve with, the handle that reloads its
/// client verification, and the check that binds a principal to its
/// role's CA.
#[derive(Debug)]
pub struct PreparedTls {
    pub(super) config: Arc<ServerConfig>,
    client_auth: Arc<ClientAuth>,
    binding: Arc<IdentityBinding>,
}

fn parse_bundle(pem: &[u8], what: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let cas = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("the {what} file is not valid PEM: {e}"))?;
    if cas.is_empty() {
        bail!("the {what} file holds no certificate");
    }
    Ok(cas)
}

fn root_store(cas: &[CertificateDer<'static>], what: &str) -> anyhow::Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots
            .add(ca.clone())
            .with_context(|| format!("the {what} certificate is not usable as a trust anchor"))?;
    }
    Ok(Arc::new(roots))
}

impl PreparedTls {
    /// Parses the certificates, the key, the client CAs and the CRL; any
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

        let (union, binding) = match &tls.client_cas {
            ClientCaPems::Shared(pem) => {
                tracing::warn!(
                    "tls.client_ca: one CA for every role (allowed by tls.allow_shared_client_ca); \
                     any certificate it issues may name any principal"
                );
                (
                    parse_bundle(pem, "client CA")?,
                    IdentityBinding { per_role: None },
                )
            }
            ClientCaPems::PerRole(bundles) => {
                let mut union = Vec::new();
                let mut per_role = Vec::new();
                let mut parsed = Vec::new();
                for (role, pem) in bundles {
                    let what = format!("{role} CA");
                    let cas = parse_bundle(pem, &what)?;
                    let verifier = WebPkiClientVerifier::builder_with_provider(
                        root_store(&cas, &what)?,
                        Arc::clone(&provider),
                    )
                    .build()
                    .map_err(|e| anyhow!("building the {role} CA verifier: {e}"))?;
                    per_role.push((*role, verifier));
                    union.extend(cas.iter().cloned());
                    parsed.push((*role, cas));
                }
                check_overlap(&parsed, tls.allow_shared_client_ca)?;
                (
                    union,
                    IdentityBinding {
                        per_role: Some(per_role),
                    },
                )
            }
        };

        let client_auth = Arc::new(ClientAuth::new(
            Arc::clone(&provider),
            union,
            tls.crl.clone(),
            tls.crl_grace,
            tls.crl_state.clone(),
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
            binding: Arc::new(binding),
        })
    }

    /// The handle that reloads the CRL.
    pub fn client_auth(&self) -> Arc<ClientAuth> {
        Arc::clone(&self.client_auth)
    }

    /// The check of a principal's chain against its role's CAs.
    pub fn binding(&self) -> Arc<IdentityBinding> {
        Arc::clone(&self.binding)
    }
}

/// Refuses role CAs where the service CA and the operator or auditor CA
/// are one anchor (same certificate or key, or one issued by the other),
/// unless `allowed`.
fn check_overlap(
    parsed: &[(Role, Vec<CertificateDer<'static>>)],
    allowed: bool,
) -> anyhow::Result<()> {
    let ders = |role: Role| -> Vec<Vec<u8>> {
        parsed
            .iter()
            .filter(|(r, _)| *r == role)
            .flat_map(|(_, cas)| cas.iter().map(|c| c.as_ref().to_vec()))
            .collect()
    };
    let service = ders(Role::Service);
    for other in [Role::Operator, Role::Auditor] {
        if let Some(why) = crate::pki::anchors_overlap(&service, &ders(other)) {
            if !allowed {
                bail!(
                    "tls.service_ca and tls.{other}_ca overlap ({why}): the anchor of the hosted \
                     services could issue an {other}. Give the {other}s a CA of their own, or accept \
                     this with tls.allow_shared_client_ca = true"
                );
            }
            tracing::warn!(%why, "tls.service_ca and tls.{other}_ca overlap (allowed by tls.allow_shared_client_ca)");
        }
    }
    Ok(())
}

/// Binds a principal to the CA of its role: after the handshake (which
/// accepts a chain to any client CA), the chain the client presented must
/// also verify against its role's CAs alone.
pub struct IdentityBinding {
    /// `None`: one shared client CA, nothing more to check.
    per_role: Option<Vec<(Role, Arc<dyn ClientCertVerifier>)>>,
}

impl std::fmt::Debug for IdentityBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let roles: Option<Vec<Role>> = self
            .per_role
            .as_ref()
            .map(|v| v.iter().map(|(r, _)| *r).collect());
        f.debug_struct("IdentityBinding")
            .field("per_role", &roles)
            .finish()
    }
}

impl IdentityBinding {
    /// No binding (one shared CA): for tests of the layers above.
    pub fn shared() -> Self {
        Self { per_role: None }
    }

    /// Whether `leaf` with `intermediates` (as the client presented them)
    /// chains to a CA of `role`. The error says why not.
    pub fn check(
        &self,
        role: Role,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), String> {
        let Some(per_role) = &self.per_role else {
            return Ok(());
        };
        let Some((_, verifier)) = per_role.iter().find(|(r, _)| *r == role) else {
            return Err(format!(
                "no CA is configured for the {role} role (tls.{role}_ca)"
            ));
        };
        verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map(|_| ())
            .map_err(|e| {
                tracing::warn!(%role, error = %e, "a client certificate does not chain to its role's CA");
                format!("the client certificate is not issued by a CA of the {role} role (tls.{role}_ca)")
            })
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
    grace: Duration,
    /// The highest CRL seen per issuer, and where it is persisted.
    marks: Mutex<CrlState>,
    state_file: Option<PathBuf>,
    verifier: Arc<ReloadableVerifier>,
    /// The CRL file's modification time and length when last read.
    seen: Mutex<Option<(SystemTime, u64)>>,
    rollbacks_refused: AtomicU64,
    loads_refused: AtomicU64,
}

impl ClientAuth {
    fn new(
        provider: Arc<CryptoProvider>,
        cas: Vec<CertificateDer<'static>>,
        crl: Option<PathBuf>,
        grace: Duration,
        state_file: Option<PathBuf>,
    ) -> anyhow::Result<Self> {
        let roots = root_store(&cas, "client CA")?;
        let marks = match (&crl, &state_file) {
            (Some(_), Some(file)) => CrlState::read(file)?,
            _ => CrlState::default(),
        };
        let stamp = crl.as_deref().map(file_stamp).transpose()?;
        let (initial, fresh_until, first_marks) = match crl.as_deref() {
            None => (
                build_verifier(&provider, &roots, None, grace)?,
                i64::MAX,
                Vec::new(),
            ),
            Some(path) => {
                let LoadedCrls {
                    crls,
                    marks: first,
                    fresh_until,
                } = load_crls(path, &cas, grace, &marks)?;
                let verifier = build_verifier(&provider, &roots, Some(crls), grace)?;
                (verifier, fresh_until, first)
            }
        };
        let verifier = Arc::new(ReloadableVerifier {
            hints: initial.root_hint_subjects().to_vec(),
            current: RwLock::new(initial),
            fresh_until: AtomicI64::new(fresh_until),
        });
        let auth = Self {
            provider,
            roots,
            cas,
            crl,
            grace,
            marks: Mutex::new(marks),
            state_file,
            verifier,
            seen: Mutex::new(stamp.flatten()),
            rollbacks_refused: AtomicU64::new(0),
            loads_refused: AtomicU64::new(0),
        };
        auth.remember(&first_marks)
            .context("persisting the highest CRL numbers")?;
        Ok(auth)
    }

    fn lock_marks(&self) -> std::sync::MutexGuard<'_, CrlState> {
        self.marks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Raises the highest CRL seen per issuer to `marks` and persists it.
    fn remember(&self, marks: &[(String, CrlMark)]) -> anyhow::Result<()> {
        let mut state = self.lock_marks();
        let mut changed = false;
        for (issuer, mark) in marks {
            match state.issuers.get(issuer) {
                Some(old) if !old.is_older_than(mark) => {}
                _ => {
                    state.issuers.insert(issuer.clone(), mark.clone());
                    changed = true;
                }
            }
        }
        match &self.state_file {
            Some(file) if changed => state.write(file),
            _ => Ok(()),
        }
    }

    /// The CRL file, if one is configured.
    pub fn crl_path(&self) -> Option<&Path> {
        self.crl.as_deref()
    }

    /// CRLs refused because they were older than one already seen.
    pub fn crl_rollbacks_refused(&self) -> u64 {
        self.rollbacks_refused.load(Ordering::Relaxed)
    }

    /// CRL reloads refused, for any reason (rollbacks included).
    pub fn crl_reloads_refused(&self) -> u64 {
        self.loads_refused.load(Ordering::Relaxed)
    }

    /// Until when (Unix seconds) the loaded CRLs are fresh: the earliest
    /// nextUpdate plus the grace; `None` without a CRL.
    pub fn crl_fresh_until(&self) -> Option<i64> {
        self.crl.as_ref()?;
        Some(self.verifier.fresh_until.load(Ordering::Relaxed))
    }

    /// Re-reads the CRL and, if it loads, verifies new connections with it.
    /// If it does not (unreadable, badly signed, stale, or older than the
    /// one in force: a rollback), the previous verifier stays and the error
    /// is returned.
    pub fn reload(&self) -> anyhow::Result<()> {
        let Some(path) = self.crl.as_deref() else {
            return Ok(());
        };
        // The stamp is taken before reading, so a write during the read is
        // seen as a change at the next check.
        let stamp = file_stamp(path).ok().flatten();
        *self.seen.lock().unwrap_or_else(PoisonError::into_inner) = stamp;
        let loaded = {
            let marks = self.lock_marks();
            load_crls(path, &self.cas, self.grace, &marks)
        };
        let loaded = match loaded {
            Ok(loaded) => loaded,
            Err(e) => {
                self.loads_refused.fetch_add(1, Ordering::Relaxed);
                if e.downcast_ref::<CrlRollback>().is_some() {
                    self.rollbacks_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        error = format!("{e:#}"),
                        "CRL ROLLBACK REFUSED: the CRL file holds an older CRL than the one in force; \
                         someone may be replaying it to lift a revocation"
                    );
                }
                return Err(e);
            }
        };
        let verifier = build_verifier(&self.provider, &self.roots, Some(loaded.crls), self.grace)?;
        self.verifier.set(verifier, loaded.fresh_until);
        if let Err(e) = self.remember(&loaded.marks) {
            // The new CRL is in force; only its memory across restarts is lost.
            tracing::error!(
                error = format!("{e:#}"),
                "cannot persist the highest CRL numbers"
            );
        }
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
    crls: Option<Vec<CertificateRevocationListDer<'static>>>,
    grace: Duration,
) -> anyhow::Result<Arc<dyn ClientCertVerifier>> {
    let mut builder =
        WebPkiClientVerifier::builder_with_provider(Arc::clone(roots), Arc::clone(provider));
    if let Some(crls) = crls {
        builder = builder.with_crls(crls);
        if grace.is_zero() {
            // With a grace, ReloadableVerifier enforces nextUpdate + grace.
            builder = builder.enforce_revocation_expiration();
        }
    }
    builder
        .build()
        .map_err(|e| anyhow!("building the client certificate verifier: {e}"))
}

/// The persisted highest CRL per issuer (`crl-state.json`):
/// `{"issuers": {"<issuer DN, DER, hex>": {"crl_number": "<decimal>",
/// "this_update": <Unix seconds>, "issuer": "<DN>"}}}`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct CrlState {
    issuers: BTreeMap<String, CrlMark>,
}

impl CrlState {
    fn read(file: &Path) -> anyhow::Result<Self> {
        match std::fs::read(file) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "{} does not parse (it keeps the highest CRL number seen per issuer)",
                    file.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", file.display())),
        }
    }

    fn write(&self, file: &Path) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).context("encoding the CRL state")?;
        crate::fsutil::write_atomic(file, &bytes, false)
            .with_context(|| format!("writing {}", file.display()))
    }
}

/// Where a CRL stands in its issuer's sequence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct CrlMark {
    /// Its crlNumber, in decimal, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    crl_number: Option<String>,
    /// Its thisUpdate, Unix seconds.
    this_update: i64,
    /// The issuer's name, for people.
    #[serde(default)]
    issuer: String,
}

impl CrlMark {
    fn number(&self) -> Option<BigUint> {
        BigUint::parse_bytes(self.crl_number.as_deref()?.as_bytes(), 10)
    }

    /// Older than `other`: a lower crlNumber when both have one (the same
    /// number with an earlier thisUpdate too), else an earlier thisUpdate.
    fn is_older_than(&self, other: &CrlMark) -> bool {
        match (self.number(), other.number()) {
            (Some(a), Some(b)) if a != b => a < b,
            _ => self.this_update < other.this_update,
        }
    }
}

/// A CRL older than the one already seen from its issuer.
#[derive(Debug, thiserror::Error)]
#[error(
    "the CRL from {issuer} (crlNumber {new_number}, thisUpdate {new_this_update}) is older than \
     the one already seen (crlNumber {old_number}, thisUpdate {old_this_update}): refused as a rollback"
)]
struct CrlRollback {
    issuer: String,
    new_number: String,
    new_this_update: i64,
    old_number: String,
    old_this_update: i64,
}

/// CRLs as loaded: the DER to verify with, each one's mark, and until when
/// (Unix seconds) they are all fresh.
struct LoadedCrls {
    crls: Vec<CertificateRevocationListDer<'static>>,
    marks: Vec<(String, CrlMark)>,
    fresh_until: i64,
}

/// Reads the CRL file and refuses it if any CRL in it is older than the
/// highest seen from its issuer (`marks`).
fn load_crls(
    path: &Path,
    cas: &[CertificateDer<'static>],
    grace: Duration,
    marks: &CrlState,
) -> anyhow::Result<LoadedCrls> {
    let loaded =
        read_crls(path, cas, grace).with_context(|| format!("in the CRL {}", path.display()))?;
    for (issuer, mark) in &loaded.marks {
        if let Some(old) = marks.issuers.get(issuer)
            && mark.is_older_than(old)
        {
            let num = |m: &CrlMark| m.crl_number.clone().unwrap_or_else(|| "none".into());
            return Err(anyhow::Error::new(CrlRollback {
                issuer: mark.issuer.clone(),
                new_number: num(mark),
                new_this_update: mark.this_update,
                old_number: num(old),
                old_this_update: old.this_update,
            })
            .context(format!("in the CRL {}", path.display())));
        }
    }
    Ok(loaded)
}

/// Reads a CRL file: PEM (one or more `X509 CRL` blocks) or one DER CRL.
/// Each must parse, have a nextUpdate no further in the past than `grace`,
/// and one issued by a configured client CA must carry a valid signature
/// from it: a CRL that would make webpki refuse everyone, or nobody, is
/// refused here instead.
fn read_crls(
    path: &Path,
    cas: &[CertificateDer<'static>],
    grace: Duration,
) -> anyhow::Result<LoadedCrls> {
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
    let grace = i64::try_from(grace.as_secs()).unwrap_or(i64::MAX);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut revoked = 0;
    let mut marks = Vec::with_capacity(crls.len());
    let mut fresh_until = i64::MAX;
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
        let verified = issuer.is_some();
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
        let Some(next) = crl.next_update() else {
            bail!(
                "the CRL from {} has no nextUpdate: its freshness cannot be checked",
                crl.issuer()
            );
        };
        let until = next.timestamp().saturating_add(grace);
        if until < now {
            bail!(
                "the CRL from {} is past its nextUpdate ({next}){}: publish a fresh one",
                crl.issuer(),
                if grace > 0 {
                    " and the grace of tls.crl_grace_secs"
                } else {
                    ""
                }
            );
        }
        fresh_until = fresh_until.min(until);
        // Only a CRL whose signature was checked here counts for rollback:
        // an unsigned one with a huge number must not block the real ones.
        if verified {
            marks.push((
                hex::encode(crl.issuer().as_raw()),
                CrlMark {
                    crl_number: crl.crl_number().map(|n| n.to_string()),
                    this_update: crl.last_update().timestamp(),
                    issuer: crl.issuer().to_string(),
                },
            ));
        }
        revoked += crl.iter_revoked_certificates().count();
    }
    tracing::info!(
        crls = crls.len(),
        revoked,
        "loaded the client certificate revocation list"
    );
    Ok(LoadedCrls {
        crls,
        marks,
        fresh_until,
    })
}

/// A client-certificate verifier that delegates to the current one, which
/// [`ClientAuth::reload`] replaces. Client authentication is mandatory
/// whatever the delegate says, and a handshake after the current CRLs'
/// nextUpdate (plus the grace) is refused.
#[derive(Debug)]
struct ReloadableVerifier {
    current: RwLock<Arc<dyn ClientCertVerifier>>,
    /// Unix seconds after which the current CRLs are stale.
    fresh_until: AtomicI64,
    /// The CA names offered to clients: fixed, as the client CAs are.
    hints: Vec<DistinguishedName>,
}

impl ReloadableVerifier {
    fn get(&self) -> Arc<dyn ClientCertVerifier> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn set(&self, verifier: Arc<dyn ClientCertVerifier>, fresh_until: i64) {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        *current = verifier;
        self.fresh_until.store(fresh_until, Ordering::Relaxed);
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
        let until = self.fresh_until.load(Ordering::Relaxed);
        if i64::try_from(now.as_secs()).unwrap_or(i64::MAX) > until {
            tracing::warn!(
                fresh_until = until,
                "a client is refused: the CRL is past its nextUpdate; publish a fresh one"
            );
            return Err(CertificateError::ExpiredRevocationList.into());
        }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::pki::{self, DevCrlSpec, PkiPaths};

    /// A client auth on a dev PKI's role CAs with `crl` as its CRL file.
    fn client_auth(dir: &Path, crl: &str, grace: Duration) -> anyhow::Result<ClientAuth> {
        let paths = PkiPaths::new(dir);
        let mut cas = Vec::new();
        for role in pki::ROLES {
            cas.extend(
                parse_bundle(&std::fs::read(paths.role_ca_cert(role)).unwrap(), "ca").unwrap(),
            );
        }
        let file = dir.join("crl.pem");
        std::fs::write(&file, crl).unwrap();
        ClientAuth::new(
            Arc::new(rustls::crypto::ring::default_provider()),
            cas,
            Some(file),
            grace,
            Some(dir.join("crl-state.json")),
        )
    }

    fn crls(paths: &PkiPaths, spec: DevCrlSpec) -> String {
        pki::ROLES
            .iter()
            .map(|r| pki::dev_crl_from(paths, *r, &[], spec).unwrap())
            .collect()
    }

    #[test]
    fn a_crl_that_goes_stale_refuses_handshakes_after_its_grace() {
        let dir = tempfile::tempdir().unwrap();
        pki::ensure_dev_pki(dir.path()).unwrap();
        let paths = PkiPaths::new(dir.path());
        let now = time::OffsetDateTime::now_utc();
        let next = now + time::Duration::days(2);
        let spec = DevCrlSpec {
            this_update: now - time::Duration::hours(1),
            next_update: next,
            crl_number: 7,
        };
        let leaf =
            CertificateDer::from_pem_slice(&std::fs::read(paths.client_cert("operator")).unwrap())
                .unwrap();
        let at = |t: time::OffsetDateTime| {
            UnixTime::since_unix_epoch(Duration::from_secs(t.unix_timestamp() as u64))
        };
        for grace in [Duration::ZERO, Duration::from_secs(3600)] {
            let auth = client_auth(dir.path(), &crls(&paths, spec), grace).unwrap();
            let v = &auth.verifier;
            v.verify_client_cert(&leaf, &[], at(now)).unwrap();
            let within = next + time::Duration::seconds(grace.as_secs() as i64 / 2);
            if !grace.is_zero() {
                v.verify_client_cert(&leaf, &[], at(within)).unwrap();
            }
            let past = next + time::Duration::seconds(grace.as_secs() as i64 + 60);
            let err = v.verify_client_cert(&leaf, &[], at(past)).unwrap_err();
            assert!(
                matches!(
                    err,
                    rustls::Error::InvalidCertificate(
                        CertificateError::ExpiredRevocationList
                            | CertificateError::ExpiredRevocationListContext { .. }
                    )
                ),
                "{err:?}"
            );
        }
    }

    #[test]
    fn only_crls_checked_at_load_count_for_rollback() {
        use rcgen::{
            BasicConstraints, CertificateParams, CertificateRevocationListParams, IsCa, Issuer,
            KeyIdMethod, KeyPair, SerialNumber,
        };
        let dir = tempfile::tempdir().unwrap();
        pki::ensure_dev_pki(dir.path()).unwrap();
        let paths = PkiPaths::new(dir.path());
        // A CRL from a CA that is not configured (an intermediate, say),
        // with a huge number: not trusted at load, so not remembered.
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "not configured");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = Issuer::new(params, key);
        let now = time::OffsetDateTime::now_utc();
        let foreign = CertificateRevocationListParams {
            this_update: now - time::Duration::hours(1),
            next_update: now + time::Duration::days(1),
            crl_number: SerialNumber::from(u64::MAX),
            issuing_distribution_point: None,
            revoked_certs: Vec::new(),
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&issuer)
        .unwrap()
        .pem()
        .unwrap();
        let file = format!("{}{foreign}", crls(&paths, DevCrlSpec::fresh()));
        let auth = client_auth(dir.path(), &file, Duration::ZERO).unwrap();
        let marks = auth.lock_marks();
        assert_eq!(marks.issuers.len(), 3, "the three role CAs only");
        assert!(
            marks
                .issuers
                .values()
                .all(|m| m.issuer != "CN=not configured")
        );
    }

    #[test]
    fn crl_marks_order_by_number_then_this_update() {
        let mark = |n: Option<&str>, t| CrlMark {
            crl_number: n.map(str::to_string),
            this_update: t,
            issuer: String::new(),
        };
        assert!(mark(Some("9"), 50).is_older_than(&mark(Some("10"), 10)));
        assert!(!mark(Some("10"), 10).is_older_than(&mark(Some("9"), 50)));
        assert!(mark(Some("10"), 9).is_older_than(&mark(Some("10"), 10)));
        assert!(!mark(Some("10"), 10).is_older_than(&mark(Some("10"), 10)));
        assert!(mark(None, 9).is_older_than(&mark(Some("10"), 10)));
        assert!(!mark(None, 11).is_older_than(&mark(None, 10)));
        // Numbers of 20 octets compare as numbers.
        let big = "1461501637330902918203684832716283019655932542975";
        assert!(mark(Some("2"), 0).is_older_than(&mark(Some(big), 0)));
    }

    #[test]
    fn a_stale_crl_is_refused_at_load_unless_within_its_grace() {
        let dir = tempfile::tempdir().unwrap();
        pki::ensure_dev_pki(dir.path()).unwrap();
        let paths = PkiPaths::new(dir.path());
        let now = time::OffsetDateTime::now_utc();
        let stale = DevCrlSpec {
            this_update: now - time::Duration::days(3),
            next_update: now - time::Duration::hours(2),
            crl_number: 1,
        };
        let err = client_auth(dir.path(), &crls(&paths, stale), Duration::ZERO).unwrap_err();
        assert!(format!("{err:#}").contains("nextUpdate"), "{err:#}");
        // Within a three-hour grace it loads.
        client_auth(
            dir.path(),
            &crls(&paths, stale),
            Duration::from_secs(3 * 3600),
        )
        .unwrap();
    }
}
