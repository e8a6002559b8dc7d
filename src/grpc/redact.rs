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

#[cfg(test)]
mod tests {
    use super::pb;

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
