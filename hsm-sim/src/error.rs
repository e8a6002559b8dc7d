//! The simulator's error type.

/// Everything a [`crate::Simulator`] operation can fail with.
///
/// Authentication failures of wrapped blobs are deliberately one generic
/// variant ([`SimError::AuthenticationFailed`]): no oracle tells whether the
/// header, the root key, the AAD or the tag was wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The PIN does not open the token (login, or opening the state file).
    #[error("wrong PIN")]
    BadPin,
    /// The session is unknown: never opened, logged out, or lost when the
    /// simulator restarted. Log in again.
    #[error("not logged in (unknown session)")]
    NotLoggedIn,
    /// A wrapped blob failed to parse or authenticate.
    #[error("wrapped material failed authentication")]
    AuthenticationFailed,
    /// The token's root keys were zeroized by a tamper response.
    #[error("token tampered: root keys destroyed")]
    Tampered,
    /// An injected fault (outage or random error).
    #[error("HSM unavailable: {0}")]
    Unavailable(&'static str),
    /// A request argument is out of range (lengths, ids).
    #[error("invalid argument: {0}")]
    InvalidInput(String),
    /// No root key has this id.
    #[error("unknown root key {0}")]
    UnknownRootKey(u32),
    /// The current root key cannot be destroyed: rotate first.
    #[error("root key {0} is the current root key")]
    CurrentRootKey(u32),
    /// The state file cannot be read, written or parsed.
    #[error("state file: {0}")]
    Storage(String),
    /// The system random generator failed.
    #[error("random generator failure")]
    Random,
}

impl SimError {
    pub(crate) fn storage(context: &str, err: impl std::fmt::Display) -> Self {
        Self::Storage(format!("{context}: {err}"))
    }
}
