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
//!
//! How to choose, and how coffre's choices differ from the AWS Encryption
//! SDK's and Tink's: `docs/client-side-encryption.md`.
//!
//! ```no_run
//! use std::collections::BTreeMap;
//! use std::time::Duration;
//!
//! use coffre_client::{CacheLimits, CachingClient, Client, Connection};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! // The service's identity (coffre's dev PKI here: `coffre dev` writes it).
//! let client = Client::connect(&Connection {
//!     endpoint: "https://127.0.0.1:7443".to_string(),
//!     ca_pem: std::fs::read("coffre-data/pki/ca.pem")?,
//!     cert_pem: std::fs::read("coffre-data/pki/service.pem")?,
//!     key_pem: zeroize::Zeroizing::new(std::fs::read("coffre-data/pki/service-key.pem")?),
//!     timeout: Duration::from_secs(2),
//! })
//! .await?;
//! let context = BTreeMap::from([("tenant".to_string(), "acme".to_string())]);
//!
//! // Small objects, through a cache whose entries serve for 5 s at most: a
//! // disable of the key reaches this service within 5 s.
//! let limits = CacheLimits { max_age: Duration::from_secs(5), ..CacheLimits::default() };
//! let cache = CachingClient::new(client.clone(), limits);
//! let sealed = cache.seal_bytes("customer-records", &context, b"IBAN FR76 ...").await?;
//! let (plain, _header) = cache.open_bytes(&sealed, Some(&context)).await?;
//! assert_eq!(plain, b"IBAN FR76 ...");
//!
//! // A file, in constant memory: one data key per message, one frame in memory.
//! let output = std::fs::File::create("records.cs")?;
//! let (mut sealer, _) = client.sealer("customer-records", context.clone(), output).await?;
//! std::io::copy(&mut std::fs::File::open("records.txt")?, &mut sealer)?;
//! sealer.finish()?;
//! let input = std::io::BufReader::new(std::fs::File::open("records.cs")?);
//! let (mut opener, _header) = client.opener(input, Some(&context)).await?;
//! std::io::copy(&mut opener, &mut std::io::stdout())?; // verified frame by frame
//! # Ok(())
//! # }
//! ```

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
