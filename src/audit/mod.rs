//! The audit log: one record per request, in a hash chain, with signed
//! checkpoints, verifiable offline.
//!
//! The files, each depending only on those above it:
//!
//! - [`record`]: [`AuditEntry`] (what a writer supplies), [`AuditRecord`]
//!   (one line) and its canonical encoding, the hash chain's link
//!   (`prev_hash`, [`GENESIS_HASH`]), and the keyed context digest.
//! - [`checkpoint`]: the signed [`Checkpoint`] and its v1 encoding, the
//!   [`CheckpointSigner`] (in memory, or an [`ExternalSigner`] in an HSM),
//!   and the public key's PEM form.
//! - [`mod@verify`]: the offline verifier an auditor runs on an exported log;
//!   it knows the formats above and nothing of the writer.
//! - [`log`]: [`AuditLog`], the append-only writer over a JSON-lines file
//!   (open and verify, group-commit batches, checkpoints, recovery after a
//!   failed write, retention).
//! - [`reader`]: the trail's read side: pages of records ([`EventFilter`],
//!   [`EventPage`]) and the export, from a snapshot of the file.
//! - [`trail`]: [`AuditTrail`], the server's audit log: the writer thread
//!   with its group commit, the asynchronous API request handlers record
//!   through, checkpoints on demand, retention, followers.
//! - [`keys`]: [`AuditKeys`], the checkpoint key and the digest key, from
//!   one HSM-wrapped service secret.
//! - [`digest`]: several nodes (#17): a node's checkpoint as published to
//!   the database, and the signed cluster [`Digest`] chain of every node's
//!   head.
//! - [`cluster`]: the offline verifier of a cluster's export (every node's
//!   log and the digests, together).
//!
//! # File format
//!
//! UTF-8, one JSON object per line, each line ending in `\n`. A line is
//! either a record (the fields of [`AuditRecord`], as an object) or a
//! checkpoint, wrapped as `{"checkpoint": {...}}`. Every line is the
//! canonical (compact, fixed field order) encoding of what it holds, byte
//! for byte. Records carry `seq`
//! 1, 2, 3, ... without gaps; the first record's `prev_hash` is 64 zeros
//! (`GENESIS_HASH`), every other record's `prev_hash` is the previous record's
//! `hash`. A checkpoint signs (log id, key fingerprint, `seq`, `head_hash`)
//! of the record just before it (version 2; version 1, before #15, signed
//! `seq` and `head_hash` only; version 3, a node of a cluster, also names
//! the node): [`checkpoint`] has the layouts.
//!
//! A log may instead start with an *anchor* checkpoint (a log whose older
//! records were archived away): its signature is checked, and the first
//! record must then continue from the anchor's `seq` and `head_hash`.
//!
//! # What the chain proves, precisely
//!
//! With the checkpoint public key (obtained out of band), [`verify::verify`]
//! detects any edit of a record, any deletion, insertion or reordering of
//! records *that is followed by a checkpoint or an unmodified record*, a
//! forged or altered checkpoint, and the removal of records that a surviving
//! checkpoint covers. It cannot detect, from the file alone, the removal or
//! rewriting of the records *after the last checkpoint* (the tail is only
//! hash-chained, and anyone can recompute a chain): truncating the file at
//! any point, including its checkpoints, yields a shorter, valid-looking log.
//! Truncation is detected against a checkpoint the auditor obtained
//! independently (a previous export, a published head): pass it to
//! [`verify::verify_with_checkpoint`], and a log that does not reach it fails.
//! The writer bounds the unprotected tail by checkpointing every N records or
//! T seconds; `coffre audit verify` refuses a tail longer than
//! `--max-unsigned` ([`verify::DEFAULT_MAX_UNSIGNED`]), a log that does not
//! start at seq 1 (unless `--allow-anchored`), an empty log and a log
//! without a signed checkpoint ([`verify::Policy`]).
//!
//! The server keeps a *high-water mark* outside the log: after each
//! checkpoint is durable, it is stored, HSM-wrapped, in the key store
//! ([`log::HighWaterMark`], `server::audit`), and coffre refuses to start on
//! a log that does not contain the remembered checkpoint (deleted, truncated,
//! replaced), or that holds two checkpoints after it (the store was rolled
//! back). A new checkpoint is signed only once the previous one is
//! remembered, so a crash leaves the mark at most one checkpoint behind.

pub mod checkpoint;
pub mod cluster;
pub mod digest;
pub mod keys;
pub mod log;
pub mod reader;
pub mod record;
pub mod trail;
pub mod verify;

#[cfg(test)]
mod golden_tests;

pub use checkpoint::{
    Checkpoint, CheckpointSigner, ExternalSigner, key_fingerprint, public_key_from_pem,
    public_key_to_pem,
};
pub use digest::{Digest, NodeHead, PublishedCheckpoint, UnsignedDigest};
pub use keys::AuditKeys;
pub use log::{
    AuditLog, AuditLogOptions, CheckpointObserver, CheckpointPolicy, Durability, HighWaterMark,
};
pub use reader::{EventFilter, EventPage};
pub use record::{AuditDigestKey, AuditEntry, AuditItem, AuditRecord, GENESIS_HASH, Outcome};
pub use trail::{AuditTrail, AuditTrailOptions, ClearContext};
pub use verify::{
    Policy, PolicyFailure, VerifyError, VerifyFailure, VerifyReport, verify,
    verify_with_checkpoint, verify_with_checkpoints,
};

/// Errors of the audit log writer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    #[error("audit log I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The existing file is not a valid log (other than a torn last line).
    #[error("audit log is corrupt: {0}")]
    Corrupt(#[from] VerifyError),
    /// Another process holds the log's lock.
    #[error("audit log is locked by another process")]
    Locked,
    /// An earlier write failed part-way; the log refuses further appends
    /// until it is reopened (which truncates a torn line). Fail closed.
    #[error("audit log unusable after an earlier write failure; reopen it")]
    Poisoned,
    /// The writer thread has stopped (the server is shutting down).
    #[error("the audit log writer has stopped")]
    Stopped,
    #[error("invalid checkpoint signing key")]
    InvalidKey,
    /// The key held by an HSM did not sign (unavailable, refused).
    #[error("the checkpoint signing key did not sign: {0}")]
    Signing(String),
    #[error("cannot encode an audit record: {0}")]
    Encode(String),
    /// The log does not contain the checkpoint the store remembers.
    #[error("{0}")]
    BehindMark(String),
    /// The log holds two checkpoints after the one the store remembers.
    #[error("{0}")]
    MarkRolledBack(String),
    /// The log's checkpoints name another node than the one opening it.
    #[error("{0}")]
    WrongNode(String),
}
