//! The attribute policies against their own templates, and every way a
//! root key can fall short of [`ROOT_KEY_POLICY`].

use cryptoki::mechanism::MechanismType;
use cryptoki::object::{Attribute, AttributeType, KeyType};

use super::policy::{
    AUDIT_KEY_POLICY, KEY_OBJECT_POLICY, ROOT_KEY_POLICY, allows_every_mechanism,
    audit_key_templates, key_object_problems, key_object_template, policy_problems,
    root_key_problems, root_key_template,
};

/// The attributes a token sets by itself on a key it generated.
fn generated_by_the_token() -> [Attribute; 3] {
    [
        Attribute::AlwaysSensitive(true),
        Attribute::NeverExtractable(true),
        Attribute::Local(true),
    ]
}

#[test]
fn the_generation_template_satisfies_the_policy_it_is_checked_against() {
    let mut attrs = root_key_template(1);
    attrs.extend(generated_by_the_token());
    assert_eq!(root_key_problems(&attrs), Vec::<String>::new());
}

#[test]
fn the_key_object_and_audit_key_templates_satisfy_their_policies() {
    let mut object = key_object_template("cmk-1-v1");
    object.extend(generated_by_the_token());
    assert_eq!(key_object_problems(&object), Vec::<String>::new());
    let (_, mut private) = audit_key_templates();
    private.extend(generated_by_the_token());
    assert_eq!(
        policy_problems(&AUDIT_KEY_POLICY, &private),
        Vec::<String>::new()
    );
}

#[test]
fn every_weakened_attribute_is_reported() {
    let mut base = root_key_template(1);
    base.extend(generated_by_the_token());
    for want in ROOT_KEY_POLICY {
        let weakened: Vec<Attribute> = base
            .iter()
            .map(|a| {
                if a.attribute_type() == want.kind {
                    bool_attr(want.kind, !want.value)
                } else {
                    a.clone()
                }
            })
            .collect();
        let problems = root_key_problems(&weakened);
        assert_eq!(problems.len(), 1, "{}: {problems:?}", want.name);
        assert!(problems[0].starts_with(want.name), "{problems:?}");

        let missing: Vec<Attribute> = base
            .iter()
            .filter(|a| a.attribute_type() != want.kind)
            .cloned()
            .collect();
        let problems = root_key_problems(&missing);
        assert_eq!(
            problems,
            vec![format!("{} is not reported by the token", want.name)]
        );
    }
    let copyable: Vec<Attribute> = base
        .iter()
        .map(|a| match a {
            Attribute::Copyable(_) => Attribute::Copyable(true),
            other => other.clone(),
        })
        .collect();
    assert_eq!(
        root_key_problems(&copyable),
        vec!["CKA_COPYABLE is true, must be false"]
    );
    let aes128: Vec<Attribute> = base
        .iter()
        .map(|a| match a {
            Attribute::ValueLen(_) => Attribute::ValueLen(16.into()),
            other => other.clone(),
        })
        .collect();
    assert_eq!(
        root_key_problems(&aes128),
        vec!["CKA_VALUE_LEN is 16, must be 32 (AES-256)"]
    );
}

/// `attrs` with every attribute of `kind` replaced by `with`.
fn replaced(attrs: &[Attribute], with: Attribute) -> Vec<Attribute> {
    attrs
        .iter()
        .map(|a| {
            if a.attribute_type() == with.attribute_type() {
                with.clone()
            } else {
                a.clone()
            }
        })
        .collect()
}

/// Review L6: a key object found on the token is checked in full (a planted
/// one with `CKA_MODIFIABLE` true, another key type or a wider list of
/// mechanisms is refused), and both kinds of key are generated restricted
/// to their one mechanism.
#[test]
fn key_objects_are_checked_in_full_and_restricted_to_their_mechanism() {
    let mut base = key_object_template("cmk-1-v1");
    base.extend(generated_by_the_token());
    assert!(!allows_every_mechanism(&base));
    for want in KEY_OBJECT_POLICY {
        let problems = key_object_problems(&replaced(&base, bool_attr(want.kind, !want.value)));
        assert_eq!(problems.len(), 1, "{}: {problems:?}", want.name);
        assert!(problems[0].starts_with(want.name), "{problems:?}");
    }
    for name in ["CKA_UNWRAP", "CKA_SIGN", "CKA_VERIFY", "CKA_MODIFIABLE"] {
        assert!(
            KEY_OBJECT_POLICY.iter().any(|r| r.name == name),
            "{name} is not checked on key objects"
        );
    }
    assert_eq!(
        key_object_problems(&replaced(&base, Attribute::Copyable(true))),
        vec!["CKA_COPYABLE is true, must be false"]
    );
    assert_eq!(
        key_object_problems(&replaced(
            &base,
            Attribute::KeyType(KeyType::GENERIC_SECRET)
        )),
        vec!["CKA_KEY_TYPE is CKK_GENERIC_SECRET, must be CKK_AES"]
    );
    let wider = Attribute::AllowedMechanisms(vec![
        MechanismType::AES_CBC_ENCRYPT_DATA,
        MechanismType::XOR_BASE_AND_DATA,
    ]);
    let problems = key_object_problems(&replaced(&base, wider));
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].starts_with("CKA_ALLOWED_MECHANISMS is [")
            && problems[0].ends_with("must be [CKM_AES_CBC_ENCRYPT_DATA] only"),
        "{problems:?}"
    );
    // Made before coffre set the list: used, with a warning.
    let legacy = replaced(&base, Attribute::AllowedMechanisms(Vec::new()));
    assert_eq!(key_object_problems(&legacy), Vec::<String>::new());
    assert!(allows_every_mechanism(&legacy));

    let mut root = root_key_template(1);
    root.extend(generated_by_the_token());
    assert!(!allows_every_mechanism(&root));
    let derive_too = Attribute::AllowedMechanisms(vec![
        MechanismType::AES_GCM,
        MechanismType::AES_CBC_ENCRYPT_DATA,
    ]);
    let problems = root_key_problems(&replaced(&root, derive_too));
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].ends_with("must be [CKM_AES_GCM] only"),
        "{problems:?}"
    );
    let no_list: Vec<Attribute> = root
        .iter()
        .filter(|a| a.attribute_type() != AttributeType::AllowedMechanisms)
        .cloned()
        .collect();
    assert_eq!(root_key_problems(&no_list), Vec::<String>::new());
    assert!(allows_every_mechanism(&no_list));
}

fn bool_attr(kind: AttributeType, v: bool) -> Attribute {
    match kind {
        AttributeType::Token => Attribute::Token(v),
        AttributeType::Private => Attribute::Private(v),
        AttributeType::Sensitive => Attribute::Sensitive(v),
        AttributeType::Extractable => Attribute::Extractable(v),
        AttributeType::AlwaysSensitive => Attribute::AlwaysSensitive(v),
        AttributeType::NeverExtractable => Attribute::NeverExtractable(v),
        AttributeType::Local => Attribute::Local(v),
        AttributeType::Encrypt => Attribute::Encrypt(v),
        AttributeType::Decrypt => Attribute::Decrypt(v),
        AttributeType::Wrap => Attribute::Wrap(v),
        AttributeType::Unwrap => Attribute::Unwrap(v),
        AttributeType::Derive => Attribute::Derive(v),
        AttributeType::Sign => Attribute::Sign(v),
        AttributeType::Verify => Attribute::Verify(v),
        AttributeType::Modifiable => Attribute::Modifiable(v),
        other => panic!("not a policy attribute: {other:?}"),
    }
}
