//! The append-only writer: [`AuditLog`] over one JSON-lines file.
//!
//! Opening verifies the whole existing file with the offline verifier
//! ([`mod@super::verify`]) and truncates a torn last line; appends are written
//! in batches (one `write`, and in `fsync` mode one `fsync`, per batch),
//! with the signed checkpoints ([`super::checkpoint`]) the policy asks for
//! between the records; a failed write poisons the log until the file is
//! truncated back to its acknowledged length ([`AuditLog::recover`]);
//! retention rewrites the file to start from a signed anchor checkpoint
//! ([`AuditLog::prune`]).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::AuditError;
use super::checkpoint::{Checkpoint, CheckpointLine, CheckpointSigner, new_log_id};
use super::record::{AuditEntry, AuditRecord};
use super::verify::{VerifyFailure, verify, verify_with_checkpoints};
use crate::model::{Clock, SystemClock, Timestamp};

/// When an append is acknowledged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// The line has been handed to the OS (`write_all`): it survives a crash
    /// of coffre, not of the machine.
    #[default]
    Write,
    /// Also `sync_data` before returning: it survives a power loss.
    Fsync,
}

/// When a checkpoint is written: after `every_records` records since the
/// last one, or when `every` has passed since the last one (checked on
/// append, so an idle log writes none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointPolicy {
    pub every_records: u64,
    pub every: Duration,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        Self {
            every_records: 1000,
            every: Duration::from_secs(60),
        }
    }
}

/// Where the writer reports each checkpoint once it is durable in the log,
/// so that coffre remembers the highest checkpoint it has signed outside
/// the log (in its store: `server::audit`), and refuses to start on a log
/// that is behind it.
pub trait HighWaterMark: Send + Sync + fmt::Debug {
    /// `checkpoint` is durable in the log: remember it. Must not block (it
    /// is called by whoever syncs the checkpoint: the writer of the batch,
    /// or the trail's writer thread when syncs are deferred).
    fn remember(&self, checkpoint: &Checkpoint);
    /// `seq` of the last checkpoint durably remembered, if any.
    fn remembered(&self) -> Option<u64>;
}

/// Who is told of each checkpoint once it is durable in the log (a node of
/// a cluster queues it for publication: `cluster::audit`). Must not block:
/// it is called where [`HighWaterMark::remember`] is.
pub trait CheckpointObserver: Send + Sync + fmt::Debug {
    fn checkpointed(&self, checkpoint: &Checkpoint);
}

#[derive(Clone, Debug)]
pub struct AuditLogOptions {
    /// The node this log belongs to, in a cluster: its checkpoints are of
    /// version 3 and name it ([`super::checkpoint`]). `None`, a single
    /// node: version 2. A log whose checkpoints name a node opens only with
    /// that node ([`AuditError::WrongNode`]).
    pub node: Option<String>,
    /// Told of each checkpoint once it is durable.
    pub observer: Option<Arc<dyn CheckpointObserver>>,
    pub durability: Durability,
    pub checkpoints: CheckpointPolicy,
    pub clock: Arc<dyn Clock>,
    /// Where checkpoints are remembered. With one, the writer signs a new
    /// checkpoint only once the previous one is remembered, so the mark is
    /// never more than one checkpoint behind the log.
    pub mark: Option<Arc<dyn HighWaterMark>>,
    /// The highest checkpoint remembered (from the store, at start): the
    /// log must contain it or extend past it ([`AuditError::BehindMark`]),
    /// and may be at most one checkpoint ahead of it
    /// ([`AuditError::MarkRolledBack`]).
    pub high_water: Option<Checkpoint>,
}

impl Default for AuditLogOptions {
    fn default() -> Self {
        Self {
            node: None,
            observer: None,
            durability: Durability::default(),
            checkpoints: CheckpointPolicy::default(),
            clock: Arc::new(SystemClock),
            mark: None,
            high_water: None,
        }
    }
}

/// A checkpoint written to the log and not yet synced: in `write` mode with
/// a mark, the `fsync` that must come before the mark remembers it is left
/// to whoever takes this ([`AuditLog::take_checkpoint_sync`]: the trail's
/// writer thread), so that the request whose batch carried the checkpoint
/// does not wait for the disk, and neither does its thread's other work.
/// Until it is completed, no further checkpoint is signed (the mark is
/// behind the log's last checkpoint).
#[derive(Debug)]
pub struct CheckpointSync {
    /// The log's file (another descriptor of it): syncing it makes the
    /// checkpoint's line durable, with everything before it.
    file: File,
    checkpoint: Checkpoint,
    mark: Option<Arc<dyn HighWaterMark>>,
    observer: Option<Arc<dyn CheckpointObserver>>,
}

impl CheckpointSync {
    /// The checkpoint's `seq`.
    pub fn seq(&self) -> u64 {
        self.checkpoint.seq
    }

    /// Syncs the log, then tells the mark and the observer. On `Err` nobody
    /// is told; the caller keeps it to try again (no other checkpoint is
    /// signed meanwhile).
    pub fn complete(&self) -> std::io::Result<()> {
        self.file.sync_data()?;
        durable(self.mark.as_ref(), self.observer.as_ref(), &self.checkpoint);
        Ok(())
    }
}

/// `checkpoint` is durable in the log: the mark remembers it, then the
/// observer is told.
fn durable(
    mark: Option<&Arc<dyn HighWaterMark>>,
    observer: Option<&Arc<dyn CheckpointObserver>>,
    checkpoint: &Checkpoint,
) {
    if let Some(mark) = mark {
        mark.remember(checkpoint);
    }
    if let Some(observer) = observer {
        observer.checkpointed(checkpoint);
    }
}

/// One record in [`LOG_INDEX_STRIDE`] is indexed by the byte offset of its
/// line, so that a reader can start a scan near any `seq`.
pub const LOG_INDEX_STRIDE: u64 = 256;

/// What [`AuditLog::prune`] removed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PruneReport {
    /// Records removed (`seq` 1..=`anchor.seq`, or from the previous anchor).
    pub removed_records: u64,
    /// The checkpoint the log now starts from.
    pub anchor: Checkpoint,
}

