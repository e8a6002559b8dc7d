//! The errors of connecting to PostgreSQL and of its schema.
//!
//! Every message names the server by its redacted URL
//! ([`super::connect::redacted`]), and the text PostgreSQL or the client
//! library gave is scrubbed of the password before it is kept
//! ([`super::connect::PgConnector`] does both), so that no error, log line
//! or `--json` object carries it.

/// Connecting to PostgreSQL, or its schema, failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgError {
    /// The URL (or the settings around it) is not usable as given.
    #[error("the database URL {source_name} {why}")]
    Url { source_name: String, why: String },
    /// `store.ca_file` could not be read or holds no usable certificate.
    #[error("store.ca_file {path} {why}")]
    CaFile { path: String, why: String },
    /// No server answered: a wrong host or port, nothing listening, a
    /// firewall, or the connect timeout.
    #[error("cannot reach PostgreSQL at {target}: {detail}")]
    Unreachable { target: String, detail: String },
    /// The server refused who we said we are (a wrong password, a
    /// pg_hba.conf rule, a missing role).
    #[error("PostgreSQL at {target} refused the login of user {user:?}: {detail}")]
    Authentication {
        target: String,
        user: String,
        detail: String,
    },
    /// The database named in the URL does not exist on the server.
    #[error(
        "PostgreSQL at {target} has no database {database:?}: create it (see docs/postgres.md) \
         or correct the URL"
    )]
    NoDatabase { target: String, database: String },
    /// The TLS handshake failed (the server's certificate does not chain to
    /// `store.ca_file`, names another host, or the server has no TLS).
    #[error("TLS with PostgreSQL at {target} failed: {detail}")]
    Tls { target: String, detail: String },
    /// The server is a standby (in recovery): coffre writes only to a
    /// primary.
    #[error(
        "PostgreSQL at {target} (server {server}) is in recovery, a standby: coffre needs the \
         primary (point the URL at it, or list every host with target_session_attrs=read-write)"
    )]
    InRecovery { target: String, server: String },
    /// `cluster.require_synchronous_standby` is set, and the primary's
    /// commits wait for no standby (`synchronous_standby_names` is empty).
    #[error(
        "PostgreSQL at {target} (server {server}) has no synchronous standby \
         (synchronous_standby_names is empty) and cluster.require_synchronous_standby is set: \
         an acknowledged write could be lost in a failover"
    )]
    NoSynchronousStandby { target: String, server: String },
    /// The server is older than coffre supports.
    #[error("PostgreSQL at {target} is version {version}; coffre needs 15 or later")]
    ServerTooOld { target: String, version: String },
    /// The database has no coffre schema at all.
    #[error(
        "the database at {target} has no coffre schema: run `coffre store migrate --config FILE` \
         first"
    )]
    SchemaMissing { target: String },
    /// The schema is older than this binary needs.
    #[error(
        "the database at {target} has schema version {version}, this coffre needs {required}: \
         run `coffre store migrate --config FILE`"
    )]
    SchemaOlder {
        target: String,
        version: i32,
        required: i32,
    },
    /// The schema is newer than this binary knows: a newer coffre migrated
    /// it.
    #[error(
        "the database at {target} has schema version {version}, newer than this coffre knows \
         ({known}): upgrade coffre"
    )]
    SchemaNewer {
        target: String,
        version: i32,
        known: i32,
    },
    /// An applied migration is not the one this binary has: its file was
    /// edited after release, or the row was.
    #[error(
        "the database at {target} records migration {version} ({name}) with checksum \
         {stored}, this coffre's file has {expected}: refusing to touch a schema it does not know"
    )]
    ChecksumMismatch {
        target: String,
        version: i32,
        name: String,
        stored: String,
        expected: String,
    },
    /// The role lacks a privilege (e.g. `coffre_app`, which has no DDL,
    /// running `coffre store migrate`).
    #[error(
        "PostgreSQL at {target} refused a statement: {detail} (`coffre store migrate` connects \
         as the schema's owner, coffre_owner; `coffre serve` as coffre_app)"
    )]
    Permission { target: String, detail: String },
    /// A statement failed (a lost connection, a constraint, ...).
    #[error("PostgreSQL at {target}: {detail}")]
    Query { target: String, detail: String },
    /// The pool could not hand out a connection.
    #[error("the PostgreSQL pool for {target}: {detail}")]
    Pool { target: String, detail: String },
}
