//! The server's audit log, [`AuditTrail`]: one writer thread that owns the
//! [`AuditLog`], and the asynchronous API that request handlers and
//! auditors use.
//!
//! # Group commit
//!
//! A request queues its [`AuditEntry`] and waits for the answer. In `write`
//! mode the request then takes the log (waiting on its lock while another
//! request writes) and writes what the queue holds, its own record and
//! every one queued meanwhile, with one `write`, then answers them all; a
//! request whose record the previous holder wrote finds the queue empty.
//! While requests overlap, each yields once between queueing its record
//! and taking the log, so that the requests runnable behind it on its
//! thread join the batch; a request alone does not wait (see
//! `AuditTrail::queue_inline`). When the log is held for longer (the writer thread's checkpoints and
//! retention, a checkpoint's signing), requests hand the queue to the
//! writer thread instead of waiting for the lock. In `fsync` mode the
//! writer thread does the writing, with one `write` and one `fsync` per
//! batch, so that no request thread waits for the disk. Either way concurrent requests share the
//! system calls, and a request is answered only once its record is
//! written. If the write fails, every request of the batch gets an error
//! and must be refused (`UNAVAILABLE`): fail closed. The log recovers by
//! itself when its storage accepts writes again (the torn bytes of the
//! failed batch are truncated first).
//!
//! # Readers
//!
//! [`AuditTrail::list_events`] and [`AuditTrail::export`] read a snapshot
//! of the file without blocking the writer: see [`super::reader`].

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use super::AuditError;
use super::checkpoint::{Checkpoint, CheckpointSigner, public_key_to_pem};
use super::digest::{Digest, UnsignedDigest};
use super::keys::AuditKeys;
use super::log::{AuditLog, AuditLogOptions, CheckpointSync, Durability, PruneReport};
use super::reader::{EventFilter, EventPage, Snapshot};
use super::record::{AuditDigestKey, AuditEntry};
use crate::model::{EncryptionContext, Timestamp};

/// Which encryption-context entries a record shows in clear.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ClearContext {
    /// None: only the keyed digest (the default).
    #[default]
    None,
    /// These keys' values (when present).
    Keys(std::collections::BTreeSet<String>),
    /// The whole context.
    All,
}

/// Configuration of the server's audit log.
#[derive(Clone, Debug)]
pub struct AuditTrailOptions {
    pub log: AuditLogOptions,
    pub clear_context: ClearContext,
    /// Records older than this are pruned (as far as a checkpoint allows);
    /// `None` keeps everything.
    pub retention: Option<Duration>,
    /// How often the writer checks for pruning and idle checkpoints.
    pub housekeeping_interval: Duration,
    /// Records are made but not written: for measuring what the audit log
    /// costs (`coffre dev --audit-durability off`), never in production
    /// (`coffre serve` has no way to set it).
    pub discard: bool,
}

impl Default for AuditTrailOptions {
    fn default() -> Self {
        Self {
            log: AuditLogOptions::default(),
            clear_context: ClearContext::None,
            retention: None,
            housekeeping_interval: Duration::from_secs(1),
            discard: false,
        }
    }
}

/// How long the writer lets a batch fill when requests are coming in.
const BATCH_WINDOW: Duration = Duration::from_micros(100);

type Reply = oneshot::Sender<Result<u64, String>>;

enum Job {
    Append(Box<AuditEntry>, Reply),
    /// Write what the inline queue holds (a request found the log held by
    /// a slow holder and handed the queue over).
    Drain,
    /// Sync a checkpoint a request's batch wrote, then tell the mark: the
    /// request that wrote the batch does not wait for the disk.
    SyncCheckpoint(CheckpointSync),
    Checkpoint(oneshot::Sender<Result<Option<Checkpoint>, String>>),
    Shutdown,
}

/// What readers need, published by the writer after every write.
#[derive(Clone, Debug, Default)]
struct View {
    len: u64,
    index: Vec<(u64, u64)>,
    last_seq: u64,
    last_checkpoint: Option<Checkpoint>,
    syncs: u64,
    writes: u64,
}

#[derive(Debug)]
struct Shared {
    path: PathBuf,
    view: Mutex<View>,
    /// `false` while the log cannot be written.
    healthy: AtomicBool,
    /// `seq` of the last acknowledged record, for followers (`audit tail`).
    head: watch::Sender<u64>,
    /// Set when the server stops: followers end their streams.
    closing: watch::Sender<bool>,
    /// Records handed to the writer and not yet answered.
    backlog: std::sync::atomic::AtomicU64,
    /// The log itself: the writer thread and, in `write` mode, the requests
    /// take it in turn.
    log: Mutex<AuditLog>,
    /// `write` mode: records waiting to be written (see
    /// [`AuditTrail::queue_inline`]).
    queue: Mutex<Pending>,
    /// The writer thread holds `log`, or is about to: a request that finds
    /// it held hands its record over rather than waiting for it.
    writer_holds: AtomicBool,
    /// `write` mode: the last request to write did not write alone (it
    /// waited for the log, or its batch held others' records), so requests
    /// yield once to write together (`queue_inline`).
    grouping: AtomicBool,
    /// Whoever holds `log` is signing a checkpoint (maybe with an HSM): as
    /// `writer_holds`, requests hand their records over.
    signing: Arc<AtomicBool>,
    /// Set, with the log held, before the final checkpoint: nothing is
    /// appended after it.
    stopped: AtomicBool,
}

