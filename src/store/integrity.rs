//! Integrity of what is stored: every key record, version record and
//! approval is sealed with an HMAC-SHA256 over its table, its id and its
//! content, under a key of the service that is stored only wrapped by the
//! HSM (the service secret [`STORE_INTEGRITY_SECRET_NAME`], beside the audit
//! log's). Someone who can write the data directory but cannot use the HSM
//! cannot re-enable a key, add a grant or plant an approval: a record that
//! fails its MAC is [`StoreError::IntegrityFailure`], logged (table and id,
//! never the content), counted ([`RecordMac::failures`], the metric
//! `coffre_store_integrity_failures_total`) and never used.
//!
//! This is a step of the record *encoding*, not a [`super::KeyStore`]
//! decorator: the MAC has to be stored with the record, and only a backend
//! knows where its bytes are (a sled value here, a `bytea` column in
//! PostgreSQL). A backend calls [`RecordMac::seal`] on the bytes it is about
//! to store and [`RecordMac::open`] on the bytes it read, with the slot's
//! own id, so that a record moved to another slot fails too; a backend that
//! keeps the tag in a column of its own calls [`RecordMac::tag`] and
//! [`RecordMac::verify`] instead (the same tag, so records copy between
//! backends). The MAC key
//! reaches the backend through [`super::KeyStore::install_integrity`], once,
//! at start, after the HSM unwrapped it (`Kms::store_integrity`).
//!
//! # Sealed bytes (format 1)
//!
//! ```text
//!  0        4                      36
//!  ┌────────┬──────────────────────┬──────────────────────────────┐
//!  │ magic  │ tag: HMAC-SHA256     │ content (the record's JSON)  │
//!  │00 'M' 'A' 01                  │                              │
//!  └────────┴──────────────────────┴──────────────────────────────┘
//! ```
//!
//! A JSON record never starts with a zero byte, so a sealed value is told
//! from an unsealed one by its first byte. The tag is over (every length
//! a big-endian prefix, so no two inputs encode alike):
//!
//! ```text
//! "coffre/v1/store-record-mac" ‖ format (u8, 1)
//!   ‖ len(table) u32 ‖ table ‖ len(id) u32 ‖ id ‖ len(content) u64 ‖ content
//! ```
//!
//! The approvals directory writes the same tag in hex on a first line
//! (`coffre-mac-v1 <64 hex digits>`), followed by the approval's JSON, so a
//! file stays readable ([`RecordMac::seal_text`], [`RecordMac::open_text`]).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use ring::hmac;

use super::StoreError;

/// The service secret (see [`super::WrappedSecret`]) that holds the MAC key,
/// wrapped by the HSM under `model::secret_wrap_aad` of this name, which
/// separates it from every other secret.
pub const STORE_INTEGRITY_SECRET_NAME: &str = "store-integrity";

/// The MAC key's length: 256 random bits.
pub const RECORD_MAC_KEY_LEN: usize = 32;

/// Where a record lives; its name goes into the MAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    /// Key records, by key id (16 bytes).
    Keys,
    /// Version records, by key id (16 bytes) ‖ version (u32 BE).
    Versions,
    /// Approvals, by approval id (the UUID's 16 bytes).
    Approvals,
}

impl Table {
    pub fn name(self) -> &'static str {
        match self {
            Table::Keys => "keys",
            Table::Versions => "versions",
            Table::Approvals => "approvals",
        }
    }
}

/// What [`super::KeyStore::install_integrity`] (and the approvals'
/// counterpart) found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntegrityState {
    /// The records were already sealed; the key is installed.
    Sealed,
    /// Records are not sealed and migration was not allowed: nothing was
    /// installed nor written.
    NeedsMigration,
    /// Every record was (re)sealed under the key, which is now installed.
    Migrated { records: u64 },
}

const LABEL: &[u8] = b"coffre/v1/store-record-mac";
const FORMAT: u8 = 1;
const MAGIC: [u8; 4] = [0x00, b'M', b'A', FORMAT];
/// The length of a tag (HMAC-SHA256).
pub const TAG_LEN: usize = 32;
const HEADER_LEN: usize = MAGIC.len() + TAG_LEN;
const TEXT_PREFIX: &str = "coffre-mac-v1 ";

