//! Golden v1 blobs (`tests/data/golden-v1.json`): every build must unwrap
//! them all, and sealing again with the same header must give the same bytes.
//!
//! The file is frozen. To (re)generate it after adding a vector to
//! [`definitions`], run
//!
//! ```text
//! COFFRE_WRITE_GOLDEN=1 cargo test -p coffre --test tests format::golden
//! ```
//!
//! and review the diff: existing blobs must not change, or blobs already
//! handed out would stop unwrapping. Without the variable the test only reads
//! and checks the file. See also `tests/data/README.md`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Once;

use coffre::crypto;
use coffre::envelope::{self, Header};
use coffre::model::{EncryptionContext, KeyId};
use ring::{aead, digest, hmac};
use serde::{Deserialize, Serialize};

use super::{cmk, reference_canonical_context, unwrap_blob};

const WRITE_VAR: &str = "COFFRE_WRITE_GOLDEN";

#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct GoldenFile {
    comment: String,
    vectors: Vec<GoldenVector>,
}

/// One vector; byte strings in lowercase hex.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct GoldenVector {
    name: String,
    /// The CMK version material (32 bytes).
    cmk: String,
    /// The key id (16 bytes).
    key_id: String,
    version: u32,
    /// The encryption context presented at wrap and unwrap time.
    context: BTreeMap<String, String>,
    plaintext: String,
    blob: String,
}

/// How a vector is made: everything else (material, salt, IV, plaintext)
/// is derived from its name, so regeneration is deterministic.
struct Definition {
    name: &'static str,
    version: u32,
    context: &'static [(&'static str, &'static str)],
    plaintext_len: usize,
}

fn definitions() -> Vec<Definition> {
    vec![
        Definition {
            name: "empty-context-16-bytes-version-1",
            version: 1,
            context: &[],
            plaintext_len: 16,
        },
        Definition {
            name: "unicode-context-32-bytes-version-2",
            version: 2,
            context: &[
                ("tenant", "acme"),
                ("région", "Île-de-France"),
                ("名前", "値"),
                ("emoji", "🔐🗝️"),
                ("empty-value", ""),
            ],
            plaintext_len: 32,
        },
        Definition {
            name: "64-bytes-max-version",
            version: u32::MAX,
            context: &[("purpose", "golden")],
            plaintext_len: 64,
        },
        Definition {
            name: "4096-bytes-version-1",
            version: 1,
            context: &[("bucket", "photos"), ("object", "2024/01/img.jpg")],
            plaintext_len: 4096,
        },
        Definition {
            name: "1-byte-version-7",
            version: 7,
            context: &[("a", "b")],
            plaintext_len: 1,
        },
        Definition {
            name: "unsorted-context-32-bytes-version-65536",
            version: 65536,
            context: &[("z", "1"), ("a", "2"), ("m", "3"), ("ab", "")],
            plaintext_len: 32,
        },
    ]
}

/// `len` deterministic bytes from a label: SHA-256(label ‖ counter) blocks.
fn derived_bytes(label: &str, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut counter = 0u32;
    while out.len() < len {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(label.as_bytes());
        ctx.update(&counter.to_be_bytes());
        out.extend_from_slice(ctx.finish().as_ref());
        counter += 1;
    }
    out.truncate(len);
    out
}

fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    bytes.try_into().expect("length")
}

fn context_of(map: &BTreeMap<String, String>) -> EncryptionContext {
    EncryptionContext::new(map.clone()).expect("valid context")
}

/// Builds a vector with coffre's own `seal_with_header`.
fn generate(def: &Definition) -> GoldenVector {
    let material: [u8; 32] = array(&derived_bytes(&format!("cmk/{}", def.name), 32));
    let key_id: [u8; 16] = array(&derived_bytes(&format!("key_id/{}", def.name), 16));
    let header = Header {
        suite: coffre::envelope::SUITE_HKDF_SHA256_AES256GCM,
        key_id: KeyId::from_bytes(key_id),
        key_version: def.version,
        salt: array(&derived_bytes(&format!("salt/{}", def.name), 32)),
        iv: array(&derived_bytes(&format!("iv/{}", def.name), 12)),
    };
    let plaintext = derived_bytes(&format!("plaintext/{}", def.name), def.plaintext_len);
    let context: BTreeMap<String, String> = def
        .context
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let digest = crypto::context_digest(&context_of(&context));
    let blob = crypto::seal_with_header(&cmk(material), &header, &digest, &plaintext)
        .expect("seal golden vector");
    GoldenVector {
        name: def.name.to_string(),
        cmk: hex::encode(material),
        key_id: hex::encode(key_id),
        version: def.version,
        context,
        plaintext: hex::encode(plaintext),
        blob: hex::encode(blob),
    }
}

fn generate_all() -> GoldenFile {
    GoldenFile {
        comment: "coffre wrapped data keys, format v1, suite 1. Frozen: see tests/data/README.md."
            .to_string(),
        vectors: definitions().iter().map(generate).collect(),
    }
}

fn golden_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden-v1.json")
}

