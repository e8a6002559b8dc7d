//! `cargo +nightly fuzz run blob_parse`: see fuzz/README.md and `coffre::fuzzing::blob_parse`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| coffre::fuzzing::blob_parse(data));