/// The append-only writer over one JSON-lines file. Holds an exclusive
/// advisory lock on the file while open. Not internally synchronized: one
/// writer (the [`super::AuditTrail`]'s thread) owns it.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: File,
    /// Shared with the trail, which signs cluster digests with it.
    signer: Arc<CheckpointSigner>,
    options: AuditLogOptions,
    /// The log's identity: from its checkpoints, or drawn at random for a
    /// log that has no version 2 checkpoint yet.
    log_id: String,
    /// `seq` of the last record (0 when empty).
    seq: u64,
    head_hash: String,
    since_checkpoint: u64,
    last_checkpoint_time: Timestamp,
    last_checkpoint: Option<Checkpoint>,
    /// Bytes of complete, acknowledged lines: the file's length after the
    /// last successful write.
    len: u64,
    /// (seq, offset of its line) for every record whose `seq` is 1 modulo
    /// [`LOG_INDEX_STRIDE`]; ascending.
    index: Vec<(u64, u64)>,
    /// A write failed: the file may hold a torn line after `len`.
    poisoned: bool,
    /// `fsync`s done by appends and checkpoints (group commit makes this
    /// smaller than the number of records).
    syncs: u64,
    /// `write`s of batches and checkpoints since the log was opened.
    writes: u64,
    /// After an external signer failed: no new attempt in an append before
    /// this time (an HSM outage must not cost a timeout per record).
    signing_retry_at: Option<Timestamp>,
    /// Appends leave a checkpoint's `fsync` to [`Self::take_checkpoint_sync`]
    /// (`write` mode with a mark; see [`CheckpointSync`]).
    defer_checkpoint_sync: bool,
    /// The checkpoint an append wrote whose sync is deferred, until taken.
    checkpoint_sync: Option<CheckpointSync>,
    /// Set while an append signs a checkpoint (the signer may be an HSM):
    /// see [`Self::flag_signing`].
    signing: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// The last batch's encoding buffer, reused (audit lines hold nothing
    /// secret).
    scratch: Vec<u8>,
}

/// The largest encoding buffer an append keeps for the next one.
const SCRATCH_KEPT: usize = 64 * 1024;

/// [`AuditLog::signing`] set for as long as this lives.
struct Signing<'a>(Option<&'a std::sync::atomic::AtomicBool>);

