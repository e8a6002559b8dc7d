//! The audit log as the server opens it: where it is, how it behaves, and
//! which key signs its checkpoints.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;

use crate::audit::{
    AuditTrail, AuditTrailOptions, Checkpoint, CheckpointObserver, ExternalSigner, HighWaterMark,
};
use crate::cluster::audit::CheckpointQueue;
use crate::service::Kms;
use crate::service::{AUDIT_MARK_NAME, node_audit_mark_name};

/// Where the audit log is and how it behaves.
#[derive(Clone, Debug)]
pub struct AuditSetup {
    pub path: PathBuf,
    pub options: AuditTrailOptions,
    /// Where to write the checkpoint public key (PEM), if anywhere.
    pub public_key_file: Option<PathBuf>,
    /// A checkpoint key held by the HSM, instead of the one kept in the store.
    pub external_signer: Option<Arc<dyn ExternalSigner>>,
    /// The operator accepts, for this start only, that the audit log is
    /// behind the high-water mark in the store (the log was lost and
    /// cannot be restored): the mark is set aside, the log is opened as it
    /// is, and the loss is the log's next record (`--accept-audit-log-loss`).
    pub accept_log_loss: bool,
    /// On a store shared by several nodes: this node's own high-water
    /// mark ([`NodeMark`]). `None`: the store's one mark (a store of one
    /// server, sled).
    pub node_mark: Option<NodeMark>,
}

/// The high-water mark of one node's audit log in a store that several
/// nodes share (PostgreSQL): the service secret
/// [`node_audit_mark_name`]`(node id)`, beside the single server's
/// [`AUDIT_MARK_NAME`].
#[derive(Clone, Debug)]
pub struct NodeMark {
    name: String,
}

impl NodeMark {
    /// Node `node_id`'s mark.
    pub fn new(node_id: &str) -> Self {
        Self {
            name: node_audit_mark_name(node_id),
        }
    }

    /// The service secret's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The service secret that holds the mark.
fn mark_name(node: Option<&NodeMark>) -> &str {
    node.map_or(AUDIT_MARK_NAME, NodeMark::name)
}

impl AuditSetup {
    pub fn new(path: PathBuf, options: AuditTrailOptions) -> Self {
        Self {
            path,
            options,
            public_key_file: None,
            external_signer: None,
            accept_log_loss: false,
            node_mark: None,
        }
    }

