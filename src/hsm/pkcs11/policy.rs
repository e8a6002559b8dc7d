//! What coffre requires of a token and of every object it keeps there: the
//! mechanisms, the labels, and the attributes of the three kinds of object
//! (root keys, CMK key objects, the audit signing key), each with the
//! template coffre generates it with and the policy it is checked against
//! when found. This is the file to read to know what a PKCS#11 token must
//! guarantee.
//!
//! # Root keys ([`ROOT_KEY_POLICY`])
//!
//! Each root key is an AES-256 secret-key token object generated inside the
//! token, labelled `coffre-root-<id>` ([`ROOT_LABEL_PREFIX`]) with `CKA_ID` =
//! the id as 4 big-endian bytes. The current root key is the one with the
//! highest id. The policy is checked for every root key at start and by
//! `coffre hsm check`, and for a root key that appears later (a rotation by
//! another node) before it is used. It closes the known PKCS#11
//! key-extraction attacks:
//!
//! - `CKA_SENSITIVE` true, `CKA_EXTRACTABLE` false, and (set by the token)
//!   `CKA_ALWAYS_SENSITIVE` true, `CKA_NEVER_EXTRACTABLE` true, `CKA_LOCAL`
//!   true: the value never left the token and cannot be read or wrapped out.
//! - `CKA_ENCRYPT` / `CKA_DECRYPT` true and `CKA_WRAP` / `CKA_UNWRAP` /
//!   `CKA_DERIVE` / `CKA_SIGN` / `CKA_VERIFY` false: the key is used with
//!   one mechanism, AES-GCM, for one purpose. No key that wraps can also
//!   decrypt, so the "wrap a sensitive key, then decrypt the wrapping" attack
//!   has nothing to work with, and the root key unwraps no attacker-supplied
//!   key into the token.
//! - `CKA_MODIFIABLE` false and `CKA_COPYABLE` false: no session can turn a
//!   flag back on, on the object or on a copy of it. (`CKA_COPYABLE` is a
//!   PKCS#11 2.40 attribute some tokens do not report; if reported, it must
//!   be false.)
//! - `CKA_TOKEN` true, `CKA_PRIVATE` true: persistent, and invisible
//!   without the user PIN.
//! - `CKA_VALUE_LEN` 32 and `CKA_KEY_TYPE` `CKK_AES`: AES-256.
//! - `CKA_ALLOWED_MECHANISMS` = `[CKM_AES_GCM]`: set at generation, so a
//!   token that honours it refuses every other mechanism with the key. A
//!   root key found with a list that allows anything else is refused; one
//!   with no list (made before coffre set it) is used, with a warning at
//!   start that says to rotate it.
//!
//! # CMK key objects ([`KEY_OBJECT_POLICY`])
//!
//! A CMK version of protection level `HSM` is an AES-256 token object named
//! (label and `CKA_ID`) by the core. It is only ever the base key of a
//! derivation (`CKM_AES_CBC_ENCRYPT_DATA`) that makes one per-seal key:
//!
//! - `CKA_DERIVE` true and `CKA_ENCRYPT` / `CKA_DECRYPT` / `CKA_WRAP` false:
//!   the object itself encrypts, decrypts and wraps nothing, so no call can
//!   use it on data an attacker chose; only the derived keys seal.
//! - `CKA_SENSITIVE` true, `CKA_EXTRACTABLE` false, `CKA_ALWAYS_SENSITIVE`
//!   and `CKA_NEVER_EXTRACTABLE` true, `CKA_TOKEN` and `CKA_PRIVATE` true: as
//!   for a root key, the version never leaves the token.
//! - `CKA_UNWRAP` / `CKA_SIGN` / `CKA_VERIFY` and `CKA_MODIFIABLE` false,
//!   `CKA_COPYABLE` false if reported, `CKA_KEY_TYPE` `CKK_AES` and
//!   `CKA_VALUE_LEN` 32; the template also sets `CKA_DESTROYABLE` true (the
//!   core destroys a deleted key's versions).
//! - `CKA_ALLOWED_MECHANISMS` = `[CKM_AES_CBC_ENCRYPT_DATA]`: a token that
//!   honours it refuses the base-key derivations (`CKM_XOR_BASE_AND_DATA`,
//!   `CKM_CONCATENATE_*`, `CKM_EXTRACT_KEY_FROM_KEY`) that could otherwise
//!   yield an extractable copy of the CMK (security review L6). cryptoki
//!   has no `CKA_DERIVE_TEMPLATE` yet, so the derived key's template is
//!   coffre's own (`seal_key_template`), not one the token enforces.
//!
//! The whole policy is checked once per object, when coffre first finds
//! it: an object planted under a CMK's name with weaker attributes (say
//! `CKA_MODIFIABLE` true, or a list of mechanisms allowing more) is never
//! used. An object with no list of mechanisms (made before coffre set one)
//! is used, with a warning.
//! A key object's name never starts with [`ROOT_LABEL_PREFIX`], so it cannot
//! pass for a root key.
//!
//! The per-seal key (`seal_key_template`) is a session object that can
//! only encrypt (sealing) or only decrypt (opening), is sensitive and not
//! extractable, and wraps, unwraps and derives nothing; coffre destroys it
//! after the one call.
//!
//! # The audit signing key ([`AUDIT_KEY_POLICY`])
//!
//! An Ed25519 key pair labelled [`AUDIT_KEY_LABEL`] signs the audit log's
//! checkpoints (`CKM_EDDSA`). Its private half must be a private,
//! sensitive, never-extractable token object with `CKA_SIGN` true and
//! `CKA_DECRYPT` / `CKA_UNWRAP` false: it signs and does nothing else, and
//! no key can be unwrapped with it. It is generated with `CKA_DERIVE` and
//! `CKA_MODIFIABLE` false as well. The public half is a public token object,
//! so anyone can read it to verify checkpoints. Checked every time the
//! signer is loaded.
//!
//! # Mechanisms
//!
//! [`REQUIRED_MECHANISMS`] (`CKM_AES_KEY_GEN`, `CKM_AES_GCM`) are refused at
//! start if missing. Without [`KEY_OBJECT_MECHANISM`] the token serves, but
//! protection level `HSM` is refused.

