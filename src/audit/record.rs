//! One audit record, and its canonical encoding.
//!
//! # Canonical encoding (format v1)
//!
//! The bytes hashed into a record's `hash` are
//!
//! ```text
//! "coffre-audit-record/v1\n" ‖ body
//! ```
//!
//! where `body` is the compact JSON object of every field of
//! [`AuditRecord`] except `hash`, in declaration order: `seq`, `time`,
//! `request_id`, `principal`, `role`, `operation`, `key_id`, [`key_name`],
//! `key_version`, `context_digest`, `justification`, `context`, `detail`,
//! `outcome`, `status_code`, `prev_hash`, then `items`. No whitespace; the
//! fields of the first release are `null` when absent (never omitted); fields
//! added since (marked [added] below: `key_name`, `items`) are omitted when
//! absent, so that every record written before them keeps its encoding and
//! its hash; `context` is an object with its keys in byte order; integers
//! in decimal; `time` is milliseconds since the Unix epoch; `outcome` is
//! `"allowed"`, `"refused"` or `"failed"`; strings are escaped as `serde_json`
//! does: `\"`, `\\`, `\b`, `\f`, `\n`, `\r`, `\t`, other characters below
//! U+0020 as `\u00XX` (lowercase hex), everything else as literal UTF-8.
//! `hash` is the lowercase hex SHA-256 of those bytes. A verifier in another
//! language rebuilds `body` from the parsed line by these rules.
//!
//! The log line is `body` with `,"hash":"<hash>"` before its closing brace:
//! the canonical encoding of the whole record. The verifier refuses a line
//! that is anything else (whitespace, another field order, other escapes, a
//! duplicate key), byte for byte.
//!
//! [added] `key_name`: the key as the caller named it (an alias), present
//! only when it differs from `key_id`. `key_id` is the key's UUID whenever
//! the key exists, refusals included; for a name that matches no key it is
//! the name as given.
//!
//! [`key_name`]: AuditRecord::key_name
//!
//! [added] `items` (BatchDecrypt): one object per item of the batch, in request
//! order: `{"i":index,"k":key_id,"v":key_version,"c":context_digest,
//! "s":status_code}` in that order. `k` and `v` appear only for a blob that
//! authenticated (a refused or failed item names no key: what its header
//! claims is not evidence); `c` appears only when the item's context was
//! valid and differs from the record's own `context_digest` (a batch with
//! one context states it once, at the top); `s` is the item's status code
//! name, as the caller saw it.
//!
//! Records never hold key material. The encryption context appears only as a
//! keyed digest ([`AuditDigestKey::context_digest`]), so that an auditor can
//! match two records with the same context without the log revealing it, and
//! without a dictionary attack on low-entropy context values.

use std::collections::BTreeMap;
use std::fmt;

use ring::{digest, hmac};
use serde::{Deserialize, Serialize};

use crate::authz::Role;
use crate::crypto::feed_canonical_context;
use crate::model::{EncryptionContext, KeyId, Timestamp};

/// The `prev_hash` of the first record of a log: 64 zeros.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Domain separation for the record hash.
const RECORD_HASH_PREFIX: &[u8] = b"coffre-audit-record/v1\n";

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Authorized and performed.
    Allowed,
    /// Refused by authentication, authorization or validation.
    Refused,
    /// Authorized, but failed (HSM unavailable, internal error).
    Failed,
}

/// What the caller of [`crate::audit::AuditLog::append`] supplies; the log
/// fills `seq`, `time`, `prev_hash` and `hash`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEntry {
    pub request_id: String,
    pub principal: String,
    pub role: Option<String>,
    pub operation: String,
    /// The key's UUID when the key exists; else the name as given.
    pub key_id: Option<String>,
    /// The name the caller gave (an alias), when it differs from `key_id`.
    pub key_name: Option<String>,
    pub key_version: Option<u32>,
    /// From [`AuditDigestKey::context_digest`]; never the context itself.
    pub context_digest: Option<String>,
    pub justification: Option<String>,
    /// The encryption context entries the configuration asks to record in
    /// clear (none by default).
    pub context: Option<BTreeMap<String, String>>,
    /// What else identifies the request, built by coffre (never from key
    /// material): the source key of a ReEncrypt, a pending approval's id.
    pub detail: Option<String>,
    pub outcome: Outcome,
    /// The gRPC status code name, e.g. `OK`, `PERMISSION_DENIED`.
    pub status_code: String,
    /// BatchDecrypt: what happened to each item (module docs, `items`).
    pub items: Option<Vec<AuditItem>>,
}

