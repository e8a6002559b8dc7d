//! `[hsm]`: which HSM backend coffre runs on, and where its PIN comes from
//! (never the configuration file).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use zeroize::Zeroizing;

use super::raw::RawHsm;

/// Which PKCS#11 token to use (`hsm.token_label` or `hsm.slot`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenSelector {
    /// The token with this label (`CKA_LABEL` of the token, trailing spaces
    /// ignored). Exactly one token may carry it.
    Label(String),
    /// The slot with this id.
    Slot(u64),
}

impl fmt::Display for TokenSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSelector::Label(l) => write!(f, "token labelled {l:?}"),
            TokenSelector::Slot(s) => write!(f, "slot {s}"),
        }
    }
}

/// Default size of the PKCS#11 session pool: a call in flight per session.
pub const DEFAULT_HSM_SESSIONS: usize = 8;
/// Largest PKCS#11 session pool accepted.
pub const MAX_HSM_SESSIONS: usize = 1024;

#[derive(Clone, Debug)]
pub enum HsmConfig {
    /// A separate `hsm-sim serve` process.
    Simulator {
        endpoint: String,
        pin: PinSource,
        timeout: Duration,
    },
    /// A PKCS#11 module (a real HSM; SoftHSM2 in tests).
    Pkcs11 {
        module: PathBuf,
        token: TokenSelector,
        pin: PinSource,
        sessions: usize,
        timeout: Duration,
    },
}

/// A PIN, read from an environment variable or a file; never from the
/// configuration file itself. Secret: no `Clone`, redacted `Debug`,
/// zeroized on drop.
pub struct Pin(Zeroizing<String>);

impl Pin {
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn into_zeroizing(self) -> Zeroizing<String> {
        self.0
    }
}

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pin(<redacted>)")
    }
}

#[derive(Clone, Debug)]
pub enum PinSource {
    Env(String),
    File(PathBuf),
}

impl PinSource {
    pub fn read(&self) -> anyhow::Result<Pin> {
        let pin =
            match self {
                PinSource::Env(var) => Zeroizing::new(std::env::var(var).with_context(|| {
                    format!("the HSM PIN environment variable {var} is not set")
                })?),
                PinSource::File(path) => {
                    let mut pin =
                        Zeroizing::new(std::fs::read_to_string(path).with_context(|| {
                            format!("reading the HSM PIN file {}", path.display())
                        })?);
                    let len = pin.trim_end_matches(['\n', '\r']).len();
                    pin.truncate(len);
                    pin
                }
            };
        if pin.is_empty() {
            bail!("the HSM PIN is empty");
        }
        Ok(Pin(pin))
    }
}

/// Checks `[hsm]` for the backend it names.
pub(super) fn validate(raw: &RawHsm) -> anyhow::Result<HsmConfig> {
    Ok(match raw.backend.as_str() {
        "simulator" => {
            if !raw.allow_insecure_simulator {
                bail!(
                    "the simulated HSM is not secure: it keeps its root key in a file. \
                     Set hsm.allow_insecure_simulator = true to use it anyway (tests, demos)"
                );
            }
            let endpoint = raw
                .endpoint
                .clone()
                .context("hsm.endpoint is required for the simulator backend")?;
            check_loopback(&endpoint)?;
            for (set, name) in [
                (raw.module.is_some(), "module"),
                (raw.token_label.is_some(), "token_label"),
                (raw.slot.is_some(), "slot"),
                (raw.sessions.is_some(), "sessions"),
            ] {
                if set {
                    bail!("hsm.{name} is for the pkcs11 backend, not the simulator");
                }
            }
            HsmConfig::Simulator {
                endpoint,
                pin: pin_source(raw)?,
                timeout: timeout(raw)?,
            }
        }
        "pkcs11" => {
            if raw.endpoint.is_some() {
                bail!("hsm.endpoint is for the simulator; the pkcs11 backend takes hsm.module");
            }
            if raw.allow_insecure_simulator {
                bail!("hsm.allow_insecure_simulator is for the simulator backend");
            }
            let module = raw.module.clone().context(
                "hsm.module (the vendor's PKCS#11 library) is required for the pkcs11 backend",
            )?;
            let token = match (raw.token_label.clone(), raw.slot) {
                (Some(label), None) if !label.is_empty() => TokenSelector::Label(label),
                (None, Some(slot)) => TokenSelector::Slot(slot),
                (None, None) | (Some(_), None) => {
                    bail!("the pkcs11 backend needs hsm.token_label or hsm.slot")
                }
                (Some(_), Some(_)) => bail!("set hsm.token_label or hsm.slot, not both"),
            };
            let sessions = raw.sessions.unwrap_or(DEFAULT_HSM_SESSIONS);
            if !(1..=MAX_HSM_SESSIONS).contains(&sessions) {
                bail!("hsm.sessions must be 1..={MAX_HSM_SESSIONS}");
            }
            HsmConfig::Pkcs11 {
                module,
                token,
                pin: pin_source(raw)?,
                sessions,
                timeout: timeout(raw)?,
            }
        }
        other => bail!("unknown hsm.backend {other:?} (supported: \"pkcs11\", \"simulator\")"),
    })
}

fn pin_source(hsm: &RawHsm) -> anyhow::Result<PinSource> {
    if hsm.pin.is_some() {
        bail!(
            "hsm.pin: the PIN never goes in the configuration file; \
             set hsm.pin_env (an environment variable) or hsm.pin_file (a file readable only by coffre)"
        );
    }
    Ok(match (&hsm.pin_env, &hsm.pin_file) {
        (Some(var), None) => PinSource::Env(var.clone()),
        (None, Some(file)) => PinSource::File(file.clone()),
        (None, None) => PinSource::Env("COFFRE_HSM_PIN".to_string()),
        (Some(_), Some(_)) => bail!("set hsm.pin_env or hsm.pin_file, not both"),
    })
}

fn timeout(hsm: &RawHsm) -> anyhow::Result<Duration> {
    let timeout = Duration::from_millis(hsm.timeout_ms.unwrap_or(2000));
    if timeout.is_zero() {
        bail!("hsm.timeout_ms must be positive");
    }
    Ok(timeout)
}

/// The simulator speaks plain TCP (PIN and CMK material in clear): it must
/// be on this host.
fn check_loopback(endpoint: &str) -> anyhow::Result<()> {
    let uri: tonic::transport::Uri = endpoint
        .parse()
        .with_context(|| format!("hsm.endpoint {endpoint:?} is not a URL"))?;
    let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        bail!(
            "hsm.endpoint {endpoint:?} is not on this host: the simulated HSM speaks plain TCP \
             and must be reached over loopback (127.0.0.1, ::1 or localhost)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_pin_is_read_from_its_file_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hsm.pin");
        std::fs::write(&path, "1234\r\n").unwrap();
        let pin = PinSource::File(path.clone()).read().unwrap();
        assert_eq!(pin.expose(), "1234");
        assert_eq!(format!("{pin:?}"), "Pin(<redacted>)");
        assert_eq!(pin.into_zeroizing().as_str(), "1234");
        std::fs::write(&path, "\n").unwrap();
        let err = PinSource::File(path).read().unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
    }
}
