//! [`KeyStore`] for [`SledEngine`]: each method's checks, and its
//! transaction.
//!
//! Each mutating call is one sled transaction over `keys`, `versions`,
//! `aliases` and `due` (through [`SledEngine::write`]), or one insert into
//! `meta` for a service secret, made durable before it returns. A request
//! that would write an inconsistent record (see [`KeyStore`]'s methods) is
//! refused with [`StoreError::Corrupt`] before anything is written.

use std::ops::Bound;

use sled::transaction::{
    ConflictableTransactionError, ConflictableTransactionResult, TransactionalTree,
};

use std::sync::Arc;

use super::layout::{
    Codec, GENERATION_KEY, SECRET_PREFIX, decode, due_key, encode, key_id_from_slice,
    parse_due_key, parse_u64, parse_version_key, retired_root_key, secret_key, version_key,
};
use super::{Handles, SledEngine, sled_error};
use crate::model::{KeyId, KeyRecord, Timestamp, VersionRecord};
use crate::store::checks::{
    check_add_version, check_create, check_destroy, check_key_swap, check_rewrap, check_secret,
};
use crate::store::integrity::{IntegrityState, RecordMac};
use crate::store::{ChangePage, KeyChange, KeyFilter, StoreError, VersionCounts, WrappedSecret};

/// The trees of one transaction.
pub(super) struct Tx<'a> {
    pub(super) keys: &'a TransactionalTree,
    pub(super) versions: &'a TransactionalTree,
    pub(super) aliases: &'a TransactionalTree,
    pub(super) due: &'a TransactionalTree,
    pub(super) approvals: &'a TransactionalTree,
    pub(super) meta: &'a TransactionalTree,
    pub(super) changes: &'a TransactionalTree,
    pub(super) key_gens: &'a TransactionalTree,
}

impl Tx<'_> {
    /// The stored record of `current.id` must equal `current`.
    pub(super) fn check_current(
        &self,
        codec: Codec<'_>,
        current: &KeyRecord,
    ) -> ConflictableTransactionResult<(), StoreError> {
        let Some(bytes) = self.keys.get(current.id.as_bytes())? else {
            return abort(StoreError::NoSuchKey(current.id));
        };
        match codec.decode_key(current.id, &bytes) {
            Ok(stored) if stored == *current => Ok(()),
            Ok(_) => abort(StoreError::Conflict(current.id)),
            Err(e) => abort(e),
        }
    }

    /// Writes `new` over `old` (`None`: a new key) in `keys` and moves its
    /// due-index entry.
    pub(super) fn put_key(
        &self,
        old: Option<&KeyRecord>,
        new: &KeyRecord,
        new_bytes: &[u8],
    ) -> ConflictableTransactionResult<(), StoreError> {
        if let Some(at) = old.and_then(KeyRecord::next_due) {
            self.due.remove(&due_key(at, new.id)[..])?;
        }
        if let Some(at) = new.next_due() {
            self.due.insert(&due_key(at, new.id)[..], &[][..])?;
        }
        self.keys.insert(new.id.as_bytes(), new_bytes)?;
        self.record_change(new.id)
    }

    /// Gives key `id` the next generation of the change feed.
    fn record_change(&self, id: KeyId) -> ConflictableTransactionResult<(), StoreError> {
        let head = match self.meta.get(GENERATION_KEY)? {
            Some(b) => match parse_u64("the feed's generation", &b) {
                Ok(g) => g,
                Err(e) => return abort(e),
            },
            None => 0,
        };
        let Some(next) = head.checked_add(1) else {
            return abort(StoreError::Corrupt("the change feed is exhausted".into()));
        };
        if let Some(old) = self.key_gens.get(id.as_bytes())? {
            self.changes.remove(old)?;
        }
        let at = next.to_be_bytes();
        self.changes.insert(&at[..], id.as_bytes())?;
        self.key_gens.insert(id.as_bytes(), &at[..])?;
        self.meta.insert(GENERATION_KEY, &at[..])?;
        Ok(())
    }
}

pub(super) fn abort<T>(e: StoreError) -> ConflictableTransactionResult<T, StoreError> {
    Err(ConflictableTransactionError::Abort(e))
}

/// Refuses records wrapped under a root key a rotation fenced off
/// ([`KeyStore::fence_root_keys`]); 0 is no root key (held by the HSM).
/// Called under the write gate, so no fence comes between it and the write.
fn refuse_retired(h: &Handles, roots: &[u32]) -> Result<(), StoreError> {
    for &root in roots.iter().filter(|r| **r != 0) {
        let marker = h
            .meta
            .get(retired_root_key(root))
            .map_err(|e| sled_error("reading the root-key fence", e))?;
        if marker.is_some() {
            return Err(StoreError::RootKeyRetired(root));
        }
    }
    Ok(())
}

