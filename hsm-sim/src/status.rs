//! The simulator's errors on the wire, both ways: [`to_status`] turns a
//! [`SimError`] into the status a client sees, and [`reason`] tells a client
//! which error it was. The kind travels as a [`Reason`] in the
//! [`REASON_KEY`] metadata entry of the status, so a client never reads the
//! message, which is prose for people.
//!
//! | [`SimError`]           | code                                 | [`Reason`]             |
//! |------------------------|--------------------------------------|------------------------|
//! | `BadPin`               | `UNAUTHENTICATED`                    | `BadPin`               |
//! | `NotLoggedIn`          | `UNAUTHENTICATED`                    | `NotLoggedIn`          |
//! | `AuthenticationFailed` | `INVALID_ARGUMENT` (generic message) | `AuthenticationFailed` |
//! | `InvalidInput`         | `INVALID_ARGUMENT`                   | `InvalidInput`         |
//! | `UnknownRootKey`       | `NOT_FOUND`                          | `UnknownRootKey`       |
//! | `CurrentRootKey`       | `FAILED_PRECONDITION`                | `CurrentRootKey`       |
//! | `Tampered`             | `FAILED_PRECONDITION`                | `Tampered`             |
//! | `Unavailable`          | `UNAVAILABLE`                        | `Unavailable`          |
//! | `Storage`, `Random`    | `INTERNAL` (generic; details logged) | `Internal`             |
//!
//! A status without the entry did not come from the simulator's error
//! mapping (a transport failure, a deadline, a refused fault-injection
//! call): [`reason`] is `None` and its code is all there is.

use tonic::Status;
use tonic::metadata::MetadataValue;

use crate::SimError;

/// The metadata key that carries a status's [`Reason`].
pub const REASON_KEY: &str = "hsm-sim-reason";

/// Which [`SimError`] a status stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    BadPin,
    NotLoggedIn,
    AuthenticationFailed,
    InvalidInput,
    UnknownRootKey,
    CurrentRootKey,
    /// The token's root keys were zeroized by a tamper response.
    Tampered,
    Unavailable,
    /// The state file or the random generator failed.
    Internal,
}

impl Reason {
    /// Every reason, for parsing.
    const ALL: [Reason; 9] = [
        Reason::BadPin,
        Reason::NotLoggedIn,
        Reason::AuthenticationFailed,
        Reason::InvalidInput,
        Reason::UnknownRootKey,
        Reason::CurrentRootKey,
        Reason::Tampered,
        Reason::Unavailable,
        Reason::Internal,
    ];

    /// The value of [`REASON_KEY`] on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::BadPin => "bad-pin",
            Reason::NotLoggedIn => "not-logged-in",
            Reason::AuthenticationFailed => "authentication-failed",
            Reason::InvalidInput => "invalid-input",
            Reason::UnknownRootKey => "unknown-root-key",
            Reason::CurrentRootKey => "current-root-key",
            Reason::Tampered => "tampered",
            Reason::Unavailable => "unavailable",
            Reason::Internal => "internal",
        }
    }

    fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == value)
    }
}

impl From<&SimError> for Reason {
    fn from(err: &SimError) -> Self {
        match err {
            SimError::BadPin => Reason::BadPin,
            SimError::NotLoggedIn => Reason::NotLoggedIn,
            SimError::AuthenticationFailed => Reason::AuthenticationFailed,
            SimError::InvalidInput(_) => Reason::InvalidInput,
            SimError::UnknownRootKey(_) => Reason::UnknownRootKey,
            SimError::CurrentRootKey(_) => Reason::CurrentRootKey,
            SimError::Tampered => Reason::Tampered,
            SimError::Unavailable(_) => Reason::Unavailable,
            SimError::Storage(_) | SimError::Random => Reason::Internal,
        }
    }
}

/// Maps a simulator error to the status a client sees, its [`Reason`] in
/// the metadata.
pub fn to_status(err: SimError) -> Status {
    let reason = Reason::from(&err);
    let mut status = match err {
        SimError::BadPin => Status::unauthenticated("wrong PIN"),
        SimError::NotLoggedIn => Status::unauthenticated("not logged in"),
        SimError::AuthenticationFailed => {
            Status::invalid_argument("wrapped material failed authentication")
        }
        SimError::InvalidInput(m) => Status::invalid_argument(m),
        SimError::UnknownRootKey(id) => Status::not_found(format!("unknown root key {id}")),
        SimError::CurrentRootKey(id) => Status::failed_precondition(format!(
            "root key {id} is current: rotate before destroying it"
        )),
        SimError::Tampered => Status::failed_precondition("token tampered: root keys destroyed"),
        SimError::Unavailable(m) => Status::unavailable(m),
        e @ (SimError::Storage(_) | SimError::Random) => {
            tracing::error!(error = %e, "internal simulator error");
            Status::internal("internal HSM error")
        }
    };
    status
        .metadata_mut()
        .insert(REASON_KEY, MetadataValue::from_static(reason.as_str()));
    status
}

/// The [`Reason`] a status carries; `None` if it carries none (or one this
/// version does not know).
pub fn reason(status: &Status) -> Option<Reason> {
    status
        .metadata()
        .get(REASON_KEY)?
        .to_str()
        .ok()
        .and_then(Reason::parse)
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    fn every_error() -> Vec<SimError> {
        vec![
            SimError::BadPin,
            SimError::NotLoggedIn,
            SimError::AuthenticationFailed,
            SimError::InvalidInput("length".into()),
            SimError::UnknownRootKey(3),
            SimError::CurrentRootKey(2),
            SimError::Tampered,
            SimError::Unavailable("outage"),
            SimError::Storage("disk".into()),
            SimError::Random,
        ]
    }

    #[test]
    fn every_error_keeps_its_reason_across_the_wire() {
        for err in every_error() {
            let want = Reason::from(&err);
            let shown = err.to_string();
            let status = to_status(err);
            assert_eq!(reason(&status), Some(want), "{shown}: {status:?}");
        }
        let reasons: std::collections::HashSet<&str> =
            Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            reasons.len(),
            Reason::ALL.len(),
            "two reasons share a value"
        );
    }

    #[test]
    fn a_tamper_is_known_by_its_reason_not_its_message() {
        let tampered = to_status(SimError::Tampered);
        assert_eq!(tampered.code(), Code::FailedPrecondition);
        let mut reworded = Status::failed_precondition("the token zeroized its keys");
        reworded
            .metadata_mut()
            .insert(REASON_KEY, MetadataValue::from_static("tampered"));
        assert_eq!(reason(&reworded), Some(Reason::Tampered));

        let prose = Status::failed_precondition("token tampered: root keys destroyed");
        assert_eq!(reason(&prose), None);
        let current = to_status(SimError::CurrentRootKey(1));
        assert_eq!(current.code(), Code::FailedPrecondition);
        assert_eq!(reason(&current), Some(Reason::CurrentRootKey));
    }

    #[test]
    fn an_unknown_reason_is_none() {
        let mut status = Status::unavailable("x");
        status
            .metadata_mut()
            .insert(REASON_KEY, MetadataValue::from_static("from-the-future"));
        assert_eq!(reason(&status), None);
    }
}
