//! The audit log as the server opens it: where it is, how it behaves, and
//! which key signs its checkpoints.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use crate::audit::{AuditTrail, AuditTrailOptions, ExternalSigner};
use crate::service::Kms;

/// Where the audit log is and how it behaves.
#[derive(Clone, Debug)]
pub struct AuditSetup {
    pub path: PathBuf,
    pub options: AuditTrailOptions,
    /// Where to write the checkpoint public key (PEM), if anywhere.
    pub public_key_file: Option<PathBuf>,
    /// A checkpoint key held by the HSM, instead of the one kept in the store.
    pub external_signer: Option<Arc<dyn ExternalSigner>>,
}

impl AuditSetup {
    pub fn new(path: PathBuf, options: AuditTrailOptions) -> Self {
        Self {
            path,
            options,
            public_key_file: None,
            external_signer: None,
        }
    }
}

/// Loads (or, on a new data directory, creates) the audit log's keys and
/// opens the log, verifying it; writes the public key file if asked.
pub(super) async fn open_trail(kms: &Kms, setup: &AuditSetup) -> anyhow::Result<Arc<AuditTrail>> {
    let mut keys = kms
        .audit_keys()
        .await
        .context("loading the audit log's signing key (HSM-wrapped, in the store)")?;
    if let Some(signer) = &setup.external_signer {
        keys.signer = crate::audit::CheckpointSigner::external(Arc::clone(signer));
    }
    let path = setup.path.clone();
    let options = setup.options.clone();
    let trail = tokio::task::spawn_blocking(move || AuditTrail::open(&path, keys, options))
        .await
        .context("opening the audit log")?
        .with_context(|| {
            format!(
                "opening the audit log {}{}",
                setup.path.display(),
                if setup.external_signer.is_some() {
                    " (its checkpoints must verify under the HSM's audit signing key: a log \
                     begun with audit.checkpoint_key = \"software\" cannot continue under it; \
                     start a new log file with audit.path and keep the old one)"
                } else {
                    ""
                }
            )
        })?;
    if let Some(file) = &setup.public_key_file {
        let pem = trail.public_key_pem();
        if std::fs::read_to_string(file).ok().as_deref() != Some(pem.as_str()) {
            crate::fsutil::write_atomic(file, pem.as_bytes(), false)
                .with_context(|| format!("writing {}", file.display()))?;
        }
    }
    tracing::info!(file = %setup.path.display(), "audit log open and verified");
    Ok(Arc::new(trail))
}
