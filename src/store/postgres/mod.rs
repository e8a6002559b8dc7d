//! The PostgreSQL store (issue #17): connecting, the schema and its
//! migrations, and [`PgStore`], the [`crate::store::KeyStore`] on top.
//!
//! - [`store`]: [`PgStore`], each method one transaction (the locks, the
//!   change feed's generations, the root-key fence, never a cancelled
//!   commit); `records.rs`: how records and their MACs sit in rows.
//! - [`connect`]: the connection settings from `[store]` and `[cluster]`
//!   (URL from an environment variable or a file, TLS with rustls against
//!   `ca_file`, the session settings coffre forces), the pool
//!   ([`connect::open_pool`]), one dedicated connection
//!   ([`connect::PgConnector::connect`]), the primary check, and
//!   [`connect::redacted`] for every URL that reaches a message.
//! - [`migrate`]: the in-house migrator behind `coffre store migrate`
//!   (`sql/0001_init.sql`, one transaction per file under an advisory
//!   lock, SHA-256 checksums), [`migrate::schema_state`] and
//!   [`migrate::check_schema_for_serving`] for `coffre serve`.
//! - [`fence`]: timeline fencing, so that an old primary that came back
//!   after a failover is never used.
//! - [`PgError`]: what can go wrong, in words that name the server (its
//!   URL redacted) and never the password.
//!
//! `sql/roles.sql` holds the least-privilege roles (`coffre_owner` runs the
//! migrations, `coffre_app` serves); a DBA applies it, coffre never does.
//! docs/postgres.md is the operator's side of all this.

#[cfg(test)]
mod conformance_tests;
pub mod connect;
pub mod copy;
mod error;
pub mod fence;
pub mod local;
pub mod migrate;
mod records;
pub mod store;
#[cfg(test)]
pub(crate) mod test_support;
#[cfg(test)]
mod tests;

pub use connect::{DatabaseUrl, PgConnector, ServerInfo, open_pool, redacted};
pub use error::PgError;
pub use migrate::{MigrateReport, SchemaState, check_schema_for_serving, migrate, schema_state};
pub use store::{PgStore, StoreTimeouts};