/// One item of a batch in its request's record (module docs, `items`):
/// a few short fields, since a batch holds up to 1,000 of them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditItem {
    /// Its position in the request, from 0.
    #[serde(rename = "i")]
    pub index: u32,
    /// The key that authenticated the blob: only for an opened blob.
    #[serde(rename = "k", default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(rename = "v", default, skip_serializing_if = "Option::is_none")]
    pub key_version: Option<u32>,
    /// The item's context digest, when valid and not the record's own.
    #[serde(rename = "c", default, skip_serializing_if = "Option::is_none")]
    pub context_digest: Option<String>,
    /// The status code name the caller got for this item.
    #[serde(rename = "s")]
    pub status_code: String,
}

impl AuditEntry {
    /// A record with nothing filled in: no request id, principal or
    /// operation, and the outcome `Failed` with no status code, so that an
    /// entry nobody completed never reads as an allowed request. A request's
    /// record starts as this and is filled in as the request goes.
    pub fn empty() -> Self {
        Self {
            request_id: String::new(),
            principal: String::new(),
            role: None,
            operation: String::new(),
            key_id: None,
            key_name: None,
            key_version: None,
            context_digest: None,
            justification: None,
            context: None,
            detail: None,
            outcome: Outcome::Failed,
            status_code: String::new(),
            items: None,
        }
    }

    /// The record of an action coffre's own tasks performed on a key (the
    /// scheduler's rotations and destructions, the keys `coffre dev`
    /// preloads): allowed, status `OK`, under a fresh request id (a random
    /// UUID, the shape of a request's).
    pub fn system(
        principal: &str,
        role: Option<Role>,
        operation: &str,
        key_id: KeyId,
        detail: &str,
    ) -> Self {
        Self {
            request_id: uuid::Uuid::new_v4().to_string(),
            principal: principal.to_string(),
            role: role.map(|r| r.as_str().to_string()),
            operation: operation.to_string(),
            key_id: Some(key_id.to_string()),
            detail: Some(detail.to_string()),
            outcome: Outcome::Allowed,
            status_code: "OK".to_string(),
            ..Self::empty()
        }
    }
}

/// One line of the audit log. Field order is part of the canonical encoding
/// (see the module docs): do not reorder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    pub seq: u64,
    pub time: Timestamp,
    pub request_id: String,
    pub principal: String,
    pub role: Option<String>,
    pub operation: String,
    pub key_id: Option<String>,
    /// [added] Omitted when absent (module docs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_name: Option<String>,
    pub key_version: Option<u32>,
    pub context_digest: Option<String>,
    pub justification: Option<String>,
    pub context: Option<BTreeMap<String, String>>,
    pub detail: Option<String>,
    pub outcome: Outcome,
    pub status_code: String,
    pub prev_hash: String,
    /// Added field (module docs): only when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<Vec<AuditItem>>,
    pub hash: String,
}

/// Lowercase hex of a 32-byte digest, without the per-character iterator
/// of `hex::encode` or the lossy conversion's scan (this runs twice per
/// request: the context digest, the record's hash).
fn hex32(bytes: &[u8]) -> String {
    let mut out = vec![0u8; 64];
    match hex::encode_to_slice(bytes, &mut out).map(|()| String::from_utf8(out)) {
        Ok(Ok(hex)) => hex,
        _ => hex::encode(bytes),
    }
}