impl Shared {
    /// Whether the log's holder may keep it for long: the writer thread
    /// (a checkpoint on demand, retention), or a checkpoint's signing.
    fn slow_hold(&self) -> bool {
        self.writer_holds.load(Ordering::SeqCst) || self.signing.load(Ordering::SeqCst)
    }
}

/// Records waiting to be written, in order.
#[derive(Default)]
struct Pending(Vec<(AuditEntry, Reply)>);

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("records", &self.0.len())
            .finish()
    }
}

/// The log as the writer thread holds it: [`Shared::writer_holds`] is set
/// from before the lock is taken until after it is let go.
struct WriterHold<'a> {
    log: MutexGuard<'a, AuditLog>,
    flag: &'a AtomicBool,
}

impl<'a> WriterHold<'a> {
    fn take(shared: &'a Shared) -> Self {
        shared.writer_holds.store(true, Ordering::SeqCst);
        Self {
            log: shared.log.lock().unwrap_or_else(|e| e.into_inner()),
            flag: &shared.writer_holds,
        }
    }
}

impl std::ops::Deref for WriterHold<'_> {
    type Target = AuditLog;
    fn deref(&self) -> &AuditLog {
        &self.log
    }
}

impl std::ops::DerefMut for WriterHold<'_> {
    fn deref_mut(&mut self) -> &mut AuditLog {
        &mut self.log
    }
}

impl Drop for WriterHold<'_> {
    fn drop(&mut self) {
        // Cleared a moment before the guard lets go: a request that sees it
        // clear waits for that moment at most.
        self.flag.store(false, Ordering::SeqCst);
    }
}

