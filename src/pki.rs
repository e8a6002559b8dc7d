//! Certificates: the development PKI of `coffre dev`, reading the principal
//! out of a client certificate, and the checks that bind a principal to the
//! CA of its role.
//!
//! The dev PKI lives in `DIR/pki/` under fixed file names (clients and tests
//! outside the project rely on them; `server::DataDir` maps the rest of the
//! data directory):
//! `ca.pem` (the server's CA: what clients trust), `server.pem`,
//! `server-key.pem`; one CA per role, `operator-ca.pem`, `service-ca.pem`,
//! `auditor-ca.pem` (keys `NAME-ca-key.pem`), whose certificates may act in
//! that role only; and one client pair per role, issued by its role's CA:
//! `operator.pem`/`operator-key.pem`, `service.pem`/`service-key.pem`,
//! `auditor.pem`/`auditor-key.pem`. The CAs' private keys are kept beside
//! them (`ca-key.pem`, `NAME-ca-key.pem`) so that more certificates can be
//! issued later. Private keys are written with mode 0600. It is a
//! development PKI: in production the operator's own CAs issue the
//! certificates.
//!
//! A dev directory made before the role CAs existed (one CA for every role)
//! gets them at the next start, and its client certificates are re-issued
//! by them once.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};
use zeroize::Zeroizing;

use crate::authz::Role;

/// The URI SAN prefix of dev client certificates: `spiffe://coffre.dev/<name>`.
pub const DEV_URI_PREFIX: &str = "spiffe://coffre.dev/";

/// The client identities of the dev PKI, by file stem.
pub const DEV_CLIENTS: [&str; 3] = ["operator", "service", "auditor"];

/// The roles, each with a CA of its own in the dev PKI.
pub const ROLES: [Role; 3] = [Role::Operator, Role::Service, Role::Auditor];

/// Paths of a PKI directory laid out as the module docs say.
#[derive(Clone, Debug)]
pub struct PkiPaths {
    pub dir: PathBuf,
}

impl PkiPaths {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("pki"),
        }
    }
    /// The server's CA (what clients trust for the server).
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca-key.pem")
    }
    /// The CA of a role's client certificates: `operator-ca.pem`, …
    pub fn role_ca_cert(&self, role: Role) -> PathBuf {
        self.dir.join(format!("{}-ca.pem", role.as_str()))
    }
    /// Its key: `operator-ca-key.pem`, …
    pub fn role_ca_key(&self, role: Role) -> PathBuf {
        self.dir.join(format!("{}-ca-key.pem", role.as_str()))
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server-key.pem")
    }
    /// `<name>.pem`, e.g. `operator.pem`.
    pub fn client_cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }
    /// `<name>-key.pem`, e.g. `operator-key.pem`.
    pub fn client_key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-key.pem"))
    }
}

/// The principal a dev client certificate carries.
pub fn dev_principal(name: &str) -> String {
    format!("{DEV_URI_PREFIX}{name}")
}

/// The role whose CA issues the dev client `name`'s certificate when the
/// caller does not say: `operator`, `operator-N` → operator; `auditor`,
/// `auditor-N` → auditor; any other name → service.
pub fn dev_role_of(name: &str) -> Role {
    let is = |stem: &str| name == stem || name.starts_with(&format!("{stem}-"));
    if is("operator") {
        Role::Operator
    } else if is("auditor") {
        Role::Auditor
    } else {
        Role::Service
    }
}