/// The hashed view of a record: every field but `hash`, same order; what
/// the hand-written [`AuditRecord::write_body`] is held to.
#[cfg(test)]
#[derive(Serialize)]
struct Body<'a> {
    seq: u64,
    time: Timestamp,
    request_id: &'a str,
    principal: &'a str,
    role: &'a Option<String>,
    operation: &'a str,
    key_id: &'a Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_name: &'a Option<String>,
    key_version: Option<u32>,
    context_digest: &'a Option<String>,
    justification: &'a Option<String>,
    context: &'a Option<BTreeMap<String, String>>,
    detail: &'a Option<String>,
    outcome: Outcome,
    status_code: &'a str,
    prev_hash: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    items: &'a Option<Vec<AuditItem>>,
}

impl AuditRecord {
    /// Builds the record that follows `prev_hash` at `seq`, with its hash.
    pub fn new(seq: u64, time: Timestamp, prev_hash: String, entry: AuditEntry) -> Self {
        let mut record = Self::new_unhashed(seq, time, prev_hash, entry);
        record.hash = record.compute_hash();
        record
    }

    /// Builds the record that follows `prev_hash` at `seq` and appends its
    /// log line (with `\n`) to `line`, encoding it once: the line is the
    /// canonical body with `"hash"` added as its last field, which is
    /// exactly what serializing the record gives (pinned by a test).
    pub fn new_into_line(
        seq: u64,
        time: Timestamp,
        prev_hash: String,
        entry: AuditEntry,
        line: &mut Vec<u8>,
    ) -> Self {
        let mut record = Self::new_unhashed(seq, time, prev_hash, entry);
        let start = line.len();
        record.write_body(line);
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(RECORD_HASH_PREFIX);
        ctx.update(line.get(start..).unwrap_or_default());
        record.hash = hex32(ctx.finish().as_ref());
        // The body ends with `}`: reopen it for the hash.
        if line.last() == Some(&b'}') {
            line.pop();
        }
        line.extend_from_slice(b",\"hash\":\"");
        line.extend_from_slice(record.hash.as_bytes());
        line.extend_from_slice(b"\"}\n");
        record
    }

    fn new_unhashed(seq: u64, time: Timestamp, prev_hash: String, entry: AuditEntry) -> Self {
        AuditRecord {
            seq,
            time,
            request_id: entry.request_id,
            principal: entry.principal,
            role: entry.role,
            operation: entry.operation,
            key_id: entry.key_id,
            key_name: entry.key_name,
            key_version: entry.key_version,
            context_digest: entry.context_digest,
            justification: entry.justification,
            context: entry.context,
            detail: entry.detail,
            outcome: entry.outcome,
            status_code: entry.status_code,
            prev_hash,
            items: entry.items,
            hash: String::new(),
        }
    }