/// The audit log of a running server. Dropping it (or [`AuditTrail::shutdown`])
/// writes a final checkpoint.
#[derive(Debug)]
pub struct AuditTrail {
    tx: mpsc::Sender<Job>,
    shared: Arc<Shared>,
    public_key: [u8; 32],
    /// The checkpoint key, which also signs cluster digests.
    signer: Arc<CheckpointSigner>,
    digest: AuditDigestKey,
    clear_context: ClearContext,
    discard: bool,
    /// `write` mode: records are written by the requests themselves.
    inline: bool,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl AuditTrail {
    /// Opens (verifying it) or creates the log at `path` and starts its
    /// writer thread.
    pub fn open(
        path: &Path,
        keys: AuditKeys,
        options: AuditTrailOptions,
    ) -> Result<Self, AuditError> {
        let public_key = keys.signer.public_key();
        let clear_context = options.clear_context.clone();
        let discard = options.discard;
        if discard {
            tracing::warn!("the audit log is OFF: requests leave no record (measurement only)");
        }
        let mut log = AuditLog::open_with(path, keys.signer, options.log.clone())?;
        let inline = options.log.durability == Durability::Write;
        if inline {
            // A checkpoint's sync (for the mark) runs on the writer thread.
            log.defer_checkpoint_syncs();
        }
        let signer = log.signer();
        let signing = Arc::new(AtomicBool::new(false));
        log.flag_signing(Arc::clone(&signing));
        if let Some(retention) = options.retention {
            prune(&mut log, retention, &options.log);
        }
        let (head, _) = watch::channel(log.seq());
        let shared = Arc::new(Shared {
            path: path.to_path_buf(),
            view: Mutex::new(View::default()),
            healthy: AtomicBool::new(true),
            head,
            closing: watch::channel(false).0,
            backlog: std::sync::atomic::AtomicU64::new(0),
            log: Mutex::new(log),
            queue: Mutex::new(Pending::default()),
            writer_holds: AtomicBool::new(false),
            grouping: AtomicBool::new(false),
            signing,
            stopped: AtomicBool::new(false),
        });
        if let Ok(log) = shared.log.lock() {
            publish(&shared, &log);
        }
        let (tx, rx) = mpsc::channel();
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("coffre-audit".into())
            .spawn(move || writer(rx, thread_shared, options))?;
        Ok(Self {
            tx,
            shared,
            public_key,
            signer,
            digest: keys.digest,
            clear_context,
            discard,
            inline,
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.public_key
    }

    pub fn public_key_pem(&self) -> String {
        public_key_to_pem(&self.public_key)
    }

    /// Signs a cluster digest with the checkpoint key
    /// ([`super::digest`]). Blocking when the key is in an HSM: call it
    /// off the async runtime.
    pub fn sign_digest(&self, unsigned: UnsignedDigest) -> Result<Digest, AuditError> {
        self.signer.sign_digest(unsigned)
    }

    /// Whether the last write succeeded (for health checks).
    pub fn is_healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::SeqCst)
    }

    /// The keyed digest of `context` for a record.
    pub fn context_digest(&self, context: &EncryptionContext) -> String {
        self.digest.context_digest(context)
    }

    /// The context entries to show in clear, per the configuration.
    pub fn clear_context(&self, context: &EncryptionContext) -> Option<BTreeMap<String, String>> {
        match &self.clear_context {
            ClearContext::None => None,
            ClearContext::All => Some(context.entries().clone()),
            ClearContext::Keys(keys) => Some(
                context
                    .entries()
                    .iter()
                    .filter(|(k, _)| keys.contains(k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ),
        }
    }

    /// Appends a record; returns its `seq` once it is written (per the
    /// durability mode). An error means the request must be refused.
    pub async fn record(&self, entry: AuditEntry) -> Result<u64, AuditError> {
        if self.discard {
            drop(entry);
            return Ok(0);
        }
        let (tx, rx) = oneshot::channel();
        let _waiting = Waiting::new(&self.shared);
        if self.inline {
            self.queue_inline(entry, tx).await?;
        } else {
            self.tx
                .send(Job::Append(Box::new(entry), tx))
                .map_err(|_| AuditError::Stopped)?;
        }
        match rx.await {
            Ok(Ok(seq)) => Ok(seq),
            Ok(Err(message)) => Err(AuditError::Io(std::io::Error::other(message))),
            Err(_) => Err(AuditError::Stopped),
        }
    }

    /// Queues a record without waiting for it to be written: for a request
    /// abandoned by its caller, whose record is written from a `Drop`. The
    /// writer thread writes it as any other (synced in `fsync` mode); if
    /// the writer has stopped, the loss is logged.
    pub fn record_detached(&self, entry: AuditEntry) {
        if self.discard {
            return;
        }
        let (reply, _) = oneshot::channel();
        if self.tx.send(Job::Append(Box::new(entry), reply)).is_err() {
            tracing::error!("the audit writer has stopped: an abandoned request's record is lost");
        }
    }

    /// `write` mode: the record joins the queue, then the request takes
    /// the log and writes whatever the queue holds in one `write` (its own
    /// record, unless a request before it took it, and every one queued
    /// meanwhile), and answers them. Records are written by the requests'
    /// own threads: no hand-off to the writer thread and back.
    ///
    /// Group commit: while requests come together (another is in
    /// `record` now, or the last request to write waited for the log or
    /// wrote others' records with its own), a request yields once between
    /// queueing its record and taking the log. It goes behind the tasks
    /// already runnable on its thread, which queue their records first, and
    /// one `write` carries them all. A request alone (low load) does not
    /// yield: its record is written at once, and grouping stays off until
    /// requests overlap again.
    ///
    /// A request that finds the log held by another waits for it on the
    /// lock, a few microseconds, rather than for the other to wake it: a
    /// task woken on a busy runtime waits behind every task queued there,
    /// hundreds of microseconds at half of the peak (issue #20). While the
    /// holder may keep the log long (the writer thread, for a checkpoint or
    /// retention; a checkpoint's signing, maybe by an HSM), requests do not
    /// wait: the writer thread writes the queue once it can. The caller's
    /// reply comes from whoever wrote its record.
    async fn queue_inline(&self, entry: AuditEntry, reply: Reply) -> Result<(), AuditError> {
        self.shared
            .queue
            .lock()
            .map_err(|_| AuditError::Stopped)?
            .0
            .push((entry, reply));
        let together = self.shared.grouping.load(Ordering::Relaxed)
            || self.shared.backlog.load(Ordering::Relaxed) > 1;
        if together {
            // Dropped here (the request was cancelled), it hands the queue
            // to the writer thread: a queued record is never left behind.
            let queued = Queued(Some(self));
            YieldOnce(false).await;
            queued.disarm();
        }
        self.write_queue();
        Ok(())
    }

    /// Takes the log (or hands the queue to the writer thread, see
    /// `queue_inline`) and writes every record queued.
    fn write_queue(&self) {
        let mut waited = false;
        let held = match self.shared.log.try_lock() {
            Ok(log) => Some(log),
            Err(std::sync::TryLockError::WouldBlock) if !self.shared.slow_hold() => {
                waited = true;
                self.shared.log.lock().ok()
            }
            Err(_) => None,
        };
        let Some(mut log) = held else {
            self.hand_queue_over();
            return;
        };
        if self.shared.stopped.load(Ordering::SeqCst) {
            drop(log);
            fail_queue(&self.shared, "the audit log is closed");
            return;
        }
        let Some(batch) = take_batch(&self.shared) else {
            return;
        };
        self.shared
            .grouping
            .store(waited || batch.len() > 1, Ordering::Relaxed);
        if let Some(sync) = write_batch(&self.shared, &mut log, batch) {
            drop(log);
            if let Err(mpsc::SendError(Job::SyncCheckpoint(sync))) =
                self.tx.send(Job::SyncCheckpoint(sync))
            {
                // The writer is gone (the server stops): sync here.
                let _ = complete_sync(&self.shared, &sync);
            }
        }
    }

    /// Lets the writer thread write the queue.
    fn hand_queue_over(&self) {
        if self.tx.send(Job::Drain).is_err() {
            fail_queue(&self.shared, "the audit writer has stopped");
        }
    }

    /// Signs the current head now (if records came since the last
    /// checkpoint) and returns the latest checkpoint.
    pub async fn checkpoint(&self) -> Result<Option<Checkpoint>, AuditError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Job::Checkpoint(tx))
            .map_err(|_| AuditError::Stopped)?;
        match rx.await {
            Ok(Ok(cp)) => Ok(cp),
            Ok(Err(message)) => Err(AuditError::Io(std::io::Error::other(message))),
            Err(_) => Err(AuditError::Stopped),
        }
    }

    /// Records waiting for the writer now.
    pub fn backlog(&self) -> u64 {
        self.shared.backlog.load(Ordering::Relaxed)
    }

    /// `seq` of the last acknowledged record.
    pub fn last_seq(&self) -> u64 {
        self.shared.view.lock().map(|v| v.last_seq).unwrap_or(0)
    }

    /// `seq` of the last acknowledged record; changes are signalled.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        let rx = self.shared.head.subscribe();
        // `publish` does not signal a head nobody follows: bring it up to
        // date. A batch published meanwhile either updated the view before
        // this reads it, or sees this receiver and signals.
        let last = self.shared.view.lock().map(|v| v.last_seq).unwrap_or(0);
        self.shared.head.send_if_modified(|seq| {
            let newer = last > *seq;
            if newer {
                *seq = last;
            }
            newer
        });
        rx
    }

