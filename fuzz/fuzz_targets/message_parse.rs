//! `cargo +nightly fuzz run message_parse`: see fuzz/README.md and `coffre::fuzzing::message_parse`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| coffre::fuzzing::message_parse(data));
