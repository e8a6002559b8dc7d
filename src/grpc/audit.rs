//! The audit side of the transport: one record per request
//! ([`RequestAudit`], written by [`Api::finish`] before the response leaves),
//! and the [`AuditService`] for auditors.
//!
//! Every handler of coffre's services starts a [`RequestAudit`] before it
//! does anything else, fills in what it learns (the key and version, the
//! context digest, the justification) and ends with [`Api::finish`], which
//! sets the outcome from the result, appends the record and only then lets
//! the response go. If the record cannot be written, the caller gets
//! `UNAVAILABLE` instead of the response (fail closed). Requests refused
//! before the service core (a malformed field, a certificate without a
//! principal) are recorded the same way. Health and reflection, which carry
//! no key operation, are not recorded. A TLS handshake refused for lack of
//! a valid client certificate never becomes a request; rustls logs it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::auth::principal_of;
use super::pb::{self, audit_service_server::AuditService};
use super::services::Api;
use super::{convert, status};
use crate::audit::{AuditEntry, AuditRecord, AuditTrail, Checkpoint, EventFilter, Outcome};
use crate::authz::{Caller, Operation};
use crate::model::{EncryptionContext, KeyId, Timestamp};

/// The response header that carries the request id (also on errors); the
/// audit record of the request has the same `request_id`.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Request ids: UUIDs (version 4 layout) made of a random 128-bit base
/// drawn at start plus a counter, so that a request costs no system call
/// for randomness. Unique within a process (2^62 requests) and, with 122
/// random bits per start, across restarts; not secret, not unpredictable.
#[derive(Debug)]
pub(super) struct RequestIds {
    base: u128,
    next: std::sync::atomic::AtomicU64,
}

