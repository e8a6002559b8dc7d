//! The bodies of the fuzz targets in `fuzz/` (cargo-fuzz, nightly), kept in
//! the library so that `tests/fuzz_corpora.rs` replays the same bodies over
//! the seed corpora and over random inputs on stable Rust, in `cargo test`.
//!
//! Each takes arbitrary bytes. Returning is success; a panic is a finding.
//! Beyond "never panics", each checks what must hold of what it accepts.
//! Not part of coffre's API.

// A failed property must stop the fuzzer with a report: panicking is the
// point here. Nothing on a request path calls this module.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use prost::Message;

use crate::crypto;
use crate::envelope;
use crate::grpc::convert;
use crate::grpc::pb;
use crate::model::EncryptionContext;
use crate::secret::CmkMaterial;

/// The blob parser: never panics; what parses re-encodes to the same bytes
/// (the format has one encoding); opening it under an unrelated key fails
/// cleanly, as does a context that differs.
pub fn blob_parse(data: &[u8]) {
    let Ok(parsed) = envelope::parse(data) else {
        return;
    };
    assert_eq!(
        envelope::encode(&parsed.header, parsed.ciphertext, parsed.tag),
        data,
        "a parsed blob re-encodes to other bytes"
    );
    assert_eq!(&parsed.header.to_bytes(), parsed.header_bytes);
    let cmk = CmkMaterial::from_slice(&[0x5a; crate::secret::CMK_LEN]).unwrap();
    let digest = crypto::context_digest(&EncryptionContext::default());
    // A random input authenticates under a fixed key with probability 2^-128.
    assert!(
        crypto::open(&cmk, &parsed, &digest).is_err(),
        "an arbitrary blob opened"
    );
}

/// The sealed message parser (`coffre-client`): never panics; a header it
/// accepts re-encodes to the bytes it read (one encoding); the message
/// does not open under an unrelated data key, and opening fails cleanly.
pub fn message_parse(data: &[u8]) {
    let mut input = data;
    let Ok(header) = coffre_client::Header::read_from(&mut input) else {
        return;
    };
    let consumed = data.len() - input.len();
    assert_eq!(
        Some(&header.to_bytes()[..]),
        data.get(..consumed),
        "a parsed header re-encodes to other bytes"
    );
    let key = coffre_client::DataKey::from_slice(&[0x5a; 32]).unwrap();
    assert!(
        coffre_client::open(input, &mut std::io::sink(), &header, &key).is_err(),
        "an arbitrary message opened"
    );
}

/// Context canonicalization: entries from the input (NUL-separated key,
/// value, key, value…); whatever is accepted has one canonical form and
/// one digest, whatever the order the entries came in.
pub fn context(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let parts: Vec<&str> = text.split('\0').collect();
    let pairs: Vec<(String, String)> = parts
        .chunks(2)
        .map(|kv| {
            (
                kv.first().copied().unwrap_or_default().to_string(),
                kv.get(1).copied().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let Ok(forward) = EncryptionContext::new(pairs.clone()) else {
        return;
    };
    // The same entries in reverse order: with duplicate keys the last one
    // wins, so reversing changes the map unless keys are unique.
    let unique = {
        let mut keys: Vec<&String> = pairs.iter().map(|(k, _)| k).collect();
        keys.sort();
        keys.windows(2).all(|w| w.first() != w.get(1))
    };
    if unique {
        let backward = EncryptionContext::new(pairs.into_iter().rev()).unwrap();
        assert_eq!(forward, backward);
        assert_eq!(
            crypto::context_digest(&forward),
            crypto::context_digest(&backward),
            "the digest depends on the order of the entries"
        );
    }
    // Through the gRPC mapping (a protobuf map) too.
    let as_map: BTreeMap<String, String> = forward.entries().clone();
    let mapped = convert::context_from_pb(as_map).expect("a valid context refused by the mapping");
    assert_eq!(
        crypto::context_digest(&mapped),
        crypto::context_digest(&forward)
    );
}

/// The audit-log verifier, on arbitrary bytes under a fixed public key:
/// never panics, and never accepts a log it cannot have seen signed (an
/// arbitrary input holds no valid Ed25519 signature, so any checkpoint in
/// it fails).
pub fn audit_verify(data: &[u8]) {
    let public_key = [7u8; 32];
    if let Ok(report) = crate::audit::verify(data, &public_key, |_| {}) {
        assert_eq!(
            report.checkpoints, 0,
            "a checkpoint verified under a key nobody holds"
        );
    }
}

/// The mapping of decoded requests into the core's types: the first byte
/// picks a request message, the rest is decoded as it (as tonic would) and
/// every field goes through the conversion the handler applies. Never
/// panics; a mapping that succeeds yields values within the core's bounds.
pub fn request_mapping(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 6 {
        0 => {
            let Ok(r) = pb::DecryptRequest::decode(body) else {
                return;
            };
            let _ = envelope::parse(&r.ciphertext_blob);
            check_context(r.encryption_context);
            let _ = convert::reason_from_pb(r.justification);
            let _ = convert::optional_key_ref("key_id", &r.key_id);
        }
        1 => {
            let Ok(r) = pb::GenerateDataKeyRequest::decode(body) else {
                return;
            };
            let _ = convert::key_ref("key_id", &r.key_id);
            check_context(r.encryption_context);
            let _ = convert::reason_from_pb(r.justification);
        }
        2 => {
            let Ok(r) = pb::CreateKeyRequest::decode(body) else {
                return;
            };
            let _ = convert::protection_level_from_pb(r.protection_level);
            if let Ok(Some(d)) = convert::duration_from_pb("rotation_period", r.rotation_period) {
                let _ = crate::service::check_rotation_period(d);
            }
            if let Some(p) = r.policy
                && let Ok(policy) = convert::policy_from_pb(p)
            {
                let _ = policy.validate();
                // What the mapping accepted maps back to itself.
                let again = convert::policy_from_pb(convert::policy_to_pb(&policy)).unwrap();
                assert_eq!(again, policy);
            }
        }
        3 => {
            let Ok(r) = pb::ListKeysRequest::decode(body) else {
                return;
            };
            let _ = convert::page_token(&r.page_token);
            let _ = convert::state_filter_from_pb(r.state);
        }
        4 => {
            let Ok(r) = pb::BatchDecryptRequest::decode(body) else {
                return;
            };
            for item in r.items {
                let _ = envelope::parse(&item.ciphertext_blob);
                check_context(item.encryption_context);
                let _ = convert::optional_key_ref("key_id", &item.key_id);
            }
        }
        _ => {
            let Ok(r) = pb::UpdateKeyPolicyRequest::decode(body) else {
                return;
            };
            let _ = convert::key_ref("key_id", &r.key_id);
            if let Some(p) = r.policy {
                let _ = convert::policy_from_pb(p).map(|p| p.validate());
            }
        }
    }
}

fn check_context(raw: BTreeMap<String, String>) {
    let entries = raw.len();
    if let Ok(context) = convert::context_from_pb(raw) {
        assert_eq!(
            context.entries().len(),
            entries,
            "entries lost in the mapping"
        );
    }
}