    /// The canonical bytes (module docs): prefix ‖ compact JSON without `hash`.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = RECORD_HASH_PREFIX.to_vec();
        self.write_body(&mut out);
        out
    }

    /// Appends the compact JSON body (every field but `hash`), by hand:
    /// the fields are known, most strings need no escape, and serde's
    /// generic serializer cost more than the rest of the append but the
    /// hash (issue #20). Byte for byte what `serde_json` writes from
    /// [`Body`] (a property test holds it to [`Self::write_body_serde`]).
    fn write_body(&self, out: &mut Vec<u8>) {
        out.reserve(512);
        out.extend_from_slice(b"{\"seq\":");
        push_int(out, self.seq);
        out.extend_from_slice(b",\"time\":");
        push_int(out, self.time.0);
        out.extend_from_slice(b",\"request_id\":");
        push_str(out, &self.request_id);
        out.extend_from_slice(b",\"principal\":");
        push_str(out, &self.principal);
        out.extend_from_slice(b",\"role\":");
        push_opt_str(out, &self.role);
        out.extend_from_slice(b",\"operation\":");
        push_str(out, &self.operation);
        out.extend_from_slice(b",\"key_id\":");
        push_opt_str(out, &self.key_id);
        if let Some(name) = &self.key_name {
            out.extend_from_slice(b",\"key_name\":");
            push_str(out, name);
        }
        out.extend_from_slice(b",\"key_version\":");
        match self.key_version {
            Some(v) => push_int(out, v),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"context_digest\":");
        push_opt_str(out, &self.context_digest);
        out.extend_from_slice(b",\"justification\":");
        push_opt_str(out, &self.justification);
        out.extend_from_slice(b",\"context\":");
        match &self.context {
            None => out.extend_from_slice(b"null"),
            Some(context) => {
                out.push(b'{');
                for (i, (k, v)) in context.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    push_str(out, k);
                    out.push(b':');
                    push_str(out, v);
                }
                out.push(b'}');
            }
        }
        out.extend_from_slice(b",\"detail\":");
        push_opt_str(out, &self.detail);
        out.extend_from_slice(match self.outcome {
            Outcome::Allowed => b",\"outcome\":\"allowed\"",
            Outcome::Refused => b",\"outcome\":\"refused\"",
            Outcome::Failed => b",\"outcome\":\"failed\"",
        });
        out.extend_from_slice(b",\"status_code\":");
        push_str(out, &self.status_code);
        out.extend_from_slice(b",\"prev_hash\":");
        push_str(out, &self.prev_hash);
        if let Some(items) = &self.items {
            out.extend_from_slice(b",\"items\":");
            // Batches only, rare: serde's encoding of them as it was.
            let start = out.len();
            if serde_json::to_writer(&mut *out, items).is_err() {
                out.truncate(start);
            }
        }
        out.push(b'}');
    }

    /// The body as `serde_json` writes it from [`Body`]: the reference
    /// [`Self::write_body`] is held to (tests).
    #[cfg(test)]
    fn write_body_serde(&self, out: &mut Vec<u8>) {
        let body = Body {
            seq: self.seq,
            time: self.time,
            request_id: &self.request_id,
            principal: &self.principal,
            role: &self.role,
            operation: &self.operation,
            key_id: &self.key_id,
            key_name: &self.key_name,
            key_version: self.key_version,
            context_digest: &self.context_digest,
            justification: &self.justification,
            context: &self.context,
            detail: &self.detail,
            outcome: self.outcome,
            status_code: &self.status_code,
            prev_hash: &self.prev_hash,
            items: &self.items,
        };
        let start = out.len();
        // Serializing plain strings and integers into a Vec cannot fail; if it
        // ever did, the empty body gives a hash that no verifier accepts.
        if serde_json::to_writer(&mut *out, &body).is_err() {
            out.truncate(start);
        }
    }

    /// Lowercase hex SHA-256 of [`Self::canonical_bytes`].
    pub fn compute_hash(&self) -> String {
        hex32(digest::digest(&digest::SHA256, &self.canonical_bytes()).as_ref())
    }

    /// Whether the stored `hash` is the hash of the other fields.
    pub fn hash_is_valid(&self) -> bool {
        self.hash == self.compute_hash()
    }

    /// The record's log line, without the `\n`: its canonical encoding.
    pub fn to_line(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string(self)
    }
}

/// An integer in decimal, as JSON (and serde) write it.
fn push_int(out: &mut Vec<u8>, n: impl Into<i128>) {
    use std::io::Write;
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{}", n.into());
}

/// A JSON string as `serde_json` escapes it: most need no escape, and are
/// copied whole.
fn push_str(out: &mut Vec<u8>, s: &str) {
    // A fold rather than `all`: without the early exit the compiler checks
    // many bytes at once, and fields are short.
    let plain = s.bytes().fold(true, |plain, b| {
        plain & (b >= 0x20) & (b != b'"') & (b != b'\\')
    });
    if plain {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let start = out.len();
        if serde_json::to_writer(&mut *out, s).is_err() {
            out.truncate(start);
        }
    }
}

