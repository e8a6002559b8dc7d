//! The legacy approvals directory: quorum approvals as coffre kept them
//! before they moved into the key store ([`crate::store::KeyStore`]'s
//! approval methods), which reads them once at start to move them in. One
//! JSON file per approval in a directory, replaced atomically ([`fsutil::write_atomic`]: a temporary
//! file, fsync, rename, fsync of the directory). Approvals are few and
//! small; they hold no key material.
//!
//! Once the store's MAC key is installed ([`ApprovalStore::install_integrity`],
//! at the server's start) each file is sealed: a first line
//! `coffre-mac-v1 <hex tag>` over the table `approvals`, the approval's id
//! and the JSON that follows ([`crate::store::integrity`]). A file that fails
//! its MAC (edited, planted, copied under another id, unsealed) is refused
//! by [`ApprovalStore::get`] and skipped by [`ApprovalStore::list`], logged
//! and counted: it is never shown as valid nor executed.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::StoreError;
use super::integrity::{RecordMac, Table, is_sealed_text, strip_text_seal_unchecked};
use crate::fsutil;
use crate::model::{KeyId, KeyPolicy, KeyState, Timestamp};

/// An operation that needs M-of-N approvals when the configuration says so.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SensitiveOperation {
    ScheduleKeyDeletion {
        key_id: KeyId,
        pending_window_days: u32,
    },
    CancelKeyDeletion {
        key_id: KeyId,
    },
    EnableKey {
        key_id: KeyId,
    },
    UpdateKeyPolicy {
        key_id: KeyId,
        policy: KeyPolicy,
    },
    /// Sets `min_decryption_version`, raising it (versions stop decrypting)
    /// or lowering it (retired versions decrypt again).
    RetireKeyVersions {
        key_id: KeyId,
        min_decryption_version: u32,
    },
    RotateRootKey,
}

impl SensitiveOperation {
    pub fn kind(&self) -> SensitiveKind {
        match self {
            SensitiveOperation::ScheduleKeyDeletion { .. } => SensitiveKind::ScheduleKeyDeletion,
            SensitiveOperation::CancelKeyDeletion { .. } => SensitiveKind::CancelKeyDeletion,
            SensitiveOperation::EnableKey { .. } => SensitiveKind::EnableKey,
            SensitiveOperation::UpdateKeyPolicy { .. } => SensitiveKind::UpdateKeyPolicy,
            SensitiveOperation::RetireKeyVersions { .. } => SensitiveKind::RetireKeyVersions,
            SensitiveOperation::RotateRootKey => SensitiveKind::RotateRootKey,
        }
    }

    pub fn key_id(&self) -> Option<KeyId> {
        match self {
            SensitiveOperation::ScheduleKeyDeletion { key_id, .. }
            | SensitiveOperation::CancelKeyDeletion { key_id }
            | SensitiveOperation::EnableKey { key_id }
            | SensitiveOperation::UpdateKeyPolicy { key_id, .. }
            | SensitiveOperation::RetireKeyVersions { key_id, .. } => Some(*key_id),
            SensitiveOperation::RotateRootKey => None,
        }
    }

