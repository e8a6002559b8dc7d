//! The sealed message format, version 1: round trips of every size around
//! the frame boundaries (property tests), a tamper matrix (every byte
//! flipped, every truncation, frames swapped, dropped, duplicated or
//! appended, headers exchanged, another data key), and golden messages
//! (`tests/data/sealed-v1.json` at the workspace root) that every build
//! must open, rebuilt here from the specification with ring alone.

// Tests may panic on purpose: a failed expectation is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;
use std::io::{Cursor, Read};

use coffre_client::format::{
    DataKey, FormatError, Header, MAX_FRAME_LEN, MIN_FRAME_LEN, TAG_LEN, canonical_context,
};
use coffre_client::stream::{Opener, Sealer};
use proptest::prelude::*;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::{digest, hkdf};
use serde_json::{Value, json};

/// A stand-in for coffre's wrapped data key: the format only carries it.
fn blob() -> Vec<u8> {
    let mut b = b"CF\x01\x01".to_vec();
    b.extend((0u8..112).map(|i| i.wrapping_mul(7)));
    b
}

fn context(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn key(byte: u8) -> DataKey {
    DataKey::from_slice(&[byte; 32]).unwrap()
}

fn seal_bytes(
    dk: &DataKey,
    ctx: BTreeMap<String, String>,
    frame_len: u32,
    plain: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    let mut input = plain;
    coffre_client::seal(&mut input, &mut out, dk, ctx, blob(), frame_len).unwrap();
    out
}

/// Opens a whole message: the header, then every frame.
fn open_bytes(dk: &DataKey, message: &[u8]) -> Result<(Header, Vec<u8>), FormatError> {
    let mut input = Cursor::new(message);
    let header = Header::read_from(&mut input)?;
    let mut out = Vec::new();
    coffre_client::open(&mut input, &mut out, &header, dk)?;
    Ok((header, out))
}

fn plaintext(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + i / 251) as u8).collect()
}

#[test]
fn every_size_around_the_frame_boundaries_round_trips() {
    let dk = key(0x42);
    let f = MIN_FRAME_LEN as usize;
    for len in [
        0,
        1,
        f - 1,
        f,
        f + 1,
        2 * f - 1,
        2 * f,
        2 * f + 1,
        5 * f + 17,
    ] {
        let plain = plaintext(len);
        let ctx = context(&[("tenant", "acme"), ("object", "invoices/2026/12.pdf")]);
        let message = seal_bytes(&dk, ctx.clone(), MIN_FRAME_LEN, &plain);
        // One frame per started frame_len of plaintext, and one (empty)
        // for an empty plaintext: never an empty frame after a full one.
        let frames = len.div_ceil(f).max(1);
        let header_len = Header::read_from(&mut Cursor::new(&message))
            .unwrap()
            .to_bytes()
            .len();
        assert_eq!(message.len(), header_len + len + frames * TAG_LEN, "{len}");
        let (header, opened) = open_bytes(&dk, &message).unwrap();
        assert_eq!(opened, plain, "{len}");
        assert_eq!(header.context, ctx);
        assert_eq!(header.blob, blob());
        assert_eq!(header.frame_len, MIN_FRAME_LEN);
    }
}

#[test]
fn two_seals_of_the_same_input_differ() {
    let dk = key(1);
    let a = seal_bytes(&dk, context(&[]), MIN_FRAME_LEN, b"same");
    let b = seal_bytes(&dk, context(&[]), MIN_FRAME_LEN, b"same");
    assert_ne!(a, b, "the message id is random");
}

/// Whether `message` fails to open under `dk` (and hands out nothing
/// unverified: the opened bytes on failure are never the whole plaintext).
fn refused(dk: &DataKey, message: &[u8]) -> bool {
    open_bytes(dk, message).is_err()
}

/// A 3-frame message and where its frames start.
fn three_frames() -> (DataKey, Vec<u8>, Vec<u8>, usize) {
    let dk = key(0x17);
    let plain = plaintext(2 * MIN_FRAME_LEN as usize + 100);
    let message = seal_bytes(&dk, context(&[("k", "v")]), MIN_FRAME_LEN, &plain);
    let header_len = Header::read_from(&mut Cursor::new(&message))
        .unwrap()
        .to_bytes()
        .len();
    (dk, message, plain, header_len)
}

#[test]
fn every_byte_flipped_is_refused() {
    let (dk, message, _, _) = three_frames();
    for i in 0..message.len() {
        for bit in [0x01u8, 0x80] {
            let mut m = message.clone();
            m[i] ^= bit;
            assert!(refused(&dk, &m), "byte {i} ^ {bit:#x} opened");
        }
    }
}