    /// Becomes `true` when the server stops; followers end then.
    pub fn closing(&self) -> watch::Receiver<bool> {
        self.shared.closing.subscribe()
    }

    /// Ends every follower (`TailEvents` streams), so that a graceful stop
    /// does not wait for them.
    pub fn close_followers(&self) {
        self.shared.closing.send_replace(true);
    }

    /// Records after `after_seq` that pass `filter`, at most `limit`, in
    /// `seq` order. Blocking (file reads): call it off the async runtime.
    pub fn list_events(
        &self,
        filter: &EventFilter,
        after_seq: u64,
        limit: usize,
    ) -> Result<EventPage, AuditError> {
        self.snapshot()?.list_events(filter, after_seq, limit)
    }

    /// The acknowledged content (records and checkpoints, as JSON lines),
    /// in chunks of at most `chunk` bytes passed to `sink`; stops early if
    /// `sink` returns `false`. Blocking: call it off the async runtime.
    pub fn export(
        &self,
        chunk: usize,
        sink: impl FnMut(Vec<u8>) -> bool,
    ) -> Result<u64, AuditError> {
        self.snapshot()?.export(chunk, sink)
    }

    /// `fsync`s done by the writer since start (`fsync` mode).
    pub fn syncs(&self) -> u64 {
        self.shared.view.lock().map_or(0, |v| v.syncs)
    }

    /// `write`s to the log since start (batches of records, checkpoints):
    /// records appended over `write`s is the group commit's mean batch.
    pub fn writes(&self) -> u64 {
        self.shared.view.lock().map_or(0, |v| v.writes)
    }

    /// The last checkpoint written, without writing one.
    pub fn last_checkpoint(&self) -> Option<Checkpoint> {
        self.shared
            .view
            .lock()
            .ok()
            .and_then(|v| v.last_checkpoint.clone())
    }

    /// A file handle and the view that goes with it, taken together so that
    /// a concurrent prune (which replaces the file) cannot mix them.
    fn snapshot(&self) -> Result<Snapshot, AuditError> {
        let view = self.shared.view.lock().map_err(|_| AuditError::Poisoned)?;
        Ok(Snapshot {
            file: File::open(&self.shared.path)?,
            len: view.len,
            index: view.index.clone(),
            last_seq: view.last_seq,
        })
    }

    /// Stops the writer after the queued records, with a final checkpoint.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Job::Shutdown);
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

impl Drop for AuditTrail {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn publish(shared: &Shared, log: &AuditLog) {
    if let Ok(mut view) = shared.view.lock() {
        view.len = log.len();
        let index = log.index();
        if view.index.len() != index.len() || view.index.first() != index.first() {
            // Usually the log's index only grew: copy the new entries, not
            // the whole index (it grows with the log).
            match index.get(view.index.len()..) {
                Some(new) if view.index.first() == index.first() && !view.index.is_empty() => {
                    view.index.extend_from_slice(new)
                }
                _ => view.index = index.to_vec(),
            }
        }
        view.last_seq = log.seq();
        // A new checkpoint comes every few thousand records: clone it then,
        // not after every batch.
        let latest = log.last_checkpoint();
        if view.last_checkpoint.as_ref().map(|c| (c.seq, &c.signature))
            != latest.map(|c| (c.seq, &c.signature))
        {
            view.last_checkpoint = latest.cloned();
        }
        view.syncs = log.syncs();
        view.writes = log.writes();
    }
    shared.healthy.store(!log.is_poisoned(), Ordering::SeqCst);
    // Signalled only when followed (`audit tail`): with nobody to wake it
    // costs a lock and a notification per batch. `subscribe` catches up.
    if shared.head.receiver_count() > 0 {
        shared.head.send_replace(log.seq());
    }
}

fn prune(log: &mut AuditLog, retention: Duration, options: &AuditLogOptions) {
    let ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    let cutoff = Timestamp(options.clock.now().0.saturating_sub(ms));
    match log.prune(cutoff) {
        Ok(Some(PruneReport {
            removed_records,
            anchor,
        })) => tracing::warn!(
            removed_records,
            anchor_seq = anchor.seq,
            "audit log retention: older records pruned; the log now starts from a signed anchor checkpoint"
        ),
        Ok(None) => {}
        Err(e) => tracing::error!(error = %e, "audit log retention: pruning failed; will retry"),
    }
}

/// A record counted in `backlog` from its `record` call to its answer,
/// or to the call's end if it is cancelled.
struct Waiting<'a>(&'a Shared);

impl<'a> Waiting<'a> {
    fn new(shared: &'a Shared) -> Self {
        shared.backlog.fetch_add(1, Ordering::Relaxed);
        Self(shared)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.backlog.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A record queued while its request yields (`queue_inline`): if the
/// request is dropped before it writes the queue, the writer thread does.
struct Queued<'a>(Option<&'a AuditTrail>);

impl Queued<'_> {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if let Some(trail) = self.0 {
            trail.hand_queue_over();
        }
    }
}

