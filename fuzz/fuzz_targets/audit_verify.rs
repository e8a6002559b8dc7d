//! `cargo +nightly fuzz run audit_verify`: see fuzz/README.md and `coffre::fuzzing::audit_verify`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| coffre::fuzzing::audit_verify(data));