impl<'a> Signing<'a> {
    fn start(flag: Option<&'a std::sync::atomic::AtomicBool>) -> Self {
        if let Some(flag) = flag {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        Self(flag)
    }
}

impl Drop for Signing<'_> {
    fn drop(&mut self) {
        if let Some(flag) = self.0 {
            flag.store(false, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// How long appends wait before asking a failed external signer again.
const SIGNING_RETRY: std::time::Duration = std::time::Duration::from_secs(10);

impl AuditLog {
    /// [`Self::open_with`] with default options.
    pub fn open(path: &Path, signer: CheckpointSigner) -> Result<Self, AuditError> {
        Self::open_with(path, signer, AuditLogOptions::default())
    }

    /// Opens or creates the log. The existing content is verified in full
    /// (hashes, chain, checkpoint signatures under `signer`'s public key),
    /// streaming: coffre never appends to a chain it cannot vouch for. A last
    /// line without its `\n` (a write torn by a crash, never acknowledged) is
    /// truncated away with a warning; anything else invalid is an error.
    pub fn open_with(
        path: &Path,
        signer: CheckpointSigner,
        options: AuditLogOptions,
    ) -> Result<Self, AuditError> {
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        if fs2::FileExt::try_lock_exclusive(&file).is_err() {
            return Err(AuditError::Locked);
        }
        let total = file.metadata()?.len();
        let complete = complete_length(&file, total)?;
        if complete < total {
            tracing::warn!(
                file = %path.display(),
                bytes = total - complete,
                "audit log ends in a torn line (a write interrupted by a crash); truncating it"
            );
            file.set_len(complete)?;
            file.sync_data()?;
        }
        let reader = BufReader::new(Read::take(&file, complete));
        // A mark older than the log's anchor (retention pruned past it):
        // the log cannot show it, but must be the same log.
        let mark = match (&options.high_water, first_checkpoint(&file, complete)?) {
            (Some(mark), Some(anchor)) if mark.seq < anchor.seq => {
                if mark.log_id.is_none() || mark.log_id != anchor.log_id {
                    return Err(AuditError::BehindMark(format!(
                        "the audit log {} starts after the last checkpoint coffre signed \
                         (seq {}) and is not the same log: replaced. Restore the log from a \
                         backup or an export and start again",
                        path.display(),
                        mark.seq
                    )));
                }
                None
            }
            (mark, _) => mark.as_ref(),
        };
        let report = match mark {
            None => verify(reader, &signer.public_key(), |_| {})?,
            Some(mark) => verify_with_checkpoints(
                reader,
                &signer.public_key(),
                std::slice::from_ref(mark),
                |_| {},
            )
            .map_err(|e| behind_mark(path, mark, e))?,
        };
        if let (Some(mark), Some(previous)) = (&options.high_water, &report.previous_checkpoint) {
            // The log holds two checkpoints after the mark: the store was
            // written after each of them, so it is an older copy.
            if mark.seq < previous.seq {
                return Err(AuditError::MarkRolledBack(format!(
                    "the store remembers the audit checkpoint at seq {}, but the audit log {} \
                     holds checkpoints at seq {} and {} after it: coffre stores each checkpoint \
                     before it signs the next, so the store was rolled back to an older copy \
                     (restore the current store, or investigate; see SECURITY.md)",
                    mark.seq,
                    path.display(),
                    previous.seq,
                    report.last_checkpoint.as_ref().map_or(0, |c| c.seq),
                )));
            }
        }
        // A single node's log (v1/v2 checkpoints) may join a cluster; a
        // node's log stays that node's.
        match (&report.node, &options.node) {
            (Some(theirs), Some(ours)) if theirs != ours => {
                return Err(AuditError::WrongNode(format!(
                    "the audit log {} is node {theirs}'s (its checkpoints name it), not this \
                     node's ({ours}): each node keeps its own log file",
                    path.display()
                )));
            }
            (Some(theirs), None) => {
                return Err(AuditError::WrongNode(format!(
                    "the audit log {} is node {theirs}'s, of a cluster (its checkpoints name \
                     it); a single node cannot continue it: set cluster.node_id = \"{theirs}\" \
                     or start a new log file",
                    path.display()
                )));
            }
            _ => {}
        }
        let log_id = match &report.log_id {
            Some(id) => id.clone(),
            None => {
                let id = new_log_id()?;
                tracing::info!(file = %path.display(), log_id = %id, "audit log identity drawn (no version 2 checkpoint yet)");
                id
            }
        };
        let index = build_index(&file, complete)?;
        if !existed && options.durability == Durability::Fsync {
            sync_parent_dir(path)?;
        }
        let now = options.clock.now();
        let (since_checkpoint, last_checkpoint_time) = match &report.last_checkpoint {
            Some(cp) => (report.last_seq.saturating_sub(cp.seq), cp.time),
            None => (report.records, now),
        };
        if let (Some(mark), Some(cp)) = (&options.mark, &report.last_checkpoint) {
            // Adopt the log's last checkpoint (a first start with a mark, or
            // a mark one checkpoint behind after a crash).
            if mark.remembered().is_none_or(|s| s < cp.seq) {
                mark.remember(cp);
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            signer: Arc::new(signer),
            options,
            log_id,
            seq: report.last_seq,
            head_hash: report.head_hash,
            since_checkpoint,
            last_checkpoint_time,
            last_checkpoint: report.last_checkpoint,
            len: complete,
            index,
            poisoned: false,
            syncs: 0,
            writes: 0,
            signing_retry_at: None,
            defer_checkpoint_sync: false,
            checkpoint_sync: None,
            signing: None,
            scratch: Vec::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `seq` of the last record (0 for an empty log).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// `hash` of the last record (64 zeros for an empty log).
    pub fn head_hash(&self) -> &str {
        &self.head_hash
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.signer.public_key()
    }

    /// The checkpoint key, for the trail's cluster digests.
    pub(crate) fn signer(&self) -> Arc<CheckpointSigner> {
        Arc::clone(&self.signer)
    }

    /// The log's identity (checkpoint format version 2).
    pub fn log_id(&self) -> &str {
        &self.log_id
    }

    /// Whether a new checkpoint may be signed: without a mark, always; with
    /// one, once the last checkpoint has been remembered.
    fn mark_caught_up(&self) -> bool {
        match (&self.options.mark, &self.last_checkpoint) {
            (Some(mark), Some(cp)) => mark.remembered().is_some_and(|s| s >= cp.seq),
            _ => true,
        }
    }

    /// Length of the acknowledged content, in bytes (always a line boundary).
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// See [`LOG_INDEX_STRIDE`].
    pub fn index(&self) -> &[(u64, u64)] {
        &self.index
    }

    pub fn last_checkpoint(&self) -> Option<&Checkpoint> {
        self.last_checkpoint.as_ref()
    }

    /// Records appended since the last checkpoint.
    pub fn since_checkpoint(&self) -> u64 {
        self.since_checkpoint
    }

    /// When the last checkpoint was written (or the log opened).
    pub fn last_checkpoint_time(&self) -> Timestamp {
        self.last_checkpoint_time
    }

    /// `fsync`s done since the log was opened (`Fsync` mode).
    pub fn syncs(&self) -> u64 {
        self.syncs
    }

    /// `write`s (batches of records, checkpoints) since the log was opened.
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// From now on, an append that writes a checkpoint in `write` mode with
    /// a mark does not sync it: the caller takes it with
    /// [`Self::take_checkpoint_sync`] after every append and completes it
    /// (the trail: on its writer thread). Without a mark, or in `fsync`
    /// mode, nothing changes.
    pub fn defer_checkpoint_syncs(&mut self) {
        self.defer_checkpoint_sync = true;
    }

    /// `flag` is set while an append signs a checkpoint: whoever holds the
    /// log holds it longer then (an external signer is an HSM round trip),
    /// and the trail's requests, which otherwise wait their turn for the
    /// log, hand their records to the writer thread instead.
    pub fn flag_signing(&mut self, flag: Arc<std::sync::atomic::AtomicBool>) {
        self.signing = Some(flag);
    }

    /// The checkpoint the last appends wrote without syncing it, if any.
    pub fn take_checkpoint_sync(&mut self) -> Option<CheckpointSync> {
        self.checkpoint_sync.take()
    }

    /// Counts a sync done through a [`CheckpointSync`].
    pub fn count_sync(&mut self) {
        self.syncs += 1;
    }

    /// Whether a write failed and has not been recovered from yet.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Appends one record and returns it; see [`Self::append_batch`].
    pub fn append(&mut self, entry: AuditEntry) -> Result<AuditRecord, AuditError> {
        let mut records = self.append_batch(vec![entry])?;
        records
            .pop()
            .ok_or_else(|| AuditError::Encode("no record appended".into()))
    }

    /// Appends records in order, with the checkpoints the policy asks for
    /// between them, in one `write` (and, in [`Durability::Fsync`] mode, one
    /// `fsync`): group commit. When this returns `Ok`, every record has
    /// reached the OS (and with `Fsync` the disk). On `Err` none of them is
    /// acknowledged: the caller must refuse the requests (fail closed). A
    /// failed write leaves the log poisoned; the next call first truncates
    /// whatever part of the batch reached the file ([`Self::recover`]), so
    /// the log serves again as soon as its storage does.
    pub fn append_batch(
        &mut self,
        entries: Vec<AuditEntry>,
    ) -> Result<Vec<AuditRecord>, AuditError> {
        self.recover()?;
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        buf.reserve(entries.len() * 512);
        let mut records = Vec::with_capacity(entries.len());
        let mut seq = self.seq;
        let mut head = self.head_hash.clone();
        let mut since = self.since_checkpoint;
        let mut last_time = self.last_checkpoint_time;
        let mut last_cp = None;
        let mut new_index = Vec::new();
        let policy = self.options.checkpoints;
        let every_ms = i64::try_from(policy.every.as_millis()).unwrap_or(i64::MAX);
        // One checkpoint per batch at most while a mark is kept: the next
        // waits until this one is remembered.
        let mut may_sign = self.mark_caught_up();
        for entry in entries {
            let time = self.options.clock.now();
            if (seq + 1) % LOG_INDEX_STRIDE == 1 {
                new_index.push((seq + 1, self.len + buf.len() as u64));
            }
            let record = AuditRecord::new_into_line(
                seq + 1,
                time,
                std::mem::take(&mut head),
                entry,
                &mut buf,
            );
            seq = record.seq;
            head.clone_from(&record.hash);
            since += 1;
            let due =
                since >= policy.every_records || time.0.saturating_sub(last_time.0) >= every_ms;
            let cp = if due && may_sign && self.signing_retry_at.is_none_or(|t| time >= t) {
                let signing = Signing::start(self.signing.as_deref());
                let signed = self.signer.checkpoint_of(
                    self.options.node.as_deref(),
                    &self.log_id,
                    seq,
                    &head,
                    time,
                );
                drop(signing);
                match signed {
                    Ok(cp) => {
                        self.signing_retry_at = None;
                        Some(cp)
                    }
                    // The HSM holding the key does not answer: the records
                    // stay hash-chained and the checkpoint comes later.
                    Err(e) => {
                        tracing::warn!(error = %e, seq, "checkpoint deferred: the signing key did not sign");
                        self.signing_retry_at = Some(time.plus(SIGNING_RETRY));
                        None
                    }
                }
            } else {
                None
            };
            if let Some(cp) = cp {
                serde_json::to_writer(
                    &mut buf,
                    &CheckpointLine {
                        checkpoint: cp.clone(),
                    },
                )
                .map_err(|e| AuditError::Encode(e.to_string()))?;
                buf.push(b'\n');
                since = 0;
                last_time = time;
                last_cp = Some(cp);
                may_sign = self.options.mark.is_none();
            }
            records.push(record);
        }
        // A checkpoint is remembered only once it is durable in the log:
        // synced here, or by whoever takes its `CheckpointSync`. Another
        // descriptor of the file is what lets that sync run without the log.
        let deferred = match &last_cp {
            Some(cp)
                if self.defer_checkpoint_sync
                    && self.options.mark.is_some()
                    && self.options.durability == Durability::Write =>
            {
                match self.file.try_clone() {
                    Ok(file) => Some(CheckpointSync {
                        file,
                        checkpoint: cp.clone(),
                        mark: self.options.mark.clone(),
                        observer: self.options.observer.clone(),
                    }),
                    Err(e) => {
                        tracing::warn!(error = %e, "audit log: no second descriptor; syncing the checkpoint here");
                        None
                    }
                }
            }
            _ => None,
        };
        let sync = last_cp.is_some() && self.options.mark.is_some() && deferred.is_none();
        let written = self.write_all(&buf, sync);
        // The buffer is kept for the next batch, unless a large one grew it.
        if buf.capacity() <= SCRATCH_KEPT {
            self.scratch = buf;
        }
        written?;
        self.seq = seq;
        self.head_hash = head;
        self.since_checkpoint = since;
        self.last_checkpoint_time = last_time;
        if let Some(cp) = last_cp {
            if deferred.is_some() {
                self.checkpoint_sync = deferred;
            } else {
                durable(
                    self.options.mark.as_ref(),
                    self.options.observer.as_ref(),
                    &cp,
                );
            }
            self.last_checkpoint = Some(cp);
        }
        self.index.extend(new_index);
        Ok(records)
    }

    /// Writes a checkpoint of the current head now (at shutdown, on an
    /// auditor's request, when the time interval passed on an idle log).
    /// Returns the last checkpoint without writing if no record came since,
    /// or while the high-water mark has not remembered it yet; `None` on a
    /// log without records.
    pub fn checkpoint(&mut self) -> Result<Option<Checkpoint>, AuditError> {
        self.recover()?;
        if (self.since_checkpoint == 0 || !self.mark_caught_up()) && self.last_checkpoint.is_some()
        {
            return Ok(self.last_checkpoint.clone());
        }
        if self.seq == 0 {
            return Ok(None);
        }
        let time = self.options.clock.now();
        let checkpoint = self.signer.checkpoint_of(
            self.options.node.as_deref(),
            &self.log_id,
            self.seq,
            &self.head_hash,
            time,
        )?;
        self.signing_retry_at = None;
        let mut line = checkpoint.to_line()?.into_bytes();
        line.push(b'\n');
        self.write_all(&line, self.options.mark.is_some())?;
        durable(
            self.options.mark.as_ref(),
            self.options.observer.as_ref(),
            &checkpoint,
        );
        self.since_checkpoint = 0;
        self.last_checkpoint_time = time;
        self.last_checkpoint = Some(checkpoint.clone());
        Ok(Some(checkpoint))
    }

    /// After a failed write: truncates the file back to the acknowledged
    /// content. Fails (and the log stays poisoned) while the storage still
    /// refuses writes.
    pub fn recover(&mut self) -> Result<(), AuditError> {
        if !self.poisoned {
            return Ok(());
        }
        self.file.set_len(self.len).map_err(|e| {
            tracing::error!(file = %self.path.display(), error = %e, "audit log still unwritable");
            AuditError::Poisoned
        })?;
        if self.options.durability == Durability::Fsync {
            self.file.sync_data().map_err(|_| AuditError::Poisoned)?;
        }
        self.poisoned = false;
        tracing::warn!(file = %self.path.display(), "audit log writable again; serving");
        Ok(())
    }

    /// Writes `bytes`; syncs them in `Fsync` mode, or when `sync` asks.
    fn write_all(&mut self, bytes: &[u8], sync: bool) -> Result<(), AuditError> {
        self.writes += 1;
        let result = self.file.write_all(bytes).and_then(|()| {
            if sync || self.options.durability == Durability::Fsync {
                self.syncs += 1;
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        match result {
            Ok(()) => {
                self.len += bytes.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Part of the bytes may be in the file: appending after them
                // would corrupt the log. `recover` truncates them.
                self.poisoned = true;
                tracing::error!(file = %self.path.display(), error = %e, "audit log write failed; refusing requests (fail closed)");
                Err(AuditError::Io(e))
            }
        }
    }

    /// Retention: removes the records older than `cutoff`, as far as a
    /// checkpoint allows. The log is rewritten to start with the last
    /// checkpoint whose records are all older than `cutoff` (its *anchor*,
    /// verified like any checkpoint), followed by everything after it; the
    /// result verifies on its own. Written to a temporary file, synced, then
    /// renamed over the log: a crash leaves the old log or the new one.
    /// Returns `None` when nothing can be removed.
    pub fn prune(&mut self, cutoff: Timestamp) -> Result<Option<PruneReport>, AuditError> {
        self.recover()?;
        // Find the anchor: scan records and checkpoints in order.
        let mut reader = read_from_start(&self.file, self.len)?;
        let mut anchor: Option<(Checkpoint, u64)> = None; // (checkpoint, offset after its line)
        let mut first_seq: Option<u64> = None;
        let mut last_record_time = Timestamp(i64::MIN);
        let mut offset = 0u64;
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = reader.read_until(b'\n', &mut line)?;
            if n == 0 {
                break;
            }
            offset += n as u64;
            if line.starts_with(b"{\"checkpoint\"") {
                let cp: CheckpointLine =
                    serde_json::from_slice(&line).map_err(|e| AuditError::Encode(e.to_string()))?;
                if first_seq.is_some() && last_record_time < cutoff {
                    anchor = Some((cp.checkpoint, offset));
                }
            } else {
                let r: AuditRecord =
                    serde_json::from_slice(&line).map_err(|e| AuditError::Encode(e.to_string()))?;
                first_seq.get_or_insert(r.seq);
                if r.time >= cutoff {
                    break;
                }
                last_record_time = r.time;
            }
        }
        let (Some((anchor, keep_from)), Some(first_seq)) = (anchor, first_seq) else {
            return Ok(None);
        };
        let tmp = self.path.with_extension("prune.tmp");
        let mut out = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .truncate(false)
            .open(&tmp)?;
        out.set_len(0)?;
        let mut head = serde_json::to_vec(&CheckpointLine {
            checkpoint: anchor.clone(),
        })
        .map_err(|e| AuditError::Encode(e.to_string()))?;
        head.push(b'\n');
        out.write_all(&head)?;
        let mut src = self.file.try_clone()?;
        src.seek(SeekFrom::Start(keep_from))?;
        std::io::copy(&mut Read::take(src, self.len - keep_from), &mut out)?;
        out.sync_all()?;
        // Check the new log before it replaces the old one.
        let mut check = out.try_clone()?;
        check.seek(SeekFrom::Start(0))?;
        let report = verify(BufReader::new(check), &self.signer.public_key(), |_| {})?;
        if report.last_seq != self.seq || report.head_hash != self.head_hash {
            return Err(AuditError::Encode(
                "the pruned audit log does not end at the live head".into(),
            ));
        }
        if fs2::FileExt::try_lock_exclusive(&out).is_err() {
            return Err(AuditError::Locked);
        }
        std::fs::rename(&tmp, &self.path)?;
        sync_parent_dir(&self.path)?;
        let new_len = out.metadata()?.len();
        self.index = build_index(&out, new_len)?;
        self.file = out;
        self.len = new_len;
        Ok(Some(PruneReport {
            removed_records: anchor.seq + 1 - first_seq,
            anchor,
        }))
    }
}

/// The checkpoint on the first line of the first `len` bytes (an anchor),
/// read with `pread` (the file's cursor is left where it is).
fn first_checkpoint(file: &File, len: u64) -> std::io::Result<Option<Checkpoint>> {
    let mut buf = vec![0u8; usize::try_from(len.min(8192)).unwrap_or(8192)];
    read_exact_at(file, &mut buf, 0)?;
    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
        return Ok(None);
    };
    let line = buf.get(..end).unwrap_or_default();
    if !line.starts_with(b"{\"checkpoint\"") {
        return Ok(None);
    }
    Ok(serde_json::from_slice::<CheckpointLine>(line)
        .ok()
        .map(|l| l.checkpoint))
}

/// The error for a log that does not contain the remembered checkpoint.
fn behind_mark(path: &Path, mark: &Checkpoint, e: super::VerifyError) -> AuditError {
    let what = match &e.failure {
        VerifyFailure::Truncated { last_seq, .. } => {
            format!("it ends at seq {last_seq}: deleted, truncated or replaced by a new chain")
        }
        VerifyFailure::KnownCheckpointMismatch => {
            "it does not hold that checkpoint: replaced by another log".to_string()
        }
        VerifyFailure::BadSignature | VerifyFailure::WrongKey { .. } => {
            return AuditError::Corrupt(e);
        }
        _ => return AuditError::Corrupt(e),
    };
    AuditError::BehindMark(format!(
        "the audit log {} is behind the last checkpoint coffre signed (seq {}{}, remembered \
         in the store): {what}. coffre will not start a new chain over a lost one: restore the \
         log from a backup or an export (coffre audit export) and start again",
        path.display(),
        mark.seq,
        mark.log_id
            .as_ref()
            .map(|id| format!(", log {id}"))
            .unwrap_or_default(),
    ))
}

/// The length of the file up to and including its last `\n`.
fn complete_length(file: &File, total: u64) -> std::io::Result<u64> {
    let mut end = total;
    let mut buf = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let n = usize::try_from(end - start).unwrap_or(0);
        let Some(chunk) = buf.get_mut(..n) else {
            break;
        };
        read_exact_at(file, chunk, start)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// Reads exactly `buf.len()` bytes at `offset` (pread: no shared cursor).
pub(crate) fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

/// The `seq` of a record line, from its fixed prefix `{"seq":N,`.
pub(crate) fn record_seq(line: &[u8]) -> Option<u64> {
    let rest = line.strip_prefix(b"{\"seq\":")?;
    let end = rest.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(rest.get(..end)?).ok()?.parse().ok()
}

/// A buffered reader of the first `len` bytes of `file` (a clone of the
/// handle: appends are `O_APPEND`, so moving the shared cursor is harmless).
fn read_from_start(file: &File, len: u64) -> std::io::Result<BufReader<std::io::Take<File>>> {
    let mut src = file.try_clone()?;
    src.seek(SeekFrom::Start(0))?;
    Ok(BufReader::new(Read::take(src, len)))
}

/// See [`LOG_INDEX_STRIDE`]: one pass over the first `len` bytes.
fn build_index(file: &File, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let mut reader = read_from_start(file, len)?;
    let mut index = Vec::new();
    let mut offset = 0u64;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        if let Some(seq) = record_seq(&line) {
            if seq % LOG_INDEX_STRIDE == 1 {
                index.push((seq, offset));
            }
        }
        offset += n as u64;
    }
    Ok(index)
}

/// Makes a newly created file's directory entry durable.
fn sync_parent_dir(path: &Path) -> Result<(), AuditError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    crate::fsutil::sync_dir(parent)?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use ring::rand::SystemRandom;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    use super::*;
    use crate::audit::checkpoint::ExternalSigner;
    use crate::audit::checkpoint::tests::test_signer;
    use crate::audit::record::GENESIS_HASH;
    use crate::audit::record::tests::entry;
    use crate::model::ManualClock;

    pub(crate) fn options(every_records: u64) -> (AuditLogOptions, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new(Timestamp(1_700_000_000_000)));
        let opts = AuditLogOptions {
            durability: Durability::Write,
            checkpoints: CheckpointPolicy {
                every_records,
                every: Duration::from_secs(3600),
            },
            clock: clock.clone(),
            ..AuditLogOptions::default()
        };
        (opts, clock)
    }

    /// A key "in an HSM" (here, ring behind the trait) that can be switched
    /// off, as an HSM outage would.
    #[derive(Debug)]
    struct FlakySigner {
        key: Ed25519KeyPair,
        up: std::sync::atomic::AtomicBool,
        calls: std::sync::atomic::AtomicUsize,
    }

    impl ExternalSigner for FlakySigner {
        fn public_key(&self) -> [u8; 32] {
            self.key.public_key().as_ref().try_into().unwrap()
        }
        fn sign(&self, msg: &[u8]) -> Result<[u8; 64], String> {
            use std::sync::atomic::Ordering;
            self.calls.fetch_add(1, Ordering::SeqCst);
            if !self.up.load(Ordering::SeqCst) {
                return Err("HSM unavailable".into());
            }
            Ok(self.key.sign(msg).as_ref().try_into().unwrap())
        }
    }

    #[test]
    fn an_external_key_that_fails_defers_the_checkpoint_without_losing_a_record() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        let flaky = Arc::new(FlakySigner {
            key: Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap(),
            up: false.into(),
            calls: 0.into(),
        });
        let (opts, clock) = options(2);
        let signer = CheckpointSigner::external(flaky.clone());
        assert!(signer.is_external());
        let mut log = AuditLog::open_with(&path, signer, opts).unwrap();
        // Down: records 1..=6 are written and chained; one attempt to sign,
        // then none until the retry time.
        for n in 1..=6 {
            log.append(entry(n)).unwrap();
        }
        assert_eq!(flaky.calls.load(Ordering::SeqCst), 1);
        assert!(matches!(log.checkpoint(), Err(AuditError::Signing(_))));
        // Back, and the retry time passed: the next append checkpoints.
        flaky.up.store(true, Ordering::SeqCst);
        clock.advance(SIGNING_RETRY);
        log.append(entry(7)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let checkpoints: Vec<usize> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| l.starts_with("{\"checkpoint\""))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(checkpoints, vec![7], "one checkpoint, after record 7");
        let report = verify(text.as_bytes(), &flaky.public_key(), |_| {}).unwrap();
        assert_eq!(
            (report.records, report.checkpoints, report.last_seq),
            (7, 1, 7)
        );
    }

    #[test]
    fn append_and_reopen_continue_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (signer, pkcs8) = CheckpointSigner::generate().unwrap();
        let pkcs8 = pkcs8.expose().to_vec();
        let (opts, _clock) = options(3);
        let mut log = AuditLog::open_with(&path, signer, opts.clone()).unwrap();
        let first = log.append(entry(1)).unwrap();
        assert_eq!((first.seq, first.prev_hash.as_str()), (1, GENESIS_HASH));
        let mut last = first;
        for n in 2..=5 {
            let r = log.append(entry(n)).unwrap();
            assert_eq!(r.prev_hash, last.hash);
            last = r;
        }
        drop(log);

        let signer = CheckpointSigner::from_pkcs8(&pkcs8).unwrap();
        let mut log = AuditLog::open_with(&path, signer, opts).unwrap();
        assert_eq!((log.seq(), log.head_hash()), (5, last.hash.as_str()));
        let r = log.append(entry(6)).unwrap();
        assert_eq!((r.seq, &r.prev_hash), (6, &last.hash));
        // Checkpoint after record 3 and after record 6: the count carried
        // over the reopen (2 records since the first checkpoint).
        let text = std::fs::read_to_string(&path).unwrap();
        let kinds: Vec<bool> = text
            .lines()
            .map(|l| l.starts_with("{\"checkpoint\""))
            .collect();
        assert_eq!(
            kinds,
            [false, false, false, true, false, false, false, true]
        );
        let report = verify(text.as_bytes(), &log.public_key(), |_| {}).unwrap();
        assert_eq!(
            (report.records, report.checkpoints, report.last_seq),
            (6, 2, 6)
        );
        assert_eq!(report.uncovered_records, 0);
    }

    #[test]
    fn checkpoints_by_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (signer, pk) = test_signer();
        let (mut opts, clock) = options(u64::MAX);
        opts.checkpoints.every = Duration::from_secs(10);
        let mut log = AuditLog::open_with(&path, signer, opts).unwrap();
        log.append(entry(1)).unwrap();
        clock.advance(Duration::from_secs(11));
        log.append(entry(2)).unwrap();
        log.append(entry(3)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let report = verify(text.as_bytes(), &pk, |_| {}).unwrap();
        assert_eq!(report.checkpoints, 1);
        assert_eq!(report.last_checkpoint.unwrap().seq, 2);
        assert_eq!(report.uncovered_records, 1);
    }

    #[test]
    fn torn_last_line_is_truncated_but_other_damage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (_, pkcs8) = CheckpointSigner::generate().unwrap();
        let pkcs8 = pkcs8.expose().to_vec();
        let (opts, _) = options(100);
        let mut log = AuditLog::open_with(
            &path,
            CheckpointSigner::from_pkcs8(&pkcs8).unwrap(),
            opts.clone(),
        )
        .unwrap();
        log.append(entry(1)).unwrap();
        let second = log.append(entry(2)).unwrap();
        drop(log);
        let good_len = std::fs::metadata(&path).unwrap().len();
        // A crash in the middle of writing record 3.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":3,\"time\":17000").unwrap();
        drop(f);
        let mut log = AuditLog::open_with(
            &path,
            CheckpointSigner::from_pkcs8(&pkcs8).unwrap(),
            opts.clone(),
        )
        .unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good_len);
        assert_eq!(log.head_hash(), second.hash);
        assert_eq!(log.append(entry(3)).unwrap().seq, 3);
        drop(log);

        // A complete but invalid line is not a torn write: refuse to open.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"not json\n").unwrap();
        drop(f);
        let err = AuditLog::open_with(&path, CheckpointSigner::from_pkcs8(&pkcs8).unwrap(), opts)
            .unwrap_err();
        assert!(
            matches!(err, AuditError::Corrupt(ref e) if e.line == 4),
            "{err}"
        );
    }

    #[test]
    fn retention_prunes_down_to_a_signed_anchor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (signer, pkcs8) = CheckpointSigner::generate().unwrap();
        let pkcs8 = pkcs8.expose().to_vec();
        let pk = signer.public_key();
        let (opts, clock) = options(3);
        let mut log = AuditLog::open_with(&path, signer, opts.clone()).unwrap();
        // Records 1..=10 one minute apart; checkpoints after 3, 6, 9.
        for n in 1..=10 {
            log.append(entry(n)).unwrap();
            clock.advance(Duration::from_secs(60));
        }
        let t0 = 1_700_000_000_000;
        // Nothing is older than the start: nothing to prune.
        assert_eq!(log.prune(Timestamp(t0)).unwrap(), None);
        // Records 1..=7 are older than the cutoff; the last checkpoint all
        // of whose records are older is the one after 6.
        let report = log.prune(Timestamp(t0 + 7 * 60_000)).unwrap().unwrap();
        assert_eq!((report.removed_records, report.anchor.seq), (6, 6));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("{\"checkpoint\":{\"version\":2,"),
            "{text}"
        );
        let v = verify(text.as_bytes(), &pk, |_| {}).unwrap();
        assert_eq!(v.anchor.as_ref().map(|a| a.seq), Some(6));
        assert_eq!((v.records, v.last_seq), (4, 10));
        // The log keeps going, and reopens (verifying the anchored file).
        let r11 = log.append(entry(11)).unwrap();
        assert_eq!(r11.seq, 11);
        assert_eq!(
            log.index().len(),
            0,
            "no indexed record (1, 257, ...) is left"
        );
        // Pruning again removes from the anchor on.
        let report = log.prune(Timestamp(t0 + 10 * 60_000)).unwrap().unwrap();
        assert_eq!((report.removed_records, report.anchor.seq), (3, 9));
        drop(log);
        let log = AuditLog::open_with(&path, CheckpointSigner::from_pkcs8(&pkcs8).unwrap(), opts)
            .unwrap();
        assert_eq!((log.seq(), log.head_hash()), (11, r11.hash.as_str()));
    }

