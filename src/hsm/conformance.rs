//! One conformance suite for every [`Hsm`] backend: the behaviour the core
//! relies on, checked the same way against the in-process simulator, the
//! `hsm-sim` process and a PKCS#11 token (SoftHSM2 in CI; any HSM through
//! `coffre hsm conformance`).
//!
//! The suite rotates and destroys root keys: run it only on a token kept for
//! testing. It starts from the token's current root key and leaves the one
//! it rotated to as the current one.

use std::sync::Arc;

use super::{Hsm, HsmError, ObjectSeal};

/// A check that failed, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub check: &'static str,
    pub detail: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.check, self.detail)
    }
}

/// The checks, in the order they run.
pub const CHECKS: [&str; 15] = [
    "info names the current root key",
    "random: 1, 32 and 1024 bytes, fresh each time; 0 and 1025 refused",
    "wrap and unwrap 1, 32, 64 and 1024 bytes under the current root key",
    "two wraps of the same plaintext differ and do not show it",
    "unwrap with another AAD fails authentication",
    "unwrap of a blob with any one bit flipped fails authentication",
    "unwrap of a truncated, extended or empty blob fails authentication",
    "wrap of 0 or 1025 bytes is refused",
    "rotation makes a new current root key; older blobs still unwrap",
    "destroying the current or an unknown root key is refused; a destroyed one unwraps nothing",
    "64 concurrent wraps and unwraps all round-trip",
    "key objects: seal and open 1, 32 and 4300 bytes; a taken name is refused; 0 and 4301 bytes refused",
    "key objects: another object, salt, IV or AAD, or any flipped bit, fails authentication",
    "key objects: a destroyed object opens nothing, and destroying it again succeeds",
    "key objects: 32 concurrent seals and opens all round-trip",
];

/// Said through `progress` instead of the key-object checks when the
/// backend does not hold key objects.
pub const NO_KEY_OBJECTS: &str = "key objects: not offered by this backend (4 checks not run)";

fn fail(check: usize, detail: impl Into<String>) -> Failure {
    Failure {
        check: CHECKS.get(check).copied().unwrap_or("unknown check"),
        detail: detail.into(),
    }
}