/// The MAC key of the store's records. No `Clone`, a redacted `Debug`;
/// `ring` keeps the key material and erases nothing itself, but the key is
/// made once per process from the HSM-unwrapped bytes (which are zeroized)
/// and lives as long as the server. Shared as an `Arc`.
pub struct RecordMac {
    key: hmac::Key,
    failures: AtomicU64,
}

impl fmt::Debug for RecordMac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordMac")
            .field("key", &"<redacted>")
            .field("failures", &self.failures())
            .finish()
    }
}

/// Whether `bytes` are sealed (begin with the format's magic).
pub fn is_sealed(bytes: &[u8]) -> bool {
    bytes.starts_with(&MAGIC)
}

/// The content of `bytes` without their seal, if sealed, *unchecked*: only
/// for a migration, which trusts what is stored and seals it anew.
pub fn strip_seal_unchecked(bytes: &[u8]) -> &[u8] {
    if is_sealed(bytes) {
        bytes.get(HEADER_LEN..).unwrap_or_default()
    } else {
        bytes
    }
}

/// The tag and the content of sealed `bytes`, *unchecked* (`None`: not
/// sealed): for `coffre store copy`, which moves a record and its tag to
/// a backend that keeps the tag apart ([`RecordMac::tag`] is the same
/// tag), without the MAC key. The target checks it on every read.
pub fn split_sealed_unchecked(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    bytes
        .strip_prefix(&MAGIC[..])
        .and_then(|rest| rest.split_at_checked(TAG_LEN))
}

/// The content of a text file without its seal line, if sealed,
/// *unchecked*: only for a migration.
pub fn strip_text_seal_unchecked(bytes: &[u8]) -> &[u8] {
    if is_sealed_text(bytes) {
        bytes
            .get(TEXT_PREFIX.len() + 2 * TAG_LEN..)
            .and_then(|rest| rest.strip_prefix(b"\n"))
            .unwrap_or_default()
    } else {
        bytes
    }
}

/// Whether a text file (an approval) is sealed.
pub fn is_sealed_text(bytes: &[u8]) -> bool {
    bytes.starts_with(TEXT_PREFIX.as_bytes())
}

