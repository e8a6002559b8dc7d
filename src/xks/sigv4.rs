//! AWS Signature Version 4 verification for service `kms-xks-proxy`.
//!
//! AWS KMS signs each request with the credential the customer gave
//! `CreateCustomKeyStore`; the proxy rebuilds the signature and compares.
//! What is verified:
//!
//! - `Authorization: AWS4-HMAC-SHA256 Credential=AKID/YYYYMMDD/REGION/
//!   kms-xks-proxy/aws4_request, SignedHeaders=…, Signature=HEX`;
//! - the canonical request over whatever headers `SignedHeaders` lists (KMS
//!   signs `host;x-amz-date`, botocore and curl also `content-type`), which
//!   must include `host` and `x-amz-date`; the path as sent (the router only
//!   admits paths whose canonical form is themselves); an empty query; the
//!   SHA-256 of the body (and `x-amz-content-sha256`, when sent, must be it);
//! - `X-Amz-Date` within [`MAX_SKEW`] of the server's clock, on the day the
//!   credential scope names;
//! - the signature, compared in constant time, under any of the configured
//!   credentials for the access key id (two at once during a rotation).
//!
//! The arithmetic (the signing key's HMAC chain, the signature) is the AWS
//! SDK's own `aws-sigv4`; SHA-256 is ring's. Signing keys are cached per
//! access key, day and region (zeroized when dropped), so the secret is read
//! once a day per region, not per request. Every failure is the same
//! [`Unauthenticated`] to the caller; what failed goes to the log only,
//! never a secret.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use hyper::HeaderMap;
use ring::digest;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// The service name AWS KMS signs XKS requests for.
pub const SERVICE: &str = "kms-xks-proxy";
/// How far `X-Amz-Date` may be from the server's clock.
pub const MAX_SKEW: Duration = Duration::from_secs(5 * 60);
const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// Signing keys kept at most (access keys × days × regions in use).
const MAX_CACHED_KEYS: usize = 256;

/// One SigV4 credential and the coffre principal it acts as.
pub struct Credential {
    pub access_key_id: String,
    pub secret_access_key: Zeroizing<String>,
    pub principal: String,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("access_key_id", &self.access_key_id)
            .field("principal", &self.principal)
            .finish_non_exhaustive()
    }
}

/// Why a request does not authenticate (for the log; the caller hears one
/// sentence for all).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unauthenticated {
    #[error("no Authorization header")]
    Missing,
    #[error(
        "the Authorization header is not AWS4-HMAC-SHA256 with Credential, SignedHeaders and Signature"
    )]
    Malformed,
    #[error("the credential scope is not YYYYMMDD/REGION/kms-xks-proxy/aws4_request")]
    Scope,
    #[error("unknown access key id")]
    UnknownKey,
    #[error("SignedHeaders must list host and x-amz-date, sorted, each present once")]
    SignedHeaders,
    #[error("X-Amz-Date is missing or not YYYYMMDDTHHMMSSZ")]
    Date,
    #[error("X-Amz-Date is more than 5 minutes from the server's clock")]
    Skew,
    #[error("X-Amz-Date is not on the day of the credential scope")]
    ScopeDate,
    #[error("x-amz-content-sha256 is not the SHA-256 of the body")]
    PayloadHash,
    #[error("a query string is not part of the XKS API")]
    Query,
    #[error("the signature does not match")]
    Signature,
}

/// The request as the verifier sees it.
#[derive(Debug)]
pub struct Signed<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// HTTP/2's `:authority`, which stands for `host` when no such header
    /// was sent.
    pub authority: Option<&'a str>,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
}

/// Derived signing keys by (access key id, day, region, credential index).
type SigningKeys = HashMap<(String, String, String, usize), Zeroizing<[u8; 32]>>;

