//! Key management: create, read, list, rotate, disable, enable.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::Kms;
use super::WriteGuard;
use crate::authz::{Caller, Operation};
use crate::error::{Error, Result};
use crate::model::{
    KeyId, KeyPolicy, KeyRecord, KeyRef, KeyState, ProtectionLevel, VersionRecord, cmk_wrap_aad,
    hsm_object_name, validate_alias,
};
use crate::secret::{CMK_LEN, CmkMaterial};
use crate::store::{KeyFilter, StoreError};

pub const MAX_DESCRIPTION_LEN: usize = 8192;
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_LEN: usize = 256;
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// The most keys [`Kms::create_keys`] creates in one store write.
pub const MAX_CREATE_BATCH: usize = 10_000;
pub const MAX_PAGE_SIZE: usize = 1000;
/// How many times a new version is wrapped again and written again when
/// root-key rotations keep retiring the root key it was wrapped under.
const ROOT_RETIRED_ATTEMPTS: usize = 4;

#[derive(Clone, Debug, Default)]
pub struct CreateKeyInput {
    pub alias: Option<String>,
    pub description: String,
    pub protection_level: Option<ProtectionLevel>,
    pub labels: BTreeMap<String, String>,
    pub rotation_period: Option<std::time::Duration>,
    /// `None`: the server's default policy.
    pub policy: Option<KeyPolicy>,
}

/// A key with its versions (metadata only).
#[derive(Clone, Debug)]
pub struct KeyView {
    pub key: Arc<KeyRecord>,
    pub versions: Vec<VersionRecord>,
}

#[derive(Clone, Debug)]
pub struct KeyPage {
    pub keys: Vec<KeyRecord>,
    /// The id to pass as `start_after` for the next page; `None` at the end.
    pub next: Option<KeyId>,
}

impl Kms {
    pub async fn create_key(&self, caller: &Caller, input: CreateKeyInput) -> Result<KeyView> {
        self.authorize(caller, Operation::CreateKey)?;
        self.check_new_key(&input)?;
        let id = KeyId::new_random();
        // A root-key rotation (on this node or another) that retires the
        // root key this version is wrapped under before it is stored gets
        // it refused by the store's fence: it is wrapped again under the
        // current root key and written again (`rewrap_retired`).
        let guard = self.begin_write().await;
        let level = input.protection_level.unwrap_or(ProtectionLevel::Software);
        let (mut version, material) = self.new_version(id, 1, level).await?;
        let record = self.new_key_record(caller, id, input, &version);
        let mut attempts = 0;
        let mark = self.version_mark();
        let created = loop {
            match self.store.create_key(&record, &version).await {
                Err(StoreError::RootKeyRetired(root)) if attempts < ROOT_RETIRED_ATTEMPTS => {
                    attempts += 1;
                    self.rewrap_retired(&mut version, material.as_ref(), root)
                        .await?;
                }
                other => break other.map_err(create_error),
            }
        };
        if let Err(e) = created {
            self.forget_new_object(&version, &e).await;
            return Err(e);
        }
        // Its own write too: an acknowledgement says the same as a barrier
        // only while no one cancelled the commit's wait for the standbys.
        self.note_version(id, 1, mark);
        if let Some(material) = material {
            self.materials.insert((id, 1), Arc::new(material));
        }
        let key = self.publish(&guard, record);
        tracing::info!(key_id = %id, principal = %caller.principal, "key created");
        Ok(KeyView {
            key,
            versions: vec![version],
        })
    }

