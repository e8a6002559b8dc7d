//! Property tests of the v1 format and its cryptography.

use std::collections::{BTreeMap, HashSet};

use coffre::crypto::{self, Rng};
use coffre::envelope::{self, Header, MAX_BLOB_LEN};
use coffre::model::{EncryptionContext, KeyId};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use ring::digest;

use super::{Rejection, cmk, reference_canonical_context, unwrap_blob};

fn header() -> impl Strategy<Value = Header> {
    (
        any::<[u8; 16]>(),
        any::<u32>(),
        any::<[u8; 32]>(),
        any::<[u8; 12]>(),
    )
        .prop_map(|(id, key_version, salt, iv)| Header {
            suite: envelope::SUITE_HKDF_SHA256_AES256GCM,
            key_id: KeyId::from_bytes(id),
            key_version,
            salt,
            iv,
        })
}

/// Valid context entries (distinct non-empty keys), any Unicode.
fn context_entries() -> impl Strategy<Value = Vec<(String, String)>> {
    btree_map("\\PC{1,12}", "\\PC{0,12}", 0..6).prop_map(|m| m.into_iter().collect())
}

fn context(entries: &[(String, String)]) -> EncryptionContext {
    EncryptionContext::new(entries.iter().cloned()).expect("valid context")
}

/// One valid blob, sealed once, whose mutations the parser must survive.
fn valid_blob() -> (Vec<u8>, EncryptionContext) {
    let context = super::encryption_context(&[("tenant", "t1"), ("purpose", "mutations")]);
    let header = Header {
        suite: envelope::SUITE_HKDF_SHA256_AES256GCM,
        key_id: KeyId::from_bytes([0x11; 16]),
        key_version: 3,
        salt: [0x22; 32],
        iv: [0x33; 12],
    };
    let blob = crypto::seal_with_header(
        &cmk([0x44; 32]),
        &header,
        &crypto::context_digest(&context),
        b"a 32-byte data key, or close to",
    )
    .expect("seal");
    (blob, context)
}

#[derive(Debug, Clone)]
enum Mutation {
    /// XOR a byte (index taken modulo the length) with a non-zero mask.
    Xor(usize, u8),
    Truncate(usize),
    Insert(usize, u8),
    Remove(usize),
    Append(Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(i, m)| Mutation::Xor(i, m)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Remove),
        vec(any::<u8>(), 1..64).prop_map(Mutation::Append),
    ]
}

fn apply(blob: &mut Vec<u8>, m: &Mutation) {
    let len = blob.len();
    match m {
        Mutation::Xor(i, mask) if len > 0 => blob[i % len] ^= mask,
        Mutation::Truncate(n) => blob.truncate(n % (len + 1)),
        Mutation::Insert(i, b) => blob.insert(i % (len + 1), *b),
        Mutation::Remove(i) if len > 0 => {
            blob.remove(i % len);
        }
        Mutation::Append(bytes) => blob.extend_from_slice(bytes),
        Mutation::Xor(..) | Mutation::Remove(_) => {}
    }
}

