//! `cargo +nightly fuzz run request_mapping`: see fuzz/README.md and `coffre::fuzzing::request_mapping`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| coffre::fuzzing::request_mapping(data));
