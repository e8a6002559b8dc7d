//! Certificates: the development PKI of `coffre dev`, and reading the
//! principal out of a client certificate.
//!
//! The dev PKI lives in `DIR/pki/` under fixed file names (clients and tests
//! outside the project rely on them; `server::DataDir` maps the rest of the
//! data directory):
//! `ca.pem`, `server.pem`, `server-key.pem`, and one client pair per role:
//! `operator.pem`/`operator-key.pem`, `service.pem`/`service-key.pem`,
//! `auditor.pem`/`auditor-key.pem`. The CA's private key is kept beside them
//! (`ca-key.pem`) so that more client certificates can be issued later.
//! Private keys are written with mode 0600. It is a development PKI: in
//! production the operator's own CA issues the certificates.

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

/// The URI SAN prefix of dev client certificates: `spiffe://coffre.dev/<name>`.
pub const DEV_URI_PREFIX: &str = "spiffe://coffre.dev/";

/// The client identities of the dev PKI, by file stem.
pub const DEV_CLIENTS: [&str; 3] = ["operator", "service", "auditor"];

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
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca-key.pem")
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

/// Creates the dev PKI in `DIR/pki/` if it is not there; keeps it if it is.
/// Returns whether it was created.
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

    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = dn("coffre dev CA");
    ca_params.serial_number = Some(random_serial()?);
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut ca_params, 3650);
    let ca_cert = ca_params.self_signed(&ca_key).context("signing the CA")?;
    write_private(&paths.ca_key(), &ca_key.serialize_pem())?;
    write_public(&paths.ca_cert(), &ca_cert.pem())?;

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

/// Issues `<name>.pem` and `<name>-key.pem` from the dev CA: subject CN
/// `<name>` and URI SAN `spiffe://coffre.dev/<name>`.
pub fn issue_client_cert(paths: &PkiPaths, name: &str) -> anyhow::Result<()> {
    let now = OffsetDateTime::now_utc();
    let issued = issue_dev_client_cert(
        paths,
        name,
        now - time::Duration::hours(1),
        now + time::Duration::days(825),
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

/// Issues a client certificate for `name` (CN `<name>`, URI SAN
/// `spiffe://coffre.dev/<name>`) from the dev CA in `paths`, valid from
/// `not_before` to `not_after` — in the past for an expired one. Its serial
/// number is random (16 bytes), so that a CRL can name it alone.
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
    if not_after <= not_before {
        bail!("a certificate's notAfter must follow its notBefore");
    }
    let issuer = dev_issuer(paths)?;
    let key = KeyPair::generate().context("generating a client key")?;
    let serial = random_serial()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(name);
    params.serial_number = Some(serial.clone());
    params.subject_alt_names = vec![SanType::URI(
        dev_principal(name).try_into().context("client URI SAN")?,
    )];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = not_before;
    params.not_after = not_after;
    let cert = params
        .signed_by(&key, &issuer)
        .context("signing a client certificate")?;
    Ok(IssuedCert {
        cert_pem: cert.pem(),
        key_pem: Zeroizing::new(key.serialize_pem()),
        serial: serial.to_bytes(),
    })
}

/// A CRL (PEM) signed by the dev CA key (`DIR/pki/ca-key.pem`) that revokes
/// the certificates with these serial numbers; none gives an empty CRL. Valid
/// from an hour ago for 30 days; its CRL number is the current time in
/// nanoseconds, so a later CRL has a larger one.
pub fn dev_crl(paths: &PkiPaths, revoked_serials: &[Vec<u8>]) -> anyhow::Result<String> {
    let issuer = dev_issuer(paths)?;
    let now = OffsetDateTime::now_utc();
    let crl_number = u64::try_from(now.unix_timestamp_nanos()).unwrap_or_default();
    let params = CertificateRevocationListParams {
        this_update: now - time::Duration::hours(1),
        next_update: now + time::Duration::days(30),
        crl_number: SerialNumber::from(crl_number),
        issuing_distribution_point: None,
        revoked_certs: revoked_serials
            .iter()
            .map(|serial| RevokedCertParams {
                serial_number: SerialNumber::from_slice(serial),
                revocation_time: now - time::Duration::minutes(1),
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

/// The dev CA as an issuer, from `ca.pem` and `ca-key.pem`.
fn dev_issuer(paths: &PkiPaths) -> anyhow::Result<Issuer<'static, KeyPair>> {
    let ca_key_pem = fs::read_to_string(paths.ca_key())
        .with_context(|| format!("reading {}", paths.ca_key().display()))?;
    let ca_cert_pem = fs::read_to_string(paths.ca_cert())
        .with_context(|| format!("reading {}", paths.ca_cert().display()))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).context("parsing the CA key")?;
    Issuer::from_ca_cert_pem(&ca_cert_pem, ca_key).context("parsing the CA certificate")
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
/// subject CN. `None` when it has neither or does not parse.
pub fn principal_from_cert(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    // A SAN extension that does not parse (or appears twice) is refused,
    // never silently skipped in favour of the CN.
    if let Some(san) = cert.subject_alternative_name().ok()? {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                return Some((*uri).to_string());
            }
        }
    }
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
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

    fn pem_to_der(pem: &str) -> Vec<u8> {
        use base64::Engine;
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap()
    }
}