/// Creates the dev PKI in `DIR/pki/` if it is not there; keeps it if it is
/// (adding the role CAs to one made before they existed). Returns whether
/// it was created.
pub fn ensure_dev_pki(data_dir: &Path) -> anyhow::Result<bool> {
    let paths = PkiPaths::new(data_dir);
    if paths.ca_cert().exists() {
        for p in [paths.ca_key(), paths.server_cert(), paths.server_key()] {
            if !p.exists() {
                bail!(
                    "the dev PKI in {} is incomplete: {} is missing (remove the directory to start afresh)",
                    paths.dir.display(),
                    p.display()
                );
            }
        }
        migrate_to_role_cas(&paths)?;
        for name in DEV_CLIENTS {
            if !paths.client_cert(name).exists() {
                issue_client_cert(&paths, name)?;
            }
        }
        return Ok(false);
    }
    fs::create_dir_all(&paths.dir).with_context(|| format!("creating {}", paths.dir.display()))?;
    // The new directory's entry, durable before the files in it.
    fs::File::open(data_dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", data_dir.display()))?;

    let (ca_params, ca_key) = new_ca(&paths.ca_cert(), &paths.ca_key(), "coffre dev CA")?;
    for role in ROLES {
        create_role_ca(&paths, role)?;
    }

    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().context("generating the server key")?;
    let mut server_params =
        CertificateParams::new(vec!["localhost".to_string()]).context("server params")?;
    server_params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    server_params
        .subject_alt_names
        .push(SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()));
    server_params.distinguished_name = dn("coffre dev server");
    server_params.serial_number = Some(random_serial()?);
    server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    set_validity(&mut server_params, 825);
    let server_cert = server_params
        .signed_by(&server_key, &issuer)
        .context("signing the server certificate")?;
    write_private(&paths.server_key(), &server_key.serialize_pem())?;
    write_public(&paths.server_cert(), &server_cert.pem())?;

    for name in DEV_CLIENTS {
        issue_client_cert(&paths, name)?;
    }
    Ok(true)
}

/// A self-signed CA written to `cert`/`key`: its parameters and key.
fn new_ca(cert: &Path, key: &Path, cn: &str) -> anyhow::Result<(CertificateParams, KeyPair)> {
    let ca_key = KeyPair::generate().context("generating a CA key")?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = dn(cn);
    ca_params.serial_number = Some(random_serial()?);
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut ca_params, 3650);
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .with_context(|| format!("signing the CA {cn}"))?;
    write_private(key, &ca_key.serialize_pem())?;
    write_public(cert, &ca_cert.pem())?;
    Ok((ca_params, ca_key))
}

fn create_role_ca(paths: &PkiPaths, role: Role) -> anyhow::Result<()> {
    new_ca(
        &paths.role_ca_cert(role),
        &paths.role_ca_key(role),
        &format!("coffre dev {role} CA"),
    )
    .map(|_| ())
}

/// A dev PKI from before the role CAs: creates the missing ones and
/// re-issues, from them, every client certificate of the directory (every
/// `NAME.pem` with its `NAME-key.pem`, the server's and the CAs' aside).
fn migrate_to_role_cas(paths: &PkiPaths) -> anyhow::Result<()> {
    let missing: Vec<Role> = ROLES
        .into_iter()
        .filter(|r| !paths.role_ca_cert(*r).exists() || !paths.role_ca_key(*r).exists())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    for role in &missing {
        create_role_ca(paths, *role)?;
    }
    let mut reissued = Vec::new();
    let entries =
        fs::read_dir(&paths.dir).with_context(|| format!("reading {}", paths.dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", paths.dir.display()))?;
        let file = entry.file_name();
        let Some(name) = file.to_str().and_then(|f| f.strip_suffix(".pem")) else {
            continue;
        };
        if name == "ca"
            || name == "server"
            || name.ends_with("-key")
            || name.ends_with("-ca")
            || !paths.client_key(name).exists()
            || !missing.contains(&dev_role_of(name))
        {
            continue;
        }
        issue_client_cert(paths, name)?;
        reissued.push(name.to_string());
    }
    reissued.sort();
    tracing::info!(
        dir = %paths.dir.display(),
        created = ?missing.iter().map(|r| format!("{r}-ca.pem")).collect::<Vec<_>>(),
        reissued = ?reissued,
        "the dev PKI had one CA for every role: created a CA per role and re-issued its client certificates"
    );
    Ok(())
}

/// Issues `<name>.pem` and `<name>-key.pem` from the CA of the role
/// [`dev_role_of`] gives `name`: subject CN `<name>` and URI SAN
/// `spiffe://coffre.dev/<name>`.
pub fn issue_client_cert(paths: &PkiPaths, name: &str) -> anyhow::Result<()> {
    issue_client_cert_for(paths, name, dev_role_of(name))
}

/// [`issue_client_cert`] from the CA of `role`.
pub fn issue_client_cert_for(paths: &PkiPaths, name: &str, role: Role) -> anyhow::Result<()> {
    let now = OffsetDateTime::now_utc();
    let issued = issue_dev_cert(
        paths,
        role,
        &DevCertSpec::client(
            name,
            now - time::Duration::hours(1),
            now + time::Duration::days(825),
        ),
    )?;
    write_private(&paths.client_key(name), &issued.key_pem)?;
    write_public(&paths.client_cert(name), &issued.cert_pem)?;
    Ok(())
}

/// A client certificate from the dev CA, not written anywhere.
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: Zeroizing<String>,
    /// The certificate's serial number (DER integer content, big-endian).
    pub serial: Vec<u8>,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("serial", &hex::encode(&self.serial))
            .finish_non_exhaustive()
    }
}

