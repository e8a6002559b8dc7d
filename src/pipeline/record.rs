//! The audit record of one request, as the request fills it in.

use std::sync::Arc;
use std::time::Instant;

use super::Code;
use crate::audit::{AuditEntry, AuditItem, AuditTrail, Outcome};
use crate::authz::Operation;
use crate::model::{AccessReason, EncryptionContext, KeyId, KeyRecord};

/// The audit record of one request, as its body fills it in.
///
/// A request that never reaches the end of [`super::Open::run`] — its
/// future dropped because the caller cancelled, its deadline passed or its
/// connection closed — still leaves its record: `Drop` queues it as
/// `CANCELLED`.
#[derive(Debug)]
pub struct RequestAudit {
    entry: AuditEntry,
    audit: Arc<AuditTrail>,
    op: Operation,
    started: Instant,
    span: tracing::Span,
    /// The record went to the log (by `finish`).
    recorded: bool,
    /// The key `entry.key_id` names, once resolved: a request that
    /// resolves the same key twice (Decrypt: from the blob's header, then
    /// from the opened blob) formats its id once.
    resolved: Option<KeyId>,
}

/// What a `CANCELLED` record says of the request it records.
pub const ABANDONED: &str = "the caller went away before the answer (cancelled, deadline \
     exceeded or connection closed); the operation may have taken effect";

impl Drop for RequestAudit {
    /// The request was abandoned mid-way: record it anyway, without
    /// waiting (a `Drop` cannot), through the audit writer thread. A key
    /// change already handed to the store completes regardless; the record
    /// names the request, its caller and what it had resolved (key,
    /// context digest) and says the outcome is unknown.
    fn drop(&mut self) {
        if self.recorded {
            return;
        }
        let mut entry = std::mem::replace(&mut self.entry, AuditEntry::empty());
        settle_name(&mut entry);
        entry.outcome = Outcome::Failed;
        entry.status_code = Code::Cancelled.name().to_string();
        entry.detail = Some(match entry.detail.take() {
            Some(detail) => format!("{detail}; {ABANDONED}"),
            None => ABANDONED.to_string(),
        });
        tracing::warn!(
            request_id = %entry.request_id,
            rpc = self.op.name(),
            "request abandoned by its caller before the answer; recorded as CANCELLED"
        );
        self.audit.record_detached(entry);
    }
}

impl RequestAudit {
    pub(super) fn new(
        entry: AuditEntry,
        audit: Arc<AuditTrail>,
        op: Operation,
        span: tracing::Span,
    ) -> Self {
        Self {
            entry,
            audit,
            op,
            started: Instant::now(),
            span,
            recorded: false,
            resolved: None,
        }
    }

    pub(super) fn op(&self) -> Operation {
        self.op
    }

    pub(super) fn started(&self) -> Instant {
        self.started
    }

    /// The span the request's work runs in: every log line it causes
    /// carries the request id of its audit record.
    pub fn span(&self) -> tracing::Span {
        self.span.clone()
    }

    /// The key as the caller named it (id or alias, unvalidated). It stays
    /// in the record as `key_name` if it is not the key's id; `key_id` is
    /// replaced by [`Self::resolved_key`] once the core has found the key,
    /// or, for a request that ended before (a refusal), by the pipeline's
    /// lookup of [`Self::unresolved_alias`].
    pub fn named_key(&mut self, raw: &str) {
        if !raw.is_empty() {
            self.entry.key_id = Some(raw.to_string());
            self.entry.key_name = Some(raw.to_string());
            self.resolved = None;
        }
    }

    /// The alias the caller named, while no key id has replaced it.
    pub fn unresolved_alias(&self) -> Option<&str> {
        let name = self.entry.key_name.as_deref()?;
        (self.entry.key_id.as_deref() == Some(name) && name.parse::<KeyId>().is_err())
            .then_some(name)
    }

    /// The key (and version, if one) the request resolved to.
    pub fn resolved_key(&mut self, key_id: KeyId, version: Option<u32>) {
        if self.resolved != Some(key_id) || self.entry.key_id.is_none() {
            self.entry.key_id = Some(key_id.to_string());
            self.resolved = Some(key_id);
        }
        if version.is_some() {
            self.entry.key_version = version;
        }
    }

    /// The key a request changed or read, at its primary version.
    pub fn resolved(&mut self, key: &KeyRecord) {
        self.resolved_key(key.id, Some(key.primary_version));
    }

    /// The key and version a wrapped key names in its header (not yet
    /// authenticated: what the caller presented).
    pub fn blob(&mut self, blob: &[u8]) {
        if let Ok(parsed) = crate::envelope::parse(blob) {
            self.resolved_key(parsed.header.key_id, Some(parsed.header.key_version));
        }
    }

    pub fn context(&mut self, context: &EncryptionContext) {
        self.entry.context_digest = Some(self.audit.context_digest(context));
        self.entry.context = self.audit.clear_context(context);
    }

    /// A context that holds nothing secret (the XKS front's request
    /// metadata: ARNs, AWS's request id), recorded in clear whatever
    /// `audit.clear_context_keys` says, beside its digest.
    pub fn context_in_clear(&mut self, context: &EncryptionContext) {
        self.entry.context_digest = Some(self.audit.context_digest(context));
        self.entry.context = Some(context.entries().clone());
    }

    /// The justification given: a known reason, or the number of an
    /// unknown one (recorded as `UNKNOWN(n)`).
    pub fn justification(&mut self, reason: Result<AccessReason, i32>) {
        self.entry.justification = Some(match reason {
            Ok(r) => r.name().to_string(),
            Err(raw) => format!("UNKNOWN({raw})"),
        });
    }

    pub fn detail(&mut self, detail: String) {
        self.entry.detail = Some(detail);
    }

    /// The principal the record names (empty: none).
    pub(super) fn principal(&self) -> &str {
        &self.entry.principal
    }

    pub(super) fn role(&self) -> Option<&str> {
        self.entry.role.as_deref()
    }

    /// Drops the record unwritten: a rate-limit refusal counted in a
    /// coalesced record (`super::refusals`). Returns its request id.
    pub(super) fn discard(mut self) -> String {
        self.recorded = true;
        std::mem::take(&mut self.entry.request_id)
    }

    /// The keyed digest this log gives `context` (for a batch item whose
    /// context is not the record's own).
    pub fn context_digest(&self, context: &EncryptionContext) -> String {
        self.audit.context_digest(context)
    }

    /// What happened to each item of a batch (`AuditEntry::items`).
    pub fn items(&mut self, items: Vec<AuditItem>) {
        self.entry.items = Some(items);
    }

    /// Sets the outcome and hands the record over for writing; from here
    /// on `Drop` does nothing.
    pub(super) fn finish(mut self, code: Code) -> AuditEntry {
        self.entry.outcome = code.outcome();
        self.entry.status_code = code.name().to_string();
        self.recorded = true;
        let mut entry = std::mem::replace(&mut self.entry, AuditEntry::empty());
        settle_name(&mut entry);
        entry
    }
}

/// `key_name` stays only where it says more than `key_id` (an alias).
fn settle_name(entry: &mut AuditEntry) {
    if entry.key_name.is_some() && entry.key_name == entry.key_id {
        entry.key_name = None;
    }
}