    /// Creates up to [`MAX_CREATE_BATCH`] keys in one durable store write:
    /// all of them or none. Each input is checked as [`Kms::create_key`]
    /// checks one (the error names the first bad one) before any HSM call.
    /// For bulk creation (`coffre dev --preload-keys`), where one durable
    /// write per key would cost milliseconds each; the new keys are not put
    /// in the caches, so that a bulk load does not evict the keys in use.
    pub async fn create_keys(
        &self,
        caller: &Caller,
        inputs: Vec<CreateKeyInput>,
    ) -> Result<Vec<KeyView>> {
        self.authorize(caller, Operation::CreateKey)?;
        if inputs.is_empty() || inputs.len() > MAX_CREATE_BATCH {
            return Err(Error::InvalidArgument(format!(
                "a batch creates 1 to {MAX_CREATE_BATCH} keys, not {}",
                inputs.len()
            )));
        }
        for (i, input) in inputs.iter().enumerate() {
            self.check_new_key(input)
                .map_err(|e| Error::InvalidArgument(format!("key {i} of the batch: {e}")))?;
        }
        let guard = self.begin_write().await;
        let mut created = Vec::with_capacity(inputs.len());
        for input in inputs {
            let id = KeyId::new_random();
            let level = input.protection_level.unwrap_or(ProtectionLevel::Software);
            // The material is dropped (zeroized) here: the batch is not cached.
            let (version, _material) = match self.new_version(id, 1, level).await {
                Ok(v) => v,
                Err(e) => {
                    for (_, made) in &created {
                        self.forget_new_object(made, &e).await;
                    }
                    return Err(e);
                }
            };
            created.push((self.new_key_record(caller, id, input, &version), version));
        }
        let objects: Vec<VersionRecord> = created
            .iter()
            .filter(|(_, v)| v.hsm_object.is_some())
            .map(|(_, v)| v.clone())
            .collect();
        let mut attempts = 0;
        let stored = loop {
            let pairs: Vec<_> = created.iter().map(|(k, v)| (k, v)).collect();
            match self.store.create_keys(&pairs).await {
                Err(StoreError::RootKeyRetired(root)) if attempts < ROOT_RETIRED_ATTEMPTS => {
                    attempts += 1;
                    // The batch's material is not kept: new versions, new
                    // material, under the current root key.
                    for (key, v) in created.iter_mut() {
                        if v.hsm_root_key_id == root {
                            let level = key.protection_level;
                            *v = self.new_version(key.id, 1, level).await?.0;
                        }
                    }
                }
                other => break other.map_err(create_error).map(|()| created),
            }
        };
        let created = match stored {
            Ok(created) => created,
            Err(e) => {
                for made in &objects {
                    self.forget_new_object(made, &e).await;
                }
                return Err(e);
            }
        };
        // Not cached, but no longer missing either.
        for (key, _) in &created {
            self.forget_missing(key);
        }
        drop(guard);
        tracing::info!(count = created.len(), principal = %caller.principal, "keys created");
        Ok(created
            .into_iter()
            .map(|(key, version)| KeyView {
                key: Arc::new(key),
                versions: vec![version],
            })
            .collect())
    }

    /// What [`Kms::create_key`] refuses before touching the HSM.
    fn check_new_key(&self, input: &CreateKeyInput) -> Result<()> {
        if let Some(alias) = &input.alias {
            validate_alias(alias).map_err(Error::InvalidArgument)?;
        }
        if input.description.len() > MAX_DESCRIPTION_LEN {
            return Err(Error::InvalidArgument(format!(
                "description is longer than {MAX_DESCRIPTION_LEN} bytes"
            )));
        }
        validate_labels(&input.labels)?;
        if let Some(p) = input.rotation_period {
            super::lifecycle::check_rotation_period(p)?;
        }
        if let Some(policy) = &input.policy {
            policy.validate().map_err(Error::InvalidArgument)?;
        }
        if input.protection_level == Some(ProtectionLevel::Hsm) && !self.hsm.supports_key_objects()
        {
            return Err(Error::InvalidArgument(
                "protection level HSM is not supported by this HSM backend; use SOFTWARE"
                    .to_string(),
            ));
        }
        Ok(())
    }