impl RequestIds {
    pub(super) fn new() -> Self {
        let mut seed = [0u8; 16];
        // Without randomness the ids stay unique within this process.
        if crate::crypto::Rng::default().fill(&mut seed).is_err() {
            tracing::warn!("no randomness for request ids: counter only");
        }
        Self {
            base: u128::from_be_bytes(seed),
            next: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub(super) fn next(&self) -> String {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let low = (self.base as u64).wrapping_add(n);
        let id = (self.base & !u128::from(u64::MAX)) | u128::from(low);
        uuid::Builder::from_random_bytes(id.to_be_bytes())
            .into_uuid()
            .hyphenated()
            .to_string()
    }
}

/// The audit record of one request, as the handler fills it in.
///
/// A handler that never reaches [`Api::finish`] — its future dropped
/// because the caller cancelled, its deadline passed or its connection
/// closed — still leaves its record: `Drop` queues it as `CANCELLED`
/// (see there).
pub(super) struct RequestAudit {
    entry: AuditEntry,
    audit: Arc<AuditTrail>,
    op: Operation,
    started: Instant,
    span: tracing::Span,
    /// The record went to the log (by `finish`).
    recorded: bool,
}

/// What a `CANCELLED` record says of the request it records.
pub(super) const ABANDONED: &str = "the caller went away before the answer (cancelled, deadline \
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
        let mut entry = std::mem::replace(&mut self.entry, empty_entry());
        entry.outcome = Outcome::Failed;
        entry.status_code = code_name(tonic::Code::Cancelled).to_string();
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

/// A record with nothing filled in (no allocation): what `begin` starts
/// from, and what `finish` and `Drop` leave behind when they take the entry.
fn empty_entry() -> AuditEntry {
    AuditEntry {
        request_id: String::new(),
        principal: String::new(),
        role: None,
        operation: String::new(),
        key_id: None,
        key_version: None,
        context_digest: None,
        justification: None,
        context: None,
        detail: None,
        outcome: Outcome::Failed,
        status_code: String::new(),
    }
}

impl RequestAudit {
    /// The span the request's work runs in: every log line it causes
    /// carries the request id of its audit record.
    pub(super) fn span(&self) -> tracing::Span {
        self.span.clone()
    }

    pub(super) fn key(&mut self, key_id: &str) {
        if !key_id.is_empty() {
            self.entry.key_id = Some(key_id.to_string());
        }
    }

    pub(super) fn key_id(&mut self, key_id: KeyId, version: Option<u32>) {
        self.entry.key_id = Some(key_id.to_string());
        if version.is_some() {
            self.entry.key_version = version;
        }
    }

    /// The key and version a wrapped key names in its header (not yet
    /// authenticated: what the caller presented).
    pub(super) fn blob(&mut self, blob: &[u8]) {
        if let Ok(parsed) = crate::envelope::parse(blob) {
            self.key_id(parsed.header.key_id, Some(parsed.header.key_version));
        }
    }

    pub(super) fn context(&mut self, context: &EncryptionContext) {
        self.entry.context_digest = Some(self.audit.context_digest(context));
        self.entry.context = self.audit.clear_context(context);
    }

    pub(super) fn justification(&mut self, raw: i32) {
        self.entry.justification = Some(
            pb::AccessReason::try_from(raw)
                .map(|r| r.as_str_name().to_string())
                .unwrap_or_else(|_| format!("UNKNOWN({raw})")),
        );
    }

    pub(super) fn detail(&mut self, detail: String) {
        self.entry.detail = Some(detail);
    }

    fn set_result(&mut self, code: tonic::Code) {
        self.entry.outcome = outcome_of(code);
        self.entry.status_code = code_name(code).to_string();
    }
}

/// Refused: the request was not acceptable (validation, authorization,
/// state, rate). Failed: it was, but coffre could not serve it.
fn outcome_of(code: tonic::Code) -> Outcome {
    use tonic::Code as C;
    match code {
        C::Ok => Outcome::Allowed,
        C::InvalidArgument
        | C::NotFound
        | C::AlreadyExists
        | C::PermissionDenied
        | C::FailedPrecondition
        | C::OutOfRange
        | C::ResourceExhausted
        | C::Unauthenticated
        | C::Aborted
        | C::Unimplemented => Outcome::Refused,
        _ => Outcome::Failed,
    }
}

/// The status name audit records and logs use, e.g. `INVALID_ARGUMENT`
/// (one table, shared with the metrics' `code` label).
fn code_name(code: tonic::Code) -> &'static str {
    crate::metrics::CODE_NAMES
        .get(code as usize)
        .copied()
        .unwrap_or("UNKNOWN")
}

fn header_text(header: &Option<MetadataValue<tonic::metadata::Ascii>>) -> &str {
    header.as_ref().and_then(|h| h.to_str().ok()).unwrap_or("")
}

fn audit_unavailable(e: &crate::audit::AuditError) -> Status {
    tracing::error!(error = %e, "audit log unavailable: request refused (fail closed)");
    Status::unavailable("the audit log cannot be written; coffre refuses service until it can")
}

impl Api {
    /// Starts the record of a request: its id, the caller (or why it has
    /// none) and its role.
    pub(super) fn begin<T>(
        &self,
        op: Operation,
        request: &Request<T>,
    ) -> (RequestAudit, Result<Caller, Status>) {
        let mut caller = principal_of(request, &self.principals);
        let (principal, role) = match &caller {
            Ok(c) => (
                c.principal.clone(),
                self.kms.role_of(c).map(|r| r.as_str().to_string()),
            ),
            Err(_) => (String::new(), None),
        };
        let request_id = self.request_ids.next();
        // A debug span: building one costs as much as a whole unwrap, so it
        // exists only when debug logs are on (`RUST_LOG=coffre=debug`);
        // `finish` names the request id on every failed request anyway.
        let span = tracing::debug_span!("request", request_id = %request_id, rpc = op.name());
        let entry = AuditEntry {
            request_id,
            principal,
            role,
            operation: op.name().to_string(),
            ..empty_entry()
        };
        // Fail closed before acting: while the log cannot be written, no
        // operation runs (only the request during which it failed may have
        // taken effect; its caller got UNAVAILABLE).
        if caller.is_ok() && !self.audit.is_healthy() {
            caller = Err(Status::unavailable(
                "the audit log cannot be written; coffre refuses service until it can",
            ));
        }
        let audit = RequestAudit {
            entry,
            audit: Arc::clone(&self.audit),
            op,
            started: Instant::now(),
            span,
            recorded: false,
        };
        (audit, caller)
    }