/// The configured credentials of one URI prefix, and the signing keys
/// derived from them.
pub struct Verifier {
    credentials: HashMap<String, Vec<Credential>>,
    keys: Mutex<SigningKeys>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field(
                "access_key_ids",
                &self.credentials.keys().collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

struct Authorization<'a> {
    access_key_id: &'a str,
    date: &'a str,
    region: &'a str,
    signed_headers: &'a str,
    signature: &'a str,
}

fn parse_authorization(value: &str) -> Result<Authorization<'_>, Unauthenticated> {
    let rest = value
        .strip_prefix(ALGORITHM)
        .and_then(|r| r.strip_prefix(' '))
        .ok_or(Unauthenticated::Malformed)?;
    let (mut credential, mut signed_headers, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let part = part.trim();
        let (name, value) = part.split_once('=').ok_or(Unauthenticated::Malformed)?;
        let slot = match name {
            "Credential" => &mut credential,
            "SignedHeaders" => &mut signed_headers,
            "Signature" => &mut signature,
            _ => return Err(Unauthenticated::Malformed),
        };
        if slot.replace(value).is_some() {
            return Err(Unauthenticated::Malformed);
        }
    }
    let (Some(credential), Some(signed_headers), Some(signature)) =
        (credential, signed_headers, signature)
    else {
        return Err(Unauthenticated::Malformed);
    };
    let mut scope = credential.split('/');
    let (Some(access_key_id), Some(date), Some(region), Some(service), Some(terminator), None) = (
        scope.next(),
        scope.next(),
        scope.next(),
        scope.next(),
        scope.next(),
        scope.next(),
    ) else {
        return Err(Unauthenticated::Scope);
    };
    let region_ok = !region.is_empty()
        && region.len() <= 32
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if service != SERVICE
        || terminator != "aws4_request"
        || date.len() != 8
        || !date.bytes().all(|b| b.is_ascii_digit())
        || !region_ok
    {
        return Err(Unauthenticated::Scope);
    }
    Ok(Authorization {
        access_key_id,
        date,
        region,
        signed_headers,
        signature,
    })
}

/// `YYYYMMDDTHHMMSSZ` as a time.
fn parse_amz_date(value: &str) -> Option<SystemTime> {
    let format = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    let parsed = time::PrimitiveDateTime::parse(value, &format).ok()?;
    let unix = parsed.assume_utc().unix_timestamp();
    let secs = u64::try_from(unix).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

fn hex_sha256(data: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, data))
}

/// A header's canonical value: the values (in order) trimmed, runs of
/// spaces made one, joined by commas.
fn canonical_value(headers: &HeaderMap, name: &str) -> Option<String> {
    let mut values = headers.get_all(name).iter().peekable();
    values.peek()?;
    let mut out = String::new();
    for (i, value) in values.enumerate() {
        let text = value.to_str().ok()?;
        if i > 0 {
            out.push(',');
        }
        let mut last_space = false;
        for c in text.trim().chars() {
            if c == ' ' {
                if !last_space {
                    out.push(' ');
                }
                last_space = true;
            } else {
                out.push(c);
                last_space = false;
            }
        }
    }
    Some(out)
}

impl Verifier {
    pub fn new(credentials: Vec<Credential>) -> Self {
        let mut by_id: HashMap<String, Vec<Credential>> = HashMap::new();
        for c in credentials {
            by_id.entry(c.access_key_id.clone()).or_default().push(c);
        }
        Self {
            credentials: by_id,
            keys: Mutex::new(HashMap::new()),
        }
    }

    /// The principal of the credential that signed `request`, if one did.
    pub fn verify(&self, request: &Signed<'_>, now: SystemTime) -> Result<&str, Unauthenticated> {
        if request.query.is_some_and(|q| !q.is_empty()) {
            return Err(Unauthenticated::Query);
        }
        let value = request
            .headers
            .get(hyper::header::AUTHORIZATION)
            .ok_or(Unauthenticated::Missing)?
            .to_str()
            .map_err(|_| Unauthenticated::Malformed)?;
        let auth = parse_authorization(value)?;
        let candidates = self
            .credentials
            .get(auth.access_key_id)
            .ok_or(Unauthenticated::UnknownKey)?;

        let amz_date = request
            .headers
            .get("x-amz-date")
            .and_then(|v| v.to_str().ok())
            .ok_or(Unauthenticated::Date)?;
        let signed_at = parse_amz_date(amz_date).ok_or(Unauthenticated::Date)?;
        let skew = match now.duration_since(signed_at) {
            Ok(d) => d,
            Err(e) => e.duration(),
        };
        if skew > MAX_SKEW {
            return Err(Unauthenticated::Skew);
        }
        if amz_date.get(..8) != Some(auth.date) {
            return Err(Unauthenticated::ScopeDate);
        }

        let names: Vec<&str> = auth.signed_headers.split(';').collect();
        let sorted_unique = names.windows(2).all(|w| matches!(w, [a, b] if a < b));
        let lowercase = names.iter().all(|n| {
            !n.is_empty()
                && n.bytes()
                    .all(|b| !b.is_ascii_uppercase() && b.is_ascii_graphic())
        });
        if !sorted_unique
            || !lowercase
            || !names.contains(&"host")
            || !names.contains(&"x-amz-date")
        {
            return Err(Unauthenticated::SignedHeaders);
        }
        let payload_hash = hex_sha256(request.body);
        if let Some(sent) = request.headers.get("x-amz-content-sha256") {
            if sent.as_bytes() != payload_hash.as_bytes() {
                return Err(Unauthenticated::PayloadHash);
            }
        }
        let mut canonical = String::with_capacity(256);
        canonical.push_str(request.method);
        canonical.push('\n');
        canonical.push_str(request.path);
        canonical.push_str("\n\n");
        for name in &names {
            let value = canonical_value(request.headers, name)
                .or_else(|| {
                    (*name == "host")
                        .then_some(request.authority)
                        .flatten()
                        .map(str::to_string)
                })
                .ok_or(Unauthenticated::SignedHeaders)?;
            canonical.push_str(name);
            canonical.push(':');
            canonical.push_str(&value);
            canonical.push('\n');
        }
        canonical.push('\n');
        canonical.push_str(auth.signed_headers);
        canonical.push('\n');
        canonical.push_str(&payload_hash);

        let scope = format!("{}/{}/{SERVICE}/aws4_request", auth.date, auth.region);
        let string_to_sign = format!(
            "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
            hex_sha256(canonical.as_bytes())
        );
        let presented = auth.signature.as_bytes();
        for (index, credential) in candidates.iter().enumerate() {
            let key = self.signing_key(credential, index, auth.date, auth.region, signed_at);
            let expected =
                aws_sigv4::sign::v4::calculate_signature(&key[..], string_to_sign.as_bytes());
            if bool::from(expected.as_bytes().ct_eq(presented)) {
                return Ok(&credential.principal);
            }
        }
        Err(Unauthenticated::Signature)
    }