use cryptoki::mechanism::MechanismType;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};

/// Labels of coffre's root keys: this prefix and the id in decimal.
pub const ROOT_LABEL_PREFIX: &str = "coffre-root-";

/// Label of the Ed25519 key pair that signs audit checkpoints.
pub const AUDIT_KEY_LABEL: &str = "coffre-audit-signing";

/// Mechanisms the token must offer.
pub const REQUIRED_MECHANISMS: [(&str, MechanismType); 2] = [
    ("CKM_AES_KEY_GEN", MechanismType::AES_KEY_GEN),
    ("CKM_AES_GCM", MechanismType::AES_GCM),
];

/// The mechanism protection level `HSM` needs besides those, for
/// derivation.
pub const KEY_OBJECT_MECHANISM: (&str, MechanismType) = (
    "CKM_AES_CBC_ENCRYPT_DATA",
    MechanismType::AES_CBC_ENCRYPT_DATA,
);

/// One required attribute of an object: its PKCS#11 name, its type, and
/// the value it must have.
#[derive(Clone, Copy, Debug)]
pub struct RequiredAttribute {
    pub name: &'static str,
    pub kind: AttributeType,
    pub value: bool,
}

const fn req(name: &'static str, kind: AttributeType, value: bool) -> RequiredAttribute {
    RequiredAttribute { name, kind, value }
}

/// What every root key must be, checked at start
/// ([`Pkcs11Hsm::open`](super::Pkcs11Hsm::open)) and by `coffre hsm check`.
/// [`root_key_problems`] adds `CKA_COPYABLE` and `CKA_VALUE_LEN`.
pub const ROOT_KEY_POLICY: [RequiredAttribute; 15] = [
    req("CKA_TOKEN", AttributeType::Token, true),
    req("CKA_PRIVATE", AttributeType::Private, true),
    req("CKA_SENSITIVE", AttributeType::Sensitive, true),
    req("CKA_EXTRACTABLE", AttributeType::Extractable, false),
    req("CKA_ALWAYS_SENSITIVE", AttributeType::AlwaysSensitive, true),
    req(
        "CKA_NEVER_EXTRACTABLE",
        AttributeType::NeverExtractable,
        true,
    ),
    req("CKA_LOCAL", AttributeType::Local, true),
    req("CKA_ENCRYPT", AttributeType::Encrypt, true),
    req("CKA_DECRYPT", AttributeType::Decrypt, true),
    req("CKA_WRAP", AttributeType::Wrap, false),
    req("CKA_UNWRAP", AttributeType::Unwrap, false),
    req("CKA_DERIVE", AttributeType::Derive, false),
    req("CKA_SIGN", AttributeType::Sign, false),
    req("CKA_VERIFY", AttributeType::Verify, false),
    req("CKA_MODIFIABLE", AttributeType::Modifiable, false),
];