/// What a dev certificate says: for tests that need an unusual one.
#[derive(Clone, Debug)]
pub struct DevCertSpec {
    /// The subject CN.
    pub common_name: String,
    /// The URI SAN, if any.
    pub uri: Option<String>,
    /// Whether it carries the extendedKeyUsage extension with clientAuth
    /// (without it: no extendedKeyUsage extension at all).
    pub client_auth_eku: bool,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl DevCertSpec {
    /// A dev client: CN `<name>`, URI SAN `spiffe://coffre.dev/<name>`,
    /// clientAuth.
    pub fn client(name: &str, not_before: OffsetDateTime, not_after: OffsetDateTime) -> Self {
        Self {
            common_name: name.to_string(),
            uri: Some(dev_principal(name)),
            client_auth_eku: true,
            not_before,
            not_after,
        }
    }
}

/// Issues a client certificate for `name` (CN `<name>`, URI SAN
/// `spiffe://coffre.dev/<name>`) from the CA of the role [`dev_role_of`]
/// gives it, valid from `not_before` to `not_after` — in the past for an
/// expired one. Its serial number is random (16 bytes), so that a CRL can
/// name it alone.
pub fn issue_dev_client_cert(
    paths: &PkiPaths,
    name: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> anyhow::Result<IssuedCert> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        bail!("invalid client name {name:?}");
    }
    issue_dev_cert(
        paths,
        dev_role_of(name),
        &DevCertSpec::client(name, not_before, not_after),
    )
}

/// Issues a certificate as `spec` says from the dev CA of `role`.
pub fn issue_dev_cert(
    paths: &PkiPaths,
    role: Role,
    spec: &DevCertSpec,
) -> anyhow::Result<IssuedCert> {
    if spec.not_after <= spec.not_before {
        bail!("a certificate's notAfter must follow its notBefore");
    }
    let issuer = role_issuer(paths, role)?;
    let key = KeyPair::generate().context("generating a client key")?;
    let serial = random_serial()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(&spec.common_name);
    params.serial_number = Some(serial.clone());
    if let Some(uri) = &spec.uri {
        params.subject_alt_names = vec![SanType::URI(
            uri.clone().try_into().context("client URI SAN")?,
        )];
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    if spec.client_auth_eku {
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    }
    params.not_before = spec.not_before;
    params.not_after = spec.not_after;
    let cert = params
        .signed_by(&key, &issuer)
        .context("signing a client certificate")?;
    Ok(IssuedCert {
        cert_pem: cert.pem(),
        key_pem: Zeroizing::new(key.serialize_pem()),
        serial: serial.to_bytes(),
    })
}

/// When a dev CRL was issued, its next update, and its number.
#[derive(Clone, Copy, Debug)]
pub struct DevCrlSpec {
    pub this_update: OffsetDateTime,
    pub next_update: OffsetDateTime,
    pub crl_number: u64,
}

impl DevCrlSpec {
    /// Issued an hour ago, valid for 30 days, numbered by the current time
    /// in nanoseconds (so a later CRL has a larger number).
    pub fn fresh() -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            this_update: now - time::Duration::hours(1),
            next_update: now + time::Duration::days(30),
            crl_number: u64::try_from(now.unix_timestamp_nanos()).unwrap_or_default(),
        }
    }
}

/// A CRL file (PEM) with one CRL from each role CA of the dev PKI, each
/// revoking the certificates with these serial numbers; none gives empty
/// CRLs. As [`DevCrlSpec::fresh`] says. (Every issuer of a client
/// certificate needs its CRL: a certificate whose status no CRL tells is
/// refused.)
pub fn dev_crl(paths: &PkiPaths, revoked_serials: &[Vec<u8>]) -> anyhow::Result<String> {
    let spec = DevCrlSpec::fresh();
    let mut out = String::new();
    for role in ROLES {
        out.push_str(&dev_crl_from(paths, role, revoked_serials, spec)?);
    }
    Ok(out)
}