fn push_opt_str(out: &mut Vec<u8>, s: &Option<String>) {
    match s {
        Some(s) => push_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// The HMAC-SHA256 key for context digests in audit records. Secret: whoever
/// holds it can test guesses of a context against the log.
pub struct AuditDigestKey(hmac::Key);

impl AuditDigestKey {
    /// At least 32 bytes of key are expected; shorter keys are refused.
    pub fn new(key: &[u8]) -> Option<Self> {
        (key.len() >= 32).then(|| Self(hmac::Key::new(hmac::HMAC_SHA256, key)))
    }

    /// Lowercase hex HMAC-SHA256 of [`crate::crypto::canonical_context`]
    /// of `context`.
    pub fn context_digest(&self, context: &EncryptionContext) -> String {
        let mut ctx = hmac::Context::with_key(&self.0);
        feed_canonical_context(context, |piece| ctx.update(piece));
        hex32(ctx.sign().as_ref())
    }
}

impl fmt::Debug for AuditDigestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuditDigestKey(<redacted>)")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn entry(n: u64) -> AuditEntry {
        AuditEntry {
            request_id: format!("req-{n}"),
            principal: "CN=svc-a".into(),
            role: Some("service".into()),
            operation: "GenerateDataKey".into(),
            key_id: Some("0b5c1e8e-4a57-4c1c-9d0a-2f3c4b5a6d7e".into()),
            key_version: Some(1),
            outcome: Outcome::Allowed,
            status_code: "OK".into(),
            ..AuditEntry::empty()
        }
    }

    #[test]
    fn an_empty_entry_is_a_failure_and_a_system_entry_an_allowed_action() {
        let empty = AuditEntry::empty();
        assert_eq!(empty.outcome, Outcome::Failed);
        assert!(empty.request_id.is_empty() && empty.status_code.is_empty());
        let id = KeyId::new_random();
        let a = AuditEntry::system("coffre/scheduler", None, "RotateKey", id, "scheduled");
        let b = AuditEntry::system("CN=op", Some(Role::Operator), "CreateKey", id, "preloaded");
        assert_eq!(
            (a.outcome, a.status_code.as_str(), a.role.as_deref()),
            (Outcome::Allowed, "OK", None)
        );
        assert_eq!(b.role.as_deref(), Some("operator"));
        assert_eq!(a.key_id, Some(id.to_string()));
        assert_eq!(a.detail.as_deref(), Some("scheduled"));
        assert_eq!(a.key_version, None);
        assert!(uuid::Uuid::parse_str(&a.request_id).is_ok());
        assert_ne!(a.request_id, b.request_id, "one request id per record");
    }

    #[test]
    fn a_context_digest_is_the_hex_hmac_of_the_canonical_context() {
        let key = [7u8; 32];
        let digests = AuditDigestKey::new(&key).unwrap();
        let context = EncryptionContext::new([
            ("tenant".to_string(), "t-1".to_string()),
            ("bucket".to_string(), "b".to_string()),
        ])
        .unwrap();
        let expected = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, &key),
            &crate::crypto::canonical_context(&context),
        );
        assert_eq!(
            digests.context_digest(&context),
            hex::encode(expected.as_ref())
        );
        assert_eq!(hex32(&[0xab; 32]), "ab".repeat(32));
    }

    #[test]
    fn hash_covers_every_field() {
        let r = AuditRecord::new(1, Timestamp(1000), GENESIS_HASH.into(), entry(1));
        assert!(r.hash_is_valid());
        type Edit = Box<dyn Fn(&mut AuditRecord)>;
        let mut edits: Vec<Edit> = vec![
            Box::new(|r| r.seq += 1),
            Box::new(|r| r.time = Timestamp(1001)),
            Box::new(|r| r.request_id.push('x')),
            Box::new(|r| r.principal.push('x')),
            Box::new(|r| r.role = None),
            Box::new(|r| r.operation.push('x')),
            Box::new(|r| r.key_id = None),
            Box::new(|r| r.key_name = Some("alias".into())),
            Box::new(|r| r.key_version = Some(2)),
            Box::new(|r| r.context_digest = Some("00".into())),
            Box::new(|r| r.justification = Some("j".into())),
            Box::new(|r| r.context = Some(BTreeMap::new())),
            Box::new(|r| r.detail = Some("d".into())),
            Box::new(|r| r.outcome = Outcome::Refused),
            Box::new(|r| r.status_code.push('x')),
            Box::new(|r| r.prev_hash = "1".repeat(64)),
            Box::new(|r| r.items = Some(Vec::new())),
        ];
        for (i, edit) in edits.drain(..).enumerate() {
            let mut m = r.clone();
            edit(&mut m);
            assert!(!m.hash_is_valid(), "edit {i} not covered by the hash");
        }
    }

    #[test]
    fn canonical_encoding_is_pinned() {
        let r = AuditRecord::new(1, Timestamp(1000), GENESIS_HASH.into(), entry(1));
        let body = String::from_utf8(r.canonical_bytes()).unwrap();
        assert_eq!(
            body,
            format!(
                "coffre-audit-record/v1\n{{\"seq\":1,\"time\":1000,\"request_id\":\"req-1\",\
                 \"principal\":\"CN=svc-a\",\"role\":\"service\",\"operation\":\"GenerateDataKey\",\
                 \"key_id\":\"0b5c1e8e-4a57-4c1c-9d0a-2f3c4b5a6d7e\",\"key_version\":1,\
                 \"context_digest\":null,\"justification\":null,\"context\":null,\
                 \"detail\":null,\"outcome\":\"allowed\",\
                 \"status_code\":\"OK\",\"prev_hash\":\"{GENESIS_HASH}\"}}"
            )
        );
        // The JSON line round-trips to the same record and hash.
        let line = serde_json::to_string(&r).unwrap();
        let back: AuditRecord = serde_json::from_str(&line).unwrap();
        assert_eq!(back, r);
        assert!(back.hash_is_valid());
    }

    /// `items` follows `prev_hash`, compact, only when present: a record
    /// without it encodes exactly as before the field existed.
    #[test]
    fn batch_items_are_encoded_after_prev_hash_only_when_present() {
        let plain = AuditRecord::new(1, Timestamp(1000), GENESIS_HASH.into(), entry(1));
        let line = serde_json::to_string(&plain).unwrap();
        assert!(!line.contains("items"), "{line}");
        let mut e = entry(1);
        e.items = Some(vec![
            AuditItem {
                index: 0,
                key_id: Some("k1".into()),
                key_version: Some(3),
                context_digest: None,
                status_code: "OK".into(),
            },
            AuditItem {
                index: 1,
                key_id: None,
                key_version: None,
                context_digest: Some("cd".into()),
                status_code: "PERMISSION_DENIED".into(),
            },
        ]);
        let r = AuditRecord::new(1, Timestamp(1000), GENESIS_HASH.into(), e);
        let body = String::from_utf8(r.canonical_bytes()).unwrap();
        assert!(
            body.ends_with(&format!(
                "\"prev_hash\":\"{GENESIS_HASH}\",\"items\":[{{\"i\":0,\"k\":\"k1\",\"v\":3,\"s\":\"OK\"}},\
                 {{\"i\":1,\"c\":\"cd\",\"s\":\"PERMISSION_DENIED\"}}]}}"
            )),
            "{body}"
        );
        assert_ne!(r.hash, plain.hash);
        let back: AuditRecord = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        assert!(back.hash_is_valid());
    }

    /// The line written in one pass is the record's own serialization, for
    /// awkward strings (escapes, control characters, non-ASCII) too.
    #[test]
    fn the_one_pass_line_is_the_serialized_record() {
        for n in 1..4 {
            let mut e = entry(n);
            e.detail = Some("quote \" backslash \\ tab \t nul \u{0} é 🗝".into());
            e.context = Some([("k\n".to_string(), "v\u{1f}".to_string())].into());
            e.key_id = (n != 2).then(|| "k".to_string());
            e.items = (n == 3).then(|| {
                vec![
                    AuditItem {
                        index: 0,
                        key_id: Some("k".into()),
                        key_version: Some(2),
                        context_digest: Some("ab".into()),
                        status_code: "OK".into(),
                    },
                    AuditItem {
                        index: 1,
                        key_id: None,
                        key_version: None,
                        context_digest: None,
                        status_code: "INVALID_ARGUMENT".into(),
                    },
                ]
            });
            let mut line = b"previous line\n".to_vec();
            let r = AuditRecord::new_into_line(
                n,
                Timestamp(5),
                GENESIS_HASH.into(),
                e.clone(),
                &mut line,
            );
            let expected = format!("previous line\n{}\n", serde_json::to_string(&r).unwrap());
            assert_eq!(String::from_utf8(line).unwrap(), expected);
            assert_eq!(r, AuditRecord::new(n, Timestamp(5), GENESIS_HASH.into(), e));
            assert!(r.hash_is_valid());
        }
    }

    #[test]
    fn context_values_never_appear_in_a_record() {
        let key = AuditDigestKey::new(&[7u8; 32]).unwrap();
        let ctx = EncryptionContext::new([
            ("tenant".to_string(), "acme-secret-tenant".to_string()),
            ("bucket".to_string(), "payroll-2025".to_string()),
        ])
        .unwrap();
        let mut e = entry(1);
        e.context_digest = Some(key.context_digest(&ctx));
        let r = AuditRecord::new(1, Timestamp(0), GENESIS_HASH.into(), e);
        let line = serde_json::to_string(&r).unwrap();
        for (k, v) in ctx.entries() {
            assert!(!line.contains(k.as_str()) && !line.contains(v.as_str()));
        }
        assert_eq!(r.context_digest.as_deref().map(str::len), Some(64));
        // Keyed: another key gives another digest; same key, same digest.
        let other = AuditDigestKey::new(&[8u8; 32]).unwrap();
        assert_ne!(other.context_digest(&ctx), key.context_digest(&ctx));
        assert_eq!(r.context_digest, Some(key.context_digest(&ctx)));
        assert!(AuditDigestKey::new(&[0u8; 16]).is_none());
        assert_eq!(format!("{key:?}"), "AuditDigestKey(<redacted>)");
    }

    fn text() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        // Plain ASCII, the characters serde escapes, DEL, and non-ASCII.
        proptest::collection::vec(
            prop_oneof![
                4 => proptest::char::range('a', 'z'),
                1 => proptest::char::range('\u{0}', '\u{1f}'),
                1 => Just('"'),
                1 => Just('\\'),
                1 => Just('\u{7f}'),
                1 => Just('é'),
                1 => Just('🗝'),
            ],
            0..12,
        )
        .prop_map(|chars| chars.into_iter().collect())
    }

    proptest::proptest! {
        /// The hand-written body is, byte for byte, what serde writes.
        #[test]
        fn the_hand_written_body_is_serdes(
            seq in proptest::prelude::any::<u64>(),
            time in proptest::prelude::any::<i64>(),
            strings in proptest::collection::vec(text(), 6),
            options in proptest::collection::vec(proptest::option::of(text()), 6),
            key_version in proptest::option::of(proptest::prelude::any::<u32>()),
            context in proptest::option::of(proptest::collection::btree_map(text(), text(), 0..4)),
            outcome in 0..3u8,
            items in proptest::option::of(proptest::collection::vec(
                (proptest::option::of(text()), proptest::option::of(0..9u32), text()), 0..3)),
        ) {
            let r = AuditRecord {
                seq,
                time: Timestamp(time),
                request_id: strings[0].clone(),
                principal: strings[1].clone(),
                role: options[0].clone(),
                operation: strings[2].clone(),
                key_id: options[1].clone(),
                key_name: options[2].clone(),
                key_version,
                context_digest: options[3].clone(),
                justification: options[4].clone(),
                context,
                detail: options[5].clone(),
                outcome: [Outcome::Allowed, Outcome::Refused, Outcome::Failed][usize::from(outcome)],
                status_code: strings[3].clone(),
                prev_hash: strings[4].clone(),
                items: items.map(|items| {
                    items
                        .into_iter()
                        .enumerate()
                        .map(|(i, (key_id, key_version, status_code))| AuditItem {
                            index: i as u32,
                            key_id,
                            key_version,
                            context_digest: None,
                            status_code,
                        })
                        .collect()
                }),
                hash: String::new(),
            };
            let (mut fast, mut reference) = (Vec::new(), Vec::new());
            r.write_body(&mut fast);
            r.write_body_serde(&mut reference);
            proptest::prop_assert_eq!(String::from_utf8(fast).unwrap(), String::from_utf8(reference).unwrap());
        }
    }
}
