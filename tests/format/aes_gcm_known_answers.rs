//! Wycheproof AES-GCM vectors, run through the AES-256-GCM calls that
//! `crypto::seal_with_header` and `crypto::open` make (`crypto::aes256gcm_seal`
//! and `crypto::aes256gcm_open` share them). Only the parameters coffre uses:
//! 256-bit key, 96-bit IV, 128-bit tag.

use coffre::crypto;
use wycheproof::TestResult;
use wycheproof::aead::{TestName, TestSet};

#[test]
fn wycheproof_aes_256_gcm_96_bit_iv_128_bit_tag() {
    let set = TestSet::load(TestName::AesGcm).expect("wycheproof AES-GCM data");
    let (mut valid, mut invalid) = (0usize, 0usize);
    let groups = set
        .test_groups
        .iter()
        .filter(|g| g.key_size == 256 && g.nonce_size == 96 && g.tag_size == 128);
    for group in groups {
        for test in &group.tests {
            let id = test.tc_id;
            let key: [u8; 32] = test.key[..].try_into().expect("256-bit key");
            let iv: [u8; 12] = test.nonce[..].try_into().expect("96-bit IV");
            let tag: [u8; 16] = test.tag[..].try_into().expect("128-bit tag");
            let opened = crypto::aes256gcm_open(&key, &iv, &test.aad, &test.ct, &tag);
            let sealed =
                crypto::aes256gcm_seal(&key, &iv, &test.aad, &test.pt).expect("seal never fails");
            let expected = [&test.ct[..], &tag[..]].concat();
            match test.result {
                TestResult::Valid => {
                    valid += 1;
                    let opened =
                        opened.unwrap_or_else(|e| panic!("tcId {id}: valid vector refused: {e}"));
                    assert_eq!(opened.expose(), &test.pt[..], "tcId {id}: plaintext");
                    assert_eq!(sealed, expected, "tcId {id}: ciphertext ‖ tag");
                }
                TestResult::Invalid => {
                    invalid += 1;
                    assert!(opened.is_err(), "tcId {id}: invalid vector accepted");
                    assert_ne!(sealed, expected, "tcId {id}: sealing reproduced a forgery");
                }
                // AES-GCM with these parameters has no "acceptable" vectors;
                // if a new data release adds some, look at them before
                // deciding what they mean here.
                TestResult::Acceptable => panic!("tcId {id}: unexpected acceptable vector"),
            }
        }
    }
    eprintln!("wycheproof AES-256-GCM: {valid} valid, {invalid} invalid vectors");
    assert!(valid >= 30, "too few valid vectors matched: {valid}");
    assert!(invalid >= 20, "too few invalid vectors matched: {invalid}");
}
