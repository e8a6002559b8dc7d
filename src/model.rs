//! Domain types shared by the service core, the store and the transports.
//! Nothing here knows about gRPC or sled.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A key's identity: a random UUID, also the 16-byte `key_id` of wrapped blobs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeyId(Uuid);

impl KeyId {
    pub fn new_random() -> Self {
        Self(Uuid::new_v4())
    }

    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(Uuid::from_bytes(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl FromStr for KeyId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::try_parse(s).map(Self)
    }
}

/// Milliseconds since the Unix epoch, UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn as_millis(self) -> i64 {
        self.0
    }

    /// RFC 3339, to the second, for people.
    pub fn to_rfc3339(self) -> String {
        let secs = self.0.div_euclid(1000);
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
            rem / 3600,
            (rem % 3600) / 60,
            rem % 60
        )
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A source of time, injectable so that tests never sleep.
pub trait Clock: Send + Sync + fmt::Debug {
    fn now(&self) -> Timestamp;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Timestamp(millis)
    }
}

/// A clock that only moves when told to: tests cover waiting periods and
/// rotation schedules without sleeping.
#[derive(Debug)]
pub struct ManualClock(std::sync::atomic::AtomicI64);

impl ManualClock {
    pub fn new(start: Timestamp) -> Self {
        Self(std::sync::atomic::AtomicI64::new(start.0))
    }

    pub fn advance(&self, by: std::time::Duration) {
        let millis = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.0
            .fetch_add(millis, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn set(&self, to: Timestamp) {
        self.0.store(to.0, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(std::sync::atomic::Ordering::SeqCst))
    }
}

impl Timestamp {
    /// `self + d`, saturating.
    pub fn plus(self, d: std::time::Duration) -> Timestamp {
        Timestamp(
            self.0
                .saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum KeyState {
    Enabled,
    Disabled,
    PendingDeletion,
    Destroyed,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Enabled => "ENABLED",
            KeyState::Disabled => "DISABLED",
            KeyState::PendingDeletion => "PENDING_DELETION",
            KeyState::Destroyed => "DESTROYED",
        }
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ProtectionLevel {
    /// HSM-wrapped material, unwrapped into a bounded in-memory cache.
    Software,
    /// The CMK version is a non-extractable key object in the HSM; every
    /// data-key wrap and unwrap happens there (suite 2 blobs).
    Hsm,
}

/// A customer master key: metadata only. Its material lives in
/// [`VersionRecord`]s, wrapped by the HSM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: KeyId,
    pub alias: Option<String>,
    pub description: String,
    pub state: KeyState,
    pub protection_level: ProtectionLevel,
    pub created_at: Timestamp,
    pub created_by: String,
    /// The version new data keys are wrapped under. Versions are 1, 2, ….
    pub primary_version: u32,
    /// Versions below this one no longer decrypt (1: all decrypt).
    pub min_decryption_version: u32,
    /// Free-form labels set by operators.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Automatic rotation period, in seconds (`None`: manual rotation only).
    #[serde(default)]
    pub rotation_period_secs: Option<u64>,
    /// When the next automatic rotation is due (set with the period).
    #[serde(default)]
    pub next_rotation_at: Option<Timestamp>,
    /// While PENDING_DELETION: when the key will be destroyed.
    #[serde(default)]
    pub deletion_at: Option<Timestamp>,
    /// Once DESTROYED: when its material was erased.
    #[serde(default)]
    pub destroyed_at: Option<Timestamp>,
    /// While PENDING_DELETION: when the destruction began, committed before
    /// any HSM object of the key is destroyed. From then on the deletion
    /// cannot be cancelled, and a destruction interrupted (a crash, an HSM
    /// outage) is resumed by the next scheduler pass, on whichever node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destroy_started_at: Option<Timestamp>,
    /// Who may use the key, for what, with which context and why.
    #[serde(default)]
    pub policy: KeyPolicy,
}

/// The data-key operations a policy can grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DataKeyOperation {
    GenerateDataKey,
    GenerateDataKeyWithoutPlaintext,
    Encrypt,
    Decrypt,
    ReEncrypt,
}

impl DataKeyOperation {
    pub const ALL: [DataKeyOperation; 5] = [
        DataKeyOperation::GenerateDataKey,
        DataKeyOperation::GenerateDataKeyWithoutPlaintext,
        DataKeyOperation::Encrypt,
        DataKeyOperation::Decrypt,
        DataKeyOperation::ReEncrypt,
    ];
}

/// One principal's right to use a key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    pub principal: String,
    pub operations: std::collections::BTreeSet<DataKeyOperation>,
}

/// A constraint on one encryption-context key: it must be present, and take
/// one of `values` (when not empty), and equal the caller's attribute
/// `equals_caller_attribute` (when set; e.g. `tenant` must be the calling
/// service's tenant, as the operator configured it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextRule {
    #[serde(default)]
    pub values: std::collections::BTreeSet<String>,
    #[serde(default)]
    pub equals_caller_attribute: Option<String>,
}

/// A key's policy. Deny by default: only principals with a grant may use the
/// key, only for the granted operations, only with an accepted reason and a
/// context that satisfies every rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyPolicy {
    #[serde(default)]
    pub grants: Vec<Grant>,
    #[serde(default)]
    pub required_context: BTreeMap<String, ContextRule>,
    #[serde(default = "KeyPolicy::default_reasons")]
    pub accepted_reasons: std::collections::BTreeSet<AccessReason>,
}

