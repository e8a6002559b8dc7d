//! The read side of the [`super::AuditTrail`]: pages of records
//! (`list_events`) and the raw export.
//!
//! Readers work on a `Snapshot`: a handle on the file and what the writer
//! had acknowledged in it when the read started. They read with positioned
//! reads (`pread`), up to that length, so they never see a torn line and
//! never block the writer. The sparse index (one record in
//! [`super::log::LOG_INDEX_STRIDE`]) lets a page start near its `seq`
//! without reading the whole file.

use std::fs::File;

use super::AuditError;
use super::log::{read_exact_at, record_seq};
use super::record::{AuditRecord, Outcome};
use crate::model::Timestamp;

/// Which records [`super::AuditTrail::list_events`] returns; `None` matches all.
/// `key_id` matches a record's `key_id` (the key's UUID) or its `key_name`
/// (the alias as the caller gave it).
#[derive(Clone, Debug, Default)]
pub struct EventFilter {
    pub start_time: Option<Timestamp>,
    pub end_time: Option<Timestamp>,
    pub key_id: Option<String>,
    pub principal: Option<String>,
    pub operation: Option<String>,
    pub outcome: Option<Outcome>,
}

impl EventFilter {
    fn matches(&self, r: &AuditRecord) -> bool {
        self.start_time.is_none_or(|t| r.time >= t)
            && self.end_time.is_none_or(|t| r.time < t)
            && self
                .key_id
                .as_ref()
                .is_none_or(|k| r.key_id.as_ref() == Some(k) || r.key_name.as_ref() == Some(k))
            && self.principal.as_ref().is_none_or(|p| &r.principal == p)
            && self.operation.as_ref().is_none_or(|o| &r.operation == o)
            && self.outcome.is_none_or(|o| r.outcome == o)
    }
}

/// A page of [`super::AuditTrail::list_events`].
#[derive(Clone, Debug, Default)]
pub struct EventPage {
    pub records: Vec<AuditRecord>,
    /// Pass as `after_seq` for the next page; `None` at the end of the log.
    pub next_after_seq: Option<u64>,
}

/// Records examined per page at most, so that a selective filter over a
/// large log answers in bounded time (with a short page and a token).
const SCAN_LIMIT: u64 = 100_000;

/// The record bytes after which a page ends (see `list_events`).
const PAGE_BYTES: usize = 1 << 20;

/// The log as a reader sees it: a file handle and the writer's view of it,
/// taken together so that a concurrent prune (which replaces the file)
/// cannot mix them.
#[derive(Debug)]
pub(super) struct Snapshot {
    pub(super) file: File,
    /// Length of the acknowledged content (a line boundary).
    pub(super) len: u64,
    /// (seq, offset of its line) of the indexed records, ascending.
    pub(super) index: Vec<(u64, u64)>,
    pub(super) last_seq: u64,
}

impl Snapshot {
    /// Records after `after_seq` that pass `filter`, at most `limit`, in
    /// `seq` order (at most [`SCAN_LIMIT`] examined).
    pub(super) fn list_events(
        &self,
        filter: &EventFilter,
        after_seq: u64,
        limit: usize,
    ) -> Result<EventPage, AuditError> {
        // Start at the last indexed record at or before `after_seq + 1`.
        let target = after_seq.saturating_add(1);
        let start = self
            .index
            .iter()
            .rev()
            .find(|(seq, _)| *seq <= target)
            .map_or(0, |(_, offset)| *offset);
        let mut page = EventPage::default();
        let mut scanned = 0u64;
        let mut bytes = 0usize;
        let mut last_seen = after_seq;
        let mut reader = LineReader::new(&self.file, start, self.len);
        while let Some(line) = reader.next_line()? {
            let Some(seq) = record_seq(line) else {
                continue; // a checkpoint
            };
            if seq <= after_seq {
                continue;
            }
            let record: AuditRecord = serde_json::from_slice(line)
                .map_err(|e| AuditError::Encode(format!("record {seq}: {e}")))?;
            last_seen = seq;
            scanned += 1;
            if filter.matches(&record) {
                page.records.push(record);
                bytes = bytes.saturating_add(line.len());
                // A page also stops at PAGE_BYTES of records (a BatchDecrypt
                // record lists up to 1,000 items), so that it stays well
                // under a gRPC message's 4 MiB however large its records.
                if page.records.len() >= limit || bytes >= PAGE_BYTES {
                    break;
                }
            }
            if scanned >= SCAN_LIMIT {
                break;
            }
        }
        if last_seen < self.last_seq {
            page.next_after_seq = Some(last_seen);
        }
        Ok(page)
    }

    /// The acknowledged content, in chunks of at most `chunk` bytes passed
    /// to `sink`, until it returns `false`; the bytes passed.
    pub(super) fn export(
        &self,
        chunk: usize,
        mut sink: impl FnMut(Vec<u8>) -> bool,
    ) -> Result<u64, AuditError> {
        let mut offset = 0u64;
        while offset < self.len {
            let n = usize::try_from((self.len - offset).min(chunk as u64)).unwrap_or(chunk);
            let mut buf = vec![0u8; n];
            read_exact_at(&self.file, &mut buf, offset)?;
            offset += n as u64;
            if !sink(buf) {
                break;
            }
        }
        Ok(offset)
    }
}

/// Reads lines from `[start, end)` of a file with positioned reads.
struct LineReader<'a> {
    file: &'a File,
    offset: u64,
    end: u64,
    buf: Vec<u8>,
    pos: usize,
    line: Vec<u8>,
}

impl<'a> LineReader<'a> {
    fn new(file: &'a File, start: u64, end: u64) -> Self {
        Self {
            file,
            offset: start,
            end,
            buf: Vec::new(),
            pos: 0,
            line: Vec::new(),
        }
    }

    /// The next complete line, without its `\n`.
    fn next_line(&mut self) -> Result<Option<&[u8]>, AuditError> {
        self.line.clear();
        loop {
            let rest = self.buf.get(self.pos..).unwrap_or_default();
            if let Some(i) = rest.iter().position(|&b| b == b'\n') {
                self.line
                    .extend_from_slice(rest.get(..i).unwrap_or_default());
                self.pos += i + 1;
                return Ok(Some(&self.line));
            }
            self.line.extend_from_slice(rest);
            self.pos = self.buf.len();
            if self.offset >= self.end {
                // The acknowledged content ends with `\n`: nothing is left.
                return Ok(None);
            }
            let n = usize::try_from((self.end - self.offset).min(256 * 1024)).unwrap_or(0);
            self.buf.resize(n, 0);
            read_exact_at(self.file, &mut self.buf, self.offset)?;
            self.offset += n as u64;
            self.pos = 0;
        }
    }
}
