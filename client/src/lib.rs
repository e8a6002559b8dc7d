//! `coffre-client`: client-side envelope encryption with data keys from
//! coffre.
//!
//! A hosted service seals its data on its own side: coffre gives it a data
//! key (plaintext and wrapped, bound to an encryption context); the service
//! encrypts the data with the plaintext key in the sealed message format
//! and forgets the key; the message carries the wrapped key and the
//! context. To open it, the service asks coffre to decrypt the wrapped key
//! (coffre checks the key's state and policy, and records the request),
//! then opens the frames. The master key never leaves coffre; the data
//! never reaches it.
//!
//! - [`format`]: the message format, version 1 (header, key schedule, key
//!   commitment, frame keys).
//! - [`rpc`]: [`Client`], coffre's data-key RPCs over mTLS with typed
//!   errors, and [`Client::sealer`] / [`Client::opener`] on top of them.
//! - [`cache`]: [`CachingClient`], a data-key cache bounded by age,
//!   messages and bytes, emptied for a key by any refusal of it.
//! - [`stream`]: [`Sealer`] (`Write`) and [`Opener`] (`Read`), constant
//!   memory, and [`seal`]/[`open`] over whole streams.
//! - [`stream_async`]: [`seal_async`], [`read_header`] and [`open_async`]
//!   over tokio's `AsyncRead`/`AsyncWrite`, the same bytes.

pub mod cache;
pub mod format;
pub mod rpc;
pub mod stream;
pub mod stream_async;

pub use cache::{CacheLimits, CacheStats, CachingClient, DataKeySource};
pub use format::{DataKey, FormatError, Header};
pub use rpc::{AccessReason, Client, ClientError, Connection, GeneratedKey};
pub use stream::{Opener, Sealer, open, seal};
pub use stream_async::{open_async, read_header, seal_async};