/// Reads the golden file, first (re)writing it, once per run, when
/// `COFFRE_WRITE_GOLDEN=1`: every test that loads it sees the new file.
fn load() -> GoldenFile {
    static WRITE: Once = Once::new();
    WRITE.call_once(|| {
        if std::env::var(WRITE_VAR).as_deref() == Ok("1") {
            let text = serde_json::to_string_pretty(&generate_all()).expect("serialize") + "\n";
            std::fs::write(golden_path(), text).expect("write tests/data/golden-v1.json");
        }
    });
    let text = std::fs::read_to_string(golden_path()).expect("read tests/data/golden-v1.json");
    serde_json::from_str(&text).expect("parse tests/data/golden-v1.json")
}

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).expect("hex")
}

#[test]
fn golden_blobs_unwrap_and_reseal_identically() {
    let file = load();
    assert!(file.vectors.len() >= 6, "golden vectors missing");

    for v in &file.vectors {
        let name = &v.name;
        let material = cmk(array(&unhex(&v.cmk)));
        let context = context_of(&v.context);
        let blob = unhex(&v.blob);
        let plaintext = unhex(&v.plaintext);

        // The header says which key and version the blob belongs to.
        let parsed = envelope::parse(&blob).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            parsed.header.key_id.as_bytes(),
            &array(&unhex(&v.key_id)),
            "{name}"
        );
        assert_eq!(parsed.header.key_version, v.version, "{name}");

        let opened = unwrap_blob(&material, &blob, &context);
        assert_eq!(opened.as_deref(), Ok(&plaintext[..]), "{name}: unwrap");

        let resealed = crypto::seal_with_header(
            &material,
            &parsed.header,
            &crypto::context_digest(&context),
            &plaintext,
        )
        .expect("reseal");
        assert_eq!(hex::encode(resealed), v.blob, "{name}: reseal differs");
    }

    // The file is what the definitions produce: a vector added to the code
    // but not to the file (or the reverse) is caught here.
    assert_eq!(
        file,
        generate_all(),
        "tests/data/golden-v1.json is stale: see its README"
    );
}

/// RFC 5869 HKDF-SHA256 for one output block, written step by step with
/// HMAC: PRK = HMAC(salt, ikm), OKM = T(1) = HMAC(PRK, info ‖ 0x01).
fn hkdf_sha256_32(salt: &[u8], ikm: &[u8], info: &[u8]) -> [u8; 32] {
    let prk = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, salt), ikm);
    let t1 = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, prk.as_ref()),
        &[info, &[1u8]].concat(),
    );
    array(t1.as_ref())
}

#[test]
fn step_by_step_hkdf_matches_rfc5869_test_case_1() {
    let okm = hkdf_sha256_32(
        &unhex("000102030405060708090a0b0c"),
        &[0x0b; 22],
        &unhex("f0f1f2f3f4f5f6f7f8f9"),
    );
    // The first 32 of the 42 bytes of the RFC's OKM.
    assert_eq!(
        hex::encode(okm),
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
    );
}

/// A v1 blob built from DESIGN.md alone: ring's HMAC, SHA-256 and
/// AES-256-GCM (not the aes-gcm crate coffre uses), no coffre code.
fn blob_per_spec(
    material: &[u8],
    key_id: &[u8],
    version: u32,
    context: &[(String, String)],
    salt: &[u8],
    iv: &[u8; 12],
    plaintext: &[u8],
) -> Vec<u8> {
    let mut header = Vec::new();
    header.extend_from_slice(b"CF");
    header.push(1); // format version
    header.push(1); // suite: HKDF-SHA256 + AES-256-GCM
    header.extend_from_slice(key_id);
    header.extend_from_slice(&version.to_be_bytes());
    header.extend_from_slice(salt);
    header.extend_from_slice(iv);
    assert_eq!(header.len(), 68);

    let info = [b"coffre/v1/wrap", key_id, &version.to_be_bytes()[..]].concat();
    let key = hkdf_sha256_32(salt, material, &info);

    let context_digest = digest::digest(&digest::SHA256, &reference_canonical_context(context));
    let aad = [&header[..], context_digest.as_ref()].concat();

    let key = aead::LessSafeKey::new(
        aead::UnboundKey::new(&aead::AES_256_GCM, &key).expect("AES-256 key"),
    );
    let mut body = plaintext.to_vec();
    let tag = key
        .seal_in_place_separate_tag(
            aead::Nonce::assume_unique_for_key(*iv),
            aead::Aad::from(&aad[..]),
            &mut body,
        )
        .expect("seal");
    [&header[..], &body[..], tag.as_ref()].concat()
}

#[test]
fn golden_blobs_match_an_independent_implementation_of_the_spec() {
    let file = load();
    assert!(!file.vectors.is_empty());
    for v in &file.vectors {
        let blob = unhex(&v.blob);
        // Salt and IV read at their documented offsets, not through the parser.
        let salt = &blob[24..56];
        let iv: [u8; 12] = array(&blob[56..68]);
        let context: Vec<(String, String)> = v
            .context
            .iter()
            .map(|(k, val)| (k.clone(), val.clone()))
            .collect();
        let expected = blob_per_spec(
            &unhex(&v.cmk),
            &unhex(&v.key_id),
            v.version,
            &context,
            salt,
            &iv,
            &unhex(&v.plaintext),
        );
        assert_eq!(hex::encode(expected), v.blob, "{}", v.name);
    }
}