impl RecordMac {
    /// The MAC key from its [`RECORD_MAC_KEY_LEN`] secret bytes.
    pub fn new(secret: &[u8]) -> Result<Self, StoreError> {
        if secret.len() != RECORD_MAC_KEY_LEN {
            return Err(StoreError::Corrupt(format!(
                "the store integrity key is {} bytes, expected {RECORD_MAC_KEY_LEN}",
                secret.len()
            )));
        }
        Ok(Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            failures: AtomicU64::new(0),
        })
    }

    /// Records that failed their check since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// The MAC input (see the module docs): one copy of the record, which
    /// is small (a key record is a few hundred bytes).
    fn input(table: Table, id: &[u8], content: &[u8]) -> Vec<u8> {
        let name = table.name().as_bytes();
        let mut input =
            Vec::with_capacity(LABEL.len() + 17 + name.len() + id.len() + content.len());
        input.extend_from_slice(LABEL);
        input.push(FORMAT);
        input.extend_from_slice(&(name.len() as u32).to_be_bytes());
        input.extend_from_slice(name);
        input.extend_from_slice(&(id.len() as u32).to_be_bytes());
        input.extend_from_slice(id);
        input.extend_from_slice(&(content.len() as u64).to_be_bytes());
        input.extend_from_slice(content);
        input
    }

    fn sign(&self, table: Table, id: &[u8], content: &[u8]) -> hmac::Tag {
        hmac::sign(&self.key, &Self::input(table, id, content))
    }

    /// The tag alone of `content` in the slot (`table`, `id`): what
    /// [`RecordMac::seal`] puts in front of it, for a backend that keeps
    /// the tag apart from the record (PostgreSQL's `record_mac` column).
    /// The same input as the sealed form's, so records copy between
    /// backends with their tags.
    pub fn tag(&self, table: Table, id: &[u8], content: &[u8]) -> [u8; TAG_LEN] {
        let mut out = [0u8; TAG_LEN];
        let tag = self.sign(table, id, content);
        // HMAC-SHA256 tags are exactly TAG_LEN bytes.
        for (o, b) in out.iter_mut().zip(tag.as_ref()) {
            *o = *b;
        }
        out
    }

    /// `content` sealed for the slot (`table`, `id`).
    pub fn seal(&self, table: Table, id: &[u8], content: &[u8]) -> Vec<u8> {
        let tag = self.sign(table, id, content);
        let mut out = Vec::with_capacity(HEADER_LEN + content.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(tag.as_ref());
        out.extend_from_slice(content);
        out
    }

    /// The content of `sealed`, read from the slot (`table`, `id`), if its
    /// tag verifies (in constant time, by `ring`); otherwise
    /// [`StoreError::IntegrityFailure`], logged and counted. An unsealed
    /// record fails too.
    pub fn open<'a>(
        &self,
        table: Table,
        id: &[u8],
        sealed: &'a [u8],
    ) -> Result<&'a [u8], StoreError> {
        let Some((tag, content)) = sealed
            .strip_prefix(&MAGIC[..])
            .and_then(|rest| rest.split_at_checked(TAG_LEN))
        else {
            return Err(self.failure(table, id, "not sealed"));
        };
        self.verify(table, id, content, tag)?;
        Ok(content)
    }

    /// Checks `tag`, kept apart from `content` (see [`RecordMac::tag`]),
    /// for the slot (`table`, `id`), in constant time (by `ring`); a
    /// failure is [`StoreError::IntegrityFailure`], logged and counted as
    /// [`RecordMac::open`]'s. An empty tag (a record written unsealed)
    /// fails too.
    pub fn verify(
        &self,
        table: Table,
        id: &[u8],
        content: &[u8],
        tag: &[u8],
    ) -> Result<(), StoreError> {
        if tag.is_empty() {
            return Err(self.failure(table, id, "not sealed"));
        }
        hmac::verify(&self.key, &Self::input(table, id, content), tag)
            .map_err(|_| self.failure(table, id, "wrong MAC"))
    }

    /// A text file's content sealed: the tag in hex on a first line.
    pub fn seal_text(&self, table: Table, id: &[u8], content: &[u8]) -> Vec<u8> {
        let tag = self.sign(table, id, content);
        let mut out = Vec::with_capacity(TEXT_PREFIX.len() + 2 * TAG_LEN + 1 + content.len());
        out.extend_from_slice(TEXT_PREFIX.as_bytes());
        out.extend_from_slice(hex::encode(tag.as_ref()).as_bytes());
        out.push(b'\n');
        out.extend_from_slice(content);
        out
    }

    /// The content of a text file sealed by [`RecordMac::seal_text`], if it
    /// verifies; otherwise [`StoreError::IntegrityFailure`], logged and
    /// counted.
    pub fn open_text<'a>(
        &self,
        table: Table,
        id: &[u8],
        sealed: &'a [u8],
    ) -> Result<&'a [u8], StoreError> {
        let parsed = sealed
            .strip_prefix(TEXT_PREFIX.as_bytes())
            .and_then(|rest| rest.split_at_checked(2 * TAG_LEN))
            .and_then(|(hex_tag, rest)| {
                let content = rest.strip_prefix(b"\n")?;
                let tag = hex::decode(hex_tag).ok()?;
                Some((tag, content))
            });
        let Some((tag, content)) = parsed else {
            return Err(self.failure(table, id, "not sealed"));
        };
        self.verify(table, id, content, &tag)?;
        Ok(content)
    }

    fn failure(&self, table: Table, id: &[u8], why: &str) -> StoreError {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let id = describe_id(table, id);
        tracing::error!(
            table = table.name(),
            id = %id,
            reason = why,
            "a stored record failed its integrity check: refused"
        );
        StoreError::IntegrityFailure(format!("{} record {id}: {why}", table.name()))
    }
}

