//! What happens to a request: the one path every front (gRPC today, the
//! XKS HTTP/JSON API next) sends each request through. It knows no
//! transport.
//!
//! ```text
//!  front                     Pipeline::handle                                  core
//!  ─────                     ────────────────                                  ────
//!  wire → RequestFacts ──▶ 0. the rate limit, before anything else: one token
//!   (caller from the          (a batch: one per item), from the caller's bucket
//!    TLS identity or the      or, without a principal, the shared one
//!    front's credential)   1. a request id (RequestIds: no system call)
//!                          2. the audit record opened: id, principal, role,
//!                             operation, and what the request names before
//!                             any validation (key, justification, blob header)
//!                          3. fail closed: while the audit log cannot be
//!                             written, without a caller, or over its rate
//!                             limit, the body never runs
//!                          4. the body: the front's conversions and one  ──▶ Kms (role,
//!                             call into the core, noting what it resolves        policy,
//!                             (key and version, context digest, detail)          state, work)
//!                          5. the outcome: the error mapped once to a code
//!                             and a message safe to show (outcome.rs)
//!                          6. the record written, then metrics and logs;
//!                             a record that cannot be written turns the
//!                             answer into UNAVAILABLE
//!  Reply → wire     ◀──── 7. the reply, with its request id
//! ```
//!
//! Invariant: **exactly one audit record per request, before its
//! response — except rate-limit refusals, which are counted.** The first
//! refusal of a (principal, operation) in a second is recorded like any
//! request; the further ones in that second are counted and written as one
//! record whose `detail` holds the count (`refusals.rs`), when the second
//! closes or at the next refusal after it, and at shutdown at the latest
//! ([`Pipeline::flush_refusals`]). A front cannot answer without a [`Reply`], and only
//! [`Open::run`] makes one, after step 6. A request whose future is
//! dropped half-way (the caller cancelled, its deadline passed, its
//! connection closed) is recorded by [`RequestAudit`]'s `Drop` as
//! `CANCELLED`. Records never hold key material; the encryption context
//! appears as an HMAC digest (clear values only for the keys listed in
//! `audit.clear_context_keys`).
//!
//! Requests refused before the core (a malformed field, a certificate
//! without a principal) are recorded the same way. Health checks and
//! reflection carry no key operation and are not recorded; a TLS handshake
//! refused for lack of a valid client certificate never becomes a request.

mod ids;
mod outcome;
mod record;
mod refusals;

use std::sync::Arc;

use tracing::Instrument;

pub use ids::RequestIds;
pub use outcome::{Cause, Code, Failure};
pub use record::{ABANDONED, RequestAudit};
pub use refusals::coalesced_detail;

use crate::audit::{AuditEntry, AuditTrail, Outcome};
use crate::authz::{Caller, Operation};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::model::AccessReason;
use crate::service::Kms;

/// The shared state of the request path: the core, the audit log, the
/// request counters. One per server, shared by every front.
#[derive(Debug)]
pub struct Pipeline {
    kms: Arc<Kms>,
    audit: Arc<AuditTrail>,
    metrics: Arc<Metrics>,
    ids: RequestIds,
    refusals: refusals::Refusals,
}

/// What a front knows of a request before its body runs.
#[derive(Debug)]
pub struct RequestFacts<'a> {
    /// Who calls, as the front authenticated it, or why it could not.
    pub caller: Result<Caller, Failure>,
    /// The key the request names, as typed (empty: none).
    pub key: &'a str,
    /// The justification the request gives: a known reason, or the raw
    /// number of an unknown one.
    pub justification: Option<Result<AccessReason, i32>>,
    /// A wrapped key whose header names the key and version (not yet
    /// authenticated: what the caller presented).
    pub blob: Option<&'a [u8]>,
    /// How many items the request carries, as the caller sent them (1
    /// unless a batch; a batch of 0 counts as 1): what the rate limit
    /// charges.
    pub items: u32,
}

impl RequestFacts<'_> {
    /// A request from `caller` that names nothing yet.
    pub fn new(caller: Result<Caller, Failure>) -> Self {
        Self {
            caller,
            key: "",
            justification: None,
            blob: None,
            items: 1,
        }
    }
}