#[test]
fn every_truncation_and_any_extension_is_refused() {
    let (dk, message, _, _) = three_frames();
    for len in 0..message.len() {
        assert!(refused(&dk, &message[..len]), "cut at {len} opened");
    }
    for extra in [&[0u8][..], &[0u8; 16], &[0u8; 300]] {
        let mut m = message.clone();
        m.extend_from_slice(extra);
        assert!(refused(&dk, &m), "{} bytes appended opened", extra.len());
    }
}

#[test]
fn frames_swapped_dropped_duplicated_or_moved_are_refused() {
    let (dk, message, _, header_len) = three_frames();
    let full = MIN_FRAME_LEN as usize + TAG_LEN;
    let header = &message[..header_len];
    let f0 = &message[header_len..header_len + full];
    let f1 = &message[header_len + full..header_len + 2 * full];
    let last = &message[header_len + 2 * full..];
    let cases: [(&str, Vec<&[u8]>); 6] = [
        ("0 and 1 swapped", vec![header, f1, f0, last]),
        ("frame 1 dropped", vec![header, f0, last]),
        ("last frame dropped", vec![header, f0, f1]),
        ("frame 0 twice", vec![header, f0, f0, f1, last]),
        ("last frame twice", vec![header, f0, f1, last, last]),
        ("only the last frame", vec![header, last]),
    ];
    for (what, parts) in cases {
        assert!(refused(&dk, &parts.concat()), "{what}: opened");
    }
    // The intact message, for contrast.
    assert!(!refused(&dk, &message));
}

#[test]
fn another_key_another_header_or_another_context_is_refused() {
    let (dk, message, plain, header_len) = three_frames();
    assert!(matches!(
        open_bytes(&key(0x18), &message),
        Err(FormatError::NotAuthentic)
    ));
    // A second message under the same data key: its header with the
    // first one's frames does not open (a new message id, a new key).
    let other = seal_bytes(&dk, context(&[("k", "v")]), MIN_FRAME_LEN, &plain);
    let other_header_len = Header::read_from(&mut Cursor::new(&other))
        .unwrap()
        .to_bytes()
        .len();
    let mixed = [&other[..other_header_len], &message[header_len..]].concat();
    assert!(refused(&dk, &mixed));
    // The context edited in place (same length): the header's tag fails.
    // (The context starts at byte 44; its value is the byte after "v"'s
    // length prefix, after the key "k" and its prefix.)
    let at = 44 + 4 + 1 + 4;
    assert_eq!(message[at], b'v');
    let mut edited = message.clone();
    edited[at] = b'w';
    assert!(matches!(
        open_bytes(&dk, &edited),
        Err(FormatError::NotAuthentic)
    ));
}

#[test]
fn an_opener_hands_out_no_frame_before_its_tag_verifies() {
    let (dk, mut message, plain, header_len) = three_frames();
    // Tamper with the second frame: the first frame's plaintext comes out,
    // then the error; nothing of the second frame ever does.
    let second = header_len + MIN_FRAME_LEN as usize + TAG_LEN + 5;
    message[second] ^= 1;
    let mut input = Cursor::new(&message);
    let header = Header::read_from(&mut input).unwrap();
    let mut opener = Opener::new(input, &header, &dk).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 97];
    let err = loop {
        match opener.read(&mut buf) {
            Ok(0) => panic!("a tampered message read to its end"),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => break e,
        }
    };
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert_eq!(got, plain[..MIN_FRAME_LEN as usize]);
}