/// What a CMK key object must be when coffre finds it on the token.
/// [`key_object_problems`] adds `CKA_COPYABLE`, `CKA_VALUE_LEN`,
/// `CKA_KEY_TYPE` and `CKA_ALLOWED_MECHANISMS`.
pub const KEY_OBJECT_POLICY: [RequiredAttribute; 14] = [
    req("CKA_TOKEN", AttributeType::Token, true),
    req("CKA_PRIVATE", AttributeType::Private, true),
    req("CKA_SENSITIVE", AttributeType::Sensitive, true),
    req("CKA_EXTRACTABLE", AttributeType::Extractable, false),
    req("CKA_ALWAYS_SENSITIVE", AttributeType::AlwaysSensitive, true),
    req(
        "CKA_NEVER_EXTRACTABLE",
        AttributeType::NeverExtractable,
        true,
    ),
    req("CKA_DERIVE", AttributeType::Derive, true),
    req("CKA_ENCRYPT", AttributeType::Encrypt, false),
    req("CKA_DECRYPT", AttributeType::Decrypt, false),
    req("CKA_WRAP", AttributeType::Wrap, false),
    req("CKA_UNWRAP", AttributeType::Unwrap, false),
    req("CKA_SIGN", AttributeType::Sign, false),
    req("CKA_VERIFY", AttributeType::Verify, false),
    req("CKA_MODIFIABLE", AttributeType::Modifiable, false),
];

/// The one mechanism a root key may be used with.
pub const ROOT_KEY_MECHANISM: (&str, MechanismType) = ("CKM_AES_GCM", MechanismType::AES_GCM);

/// What the audit signing key's private half must be, checked every time
/// it is loaded.
pub const AUDIT_KEY_POLICY: [RequiredAttribute; 9] = [
    req("CKA_TOKEN", AttributeType::Token, true),
    req("CKA_PRIVATE", AttributeType::Private, true),
    req("CKA_SENSITIVE", AttributeType::Sensitive, true),
    req("CKA_EXTRACTABLE", AttributeType::Extractable, false),
    req("CKA_ALWAYS_SENSITIVE", AttributeType::AlwaysSensitive, true),
    req(
        "CKA_NEVER_EXTRACTABLE",
        AttributeType::NeverExtractable,
        true,
    ),
    req("CKA_SIGN", AttributeType::Sign, true),
    req("CKA_DECRYPT", AttributeType::Decrypt, false),
    req("CKA_UNWRAP", AttributeType::Unwrap, false),
];

/// DER of the Ed25519 curve's OID (1.3.101.112), as `CKA_EC_PARAMS`.
const ED25519_PARAMS: [u8; 5] = [0x06, 0x03, 0x2B, 0x65, 0x70];

/// The template coffre generates a root key with.
pub(super) fn root_key_template(id: u32) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32.into()),
        Attribute::Label(format!("{ROOT_LABEL_PREFIX}{id}").into_bytes()),
        Attribute::Id(id.to_be_bytes().to_vec()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Modifiable(false),
        Attribute::Copyable(false),
        Attribute::Destroyable(true),
        Attribute::AllowedMechanisms(vec![ROOT_KEY_MECHANISM.1]),
    ]
}

/// The template of a CMK version kept in the token (protection level HSM):
/// it can only derive the per-seal keys, never encrypt, decrypt or wrap
/// anything itself, and never leaves the token.
pub(super) fn key_object_template(name: &str) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32.into()),
        Attribute::Label(name.as_bytes().to_vec()),
        Attribute::Id(name.as_bytes().to_vec()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Derive(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Modifiable(false),
        Attribute::Copyable(false),
        Attribute::Destroyable(true),
        Attribute::AllowedMechanisms(vec![KEY_OBJECT_MECHANISM.1]),
    ]
}

/// The per-seal key derived from a key object: a session object that can
/// only encrypt (`encrypt`) or only decrypt, non-extractable.
pub(super) fn seal_key_template(encrypt: bool) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32.into()),
        Attribute::Token(false),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(encrypt),
        Attribute::Decrypt(!encrypt),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::AllowedMechanisms(vec![MechanismType::AES_GCM]),
    ]
}