    /// The record of a new key whose first version is `version`; `input`
    /// passed [`Kms::check_new_key`].
    fn new_key_record(
        &self,
        caller: &Caller,
        id: KeyId,
        input: CreateKeyInput,
        version: &VersionRecord,
    ) -> KeyRecord {
        KeyRecord {
            id,
            alias: input.alias,
            description: input.description,
            state: KeyState::Enabled,
            protection_level: input.protection_level.unwrap_or(ProtectionLevel::Software),
            created_at: version.created_at,
            created_by: caller.principal.clone(),
            primary_version: 1,
            min_decryption_version: 1,
            labels: input.labels,
            rotation_period_secs: input.rotation_period.map(|p| p.as_secs()),
            next_rotation_at: input.rotation_period.map(|p| version.created_at.plus(p)),
            deletion_at: None,
            destroyed_at: None,
            destroy_started_at: None,
            policy: input.policy.unwrap_or_else(|| self.default_policy.clone()),
        }
    }

    /// A new CMK version. `SOFTWARE`: fresh material from the HSM's
    /// generator, wrapped under its root key (returned too, for the cache).
    /// `HSM`: a key object generated inside the HSM, which never leaves it.
    pub(super) async fn new_version(
        &self,
        id: KeyId,
        version: u32,
        level: ProtectionLevel,
    ) -> Result<(VersionRecord, Option<CmkMaterial>)> {
        if level == ProtectionLevel::Hsm {
            // A name of this attempt's own: an object another attempt made
            // for the same version (a crash before its store write, another
            // node rotating at the same moment) is never touched, so the
            // one whose store write wins keeps its object.
            let mut attempt = [0u8; 8];
            self.rng.fill(&mut attempt).map_err(|e| {
                Error::Internal(format!("no randomness for an HSM object name: {e:?}"))
            })?;
            let name = hsm_object_name(id, version, &attempt);
            self.hsm.create_key_object(&name).await?;
            let record = VersionRecord {
                key_id: id,
                version,
                created_at: self.clock.now(),
                hsm_root_key_id: 0,
                wrapped_material: Vec::new(),
                destroyed_at: None,
                hsm_object: Some(name),
            };
            return Ok((record, None));
        }
        let random = self.hsm.generate_random(CMK_LEN).await?;
        let material = CmkMaterial::from_slice(random.expose()).ok_or_else(|| {
            Error::Internal(format!("the HSM returned {} random bytes", random.len()))
        })?;
        let wrapped = self
            .hsm
            .wrap(material.expose(), &cmk_wrap_aad(id, version))
            .await?;
        let record = VersionRecord {
            key_id: id,
            version,
            created_at: self.clock.now(),
            hsm_root_key_id: wrapped.root_key_id,
            wrapped_material: wrapped.blob,
            destroyed_at: None,
            hsm_object: None,
        };
        Ok((record, Some(material)))
    }

    /// After the store refused `version` because a root-key rotation
    /// retired `root` meanwhile (it wrapped the material under the root key
    /// that was current then): wraps `material` again, under the HSM's
    /// current root key, for the write to be tried again. A version held by
    /// the HSM is wrapped by no root key, so never refused so.
    async fn rewrap_retired(
        &self,
        version: &mut VersionRecord,
        material: Option<&CmkMaterial>,
        root: u32,
    ) -> Result<()> {
        let Some(material) = material else {
            return Err(StoreError::RootKeyRetired(root).into());
        };
        let wrapped = self
            .hsm
            .wrap(
                material.expose(),
                &cmk_wrap_aad(version.key_id, version.version),
            )
            .await?;
        tracing::info!(key_id = %version.key_id, version = version.version, retired = root, root_key_id = wrapped.root_key_id, "re-wrapped a new version under the current root key (a rotation retired its root key meanwhile)");
        version.hsm_root_key_id = wrapped.root_key_id;
        version.wrapped_material = wrapped.blob;
        Ok(())
    }

    /// After a store write refused a new version held by the HSM: destroy
    /// its key object, which nothing refers to. Best effort: an object left
    /// behind (the HSM failing now, or a crash before this) holds no data
    /// and is logged with its name.
    async fn forget_new_object(&self, version: &VersionRecord, why: &Error) {
        let Some(name) = &version.hsm_object else {
            return;
        };
        // An I/O error may come after the write reached the disk (sled
        // commits, then the flush fails): the version may exist after a
        // restart and must keep its object. If it does not, the object
        // stays unused: a later attempt makes one of its own name (see
        // `new_version`) and never touches this one.
        if matches!(why, Error::Store(StoreError::Io(_))) {
            tracing::warn!(object = %name, "an HSM key object may be unused (the store write's outcome is unknown)");
            return;
        }
        if let Err(e) = self.hsm.destroy_key_object(name).await {
            tracing::warn!(object = %name, error = %e, "an unused HSM key object was left behind");
        }
    }

