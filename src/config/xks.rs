//! `[xks]`: the AWS XKS proxy API front (`crate::xks`).
//!
//! ```toml
//! [xks]
//! listen = "0.0.0.0:8443"
//! uri_prefix = "/tenant-a"               # optional: "" by default; what AWS KMS's
//!                                        # XksProxyUriPath has before /kms/xks/v1
//! cert = "/etc/coffre/xks.pem"           # the server certificate AWS KMS verifies
//! key = "/etc/coffre/xks-key.pem"
//! client_ca = "/etc/coffre/amazon-trust-root.pem"  # optional: mTLS, this root only
//! client_cn = "cks.kms.eu-west-3.amazonaws.com"    # optional (needs client_ca)
//! deadline_ms = 150                      # optional: a request's time in the core
//!
//! [[xks.credentials]]                    # one or more; two at once for a rotation
//! access_key_id = "AKIA…"                # 20 to 30 characters A-Z, 2-7
//! secret_access_key_env = "COFFRE_XKS_SECRET"   # or secret_access_key_file (0600)
//! principal = "aws-kms-eu-west-3"        # the coffre principal it acts as; a
//!                                        # service in [roles]
//! ```
//!
//! The secret access key never goes in the file; it is read when the server
//! starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::authz::Role;

/// `[xks]` as TOML gives it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawXks {
    listen: String,
    #[serde(default)]
    uri_prefix: String,
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    client_cn: Option<String>,
    deadline_ms: Option<u64>,
    #[serde(default)]
    credentials: Vec<RawCredential>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    access_key_id: String,
    secret_access_key_env: Option<String>,
    secret_access_key_file: Option<PathBuf>,
    /// Refused with a clear message: a secret never goes in the file.
    secret_access_key: Option<toml::Value>,
    principal: String,
}

/// Where a secret access key is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretSource {
    Env(String),
    /// Readable by coffre's user only.
    File(PathBuf),
}

/// One `[[xks.credentials]]`.
#[derive(Clone, Debug)]
pub struct XksCredentialConfig {
    pub access_key_id: String,
    pub secret: SecretSource,
    pub principal: String,
}

/// A validated `[xks]`.
#[derive(Clone, Debug)]
pub struct XksConfig {
    pub listen: SocketAddr,
    pub uri_prefix: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    pub client_cn: Option<String>,
    pub deadline: Duration,
    pub credentials: Vec<XksCredentialConfig>,
}

/// The API's rule for an access key id: 20 to 30 characters of A-Z, 2-7.
pub fn valid_access_key_id(id: &str) -> bool {
    (20..=30).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
}

/// The API's rule for a secret access key: 43 to 64 characters of base64.
pub fn valid_secret(secret: &str) -> bool {
    (43..=64).contains(&secret.len())
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
}