/// The templates coffre generates the audit signing key pair with:
/// (public half, private half).
pub(super) fn audit_key_templates() -> (Vec<Attribute>, Vec<Attribute>) {
    let label = AUDIT_KEY_LABEL.as_bytes().to_vec();
    (
        vec![
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::EcParams(ED25519_PARAMS.to_vec()),
            Attribute::Label(label.clone()),
        ],
        vec![
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Decrypt(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
            Attribute::Modifiable(false),
            Attribute::Label(label),
        ],
    )
}

/// The attribute types to read to check `policy`.
pub(super) fn attribute_types(policy: &[RequiredAttribute]) -> Vec<AttributeType> {
    policy.iter().map(|r| r.kind).collect()
}

/// Every entry of `policy` that `attrs` does not satisfy (a missing one
/// included), one line each.
pub(super) fn policy_problems(policy: &[RequiredAttribute], attrs: &[Attribute]) -> Vec<String> {
    policy
        .iter()
        .filter_map(|want| {
            match attrs
                .iter()
                .find(|a| a.attribute_type() == want.kind)
                .and_then(bool_value)
            {
                Some(v) if v == want.value => None,
                Some(v) => Some(format!("{} is {v}, must be {}", want.name, want.value)),
                None => Some(format!("{} is not reported by the token", want.name)),
            }
        })
        .collect()
}

/// The attributes a key's shape is read from ([`shape_problems`]).
const SHAPE_ATTRIBUTES: [AttributeType; 4] = [
    AttributeType::ValueLen,
    AttributeType::Copyable,
    AttributeType::KeyType,
    AttributeType::AllowedMechanisms,
];

/// The attributes [`root_key_problems`] reads.
pub(super) fn root_key_attribute_types() -> Vec<AttributeType> {
    let mut kinds = attribute_types(&ROOT_KEY_POLICY);
    kinds.extend(SHAPE_ATTRIBUTES);
    kinds
}

/// The attributes [`key_object_problems`] reads.
pub(super) fn key_object_attribute_types() -> Vec<AttributeType> {
    let mut kinds = attribute_types(&KEY_OBJECT_POLICY);
    kinds.extend(SHAPE_ATTRIBUTES);
    kinds
}

/// What is wrong with a root key's attributes, one line per problem (empty:
/// nothing). A required attribute the token does not report is a problem.
pub fn root_key_problems(attrs: &[Attribute]) -> Vec<String> {
    let mut problems = policy_problems(&ROOT_KEY_POLICY, attrs);
    problems.extend(shape_problems(attrs, ROOT_KEY_MECHANISM));
    problems
}

/// What is wrong with a CMK key object's attributes, one line per problem.
pub fn key_object_problems(attrs: &[Attribute]) -> Vec<String> {
    let mut problems = policy_problems(&KEY_OBJECT_POLICY, attrs);
    problems.extend(shape_problems(attrs, KEY_OBJECT_MECHANISM));
    problems
}

/// Whether the key carries no list of allowed mechanisms (the token does
/// not report one, or it is empty: every mechanism allowed). Not a
/// problem, for keys made before coffre set it, but worth a warning.
pub fn allows_every_mechanism(attrs: &[Attribute]) -> bool {
    !attrs
        .iter()
        .any(|a| matches!(a, Attribute::AllowedMechanisms(list) if !list.is_empty()))
}

/// An AES-256 key, not copyable, whose list of allowed mechanisms (if it
/// has one) holds `mechanism` only.
fn shape_problems(attrs: &[Attribute], mechanism: (&str, MechanismType)) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(true) = attrs
        .iter()
        .find(|a| a.attribute_type() == AttributeType::Copyable)
        .and_then(bool_value)
    {
        problems.push("CKA_COPYABLE is true, must be false".into());
    }
    let len = attrs.iter().find_map(|a| match a {
        Attribute::ValueLen(l) => Some(u64::from(*l)),
        _ => None,
    });
    if len != Some(32) {
        problems.push(format!(
            "CKA_VALUE_LEN is {}, must be 32 (AES-256)",
            len.map_or("not reported".to_string(), |l| l.to_string())
        ));
    }
    match attrs.iter().find_map(|a| match a {
        Attribute::KeyType(t) => Some(*t),
        _ => None,
    }) {
        Some(t) if t == KeyType::AES => {}
        Some(t) => problems.push(format!("CKA_KEY_TYPE is {t}, must be CKK_AES")),
        None => problems.push("CKA_KEY_TYPE is not reported by the token".into()),
    }
    if let Some(list) = attrs.iter().find_map(|a| match a {
        Attribute::AllowedMechanisms(list) => Some(list),
        _ => None,
    }) && list.iter().any(|m| *m != mechanism.1)
    {
        let names: Vec<String> = list.iter().map(ToString::to_string).collect();
        problems.push(format!(
            "CKA_ALLOWED_MECHANISMS is [{}], must be [{}] only",
            names.join(", "),
            mechanism.0
        ));
    }
    problems
}

fn bool_value(a: &Attribute) -> Option<bool> {
    Some(match a {
        Attribute::Token(v)
        | Attribute::Private(v)
        | Attribute::Sensitive(v)
        | Attribute::Extractable(v)
        | Attribute::AlwaysSensitive(v)
        | Attribute::NeverExtractable(v)
        | Attribute::Local(v)
        | Attribute::Encrypt(v)
        | Attribute::Decrypt(v)
        | Attribute::Wrap(v)
        | Attribute::Unwrap(v)
        | Attribute::Derive(v)
        | Attribute::Sign(v)
        | Attribute::Verify(v)
        | Attribute::Modifiable(v)
        | Attribute::Copyable(v) => *v,
        _ => return None,
    })
}