    /// One line for people. The whole operation is in
    /// `service::canonical` (`canonical_operation`, `approval_changes`):
    /// this line is a title, never what an approver decides on.
    pub fn describe(&self) -> String {
        match self {
            SensitiveOperation::ScheduleKeyDeletion {
                key_id,
                pending_window_days,
            } => format!("ScheduleKeyDeletion {key_id} ({pending_window_days} days)"),
            SensitiveOperation::CancelKeyDeletion { key_id } => {
                format!("CancelKeyDeletion {key_id}")
            }
            SensitiveOperation::EnableKey { key_id } => format!("EnableKey {key_id}"),
            SensitiveOperation::UpdateKeyPolicy { key_id, policy } => format!(
                "UpdateKeyPolicy {key_id} ({} grants, {} context rules; see the changes)",
                policy.grants.len(),
                policy.required_context.len()
            ),
            SensitiveOperation::RetireKeyVersions {
                key_id,
                min_decryption_version,
            } => format!(
                "RetireKeyVersions {key_id} (min_decryption_version {min_decryption_version})"
            ),
            SensitiveOperation::RotateRootKey => "RotateRootKey".to_string(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum SensitiveKind {
    ScheduleKeyDeletion,
    CancelKeyDeletion,
    EnableKey,
    UpdateKeyPolicy,
    RetireKeyVersions,
    RotateRootKey,
}

impl SensitiveKind {
    pub const ALL: [SensitiveKind; 6] = [
        SensitiveKind::ScheduleKeyDeletion,
        SensitiveKind::CancelKeyDeletion,
        SensitiveKind::EnableKey,
        SensitiveKind::UpdateKeyPolicy,
        SensitiveKind::RetireKeyVersions,
        SensitiveKind::RotateRootKey,
    ];

    /// The RPC's name, as `[quorum.operations]` spells it.
    pub fn name(self) -> &'static str {
        match self {
            SensitiveKind::ScheduleKeyDeletion => "ScheduleKeyDeletion",
            SensitiveKind::CancelKeyDeletion => "CancelKeyDeletion",
            SensitiveKind::EnableKey => "EnableKey",
            SensitiveKind::UpdateKeyPolicy => "UpdateKeyPolicy",
            SensitiveKind::RetireKeyVersions => "RetireKeyVersions",
            SensitiveKind::RotateRootKey => "RotateRootKey",
        }
    }
}

/// The key as it was when an operation on it was proposed: what the
/// approvers' view of the change is relative to (the operation runs only if
/// the key is still so, see `key_fingerprint`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyBefore {
    pub state: KeyState,
    pub policy: KeyPolicy,
    pub min_decryption_version: u32,
    pub primary_version: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ApprovalStatus {
    Pending,
    /// Enough approvals; the operation is running (a crash leaves it here:
    /// see [`ApprovalStore::open`]).
    Executing,
    Executed,
    Rejected,
    Expired,
    /// The operation ran and failed, or was interrupted.
    Failed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    pub id: Uuid,
    pub operation: SensitiveOperation,
    pub proposer: String,
    /// Distinct principals that approved, the proposer first.
    pub approved_by: Vec<String>,
    pub approvals_required: u32,
    pub rejected_by: Option<String>,
    pub status: ApprovalStatus,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    /// What the operation returned (or why it failed).
    pub result: Option<String>,
    /// For operations on a key: a digest of the key's state and policy when
    /// proposed. The operation runs only if they are still the same, so an
    /// old proposal cannot undo a newer change.
    #[serde(default)]
    pub key_fingerprint: Option<String>,
    /// For operations on a key: the key when proposed (absent from
    /// approvals recorded before it existed).
    #[serde(default)]
    pub key_before: Option<KeyBefore>,
    /// While EXECUTING: the process running it (its incarnation id), so
    /// that a start fails only executions that no live process runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor: Option<String>,
}

/// The directory of approvals.
#[derive(Debug)]
pub struct ApprovalStore {
    dir: PathBuf,
    /// The store's MAC key, once installed.
    integrity: OnceLock<Arc<RecordMac>>,
}

fn io(e: std::io::Error, what: &str, path: &Path) -> StoreError {
    StoreError::Io(format!("{what} {}: {e}", path.display()))
}

impl ApprovalStore {
    /// Opens (creating) the directory. Approvals left `Executing` by a crash
    /// become `Failed` ("interrupted"): an operation never runs twice, and
    /// the operator sees that it must check the outcome.
    ///
    /// In a directory of sealed files this waits for the MAC key: it is done
    /// by [`ApprovalStore::install_integrity`] instead.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(dir).map_err(|e| io(e, "creating", dir))?;
        let store = Self {
            dir: dir.to_path_buf(),
            integrity: OnceLock::new(),
        };
        let any_sealed = store
            .files()?
            .iter()
            .any(|(_, path)| fs::read(path).is_ok_and(|b| is_sealed_text(&b)));
        if !any_sealed {
            store.fail_interrupted()?;
        }
        Ok(store)
    }

    /// Approvals left `Executing` by a crash become `Failed` (done by
    /// [`ApprovalStore::open`], [`ApprovalStore::install_integrity`] or
    /// [`ApprovalStore::migrate`]; public for a start that leaves unsealed
    /// files unsealed).
    pub fn fail_interrupted(&self) -> Result<(), StoreError> {
        for mut a in self.list()? {
            if a.status == ApprovalStatus::Executing {
                a.status = ApprovalStatus::Failed;
                a.result = Some(
                    "interrupted by a restart while executing; check the outcome before proposing again"
                        .into(),
                );
                self.put(&a)?;
            }
        }
        Ok(())
    }

    /// Installs the store's MAC key (once, at start): from now on every
    /// approval is written sealed and must verify when read. Returns how
    /// many files are not sealed (they are refused as they are read, unless
    /// [`ApprovalStore::migrate`] seals them). If none, fails the approvals
    /// a crash left executing, as [`ApprovalStore::open`] does.
    pub fn install_integrity(&self, mac: &Arc<RecordMac>) -> Result<u64, StoreError> {
        if self.integrity.set(Arc::clone(mac)).is_err() {
            return Err(StoreError::Corrupt(
                "the approvals' integrity key is already installed".into(),
            ));
        }
        let mut unsealed = 0u64;
        for (_, path) in self.files()? {
            let bytes = fs::read(&path).map_err(|e| io(e, "reading", &path))?;
            if !is_sealed_text(&bytes) {
                unsealed += 1;
            }
        }
        if unsealed == 0 {
            self.fail_interrupted()?;
        }
        Ok(unsealed)
    }

    /// Seals every file under the installed key, whatever it holds now
    /// (unsealed, or sealed under another key): the migration of a
    /// directory from before integrity, which trusts what is stored, so
    /// allowed only when integrity was never enabled. Each file must still
    /// be an approval whose id is its name. Returns how many were written.
    pub fn migrate(&self) -> Result<u64, StoreError> {
        if self.integrity.get().is_none() {
            return Err(StoreError::Corrupt(
                "migrating approvals without an integrity key".into(),
            ));
        }
        let mut sealed = 0u64;
        for (id, path) in self.files()? {
            let bytes = fs::read(&path).map_err(|e| io(e, "reading", &path))?;
            let approval: Approval = serde_json::from_slice(strip_text_seal_unchecked(&bytes))
                .map_err(|e| StoreError::Corrupt(format!("{}: {e}", path.display())))?;
            if approval.id != id {
                return Err(StoreError::Corrupt(format!(
                    "{} holds approval {}",
                    path.display(),
                    approval.id
                )));
            }
            self.put(&approval)?;
            sealed += 1;
        }
        self.fail_interrupted()?;
        Ok(sealed)
    }

    /// The approval files (`<uuid>.json`), by id.
    fn files(&self) -> Result<Vec<(Uuid, PathBuf)>, StoreError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(|e| io(e, "listing", &self.dir))? {
            let entry = entry.map_err(|e| io(e, "listing", &self.dir))?;
            let name = entry.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            let Ok(id) = stem.parse::<Uuid>() else {
                continue;
            };
            out.push((id, entry.path()));
        }
        Ok(out)
    }

    fn path(&self, id: Uuid) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Writes `approval` durably (atomic replace). The temporary file has a
    /// unique name, so concurrent writers never share one, and it does not
    /// end in `.json`, so [`ApprovalStore::list`] never reads it.
    pub fn put(&self, approval: &Approval) -> Result<(), StoreError> {
        let path = self.path(approval.id);
        let json = serde_json::to_vec_pretty(approval)
            .map_err(|e| StoreError::Corrupt(format!("encoding an approval: {e}")))?;
        let bytes = match self.integrity.get() {
            Some(mac) => mac.seal_text(Table::Approvals, approval.id.as_bytes(), &json),
            None => json,
        };
        fsutil::write_atomic(&path, &bytes, false).map_err(|e| io(e, "writing", &path))
    }

    pub fn get(&self, id: Uuid) -> Result<Option<Approval>, StoreError> {
        let path = self.path(id);
        match fs::read(&path) {
            Ok(bytes) => {
                let json = match self.integrity.get() {
                    Some(mac) => mac.open_text(Table::Approvals, id.as_bytes(), &bytes)?,
                    None if is_sealed_text(&bytes) => {
                        return Err(StoreError::IntegrityFailure(format!(
                            "approval {id} is sealed and no integrity key is installed"
                        )));
                    }
                    None => &bytes,
                };
                let approval: Approval = serde_json::from_slice(json)
                    .map_err(|e| StoreError::Corrupt(format!("{}: {e}", path.display())))?;
                if approval.id != id {
                    return Err(StoreError::Corrupt(format!(
                        "{} holds approval {}",
                        path.display(),
                        approval.id
                    )));
                }
                Ok(Some(approval))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(e, "reading", &path)),
        }
    }

    /// Removes the file of approval `id` durably (once it is in the store).
    pub fn remove(&self, id: Uuid) -> Result<(), StoreError> {
        let path = self.path(id);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e, "removing", &path)),
        }
        crate::fsutil::sync_dir(&self.dir).map_err(|e| io(e, "syncing", &self.dir))
    }

    /// Removes the directory if no approval file is left in it (other
    /// files, a refused approval for one, keep it). `true` if removed.
    pub fn remove_dir_if_empty(&self) -> Result<bool, StoreError> {
        if !self.files()?.is_empty() {
            return Ok(false);
        }
        let entries = fs::read_dir(&self.dir).map_err(|e| io(e, "listing", &self.dir))?;
        if entries.count() > 0 {
            return Ok(false);
        }
        fs::remove_dir(&self.dir).map_err(|e| io(e, "removing", &self.dir))?;
        if let Some(parent) = self.dir.parent() {
            crate::fsutil::sync_dir(parent).map_err(|e| io(e, "syncing", parent))?;
        }
        Ok(true)
    }

    /// Every approval, oldest first. One that fails its integrity check is
    /// left out (logged and counted by the check), so that a planted file
    /// cannot hide the others.
    pub fn list(&self) -> Result<Vec<Approval>, StoreError> {
        let mut out = Vec::new();
        for (id, _) in self.files()? {
            match self.get(id) {
                Ok(Some(a)) => out.push(a),
                Ok(None) | Err(StoreError::IntegrityFailure(_)) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by_key(|a| (a.created_at, a.id));
        Ok(out)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A pending-style approval of an EnableKey by `alice` (the approvals'
    /// unit tests and `approvals_integrity_tests` share it).
    pub(in crate::store) fn approval(status: ApprovalStatus) -> Approval {
        Approval {
            id: Uuid::new_v4(),
            operation: SensitiveOperation::EnableKey {
                key_id: KeyId::new_random(),
            },
            proposer: "alice".into(),
            approved_by: vec!["alice".into()],
            approvals_required: 2,
            rejected_by: None,
            status,
            created_at: Timestamp(1),
            expires_at: Timestamp(2),
            result: None,
            key_fingerprint: None,
            key_before: None,
            executor: None,
        }
    }

    #[test]
    fn round_trip_and_interrupted_executions_fail_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = ApprovalStore::open(dir.path()).unwrap();
        let pending = approval(ApprovalStatus::Pending);
        let executing = approval(ApprovalStatus::Executing);
        store.put(&pending).unwrap();
        store.put(&executing).unwrap();
        assert_eq!(store.get(pending.id).unwrap().unwrap(), pending);
        assert_eq!(store.list().unwrap().len(), 2);
        assert!(store.get(Uuid::new_v4()).unwrap().is_none());
        // Replacing leaves no temporary file behind.
        store.put(&pending).unwrap();
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.iter().all(|n| n.ends_with(".json")), "{names:?}");

        let reopened = ApprovalStore::open(dir.path()).unwrap();
        assert_eq!(
            reopened.get(pending.id).unwrap().unwrap().status,
            ApprovalStatus::Pending
        );
        let after = reopened.get(executing.id).unwrap().unwrap();
        assert_eq!(after.status, ApprovalStatus::Failed);
        assert!(after.result.unwrap().contains("interrupted"));
    }

    #[test]
    fn a_corrupt_file_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let store = ApprovalStore::open(dir.path()).unwrap();
        let id = Uuid::new_v4();
        fs::write(dir.path().join(format!("{id}.json")), b"{not json").unwrap();
        assert!(matches!(store.get(id), Err(StoreError::Corrupt(_))));
    }
}
