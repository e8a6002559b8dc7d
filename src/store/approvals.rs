//! Pending quorum approvals, durably: one JSON file per approval in a
//! directory, replaced atomically ([`fsutil::write_atomic`]: a temporary
//! file, fsync, rename, fsync of the directory). Approvals are few and
//! small; they hold no key material.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::StoreError;
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
}

/// The directory of approvals.
#[derive(Debug)]
pub struct ApprovalStore {
    dir: PathBuf,
}

fn io(e: std::io::Error, what: &str, path: &Path) -> StoreError {
    StoreError::Io(format!("{what} {}: {e}", path.display()))
}

impl ApprovalStore {
    /// Opens (creating) the directory. Approvals left `Executing` by a crash
    /// become `Failed` ("interrupted"): an operation never runs twice, and
    /// the operator sees that it must check the outcome.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(dir).map_err(|e| io(e, "creating", dir))?;
        let store = Self {
            dir: dir.to_path_buf(),
        };
        for mut a in store.list()? {
            if a.status == ApprovalStatus::Executing {
                a.status = ApprovalStatus::Failed;
                a.result = Some(
                    "interrupted by a restart while executing; check the outcome before proposing again"
                        .into(),
                );
                store.put(&a)?;
            }
        }
        Ok(store)
    }

    fn path(&self, id: Uuid) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Writes `approval` durably (atomic replace). The temporary file has a
    /// unique name, so concurrent writers never share one, and it does not
    /// end in `.json`, so [`ApprovalStore::list`] never reads it.
    pub fn put(&self, approval: &Approval) -> Result<(), StoreError> {
        let path = self.path(approval.id);
        let bytes = serde_json::to_vec_pretty(approval)
            .map_err(|e| StoreError::Corrupt(format!("encoding an approval: {e}")))?;
        fsutil::write_atomic(&path, &bytes, false).map_err(|e| io(e, "writing", &path))
    }

    pub fn get(&self, id: Uuid) -> Result<Option<Approval>, StoreError> {
        let path = self.path(id);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(e, "reading", &path)),
        }
    }

    /// Every approval, oldest first.
    pub fn list(&self) -> Result<Vec<Approval>, StoreError> {
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
            if let Some(a) = self.get(id)? {
                out.push(a);
            }
        }
        out.sort_by_key(|a| (a.created_at, a.id));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn approval(status: ApprovalStatus) -> Approval {
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
