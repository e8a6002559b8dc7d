//! The store conformance suite ([`crate::store::conformance`]) on
//! [`super::PgStore`], a database per store on one PostgreSQL server per
//! test process (`test_support`), records sealed as the server runs it:
//! every check, unchanged, and the model-based test.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Instant;

use proptest::prelude::*;

use super::test_support::{PgFactory, block_on, require_postgres};
use crate::store::conformance::{self, model};

#[test]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
fn the_conformance_suite_passes_on_postgres() {
    require_postgres();
    let started = Instant::now();
    let mut seen = Vec::new();
    let result = block_on(conformance::run(&PgFactory, |c| {
        eprintln!("[{:>6.2}s] {c}", started.elapsed().as_secs_f64());
        seen.push(c.to_owned());
    }));
    if let Err(failure) = result {
        panic!("{failure}");
    }
    eprintln!(
        "the conformance suite passed on PostgreSQL in {:?}",
        started.elapsed()
    );
    let names: Vec<&str> = conformance::CHECKS.iter().map(|c| c.name).collect();
    assert_eq!(seen, names);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    #[cfg_attr(
        not(coffre_has_postgres),
        ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
    )]
    fn behaves_like_the_model(ops in model::ops()) {
        require_postgres();
        block_on(model::run(&PgFactory, &ops))?;
    }
}