/// One CRL (PEM) signed by the dev CA of `role`, as `spec` says.
pub fn dev_crl_from(
    paths: &PkiPaths,
    role: Role,
    revoked_serials: &[Vec<u8>],
    spec: DevCrlSpec,
) -> anyhow::Result<String> {
    let issuer = role_issuer(paths, role)?;
    let revocation_time = spec.this_update.min(OffsetDateTime::now_utc());
    let params = CertificateRevocationListParams {
        this_update: spec.this_update,
        next_update: spec.next_update,
        crl_number: SerialNumber::from(spec.crl_number),
        issuing_distribution_point: None,
        revoked_certs: revoked_serials
            .iter()
            .map(|serial| RevokedCertParams {
                serial_number: SerialNumber::from_slice(serial),
                revocation_time,
                reason_code: Some(RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    params
        .signed_by(&issuer)
        .context("signing the CRL")?
        .pem()
        .context("encoding the CRL")
}

/// The serial number of a certificate (PEM), as its DER integer content.
pub fn cert_serial(cert_pem: &str) -> anyhow::Result<Vec<u8>> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("not a PEM certificate: {e}"))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| anyhow::anyhow!("not an X.509 certificate: {e}"))?;
    Ok(cert.raw_serial().to_vec())
}

/// The dev CA of `role` as an issuer, from `NAME-ca.pem` and
/// `NAME-ca-key.pem`.
fn role_issuer(paths: &PkiPaths, role: Role) -> anyhow::Result<Issuer<'static, KeyPair>> {
    let (cert, key) = (paths.role_ca_cert(role), paths.role_ca_key(role));
    let ca_key_pem =
        fs::read_to_string(&key).with_context(|| format!("reading {}", key.display()))?;
    let ca_cert_pem =
        fs::read_to_string(&cert).with_context(|| format!("reading {}", cert.display()))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).context("parsing a CA key")?;
    Issuer::from_ca_cert_pem(&ca_cert_pem, ca_key).context("parsing a CA certificate")
}

/// 16 random bytes, positive and without a leading zero byte, as RFC 5280
/// asks of serial numbers.
fn random_serial() -> anyhow::Result<SerialNumber> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("the system random generator failed"))?;
    if let Some(first) = bytes.first_mut() {
        *first = (*first & 0x7f) | 0x40;
    }
    Ok(SerialNumber::from_slice(&bytes))
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "coffre development");
    dn.push(DnType::CommonName, cn);
    dn
}

fn set_validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
}

// Atomic and durable: a crash (or a file system turning read-only) while
// the dev PKI is written leaves whole files or none, never an empty
// certificate that stops the next start.
fn write_public(path: &Path, contents: &str) -> anyhow::Result<()> {
    crate::fsutil::write_atomic(path, contents.as_bytes(), false)
        .with_context(|| format!("writing {}", path.display()))
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    crate::fsutil::write_atomic(path, contents.as_bytes(), true)
        .with_context(|| format!("writing {}", path.display()))
}

/// The principal of a client certificate (DER): its first URI SAN, else its
/// subject CN. `None` when it has neither, does not parse, or its CN holds a
/// `:` (a CN never stands in for a URI: see [`client_identity`]).
pub fn principal_from_cert(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    principal_of_parsed(&cert).ok()
}

/// Why a client certificate gives no principal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdentityError {
    /// It does not parse as X.509 (or its SAN extension does not).
    Unparsable,
    /// It has no extendedKeyUsage extension with clientAuth.
    NoClientAuth,
    /// Neither a URI SAN nor a subject CN.
    NoPrincipal,
    /// Its CN (there is no URI SAN) holds a `:`: it could pass for a URI.
    CommonNameLooksLikeUri,
}

impl IdentityError {
    /// What the caller is told.
    pub fn message(self) -> &'static str {
        match self {
            Self::Unparsable => "the client certificate does not parse",
            Self::NoClientAuth => {
                "the client certificate lacks the extendedKeyUsage clientAuth (id-kp-clientAuth)"
            }
            Self::NoPrincipal => "the client certificate names no principal (URI SAN or CN)",
            Self::CommonNameLooksLikeUri => {
                "the client certificate has no URI SAN and its CN contains ':'; a CN never stands for a URI principal"
            }
        }
    }
}