impl Default for KeyPolicy {
    fn default() -> Self {
        Self {
            grants: Vec::new(),
            required_context: BTreeMap::new(),
            accepted_reasons: Self::default_reasons(),
        }
    }
}

/// Limits on a policy's size.
pub const MAX_POLICY_GRANTS: usize = 256;
pub const MAX_POLICY_CONTEXT_RULES: usize = 64;
pub const MAX_POLICY_VALUES: usize = 256;
/// The whole policy, serialized (JSON): every key record holds one, caches
/// keep up to 100,000 records and `ListKeys` returns up to 1,000.
pub const MAX_POLICY_BYTES: usize = 64 * 1024;

impl KeyPolicy {
    /// The reasons a policy accepts unless it says otherwise: every reason
    /// but `THIRD_PARTY_DATA_REQUEST` (a foreign authority's demand) and
    /// `ACCESS_REASON_UNSPECIFIED`.
    pub fn default_reasons() -> std::collections::BTreeSet<AccessReason> {
        [
            AccessReason::CustomerInitiatedAccess,
            AccessReason::CustomerInitiatedSupport,
            AccessReason::ProviderInitiatedService,
            AccessReason::ProviderSystemOperation,
            AccessReason::ProviderInitiatedReview,
        ]
        .into_iter()
        .collect()
    }

    /// A policy granting every data-key operation to `principals`.
    pub fn granting(principals: impl IntoIterator<Item = String>) -> Self {
        Self {
            grants: principals
                .into_iter()
                .map(|principal| Grant {
                    principal,
                    operations: DataKeyOperation::ALL.into_iter().collect(),
                })
                .collect(),
            ..Self::default()
        }
    }

    /// Checks sizes and shapes; the message is safe to return.
    pub fn validate(&self) -> Result<(), String> {
        if self.grants.len() > MAX_POLICY_GRANTS {
            return Err(format!("a policy has at most {MAX_POLICY_GRANTS} grants"));
        }
        let mut seen = std::collections::BTreeSet::new();
        for g in &self.grants {
            if g.principal.is_empty() || g.principal.len() > 1024 {
                return Err("a grant's principal must be 1 to 1024 bytes".into());
            }
            if !seen.insert(g.principal.as_str()) {
                return Err(format!(
                    "principal {:?} has two grants: merge them",
                    g.principal
                ));
            }
            if g.operations.is_empty() {
                return Err(format!("the grant of {:?} names no operation", g.principal));
            }
        }
        if self.required_context.len() > MAX_POLICY_CONTEXT_RULES {
            return Err(format!(
                "a policy has at most {MAX_POLICY_CONTEXT_RULES} context rules"
            ));
        }
        for (k, rule) in &self.required_context {
            if k.is_empty() || k.len() > MAX_CONTEXT_KEY_LEN {
                return Err(format!(
                    "context rule keys must be 1 to {MAX_CONTEXT_KEY_LEN} bytes"
                ));
            }
            if rule.values.len() > MAX_POLICY_VALUES
                || rule.values.iter().any(|v| v.len() > MAX_CONTEXT_VALUE_LEN)
            {
                return Err(format!(
                    "the rule for {k:?} has too many or too long values"
                ));
            }
            if rule.equals_caller_attribute.as_deref() == Some("") {
                return Err(format!(
                    "the rule for {k:?} names an empty caller attribute"
                ));
            }
        }
        // Each part is bounded above; together they could still make
        // megabytes. A policy that cannot be serialized is refused too.
        let size = serde_json::to_vec(self).map_or(usize::MAX, |v| v.len());
        if size > MAX_POLICY_BYTES {
            return Err(format!(
                "a policy takes at most {MAX_POLICY_BYTES} bytes serialized, this one {size}"
            ));
        }
        Ok(())
    }
}