    fn signing_key(
        &self,
        credential: &Credential,
        index: usize,
        date: &str,
        region: &str,
        signed_at: SystemTime,
    ) -> Zeroizing<[u8; 32]> {
        let id = (
            credential.access_key_id.clone(),
            date.to_string(),
            region.to_string(),
            index,
        );
        let mut keys = match self.keys.lock() {
            Ok(keys) => keys,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(key) = keys.get(&id) {
            return key.clone();
        }
        let derived = aws_sigv4::sign::v4::generate_signing_key(
            &credential.secret_access_key,
            signed_at,
            region,
            SERVICE,
        );
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(derived.as_ref());
        if keys.len() >= MAX_CACHED_KEYS {
            keys.clear();
        }
        keys.insert(id, key.clone());
        key
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn authorization_parses_as_kms_and_botocore_send_it() {
        let a = parse_authorization(
            "AWS4-HMAC-SHA256 Credential=AKIA/20221110/us-east-2/kms-xks-proxy/aws4_request, \
             SignedHeaders=host;x-amz-date, Signature=abcd",
        )
        .ok()
        .unwrap();
        assert_eq!(
            (
                a.access_key_id,
                a.date,
                a.region,
                a.signed_headers,
                a.signature
            ),
            ("AKIA", "20221110", "us-east-2", "host;x-amz-date", "abcd")
        );
        for bad in [
            "AWS4-HMAC-SHA512 Credential=A/20221110/r/kms-xks-proxy/aws4_request, SignedHeaders=host, Signature=ab",
            "AWS4-HMAC-SHA256 Credential=A/20221110/r/kms/aws4_request, SignedHeaders=host, Signature=ab",
            "AWS4-HMAC-SHA256 Credential=A/2022111/r/kms-xks-proxy/aws4_request, SignedHeaders=host, Signature=ab",
            "AWS4-HMAC-SHA256 Credential=A/20221110/r/kms-xks-proxy/aws4_request, SignedHeaders=host",
            "AWS4-HMAC-SHA256 Credential=A/20221110/r/kms-xks-proxy/aws4_request/x, SignedHeaders=host, Signature=ab",
            "AWS4-HMAC-SHA256 Credential=A/20221110/r/kms-xks-proxy/aws4_request, Signature=ab, Signature=ab, SignedHeaders=host",
        ] {
            assert!(parse_authorization(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn amz_dates_parse_to_utc() {
        let t = parse_amz_date("20221110T010203Z").unwrap();
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
            1_668_042_123
        );
        assert!(parse_amz_date("2022-11-10T01:02:03Z").is_none());
        assert!(parse_amz_date("20221310T010203Z").is_none());
    }

    #[test]
    fn header_values_are_trimmed_and_their_spaces_folded() {
        let mut h = HeaderMap::new();
        h.append("x-a", "  one   two ".parse().unwrap());
        h.append("x-a", "three".parse().unwrap());
        assert_eq!(canonical_value(&h, "x-a").unwrap(), "one two,three");
        assert!(canonical_value(&h, "x-b").is_none());
    }
}