    pub async fn get_key(&self, caller: &Caller, key: &KeyRef) -> Result<KeyView> {
        self.authorize(caller, Operation::GetKey)?;
        // Read through to the store: operators see the durable truth.
        let id = self.resolve(key).await?.id;
        let epoch = self.read_epoch();
        let record = self
            .store
            .get_key(id)
            .await?
            .ok_or_else(|| Error::KeyNotFound(id.to_string()))?;
        let versions = self.store.list_versions(id).await?;
        let key = Arc::new(record);
        self.cache_if_current(&key, epoch);
        Ok(KeyView { key, versions })
    }

    pub async fn list_keys(
        &self,
        caller: &Caller,
        filter: KeyFilter,
        start_after: Option<KeyId>,
        page_size: usize,
    ) -> Result<KeyPage> {
        self.authorize(caller, Operation::ListKeys)?;
        let limit = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n > MAX_PAGE_SIZE => {
                return Err(Error::InvalidArgument(format!(
                    "page_size must be at most {MAX_PAGE_SIZE}"
                )));
            }
            n => n,
        };
        // One more than asked tells whether another page follows.
        let mut keys = self
            .store
            .list_keys(&filter, start_after, limit + 1)
            .await?;
        let next = if keys.len() > limit {
            keys.truncate(limit);
            keys.last().map(|k| k.id)
        } else {
            None
        };
        Ok(KeyPage { keys, next })
    }

    pub async fn rotate_key(&self, caller: &Caller, key: &KeyRef) -> Result<Arc<KeyRecord>> {
        self.authorize(caller, Operation::RotateKey)?;
        let id = self.resolve(key).await?.id;
        let guard = self.begin_write().await;
        let current = self.fresh_record(id).await?;
        let updated = self.add_primary_version(&guard, current, |_| {}).await?;
        tracing::info!(key_id = %id, version = updated.primary_version, principal = %caller.principal, "key rotated");
        Ok(updated)
    }

    /// Adds a new primary version to `current` (ENABLED or DISABLED), with
    /// `adjust` applied to the updated record in the same durable write.
    pub(super) async fn add_primary_version(
        &self,
        guard: &WriteGuard<'_>,
        current: KeyRecord,
        adjust: impl FnOnce(&mut KeyRecord),
    ) -> Result<Arc<KeyRecord>> {
        let id = current.id;
        if !matches!(current.state, KeyState::Enabled | KeyState::Disabled) {
            return Err(Error::FailedPrecondition(format!(
                "key {id} is {}: it cannot be rotated",
                current.state
            )));
        }
        let next_version = current.primary_version.checked_add(1).ok_or_else(|| {
            Error::FailedPrecondition(format!("key {id} has reached its last version"))
        })?;
        let (version, material) = self
            .new_version(id, next_version, current.protection_level)
            .await?;
        let mut updated = current.clone();
        updated.primary_version = next_version;
        if let Some(period) = updated.rotation_period_secs {
            // A manual rotation restarts the automatic schedule.
            updated.next_rotation_at = Some(
                self.clock
                    .now()
                    .plus(std::time::Duration::from_secs(period)),
            );
        }
        adjust(&mut updated);
        let mut version = version;
        let mut attempts = 0;
        let mark = self.version_mark();
        let added = loop {
            match self.store.add_version(&current, &updated, &version).await {
                Err(StoreError::RootKeyRetired(root)) if attempts < ROOT_RETIRED_ATTEMPTS => {
                    attempts += 1;
                    self.rewrap_retired(&mut version, material.as_ref(), root)
                        .await?;
                }
                other => break other.map_err(Error::from),
            }
        };
        if let Err(e) = added {
            self.forget_new_object(&version, &e).await;
            return Err(e);
        }
        self.note_version(id, next_version, mark);
        if let Some(material) = material {
            self.materials
                .insert((id, next_version), Arc::new(material));
        }
        Ok(self.publish(guard, updated))
    }

    pub async fn disable_key(&self, caller: &Caller, key: &KeyRef) -> Result<Arc<KeyRecord>> {
        self.authorize(caller, Operation::DisableKey)?;
        self.change_state(caller, key, KeyState::Disabled).await
    }

    pub async fn enable_key(&self, caller: &Caller, key: &KeyRef) -> Result<Arc<KeyRecord>> {
        self.authorize(caller, Operation::EnableKey)?;
        let id = self.resolve(key).await?.id;
        // Enabling a disabled key is sensitive. Decide from the stored record
        // under the write guard, and change it under the same guard, so that
        // a DisableKey racing with this call cannot be undone without the
        // approvals.
        let guard = self.begin_write().await;
        let current = self.fresh_record(id).await?;
        match current.state {
            KeyState::Enabled => return Ok(self.publish(&guard, current)),
            KeyState::Disabled => {
                self.gate(
                    caller,
                    crate::store::approvals::SensitiveOperation::EnableKey { key_id: id },
                )
                .await?;
            }
            state => {
                let hint = if state == KeyState::PendingDeletion {
                    " (cancel the deletion first)"
                } else {
                    ""
                };
                return Err(Error::FailedPrecondition(format!(
                    "key {id} is {state}: it cannot become ENABLED{hint}"
                )));
            }
        }
        let mut next = current.clone();
        next.state = KeyState::Enabled;
        let stored = next.clone();
        self.store.compare_and_swap_key(&current, &stored).await?;
        tracing::info!(key_id = %id, principal = %caller.principal, "key enabled");
        Ok(self.publish(&guard, next))
    }

    /// ENABLED ⇄ DISABLED. Asking for the state a key is already in succeeds
    /// and changes nothing; any other transition is refused with a message
    /// naming the key's state.
    pub(super) async fn change_state(
        &self,
        caller: &Caller,
        key: &KeyRef,
        target: KeyState,
    ) -> Result<Arc<KeyRecord>> {
        let what = if target == KeyState::Enabled {
            "enabled"
        } else {
            "disabled"
        };
        self.transition(caller, key, what, |current, _| {
            if current.state == target {
                return Ok(None);
            }
            let legal = matches!(
                (current.state, target),
                (KeyState::Enabled, KeyState::Disabled) | (KeyState::Disabled, KeyState::Enabled)
            );
            if !legal {
                let hint = if current.state == KeyState::PendingDeletion {
                    " (cancel the deletion first)"
                } else {
                    ""
                };
                return Err(Error::FailedPrecondition(format!(
                    "key {} is {}: it cannot become {target}{hint}",
                    current.id, current.state
                )));
            }
            let mut next = current.clone();
            next.state = target;
            Ok(Some(next))
        })
        .await
    }

    /// The stored record, bypassing the cache (writers only).
    pub(super) async fn fresh_record(&self, id: KeyId) -> Result<KeyRecord> {
        self.store
            .get_key(id)
            .await?
            .ok_or_else(|| Error::KeyNotFound(id.to_string()))
    }
}

fn validate_labels(labels: &BTreeMap<String, String>) -> Result<()> {
    if labels.len() > MAX_LABELS {
        return Err(Error::InvalidArgument(format!(
            "at most {MAX_LABELS} labels are allowed"
        )));
    }
    for (k, v) in labels {
        if k.is_empty() || k.len() > MAX_LABEL_LEN || v.len() > MAX_LABEL_LEN {
            return Err(Error::InvalidArgument(format!(
                "label keys must be 1 to {MAX_LABEL_LEN} bytes and values at most {MAX_LABEL_LEN}"
            )));
        }
    }
    Ok(())
}

fn create_error(e: StoreError) -> Error {
    match e {
        StoreError::AliasTaken(alias) => {
            Error::AlreadyExists(format!("the alias {alias:?} is already taken"))
        }
        other => Error::Store(other),
    }
}
