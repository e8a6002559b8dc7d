//! The tamper matrix: any change to a valid blob, its context or its key is
//! refused. What parses fails with the one generic `AuthenticationFailed`.

use coffre::crypto::{self, AuthenticationFailed, Rng};
use coffre::envelope::{self, MAX_BLOB_LEN, MIN_BLOB_LEN, ParseError};
use coffre::model::{EncryptionContext, KeyId};
use coffre::secret::CmkMaterial;

use super::{Rejection, cmk, encryption_context, unwrap_blob};

const PLAINTEXT: &[u8; 16] = b"sixteen byte key";
const VERSION: u32 = 5;

struct Fixture {
    material: CmkMaterial,
    key_id: KeyId,
    context: EncryptionContext,
    blob: Vec<u8>,
}

fn fixture_with(context: EncryptionContext) -> Fixture {
    let material = cmk([0x5A; 32]);
    let key_id = KeyId::from_bytes([0xC0; 16]);
    let blob = crypto::seal(
        &Rng::default(),
        &material,
        key_id,
        VERSION,
        &crypto::context_digest(&context),
        PLAINTEXT,
    )
    .expect("seal");
    let fixture = Fixture {
        material,
        key_id,
        context,
        blob,
    };
    // Every tamper test starts from a blob that does unwrap.
    assert_eq!(fixture.unwrap(&fixture.blob).as_deref(), Ok(&PLAINTEXT[..]));
    fixture
}

fn fixture() -> Fixture {
    fixture_with(encryption_context(&[
        ("tenant", "acme"),
        ("purpose", "tamper-test"),
    ]))
}

impl Fixture {
    fn unwrap(&self, blob: &[u8]) -> Result<Vec<u8>, Rejection> {
        unwrap_blob(&self.material, blob, &self.context)
    }
}

/// The blob parsed but did not authenticate: the one generic error.
#[track_caller]
fn assert_auth_failed(result: Result<Vec<u8>, Rejection>, what: &str) {
    match result {
        Err(Rejection::Auth(e)) => {
            assert_eq!(e, AuthenticationFailed, "{what}");
            assert_eq!(e.to_string(), "authentication failed", "{what}");
        }
        other => panic!("{what}: expected AuthenticationFailed, got {other:?}"),
    }
}

#[test]
fn every_bit_flip_is_refused() {
    let f = fixture();
    let mut checked = 0;
    for i in 0..f.blob.len() {
        for bit in 0..8 {
            let mut blob = f.blob.clone();
            blob[i] ^= 1 << bit;
            let result = f.unwrap(&blob);
            let what = format!("byte {i} bit {bit}");
            match i {
                0 | 1 => assert_eq!(result, Err(Rejection::Parse(ParseError::Magic)), "{what}"),
                2 => assert!(
                    matches!(result, Err(Rejection::Parse(ParseError::Version(_)))),
                    "{what}"
                ),
                3 => assert!(
                    matches!(result, Err(Rejection::Parse(ParseError::Suite(_)))),
                    "{what}"
                ),
                // key id, version, salt, IV, ciphertext, tag: all authenticated.
                _ => assert_auth_failed(result, &what),
            }
            checked += 1;
        }
    }
    assert_eq!(checked, (68 + 16 + 16) * 8);
}

#[test]
fn every_truncation_is_refused() {
    let f = fixture();
    let (mut short, mut parsed) = (0, 0);
    for len in 0..f.blob.len() {
        let result = f.unwrap(&f.blob[..len]);
        if len < MIN_BLOB_LEN {
            assert_eq!(result, Err(Rejection::Parse(ParseError::Length(len))));
            short += 1;
        } else {
            // Long enough to parse: a shorter ciphertext, the tag shifted.
            assert_auth_failed(result, &format!("truncated to {len}"));
            parsed += 1;
        }
    }
    assert!(short > 0 && parsed > 0, "both kinds of truncation covered");
}

#[test]
fn every_extension_is_refused() {
    let f = fixture();
    for extra in 1..=32 {
        for fill in [0x00, 0xFF] {
            let mut blob = f.blob.clone();
            blob.extend(std::iter::repeat_n(fill, extra));
            assert_auth_failed(f.unwrap(&blob), &format!("+{extra} × {fill:#x}"));
        }
        // Appending a copy of the blob's own tail.
        let mut blob = f.blob.clone();
        blob.extend_from_slice(&f.blob[f.blob.len() - extra..]);
        assert_auth_failed(f.unwrap(&blob), &format!("+{extra} of its own tail"));
    }

    // A blob of the largest size cannot grow at all.
    let big = crypto::seal(
        &Rng::default(),
        &f.material,
        f.key_id,
        VERSION,
        &crypto::context_digest(&f.context),
        &[7; 4096],
    )
    .expect("seal");
    assert_eq!(big.len(), MAX_BLOB_LEN);
    assert!(f.unwrap(&big).is_ok());
    let mut longer = big.clone();
    longer.push(0);
    assert_eq!(
        f.unwrap(&longer),
        Err(Rejection::Parse(ParseError::Length(MAX_BLOB_LEN + 1)))
    );
}