/// The state of one version, derived from its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VersionState {
    Enabled,
    Retired,
    Destroyed,
}

impl VersionRecord {
    pub fn state(&self, key: &KeyRecord) -> VersionState {
        if self.destroyed_at.is_some() || key.state == KeyState::Destroyed {
            VersionState::Destroyed
        } else if self.version < key.min_decryption_version {
            VersionState::Retired
        } else {
            VersionState::Enabled
        }
    }
}

impl KeyRecord {
    /// When the scheduler has something to do with this key: destroy it
    /// (PENDING_DELETION) or rotate it (ENABLED with a rotation period).
    pub fn next_due(&self) -> Option<Timestamp> {
        match self.state {
            KeyState::PendingDeletion => self.deletion_at,
            KeyState::Enabled => self.next_rotation_at,
            KeyState::Disabled | KeyState::Destroyed => None,
        }
    }
}

/// One version of a CMK. `wrapped_material` is the HSM's wrap of the 256-bit
/// material, with AAD [`cmk_wrap_aad`]; the clear material is never stored.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub key_id: KeyId,
    pub version: u32,
    pub created_at: Timestamp,
    /// Which HSM root key wrapped the material (reported by the HSM).
    pub hsm_root_key_id: u32,
    /// Empty once the key is destroyed.
    #[serde(with = "hex_bytes")]
    pub wrapped_material: Vec<u8>,
    /// Set when the material was erased (the key was destroyed).
    #[serde(default)]
    pub destroyed_at: Option<Timestamp>,
    /// Protection level HSM: the name of the key object that holds this
    /// version inside the HSM ([`hsm_object_name`]). Such a version has no
    /// `wrapped_material` and no root key (`hsm_root_key_id` 0): it never
    /// leaves the HSM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hsm_object: Option<String>,
}

impl fmt::Debug for VersionRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VersionRecord")
            .field("key_id", &self.key_id)
            .field("version", &self.version)
            .field("created_at", &self.created_at)
            .field("hsm_root_key_id", &self.hsm_root_key_id)
            .field("wrapped_material_len", &self.wrapped_material.len())
            .field("destroyed_at", &self.destroyed_at)
            .field("hsm_object", &self.hsm_object)
            .finish()
    }
}

/// The name of the HSM key object holding a CMK version of protection level
/// HSM, made for one attempt: `attempt` (random bytes drawn for it) makes
/// it unique, so that no attempt ever destroys an object another one made
/// under the same key and version (two nodes rotating one key at once, or
/// a retry after a crash). The name is kept in [`VersionRecord::hsm_object`],
/// which is what every later use reads; versions made before the attempt
/// suffix keep their names (`coffre-cmk-{id}-v{n}`).
pub fn hsm_object_name(key_id: KeyId, version: u32, attempt: &[u8; 8]) -> String {
    format!("coffre-cmk-{key_id}-v{version}-{}", hex::encode(attempt))
}

/// The AAD under which the HSM wraps a CMK version's material: binds the
/// wrapped record to its key and version, so that records cannot be swapped
/// inside the store.
pub fn cmk_wrap_aad(key_id: KeyId, version: u32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(13 + 16 + 4);
    aad.extend_from_slice(b"coffre/v1/cmk");
    aad.extend_from_slice(key_id.as_bytes());
    aad.extend_from_slice(&version.to_be_bytes());
    aad
}

/// The AAD under which the HSM wraps the service secret `name`
/// ([`crate::store::WrappedSecret`]); distinct from every CMK's AAD.
pub fn secret_wrap_aad(name: &str) -> Vec<u8> {
    let mut aad = b"coffre/v1/secret/".to_vec();
    aad.extend_from_slice(name.as_bytes());
    aad
}

