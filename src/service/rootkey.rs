//! HSM root-key rotation: a new root key, every stored CMK version re-wrapped
//! under it, then the old root keys destroyed.
//!
//! The procedure keeps no state of its own; the HSM and the store are the
//! state, which is what makes it safe to interrupt (even `kill -9`) and to
//! resume by running it again:
//!
//! 1. If the HSM holds only one root key, no rotation is in progress: ask the
//!    HSM for a new one (it becomes current). If it holds several, a previous
//!    run was interrupted: resume with the current one.
//! 2. Re-wrap every live version not under the current root key: unwrap in
//!    the HSM (which still holds the old key), wrap under the current one,
//!    compare-and-swap the version record. Each record is, at every instant,
//!    wrapped under a root key the HSM still holds — never unwrappable.
//!    Then the same for the service's own secrets (the audit log's key).
//! 3. Only when the store holds no live version (and no secret) under
//!    another root key, fence the old root keys off in the store
//!    (`KeyStore::fence_root_keys`: from then on nothing wrapped under them
//!    is stored), then destroy them.
//!
//! New versions created meanwhile are wrapped under the current root key
//! already. The clear material never changes, so the caches stay valid.

use super::Kms;
use crate::authz::{Caller, Operation};
use crate::error::{Error, Result};
use crate::hsm::HsmInfo;
use crate::model::{KeyId, cmk_wrap_aad};

/// Progress of a rotation, reported after every batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RootRotationProgress {
    pub new_root_key_id: u32,
    /// Root keys other than the new one when the run started.
    pub old_root_key_ids: Vec<u32>,
    /// This run resumed an interrupted rotation.
    pub resumed: bool,
    pub rewrapped: u64,
    pub remaining: u64,
    pub done: bool,
    pub destroyed_root_key_ids: Vec<u32>,
}

const BATCH: usize = 32;

/// How long the root-rotation lease lasts between renewals (one per
/// batch of [`BATCH`] re-wraps).
const ROOT_ROTATION_LEASE: std::time::Duration = std::time::Duration::from_secs(60);

impl Kms {
    /// Takes or renews the cluster's root-rotation lease; refused while
    /// another node holds it.
    async fn root_rotation_lease(&self) -> Result<crate::cluster::Lease> {
        match self
            .coordination
            .acquire(crate::cluster::leases::ROOT_ROTATION, ROOT_ROTATION_LEASE)
            .await
        {
            Ok(Some(lease)) => Ok(lease),
            Ok(None) => Err(Error::FailedPrecondition(
                "another node is rotating the HSM root key; wait for it to finish (coffre cluster \
                 status shows the root-rotation lease), then run the rotation again if needed"
                    .into(),
            )),
            Err(e) => Err(Error::FailedPrecondition(format!(
                "the root-rotation lease cannot be taken ({e}); run the rotation again once the \
                 database answers"
            ))),
        }
    }

    pub async fn hsm_info(&self, caller: &Caller) -> Result<HsmInfo> {
        self.authorize(caller, Operation::GetHsmInfo)?;
        Ok(self.hsm.info().await?)
    }

    /// Runs (or resumes) a root-key rotation. `progress` is called after each
    /// batch; returning `false` from it stops the run there (as a crash
    /// would), leaving a state the next run resumes from.
    pub async fn rotate_root_key(
        &self,
        caller: &Caller,
        progress: impl FnMut(&RootRotationProgress) -> bool + Send,
    ) -> Result<RootRotationProgress> {
        self.authorize(caller, Operation::RotateRootKey)?;
        self.gate(
            caller,
            crate::store::approvals::SensitiveOperation::RotateRootKey,
        )
        .await?;
        self.exec_rotate_root_key(caller, progress).await
    }