impl SledEngine {
    pub fn get_secret(&self, name: &str) -> Result<Option<WrappedSecret>, StoreError> {
        let live = self.read_gate()?;
        let bytes = live
            .sled
            .meta
            .get(secret_key(name))
            .map_err(|e| sled_error("reading a service secret", e))?;
        bytes.map(|b| decode("service secret", &b)).transpose()
    }

    pub fn put_secret(&self, name: &str, secret: &WrappedSecret) -> Result<(), StoreError> {
        check_secret(name, secret)?;
        let value = encode("service secret", secret)?;
        let live = self.write_gate();
        self.check_usable()?;
        refuse_retired(&live.sled, &[secret.hsm_root_key_id])?;
        if let Err(e) = live.sled.meta.insert(secret_key(name), value) {
            self.mark_failed();
            return Err(sled_error("writing a service secret", e));
        }
        if let Err(e) = self.make_durable(&live) {
            self.mark_failed();
            return Err(e);
        }
        Ok(())
    }

    pub fn create_secret(
        &self,
        name: &str,
        secret: &WrappedSecret,
    ) -> Result<WrappedSecret, StoreError> {
        check_secret(name, secret)?;
        let value = encode("service secret", secret)?;
        let live = self.write_gate();
        self.check_usable()?;
        refuse_retired(&live.sled, &[secret.hsm_root_key_id])?;
        let swapped = live
            .sled
            .meta
            .compare_and_swap(secret_key(name), None::<&[u8]>, Some(value));
        match swapped {
            Err(e) => {
                self.mark_failed();
                Err(sled_error("creating a service secret", e))
            }
            Ok(Err(existing)) => match existing.current {
                Some(bytes) => decode("service secret", &bytes),
                None => Err(StoreError::Corrupt(format!(
                    "service secret {name:?}: the store refused to create it but holds none"
                ))),
            },
            Ok(Ok(())) => {
                if let Err(e) = self.make_durable(&live) {
                    self.mark_failed();
                    return Err(e);
                }
                Ok(secret.clone())
            }
        }
    }

    pub fn swap_secret(
        &self,
        name: &str,
        current: &WrappedSecret,
        new: &WrappedSecret,
    ) -> Result<bool, StoreError> {
        check_secret(name, new)?;
        let old = encode("service secret", current)?;
        let value = encode("service secret", new)?;
        let live = self.write_gate();
        self.check_usable()?;
        refuse_retired(&live.sled, &[new.hsm_root_key_id])?;
        let swapped = live
            .sled
            .meta
            .compare_and_swap(secret_key(name), Some(old), Some(value));
        match swapped {
            Err(e) => {
                self.mark_failed();
                Err(sled_error("replacing a service secret", e))
            }
            Ok(Err(_)) => Ok(false),
            Ok(Ok(())) => {
                if let Err(e) = self.make_durable(&live) {
                    self.mark_failed();
                    return Err(e);
                }
                Ok(true)
            }
        }
    }

    pub fn fence_root_keys(&self, current: u32, retire: &[u32]) -> Result<u64, StoreError> {
        let codec = self.codec()?;
        let live = self.write_gate();
        self.check_usable()?;
        let mut left = 0u64;
        for entry in live.sled.versions.iter() {
            let (k, v) = entry.map_err(|e| sled_error("counting versions", e))?;
            let (id, number) = parse_version_key(&k)?;
            let record = codec.decode_version(id, number, &v)?;
            if record.destroyed_at.is_none()
                && record.hsm_object.is_none()
                && record.hsm_root_key_id != current
            {
                left += 1;
            }
        }
        for entry in live.sled.meta.scan_prefix(SECRET_PREFIX) {
            let (_, v) = entry.map_err(|e| sled_error("listing service secrets", e))?;
            let secret: WrappedSecret = decode("service secret", &v)?;
            if secret.hsm_root_key_id != current {
                left += 1;
            }
        }
        if left > 0 {
            return Ok(left);
        }
        for &root in retire.iter().filter(|r| **r != current && **r != 0) {
            if let Err(e) = live.sled.meta.insert(retired_root_key(root), &[1u8][..]) {
                self.mark_failed();
                return Err(sled_error("writing the root-key fence", e));
            }
        }
        if let Err(e) = self.make_durable(&live) {
            self.mark_failed();
            return Err(e);
        }
        Ok(0)
    }

