//! Hand-written `Debug` for the generated messages that carry clear data
//! keys or caller secrets: lengths only, never bytes.

use std::fmt;

use super::pb;

impl fmt::Debug for pb::GenerateDataKeyResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GenerateDataKeyResponse")
            .field(
                "plaintext",
                &format_args!("<{} bytes redacted>", self.plaintext.len()),
            )
            .field("ciphertext_blob_len", &self.ciphertext_blob.len())
            .field("key_id", &self.key_id)
            .field("key_version", &self.key_version)
            .finish()
    }
}

impl fmt::Debug for pb::EncryptRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptRequest")
            .field("key_id", &self.key_id)
            .field(
                "plaintext",
                &format_args!("<{} bytes redacted>", self.plaintext.len()),
            )
            .field("encryption_context_entries", &self.encryption_context.len())
            .field("justification", &self.justification)
            .finish()
    }
}

impl fmt::Debug for pb::DecryptResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecryptResponse")
            .field(
                "plaintext",
                &format_args!("<{} bytes redacted>", self.plaintext.len()),
            )
            .field("key_id", &self.key_id)
            .field("key_version", &self.key_version)
            .finish()
    }
}

impl fmt::Debug for pb::GeneratedDataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeneratedDataKey")
            .field(
                "plaintext",
                &format_args!("<{} bytes redacted>", self.plaintext.len()),
            )
            .field("ciphertext_blob_len", &self.ciphertext_blob.len())
            .field("error", &self.error)
            .finish()
    }
}

impl fmt::Debug for pb::BatchGenerateDataKeyResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Each item's own Debug is redacted.
        f.debug_struct("BatchGenerateDataKeyResponse")
            .field("data_keys", &self.data_keys)
            .field("key_id", &self.key_id)
            .field("key_version", &self.key_version)
            .finish()
    }
}

impl fmt::Debug for pb::BatchDecryptResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchDecryptResult")
            .field(
                "plaintext",
                &format_args!("<{} bytes redacted>", self.plaintext.len()),
            )
            .field("key_id", &self.key_id)
            .field("key_version", &self.key_version)
            .field("error", &self.error)
            .finish()
    }
}

impl fmt::Debug for pb::BatchDecryptResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Each result's own Debug is redacted.
        f.debug_struct("BatchDecryptResponse")
            .field("results", &self.results)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use prost::Message;
    use prost_types::field_descriptor_proto::Type;

    use super::pb;

    /// Field names that carry a clear data key, a caller secret or key
    /// material, whatever their message.
    const SECRET_FIELDS: [&str; 4] = ["plaintext", "material", "secret", "data_key"];

    /// Every message of the API that holds a secret field, directly or in a
    /// message field (repeated or not), found in the compiled descriptors:
    /// a new message with a plaintext cannot be forgotten here.
    fn secret_bearing_messages() -> BTreeSet<String> {
        let fds = prost_types::FileDescriptorSet::decode(pb::FILE_DESCRIPTOR_SET).unwrap();
        // message → (direct secret?, message types of its fields)
        let mut messages: BTreeMap<String, (bool, Vec<String>)> = BTreeMap::new();
        for file in &fds.file {
            let package = file.package();
            for m in &file.message_type {
                let name = format!(".{package}.{}", m.name());
                let direct = m.field.iter().any(|f| {
                    matches!(f.r#type(), Type::Bytes | Type::String)
                        && SECRET_FIELDS.iter().any(|s| f.name().contains(s))
                });
                let nested = m
                    .field
                    .iter()
                    .filter(|f| f.r#type() == Type::Message)
                    .map(|f| f.type_name().to_string())
                    .collect();
                messages.insert(name, (direct, nested));
            }
        }
        let mut secret: BTreeSet<String> = messages
            .iter()
            .filter(|(_, (direct, _))| *direct)
            .map(|(n, _)| n.clone())
            .collect();
        loop {
            let more: Vec<String> = messages
                .iter()
                .filter(|(n, (_, nested))| {
                    !secret.contains(*n) && nested.iter().any(|t| secret.contains(t))
                })
                .map(|(n, _)| n.clone())
                .collect();
            if more.is_empty() {
                break;
            }
            secret.extend(more);
        }
        secret
    }

    /// The Debug of every secret-bearing message, with 32 bytes of 0x5A in
    /// each secret field.
    fn shown_with_a_secret() -> BTreeMap<&'static str, String> {
        let secret = vec![0x5Au8; 32];
        let generated = pb::GeneratedDataKey {
            plaintext: secret.clone(),
            ..Default::default()
        };
        let result = pb::BatchDecryptResult {
            plaintext: secret.clone(),
            ..Default::default()
        };
        BTreeMap::from([
            (
                ".coffre.v1.GenerateDataKeyResponse",
                format!(
                    "{:?}",
                    pb::GenerateDataKeyResponse {
                        plaintext: secret.clone(),
                        ..Default::default()
                    }
                ),
            ),
            (
                ".coffre.v1.EncryptRequest",
                format!(
                    "{:?}",
                    pb::EncryptRequest {
                        plaintext: secret.clone(),
                        ..Default::default()
                    }
                ),
            ),
            (
                ".coffre.v1.DecryptResponse",
                format!(
                    "{:?}",
                    pb::DecryptResponse {
                        plaintext: secret.clone(),
                        ..Default::default()
                    }
                ),
            ),
            (".coffre.v1.GeneratedDataKey", format!("{generated:?}")),
            (
                ".coffre.v1.BatchGenerateDataKeyResponse",
                format!(
                    "{:?}",
                    pb::BatchGenerateDataKeyResponse {
                        data_keys: vec![generated.clone()],
                        ..Default::default()
                    }
                ),
            ),
            (".coffre.v1.BatchDecryptResult", format!("{result:?}")),
            (
                ".coffre.v1.BatchDecryptResponse",
                format!(
                    "{:?}",
                    pb::BatchDecryptResponse {
                        results: vec![result.clone()],
                    }
                ),
            ),
        ])
    }

    #[test]
    fn every_message_with_a_secret_has_a_redacted_debug() {
        let shown = shown_with_a_secret();
        let checked: BTreeSet<String> = shown.keys().map(|k| k.to_string()).collect();
        assert_eq!(
            secret_bearing_messages(),
            checked,
            "a message with a secret field needs skip_debug in build.rs, a Debug in redact.rs \
             and a line in this test"
        );
        for (name, s) in shown {
            assert!(s.contains("<32 bytes redacted>"), "{name}: {s}");
            assert!(!s.contains("90"), "{name} shows byte values: {s}");
        }
    }

    #[test]
    fn secrets_do_not_show_in_debug() {
        let secret = vec![0x5Au8; 32];
        let shown = [
            format!(
                "{:?}",
                pb::GenerateDataKeyResponse {
                    plaintext: secret.clone(),
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                pb::EncryptRequest {
                    plaintext: secret.clone(),
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                pb::DecryptResponse {
                    plaintext: secret.clone(),
                    ..Default::default()
                }
            ),
        ];
        for s in shown {
            assert!(s.contains("<32 bytes redacted>"), "{s}");
            assert!(!s.contains("90"), "no byte values: {s}");
        }
    }
}
