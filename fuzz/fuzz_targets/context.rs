//! `cargo +nightly fuzz run context`: see fuzz/README.md and `coffre::fuzzing::context`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| coffre::fuzzing::context(data));