    pub fn list_secrets(&self) -> Result<Vec<(String, WrappedSecret)>, StoreError> {
        let live = self.read_gate()?;
        let mut out = Vec::new();
        for entry in live.sled.meta.scan_prefix(SECRET_PREFIX) {
            let (k, v) = entry.map_err(|e| sled_error("listing service secrets", e))?;
            let name = std::str::from_utf8(k.get(SECRET_PREFIX.len()..).unwrap_or_default())
                .map_err(|_| StoreError::Corrupt("a service secret's name is not UTF-8".into()))?;
            out.push((name.to_string(), decode("service secret", &v)?));
        }
        Ok(out)
    }

    /// [`crate::store::KeyStore::create_key`], blocking.
    pub fn create_key(&self, key: &KeyRecord, first: &VersionRecord) -> Result<(), StoreError> {
        self.create_keys(&[(key, first)])
    }

    pub fn create_keys(&self, keys: &[(&KeyRecord, &VersionRecord)]) -> Result<(), StoreError> {
        let codec = self.codec()?;
        let mut encoded = Vec::with_capacity(keys.len());
        for &(key, first_version) in keys {
            check_create(key, first_version)?;
            encoded.push((
                key,
                codec.encode_key(key)?,
                version_key(key.id, first_version.version),
                codec.encode_version(first_version)?,
            ));
        }
        let roots: Vec<u32> = keys.iter().map(|(_, v)| v.hsm_root_key_id).collect();
        // Each check sees the batch's earlier inserts (a transaction reads
        // its own writes), so two keys of one batch cannot share an id or
        // an alias either.
        self.write_prepared(
            |h| refuse_retired(h, &roots),
            |tx, ()| {
                for (key, key_bytes, vkey, version_bytes) in &encoded {
                    if tx.keys.get(key.id.as_bytes())?.is_some() {
                        return abort(StoreError::KeyExists(key.id));
                    }
                    if let Some(alias) = &key.alias
                        && tx.aliases.get(alias.as_bytes())?.is_some()
                    {
                        return abort(StoreError::AliasTaken(alias.clone()));
                    }
                    if tx.versions.get(vkey)?.is_some() {
                        return abort(StoreError::Corrupt(format!(
                            "version {} of key {} exists without its key",
                            key.primary_version, key.id
                        )));
                    }
                    tx.put_key(None, key, key_bytes)?;
                    tx.versions.insert(vkey, version_bytes.as_slice())?;
                    if let Some(alias) = &key.alias {
                        tx.aliases.insert(alias.as_bytes(), key.id.as_bytes())?;
                    }
                }
                Ok(())
            },
        )
    }

    pub fn get_key(&self, id: KeyId) -> Result<Option<KeyRecord>, StoreError> {
        let codec = self.codec()?;
        let live = self.read_gate()?;
        let bytes = live
            .sled
            .keys
            .get(id.as_bytes())
            .map_err(|e| sled_error("reading a key", e))?;
        bytes.map(|b| codec.decode_key(id, &b)).transpose()
    }

    /// The alias index is not sealed (it holds only ids); the key record
    /// it leads to is, and names its alias: a mapping that leads to a key
    /// of another alias (an index entry pointed elsewhere) is refused.
    pub fn key_id_for_alias(&self, alias: &str) -> Result<Option<KeyId>, StoreError> {
        let codec = self.codec()?;
        let live = self.read_gate()?;
        let bytes = live
            .sled
            .aliases
            .get(alias.as_bytes())
            .map_err(|e| sled_error("reading an alias", e))?;
        let Some(bytes) = bytes else {
            return Ok(None);
        };
        let id = key_id_from_slice(&format!("the key id of alias {alias:?}"), &bytes)?;
        let record = live
            .sled
            .keys
            .get(id.as_bytes())
            .map_err(|e| sled_error("reading the key of an alias", e))?
            .map(|b| codec.decode_key(id, &b))
            .transpose()?;
        match record {
            Some(record) if record.alias.as_deref() == Some(alias) => Ok(Some(id)),
            _ => {
                tracing::error!(
                    table = "aliases",
                    %id,
                    "an alias leads to a key record that does not carry it: refused"
                );
                Err(StoreError::IntegrityFailure(format!(
                    "the alias index leads to key {id}, whose record does not carry that alias"
                )))
            }
        }
    }