/// Runs every check in [`CHECKS`] order, calling `progress` with each
/// check's name before it runs. Stops at the first failure.
pub async fn run(hsm: Arc<dyn Hsm>, mut progress: impl FnMut(&str)) -> Result<(), Failure> {
    let mut step = 0usize;
    let mut next = |progress: &mut dyn FnMut(&str)| {
        let s = step;
        progress(CHECKS.get(s).copied().unwrap_or(""));
        step += 1;
        s
    };
    let aad = b"coffre/conformance/aad".as_slice();

    // 0: info
    let c = next(&mut progress);
    let info = hsm
        .info()
        .await
        .map_err(|e| fail(c, format!("info: {e}")))?;
    if !info.root_key_ids.contains(&info.current_root_key_id) {
        return Err(fail(
            c,
            format!(
                "current root key {} not among {:?}",
                info.current_root_key_id, info.root_key_ids
            ),
        ));
    }
    let first_root = info.current_root_key_id;

    // 1: random
    let c = next(&mut progress);
    for len in [1usize, 32, 1024] {
        let r = hsm
            .generate_random(len)
            .await
            .map_err(|e| fail(c, format!("{len} bytes: {e}")))?;
        if r.len() != len {
            return Err(fail(c, format!("asked {len} bytes, got {}", r.len())));
        }
    }
    let a = hsm
        .generate_random(32)
        .await
        .map_err(|e| fail(c, e.to_string()))?;
    let b = hsm
        .generate_random(32)
        .await
        .map_err(|e| fail(c, e.to_string()))?;
    if a.expose() == b.expose() {
        return Err(fail(c, "two 32-byte draws are equal"));
    }
    for len in [0usize, 1025] {
        match hsm.generate_random(len).await {
            Err(HsmError::Rejected(_)) => {}
            other => {
                return Err(fail(
                    c,
                    format!("{len} bytes: expected Rejected, got {other:?}"),
                ));
            }
        }
    }

    // 2: round trips
    let c = next(&mut progress);
    for len in [1usize, 32, 64, 1024] {
        let plain = hsm
            .generate_random(len)
            .await
            .map_err(|e| fail(c, e.to_string()))?;
        let wrapped = hsm
            .wrap(plain.expose(), aad)
            .await
            .map_err(|e| fail(c, format!("wrap {len} bytes: {e}")))?;
        if wrapped.root_key_id != first_root {
            return Err(fail(
                c,
                format!(
                    "wrapped under {}, current is {first_root}",
                    wrapped.root_key_id
                ),
            ));
        }
        let back = hsm
            .unwrap(&wrapped.blob, aad)
            .await
            .map_err(|e| fail(c, format!("unwrap {len} bytes: {e}")))?;
        if back.expose() != plain.expose() {
            return Err(fail(c, format!("{len} bytes did not round-trip")));
        }
    }

    // 3: wraps differ, plaintext not visible
    let c = next(&mut progress);
    let secret = hsm
        .generate_random(32)
        .await
        .map_err(|e| fail(c, e.to_string()))?;
    let w1 = hsm
        .wrap(secret.expose(), aad)
        .await
        .map_err(|e| fail(c, e.to_string()))?;
    let w2 = hsm
        .wrap(secret.expose(), aad)
        .await
        .map_err(|e| fail(c, e.to_string()))?;
    if w1.blob == w2.blob {
        return Err(fail(c, "two wraps gave the same blob"));
    }
    if w1
        .blob
        .windows(16)
        .any(|w| secret.expose().windows(16).any(|s| s == w))
    {
        return Err(fail(c, "the blob shows 16 bytes of the plaintext"));
    }

    // 4: wrong AAD
    let c = next(&mut progress);
    for other in [
        b"".as_slice(),
        b"coffre/conformance/aaD",
        b"coffre/conformance/aad\0",
    ] {
        must_fail_authentication(
            c,
            format!("AAD {other:?}"),
            hsm.unwrap(&w1.blob, other).await,
        )?;
    }

    // 5: bit flips
    let c = next(&mut progress);
    for i in 0..w1.blob.len() {
        let mut bad = w1.blob.clone();
        if let Some(byte) = bad.get_mut(i) {
            *byte ^= 0x01 << (i % 8);
        }
        must_fail_authentication(c, format!("byte {i} flipped"), hsm.unwrap(&bad, aad).await)?;
    }

    // 6: lengths
    let c = next(&mut progress);
    let len = w1.blob.len();
    let mut extended = w1.blob.clone();
    extended.push(0);
    let cases: [(&str, &[u8]); 4] = [
        (
            "one byte short",
            w1.blob.get(..len.saturating_sub(1)).unwrap_or_default(),
        ),
        (
            "header only",
            w1.blob.get(..len.min(20)).unwrap_or_default(),
        ),
        ("one byte more", &extended),
        ("empty", &[]),
    ];
    for (what, blob) in cases {
        must_fail_authentication(c, what, hsm.unwrap(blob, aad).await)?;
    }

    // 7: bad wrap sizes
    let c = next(&mut progress);
    for len in [0usize, 1025] {
        match hsm.wrap(&vec![0u8; len], aad).await {
            Err(HsmError::Rejected(_)) => {}
            r => {
                return Err(fail(
                    c,
                    format!("{len} bytes: expected Rejected, got {r:?}"),
                ));
            }
        }
    }

    // 8: rotation
    let c = next(&mut progress);
    let new_root = hsm
        .rotate_root_key()
        .await
        .map_err(|e| fail(c, format!("rotate: {e}")))?;
    if new_root == first_root {
        return Err(fail(c, "rotation returned the old id"));
    }
    let info = hsm.info().await.map_err(|e| fail(c, e.to_string()))?;
    if info.current_root_key_id != new_root || !info.root_key_ids.contains(&first_root) {
        return Err(fail(c, format!("after rotation: {info:?}")));
    }
    let old_back = hsm
        .unwrap(&w1.blob, aad)
        .await
        .map_err(|e| fail(c, format!("old blob after rotation: {e}")))?;
    if old_back.expose() != secret.expose() {
        return Err(fail(c, "old blob unwrapped to something else"));
    }
    let w3 = hsm
        .wrap(secret.expose(), aad)
        .await
        .map_err(|e| fail(c, e.to_string()))?;
    if w3.root_key_id != new_root {
        return Err(fail(
            c,
            format!("new wrap under {}, expected {new_root}", w3.root_key_id),
        ));
    }

    // 9: destruction
    let c = next(&mut progress);
    match hsm.destroy_root_key(new_root).await {
        Err(HsmError::Rejected(_)) => {}
        r => {
            return Err(fail(
                c,
                format!("destroying the current root key: expected Rejected, got {r:?}"),
            ));
        }
    }
    let unknown = new_root.saturating_add(1000);
    match hsm.destroy_root_key(unknown).await {
        Err(HsmError::Rejected(_)) => {}
        r => {
            return Err(fail(
                c,
                format!("destroying unknown root key {unknown}: expected Rejected, got {r:?}"),
            ));
        }
    }
    hsm.destroy_root_key(first_root)
        .await
        .map_err(|e| fail(c, format!("destroying root key {first_root}: {e}")))?;
    must_fail_authentication(
        c,
        "blob of a destroyed root key",
        hsm.unwrap(&w1.blob, aad).await,
    )?;
    let info = hsm.info().await.map_err(|e| fail(c, e.to_string()))?;
    if info.root_key_ids.contains(&first_root) || info.current_root_key_id != new_root {
        return Err(fail(c, format!("after destruction: {info:?}")));
    }
    let back = hsm
        .unwrap(&w3.blob, aad)
        .await
        .map_err(|e| fail(c, e.to_string()))?;
    if back.expose() != secret.expose() {
        return Err(fail(c, "the current root key's blob no longer round-trips"));
    }

    // 10: concurrency
    let c = next(&mut progress);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..64u8 {
        let hsm = hsm.clone();
        tasks.spawn(async move {
            let plain = [i; 32];
            let aad = [i];
            let w = hsm.wrap(&plain, &aad).await?;
            let back = hsm.unwrap(&w.blob, &aad).await?;
            Ok::<bool, HsmError>(back.expose() == plain)
        });
    }
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => return Err(fail(c, "a concurrent round trip gave other bytes")),
            Ok(Err(e)) => return Err(fail(c, e.to_string())),
            Err(e) => return Err(fail(c, format!("task failed: {e}"))),
        }
    }

    if !hsm.supports_key_objects() {
        progress(NO_KEY_OBJECTS);
        return Ok(());
    }
    key_objects(hsm, &mut progress, step).await
}