#[test]
fn headers_are_parsed_strictly() {
    let (dk, message, _, _) = three_frames();
    let parse = |m: &[u8]| Header::read_from(&mut Cursor::new(m));
    let mut m = message.clone();
    m[0] = b'X';
    assert!(matches!(parse(&m), Err(FormatError::NotSealed)));
    let mut m = message.clone();
    m[2] = 2;
    assert!(matches!(parse(&m), Err(FormatError::UnsupportedVersion(2))));
    let mut m = message.clone();
    m[3] = 9;
    assert!(matches!(parse(&m), Err(FormatError::UnsupportedSuite(9))));
    for frame_len in [0u32, MIN_FRAME_LEN - 1, MAX_FRAME_LEN + 1, u32::MAX] {
        let mut m = message.clone();
        m[36..40].copy_from_slice(&frame_len.to_be_bytes());
        assert!(
            matches!(parse(&m), Err(FormatError::BadHeader(_))),
            "{frame_len}"
        );
    }
    let mut m = message.clone();
    m[40..44].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(parse(&m), Err(FormatError::BadHeader(_))));
    assert!(matches!(
        parse(&message[..10]),
        Err(FormatError::TruncatedHeader)
    ));
    // Sealing refuses what a header may not hold.
    for (ctx, frame_len) in [
        (context(&[("", "v")]), MIN_FRAME_LEN),
        (context(&[("k", &"v".repeat(1025))]), MIN_FRAME_LEN),
        (context(&[]), MIN_FRAME_LEN - 1),
    ] {
        assert!(Header::seal(&dk, ctx, blob(), frame_len).is_err());
    }
    assert!(Header::seal(&dk, context(&[]), b"XX".to_vec(), MIN_FRAME_LEN).is_err());
    assert!(DataKey::from_slice(&[0u8; 16]).is_err());
    assert_eq!(format!("{dk:?}"), "DataKey(<redacted>)");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn any_plaintext_in_any_writes_round_trips(
        plain in proptest::collection::vec(any::<u8>(), 0..3000),
        frame_len in MIN_FRAME_LEN..1200u32,
        chunks in proptest::collection::vec(1usize..700, 1..20),
        reads in 1usize..500,
    ) {
        let dk = key(9);
        let mut out = Vec::new();
        let mut sealer = Sealer::new(&mut out, &dk, context(&[("p", "q")]), blob(), frame_len).unwrap();
        let mut rest = &plain[..];
        let mut i = 0;
        while !rest.is_empty() {
            let n = chunks[i % chunks.len()].min(rest.len());
            std::io::Write::write_all(&mut sealer, &rest[..n]).unwrap();
            rest = &rest[n..];
            i += 1;
        }
        sealer.finish().unwrap();
        let mut input = Cursor::new(&out);
        let header = Header::read_from(&mut input).unwrap();
        let mut opener = Opener::new(input, &header, &dk).unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; reads];
        loop {
            let n = opener.read(&mut buf).unwrap();
            if n == 0 { break; }
            got.extend_from_slice(&buf[..n]);
        }
        prop_assert_eq!(got, plain);
    }

    #[test]
    fn any_single_byte_change_is_refused(at in any::<prop::sample::Index>(), xor in 1u8..=255) {
        let (dk, mut message, _, _) = three_frames();
        let i = at.index(message.len());
        message[i] ^= xor;
        prop_assert!(refused(&dk, &message));
    }
}

// ---- golden messages ------------------------------------------------------

/// A golden message: everything fixed, the message id too.
struct Definition {
    name: &'static str,
    data_key: u8,
    message_id: u8,
    frame_len: u32,
    context: &'static [(&'static str, &'static str)],
    plaintext_len: usize,
}

const DEFINITIONS: [Definition; 4] = [
    Definition {
        name: "empty plaintext, empty context",
        data_key: 0x01,
        message_id: 0xa1,
        frame_len: 256,
        context: &[],
        plaintext_len: 0,
    },
    Definition {
        name: "one short frame",
        data_key: 0x02,
        message_id: 0xa2,
        frame_len: 4096,
        context: &[("tenant", "acme")],
        plaintext_len: 13,
    },
    Definition {
        name: "exactly two full frames",
        data_key: 0x03,
        message_id: 0xa3,
        frame_len: 256,
        context: &[("a", "1"), ("b", "2")],
        plaintext_len: 512,
    },
    Definition {
        name: "three frames, the last partial, UTF-8 context",
        data_key: 0x04,
        message_id: 0xa4,
        frame_len: 256,
        context: &[("région", "Île-de-France"), ("tenant", "acme")],
        plaintext_len: 600,
    },
];

fn golden_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/sealed-v1.json")
}

fn build(d: &Definition) -> Vec<u8> {
    let dk = key(d.data_key);
    let (header, keys) = Header::seal_with_id(
        &dk,
        context(d.context),
        blob(),
        d.frame_len,
        [d.message_id; 32],
    )
    .unwrap();
    let mut out = header.to_bytes();
    let mut sealer = Sealer::started(&mut out, keys, d.frame_len).unwrap();
    std::io::Write::write_all(&mut sealer, &plaintext(d.plaintext_len)).unwrap();
    sealer.finish().unwrap();
    out
}