    pub fn list_keys(
        &self,
        filter: &KeyFilter,
        start_after: Option<KeyId>,
        limit: usize,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        let codec = self.codec()?;
        let live = self.read_gate()?;
        let lower = match start_after {
            Some(id) => Bound::Excluded(id.as_bytes().to_vec()),
            None => Bound::Unbounded,
        };
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        for entry in live
            .sled
            .keys
            .range::<Vec<u8>, _>((lower, Bound::Unbounded))
        {
            let (k, v) = entry.map_err(|e| sled_error("listing keys", e))?;
            let id = key_id_from_slice("a key id in the keys tree", &k)?;
            let record = codec.decode_key(id, &v)?;
            if filter.matches(&record) {
                out.push(record);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    pub fn due_keys(&self, now: Timestamp, limit: usize) -> Result<Vec<KeyRecord>, StoreError> {
        let codec = self.codec()?;
        let live = self.read_gate()?;
        let upper = due_key(now, KeyId::from_bytes([0xff; 16]));
        let mut out = Vec::new();
        for entry in live.sled.due.range(..=&upper[..]).take(limit) {
            let (k, _) = entry.map_err(|e| sled_error("reading the due index", e))?;
            let (at, id) = parse_due_key(&k)?;
            let bytes = live
                .sled
                .keys
                .get(id.as_bytes())
                .map_err(|e| sled_error("reading a due key", e))?
                .ok_or_else(|| {
                    StoreError::Corrupt(format!("the due index names key {id}, which is missing"))
                })?;
            let record = codec.decode_key(id, &bytes)?;
            if record.next_due() != Some(at) {
                return Err(StoreError::Corrupt(format!(
                    "the due index says key {id} is due at {}, the key says {:?}",
                    at.as_millis(),
                    record.next_due().map(Timestamp::as_millis)
                )));
            }
            out.push(record);
        }
        Ok(out)
    }

    pub fn add_version(
        &self,
        current: &KeyRecord,
        updated: &KeyRecord,
        version: &VersionRecord,
    ) -> Result<(), StoreError> {
        check_add_version(current, updated, version)?;
        let codec = self.codec()?;
        let key_bytes = codec.encode_key(updated)?;
        let version_bytes = codec.encode_version(version)?;
        let vkey = version_key(current.id, version.version);
        let roots = [version.hsm_root_key_id];
        self.write_prepared(
            |h| refuse_retired(h, &roots),
            |tx, ()| {
                tx.check_current(codec, current)?;
                if tx.versions.get(vkey)?.is_some() {
                    return abort(StoreError::Conflict(current.id));
                }
                tx.versions.insert(&vkey, version_bytes.as_slice())?;
                tx.put_key(Some(current), updated, &key_bytes)
            },
        )
    }

    pub fn get_version(
        &self,
        id: KeyId,
        version: u32,
    ) -> Result<Option<VersionRecord>, StoreError> {
        let codec = self.codec()?;
        let live = self.read_gate()?;
        let bytes = live
            .sled
            .versions
            .get(version_key(id, version))
            .map_err(|e| sled_error("reading a version", e))?;
        bytes
            .map(|b| codec.decode_version(id, version, &b))
            .transpose()
    }

    /// [`crate::store::KeyStore::changes_since`], blocking.
    pub fn changes_since(&self, after: u64, limit: usize) -> Result<ChangePage, StoreError> {
        let live = self.read_gate()?;
        let h = &live.sled;
        let head = match h
            .meta
            .get(GENERATION_KEY)
            .map_err(|e| sled_error("reading the feed's generation", e))?
        {
            Some(b) => parse_u64("the feed's generation", &b)?,
            None => 0,
        };
        let mut changes = Vec::new();
        let start = after.saturating_add(1).to_be_bytes();
        for entry in h.changes.range(&start[..]..).take(limit) {
            let (g, id) = entry.map_err(|e| sled_error("reading the change feed", e))?;
            changes.push(KeyChange {
                generation: parse_u64("a generation in the change feed", &g)?,
                key_id: key_id_from_slice("a key id in the change feed", &id)?,
            });
        }
        Ok(ChangePage { changes, head })
    }

    pub fn list_versions(&self, id: KeyId) -> Result<Vec<VersionRecord>, StoreError> {
        let codec = self.codec()?;
        let live = self.read_gate()?;
        live.sled.versions_of(codec, id)
    }

    pub fn compare_and_swap_key(
        &self,
        current: &KeyRecord,
        new: &KeyRecord,
    ) -> Result<(), StoreError> {
        check_key_swap(current, new)?;
        let codec = self.codec()?;
        let key_bytes = codec.encode_key(new)?;
        self.write(|tx| {
            tx.check_current(codec, current)?;
            tx.put_key(Some(current), new, &key_bytes)
        })
    }

    pub fn destroy_key(
        &self,
        current: &KeyRecord,
        tombstone: &KeyRecord,
    ) -> Result<(), StoreError> {
        check_destroy(current, tombstone)?;
        let codec = self.codec()?;
        let key_bytes = codec.encode_key(tombstone)?;
        let id = current.id;
        self.write_prepared(
            // Versions are only ever added, as the new primary, while the
            // stored key changes: if the transaction finds the stored key
            // equal to `current`, this list is still complete.
            |sled| {
                sled.versions_of(codec, id)?
                    .into_iter()
                    .map(|mut v| {
                        v.wrapped_material = Vec::new();
                        v.destroyed_at = tombstone.destroyed_at;
                        Ok((version_key(id, v.version), codec.encode_version(&v)?))
                    })
                    .collect::<Result<Vec<_>, StoreError>>()
            },
            |tx, erased| {
                tx.check_current(codec, current)?;
                for (vkey, bytes) in erased {
                    tx.versions.insert(&vkey[..], bytes.as_slice())?;
                }
                tx.put_key(Some(current), tombstone, &key_bytes)
            },
        )
    }

    pub fn rewrap_version(
        &self,
        current: &VersionRecord,
        new: &VersionRecord,
    ) -> Result<(), StoreError> {
        check_rewrap(current, new)?;
        let (id, number) = (current.key_id, current.version);
        let vkey = version_key(id, number);
        let codec = self.codec()?;
        let new_bytes = codec.encode_version(new)?;
        let roots = [new.hsm_root_key_id];
        self.write_prepared(
            |h| refuse_retired(h, &roots),
            |tx, ()| {
                let Some(bytes) = tx.versions.get(vkey)? else {
                    return abort(StoreError::NoSuchVersion(id, number));
                };
                match codec.decode_version(id, number, &bytes) {
                    Ok(stored) if stored == *current => {}
                    Ok(_) => return abort(StoreError::Conflict(id)),
                    Err(e) => return abort(e),
                }
                tx.versions.insert(&vkey, new_bytes.as_slice())?;
                Ok(())
            },
        )
    }

    pub fn versions_not_under_root(
        &self,
        root_key_id: u32,
        start_after: Option<(KeyId, u32)>,
        limit: usize,
    ) -> Result<Vec<VersionRecord>, StoreError> {
        let codec = self.codec()?;
        let live = self.read_gate()?;
        let lower = match start_after {
            Some((id, n)) => Bound::Excluded(version_key(id, n).to_vec()),
            None => Bound::Unbounded,
        };
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        for entry in live
            .sled
            .versions
            .range::<Vec<u8>, _>((lower, Bound::Unbounded))
        {
            let (k, v) = entry.map_err(|e| sled_error("listing versions", e))?;
            let (id, number) = parse_version_key(&k)?;
            let record = codec.decode_version(id, number, &v)?;
            // Versions held by the HSM itself are wrapped by no root key.
            if record.destroyed_at.is_none()
                && record.hsm_object.is_none()
                && record.hsm_root_key_id != root_key_id
            {
                out.push(record);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    pub fn count_versions(&self, root_key_id: u32) -> Result<VersionCounts, StoreError> {
        let codec = self.codec()?;
        let live = self.read_gate()?;
        let mut counts = VersionCounts::default();
        for entry in live.sled.versions.iter() {
            let (k, v) = entry.map_err(|e| sled_error("counting versions", e))?;
            let (id, number) = parse_version_key(&k)?;
            let record = codec.decode_version(id, number, &v)?;
            if record.destroyed_at.is_some() {
                counts.destroyed += 1;
            } else {
                counts.live += 1;
                if record.hsm_object.is_none() && record.hsm_root_key_id != root_key_id {
                    counts.not_under_root += 1;
                }
            }
        }
        Ok(counts)
    }

    pub fn compact(&self) -> Result<(), StoreError> {
        let mut live = self.write_gate();
        self.check_usable()?;
        self.switch_generation(&mut live)
    }

    pub fn install_integrity(
        &self,
        mac: &Arc<RecordMac>,
        migrate: bool,
    ) -> Result<IntegrityState, StoreError> {
        self.seal_records(mac, migrate)
    }
}

impl Handles {
    /// Every version of `id`, read outside any transaction.
    fn versions_of(&self, codec: Codec<'_>, id: KeyId) -> Result<Vec<VersionRecord>, StoreError> {
        let mut out = Vec::new();
        for entry in self.versions.scan_prefix(id.as_bytes()) {
            let (k, v) = entry.map_err(|e| sled_error("listing versions", e))?;
            let (_, number) = parse_version_key(&k)?;
            out.push(codec.decode_version(id, number, &v)?);
        }
        Ok(out)
    }
}
