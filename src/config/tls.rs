//! `[tls]`: where the server's certificate, key, client CAs and client CRL
//! are (mTLS is always on).
//!
//! Client CAs are given per role (`operator_ca`, `service_ca`,
//! `auditor_ca`): a principal's certificate must chain to the CA of its
//! role, so that the CA that issues the hosted services' certificates
//! cannot issue an operator. Every role that has principals in `[roles]`
//! needs its CA. One bundle for every role (`client_ca`, the layout before
//! role CAs) is accepted only with `allow_shared_client_ca = true`; giving
//! both is refused.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use zeroize::Zeroizing;

use super::raw::RawTls;
use crate::authz::Role;
use crate::grpc::ClientCaPems;

/// The longest `tls.crl_grace_secs` accepted: a week.
pub const MAX_CRL_GRACE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Where the client CAs are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientCaPaths {
    /// `client_ca`: one bundle for every role.
    Shared(PathBuf),
    /// `operator_ca`, `service_ca`, `auditor_ca`: a bundle per role.
    PerRole(Vec<(Role, PathBuf)>),
}

/// Where the TLS files are.
#[derive(Clone, Debug)]
pub struct TlsPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_cas: ClientCaPaths,
    /// `allow_shared_client_ca`: the operator accepts one anchor for every
    /// role (`client_ca`), or role CAs that overlap.
    pub allow_shared_client_ca: bool,
    /// The client certificate revocation list, if any: read when the
    /// server starts (a CRL that does not load stops it) and re-read on
    /// SIGHUP and when the file changes.
    pub crl: Option<PathBuf>,
    /// How often the CRL file's modification time is checked.
    pub crl_reload_interval: Duration,
    /// How long past its nextUpdate a CRL is still accepted.
    pub crl_grace: Duration,
}

impl TlsPaths {
    /// Reads the PEM files, with a clear error for each. The CRL is read
    /// when the server prepares its TLS configuration. A shared `client_ca`
    /// without `allow_shared_client_ca = true` is refused here, at start,
    /// with how to migrate.
    pub fn load(&self) -> anyhow::Result<crate::grpc::ServerTls> {
        let read = |p: &Path, what: &str| {
            std::fs::read(p).with_context(|| format!("reading the {what} {}", p.display()))
        };
        let client_cas = match &self.client_cas {
            ClientCaPaths::Shared(path) => {
                if !self.allow_shared_client_ca {
                    bail!(
                        "tls.client_ca is one CA for every role: a certificate any of its CAs issues \
                         for a service could name an operator. Give each role its own CA \
                         (tls.operator_ca, tls.service_ca, tls.auditor_ca, replacing tls.client_ca), \
                         or accept the shared CA with tls.allow_shared_client_ca = true"
                    );
                }
                ClientCaPems::Shared(read(path, "client CA certificate")?)
            }
            ClientCaPaths::PerRole(cas) => ClientCaPems::PerRole(
                cas.iter()
                    .map(|(role, path)| Ok((*role, read(path, &format!("{role} CA certificate"))?)))
                    .collect::<anyhow::Result<_>>()?,
            ),
        };
        Ok(crate::grpc::ServerTls {
            cert_pem: read(&self.cert, "server certificate")?,
            key_pem: Zeroizing::new(read(&self.key, "server key")?),
            client_cas,
            allow_shared_client_ca: self.allow_shared_client_ca,
            crl: self.crl.clone(),
            crl_reload_interval: self.crl_reload_interval,
            crl_grace: self.crl_grace,
            crl_state: None,
        })
    }
}