impl std::fmt::Display for IdentityError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for IdentityError {}

/// The principal of a verified client certificate (DER), as the server
/// accepts it: the certificate must carry the extendedKeyUsage extension
/// with clientAuth; the principal is its first URI SAN, else its subject
/// CN, and a CN that contains `:` is refused, so that a CN can never equal
/// a URI principal (`[roles]` entries are URIs, `scheme:…`, or plain names
/// without `:`).
pub fn client_identity(der: &[u8]) -> Result<String, IdentityError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| IdentityError::Unparsable)?;
    let eku = cert
        .extended_key_usage()
        .map_err(|_| IdentityError::Unparsable)?;
    if !eku.is_some_and(|e| e.value.client_auth) {
        return Err(IdentityError::NoClientAuth);
    }
    principal_of_parsed(&cert)
}

fn principal_of_parsed(cert: &X509Certificate<'_>) -> Result<String, IdentityError> {
    // A SAN extension that does not parse (or appears twice) is refused,
    // never silently skipped in favour of the CN.
    if let Some(san) = cert
        .subject_alternative_name()
        .map_err(|_| IdentityError::Unparsable)?
    {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                return Ok((*uri).to_string());
            }
        }
    }
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or(IdentityError::NoPrincipal)?;
    if cn.contains(':') {
        return Err(IdentityError::CommonNameLooksLikeUri);
    }
    Ok(cn.to_string())
}