pub(super) fn validate(
    raw: RawXks,
    roles: &std::collections::HashMap<String, Role>,
) -> anyhow::Result<XksConfig> {
    let listen = raw.listen.parse().with_context(|| {
        format!(
            "xks.listen must be an address such as 0.0.0.0:8443, got {:?}",
            raw.listen
        )
    })?;
    let prefix = &raw.uri_prefix;
    if !prefix.is_empty()
        && (!prefix.starts_with('/')
            || prefix.ends_with('/')
            || prefix.contains("//")
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-')))
    {
        bail!(
            "xks.uri_prefix must be empty or like /tenant-a (a-z, A-Z, 0-9, /, _, -; no trailing /), got {prefix:?}"
        );
    }
    if prefix.len() + "/kms/xks/v1".len() > 128 {
        bail!("xks.uri_prefix is too long: AWS KMS's XksProxyUriPath is at most 128 characters");
    }
    if raw.client_cn.is_some() && raw.client_ca.is_none() {
        bail!("xks.client_cn needs xks.client_ca: the CN is pinned on a chain to that CA");
    }
    let deadline = Duration::from_millis(raw.deadline_ms.unwrap_or(150));
    if deadline.is_zero() || deadline > Duration::from_millis(240) {
        bail!("xks.deadline_ms must be 1 to 240: AWS KMS gives up after 250 ms");
    }
    if raw.credentials.is_empty() {
        bail!("[xks] needs at least one [[xks.credentials]]");
    }
    let mut credentials: Vec<XksCredentialConfig> = Vec::new();
    for c in raw.credentials {
        let id = &c.access_key_id;
        if !valid_access_key_id(id) {
            bail!(
                "xks.credentials: access_key_id {id:?} must be 20 to 30 characters of A-Z and 2-7"
            );
        }
        if credentials.iter().any(|o| o.access_key_id == *id) {
            bail!("xks.credentials: access_key_id {id:?} appears twice");
        }
        if c.secret_access_key.is_some() {
            bail!(
                "xks.credentials: secret_access_key never goes in the configuration file; set \
                 secret_access_key_env (an environment variable) or secret_access_key_file (a \
                 file readable only by coffre)"
            );
        }
        let secret = match (c.secret_access_key_env, c.secret_access_key_file) {
            (Some(var), None) => SecretSource::Env(var),
            (None, Some(path)) => SecretSource::File(path),
            _ => bail!(
                "xks.credentials {id}: set exactly one of secret_access_key_env and secret_access_key_file"
            ),
        };
        match roles.get(&c.principal) {
            Some(Role::Service) => {}
            Some(role) => bail!(
                "xks.credentials {id}: principal {:?} has the role {role}; AWS KMS uses keys, \
                 which only the service role may",
                c.principal
            ),
            None => bail!(
                "xks.credentials {id}: principal {:?} has no role; add it to roles.service",
                c.principal
            ),
        }
        credentials.push(XksCredentialConfig {
            access_key_id: id.clone(),
            secret,
            principal: c.principal,
        });
    }
    Ok(XksConfig {
        listen,
        uri_prefix: raw.uri_prefix,
        cert: raw.cert,
        key: raw.key,
        client_ca: raw.client_ca,
        client_cn: raw.client_cn,
        deadline,
        credentials,
    })
}

impl SecretSource {
    /// The secret, checked against the API's form. A file its group or
    /// others may read is refused.
    pub fn read(&self) -> anyhow::Result<Zeroizing<String>> {
        let raw = match self {
            SecretSource::Env(var) => Zeroizing::new(
                std::env::var(var)
                    .with_context(|| format!("the environment variable {var} is not set"))?,
            ),
            SecretSource::File(path) => {
                super::store::check_private(path, "holds an XKS secret access key")?;
                Zeroizing::new(
                    std::fs::read_to_string(path)
                        .with_context(|| format!("reading {}", path.display()))?,
                )
            }
        };
        let secret = Zeroizing::new(raw.trim().to_string());
        if !valid_secret(&secret) {
            bail!(
                "the XKS secret access key must be 43 to 64 characters of A-Z, a-z, 0-9, +, /, ="
            );
        }
        Ok(secret)
    }
}

impl XksConfig {
    /// Reads the TLS files and the secrets: what `crate::xks::start` takes.
    pub fn load(&self, listener: tokio::net::TcpListener) -> anyhow::Result<crate::xks::XksSetup> {
        let read = |p: &Path, what: &str| {
            std::fs::read(p).with_context(|| format!("reading the {what} {}", p.display()))
        };
        let tls = crate::xks::XksTls {
            cert_pem: read(&self.cert, "xks.cert")?,
            key_pem: Zeroizing::new(read(&self.key, "xks.key")?),
            client_ca_pem: self
                .client_ca
                .as_deref()
                .map(|p| read(p, "xks.client_ca"))
                .transpose()?,
            client_cn: self.client_cn.clone(),
        };
        let credentials = self
            .credentials
            .iter()
            .map(|c| {
                Ok(crate::xks::Credential {
                    access_key_id: c.access_key_id.clone(),
                    secret_access_key: c
                        .secret
                        .read()
                        .with_context(|| format!("xks.credentials {}", c.access_key_id))?,
                    principal: c.principal.clone(),
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(crate::xks::XksSetup {
            listener,
            tls,
            uri_prefix: self.uri_prefix.clone(),
            credentials,
            deadline: self.deadline,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn roles() -> std::collections::HashMap<String, Role> {
        [
            ("aws".to_string(), Role::Service),
            ("op".to_string(), Role::Operator),
        ]
        .into_iter()
        .collect()
    }

    fn parse(text: &str) -> anyhow::Result<XksConfig> {
        validate(toml::from_str(text)?, &roles())
    }

    const BASE: &str = "listen = \"127.0.0.1:8443\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n";

    #[test]
    fn two_credentials_for_one_prefix_are_accepted() {
        let c = parse(&format!(
            "{BASE}uri_prefix = \"/tenant-a\"\n\
             [[credentials]]\naccess_key_id = \"AAAAAAAAAAAAAAAAAAAA\"\nsecret_access_key_env = \"S1\"\nprincipal = \"aws\"\n\
             [[credentials]]\naccess_key_id = \"BBBBBBBBBBBBBBBBBBB2\"\nsecret_access_key_file = \"/s\"\nprincipal = \"aws\"\n"
        ))
        .unwrap();
        assert_eq!(c.credentials.len(), 2);
        assert_eq!(c.uri_prefix, "/tenant-a");
        assert_eq!(c.deadline, Duration::from_millis(150));
    }

    #[test]
    fn bad_settings_are_refused_with_the_reason() {
        let cred = "[[credentials]]\naccess_key_id = \"AAAAAAAAAAAAAAAAAAAA\"\nsecret_access_key_env = \"S\"\nprincipal = \"aws\"\n";
        for (text, why) in [
            (
                format!("{BASE}uri_prefix = \"tenant\"\n{cred}"),
                "uri_prefix",
            ),
            (format!("{BASE}uri_prefix = \"/t/\"\n{cred}"), "uri_prefix"),
            (format!("{BASE}client_cn = \"x\"\n{cred}"), "client_ca"),
            (format!("{BASE}deadline_ms = 300\n{cred}"), "250 ms"),
            (BASE.to_string(), "at least one"),
            (
                format!("{BASE}{}", cred.replace("AAAAAAAAAAAAAAAAAAAA", "short")),
                "20 to 30",
            ),
            (
                format!(
                    "{BASE}{}",
                    cred.replace("principal = \"aws\"", "principal = \"op\"")
                ),
                "role operator",
            ),
            (
                format!(
                    "{BASE}{}",
                    cred.replace("principal = \"aws\"", "principal = \"nobody\"")
                ),
                "no role",
            ),
            (
                format!(
                    "{BASE}{}",
                    cred.replace("secret_access_key_env = \"S\"", "secret_access_key = \"x\"")
                ),
                "never goes",
            ),
            (format!("{BASE}{cred}{cred}"), "twice"),
        ] {
            let err = format!("{:#}", parse(&text).unwrap_err());
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn secret_forms_follow_the_api() {
        assert!(valid_secret(&"a".repeat(43)));
        assert!(!valid_secret(&"a".repeat(42)));
        assert!(!valid_secret(&format!("{}!", "a".repeat(43))));
        assert!(valid_access_key_id("ABCDEFGHIJKLMNOPQRS7"));
        assert!(!valid_access_key_id("ABCDEFGHIJKLMNOPQRS8"));
    }
}