struct Len(usize);
impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// The message of `d`, from the specification alone (DESIGN.md): ring's
/// HKDF, SHA-256 and AES-256-GCM, none of this crate's code.
fn from_the_spec(d: &Definition) -> Vec<u8> {
    let message_id = [d.message_id; 32];
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &message_id).extract(&[d.data_key; 32]);
    let mut k = [0u8; 32];
    prk.expand(&[b"coffre/seal/v1/key"], Len(32))
        .unwrap()
        .fill(&mut k)
        .unwrap();
    let mut commitment = [0u8; 32];
    prk.expand(&[b"coffre/seal/v1/commit"], Len(32))
        .unwrap()
        .fill(&mut commitment)
        .unwrap();
    let gcm = LessSafeKey::new(UnboundKey::new(&aead::AES_256_GCM, &k).unwrap());
    let nonce = |kind: u8, i: u64| {
        let mut n = [0u8; 12];
        n[0] = kind;
        n[4..].copy_from_slice(&i.to_be_bytes());
        Nonce::assume_unique_for_key(n)
    };
    let mut ctx = Vec::new();
    for (k, v) in context(d.context) {
        for part in [k, v] {
            ctx.extend_from_slice(&(part.len() as u32).to_be_bytes());
            ctx.extend_from_slice(part.as_bytes());
        }
    }
    let mut header = b"CS\x01\x01".to_vec();
    header.extend_from_slice(&message_id);
    header.extend_from_slice(&d.frame_len.to_be_bytes());
    header.extend_from_slice(&(ctx.len() as u32).to_be_bytes());
    header.extend_from_slice(&ctx);
    header.extend_from_slice(&(blob().len() as u16).to_be_bytes());
    header.extend_from_slice(&blob());
    header.extend_from_slice(&commitment);
    let tag = gcm
        .seal_in_place_separate_tag(nonce(0, 0), Aad::from(&header), &mut [])
        .unwrap();
    header.extend_from_slice(tag.as_ref());
    let aad: [u8; 32] = digest::digest(&digest::SHA256, &header)
        .as_ref()
        .try_into()
        .unwrap();
    let plain = plaintext(d.plaintext_len);
    let chunks: Vec<&[u8]> = if plain.is_empty() {
        vec![&[][..]]
    } else {
        plain.chunks(d.frame_len as usize).collect()
    };
    let mut out = header;
    for (i, chunk) in chunks.iter().enumerate() {
        let kind = if i + 1 == chunks.len() { 2 } else { 1 };
        let mut frame = chunk.to_vec();
        let tag = gcm
            .seal_in_place_separate_tag(nonce(kind, i as u64), Aad::from(aad), &mut frame)
            .unwrap();
        out.extend_from_slice(&frame);
        out.extend_from_slice(tag.as_ref());
    }
    out
}

#[test]
fn golden_messages_open_and_match_the_specification() {
    let vectors: Vec<Value> = DEFINITIONS
        .iter()
        .map(|d| {
            json!({
                "name": d.name,
                "data_key": hex::encode([d.data_key; 32]),
                "context": context(d.context),
                "plaintext": hex::encode(plaintext(d.plaintext_len)),
                "message": hex::encode(build(d)),
            })
        })
        .collect();
    let path = golden_path();
    if std::env::var_os("COFFRE_WRITE_GOLDEN").is_some() {
        let text = serde_json::to_string_pretty(
            &json!({ "format": "coffre sealed message v1", "vectors": vectors }),
        )
        .unwrap();
        std::fs::write(&path, text + "\n").unwrap();
    }
    let file: Value = serde_json::from_slice(&std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (generate it with COFFRE_WRITE_GOLDEN=1 cargo test -p coffre-client --test format golden)",
            path.display()
        )
    }))
    .unwrap();
    let stored = file["vectors"].as_array().unwrap();
    assert_eq!(stored.len(), DEFINITIONS.len(), "a golden vector was lost");
    for (d, v) in DEFINITIONS.iter().zip(stored) {
        let message = hex::decode(v["message"].as_str().unwrap()).unwrap();
        let dk =
            DataKey::from_slice(&hex::decode(v["data_key"].as_str().unwrap()).unwrap()).unwrap();
        let (header, opened) = open_bytes(&dk, &message).unwrap();
        assert_eq!(
            hex::encode(&opened),
            v["plaintext"].as_str().unwrap(),
            "{}",
            d.name
        );
        assert_eq!(
            serde_json::to_value(&header.context).unwrap(),
            v["context"],
            "{}",
            d.name
        );
        assert_eq!(
            message,
            build(d),
            "{}: this build seals it differently",
            d.name
        );
        assert_eq!(
            message,
            from_the_spec(d),
            "{}: not what the specification says",
            d.name
        );
        assert_eq!(
            canonical_context(&header.context).len() as u32,
            u32::from_be_bytes(message[40..44].try_into().unwrap())
        );
    }
}