/// Checks `[tls]`: the client CAs (per role, or shared, never both; every
/// role with principals has its CA), a CRL reload interval needs a CRL and
/// is positive, the CRL grace is bounded.
pub(super) fn validate(raw: RawTls, roles: &HashMap<String, Role>) -> anyhow::Result<TlsPaths> {
    let crl_reload_interval = match (&raw.crl, raw.crl_reload_secs) {
        (_, Some(0)) => bail!("tls.crl_reload_secs must be positive"),
        (None, Some(_)) => bail!("tls.crl_reload_secs is set but tls.crl is not"),
        (_, Some(secs)) => Duration::from_secs(secs),
        (_, None) => crate::grpc::DEFAULT_CRL_RELOAD_INTERVAL,
    };
    let crl_grace = match (&raw.crl, raw.crl_grace_secs) {
        (None, Some(_)) => bail!("tls.crl_grace_secs is set but tls.crl is not"),
        (_, Some(secs)) if Duration::from_secs(secs) > MAX_CRL_GRACE => bail!(
            "tls.crl_grace_secs is at most {} (a week); publish CRLs more often",
            MAX_CRL_GRACE.as_secs()
        ),
        (_, secs) => Duration::from_secs(secs.unwrap_or(0)),
    };
    let per_role: Vec<(Role, PathBuf)> = [
        (Role::Operator, raw.operator_ca),
        (Role::Service, raw.service_ca),
        (Role::Auditor, raw.auditor_ca),
    ]
    .into_iter()
    .filter_map(|(role, path)| path.map(|p| (role, p)))
    .collect();
    let client_cas = match (raw.client_ca, per_role.is_empty()) {
        (Some(_), false) => bail!(
            "tls.client_ca and tls.operator_ca/service_ca/auditor_ca are both set: \
             give the role CAs only (client_ca is the older, shared layout)"
        ),
        (None, true) => bail!(
            "[tls] names no client CA: give tls.operator_ca, tls.service_ca and tls.auditor_ca \
             (the CAs whose certificates may act in each role)"
        ),
        (Some(shared), true) => ClientCaPaths::Shared(shared),
        (None, false) => {
            for role in [Role::Operator, Role::Service, Role::Auditor] {
                let has_principals = roles.values().any(|r| *r == role);
                if has_principals && !per_role.iter().any(|(r, _)| *r == role) {
                    bail!(
                        "roles.{role} has principals but tls.{role}_ca is not set: \
                         name the CA whose certificates may act as {role}"
                    );
                }
            }
            ClientCaPaths::PerRole(per_role)
        }
    };
    Ok(TlsPaths {
        cert: raw.cert,
        key: raw.key,
        client_cas,
        allow_shared_client_ca: raw.allow_shared_client_ca,
        crl: raw.crl,
        crl_reload_interval,
        crl_grace,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::Config;

    fn config(tls: &str, roles: &str) -> anyhow::Result<Config> {
        Config::parse(&format!(
            r#"
            data_dir = "/tmp/x"
            allow_single_operator = true
            [tls]
            cert = "s.pem"
            key = "k.pem"
            {tls}
            [hsm]
            backend = "simulator"
            endpoint = "http://127.0.0.1:7444"
            allow_insecure_simulator = true
            [roles]
            {roles}
            "#
        ))
    }

    const ROLES: &str = r#"operator = ["spiffe://op.example/alice"]
            service = ["spiffe://provider.example/storage"]"#;

    fn err(tls: &str, roles: &str) -> String {
        format!("{:#}", config(tls, roles).unwrap_err())
    }

    #[test]
    fn role_cas_are_read_per_role() {
        let c = config(
            "operator_ca = \"op.pem\"\nservice_ca = \"svc.pem\"\nauditor_ca = \"aud.pem\"",
            ROLES,
        )
        .unwrap();
        assert_eq!(
            c.tls.client_cas,
            ClientCaPaths::PerRole(vec![
                (Role::Operator, "op.pem".into()),
                (Role::Service, "svc.pem".into()),
                (Role::Auditor, "aud.pem".into()),
            ])
        );
        assert!(!c.tls.allow_shared_client_ca);
        assert_eq!(c.tls.crl_grace, Duration::ZERO);
        // A role without principals needs no CA.
        config("operator_ca = \"op.pem\"\nservice_ca = \"svc.pem\"", ROLES).unwrap();
    }

    #[test]
    fn client_cas_are_checked() {
        assert!(err("", ROLES).contains("names no client CA"));
        assert!(
            err("client_ca = \"ca.pem\"\noperator_ca = \"op.pem\"", ROLES).contains("both set")
        );
        let missing = err("operator_ca = \"op.pem\"", ROLES);
        assert!(missing.contains("tls.service_ca is not set"), "{missing}");
        // The shared layout parses; `coffre serve` refuses it when loading
        // the files unless the flag is set.
        let shared = config("client_ca = \"ca.pem\"", ROLES).unwrap();
        let load = format!("{:#}", shared.tls.load().unwrap_err());
        assert!(load.contains("allow_shared_client_ca = true"), "{load}");
        let allowed = config(
            "client_ca = \"ca.pem\"\nallow_shared_client_ca = true",
            ROLES,
        )
        .unwrap();
        // Allowed: it goes on to read the (missing) file.
        let load = format!("{:#}", allowed.tls.load().unwrap_err());
        assert!(load.contains("reading the client CA"), "{load}");
    }

    #[test]
    fn the_crl_grace_is_bounded_and_needs_a_crl() {
        let shared = "client_ca = \"ca.pem\"\n";
        let c = config(
            &format!("{shared}crl = \"c.crl\"\ncrl_grace_secs = 3600"),
            ROLES,
        )
        .unwrap();
        assert_eq!(c.tls.crl_grace, Duration::from_secs(3600));
        assert!(err(&format!("{shared}crl_grace_secs = 10"), ROLES).contains("tls.crl is not"));
        let week = MAX_CRL_GRACE.as_secs();
        config(
            &format!("{shared}crl = \"c.crl\"\ncrl_grace_secs = {week}"),
            ROLES,
        )
        .unwrap();
        assert!(
            err(
                &format!("{shared}crl = \"c.crl\"\ncrl_grace_secs = {}", week + 1),
                ROLES
            )
            .contains("at most")
        );
    }

    #[test]
    fn role_principals_are_uris_or_plain_names() {
        let shared = "client_ca = \"ca.pem\"";
        for good in [
            "spiffe://op.example/alice",
            "urn:example:alice",
            "billing-service",
        ] {
            config(shared, &format!("operator = [{good:?}]")).unwrap();
        }
        for bad in [
            ":alice",
            "1spiffe://x",
            "spiffe:",
            "we ird:x",
            "a b",
            "sp_iffe://x",
        ] {
            let e = err(shared, &format!("operator = [{bad:?}]"));
            assert!(e.contains("roles.operator"), "{bad}: {e}");
        }
    }
}
