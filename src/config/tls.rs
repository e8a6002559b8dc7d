//! `[tls]`: where the server's certificate, key, client CA and client CRL
//! are (mTLS is always on).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use zeroize::Zeroizing;

use super::raw::RawTls;

/// Where the TLS files are.
#[derive(Clone, Debug)]
pub struct TlsPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    /// The client certificate revocation list, if any: read when the
    /// server starts (a CRL that does not load stops it) and re-read on
    /// SIGHUP and when the file changes.
    pub crl: Option<PathBuf>,
    /// How often the CRL file's modification time is checked.
    pub crl_reload_interval: Duration,
}

impl TlsPaths {
    /// Reads the three PEM files, with a clear error for each. The CRL is
    /// read when the server prepares its TLS configuration.
    pub fn load(&self) -> anyhow::Result<crate::grpc::ServerTls> {
        let read = |p: &Path, what: &str| {
            std::fs::read(p).with_context(|| format!("reading the {what} {}", p.display()))
        };
        Ok(crate::grpc::ServerTls {
            cert_pem: read(&self.cert, "server certificate")?,
            key_pem: Zeroizing::new(read(&self.key, "server key")?),
            client_ca_pem: read(&self.client_ca, "client CA certificate")?,
            crl: self.crl.clone(),
            crl_reload_interval: self.crl_reload_interval,
        })
    }
}

/// Checks `[tls]`: a CRL reload interval needs a CRL, and is positive.
pub(super) fn validate(raw: RawTls) -> anyhow::Result<TlsPaths> {
    let crl_reload_interval = match (&raw.crl, raw.crl_reload_secs) {
        (_, Some(0)) => bail!("tls.crl_reload_secs must be positive"),
        (None, Some(_)) => bail!("tls.crl_reload_secs is set but tls.crl is not"),
        (_, Some(secs)) => Duration::from_secs(secs),
        (_, None) => crate::grpc::DEFAULT_CRL_RELOAD_INTERVAL,
    };
    Ok(TlsPaths {
        cert: raw.cert,
        key: raw.key,
        client_ca: raw.client_ca,
        crl: raw.crl,
        crl_reload_interval,
    })
}
