//! The data directory: every file coffre keeps, named in one place.
//!
//! ```text
//! DIR/                      0700
//!   store/                  the key store (sled: generations under CURRENT)
//!   approvals/              pending quorum approvals, one JSON file each
//!   audit.log               the audit log (unless `audit.path` says otherwise)
//!   audit-public-key.pem    its checkpoint key, for offline verification (dev)
//!   pki/                    the dev PKI (`pki::PkiPaths`: ca.pem, operator-ca.pem, server.pem, …)
//!   hsm-sim.state           the dev simulated HSM's state (PIN-encrypted)
//!   hsm-sim.pin             the dev simulated HSM's PIN (0600)
//!   crl-state.json          the highest CRL number seen per issuer (rollback guard)
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::pki::PkiPaths;
use crate::store::SledStore;
use crate::store::approvals::ApprovalStore;

/// The audit log's file name, when the configuration names none.
pub const AUDIT_LOG_FILE: &str = "audit.log";

/// A data directory (`coffre dev --data-dir`, `data_dir` of `coffre serve`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn store(&self) -> PathBuf {
        self.root.join("store")
    }

    pub fn approvals(&self) -> PathBuf {
        self.root.join("approvals")
    }

    pub fn audit_log(&self) -> PathBuf {
        self.root.join(AUDIT_LOG_FILE)
    }

    pub fn audit_public_key(&self) -> PathBuf {
        self.root.join("audit-public-key.pem")
    }

    pub fn pki(&self) -> PkiPaths {
        PkiPaths::new(&self.root)
    }

    pub fn hsm_state(&self) -> PathBuf {
        self.root.join("hsm-sim.state")
    }

    pub fn hsm_pin(&self) -> PathBuf {
        self.root.join("hsm-sim.pin")
    }

    /// The highest CRL number (and thisUpdate) seen per issuer: a CRL older
    /// than it is refused, across restarts (`grpc::tls`).
    pub fn crl_state(&self) -> PathBuf {
        self.root.join("crl-state.json")
    }

    /// Creates the directory (mode 0700) if it does not exist.
    pub fn create(&self) -> anyhow::Result<()> {
        let dir = &self.root;
        if dir.exists() {
            if !dir.is_dir() {
                bail!("{} is not a directory", dir.display());
            }
            return Ok(());
        }
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            builder.mode(0o700);
        }
        builder
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))
    }

    /// Opens the key store (off the async runtime: it reads and syncs).
    pub async fn open_store(&self) -> anyhow::Result<SledStore> {
        let dir = self.store();
        let what = format!("opening the store in {}", dir.display());
        tokio::task::spawn_blocking(move || SledStore::open(&dir))
            .await
            .context("opening the store")?
            .context(what)
    }

    /// Opens the pending approvals.
    pub async fn open_approvals(&self) -> anyhow::Result<ApprovalStore> {
        let dir = self.approvals();
        let what = format!("opening the approvals in {}", dir.display());
        tokio::task::spawn_blocking(move || ApprovalStore::open(&dir))
            .await
            .context("opening the approvals")?
            .context(what)
    }
}