pub(crate) mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_policy_is_refused_above_its_total_size() {
        use std::collections::BTreeSet;
        let rule = |n: usize| ContextRule {
            values: (0..n)
                .map(|i| format!("{i:0>1000}"))
                .collect::<BTreeSet<_>>(),
            equals_caller_attribute: None,
        };
        // 60 values of 1 KiB: within every per-part limit and the total.
        let mut policy = KeyPolicy::default();
        policy.required_context.insert("tenant".into(), rule(60));
        assert_eq!(policy.validate(), Ok(()));
        // 2 rules of 60: each part within its limit, the whole above 64 KiB.
        policy.required_context.insert("region".into(), rule(60));
        let err = policy.validate().unwrap_err();
        assert!(err.contains("at most 65536 bytes"), "{err}");
    }

    use super::*;

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(Timestamp(0).to_rfc3339(), "1970-01-01T00:00:00Z");
        assert_eq!(
            Timestamp(1_795_000_000_000).to_rfc3339(),
            "2026-11-18T11:06:40Z"
        );
        assert_eq!(
            Timestamp(951_782_400_000).to_rfc3339(),
            "2000-02-29T00:00:00Z"
        );
    }

    #[test]
    fn key_id_round_trips_through_text() {
        let id = KeyId::new_random();
        assert_eq!(id.to_string().parse::<KeyId>().unwrap(), id);
        assert!("not-a-uuid".parse::<KeyId>().is_err());
    }

    #[test]
    fn a_sorted_map_is_held_to_the_limits_of_any_context() {
        let pairs = |n: usize, key_len: usize, value_len: usize| {
            (0..n)
                .map(|i| (format!("{i:0>key_len$}"), "v".repeat(value_len)))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        let cases = [
            (pairs(MAX_CONTEXT_ENTRIES, 3, 1), Ok(())),
            (pairs(1, MAX_CONTEXT_KEY_LEN, MAX_CONTEXT_VALUE_LEN), Ok(())),
            (pairs(0, 1, 1), Ok(())),
            (
                pairs(MAX_CONTEXT_ENTRIES + 1, 3, 1),
                Err(ContextError::TooManyEntries),
            ),
            (
                pairs(1, MAX_CONTEXT_KEY_LEN + 1, 1),
                Err(ContextError::KeyTooLong),
            ),
            (
                pairs(1, 1, MAX_CONTEXT_VALUE_LEN + 1),
                Err(ContextError::ValueTooLong),
            ),
            (
                [(String::new(), "v".to_string())].into(),
                Err(ContextError::EmptyKey),
            ),
        ];
        for (map, expected) in cases {
            let rebuilt = EncryptionContext::new(map.clone());
            let kept = EncryptionContext::from_map(map.clone());
            assert_eq!(kept.clone().map(drop), expected, "{} entries", map.len());
            assert_eq!(kept, rebuilt);
            if let Ok(context) = kept {
                assert_eq!(context.entries(), &map);
            }
        }
        // Too many entries is told before a bad one (the count first).
        let mut both = pairs(MAX_CONTEXT_ENTRIES + 1, 3, 1);
        both.insert(String::new(), "v".to_string());
        assert_eq!(
            EncryptionContext::from_map(both),
            Err(ContextError::TooManyEntries)
        );
    }
}

/// Limits on an encryption context, checked once at the edge of the core.
pub const MAX_CONTEXT_ENTRIES: usize = 64;
pub const MAX_CONTEXT_KEY_LEN: usize = 256;
pub const MAX_CONTEXT_VALUE_LEN: usize = 1024;
/// The longest value of a context built from XKS request metadata (an ARN).
pub const MAX_REQUEST_METADATA_VALUE_LEN: usize = 2048;

/// A validated encryption context: string pairs bound to a wrapped key as
/// AAD. Kept sorted (the canonical order); not stored in blobs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EncryptionContext(BTreeMap<String, String>);

impl EncryptionContext {
    /// Validates entry count and lengths. Keys must be non-empty.
    pub fn new(entries: impl IntoIterator<Item = (String, String)>) -> Result<Self, ContextError> {
        Self::with_value_limit(entries, MAX_CONTEXT_VALUE_LEN)
    }

    /// [`EncryptionContext::new`] with longer values allowed: the XKS
    /// front's request metadata, whose ARNs may be 2048 characters
    /// ([`MAX_REQUEST_METADATA_VALUE_LEN`]).
    pub fn with_value_limit(
        entries: impl IntoIterator<Item = (String, String)>,
        max_value_len: usize,
    ) -> Result<Self, ContextError> {
        let mut map = BTreeMap::new();
        for (k, v) in entries {
            check_context_entry(&k, &v, max_value_len)?;
            map.insert(k, v);
            if map.len() > MAX_CONTEXT_ENTRIES {
                return Err(ContextError::TooManyEntries);
            }
        }
        Ok(Self(map))
    }