async fn key_objects(
    hsm: Arc<dyn Hsm>,
    progress: &mut impl FnMut(&str),
    first: usize,
) -> Result<(), Failure> {
    let mut step = first;
    let mut next = |progress: &mut dyn FnMut(&str)| {
        let s = step;
        progress(CHECKS.get(s).copied().unwrap_or(""));
        step += 1;
        s
    };
    let tag = hsm
        .generate_random(8)
        .await
        .map_err(|e| fail(first, e.to_string()))?;
    let name = format!("conformance-{}", hex::encode(tag.expose()));
    let other = format!("{name}-other");
    let salt = [7u8; 32];
    let iv = [9u8; 12];
    let aad = b"coffre/conformance/object".as_slice();
    let seal = ObjectSeal {
        object: &name,
        salt: &salt,
        iv: &iv,
        aad,
    };

    // seal and open
    let c = next(progress);
    hsm.create_key_object(&name)
        .await
        .map_err(|e| fail(c, format!("create {name}: {e}")))?;
    hsm.create_key_object(&other)
        .await
        .map_err(|e| fail(c, format!("create {other}: {e}")))?;
    match hsm.create_key_object(&name).await {
        Err(HsmError::Rejected(_)) => {}
        r => {
            return Err(fail(
                c,
                format!("a second {name}: expected Rejected, got {r:?}"),
            ));
        }
    }
    for len in [1usize, 32, super::MAX_SEAL_LEN] {
        let plain = vec![0x5Au8; len];
        let sealed = hsm
            .seal_with_object(seal, &plain)
            .await
            .map_err(|e| fail(c, format!("seal {len} bytes: {e}")))?;
        if sealed.len() != len + 16 {
            return Err(fail(c, format!("{len} bytes sealed into {}", sealed.len())));
        }
        let back = hsm
            .open_with_object(seal, &sealed)
            .await
            .map_err(|e| fail(c, format!("open {len} bytes: {e}")))?;
        if back.expose() != plain.as_slice() {
            return Err(fail(c, format!("{len} bytes did not round-trip")));
        }
    }
    for len in [0usize, super::MAX_SEAL_LEN + 1] {
        match hsm.seal_with_object(seal, &vec![1u8; len]).await {
            Err(HsmError::Rejected(_)) => {}
            r => {
                return Err(fail(
                    c,
                    format!("seal {len} bytes: expected Rejected, got {r:?}"),
                ));
            }
        }
    }

    // mismatches
    let c = next(progress);
    let secret = hsm
        .generate_random(32)
        .await
        .map_err(|e| fail(c, e.to_string()))?;
    let sealed = hsm
        .seal_with_object(seal, secret.expose())
        .await
        .map_err(|e| fail(c, e.to_string()))?;
    let other_salt = [8u8; 32];
    let other_iv = [10u8; 12];
    let variants = [
        (
            "another object",
            ObjectSeal {
                object: &other,
                ..seal
            },
        ),
        (
            "an unknown object",
            ObjectSeal {
                object: "conformance-no-such-object",
                ..seal
            },
        ),
        (
            "another salt",
            ObjectSeal {
                salt: &other_salt,
                ..seal
            },
        ),
        (
            "another IV",
            ObjectSeal {
                iv: &other_iv,
                ..seal
            },
        ),
        (
            "another AAD",
            ObjectSeal {
                aad: b"coffre/conformance/objecT",
                ..seal
            },
        ),
        ("no AAD", ObjectSeal { aad: b"", ..seal }),
    ];
    for (what, variant) in variants {
        must_fail_authentication(c, what, hsm.open_with_object(variant, &sealed).await)?;
    }
    for i in 0..sealed.len() {
        let mut bad = sealed.clone();
        if let Some(b) = bad.get_mut(i) {
            *b ^= 0x80 >> (i % 8);
        }
        must_fail_authentication(
            c,
            format!("byte {i} flipped"),
            hsm.open_with_object(seal, &bad).await,
        )?;
    }
    for (what, bad) in [
        ("empty", Vec::new()),
        (
            "tag only",
            sealed
                .get(sealed.len().saturating_sub(16)..)
                .unwrap_or_default()
                .to_vec(),
        ),
        (
            "one byte short",
            sealed
                .get(..sealed.len().saturating_sub(1))
                .unwrap_or_default()
                .to_vec(),
        ),
    ] {
        must_fail_authentication(c, what, hsm.open_with_object(seal, &bad).await)?;
    }

    // destruction
    let c = next(progress);
    hsm.destroy_key_object(&name)
        .await
        .map_err(|e| fail(c, format!("destroy: {e}")))?;
    must_fail_authentication(
        c,
        "after destruction",
        hsm.open_with_object(seal, &sealed).await,
    )?;
    hsm.destroy_key_object(&name)
        .await
        .map_err(|e| fail(c, format!("destroying it again: {e}")))?;
    match hsm.seal_with_object(seal, b"x").await {
        Err(HsmError::Rejected(_)) => {}
        r => {
            return Err(fail(
                c,
                format!("seal under a destroyed object: expected Rejected, got {r:?}"),
            ));
        }
    }

    // concurrency
    let c = next(progress);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..32u8 {
        let hsm = hsm.clone();
        let other = other.clone();
        tasks.spawn(async move {
            let plain = [i; 48];
            let salt = [i; 32];
            let iv = [i; 12];
            let aad = [i, i];
            let s = ObjectSeal {
                object: &other,
                salt: &salt,
                iv: &iv,
                aad: &aad,
            };
            let sealed = hsm.seal_with_object(s, &plain).await?;
            let back = hsm.open_with_object(s, &sealed).await?;
            Ok::<bool, HsmError>(back.expose() == plain)
        });
    }
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => return Err(fail(c, "a concurrent round trip gave other bytes")),
            Ok(Err(e)) => return Err(fail(c, e.to_string())),
            Err(e) => return Err(fail(c, format!("task failed: {e}"))),
        }
    }
    hsm.destroy_key_object(&other)
        .await
        .map_err(|e| fail(c, format!("cleaning up: {e}")))?;
    Ok(())
}

/// `Ok` if `r` is the one generic authentication failure; a failure of
/// check `c` saying what came instead (never the plaintext) otherwise.
fn must_fail_authentication(
    c: usize,
    what: impl std::fmt::Display,
    r: Result<crate::secret::SecretBytes, HsmError>,
) -> Result<(), Failure> {
    match r {
        Err(HsmError::AuthenticationFailed) => Ok(()),
        r => Err(fail(
            c,
            format!("{what}: expected AuthenticationFailed, got {}", outcome(&r)),
        )),
    }
}

/// An unwrap's outcome without its plaintext.
fn outcome(r: &Result<crate::secret::SecretBytes, HsmError>) -> String {
    match r {
        Ok(p) => format!("Ok({} bytes)", p.len()),
        Err(e) => format!("Err({e:?})"),
    }
}