/// The id of a slot as people write it (key id, key id and version, UUID).
pub fn describe_id(table: Table, id: &[u8]) -> String {
    match table {
        Table::Keys | Table::Approvals => match <[u8; 16]>::try_from(id) {
            Ok(bytes) if table == Table::Keys => crate::model::KeyId::from_bytes(bytes).to_string(),
            Ok(bytes) => uuid::Uuid::from_bytes(bytes).to_string(),
            Err(_) => hex::encode(id),
        },
        Table::Versions => match id.split_at_checked(16) {
            Some((key, version)) if version.len() == 4 => {
                let key = <[u8; 16]>::try_from(key).map(crate::model::KeyId::from_bytes);
                let version = <[u8; 4]>::try_from(version).map(u32::from_be_bytes);
                match (key, version) {
                    (Ok(key), Ok(version)) => format!("{key} v{version}"),
                    _ => hex::encode(id),
                }
            }
            _ => hex::encode(id),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(byte: u8) -> RecordMac {
        RecordMac::new(&[byte; RECORD_MAC_KEY_LEN]).unwrap()
    }

    #[test]
    fn seal_then_open_round_trips_and_binds_table_id_and_content() {
        let m = mac(7);
        let sealed = m.seal(Table::Keys, b"id-1", b"{\"a\":1}");
        assert!(is_sealed(&sealed));
        assert_eq!(m.open(Table::Keys, b"id-1", &sealed).unwrap(), b"{\"a\":1}");
        assert_eq!(m.failures(), 0);
        // Another slot, another table, edited content, another key: refused.
        assert!(matches!(
            m.open(Table::Keys, b"id-2", &sealed),
            Err(StoreError::IntegrityFailure(_))
        ));
        assert!(m.open(Table::Versions, b"id-1", &sealed).is_err());
        let mut edited = sealed.clone();
        if let Some(last) = edited.last_mut() {
            *last ^= 1;
        }
        assert!(m.open(Table::Keys, b"id-1", &edited).is_err());
        assert!(mac(8).open(Table::Keys, b"id-1", &sealed).is_err());
        // Unsealed or truncated bytes are refused, never passed through.
        assert!(m.open(Table::Keys, b"id-1", b"{\"a\":1}").is_err());
        assert!(m.open(Table::Keys, b"id-1", &sealed[..10]).is_err());
        assert_eq!(m.failures(), 5);
    }

    #[test]
    fn a_detached_tag_is_the_sealed_forms_and_verifies_alone() {
        let m = mac(9);
        let sealed = m.seal(Table::Versions, b"slot", b"{}");
        let tag = m.tag(Table::Versions, b"slot", b"{}");
        assert_eq!(sealed.get(4..36), Some(&tag[..]));
        m.verify(Table::Versions, b"slot", b"{}", &tag).unwrap();
        assert_eq!(m.failures(), 0);
        assert!(m.verify(Table::Versions, b"slot2", b"{}", &tag).is_err());
        assert!(m.verify(Table::Keys, b"slot", b"{}", &tag).is_err());
        assert!(m.verify(Table::Versions, b"slot", b"{ }", &tag).is_err());
        assert!(
            m.verify(Table::Versions, b"slot", b"{}", &tag[..31])
                .is_err()
        );
        assert!(m.verify(Table::Versions, b"slot", b"{}", b"").is_err());
        assert!(
            mac(10)
                .verify(Table::Versions, b"slot", b"{}", &tag)
                .is_err()
        );
        assert_eq!(m.failures(), 5);
    }

    #[test]
    fn the_mac_input_is_unambiguous() {
        // Moving a byte between the id and the content changes the tag.
        let m = mac(1);
        let a = m.seal(Table::Keys, b"ab", b"c");
        let b = m.seal(Table::Keys, b"a", b"bc");
        assert_ne!(a.get(4..36), b.get(4..36));
        assert!(m.open(Table::Keys, b"a", &a).is_err());
    }

    #[test]
    fn text_sealing_round_trips_and_refuses_edits() {
        let m = mac(3);
        let sealed = m.seal_text(Table::Approvals, b"x", b"{\n  \"s\": 1\n}");
        assert!(is_sealed_text(&sealed));
        assert_eq!(
            m.open_text(Table::Approvals, b"x", &sealed).unwrap(),
            b"{\n  \"s\": 1\n}"
        );
        let edited = String::from_utf8(sealed).unwrap().replace('1', "2");
        assert!(
            m.open_text(Table::Approvals, b"x", edited.as_bytes())
                .is_err()
        );
        assert!(m.open_text(Table::Approvals, b"x", b"{}").is_err());
    }

    #[test]
    fn the_key_must_be_256_bits_and_debug_shows_none_of_it() {
        assert!(RecordMac::new(&[0; 16]).is_err());
        let shown = format!("{:?}", mac(0xab));
        assert!(shown.contains("redacted"), "{shown}");
        assert!(
            !shown.contains("ab, ab") && !shown.contains("171"),
            "{shown}"
        );
    }
}