    /// [`EncryptionContext::new`] of a map already sorted (as the gRPC
    /// front decodes it): validated, and kept rather than rebuilt.
    /// The entry count is checked first, so an oversized map is refused
    /// without a look at its entries.
    pub fn from_map(map: BTreeMap<String, String>) -> Result<Self, ContextError> {
        if map.len() > MAX_CONTEXT_ENTRIES {
            return Err(ContextError::TooManyEntries);
        }
        for (k, v) in &map {
            check_context_entry(k, v, MAX_CONTEXT_VALUE_LEN)?;
        }
        Ok(Self(map))
    }

    pub fn entries(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn check_context_entry(k: &str, v: &str, max_value_len: usize) -> Result<(), ContextError> {
    if k.is_empty() {
        return Err(ContextError::EmptyKey);
    }
    if k.len() > MAX_CONTEXT_KEY_LEN {
        return Err(ContextError::KeyTooLong);
    }
    if v.len() > max_value_len {
        return Err(ContextError::ValueTooLong);
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    #[error("encryption context keys must not be empty")]
    EmptyKey,
    #[error("an encryption context key is longer than {MAX_CONTEXT_KEY_LEN} bytes")]
    KeyTooLong,
    #[error("an encryption context value is longer than {MAX_CONTEXT_VALUE_LEN} bytes")]
    ValueTooLong,
    #[error("the encryption context has more than {MAX_CONTEXT_ENTRIES} entries")]
    TooManyEntries,
}

/// Why a data key is being generated or unwrapped (`AccessReason` in
/// `proto/coffre/v1/coffre.proto`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AccessReason {
    Unspecified,
    CustomerInitiatedAccess,
    CustomerInitiatedSupport,
    ProviderInitiatedService,
    ProviderSystemOperation,
    ProviderInitiatedReview,
    ThirdPartyDataRequest,
}

impl AccessReason {
    /// The reason's name in the API and in audit records, e.g.
    /// `CUSTOMER_INITIATED_ACCESS`.
    pub fn name(self) -> &'static str {
        match self {
            AccessReason::Unspecified => "ACCESS_REASON_UNSPECIFIED",
            AccessReason::CustomerInitiatedAccess => "CUSTOMER_INITIATED_ACCESS",
            AccessReason::CustomerInitiatedSupport => "CUSTOMER_INITIATED_SUPPORT",
            AccessReason::ProviderInitiatedService => "PROVIDER_INITIATED_SERVICE",
            AccessReason::ProviderSystemOperation => "PROVIDER_SYSTEM_OPERATION",
            AccessReason::ProviderInitiatedReview => "PROVIDER_INITIATED_REVIEW",
            AccessReason::ThirdPartyDataRequest => "THIRD_PARTY_DATA_REQUEST",
        }
    }
}

/// Longest alias accepted.
pub const MAX_ALIAS_LEN: usize = 256;

/// A reference to a key as callers give it: its UUID or its alias.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KeyRef {
    Id(KeyId),
    Alias(String),
}

impl KeyRef {
    /// Parses a caller's `key_id` field: a UUID, else a valid alias.
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.is_empty() {
            return Err("key_id is required".to_string());
        }
        if let Ok(id) = raw.parse::<KeyId>() {
            return Ok(KeyRef::Id(id));
        }
        validate_alias(raw)?;
        Ok(KeyRef::Alias(raw.to_string()))
    }
}

impl fmt::Display for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyRef::Id(id) => id.fmt(f),
            KeyRef::Alias(a) => f.write_str(a),
        }
    }
}

/// An alias is 1 to 256 characters of `[A-Za-z0-9/_-]`, and not a UUID.
pub fn validate_alias(alias: &str) -> Result<(), String> {
    if alias.is_empty() || alias.len() > MAX_ALIAS_LEN {
        return Err(format!("an alias must be 1 to {MAX_ALIAS_LEN} characters"));
    }
    if !alias
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'/' || b == b'_' || b == b'-')
    {
        return Err(format!(
            "invalid alias {:?}: only letters, digits, '/', '_' and '-' are allowed",
            alias.chars().take(64).collect::<String>()
        ));
    }
    if alias.parse::<KeyId>().is_ok() {
        return Err("an alias must not look like a key id (UUID)".to_string());
    }
    Ok(())
}