/// Whether some CA of `a` and some CA of `b` (DER) are one anchor for
/// practical purposes: the same certificate, the same key, or one issued
/// (signed) by the other. The description of the first such pair found.
pub fn anchors_overlap(a: &[Vec<u8>], b: &[Vec<u8>]) -> Option<String> {
    fn parse(der: &[u8]) -> Option<X509Certificate<'_>> {
        X509Certificate::from_der(der).ok().map(|(_, c)| c)
    }
    for x in a.iter().filter_map(|d| parse(d)) {
        for y in b.iter().filter_map(|d| parse(d)) {
            let (xs, ys) = (x.subject(), y.subject());
            if x.public_key().raw == y.public_key().raw {
                return Some(format!("{xs} and {ys} have the same key"));
            }
            if x.verify_signature(Some(y.public_key())).is_ok() {
                return Some(format!("{xs} is issued by {ys}"));
            }
            if y.verify_signature(Some(x.public_key())).is_ok() {
                return Some(format!("{ys} is issued by {xs}"));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn dev_pki_has_the_fixed_file_names_and_principals() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ensure_dev_pki(dir.path()).unwrap());
        let pki = dir.path().join("pki");
        for f in [
            "ca.pem",
            "server.pem",
            "server-key.pem",
            "operator.pem",
            "operator-key.pem",
            "service.pem",
            "service-key.pem",
            "auditor.pem",
            "auditor-key.pem",
        ] {
            assert!(pki.join(f).is_file(), "{f} missing");
        }
        let before = fs::read(pki.join("ca.pem")).unwrap();
        assert!(!ensure_dev_pki(dir.path()).unwrap());
        assert_eq!(
            before,
            fs::read(pki.join("ca.pem")).unwrap(),
            "kept on restart"
        );

        let pem = fs::read_to_string(pki.join("service.pem")).unwrap();
        let der = pem_to_der(&pem);
        assert_eq!(
            principal_from_cert(&der).as_deref(),
            Some("spiffe://coffre.dev/service")
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(pki.join("service-key.pem"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "private keys are not group/world readable");
        }
    }

    #[test]
    fn principal_falls_back_to_common_name() {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = dn("billing-service");
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            principal_from_cert(cert.der()).as_deref(),
            Some("billing-service")
        );
        assert_eq!(principal_from_cert(b"garbage"), None);
    }

    /// Whether the certificate in `cert` (PEM file) is signed by the CA in
    /// `ca` (PEM file).
    fn signed_by(cert: &Path, ca: &Path) -> bool {
        let cert = pem_to_der(&fs::read_to_string(cert).unwrap());
        let ca = pem_to_der(&fs::read_to_string(ca).unwrap());
        let (_, cert) = X509Certificate::from_der(&cert).unwrap();
        let (_, ca) = X509Certificate::from_der(&ca).unwrap();
        cert.verify_signature(Some(ca.public_key())).is_ok()
    }

    #[test]
    fn each_role_has_its_ca_and_an_old_dev_pki_is_migrated_once() {
        let dir = tempfile::tempdir().unwrap();
        ensure_dev_pki(dir.path()).unwrap();
        let paths = PkiPaths::new(dir.path());
        for role in ROLES {
            assert!(paths.role_ca_cert(role).is_file());
            assert!(paths.role_ca_key(role).is_file());
            assert!(signed_by(
                &paths.client_cert(role.as_str()),
                &paths.role_ca_cert(role)
            ));
            assert!(!signed_by(
                &paths.client_cert(role.as_str()),
                &paths.ca_cert()
            ));
        }
        // A directory without role CAs, as before they existed: its client
        // certificates come from CAs it no longer has.
        issue_client_cert(&paths, "operator-2").unwrap();
        for role in ROLES {
            fs::remove_file(paths.role_ca_cert(role)).unwrap();
            fs::remove_file(paths.role_ca_key(role)).unwrap();
        }
        assert!(!ensure_dev_pki(dir.path()).unwrap());
        for (name, role) in [
            ("operator", Role::Operator),
            ("operator-2", Role::Operator),
            ("service", Role::Service),
            ("auditor", Role::Auditor),
        ] {
            assert!(
                signed_by(&paths.client_cert(name), &paths.role_ca_cert(role)),
                "{name} re-issued by its role's new CA"
            );
        }
        // Once: a second start keeps the certificates.
        let before = fs::read(paths.client_cert("operator")).unwrap();
        ensure_dev_pki(dir.path()).unwrap();
        assert_eq!(before, fs::read(paths.client_cert("operator")).unwrap());
    }

    #[test]
    fn client_identity_needs_client_auth_and_a_cn_without_colon() {
        let dir = tempfile::tempdir().unwrap();
        ensure_dev_pki(dir.path()).unwrap();
        let paths = PkiPaths::new(dir.path());
        let now = OffsetDateTime::now_utc();
        let spec = DevCertSpec::client("alice", now, now + time::Duration::days(1));
        let der = |spec: &DevCertSpec| {
            pem_to_der(
                &issue_dev_cert(&paths, Role::Operator, spec)
                    .unwrap()
                    .cert_pem,
            )
        };
        assert_eq!(
            client_identity(&der(&spec)).as_deref(),
            Ok("spiffe://coffre.dev/alice")
        );
        let no_eku = DevCertSpec {
            client_auth_eku: false,
            ..spec.clone()
        };
        assert_eq!(
            client_identity(&der(&no_eku)),
            Err(IdentityError::NoClientAuth)
        );
        let cn_uri = DevCertSpec {
            common_name: "spiffe://coffre.dev/alice".into(),
            uri: None,
            ..spec.clone()
        };
        assert_eq!(
            client_identity(&der(&cn_uri)),
            Err(IdentityError::CommonNameLooksLikeUri)
        );
        let cn_only = DevCertSpec { uri: None, ..spec };
        assert_eq!(client_identity(&der(&cn_only)).as_deref(), Ok("alice"));
        assert_eq!(client_identity(b"garbage"), Err(IdentityError::Unparsable));
    }

    #[test]
    fn overlapping_anchors_are_found() {
        let dir = tempfile::tempdir().unwrap();
        ensure_dev_pki(dir.path()).unwrap();
        let paths = PkiPaths::new(dir.path());
        let ca = |role| pem_to_der(&fs::read_to_string(paths.role_ca_cert(role)).unwrap());
        let (op, svc) = (ca(Role::Operator), ca(Role::Service));
        let one = std::slice::from_ref;
        assert_eq!(anchors_overlap(one(&svc), one(&op)), None);
        assert!(anchors_overlap(one(&svc), one(&svc)).is_some());
        // A client certificate issued by the service CA is "issued by" it.
        let now = OffsetDateTime::now_utc();
        let leaf = issue_dev_cert(
            &paths,
            Role::Service,
            &DevCertSpec::client("x", now, now + time::Duration::days(1)),
        )
        .unwrap();
        let why = anchors_overlap(&[svc], &[pem_to_der(&leaf.cert_pem)]).unwrap();
        assert!(why.contains("issued by"), "{why}");
    }

    fn pem_to_der(pem: &str) -> Vec<u8> {
        use base64::Engine;
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap()
    }
}
