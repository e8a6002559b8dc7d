//! The gRPC form of a request's answer. Errors were mapped once, by the
//! pipeline (`pipeline::Failure::from`); here a failure becomes a
//! `tonic::Status` with the same code and message, and every answer gets
//! the request's id in [`REQUEST_ID_HEADER`].

use tonic::metadata::MetadataValue;
use tonic::{Response, Status};

use crate::pipeline::{Code, Failure, Reply};

/// The response header that carries the request id (also on errors); the
/// audit record of the request has the same `request_id`.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The status a failure becomes on the wire.
pub fn status(failure: Failure) -> Status {
    Status::new(code(failure.code()), failure.message().to_string())
}

/// `Code` keeps gRPC's numbers, so the conversion is the number.
fn code(code: Code) -> tonic::Code {
    tonic::Code::from(code as i32)
}

/// A reply as a tonic response or status, with its request id.
pub fn response<T>(reply: Reply<T>) -> Result<Response<T>, Status> {
    let header = MetadataValue::try_from(reply.request_id.as_str())
        .ok()
        .map(|mut h| {
            // Every request id is new: HPACK would add each to both sides'
            // dynamic tables only to evict it, and the entries worth keeping
            // with it. Never indexed, it is sent as a literal.
            h.set_sensitive(true);
            h
        });
    match reply.result {
        Ok(body) => {
            let mut response = Response::new(body);
            if let Some(h) = header {
                response.metadata_mut().insert(REQUEST_ID_HEADER, h);
            }
            Ok(response)
        }
        Err(failure) => {
            let mut status = status(failure);
            if let Some(h) = header {
                status.metadata_mut().insert(REQUEST_ID_HEADER, h);
            }
            Err(status)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::code;
    use crate::pipeline::Code;

    #[test]
    fn codes_keep_their_grpc_numbers() {
        for n in 0u8..=16 {
            let ours = crate::metrics::CODE_NAMES
                .get(usize::from(n))
                .copied()
                .unwrap_or_default();
            let theirs = code(all()[usize::from(n)]);
            assert_eq!(theirs as u8, n, "{ours}");
            assert_eq!(all()[usize::from(n)].name(), ours);
        }
    }

    fn all() -> [Code; 17] {
        use Code::*;
        [
            Ok,
            Cancelled,
            Unknown,
            InvalidArgument,
            DeadlineExceeded,
            NotFound,
            AlreadyExists,
            PermissionDenied,
            ResourceExhausted,
            FailedPrecondition,
            Aborted,
            OutOfRange,
            Unimplemented,
            Internal,
            Unavailable,
            DataLoss,
            Unauthenticated,
        ]
    }
}
