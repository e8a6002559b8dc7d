//! The argument checks every [`KeyStore`] backend makes before it writes:
//! what the trait's documentation refuses as [`StoreError::Corrupt`]
//! (an inconsistent record, a caller bug) or, for a few, as
//! [`StoreError::Conflict`] without reading the store. One copy, so that
//! sled and PostgreSQL refuse exactly the same calls.

#[cfg(doc)]
use super::KeyStore;
use super::StoreError;
use super::WrappedSecret;
use super::approvals::Approval;
use crate::model::{KeyId, KeyRecord, KeyState, VersionRecord};

/// [`StoreError::Corrupt`], "refusing to write: `message`".
/// A key record decoded from the slot of `id` must name `id`: one moved to
/// another slot is refused (both backends' reads).
pub(crate) fn key_in_slot(id: KeyId, record: KeyRecord) -> Result<KeyRecord, StoreError> {
    if record.id != id {
        return Err(StoreError::Corrupt(format!(
            "key record stored under {id} has id {}",
            record.id
        )));
    }
    Ok(record)
}

/// A version record decoded from the slot (`id`, `version`) must name it.
pub(crate) fn version_in_slot(
    id: KeyId,
    version: u32,
    record: VersionRecord,
) -> Result<VersionRecord, StoreError> {
    if record.key_id != id || record.version != version {
        return Err(StoreError::Corrupt(format!(
            "version record stored as {id} v{version} claims {} v{}",
            record.key_id, record.version
        )));
    }
    Ok(record)
}

pub(crate) fn refuse<T>(message: String) -> Result<T, StoreError> {
    Err(StoreError::Corrupt(format!("refusing to write: {message}")))
}

/// What [`KeyStore::create_key`] refuses for one key and its first version.
pub(crate) fn check_create(key: &KeyRecord, first: &VersionRecord) -> Result<(), StoreError> {
    if first.key_id != key.id || first.version != key.primary_version {
        return refuse(format!(
            "key {} (primary version {}) with version {} of key {}",
            key.id, key.primary_version, first.version, first.key_id
        ));
    }
    if key.state == KeyState::Destroyed || first.destroyed_at.is_some() {
        return refuse(format!("key {} created destroyed", key.id));
    }
    Ok(())
}

/// What [`KeyStore::add_version`] refuses before reading the store: the
/// inconsistent arguments ([`StoreError::Corrupt`]), and a version that is
/// not the next one ([`StoreError::Conflict`]).
pub(crate) fn check_add_version(
    current: &KeyRecord,
    updated: &KeyRecord,
    version: &VersionRecord,
) -> Result<(), StoreError> {
    if version.key_id != current.id {
        return refuse(format!(
            "a version of key {} added to key {}",
            version.key_id, current.id
        ));
    }
    if updated.id != current.id
        || updated.alias != current.alias
        || updated.primary_version != version.version
    {
        return refuse(format!(
            "rotation of key {} to an updated record with another id, alias or primary \
             version than the new version {}",
            current.id, version.version
        ));
    }
    if current.state == KeyState::Destroyed
        || updated.state == KeyState::Destroyed
        || version.destroyed_at.is_some()
    {
        return refuse(format!(
            "rotation of key {} from, to or with destroyed records",
            current.id
        ));
    }
    if current.primary_version.checked_add(1) != Some(version.version) {
        return Err(StoreError::Conflict(current.id));
    }
    Ok(())
}

/// What [`KeyStore::compare_and_swap_key`] refuses as
/// [`StoreError::Corrupt`] before writing anything.
pub(crate) fn check_key_swap(current: &KeyRecord, new: &KeyRecord) -> Result<(), StoreError> {
    if new.id != current.id
        || new.alias != current.alias
        || new.primary_version != current.primary_version
    {
        return refuse(format!(
            "a change of the id, alias or primary version of key {} by compare-and-swap",
            current.id
        ));
    }
    if current.state == KeyState::Destroyed || new.state == KeyState::Destroyed {
        return refuse(format!(
            "a compare-and-swap from or to DESTROYED of key {} (destruction goes through \
             destroy_key and is final)",
            current.id
        ));
    }
    Ok(())
}

/// What [`KeyStore::destroy_key`] refuses as [`StoreError::Corrupt`].
pub(crate) fn check_destroy(current: &KeyRecord, tombstone: &KeyRecord) -> Result<(), StoreError> {
    if tombstone.id != current.id
        || tombstone.alias != current.alias
        || tombstone.primary_version != current.primary_version
    {
        return refuse(format!(
            "a tombstone with another id, alias or primary version for key {}",
            current.id
        ));
    }
    if tombstone.state != KeyState::Destroyed || tombstone.destroyed_at.is_none() {
        return refuse(format!(
            "a tombstone of key {} that is not DESTROYED with a destruction time",
            current.id
        ));
    }
    if current.state == KeyState::Destroyed {
        return refuse(format!("destroying key {} twice", current.id));
    }
    Ok(())
}

/// What [`KeyStore::rewrap_version`] refuses before reading the store: a
/// change beyond the material and its root key, or an erasure
/// ([`StoreError::Corrupt`]); a destroyed `current` ([`StoreError::Conflict`]).
pub(crate) fn check_rewrap(current: &VersionRecord, new: &VersionRecord) -> Result<(), StoreError> {
    let mut unchanged = new.clone();
    unchanged.hsm_root_key_id = current.hsm_root_key_id;
    unchanged.wrapped_material = current.wrapped_material.clone();
    if unchanged != *current || new.wrapped_material.is_empty() {
        return refuse(format!(
            "a re-wrap of version {} of key {} that changes more than its wrapped material \
             and root key id, or erases the material",
            current.version, current.key_id
        ));
    }
    if current.destroyed_at.is_some() {
        return Err(StoreError::Conflict(current.key_id));
    }
    Ok(())
}

/// The fields a compare-and-swap of an approval may not change.
pub(crate) fn check_approval_swap(current: &Approval, new: &Approval) -> Result<(), StoreError> {
    if new.id != current.id
        || new.operation != current.operation
        || new.proposer != current.proposer
        || new.created_at != current.created_at
    {
        return refuse(format!(
            "a change of the id, operation, proposer or creation time of approval {}",
            current.id
        ));
    }
    Ok(())
}

/// What [`KeyStore::swap_approval_and_key`] refuses as
/// [`StoreError::Corrupt`]: either swap's refusals, or an approval that is
/// not about the key.
pub(crate) fn check_approval_and_key(
    (current, new): (&Approval, &Approval),
    (key, next): (&KeyRecord, &KeyRecord),
) -> Result<(), StoreError> {
    check_approval_swap(current, new)?;
    check_key_swap(key, next)?;
    if current.operation.key_id() != Some(key.id) {
        return refuse(format!(
            "approval {} is not about key {}",
            current.id, key.id
        ));
    }
    Ok(())
}

/// What storing a service secret refuses: an empty name or material.
pub(crate) fn check_secret(name: &str, secret: &WrappedSecret) -> Result<(), StoreError> {
    if name.is_empty() || secret.wrapped.is_empty() {
        return refuse(format!("an empty service secret {name:?}"));
    }
    Ok(())
}