/// Returns `Pending` once, having asked to be polled again: the task goes
/// to the back of its thread's run queue (tokio's treatment of a task that
/// wakes itself), behind the tasks already runnable there. Unlike
/// `tokio::task::yield_now`, it does not wait for the runtime to poll its
/// I/O driver, which would hold the batch back for a round of reads.
struct YieldOnce(bool);

impl std::future::Future for YieldOnce {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.0 {
            return std::task::Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}

/// The queued records, or `None` if there are none.
fn take_batch(shared: &Shared) -> Option<Vec<(AuditEntry, Reply)>> {
    let mut q = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
    (!q.0.is_empty()).then(|| std::mem::take(&mut q.0))
}

/// Refuses every queued record (the writer is gone).
fn fail_queue(shared: &Shared, message: &str) {
    let mut q = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
    for (_, reply) in q.0.drain(..) {
        let _ = reply.send(Err(message.to_string()));
    }
}

/// Appends a batch with one `write` (and one `fsync` in `fsync` mode),
/// publishes the log's new state, then answers every record of it. Returns
/// the sync of a checkpoint the batch wrote, for the writer thread.
fn write_batch(
    shared: &Shared,
    log: &mut AuditLog,
    batch: Vec<(AuditEntry, Reply)>,
) -> Option<CheckpointSync> {
    let (entries, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
    let result = log.append_batch(entries);
    // Publish before answering: a caller that saw its record refused must
    // find the log unhealthy on its next request.
    publish(shared, log);
    match result {
        Ok(records) => {
            for (record, reply) in records.iter().zip(replies) {
                let _ = reply.send(Ok(record.seq));
            }
        }
        Err(e) => {
            let message = e.to_string();
            for reply in replies {
                let _ = reply.send(Err(message.clone()));
            }
        }
    }
    log.take_checkpoint_sync()
}

/// Syncs a checkpoint and tells the mark, without holding the log: records
/// keep being appended meanwhile. Returns whether it was done.
fn complete_sync(shared: &Shared, sync: &CheckpointSync) -> bool {
    match sync.complete() {
        Ok(()) => {
            if let Ok(mut log) = shared.log.lock() {
                log.count_sync();
            }
            true
        }
        Err(e) => {
            tracing::error!(
                seq = sync.seq(),
                error = %e,
                "audit log: syncing a checkpoint failed; no new checkpoint until it succeeds \
                 (retried every housekeeping interval)"
            );
            false
        }
    }
}

/// The writer thread: records in `fsync` mode (so that no request thread
/// waits for the disk), the inline queue when a request hands it over,
/// checkpoints on demand, and housekeeping (idle checkpoints, recovery
/// after a failed write, retention).
fn writer(rx: mpsc::Receiver<Job>, shared: Arc<Shared>, options: AuditTrailOptions) {
    const MAX_BATCH: usize = 4096;
    let lock = || WriterHold::take(&shared);
    let mut last_housekeeping = std::time::Instant::now();
    let mut last_batch = 0usize;
    let every_ms = i64::try_from(options.log.checkpoints.every.as_millis()).unwrap_or(i64::MAX);
    // A checkpoint whose sync failed, tried again at each housekeeping.
    let mut unsynced: Option<CheckpointSync> = None;
    let sync = |unsynced: &mut Option<CheckpointSync>, new: Option<CheckpointSync>| {
        if let Some(new) = new {
            *unsynced = Some(new);
        }
        if unsynced.as_ref().is_some_and(|s| complete_sync(&shared, s)) {
            *unsynced = None;
        }
    };
    loop {
        let first = match rx.recv_timeout(options.housekeeping_interval) {
            Ok(job) => Some(job),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => Some(Job::Shutdown),
        };
        // Under load (the last batch had company), let the batch fill for
        // a moment: senders do not wake a writer that is not waiting, so
        // this trades a few tens of microseconds of latency for far fewer
        // wake-ups (each costs a system call on both sides).
        if last_batch > 1 && matches!(first, Some(Job::Append(..))) {
            std::thread::sleep(BATCH_WINDOW);
        }
        let mut appends = Vec::new();
        let mut others = Vec::new();
        let mut drain = false;
        let mut shutdown = false;
        if let Some(job) = first {
            let mut next = Some(job);
            while let Some(job) = next {
                match job {
                    Job::Append(entry, reply) => appends.push((*entry, reply)),
                    Job::Drain => drain = true,
                    Job::Shutdown => shutdown = true,
                    Job::SyncCheckpoint(s) => sync(&mut unsynced, Some(s)),
                    other => others.push(other),
                }
                next = if appends.len() < MAX_BATCH && !shutdown {
                    rx.try_recv().ok()
                } else {
                    None
                };
            }
        }
        last_batch = appends.len();
        if !appends.is_empty() {
            let written = write_batch(&shared, &mut lock(), appends);
            sync(&mut unsynced, written);
        }
        if drain || shutdown {
            while let Some(batch) = take_batch(&shared) {
                let written = write_batch(&shared, &mut lock(), batch);
                sync(&mut unsynced, written);
            }
        }
        for job in others {
            if let Job::Checkpoint(reply) = job {
                let _ = reply.send(lock().checkpoint().map_err(|e| e.to_string()));
            }
        }
        let mut log = lock();
        if shutdown {
            shared.stopped.store(true, Ordering::SeqCst);
            if let Err(e) = log.checkpoint() {
                tracing::error!(error = %e, "audit log: final checkpoint failed");
            }
            publish(&shared, &log);
            drop(log);
            fail_queue(&shared, "the audit log is closed");
            return;
        }
        if last_housekeeping.elapsed() >= options.housekeeping_interval {
            last_housekeeping = std::time::Instant::now();
            if unsynced.is_some() {
                drop(log);
                sync(&mut unsynced, None);
                log = lock();
            }
            // Storage back after a failed write: serve again without
            // waiting for a request to try.
            if log.is_poisoned() {
                let _ = log.recover();
            }
            // An idle log still gets its checkpoint on time.
            let now = options.log.clock.now();
            if log.since_checkpoint() > 0
                && now.0.saturating_sub(log.last_checkpoint_time().0) >= every_ms
            {
                if let Err(e) = log.checkpoint() {
                    tracing::error!(error = %e, "audit log: periodic checkpoint failed");
                }
            }
            if let Some(retention) = options.retention {
                prune(&mut log, retention, &options.log);
            }
        }
        publish(&shared, &log);
    }
}

#[cfg(test)]
mod tests {
    use std::task::Poll;

    use super::*;
    use crate::audit::log::{CheckpointPolicy, HighWaterMark};
    use crate::audit::record::tests::entry;

    fn keys() -> AuditKeys {
        AuditKeys::from_secret(&[9u8; 64]).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fsync_mode_group_commits_concurrent_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let options = AuditTrailOptions {
            log: AuditLogOptions {
                durability: Durability::Fsync,
                checkpoints: CheckpointPolicy {
                    every_records: 50,
                    every: Duration::from_secs(3600),
                },
                ..AuditLogOptions::default()
            },
            ..AuditTrailOptions::default()
        };
        let auditor = Arc::new(AuditTrail::open(&path, keys(), options).unwrap());
        let tasks: Vec<_> = (0..400)
            .map(|n| {
                let a = Arc::clone(&auditor);
                tokio::spawn(async move { a.record(entry(n)).await })
            })
            .collect();
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await.unwrap().unwrap());
        }
        seqs.sort_unstable();
        assert_eq!(
            seqs,
            (1..=400).collect::<Vec<u64>>(),
            "each acknowledged once"
        );
        let syncs = auditor.syncs();
        assert!((1..400).contains(&syncs), "{syncs} fsyncs for 400 records");
        // Readers see every acknowledged record, in order, filtered and paged.
        let page = auditor
            .list_events(&EventFilter::default(), 0, 1000)
            .unwrap();
        assert_eq!(page.records.len(), 400);
        assert_eq!(page.next_after_seq, None);
        let page = auditor
            .list_events(&EventFilter::default(), 300, 10)
            .unwrap();
        assert_eq!(page.records.first().map(|r| r.seq), Some(301));
        assert_eq!(page.next_after_seq, Some(310));
        auditor.shutdown();
        // The final checkpoint covers everything.
        let text = std::fs::read(&path).unwrap();
        let report = crate::audit::verify(text.as_slice(), &auditor.public_key(), |_| {}).unwrap();
        assert_eq!((report.records, report.uncovered_records), (400, 0));
    }