    #[test]
    fn a_failed_write_is_refused_then_recovered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (signer, pk) = test_signer();
        let (opts, _) = options(100);
        let mut log = AuditLog::open_with(&path, signer, opts).unwrap();
        log.append(entry(1)).unwrap();
        // Simulate a torn write: bytes after the acknowledged length, and
        // the poisoned flag a failed write sets.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":2,\"ti").unwrap();
        drop(f);
        log.poisoned = true;
        assert!(log.is_poisoned());
        // The next append truncates the torn bytes first, then continues.
        let r2 = log.append(entry(2)).unwrap();
        assert_eq!(r2.seq, 2);
        assert!(!log.is_poisoned());
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(verify(text.as_bytes(), &pk, |_| {}).unwrap().last_seq, 2);
    }

    #[test]
    fn a_second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (a, _) = test_signer();
        let (b, _) = test_signer();
        let _log = AuditLog::open(&path, a).unwrap();
        assert!(matches!(AuditLog::open(&path, b), Err(AuditError::Locked)));
    }

    #[test]
    fn a_log_signed_by_another_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (a, _) = test_signer();
        let (opts, _) = options(1);
        let mut log = AuditLog::open_with(&path, a, opts.clone()).unwrap();
        log.append(entry(1)).unwrap();
        drop(log);
        let (b, _) = test_signer();
        assert!(matches!(
            AuditLog::open_with(&path, b, opts),
            Err(AuditError::Corrupt(_))
        ));
    }

    /// A mark in memory: remembers what it is told when `up`.
    #[derive(Debug, Default)]
    struct MemoryMark {
        up: std::sync::atomic::AtomicBool,
        seen: std::sync::Mutex<Vec<Checkpoint>>,
        remembered: std::sync::Mutex<Option<u64>>,
    }

    impl HighWaterMark for MemoryMark {
        fn remember(&self, checkpoint: &Checkpoint) {
            self.seen.lock().unwrap().push(checkpoint.clone());
            if self.up.load(std::sync::atomic::Ordering::SeqCst) {
                *self.remembered.lock().unwrap() = Some(checkpoint.seq);
            }
        }
        fn remembered(&self) -> Option<u64> {
            *self.remembered.lock().unwrap()
        }
    }

    fn seeded() -> CheckpointSigner {
        CheckpointSigner::from_seed(&[9u8; 32]).unwrap()
    }

    /// A log of `n` records with a checkpoint every 2; its checkpoints.
    fn log_with_checkpoints(path: &Path, n: u64) -> Vec<Checkpoint> {
        let (opts, _) = options(2);
        let mut log = AuditLog::open_with(path, seeded(), opts).unwrap();
        let mut cps = Vec::new();
        for i in 1..=n {
            log.append(entry(i)).unwrap();
            if i % 2 == 0 {
                cps.push(log.last_checkpoint().unwrap().clone());
            }
        }
        cps
    }

    #[test]
    fn a_log_behind_the_high_water_mark_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let cps = log_with_checkpoints(&path, 6);
        let mark = cps.last().unwrap().clone();
        let text = std::fs::read_to_string(&path).unwrap();
        let with_mark = |o: AuditLogOptions| AuditLogOptions {
            high_water: Some(mark.clone()),
            ..o
        };
        // Intact: opens, with the same log id.
        let log = AuditLog::open_with(&path, seeded(), with_mark(options(2).0)).unwrap();
        assert_eq!(Some(log.log_id()), mark.log_id.as_deref());
        drop(log);
        // Deleted (a fresh chain), truncated, replaced by another log.
        let cut: String = text.lines().take(5).map(|l| format!("{l}\n")).collect();
        let other = dir.path().join("other.log");
        log_with_checkpoints(&other, 8);
        let replaced = std::fs::read_to_string(&other).unwrap();
        for (what, content) in [
            ("deleted", String::new()),
            ("truncated", cut),
            ("replaced", replaced),
        ] {
            std::fs::write(&path, &content).unwrap();
            let err = AuditLog::open_with(&path, seeded(), with_mark(options(2).0)).unwrap_err();
            assert!(matches!(err, AuditError::BehindMark(_)), "{what}: {err}");
            assert!(err.to_string().contains("restore"), "{what}: {err}");
            // Refusing changed nothing.
            assert_eq!(std::fs::read_to_string(&path).unwrap(), content, "{what}");
        }
    }

    #[test]
    fn a_store_two_checkpoints_behind_the_log_was_rolled_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let cps = log_with_checkpoints(&path, 6);
        let open = |mark: &Checkpoint| {
            let m = Arc::new(MemoryMark::default());
            m.up.store(true, std::sync::atomic::Ordering::SeqCst);
            *m.remembered.lock().unwrap() = Some(mark.seq);
            let opts = AuditLogOptions {
                high_water: Some(mark.clone()),
                mark: Some(m.clone()),
                ..options(2).0
            };
            (AuditLog::open_with(&path, seeded(), opts), m)
        };
        // One behind (a crash between the log's fsync and the store's
        // write): accepted, and the log's last checkpoint remembered.
        let (log, m) = open(&cps[1]);
        log.unwrap();
        assert_eq!(m.remembered(), Some(6));
        // Two behind: the store is an older copy.
        let (log, _) = open(&cps[0]);
        assert!(matches!(log, Err(AuditError::MarkRolledBack(_))), "{log:?}");
    }

    #[test]
    fn no_checkpoint_is_signed_until_the_previous_one_is_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mark = Arc::new(MemoryMark::default());
        let opts = AuditLogOptions {
            mark: Some(mark.clone()),
            ..options(2).0
        };
        let mut log = AuditLog::open_with(&path, seeded(), opts).unwrap();
        // The store is down: the first checkpoint is written, no other.
        for i in 1..=7 {
            log.append(entry(i)).unwrap();
        }
        assert_eq!(log.checkpoint().unwrap().map(|c| c.seq), Some(2));
        assert_eq!(mark.seen.lock().unwrap().len(), 1);
        // Back: the next append signs the head, and it is remembered.
        mark.up.store(true, std::sync::atomic::Ordering::SeqCst);
        mark.remember(&log.last_checkpoint().unwrap().clone());
        log.append(entry(8)).unwrap();
        assert_eq!(log.last_checkpoint().map(|c| c.seq), Some(8));
        assert_eq!(mark.remembered(), Some(8));
        assert_eq!(log.since_checkpoint(), 0);
    }

    /// `write` mode with a mark, syncs deferred (as the trail runs it): the
    /// append that writes a checkpoint leaves its sync and the mark to
    /// whoever takes it, and no further checkpoint is signed before that.
    #[test]
    fn a_deferred_checkpoint_is_remembered_only_once_synced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mark = Arc::new(MemoryMark::default());
        mark.up.store(true, std::sync::atomic::Ordering::SeqCst);
        let opts = AuditLogOptions {
            mark: Some(mark.clone()),
            ..options(2).0
        };
        let mut log = AuditLog::open_with(&path, seeded(), opts).unwrap();
        log.defer_checkpoint_syncs();
        log.append(entry(1)).unwrap();
        assert!(log.take_checkpoint_sync().is_none());
        log.append(entry(2)).unwrap();
        let sync = log
            .take_checkpoint_sync()
            .expect("the checkpoint at 2, unsynced");
        assert_eq!(sync.seq(), 2);
        assert_eq!(log.last_checkpoint().map(|c| c.seq), Some(2));
        assert!(mark.seen.lock().unwrap().is_empty(), "told before the sync");
        assert_eq!(log.syncs(), 0, "the append did not sync");
        // Not remembered yet: the next due checkpoint waits.
        log.append(entry(3)).unwrap();
        log.append(entry(4)).unwrap();
        assert!(log.take_checkpoint_sync().is_none());
        assert_eq!(log.last_checkpoint().map(|c| c.seq), Some(2));
        // A sync that fails tells nobody: here, a descriptor that cannot
        // be synced (a pipe).
        let (_reader, writer) = std::io::pipe().unwrap();
        let failing = CheckpointSync {
            file: File::from(std::os::fd::OwnedFd::from(writer)),
            checkpoint: sync.checkpoint.clone(),
            mark: sync.mark.clone(),
            observer: None,
        };
        assert!(failing.complete().is_err());
        assert!(mark.seen.lock().unwrap().is_empty());
        // The real one does; then the next append signs the head.
        sync.complete().unwrap();
        assert_eq!(mark.remembered(), Some(2));
        log.append(entry(5)).unwrap();
        let next = log.take_checkpoint_sync().expect("the checkpoint at 5");
        assert_eq!(next.seq(), 5);
        next.complete().unwrap();
        assert_eq!(mark.remembered(), Some(5));
        drop(log);
        let text = std::fs::read(&path).unwrap();
        let report = verify(text.as_slice(), &seeded().public_key(), |_| {}).unwrap();
        assert_eq!((report.records, report.uncovered_records), (5, 0));
    }

    /// Without deferral (the log alone, `fsync` mode, or no mark), the
    /// append syncs the checkpoint and tells the mark itself.
    #[test]
    fn an_undeferred_checkpoint_is_synced_by_its_append() {
        let dir = tempfile::tempdir().unwrap();
        let mark = Arc::new(MemoryMark::default());
        mark.up.store(true, std::sync::atomic::Ordering::SeqCst);
        let opts = AuditLogOptions {
            mark: Some(mark.clone()),
            ..options(2).0
        };
        let mut log = AuditLog::open_with(&dir.path().join("a.log"), seeded(), opts).unwrap();
        log.append(entry(1)).unwrap();
        log.append(entry(2)).unwrap();
        assert!(log.take_checkpoint_sync().is_none());
        assert_eq!((mark.remembered(), log.syncs()), (Some(2), 1));
    }

    #[test]
    fn a_log_keeps_its_identity_across_reopen_and_pruning() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let cps = log_with_checkpoints(&path, 6);
        let id = cps[0].log_id.clone().unwrap();
        assert!(cps.iter().all(|c| c.log_id.as_deref() == Some(id.as_str())));
        let (opts, clock) = options(2);
        let mut log = AuditLog::open_with(&path, seeded(), opts).unwrap();
        assert_eq!(log.log_id(), id);
        clock.advance(Duration::from_secs(10));
        log.append(entry(7)).unwrap();
        log.prune(clock.now()).unwrap().unwrap();
        log.append(entry(8)).unwrap();
        assert_eq!(
            log.last_checkpoint().unwrap().log_id.as_deref(),
            Some(id.as_str())
        );
        drop(log);
        let log = AuditLog::open_with(&path, seeded(), options(2).0).unwrap();
        assert_eq!(log.log_id(), id);
        // A new log gets another identity.
        let other =
            AuditLog::open_with(&dir.path().join("new.log"), seeded(), options(2).0).unwrap();
        assert_ne!(other.log_id(), id);
    }
}