#[test]
fn every_context_change_is_refused() {
    let f = fixture();
    let others = [
        (
            "entry added",
            encryption_context(&[
                ("tenant", "acme"),
                ("purpose", "tamper-test"),
                ("extra", ""),
            ]),
        ),
        ("entry removed", encryption_context(&[("tenant", "acme")])),
        (
            "value changed",
            encryption_context(&[("tenant", "acme"), ("purpose", "tamper-tesT")]),
        ),
        (
            "key changed",
            encryption_context(&[("tenant", "acme"), ("Purpose", "tamper-test")]),
        ),
        (
            "key and value swapped",
            encryption_context(&[("acme", "tenant"), ("purpose", "tamper-test")]),
        ),
        (
            "bytes moved between key and value",
            encryption_context(&[("tenanta", "cme"), ("purpose", "tamper-test")]),
        ),
        ("empty", EncryptionContext::default()),
    ];
    for (what, other) in others {
        assert_ne!(other, f.context, "{what}");
        assert_auth_failed(unwrap_blob(&f.material, &f.blob, &other), what);
    }

    // And the other way round: sealed under the empty context.
    let empty = fixture_with(EncryptionContext::default());
    assert_auth_failed(
        unwrap_blob(
            &empty.material,
            &empty.blob,
            &encryption_context(&[("tenant", "acme")]),
        ),
        "empty at wrap, non-empty at unwrap",
    );
    assert_auth_failed(
        unwrap_blob(
            &empty.material,
            &empty.blob,
            &encryption_context(&[("k", "")]),
        ),
        "empty at wrap, one empty value at unwrap",
    );
}

#[test]
fn header_key_id_or_version_swaps_are_refused() {
    let f = fixture();
    let other_material = cmk([0xA5; 32]);

    let other_ids = [[0xC1; 16], [0x00; 16], *KeyId::new_random().as_bytes()];
    for id in other_ids {
        let mut blob = f.blob.clone();
        blob[4..20].copy_from_slice(&id);
        // Whether the service then loads the same material or the material
        // of the key the header now names, the blob is refused.
        assert_auth_failed(f.unwrap(&blob), "key id swapped");
        assert_auth_failed(
            unwrap_blob(&other_material, &blob, &f.context),
            "key id swapped, that key's material",
        );
    }

    for version in [VERSION - 1, VERSION + 1, 0, u32::MAX] {
        let mut blob = f.blob.clone();
        blob[20..24].copy_from_slice(&version.to_be_bytes());
        assert_auth_failed(f.unwrap(&blob), &format!("version {version}"));
        assert_auth_failed(
            unwrap_blob(&other_material, &blob, &f.context),
            &format!("version {version}, that version's material"),
        );
    }

    // The header of one blob on the body of another, same key and version.
    let second = fixture();
    let mut spliced = second.blob[..68].to_vec();
    spliced.extend_from_slice(&f.blob[68..]);
    assert_auth_failed(f.unwrap(&spliced), "header of another blob");
}

#[test]
fn other_key_material_is_refused() {
    let f = fixture();
    // Another CMK, another version of the same CMK (new random material),
    // and material one bit away.
    let mut near = [0x5A; 32];
    near[31] ^= 1;
    for (what, material) in [
        ("another CMK", cmk([0x17; 32])),
        ("another version's material", cmk([0x5B; 32])),
        ("material one bit off", cmk(near)),
    ] {
        assert_auth_failed(unwrap_blob(&material, &f.blob, &f.context), what);
    }

    // Sealed under version 6's material, presented as version 5 and opened
    // with version 5's: refused.
    let v6 = cmk([0x66; 32]);
    let blob = crypto::seal(
        &Rng::default(),
        &v6,
        f.key_id,
        VERSION + 1,
        &crypto::context_digest(&f.context),
        PLAINTEXT,
    )
    .expect("seal");
    assert!(unwrap_blob(&v6, &blob, &f.context).is_ok());
    let mut relabelled = blob.clone();
    relabelled[20..24].copy_from_slice(&VERSION.to_be_bytes());
    assert_auth_failed(f.unwrap(&relabelled), "version relabelled");
    assert_auth_failed(
        unwrap_blob(&v6, &relabelled, &f.context),
        "version relabelled, original material",
    );

    // The parser is the same for all of them: only the header's own fields
    // decide which material is tried.
    let parsed = envelope::parse(&f.blob).expect("parse");
    assert_eq!(parsed.header.key_id, f.key_id);
    assert_eq!(parsed.header.key_version, VERSION);
}
