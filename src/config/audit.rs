//! `[audit]`, validated once into what the audit trail needs: the log's
//! path, which key signs checkpoints, and the [`AuditTrailOptions`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;

use super::hsm::HsmConfig;
use super::raw::{AuditDurability, CheckpointKey, RawAudit};
use crate::audit::{
    AuditLogOptions, AuditTrailOptions, CheckpointPolicy, ClearContext, Durability,
};
use crate::model::SystemClock;

/// `[audit] retention_days` when unset: a year and a month of margin. An
/// unbounded log fills its volume, and a full volume stops the service
/// (fail closed).
pub const DEFAULT_RETENTION_DAYS: u32 = 400;

/// The audit log's configuration. The default is what an empty (or absent)
/// `[audit]` section gives.
#[derive(Clone, Debug, Default)]
pub struct AuditConfig {
    /// The log file; `None`: `audit.log` in the data directory (`server::DataDir`).
    pub path: Option<PathBuf>,
    /// Which key signs checkpoints.
    pub checkpoint_key: CheckpointKey,
    /// How the trail writes, checkpoints, shows contexts and prunes.
    pub trail: AuditTrailOptions,
}

impl AuditConfig {
    /// `coffre dev`'s audit log, from its flags rather than a file: the
    /// defaults, written with `durability`; with `discard`, records are made
    /// but not written (`--audit-durability off`, to measure what the log
    /// costs; no configuration file can ask for that).
    pub fn dev(durability: Durability, discard: bool) -> Self {
        let mut config = Self::default();
        config.trail.log.durability = durability;
        config.trail.discard = discard;
        config
    }

    /// The log's path, given the data directory.
    pub fn path_in(&self, data_dir: &Path) -> PathBuf {
        self.path
            .clone()
            .unwrap_or_else(|| crate::server::DataDir::new(data_dir).audit_log())
    }
}

/// Checks `[audit]` (and that an HSM-held checkpoint key has a PKCS#11
/// token to live in).
pub(super) fn validate(raw: RawAudit, hsm: &HsmConfig) -> anyhow::Result<AuditConfig> {
    let every_records = raw.checkpoint_every_records.unwrap_or(1000);
    let every_secs = raw.checkpoint_every_secs.unwrap_or(60);
    if every_records == 0 || every_secs == 0 {
        bail!("audit.checkpoint_every_records and audit.checkpoint_every_secs must be at least 1");
    }
    if raw.retention_days == Some(0) {
        bail!("audit.retention_days must be at least 1");
    }
    if raw.checkpoint_key == CheckpointKey::Hsm && !matches!(hsm, HsmConfig::Pkcs11 { .. }) {
        bail!("audit.checkpoint_key = \"hsm\" needs hsm.backend = \"pkcs11\"");
    }
    let clear_context = if raw.clear_context_keys.is_empty() {
        ClearContext::None
    } else if raw.clear_context_keys.iter().any(|k| k == "*") {
        ClearContext::All
    } else {
        ClearContext::Keys(raw.clear_context_keys.into_iter().collect())
    };
    let trail = AuditTrailOptions {
        log: AuditLogOptions {
            durability: match raw.durability {
                AuditDurability::Write => Durability::Write,
                AuditDurability::Fsync => Durability::Fsync,
            },
            checkpoints: CheckpointPolicy {
                every_records,
                every: Duration::from_secs(every_secs),
            },
            clock: Arc::new(SystemClock),
            ..AuditLogOptions::default()
        },
        clear_context,
        retention: Some(Duration::from_secs(
            u64::from(raw.retention_days.unwrap_or(DEFAULT_RETENTION_DAYS)) * 86_400,
        )),
        housekeeping_interval: Duration::from_secs(1),
        discard: false,
    };
    Ok(AuditConfig {
        path: raw.path,
        checkpoint_key: raw.checkpoint_key,
        trail,
    })
}
