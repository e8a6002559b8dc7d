//! One file per generated service trait, each implemented for
//! [`super::GrpcApi`]: a handler converts the request, calls the core
//! inside [`super::GrpcApi::handle`], notes in the audit record what it
//! resolved, and converts the answer.

mod approvals;
mod audit;
mod data_keys;
mod hsm;
mod keys;