    /// `write` mode: requests write their own batches; every record is
    /// written once, in one chain, and nothing is appended after the
    /// shutdown.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn write_mode_requests_write_their_batches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let options = AuditTrailOptions {
            log: AuditLogOptions {
                durability: Durability::Write,
                checkpoints: CheckpointPolicy {
                    every_records: 100,
                    every: Duration::from_secs(3600),
                },
                ..AuditLogOptions::default()
            },
            ..AuditTrailOptions::default()
        };
        let auditor = Arc::new(AuditTrail::open(&path, keys(), options).unwrap());
        assert!(auditor.inline);
        let tasks: Vec<_> = (0..200)
            .map(|t| {
                let a = Arc::clone(&auditor);
                tokio::spawn(async move {
                    let mut seqs = Vec::new();
                    for n in 0..10 {
                        seqs.push(a.record(entry(t * 10 + n)).await.unwrap());
                    }
                    seqs
                })
            })
            .collect();
        // Checkpoints on demand make the writer thread hold the log now and
        // then: requests that find it busy hand their queue over.
        let checkpoints = {
            let a = Arc::clone(&auditor);
            tokio::spawn(async move {
                for _ in 0..50 {
                    a.checkpoint().await.unwrap();
                    tokio::task::yield_now().await;
                }
            })
        };
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.extend(t.await.unwrap());
        }
        checkpoints.await.unwrap();
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=2000).collect::<Vec<u64>>());
        assert_eq!(auditor.backlog(), 0);
        assert_eq!(auditor.last_seq(), 2000);
        auditor.shutdown();
        assert!(auditor.record(entry(9999)).await.is_err(), "closed");
        let text = std::fs::read(&path).unwrap();
        let report = crate::audit::verify(text.as_slice(), &auditor.public_key(), |_| {}).unwrap();
        assert_eq!((report.records, report.uncovered_records), (2000, 0));
    }

    /// Nobody follows the head while records come: no signal is sent, but
    /// a follower that subscribes afterwards starts from the true head,
    /// and is signalled of the records after it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_late_follower_starts_from_the_head() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let auditor = AuditTrail::open(&path, keys(), AuditTrailOptions::default()).unwrap();
        for n in 0..5 {
            auditor.record(entry(n)).await.unwrap();
        }
        assert_eq!(auditor.last_seq(), 5);
        let mut rx = auditor.subscribe();
        assert_eq!(*rx.borrow_and_update(), 5);
        auditor.record(entry(5)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("signalled")
            .unwrap();
        assert_eq!(*rx.borrow(), 6);
    }

    /// A mark that notes the thread each checkpoint reached it on.
    #[derive(Debug, Default)]
    struct ThreadMark {
        told: Mutex<Vec<(u64, Option<String>)>>,
    }

    impl HighWaterMark for ThreadMark {
        fn remember(&self, checkpoint: &Checkpoint) {
            let thread = std::thread::current().name().map(str::to_string);
            self.told.lock().unwrap().push((checkpoint.seq, thread));
        }
        fn remembered(&self) -> Option<u64> {
            self.told.lock().unwrap().last().map(|(seq, _)| *seq)
        }
    }

    /// `write` mode with a mark: a checkpoint a request's batch carries is
    /// synced, and the mark told, by the writer thread, never by the
    /// request (whose thread serves other requests and must not wait for
    /// the disk); every checkpoint still reaches the mark, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn write_mode_syncs_checkpoints_on_the_writer_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mark = Arc::new(ThreadMark::default());
        let options = AuditTrailOptions {
            log: AuditLogOptions {
                durability: Durability::Write,
                checkpoints: CheckpointPolicy {
                    every_records: 10,
                    every: Duration::from_secs(3600),
                },
                mark: Some(mark.clone()),
                ..AuditLogOptions::default()
            },
            ..AuditTrailOptions::default()
        };
        let auditor = Arc::new(AuditTrail::open(&path, keys(), options).unwrap());
        // Five rounds of 200 concurrent records; each round starts once the
        // mark has caught up, so each signs at least one checkpoint.
        for round in 0..5u64 {
            let tasks: Vec<_> = (0..20)
                .map(|t| {
                    let a = Arc::clone(&auditor);
                    tokio::spawn(async move {
                        for n in 0..10 {
                            a.record(entry(round * 200 + t * 10 + n)).await.unwrap();
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
            // The round's last sync may still be on its way to the writer.
            for _ in 0..2000 {
                if auditor.last_checkpoint().map(|c| c.seq) == mark.remembered() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let told = mark.told.lock().unwrap().clone();
        assert!(told.len() >= 5, "{told:?}");
        assert!(
            told.iter()
                .all(|(_, thread)| thread.as_deref() == Some("coffre-audit")),
            "{told:?}"
        );
        assert!(told.windows(2).all(|w| w[0].0 < w[1].0), "{told:?}");
        assert_eq!(auditor.syncs(), told.len() as u64);
        assert_eq!(auditor.last_checkpoint().map(|c| c.seq), mark.remembered());
        auditor.shutdown();
        let text = std::fs::read(&path).unwrap();
        let report = crate::audit::verify(text.as_slice(), &auditor.public_key(), |_| {}).unwrap();
        assert_eq!(report.records, 1000);
    }

    /// A request that finds the log held by a holder that may keep it long
    /// (the writer thread; a checkpoint's signing, maybe by an HSM) does not
    /// wait for the lock: its thread goes on serving, and the writer thread
    /// writes the record once the log is free. On a single-threaded runtime
    /// a request blocked on the lock would stall this test's own timer.
    #[tokio::test(flavor = "current_thread")]
    async fn a_slow_holder_gets_the_queue_handed_to_the_writer_thread() {
        for signing in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("audit.log");
            let auditor =
                Arc::new(AuditTrail::open(&path, keys(), AuditTrailOptions::default()).unwrap());
            // Another thread holds the log, flagged slow, until told to let
            // go (or for 5 s at most).
            let (locked_tx, locked_rx) = std::sync::mpsc::channel();
            let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
            let holder = {
                let a = Arc::clone(&auditor);
                std::thread::spawn(move || {
                    let flag = if signing {
                        &a.shared.signing
                    } else {
                        &a.shared.writer_holds
                    };
                    let held = a.shared.log.lock().unwrap();
                    flag.store(true, Ordering::SeqCst);
                    locked_tx.send(()).unwrap();
                    let _ = release_rx.recv_timeout(Duration::from_secs(5));
                    flag.store(false, Ordering::SeqCst);
                    drop(held);
                })
            };
            locked_rx.recv().unwrap();
            let a = Arc::clone(&auditor);
            let pending = tokio::spawn(async move { a.record(entry(1)).await });
            let started = std::time::Instant::now();
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "the request waited for the slow holder (signing: {signing})"
            );
            assert!(!pending.is_finished(), "written while the log was held");
            assert_eq!(auditor.backlog(), 1);
            release_tx.send(()).unwrap();
            holder.join().unwrap();
            let seq = tokio::time::timeout(Duration::from_secs(10), pending)
                .await
                .expect("the writer thread wrote the handed-over queue")
                .unwrap()
                .unwrap();
            assert_eq!(seq, 1);
            // The next record is written by its own request again.
            assert_eq!(auditor.record(entry(2)).await.unwrap(), 2);
        }
    }

    /// Polls `fut` once, with a waker that does nothing.
    fn poll_once<F: Future>(fut: std::pin::Pin<&mut F>) -> Poll<F::Output> {
        fut.poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
    }

    /// What the first poll of a request's `record` of `entry(n)` gives.
    fn first_poll(auditor: &AuditTrail, n: u64) -> Poll<Result<u64, AuditError>> {
        poll_once(std::pin::pin!(auditor.record(entry(n))))
    }

    /// Group commit: a request alone writes its record at once; requests
    /// that come together share one `write`; grouping ends with the first
    /// request that writes alone again.
    #[tokio::test(flavor = "current_thread")]
    async fn requests_that_come_together_share_a_write() {
        let dir = tempfile::tempdir().unwrap();
        let auditor = Arc::new(
            AuditTrail::open(
                &dir.path().join("audit.log"),
                keys(),
                AuditTrailOptions::default(),
            )
            .unwrap(),
        );
        // Alone: written in the first poll, without yielding.
        assert!(matches!(first_poll(&auditor, 0), Poll::Ready(Ok(1))));
        assert!(!auditor.shared.grouping.load(Ordering::SeqCst));

        // Overlapping requests (here: as if the last writer had waited for
        // the log) yield once and share one write.
        auditor.shared.grouping.store(true, Ordering::SeqCst);
        let writes = auditor.writes();
        let tasks: Vec<_> = (1..=50)
            .map(|n| {
                let a = Arc::clone(&auditor);
                tokio::spawn(async move { a.record(entry(n)).await.unwrap() })
            })
            .collect();
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await.unwrap());
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (2..=51).collect::<Vec<u64>>());
        assert_eq!(auditor.writes() - writes, 1, "50 records in one write");
        assert!(auditor.shared.grouping.load(Ordering::SeqCst));

        // The next request alone yields once, writes alone, and turns
        // grouping off: the one after it is written in its first poll.
        let mut first = Box::pin(auditor.record(entry(60)));
        assert!(poll_once(first.as_mut()).is_pending(), "yielded once");
        assert!(matches!(poll_once(first.as_mut()), Poll::Ready(Ok(52))));
        assert!(!auditor.shared.grouping.load(Ordering::SeqCst));
        assert!(matches!(first_poll(&auditor, 61), Poll::Ready(Ok(53))));
        assert_eq!(auditor.backlog(), 0);
    }

    /// A request cancelled while it yields, its record queued and not yet
    /// written: the writer thread writes it, and the backlog forgets it.
    #[tokio::test(flavor = "current_thread")]
    async fn a_record_queued_by_a_cancelled_request_is_still_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let auditor = AuditTrail::open(&path, keys(), AuditTrailOptions::default()).unwrap();
        auditor.shared.grouping.store(true, Ordering::SeqCst);
        let mut cancelled = Box::pin(auditor.record(entry(7)));
        assert!(poll_once(cancelled.as_mut()).is_pending());
        assert_eq!(auditor.backlog(), 1);
        drop(cancelled);
        assert_eq!(auditor.backlog(), 0);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while auditor.last_seq() < 1 {
            assert!(std::time::Instant::now() < deadline, "the record was lost");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        auditor.shutdown();
        let text = std::fs::read(&path).unwrap();
        let report = crate::audit::verify(text.as_slice(), &auditor.public_key(), |_| {}).unwrap();
        assert_eq!(report.records, 1);
    }
}