    /// The log of node `node_id` of a cluster: its checkpoints name the
    /// node (format v3) and go, once durable, to the returned queue, from
    /// which they are published ([`crate::cluster::audit`]).
    pub fn join_cluster(&mut self, node_id: &str) -> Arc<CheckpointQueue> {
        let queue = Arc::new(CheckpointQueue::default());
        self.options.log.node = Some(node_id.to_string());
        self.options.log.observer = Some(Arc::clone(&queue) as Arc<dyn CheckpointObserver>);
        queue
    }
}

/// The audit log's high-water mark in the store: each checkpoint, once
/// durable in the log, is handed to a task that wraps it under the HSM root
/// key and stores it ([`Kms::put_audit_mark`]); `remembered` is the `seq`
/// of the last one stored (0: none). The log signs no new checkpoint until
/// the previous one is stored, so the store is at most one behind.
#[derive(Debug)]
pub(super) struct StoreMark {
    tx: mpsc::UnboundedSender<Checkpoint>,
    remembered: Arc<AtomicU64>,
    /// The `seq` of the last checkpoint handed to the task.
    sent: AtomicU64,
}

impl StoreMark {
    /// Waits (at most `limit`) until the last checkpoint handed over is
    /// stored: a server that stops after its final checkpoint leaves the
    /// store's mark on it, and no task holding the core behind it.
    pub(super) async fn settle(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.remembered.load(Ordering::Acquire) >= self.sent.load(Ordering::Acquire) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl HighWaterMark for StoreMark {
    fn remember(&self, checkpoint: &Checkpoint) {
        self.sent.fetch_max(checkpoint.seq, Ordering::AcqRel);
        // The task has stopped only when the server is stopping.
        let _ = self.tx.send(checkpoint.clone());
    }

    fn remembered(&self) -> Option<u64> {
        let seq = self.remembered.load(Ordering::Acquire);
        (seq > 0).then_some(seq)
    }
}

/// How long the mark's task waits before storing again after a failure
/// (the HSM or the store unavailable); checkpoints wait meanwhile.
const MARK_RETRY: Duration = Duration::from_secs(1);

fn start_mark(kms: &Arc<Kms>, stored: Option<u64>, node: Option<NodeMark>) -> Arc<StoreMark> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Checkpoint>();
    let remembered = Arc::new(AtomicU64::new(stored.unwrap_or(0)));
    let done = Arc::clone(&remembered);
    // Weak: the trail (inside the core) holds the sender; the task must not
    // keep the core alive.
    let kms: Weak<Kms> = Arc::downgrade(kms);
    tokio::spawn(async move {
        while let Some(mut checkpoint) = rx.recv().await {
            while let Ok(newer) = rx.try_recv() {
                checkpoint = newer;
            }
            loop {
                let Some(core) = kms.upgrade() else {
                    return;
                };
                let result = match checkpoint.to_line() {
                    Ok(line) => core
                        .put_audit_mark(mark_name(node.as_ref()), line.as_bytes())
                        .await
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                drop(core);
                match result {
                    Ok(()) => {
                        done.fetch_max(checkpoint.seq, Ordering::AcqRel);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(
                            seq = checkpoint.seq,
                            error = %e,
                            "cannot store the audit log's high-water mark; the next checkpoint waits for it"
                        );
                        tokio::time::sleep(MARK_RETRY).await;
                    }
                }
            }
        }
    });
    Arc::new(StoreMark {
        tx,
        remembered,
        sent: AtomicU64::new(0),
    })
}

/// The mark the store holds, if it applies to this signing key.
async fn stored_mark(
    kms: &Kms,
    node: Option<&NodeMark>,
    public_key: &[u8; 32],
) -> anyhow::Result<Option<Checkpoint>> {
    let what = "loading the audit log's high-water mark (HSM-wrapped, in the store)";
    let stored = kms.audit_mark(mark_name(node)).await.context(what)?;
    let Some(clear) = stored else {
        return Ok(None);
    };
    let text = std::str::from_utf8(clear.expose())
        .context("the stored audit high-water mark is not UTF-8")?;
    let mark = Checkpoint::from_line(text)
        .map_err(|e| anyhow::anyhow!("the stored audit high-water mark is unreadable: {e}"))?;
    if !mark.signature_is_valid(public_key) {
        // Not this key's: the key changed (audit.checkpoint_key), and the
        // log under the new key is a new log (see the error of open_trail).
        tracing::warn!(
            seq = mark.seq,
            "the audit high-water mark in the store was signed by another audit key; \
             the audit signing key changed, so this log is not checked against it"
        );
        return Ok(None);
    }
    Ok(Some(mark))
}

/// The principal and operation of the record that says an operator
/// accepted the loss of the audit log (`--accept-audit-log-loss`).
pub const LOG_LOSS_PRINCIPAL: &str = "coffre/operator-override";
pub const LOG_LOSS_OPERATION: &str = "AcceptAuditLogLoss";

/// Loads (or, on a new data directory, creates) the audit log's keys and
/// opens the log, verifying it against the high-water mark in the store;
/// writes the public key file if asked.
/// Returns the trail and, unless records are discarded, the mark's handle.
///
/// A log behind the mark is refused, unless the operator accepted its loss
/// for this start ([`AuditSetup::accept_log_loss`]): then the mark is set
/// aside, the log opened as it is, and its next record, before any request,
/// names the checkpoint that was lost. A store rolled back behind the log
/// is refused in every case.
pub(super) async fn open_trail(
    kms: &Arc<Kms>,
    setup: &AuditSetup,
) -> anyhow::Result<(Arc<AuditTrail>, Option<Arc<StoreMark>>)> {
    let (trail, store_mark) = match open_once(kms, setup, true).await {
        Err(OpenError::BehindMark(e, mark)) if setup.accept_log_loss => {
            tracing::error!(
                error = %e,
                "--accept-audit-log-loss: the audit log is behind the high-water mark; \
                 setting the mark aside and recording the loss"
            );
            let (trail, store_mark) = open_once(kms, setup, false)
                .await
                .map_err(OpenError::into_inner)?;
            let detail = format!(
                "audit log loss accepted by the operator at start: the store remembered the \
                 checkpoint at seq {} ({}, log id {}), which this log does not contain",
                mark.seq,
                mark.time.to_rfc3339(),
                mark.log_id.as_deref().unwrap_or("none"),
            );
            trail
                .record(crate::audit::AuditEntry {
                    request_id: uuid::Uuid::new_v4().to_string(),
                    principal: LOG_LOSS_PRINCIPAL.to_string(),
                    operation: LOG_LOSS_OPERATION.to_string(),
                    detail: Some(detail),
                    outcome: crate::audit::Outcome::Allowed,
                    status_code: "OK".to_string(),
                    ..crate::audit::AuditEntry::empty()
                })
                .await
                .context("recording the accepted loss of the audit log")?;
            // Signed and remembered at once: a crash before the next
            // checkpoint must not find the old mark again.
            trail
                .checkpoint()
                .await
                .context("signing a checkpoint after the accepted loss of the audit log")?;
            if let Some(mark) = &store_mark
                && !mark.settle(Duration::from_secs(10)).await
            {
                anyhow::bail!(
                    "the new audit high-water mark could not be stored within 10 s (HSM or \
                     store unavailable); nothing was served, start again"
                );
            }
            (trail, store_mark)
        }
        Err(OpenError::BehindMark(e, _)) => {
            return Err(e.context(
                "if the log is truly lost (no backup, no export), start once with \
                 --accept-audit-log-loss: the loss is then the new log's first record",
            ));
        }
        other => other.map_err(OpenError::into_inner)?,
    };
    if setup.accept_log_loss && store_mark.is_some() {
        tracing::warn!(
            "--accept-audit-log-loss was given; it applies to this start only and is not \
             needed again"
        );
    }
    finish_open(setup, trail, store_mark)
}

enum OpenError {
    /// The log is behind the store's mark (which is given).
    BehindMark(anyhow::Error, Checkpoint),
    Other(anyhow::Error),
}

impl OpenError {
    fn into_inner(self) -> anyhow::Error {
        match self {
            Self::BehindMark(e, _) | Self::Other(e) => e,
        }
    }
}

impl From<anyhow::Error> for OpenError {
    fn from(e: anyhow::Error) -> Self {
        Self::Other(e)
    }
}

type Opened = (AuditTrail, Option<Arc<StoreMark>>);

/// One attempt to open the log: against the store's mark, or (`honour_mark`
/// false) with the mark set aside and a fresh one started from the log.
async fn open_once(
    kms: &Arc<Kms>,
    setup: &AuditSetup,
    honour_mark: bool,
) -> Result<Opened, OpenError> {
    let mut keys = kms
        .audit_keys()
        .await
        .context("loading the audit log's signing key (HSM-wrapped, in the store)")?;
    if let Some(signer) = &setup.external_signer {
        keys.signer = crate::audit::CheckpointSigner::external(Arc::clone(signer));
    }
    let path = setup.path.clone();
    let mut options = setup.options.clone();
    let mut store_mark = None;
    let mut high_water = None;
    if !options.discard {
        let mark = if honour_mark {
            stored_mark(kms, setup.node_mark.as_ref(), &keys.signer.public_key()).await?
        } else {
            None
        };
        match &mark {
            Some(m) => tracing::debug!(seq = m.seq, "audit high-water mark loaded"),
            None if honour_mark => tracing::info!(
                file = %path.display(),
                "no audit high-water mark in the store yet (a new data directory, or one from \
                 before coffre kept one): adopting the log's current head"
            ),
            None => {}
        }
        let handle = start_mark(kms, mark.as_ref().map(|m| m.seq), setup.node_mark.clone());
        store_mark = Some(Arc::clone(&handle));
        options.log.mark = Some(handle);
        options.log.high_water = mark.clone();
        high_water = mark;
    }
    let opened = tokio::task::spawn_blocking(move || AuditTrail::open(&path, keys, options))
        .await
        .context("opening the audit log")?;
    let trail = match opened {
        Ok(trail) => trail,
        Err(e) => {
            let behind = matches!(e, crate::audit::AuditError::BehindMark(_));
            let e = anyhow::Error::new(e).context(format!(
                "opening the audit log {}{}",
                setup.path.display(),
                if setup.external_signer.is_some() {
                    " (its checkpoints must verify under the HSM's audit signing key: a log \
                     begun with audit.checkpoint_key = \"software\" cannot continue under it; \
                     start a new log file with audit.path and keep the old one)"
                } else {
                    ""
                }
            ));
            return Err(match high_water {
                Some(mark) if behind => OpenError::BehindMark(e, mark),
                _ => OpenError::Other(e),
            });
        }
    };
    Ok((trail, store_mark))
}

fn finish_open(
    setup: &AuditSetup,
    trail: AuditTrail,
    store_mark: Option<Arc<StoreMark>>,
) -> anyhow::Result<(Arc<AuditTrail>, Option<Arc<StoreMark>>)> {
    if let Some(file) = &setup.public_key_file {
        let pem = trail.public_key_pem();
        if std::fs::read_to_string(file).ok().as_deref() != Some(pem.as_str()) {
            crate::fsutil::write_atomic(file, pem.as_bytes(), false)
                .with_context(|| format!("writing {}", file.display()))?;
        }
    }
    tracing::info!(file = %setup.path.display(), "audit log open and verified");
    Ok((Arc::new(trail), store_mark))
}
