//! The byte layouts the XKS proxy API fixes, apart from JSON and HTTP.
//!
//! - **The GCM AAD.** AWS KMS sends the caller's additional authenticated
//!   data and gets back (on encrypt) the proxy's `ciphertextMetadata`;
//!   both are bound into the AES-GCM tag, framed so that no two pairs give
//!   the same bytes:
//!
//!   ```text
//!   +----------------+-----------+---------------+-----------------+
//!   | len(aad): u16be | aad      | len(md): u8   | md              |
//!   +----------------+-----------+---------------+-----------------+
//!   ```
//!
//!   An absent field is empty, its length 0.
//! - **The ciphertext data integrity value** (CDIV, `SHA_256`): the SHA-256
//!   of `aad || ciphertextMetadata || iv || ciphertext || tag`, the raw
//!   fields concatenated as sent (not the framed AAD), standard base64 in
//!   the JSON. The proxy computes it before a verifying decrypt (the spec's
//!   Appendix C), so that what it vouches for is what AWS stores.

/// The largest AAD the API accepts, in bytes.
pub const MAX_AAD_LEN: usize = 8192;
/// The largest `ciphertextMetadata` AWS KMS accepts back from a proxy.
pub const MAX_METADATA_LEN: usize = 20;

/// A field too long for its frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("additionalAuthenticatedData is {0} bytes; at most {MAX_AAD_LEN} are accepted")]
    AadTooLong(usize),
    #[error("ciphertextMetadata is {0} bytes; at most {MAX_METADATA_LEN} are accepted")]
    MetadataTooLong(usize),
}

/// The AAD the AES-GCM operation authenticates: `aad` and `metadata`
/// framed as in the module docs.
pub fn gcm_aad(aad: &[u8], metadata: &[u8]) -> Result<Vec<u8>, FramingError> {
    if aad.len() > MAX_AAD_LEN {
        return Err(FramingError::AadTooLong(aad.len()));
    }
    if metadata.len() > MAX_METADATA_LEN {
        return Err(FramingError::MetadataTooLong(metadata.len()));
    }
    // Both lengths fit their fields: checked above.
    let aad_len = u16::try_from(aad.len()).map_err(|_| FramingError::AadTooLong(aad.len()))?;
    let md_len =
        u8::try_from(metadata.len()).map_err(|_| FramingError::MetadataTooLong(metadata.len()))?;
    let mut framed = Vec::with_capacity(3 + aad.len() + metadata.len());
    framed.extend_from_slice(&aad_len.to_be_bytes());
    framed.extend_from_slice(aad);
    framed.push(md_len);
    framed.extend_from_slice(metadata);
    Ok(framed)
}