    /// Writes the record with the request's outcome, then returns the
    /// response, or `UNAVAILABLE` if the record could not be written.
    pub(super) async fn finish<T>(
        &self,
        mut audit: RequestAudit,
        result: Result<T, Status>,
    ) -> Result<Response<T>, Status> {
        let code = match &result {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        audit.set_result(code);
        let header = MetadataValue::try_from(audit.entry.request_id.as_str()).ok();
        let (op, started, span) = (audit.op, audit.started, audit.span.clone());
        let entry = std::mem::replace(&mut audit.entry, empty_entry());
        // Queued by `record` before its first await: from here on, the record
        // is written even if this future is dropped.
        audit.recorded = true;
        drop(audit);
        let written = self.audit.record(entry).await;
        let code = if written.is_ok() {
            code
        } else {
            tonic::Code::Unavailable
        };
        let elapsed = started.elapsed();
        self.metrics.request(op, code as usize, elapsed);
        let elapsed_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        if outcome_of(code) == Outcome::Failed {
            // What failed was logged where it failed; this line ties it to
            // the request id the caller and the audit record hold.
            tracing::warn!(
                request_id = %header_text(&header),
                rpc = op.name(),
                code = code_name(code),
                elapsed_us,
                "request failed"
            );
        } else {
            span.in_scope(|| tracing::debug!(code = code_name(code), elapsed_us, "request done"));
        }
        if let Err(e) = written {
            let mut status = span.in_scope(|| audit_unavailable(&e));
            if let Some(h) = header {
                status.metadata_mut().insert(REQUEST_ID_HEADER, h);
            }
            return Err(status);
        }
        match result {
            Ok(body) => {
                let mut response = Response::new(body);
                if let Some(h) = header {
                    response.metadata_mut().insert(REQUEST_ID_HEADER, h);
                }
                Ok(response)
            }
            Err(mut status) => {
                if let Some(h) = header {
                    status.metadata_mut().insert(REQUEST_ID_HEADER, h);
                }
                Err(status)
            }
        }
    }

    /// For a streaming audit RPC: authorizes `op` and writes the request's
    /// record (allowed or refused) before the stream starts.
    async fn begin_stream<T>(&self, op: Operation, request: &Request<T>) -> Result<(), Status> {
        let (audit, caller) = self.begin(op, request);
        let allowed = caller.and_then(|c| self.kms.authorize_only(&c, op).map_err(status));
        self.finish(audit, allowed).await.map(|_| ())
    }
}

fn outcome_to_pb(o: Outcome) -> pb::AuditOutcome {
    match o {
        Outcome::Allowed => pb::AuditOutcome::Allowed,
        Outcome::Refused => pb::AuditOutcome::Refused,
        Outcome::Failed => pb::AuditOutcome::Failed,
    }
}

fn outcome_from_pb(raw: i32) -> Result<Option<Outcome>, Status> {
    match pb::AuditOutcome::try_from(raw) {
        Ok(pb::AuditOutcome::Unspecified) => Ok(None),
        Ok(pb::AuditOutcome::Allowed) => Ok(Some(Outcome::Allowed)),
        Ok(pb::AuditOutcome::Refused) => Ok(Some(Outcome::Refused)),
        Ok(pb::AuditOutcome::Failed) => Ok(Some(Outcome::Failed)),
        Err(_) => Err(Status::invalid_argument(format!("unknown outcome {raw}"))),
    }
}

fn time_from_pb(
    field: &str,
    t: Option<prost_types::Timestamp>,
) -> Result<Option<Timestamp>, Status> {
    let Some(t) = t else { return Ok(None) };
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(Status::invalid_argument(format!(
            "{field}: invalid timestamp"
        )));
    }
    t.seconds
        .checked_mul(1000)
        .and_then(|ms| ms.checked_add(i64::from(t.nanos / 1_000_000)))
        .map(|ms| Some(Timestamp(ms)))
        .ok_or_else(|| Status::invalid_argument(format!("{field}: timestamp out of range")))
}

pub(super) fn event_to_pb(r: AuditRecord) -> pb::AuditEvent {
    let json = serde_json::to_string(&r).unwrap_or_default();
    pb::AuditEvent {
        seq: r.seq,
        time: Some(convert::timestamp(r.time)),
        request_id: r.request_id,
        principal: r.principal,
        role: r.role.unwrap_or_default(),
        operation: r.operation,
        key_id: r.key_id.unwrap_or_default(),
        key_version: r.key_version,
        context_digest: r.context_digest.unwrap_or_default(),
        justification: r.justification.unwrap_or_default(),
        context: r
            .context
            .map(|c| c.into_iter().collect::<HashMap<_, _>>())
            .unwrap_or_default(),
        detail: r.detail.unwrap_or_default(),
        outcome: outcome_to_pb(r.outcome).into(),
        status_code: r.status_code,
        prev_hash: r.prev_hash,
        hash: r.hash,
        json,
    }
}

fn checkpoint_to_pb(c: Checkpoint) -> pb::AuditCheckpoint {
    let json = serde_json::to_string(&serde_json::json!({ "checkpoint": &c })).unwrap_or_default();
    pb::AuditCheckpoint {
        seq: c.seq,
        head_hash: c.head_hash,
        time: Some(convert::timestamp(c.time)),
        signature: c.signature,
        json,
    }
}

const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

type ChunkStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ExportLogChunk, Status>> + Send>>;
type EventStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::AuditEvent, Status>> + Send>>;

#[tonic::async_trait]
impl AuditService for Api {
    async fn list_events(
        &self,
        request: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        let (mut audit, caller) = self.begin(Operation::ListAuditEvents, &request);
        audit.key(&request.get_ref().key_id);
        let span = audit.span();
        let result = async {
            let caller = caller?;
            self.kms
                .authorize_only(&caller, Operation::ListAuditEvents)
                .map_err(status)?;
            let req = request.into_inner();
            let filter = EventFilter {
                start_time: time_from_pb("start_time", req.start_time)?,
                end_time: time_from_pb("end_time", req.end_time)?,
                key_id: (!req.key_id.is_empty()).then_some(req.key_id),
                principal: (!req.principal.is_empty()).then_some(req.principal),
                operation: (!req.operation.is_empty()).then_some(req.operation),
                outcome: outcome_from_pb(req.outcome)?,
            };
            let limit = match usize::try_from(req.page_size).unwrap_or(usize::MAX) {
                0 => DEFAULT_PAGE,
                n if n > MAX_PAGE => {
                    return Err(Status::invalid_argument(format!(
                        "page_size must be at most {MAX_PAGE}"
                    )));
                }
                n => n,
            };
            let after = if req.page_token.is_empty() {
                0
            } else {
                req.page_token
                    .parse::<u64>()
                    .map_err(|_| Status::invalid_argument("invalid page_token"))?
            };
            let auditor = Arc::clone(&self.audit);
            let page =
                tokio::task::spawn_blocking(move || auditor.list_events(&filter, after, limit))
                    .await
                    .map_err(|e| Status::internal(format!("audit read task failed: {e}")))?
                    .map_err(|e| {
                        tracing::error!(error = %e, "reading the audit log failed");
                        Status::unavailable("the audit log cannot be read")
                    })?;
            Ok(pb::ListEventsResponse {
                events: page.records.into_iter().map(event_to_pb).collect(),
                next_page_token: page
                    .next_after_seq
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
            })
        }
        .instrument(span)
        .await;
        self.finish(audit, result).await
    }

