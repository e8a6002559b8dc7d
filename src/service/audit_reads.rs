//! The audit log's read side, for auditors. The log is written by the
//! request pipeline (one record per request, `crate::pipeline`); it is read
//! through the core so that reads are authorized here, like every other
//! operation: its role (the pipeline charged the rate limit before).

use std::sync::Arc;

use tokio::sync::watch;

use super::Kms;
use crate::audit::{AuditTrail, Checkpoint, EventFilter, EventPage};
use crate::authz::{Caller, Operation};
use crate::error::{Error, Result};

/// Records per page when the caller does not say.
pub const DEFAULT_AUDIT_PAGE: usize = 100;
/// Records per page at most.
pub const MAX_AUDIT_PAGE: usize = 1000;

/// The newest signed checkpoint and the key that verifies it.
#[derive(Debug)]
pub struct AuditCheckpoint {
    /// `None` while the log holds no record yet.
    pub checkpoint: Option<Checkpoint>,
    pub public_key_pem: String,
}

/// Read access to the audit log, handed out to an authorized caller for a
/// read that outlives one call (an export, a tail). It can only read.
#[derive(Debug, Clone)]
pub struct AuditReader {
    log: Arc<AuditTrail>,
}

impl AuditReader {
    /// Records after `after_seq` that pass `filter`, at most `limit`.
    pub async fn list_events(
        &self,
        filter: EventFilter,
        after_seq: u64,
        limit: usize,
    ) -> Result<EventPage> {
        let log = Arc::clone(&self.log);
        tokio::task::spawn_blocking(move || log.list_events(&filter, after_seq, limit))
            .await
            .map_err(|e| Error::Internal(format!("audit read task failed: {e}")))?
            .map_err(Error::AuditUnreadable)
    }

    /// The log's acknowledged content in chunks of at most `chunk` bytes
    /// passed to `sink`, until it returns `false`. Blocking: call it off
    /// the async runtime.
    pub fn export(&self, chunk: usize, sink: impl FnMut(Vec<u8>) -> bool) -> Result<u64> {
        self.log.export(chunk, sink).map_err(Error::AuditUnreadable)
    }

    /// Changes to the log's last seq (for following it).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.log.subscribe()
    }

    /// Turns `true` when the server shuts down and followers must stop.
    pub fn closing(&self) -> watch::Receiver<bool> {
        self.log.closing()
    }
}

impl Kms {
    /// Gives the core the audit log to read from (once, at assembly: the
    /// log is opened with keys the core provides, so it comes after it).
    pub fn attach_audit_log(&self, log: Arc<AuditTrail>) {
        if self.audit_log.set(log).is_err() {
            tracing::warn!("the audit log was attached twice; keeping the first");
        }
    }

    fn audit_reader_unchecked(&self) -> Result<AuditReader> {
        let log = self
            .audit_log
            .get()
            .ok_or_else(|| Error::Internal("the audit log is not attached to the core".into()))?;
        Ok(AuditReader {
            log: Arc::clone(log),
        })
    }

    /// `ListAuditEvents`: a page of records after `after_seq` that pass
    /// `filter`; `page_size` 0 means [`DEFAULT_AUDIT_PAGE`].
    pub async fn list_audit_events(
        &self,
        caller: &Caller,
        filter: EventFilter,
        after_seq: u64,
        page_size: usize,
    ) -> Result<EventPage> {
        self.authorize(caller, Operation::ListAuditEvents)?;
        let limit = match page_size {
            0 => DEFAULT_AUDIT_PAGE,
            n if n > MAX_AUDIT_PAGE => {
                return Err(Error::InvalidArgument(format!(
                    "page_size must be at most {MAX_AUDIT_PAGE}"
                )));
            }
            n => n,
        };
        self.audit_reader_unchecked()?
            .list_events(filter, after_seq, limit)
            .await
    }

    /// `GetAuditCheckpoint`: signs a checkpoint over the records written so
    /// far (if any is new) and returns it with the public key.
    pub async fn audit_checkpoint(&self, caller: &Caller) -> Result<AuditCheckpoint> {
        self.authorize(caller, Operation::GetAuditCheckpoint)?;
        let reader = self.audit_reader_unchecked()?;
        let checkpoint = reader
            .log
            .checkpoint()
            .await
            .map_err(Error::AuditUnwritable)?;
        Ok(AuditCheckpoint {
            checkpoint,
            public_key_pem: reader.log.public_key_pem(),
        })
    }

    /// `ExportAuditLog` and `TailAuditEvents`: read access for a stream.
    pub fn audit_reader(&self, caller: &Caller, op: Operation) -> Result<AuditReader> {
        if !matches!(op, Operation::ExportAuditLog | Operation::TailAuditEvents) {
            return Err(Error::Internal(format!(
                "{} is not an audit stream",
                op.name()
            )));
        }
        self.authorize(caller, op)?;
        self.audit_reader_unchecked()
    }
}