/// The ciphertext data integrity value (SHA-256) over the raw fields.
pub fn integrity_value(
    aad: &[u8],
    metadata: &[u8],
    iv: &[u8],
    ciphertext: &[u8],
    tag: &[u8],
) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [aad, metadata, iv, ciphertext, tag] {
        ctx.update(part);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The XKS API's requests and answers, as JSON. Binary fields are standard
/// base64 (RFC 4648 §4, padded); unknown fields are ignored, as a newer
/// AWS KMS may send more.
pub mod json {
    use serde::{Deserialize, Serialize};
    use zeroize::Zeroizing;

    /// The longest string of request metadata (an ARN may be 2048).
    pub const MAX_METADATA_FIELD_LEN: usize = 2048;

    /// `requestMetadata`: who asked AWS KMS for what. Everything but the
    /// request id and operation is optional here; what an API requires is
    /// checked by [`RequestMetadata::require`].
    #[derive(Debug, Clone, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct RequestMetadata {
        pub kms_request_id: String,
        pub kms_operation: String,
        #[serde(default)]
        pub aws_principal_arn: Option<String>,
        #[serde(default)]
        pub kms_key_arn: Option<String>,
        #[serde(default)]
        pub kms_via_service: Option<String>,
        #[serde(default)]
        pub aws_source_vpc: Option<String>,
        #[serde(default)]
        pub aws_source_vpce: Option<String>,
    }

    impl RequestMetadata {
        /// Every field within bounds, and `awsPrincipalArn` (and for
        /// encrypt and decrypt `kmsKeyArn`) present.
        pub fn require(&self, key_arn: bool) -> Result<(), String> {
            for (name, value) in [
                ("kmsRequestId", Some(&self.kms_request_id)),
                ("kmsOperation", Some(&self.kms_operation)),
                ("awsPrincipalArn", self.aws_principal_arn.as_ref()),
                ("kmsKeyArn", self.kms_key_arn.as_ref()),
                ("kmsViaService", self.kms_via_service.as_ref()),
                ("awsSourceVpc", self.aws_source_vpc.as_ref()),
                ("awsSourceVpce", self.aws_source_vpce.as_ref()),
            ] {
                if let Some(v) = value {
                    if v.len() > MAX_METADATA_FIELD_LEN {
                        return Err(format!(
                            "requestMetadata.{name} is longer than {MAX_METADATA_FIELD_LEN} characters"
                        ));
                    }
                }
            }
            if self.aws_principal_arn.as_deref().is_none_or(str::is_empty) {
                return Err("requestMetadata.awsPrincipalArn is required".to_string());
            }
            if key_arn && self.kms_key_arn.as_deref().is_none_or(str::is_empty) {
                return Err("requestMetadata.kmsKeyArn is required".to_string());
            }
            Ok(())
        }
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct MetadataRequest {
        pub request_metadata: RequestMetadata,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct EncryptRequest {
        pub request_metadata: RequestMetadata,
        pub plaintext: Zeroizing<String>,
        pub encryption_algorithm: String,
        #[serde(default)]
        pub additional_authenticated_data: Option<String>,
        #[serde(default)]
        pub ciphertext_data_integrity_value_algorithm: Option<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct DecryptRequest {
        pub request_metadata: RequestMetadata,
        pub ciphertext: String,
        pub encryption_algorithm: String,
        pub initialization_vector: String,
        pub authentication_tag: String,
        #[serde(default)]
        pub additional_authenticated_data: Option<String>,
        #[serde(default)]
        pub ciphertext_metadata: Option<String>,
    }

    /// Health carries only the request id and the operation.
    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct HealthRequest {
        pub request_metadata: HealthMetadata,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct HealthMetadata {
        pub kms_request_id: String,
        pub kms_operation: String,
    }

    #[derive(Debug, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct MetadataResponse {
        pub key_spec: &'static str,
        pub key_usage: Vec<&'static str>,
        pub key_status: &'static str,
    }

    #[derive(Debug, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct EncryptResponse {
        pub ciphertext: String,
        pub ciphertext_metadata: String,
        pub initialization_vector: String,
        pub authentication_tag: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub ciphertext_data_integrity_value: Option<String>,
    }

    #[derive(Debug, Serialize)]
    pub struct DecryptResponse {
        pub plaintext: Zeroizing<String>,
    }

    #[derive(Debug, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct HealthResponse {
        pub xks_proxy_fleet_size: u32,
        pub xks_proxy_vendor: &'static str,
        pub xks_proxy_model: String,
        pub ekm_vendor: &'static str,
        pub ekm_fleet_details: Vec<EkmDetail>,
    }

    #[derive(Debug, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct EkmDetail {
        pub id: String,
        pub model: String,
        pub health_status: &'static str,
    }

    #[derive(Debug, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct ErrorBody<'a> {
        pub error_name: &'a str,
        pub error_message: &'a str,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;

    use super::*;

    fn b64(s: &str) -> Vec<u8> {
        STANDARD.decode(s).unwrap()
    }

    /// The worked example of the specification (its encrypt response and
    /// Appendix C): AAD "project=nile,department=marketing", metadata
    /// "key_version=1".
    #[test]
    fn the_integrity_value_of_the_specifications_example() {
        let aad = b64("cHJvamVjdD1uaWxlLGRlcGFydG1lbnQ9bWFya2V0aW5n");
        assert_eq!(aad, b"project=nile,department=marketing");
        let metadata = b64("a2V5X3ZlcnNpb249MQ==");
        assert_eq!(metadata, b"key_version=1");
        let cdiv = integrity_value(
            &aad,
            &metadata,
            &b64("HMrlRw85cAJUd5Ax"),
            &b64("ghxkK1txeDNn3q8Y"),
            &b64("vBxN2ncH1oEkR8WVXpmyYQ=="),
        );
        assert_eq!(
            STANDARD.encode(cdiv),
            "qHA/ImC9h5HsLRXqCyPmWgYx7tzyoTplzILbP0fPXsc="
        );
        // Over the framed AAD it would differ: the raw fields count.
        let framed = gcm_aad(&aad, &metadata).unwrap();
        assert_ne!(
            integrity_value(
                &framed,
                &[],
                &b64("HMrlRw85cAJUd5Ax"),
                &b64("ghxkK1txeDNn3q8Y"),
                &b64("vBxN2ncH1oEkR8WVXpmyYQ==")
            ),
            cdiv
        );
    }

    #[test]
    fn the_aad_is_framed_with_both_lengths() {
        let framed = gcm_aad(b"ab", b"xyz").unwrap();
        assert_eq!(framed, [&[0u8, 2][..], b"ab", &[3], b"xyz"].concat());
        // Absent fields are empty, their lengths 0.
        assert_eq!(gcm_aad(b"", b"").unwrap(), [0, 0, 0]);
        assert_eq!(gcm_aad(b"", b"m").unwrap(), [0, 0, 1, b'm']);
        // No two pairs share a framing: the split moves the lengths.
        assert_ne!(gcm_aad(b"ab", b"c").unwrap(), gcm_aad(b"a", b"bc").unwrap());
        // 8 KiB of AAD fits, in big-endian order.
        let big = vec![7u8; MAX_AAD_LEN];
        let framed = gcm_aad(&big, b"").unwrap();
        assert_eq!(&framed[..2], &[0x20, 0x00]);
        assert_eq!(framed.len(), 2 + MAX_AAD_LEN + 1);
    }

    #[test]
    fn fields_beyond_the_limits_are_refused() {
        assert_eq!(
            gcm_aad(&vec![0; MAX_AAD_LEN + 1], b""),
            Err(FramingError::AadTooLong(MAX_AAD_LEN + 1))
        );
        assert_eq!(
            gcm_aad(b"", &[0; MAX_METADATA_LEN + 1]),
            Err(FramingError::MetadataTooLong(MAX_METADATA_LEN + 1))
        );
        assert!(gcm_aad(b"", &[0; MAX_METADATA_LEN]).is_ok());
    }
}
