//! `coffre dev --xks-listen ADDR`: the AWS XKS front with a dev credential,
//! described in `DIR/xks.json` for clients and tests:
//!
//! ```json
//! {"endpoint": "https://localhost:PORT", "uri_prefix": "/dev",
//!  "access_key_id": "…", "secret_access_key": "…", "region": "eu-west-3",
//!  "ca": "DIR/pki/ca.pem", "principal": "spiffe://…/aws-kms"}
//! ```
//!
//! The file is private (mode 0600: it holds the secret) and its credential
//! is kept across restarts, as AWS KMS would keep it. The principal has the
//! service role; a key is visible to it once a grant names it.

use std::net::SocketAddr;

use anyhow::Context;
use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use zeroize::Zeroizing;

use super::DataDir;
use crate::config::xks_rules::{valid_access_key_id, valid_secret};
use crate::xks::{Credential, XksSetup, XksTls};

/// The dev principal AWS KMS acts as (`pki::dev_principal("aws-kms")`).
pub const PRINCIPAL_NAME: &str = "aws-kms";
/// The dev front's URI prefix.
pub const URI_PREFIX: &str = "/dev";
/// The region the dev credential is meant for (Paris).
pub const REGION: &str = "eu-west-3";
/// `DIR/xks.json`.
pub const XKS_JSON: &str = "xks.json";

/// What `DIR/xks.json` holds.
#[derive(Serialize, Deserialize)]
pub struct XksJson {
    pub endpoint: String,
    pub uri_prefix: String,
    pub access_key_id: String,
    pub secret_access_key: Zeroizing<String>,
    pub region: String,
    pub ca: String,
    pub principal: String,
}

impl std::fmt::Debug for XksJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XksJson")
            .field("endpoint", &self.endpoint)
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

fn random_credential() -> anyhow::Result<(String, Zeroizing<String>)> {
    const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let rng = SystemRandom::new();
    let mut bytes = Zeroizing::new([0u8; 20 + 42]);
    rng.fill(&mut bytes[..])
        .map_err(|_| anyhow::anyhow!("the system random generator failed"))?;
    let (id, secret) = bytes.split_at(20);
    let id: String = id
        .iter()
        .map(|b| char::from(BASE32.get(usize::from(b % 32)).copied().unwrap_or(b'A')))
        .collect();
    let secret = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(secret));
    Ok((id, secret))
}

/// The dev credential (kept from `DIR/xks.json` if it holds a valid one),
/// the front's setup, and the new `DIR/xks.json`, written.
pub fn setup(dir: &DataDir, listener: TcpListener) -> anyhow::Result<XksSetup> {
    let path = dir.root().join(XKS_JSON);
    let previous: Option<XksJson> = std::fs::read(&path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .filter(|j: &XksJson| {
            valid_access_key_id(&j.access_key_id) && valid_secret(&j.secret_access_key)
        });
    let (access_key_id, secret) = match previous {
        Some(j) => (j.access_key_id, j.secret_access_key),
        None => random_credential()?,
    };
    let addr: SocketAddr = listener.local_addr()?;
    let principal = crate::pki::dev_principal(PRINCIPAL_NAME);
    let paths = dir.pki();
    let json = XksJson {
        endpoint: format!("https://localhost:{}", addr.port()),
        uri_prefix: URI_PREFIX.to_string(),
        access_key_id: access_key_id.clone(),
        secret_access_key: secret.clone(),
        region: REGION.to_string(),
        ca: paths.ca_cert().display().to_string(),
        principal: principal.clone(),
    };
    let text = Zeroizing::new(serde_json::to_vec_pretty(&json)?);
    crate::fsutil::write_atomic(&path, &text, true)
        .with_context(|| format!("writing {}", path.display()))?;
    let read = |p: std::path::PathBuf| {
        std::fs::read(&p).with_context(|| format!("reading {}", p.display()))
    };
    Ok(XksSetup {
        listener,
        tls: XksTls {
            cert_pem: read(paths.server_cert())?,
            key_pem: Zeroizing::new(read(paths.server_key())?),
            client_ca_pem: None,
            client_cn: None,
        },
        uri_prefix: URI_PREFIX.to_string(),
        credentials: vec![Credential {
            access_key_id,
            secret_access_key: secret,
            principal,
        }],
        deadline: crate::xks::DEFAULT_DEADLINE,
    })
}