/// The answer to a request, once its record is written.
#[derive(Debug)]
#[must_use]
pub struct Reply<T> {
    /// The id the request's audit record carries; fronts return it to the
    /// caller (gRPC: the `x-request-id` header).
    pub request_id: String,
    pub result: Result<T, Failure>,
}

/// A request whose record is open and whose body has not run yet.
#[derive(Debug)]
#[must_use]
pub struct Open {
    pipeline: Arc<Pipeline>,
    audit: RequestAudit,
    caller: Result<Caller, Failure>,
    /// A rate-limit refusal counted in a coalesced record: it gets no
    /// record of its own.
    counted: bool,
}

impl Pipeline {
    pub fn new(kms: Arc<Kms>, audit: Arc<AuditTrail>, metrics: Arc<Metrics>) -> Self {
        Self {
            kms,
            audit,
            metrics,
            ids: RequestIds::new(),
            refusals: refusals::Refusals::default(),
        }
    }

    pub fn kms(&self) -> &Arc<Kms> {
        &self.kms
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Writes the coalesced records of the rate-limit windows that have
    /// closed (`all`: of every window, at shutdown). Servers call it a few
    /// times a second and once when they stop, before the audit log closes.
    pub fn flush_refusals(&self, all: bool) {
        for closed in self.refusals.due(std::time::Instant::now(), all) {
            self.write_coalesced(closed);
        }
    }

    fn write_coalesced(&self, closed: refusals::Coalesced) {
        let entry = AuditEntry {
            request_id: self.ids.next(),
            principal: closed.principal,
            role: closed.role,
            operation: closed.op.name().to_string(),
            detail: Some(coalesced_detail(closed.count)),
            outcome: Code::ResourceExhausted.outcome(),
            status_code: Code::ResourceExhausted.name().to_string(),
            ..AuditEntry::empty()
        };
        self.audit.record_detached(entry);
    }

    /// Runs one request: opens its record, runs `body` with the caller and
    /// the record (unless the request is refused first), maps the error,
    /// writes the record and only then returns the reply.
    pub async fn handle<T>(
        self: &Arc<Self>,
        op: Operation,
        facts: RequestFacts<'_>,
        body: impl AsyncFnOnce(&Caller, &mut RequestAudit) -> Result<T, Error>,
    ) -> Reply<T> {
        self.open(op, facts).run(body).await
    }

    /// Steps 1–3 alone, for a front that must know whether a request is
    /// refused before it decides how to answer (a stream that runs on after
    /// the handler returns). [`Open::run`] completes it.
    pub fn open(self: &Arc<Self>, op: Operation, facts: RequestFacts<'_>) -> Open {
        // Step 0: the rate limit, before anything else is done for the
        // request (not even a request id).
        let batch = matches!(
            op,
            Operation::BatchGenerateDataKey | Operation::BatchDecrypt
        );
        let admitted = self.kms.admit(
            facts.caller.as_ref().ok().map(|c| c.principal.as_str()),
            facts.items,
            batch,
        );
        let (principal, role) = match &facts.caller {
            Ok(c) => (
                c.principal.clone(),
                self.kms.role_of(c).map(|r| r.as_str().to_string()),
            ),
            Err(_) => (String::new(), None),
        };
        let request_id = self.ids.next();
        // A debug span: building one costs as much as a whole unwrap, so it
        // exists only when debug logs are on (`RUST_LOG=coffre=debug`); a
        // failed request is logged with its request id anyway.
        let span = tracing::debug_span!("request", request_id = %request_id, rpc = op.name());
        let entry = AuditEntry {
            request_id,
            principal,
            role,
            operation: op.name().to_string(),
            ..AuditEntry::empty()
        };
        let mut audit = RequestAudit::new(entry, Arc::clone(&self.audit), op, span);
        audit.named_key(facts.key);
        if let Some(reason) = facts.justification {
            audit.justification(reason);
        }
        if let Some(blob) = facts.blob {
            audit.blob(blob);
        }
        let mut caller = facts.caller;
        let mut counted = false;
        if let Err(refused) = admitted {
            let named = caller.as_ref().ok().map(|c| c.principal.as_str());
            let failure = Failure::new(Code::ResourceExhausted, refused.message(named));
            let (verdict, closed) = self.refusals.refuse(
                audit.principal(),
                audit.role(),
                op,
                std::time::Instant::now(),
            );
            if let Some(closed) = closed {
                self.write_coalesced(closed);
            }
            counted = verdict == refusals::Verdict::Counted;
            if !counted {
                tracing::warn!(
                    principal = audit.principal(),
                    operation = op.name(),
                    "rate limit exceeded"
                );
            }
            caller = Err(failure);
        }
        // Fail closed before acting: while the log cannot be written, no
        // operation runs (only the request during which it failed may have
        // taken effect; its caller got UNAVAILABLE).
        if caller.is_ok() && !self.audit.is_healthy() {
            caller = Err(Failure::audit_unwritable());
        }
        Open {
            pipeline: Arc::clone(self),
            audit,
            caller,
            counted,
        }
    }

    /// Writes the record with the request's outcome, counts it, logs a
    /// failure; the reply is `UNAVAILABLE` if the record was not written.
    async fn close<T>(&self, mut audit: RequestAudit, result: Result<T, Failure>) -> Reply<T> {
        // Refused before the core resolved the alias: the record still
        // names the key by its id (for auditors; the answer is unchanged).
        if let Some(alias) = audit.unresolved_alias() {
            if let Some(id) = self.kms.key_id_for_audit(alias).await {
                audit.resolved_key(id, None);
            }
        }
        let code = match &result {
            Ok(_) => Code::Ok,
            Err(f) => f.code(),
        };
        let (op, started, span) = (audit.op(), audit.started(), audit.span());
        // Queued before the first await: from here on, the record is
        // written even if this future is dropped.
        let entry = audit.finish(code);
        let request_id = entry.request_id.clone();
        let written = self.audit.record(entry).await;
        let code = if written.is_ok() {
            code
        } else {
            Code::Unavailable
        };
        let elapsed = started.elapsed();
        self.metrics.request(op, code as usize, elapsed);
        let elapsed_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        if code.outcome() == Outcome::Failed {
            // What failed was logged where it failed; this line ties it to
            // the request id the caller and the audit record hold.
            tracing::warn!(
                request_id = %request_id,
                rpc = op.name(),
                code = code.name(),
                elapsed_us,
                "request failed"
            );
        } else {
            span.in_scope(|| tracing::debug!(code = code.name(), elapsed_us, "request done"));
        }
        let result = match written {
            Ok(_) => result,
            Err(e) => Err(span.in_scope(|| {
                tracing::error!(error = %e, "audit log unavailable: request refused (fail closed)");
                Failure::audit_unwritable()
            })),
        };
        Reply { request_id, result }
    }
}

impl Open {
    /// Whether the body will not run (no caller, or the audit log cannot
    /// be written).
    pub fn is_refused(&self) -> bool {
        self.caller.is_err()
    }

    /// Steps 4–7: the body (unless refused), the outcome, the record, the
    /// reply.
    pub async fn run<T>(
        mut self,
        body: impl AsyncFnOnce(&Caller, &mut RequestAudit) -> Result<T, Error>,
    ) -> Reply<T> {
        if self.counted {
            // A refusal counted in its window's coalesced record: no record
            // of its own, no log line (the first refusal of the window had
            // both).
            let (op, started) = (self.audit.op(), self.audit.started());
            let request_id = self.audit.discard();
            self.pipeline
                .metrics
                .request(op, Code::ResourceExhausted as usize, started.elapsed());
            let result = match self.caller {
                Err(refused) => Err(refused),
                Ok(_) => Err(Failure::new(Code::ResourceExhausted, "rate limit exceeded")),
            };
            return Reply { request_id, result };
        }
        let result = match &self.caller {
            Ok(caller) => {
                let span = self.audit.span();
                body(caller, &mut self.audit)
                    .instrument(span)
                    .await
                    .map_err(Failure::from)
            }
            Err(refused) => Err(refused.clone()),
        };
        self.pipeline.close(self.audit, result).await
    }
}