    /// The rotation itself (authorization and quorum done).
    pub(super) async fn exec_rotate_root_key(
        &self,
        caller: &Caller,
        mut progress: impl FnMut(&RootRotationProgress) -> bool + Send,
    ) -> Result<RootRotationProgress> {
        // One rotation at a time in this process (the lock) and in the
        // cluster (the lease, renewed after every batch): two rotations at
        // once would each ask the HSM for a new root key and undo each
        // other's work. Neither is what keeps data safe: the fence is.
        let _one_at_a_time = self.root_rotation.lock().await;
        self.root_rotation_lease().await?;

        let info = self.hsm.info().await?;
        let (new_root, resumed) = if info.root_key_ids.len() > 1 {
            (info.current_root_key_id, true)
        } else {
            (self.hsm.rotate_root_key().await?, false)
        };
        let after = self.hsm.info().await?;
        if after.current_root_key_id != new_root {
            return Err(Error::Internal(format!(
                "the HSM's current root key is {} after rotating to {new_root}",
                after.current_root_key_id
            )));
        }
        let mut state = RootRotationProgress {
            new_root_key_id: new_root,
            old_root_key_ids: after
                .root_key_ids
                .iter()
                .copied()
                .filter(|id| *id != new_root)
                .collect(),
            resumed,
            ..Default::default()
        };
        tracing::warn!(new_root_key_id = new_root, resumed, principal = %caller.principal, "HSM root-key rotation started");

        state.remaining = self.store.count_versions(new_root).await?.not_under_root;
        if !progress(&state) {
            return Ok(state);
        }

        let mut cursor: Option<(KeyId, u32)> = None;
        loop {
            let page = self
                .store
                .versions_not_under_root(new_root, cursor, BATCH)
                .await?;
            let Some(last) = page.last() else { break };
            cursor = Some((last.key_id, last.version));
            for current in page {
                if current.hsm_object.is_some() {
                    // Held by the HSM itself: no root key wraps it.
                    continue;
                }
                let aad = cmk_wrap_aad(current.key_id, current.version);
                let clear = self.hsm.unwrap(&current.wrapped_material, &aad).await?;
                let wrapped = self.hsm.wrap(clear.expose(), &aad).await?;
                drop(clear);
                if wrapped.root_key_id != new_root {
                    return Err(Error::Internal(format!(
                        "the HSM wrapped under root key {} instead of {new_root}",
                        wrapped.root_key_id
                    )));
                }
                let mut next = current.clone();
                next.wrapped_material = wrapped.blob;
                next.hsm_root_key_id = new_root;
                let outcome = self
                    .store
                    .rewrap_version(&current, &next)
                    .await
                    .map_err(Error::from);
                match outcome {
                    Ok(()) => state.rewrapped += 1,
                    // Destroyed or changed meanwhile: the final check below
                    // decides whether anything is left.
                    Err(Error::Store(crate::store::StoreError::Conflict(_))) => {}
                    Err(e) => return Err(e),
                }
                state.remaining = state.remaining.saturating_sub(1);
            }
            if !progress(&state) {
                return Ok(state);
            }
            self.root_rotation_lease().await?;
        }

        // The service's own secrets (the audit key) are re-wrapped too.
        let secrets_left = self.rewrap_secrets(new_root).await?;

        // Still this node's to finish (renewed), then the root-key fence, in
        // the store: it checks that nothing live is
        // under an old root key and retires the old ones in one step, after
        // which the store refuses anything wrapped under them, whichever
        // process writes it (a version wrapped a moment before the HSM
        // rotated). The write guard keeps this process's writers out too.
        self.root_rotation_lease().await?;
        let _no_new_versions = self.begin_write().await;
        let retire = state.old_root_key_ids.clone();
        let left = secrets_left + self.store.fence_root_keys(new_root, &retire).await?;
        if left > 0 {
            return Err(Error::FailedPrecondition(format!(
                "{left} key versions are still wrapped under an old root key; run the rotation again"
            )));
        }
        for old in &state.old_root_key_ids {
            self.hsm.destroy_root_key(*old).await?;
            state.destroyed_root_key_ids.push(*old);
            tracing::warn!(root_key_id = old, "old HSM root key destroyed");
        }
        state.remaining = 0;
        state.done = true;
        progress(&state);
        tracing::warn!(
            new_root_key_id = new_root,
            rewrapped = state.rewrapped,
            "HSM root-key rotation complete"
        );
        Ok(state)
    }
}