/// Arbitrary bytes, half of them behind a valid "CF" 01 01 prefix so that
/// the parser gets past its first checks.
fn blob_like_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..=MAX_BLOB_LEN + 8),
        vec(any::<u8>(), 0..=MAX_BLOB_LEN + 8)
            .prop_map(|tail| [&b"CF\x01\x01"[..], &tail].concat()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn encode_then_parse_round_trips(
        header in header(),
        ciphertext in vec(any::<u8>(), 1..=4096),
        tag in any::<[u8; 16]>(),
    ) {
        let blob = envelope::encode(&header, &ciphertext, &tag);
        prop_assert_eq!(blob.len(), 68 + ciphertext.len() + 16);
        let parsed = envelope::parse(&blob).expect("parse an encoded blob");
        prop_assert_eq!(&parsed.header, &header);
        prop_assert_eq!(parsed.header_bytes, &header.to_bytes());
        prop_assert_eq!(parsed.ciphertext, &ciphertext[..]);
        prop_assert_eq!(parsed.tag, &tag);
    }

    /// The parser never panics, and accepts only what it would itself
    /// encode: whatever parses re-encodes to the very same bytes.
    #[test]
    fn parse_never_panics_and_is_strict(bytes in blob_like_bytes()) {
        if let Ok(parsed) = envelope::parse(&bytes) {
            prop_assert_eq!(envelope::encode(&parsed.header, parsed.ciphertext, parsed.tag), bytes);
        }
    }

    /// Mutations of a valid blob: the parser never panics, and nothing but
    /// the original unwraps.
    #[test]
    fn mutated_blobs_never_unwrap(mutations in vec(mutation(), 1..4)) {
        let (original, context) = valid_blob();
        let mut blob = original.clone();
        for m in &mutations {
            apply(&mut blob, m);
        }
        if let Ok(parsed) = envelope::parse(&blob) {
            prop_assert_eq!(envelope::encode(&parsed.header, parsed.ciphertext, parsed.tag), blob.clone());
        }
        let result = unwrap_blob(&cmk([0x44; 32]), &blob, &context);
        if blob == original {
            prop_assert!(result.is_ok());
        } else {
            prop_assert!(result.is_err(), "mutated blob unwrapped: {:?}", mutations);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn seal_then_open_round_trips(
        plaintext in vec(any::<u8>(), 1..=4096),
        entries in context_entries(),
        material in any::<[u8; 32]>(),
        id in any::<[u8; 16]>(),
        version in any::<u32>(),
    ) {
        let material = cmk(material);
        let context = context(&entries);
        let digest = crypto::context_digest(&context);
        let blob = crypto::seal(&Rng::default(), &material, KeyId::from_bytes(id), version, &digest, &plaintext)
            .expect("seal");
        prop_assert_eq!(blob.len(), 68 + plaintext.len() + 16);
        let parsed = envelope::parse(&blob).expect("parse");
        prop_assert_eq!(parsed.header.key_id, KeyId::from_bytes(id));
        prop_assert_eq!(parsed.header.key_version, version);
        // The plaintext does not appear in the clear.
        if plaintext.len() >= 16 {
            prop_assert_ne!(parsed.ciphertext, &plaintext[..]);
        }
        let opened = crypto::open(&material, &parsed, &digest).expect("open");
        prop_assert_eq!(opened.expose(), &plaintext[..]);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever order the entries come in, the canonical bytes (and digest)
    /// are the same, and they are what DESIGN.md describes.
    #[test]
    fn canonical_context_is_order_independent_and_matches_the_spec(
        (entries, shuffled) in context_entries()
            .prop_flat_map(|e| (Just(e.clone()), Just(e).prop_shuffle())),
    ) {
        let a = context(&entries);
        let b = context(&shuffled);
        let reference = reference_canonical_context(&shuffled);
        prop_assert_eq!(crypto::canonical_context(&a), reference.clone());
        prop_assert_eq!(crypto::canonical_context(&b), reference.clone());
        let expected_digest = digest::digest(&digest::SHA256, &reference);
        prop_assert_eq!(&crypto::context_digest(&b)[..], expected_digest.as_ref());
    }

    /// Distinct contexts over a tiny alphabet (where concatenation
    /// ambiguities live) never share canonical bytes.
    #[test]
    fn canonical_context_is_injective_on_small_contexts(
        a in btree_map("[ab]{1,3}", "[ab]{0,3}", 0..4),
        b in btree_map("[ab]{1,3}", "[ab]{0,3}", 0..4),
    ) {
        let ca = crypto::canonical_context(&EncryptionContext::new(a.clone()).expect("valid"));
        let cb = crypto::canonical_context(&EncryptionContext::new(b.clone()).expect("valid"));
        prop_assert_eq!(a == b, ca == cb);
    }
}

/// Exhaustively: every context over keys {a, b, ab} and values
/// {"", a, b, ab, ba} (6^3 = 216 of them) has its own canonical bytes.
#[test]
fn canonical_context_is_injective_exhaustively() {
    let keys = ["a", "b", "ab"];
    let values = [None, Some(""), Some("a"), Some("b"), Some("ab"), Some("ba")];
    let mut seen = HashSet::new();
    let mut count = 0;
    for x in values {
        for y in values {
            for z in values {
                let map: BTreeMap<String, String> = keys
                    .iter()
                    .zip([x, y, z])
                    .filter_map(|(k, v)| v.map(|v| (k.to_string(), v.to_string())))
                    .collect();
                let context = EncryptionContext::new(map).expect("valid");
                assert!(
                    seen.insert(crypto::canonical_context(&context)),
                    "collision for {context:?}"
                );
                count += 1;
            }
        }
    }
    assert_eq!(count, 216);
    assert_eq!(seen.len(), 216);
}

/// A pinned example of the encoding, so that the reference encoder and
/// coffre's cannot drift together unnoticed.
#[test]
fn canonical_context_known_answer() {
    let context = super::encryption_context(&[("é", ""), ("b", "12")]);
    // "b" (0x62) sorts before "é" (0xc3 0xa9).
    let expected = [
        &b"\x00\x00\x00\x01b\x00\x00\x00\x0212"[..],
        b"\x00\x00\x00\x02\xc3\xa9\x00\x00\x00\x00",
    ]
    .concat();
    assert_eq!(crypto::canonical_context(&context), expected);
    assert_eq!(
        reference_canonical_context(&[
            ("é".to_string(), String::new()),
            ("b".to_string(), "12".to_string())
        ]),
        expected
    );
}

#[test]
fn reference_helper_reports_rejections_distinctly() {
    // Sanity of the shared helper the other tests lean on.
    let (blob, context) = valid_blob();
    assert!(unwrap_blob(&cmk([0x44; 32]), &blob, &context).is_ok());
    assert!(matches!(
        unwrap_blob(&cmk([0x44; 32]), &blob[..10], &context),
        Err(Rejection::Parse(_))
    ));
    assert!(matches!(
        unwrap_blob(&cmk([0x45; 32]), &blob, &context),
        Err(Rejection::Auth(_))
    ));
}