    async fn get_checkpoint(
        &self,
        request: Request<pb::GetCheckpointRequest>,
    ) -> Result<Response<pb::GetCheckpointResponse>, Status> {
        let (audit, caller) = self.begin(Operation::GetAuditCheckpoint, &request);
        let span = audit.span();
        let result = async {
            let caller = caller?;
            self.kms
                .authorize_only(&caller, Operation::GetAuditCheckpoint)
                .map_err(status)?;
            let checkpoint = self.audit.checkpoint().await.map_err(|e| {
                tracing::error!(error = %e, "audit checkpoint failed");
                Status::unavailable("the audit log cannot be written")
            })?;
            Ok(pb::GetCheckpointResponse {
                checkpoint: checkpoint.map(checkpoint_to_pb),
                public_key_pem: self.audit.public_key_pem(),
            })
        }
        .instrument(span)
        .await;
        self.finish(audit, result).await
    }

    type ExportLogStream = ChunkStream;

    async fn export_log(
        &self,
        request: Request<pb::ExportLogRequest>,
    ) -> Result<Response<Self::ExportLogStream>, Status> {
        self.begin_stream(Operation::ExportAuditLog, &request)
            .await?;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let auditor = Arc::clone(&self.audit);
        tokio::task::spawn_blocking(move || {
            let result = auditor.export(256 * 1024, |data| {
                tx.blocking_send(Ok(pb::ExportLogChunk { data })).is_ok()
            });
            if let Err(e) = result {
                tracing::error!(error = %e, "audit export failed");
                let _ = tx.blocking_send(Err(Status::unavailable("the audit log cannot be read")));
            }
        });
        Ok(Response::new(
            Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)) as ChunkStream,
        ))
    }

    type TailEventsStream = EventStream;

    async fn tail_events(
        &self,
        request: Request<pb::TailEventsRequest>,
    ) -> Result<Response<Self::TailEventsStream>, Status> {
        self.begin_stream(Operation::TailAuditEvents, &request)
            .await?;
        let mut after = request.get_ref().after_seq;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let auditor = Arc::clone(&self.audit);
        let mut head = auditor.subscribe();
        let mut closing = auditor.closing();
        tokio::spawn(async move {
            loop {
                let reader = Arc::clone(&auditor);
                let page = tokio::task::spawn_blocking(move || {
                    reader.list_events(&EventFilter::default(), after, MAX_PAGE)
                })
                .await;
                let page = match page {
                    Ok(Ok(page)) => page,
                    _ => {
                        let _ = tx
                            .send(Err(Status::unavailable("the audit log cannot be read")))
                            .await;
                        return;
                    }
                };
                let more = page.next_after_seq.is_some();
                for record in page.records {
                    after = record.seq;
                    if tx.send(Ok(event_to_pb(record))).await.is_err() {
                        return; // the client went away
                    }
                }
                if let Some(next) = page.next_after_seq {
                    after = after.max(next);
                }
                if !more {
                    tokio::select! {
                        changed = head.changed() => if changed.is_err() { return },
                        _ = closing.wait_for(|c| *c) => return,
                        () = tx.closed() => return,
                    }
                }
            }
        });
        Ok(Response::new(
            Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)) as EventStream,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::RequestIds;

    #[test]
    fn status_names_follow_the_grpc_code_numbers() {
        use super::code_name;
        use tonic::Code;
        for (code, name) in [
            (Code::Ok, "OK"),
            (Code::Cancelled, "CANCELLED"),
            (Code::InvalidArgument, "INVALID_ARGUMENT"),
            (Code::PermissionDenied, "PERMISSION_DENIED"),
            (Code::FailedPrecondition, "FAILED_PRECONDITION"),
            (Code::Unavailable, "UNAVAILABLE"),
            (Code::Unauthenticated, "UNAUTHENTICATED"),
        ] {
            assert_eq!(code_name(code), name);
        }
    }

    #[test]
    fn request_ids_are_distinct_version_4_uuids() {
        let ids = RequestIds::new();
        let other = RequestIds::new();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let id = ids.next();
            let parsed = uuid::Uuid::parse_str(&id).unwrap_or_default();
            assert_eq!(parsed.get_version_num(), 4, "{id}");
            assert_eq!(parsed.get_variant(), uuid::Variant::RFC4122, "{id}");
            assert!(seen.insert(id));
        }
        // Another process start draws another base.
        assert!(!seen.contains(&other.next()));
    }
}
