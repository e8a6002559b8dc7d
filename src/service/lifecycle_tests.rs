//! Lifecycle, scheduler and root-key rotation, with a manual clock: 30-day
//! waiting periods and rotation schedules without sleeping.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::authz::StaticRoles;
use crate::hsm::sim::LocalSimHsm;
use crate::model::{AccessReason, EncryptionContext, KeyState, ManualClock, Timestamp};
use crate::store::SledStore;

const DAY: Duration = Duration::from_secs(86_400);
const WHY: AccessReason = AccessReason::CustomerInitiatedAccess;
const START: Timestamp = Timestamp(1_800_000_000_000);

fn op() -> Caller {
    Caller::new("op")
}
fn svc() -> Caller {
    Caller::new("svc")
}
fn ctx() -> EncryptionContext {
    EncryptionContext::default()
}

/// A Kms over the store and HSM in `dir`; dropping it releases both, so the
/// same directory can be opened again (a restart).
fn open(dir: &Path, clock: Arc<ManualClock>) -> Kms {
    let hsm = LocalSimHsm::open(&dir.join("hsm.state"), "lifecycle-pin").unwrap();
    let store = SledStore::open(&dir.join("store")).unwrap();
    let roles = StaticRoles::new([
        ("op".to_string(), Role::Operator),
        ("svc".to_string(), Role::Service),
    ]);
    Kms::new(
        Arc::new(store),
        Arc::new(hsm),
        Arc::new(roles),
        clock,
        KmsOptions {
            default_policy: crate::model::KeyPolicy::granting(["svc".to_string()]),
            ..KmsOptions::default()
        },
    )
}

async fn new_key(kms: &Kms, rotation: Option<Duration>) -> KeyRef {
    let view = kms
        .create_key(
            &op(),
            CreateKeyInput {
                rotation_period: rotation,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    KeyRef::Id(view.key.id)
}

/// Whether any file under `dir` contains `needle`.
fn files_contain(dir: &Path, needle: &[u8]) -> bool {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    return true;
                }
            }
        }
    }
    false
}

fn is_precondition(e: &Error, state: &str) -> bool {
    match e {
        Error::FailedPrecondition(m) => m.contains(state),
        Error::KeyNotEnabled { state: s, .. } => s.as_str() == state,
        _ => false,
    }
}

#[tokio::test]
async fn every_transition_and_every_refused_one() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START));
    let kms = open(dir.path(), Arc::clone(&clock));
    let k = new_key(&kms, None).await;

    // ENABLED → DISABLED → ENABLED.
    assert_eq!(
        kms.disable_key(&op(), &k).await.unwrap().state,
        KeyState::Disabled
    );
    assert_eq!(
        kms.enable_key(&op(), &k).await.unwrap().state,
        KeyState::Enabled
    );
    // ENABLED → PENDING_DELETION.
    let pending = kms.schedule_key_deletion(&op(), &k, None).await.unwrap();
    assert_eq!(pending.state, KeyState::PendingDeletion);
    assert_eq!(
        pending.deletion_at,
        Some(START.plus(DAY * 30)),
        "default 30 days"
    );
    // Refused from PENDING_DELETION, each naming the state.
    for err in [
        kms.enable_key(&op(), &k).await.unwrap_err(),
        kms.disable_key(&op(), &k).await.unwrap_err(),
        kms.rotate_key(&op(), &k).await.unwrap_err(),
        kms.schedule_key_deletion(&op(), &k, Some(7))
            .await
            .unwrap_err(),
        kms.set_rotation_policy(&op(), &k, Some(DAY))
            .await
            .unwrap_err(),
        kms.retire_key_versions(&op(), &k, 1).await.unwrap_err(),
        kms.generate_data_key(&svc(), &k, &ctx(), WHY, 32, true)
            .await
            .unwrap_err(),
    ] {
        assert!(is_precondition(&err, "PENDING_DELETION"), "{err:?}");
    }
    // PENDING_DELETION → DISABLED (cancel); cancel again is refused.
    let cancelled = kms.cancel_key_deletion(&op(), &k).await.unwrap();
    assert_eq!(cancelled.state, KeyState::Disabled);
    assert_eq!(cancelled.deletion_at, None);
    let err = kms.cancel_key_deletion(&op(), &k).await.unwrap_err();
    assert!(is_precondition(&err, "DISABLED"), "{err:?}");
    // DISABLED → PENDING_DELETION (7 days) → DESTROYED by the scheduler.
    kms.schedule_key_deletion(&op(), &k, Some(7)).await.unwrap();
    clock.advance(DAY * 7 - Duration::from_millis(1));
    assert!(
        kms.run_scheduler_once().await.destroyed.is_empty(),
        "not before its time"
    );
    clock.advance(Duration::from_millis(1));
    let report = kms.run_scheduler_once().await;
    assert_eq!(report.destroyed.len(), 1);
    let destroyed = kms.get_key(&op(), &k).await.unwrap();
    assert_eq!(destroyed.key.state, KeyState::Destroyed);
    // Nothing leaves DESTROYED.
    for err in [
        kms.enable_key(&op(), &k).await.unwrap_err(),
        kms.disable_key(&op(), &k).await.unwrap_err(),
        kms.cancel_key_deletion(&op(), &k).await.unwrap_err(),
        kms.schedule_key_deletion(&op(), &k, None)
            .await
            .unwrap_err(),
        kms.rotate_key(&op(), &k).await.unwrap_err(),
    ] {
        assert!(is_precondition(&err, "DESTROYED"), "{err:?}");
    }
    // Waiting periods outside 7..=30 days are refused.
    let other = new_key(&kms, None).await;
    for days in [0, 6, 31] {
        let err = kms
            .schedule_key_deletion(&op(), &other, Some(days))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{days}: {err:?}");
    }
    assert_eq!(
        kms.get_key(&op(), &other).await.unwrap().key.state,
        KeyState::Enabled
    );
}

#[tokio::test]
async fn destruction_erases_the_material_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START));
    let kms = open(dir.path(), Arc::clone(&clock));
    let k = new_key(&kms, None).await;
    kms.rotate_key(&op(), &k).await.unwrap();
    let blob = kms
        .generate_data_key(&svc(), &k, &ctx(), WHY, 32, false)
        .await
        .unwrap()
        .ciphertext_blob;
    let KeyRef::Id(id) = k else { unreachable!() };
    assert_eq!(kms.materials.len(), 2, "both versions cached");
    let wrapped: Vec<String> = kms
        .get_key(&op(), &k)
        .await
        .unwrap()
        .versions
        .iter()
        .map(|v| hex::encode(&v.wrapped_material))
        .collect();
    let store_dir = dir.path().join("store");
    assert!(
        wrapped
            .iter()
            .all(|w| files_contain(&store_dir, w.as_bytes())),
        "the store's files hold the wrapped material before destruction (so the check below can fail)"
    );

    kms.schedule_key_deletion(&op(), &k, Some(7)).await.unwrap();
    clock.advance(DAY * 8);
    assert_eq!(kms.run_scheduler_once().await.destroyed, vec![id]);

    assert!(kms.materials.is_empty(), "no cached material is left");
    let view = kms.get_key(&op(), &k).await.unwrap();
    assert_eq!(
        view.versions.len(),
        2,
        "the tombstone keeps the version metadata"
    );
    for v in &view.versions {
        assert!(
            v.wrapped_material.is_empty(),
            "version {} still has material",
            v.version
        );
        assert_eq!(v.destroyed_at, Some(START.plus(DAY * 8)));
    }
    let err = kms
        .decrypt(&svc(), &blob, &ctx(), WHY, None)
        .await
        .unwrap_err();
    assert!(is_precondition(&err, "DESTROYED"), "a clear error: {err:?}");
    for w in &wrapped {
        assert!(
            !files_contain(&store_dir, w.as_bytes()),
            "no trace of the wrapped material in any file of the store"
        );
    }

    // After a restart too.
    drop(kms);
    let kms = open(dir.path(), clock);
    let err = kms
        .decrypt(&svc(), &blob, &ctx(), WHY, None)
        .await
        .unwrap_err();
    assert!(is_precondition(&err, "DESTROYED"), "{err:?}");
}

#[tokio::test]
async fn automatic_rotation_happens_exactly_once_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START));
    let kms = open(dir.path(), Arc::clone(&clock));
    let k = new_key(&kms, Some(DAY)).await;
    let manual = new_key(&kms, None).await;
    assert_eq!(
        kms.get_key(&op(), &k).await.unwrap().key.next_rotation_at,
        Some(START.plus(DAY))
    );

    assert!(
        kms.run_scheduler_once().await.rotated.is_empty(),
        "not due yet"
    );
    clock.advance(DAY);
    assert_eq!(kms.run_scheduler_once().await.rotated.len(), 1);
    assert!(
        kms.run_scheduler_once().await.rotated.is_empty(),
        "not twice"
    );
    let key = kms.get_key(&op(), &k).await.unwrap().key;
    assert_eq!(key.primary_version, 2);
    assert_eq!(key.next_rotation_at, Some(START.plus(DAY * 2)));

    // Restart: the rotation is not repeated.
    drop(kms);
    let kms = open(dir.path(), Arc::clone(&clock));
    assert!(
        kms.run_scheduler_once().await.rotated.is_empty(),
        "not again after a restart"
    );
    assert_eq!(kms.get_key(&op(), &k).await.unwrap().key.primary_version, 2);

    // Down for five periods: one rotation, none skipped, no burst; the next
    // one is due at the next period boundary after now.
    drop(kms);
    clock.advance(DAY * 5 + Duration::from_secs(60));
    let kms = open(dir.path(), Arc::clone(&clock));
    assert_eq!(kms.run_scheduler_once().await.rotated.len(), 1);
    let key = kms.get_key(&op(), &k).await.unwrap().key;
    assert_eq!(key.primary_version, 3);
    assert_eq!(key.next_rotation_at, Some(START.plus(DAY * 7)));
    assert!(key.next_rotation_at.unwrap() > clock.now());
    // Keys without a period are never rotated.
    assert_eq!(
        kms.get_key(&op(), &manual)
            .await
            .unwrap()
            .key
            .primary_version,
        1
    );

    // A disabled key is not rotated; the policy can be cleared.
    clock.advance(DAY * 2);
    kms.disable_key(&op(), &k).await.unwrap();
    assert!(kms.run_scheduler_once().await.rotated.is_empty());
    kms.enable_key(&op(), &k).await.unwrap();
    let cleared = kms.set_rotation_policy(&op(), &k, None).await.unwrap();
    assert_eq!(cleared.next_rotation_at, None);
    assert!(kms.run_scheduler_once().await.rotated.is_empty());
    // Periods outside 1 day..=10 years are refused.
    for bad in [DAY - Duration::from_secs(1), DAY * 3651] {
        let err = kms
            .set_rotation_policy(&op(), &k, Some(bad))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    }
}

#[tokio::test]
async fn retired_versions_stop_decrypting_and_re_encrypt_moves_blobs_forward() {
    let dir = tempfile::tempdir().unwrap();
    let kms = open(dir.path(), Arc::new(ManualClock::new(START)));
    let k = new_key(&kms, None).await;
    let old = kms
        .generate_data_key(&svc(), &k, &ctx(), WHY, 32, true)
        .await
        .unwrap();
    kms.rotate_key(&op(), &k).await.unwrap();
    // Move the blob forward before retiring its version.
    let moved = kms
        .re_encrypt(&svc(), &old.ciphertext_blob, &ctx(), None, None, None, WHY)
        .await
        .unwrap();
    assert_eq!((moved.source_key_version, moved.key_version), (1, 2));

    let retired = kms.retire_key_versions(&op(), &k, 2).await.unwrap();
    assert_eq!(retired.min_decryption_version, 2);
    let err = kms
        .decrypt(&svc(), &old.ciphertext_blob, &ctx(), WHY, None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::FailedPrecondition(m) if m.contains("retired")),
        "{err:?}"
    );
    let out = kms
        .decrypt(&svc(), &moved.ciphertext_blob, &ctx(), WHY, None)
        .await
        .unwrap();
    assert_eq!(
        out.plaintext.expose(),
        old.plaintext.as_ref().unwrap().expose()
    );
    let view = kms.get_key(&op(), &k).await.unwrap();
    let states: Vec<_> = view.versions.iter().map(|v| v.state(&view.key)).collect();
    assert_eq!(
        states,
        vec![
            crate::model::VersionState::Retired,
            crate::model::VersionState::Enabled
        ]
    );
    for bad in [0, 3] {
        assert!(matches!(
            kms.retire_key_versions(&op(), &k, bad).await.unwrap_err(),
            Error::InvalidArgument(_)
        ));
    }
    // Lowering it again brings version 1 back.
    kms.retire_key_versions(&op(), &k, 1).await.unwrap();
    kms.decrypt(&svc(), &old.ciphertext_blob, &ctx(), WHY, None)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_key_rotation_interrupted_then_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START));
    let kms = open(dir.path(), Arc::clone(&clock));
    let mut blobs = Vec::new();
    // More versions than one batch, so the interruption falls midway.
    for i in 0..40 {
        let k = new_key(&kms, None).await;
        if i % 2 == 0 {
            kms.rotate_key(&op(), &k).await.unwrap();
        }
        let out = kms
            .generate_data_key(&svc(), &k, &ctx(), WHY, 32, true)
            .await
            .unwrap();
        blobs.push((out.ciphertext_blob, out.plaintext.unwrap()));
    }
    let before = kms.hsm_info(&op()).await.unwrap();
    assert_eq!(before.root_key_ids.len(), 1);
    // The audit log's key is a service secret under the same root key.
    let audit_key = kms.audit_keys().await.unwrap().signer.public_key();

    // Stop after the first batch, as a crash would.
    let stopped = kms
        .rotate_root_key(&op(), |p| p.rewrapped == 0)
        .await
        .unwrap();
    assert!(!stopped.done);
    assert!(
        stopped.rewrapped > 0 && stopped.remaining > 0,
        "{stopped:?}"
    );
    let midway = kms.hsm_info(&op()).await.unwrap();
    assert_eq!(
        midway.root_key_ids.len(),
        2,
        "the old root key is kept until the end"
    );

    // Restart, then resume.
    drop(kms);
    let kms = open(dir.path(), Arc::clone(&clock));
    let done = kms.rotate_root_key(&op(), |_| true).await.unwrap();
    assert!(done.resumed && done.done, "{done:?}");
    assert_eq!(done.new_root_key_id, stopped.new_root_key_id);
    assert_eq!(stopped.rewrapped + done.rewrapped, 60, "every version once");
    assert_eq!(done.destroyed_root_key_ids, before.root_key_ids);
    let after = kms.hsm_info(&op()).await.unwrap();
    assert_eq!(after.root_key_ids, vec![done.new_root_key_id]);
    // The audit key was re-wrapped too: same key, under the new root.
    let secrets = kms.store.list_secrets().await.unwrap();
    assert_eq!(secrets.len(), 1);
    assert_eq!(secrets[0].1.hsm_root_key_id, done.new_root_key_id);
    assert_eq!(
        kms.audit_keys().await.unwrap().signer.public_key(),
        audit_key
    );

    // A fresh process (cold caches) unwraps every version under the new root.
    drop(kms);
    let kms = open(dir.path(), clock);
    for (blob, plaintext) in &blobs {
        let out = kms.decrypt(&svc(), blob, &ctx(), WHY, None).await.unwrap();
        assert_eq!(out.plaintext.expose(), plaintext.expose());
    }
    // Another rotation starts afresh.
    let again = kms.rotate_root_key(&op(), |_| true).await.unwrap();
    assert!(!again.resumed && again.done);
    assert_eq!(again.rewrapped, 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_key_rotation_concurrent_with_new_versions_loses_none() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START));
    let kms = Arc::new(open(dir.path(), Arc::clone(&clock)));
    for _ in 0..10 {
        new_key(&kms, None).await;
    }
    // Keys are created and rotated while the root key rotates.
    let writer = {
        let kms = Arc::clone(&kms);
        tokio::spawn(async move {
            let mut blobs = Vec::new();
            for _ in 0..25 {
                let k = new_key(&kms, None).await;
                kms.rotate_key(&op(), &k).await.unwrap();
                let out = kms
                    .generate_data_key(&svc(), &k, &ctx(), WHY, 32, true)
                    .await
                    .unwrap();
                blobs.push((out.ciphertext_blob, out.plaintext.unwrap()));
            }
            blobs
        })
    };
    // Until it completes: a run that finds versions created meanwhile under
    // the old root asks to be run again.
    let mut runs = 0;
    loop {
        runs += 1;
        match kms.rotate_root_key(&op(), |_| true).await {
            Ok(done) if done.done => break,
            Ok(other) => panic!("{other:?}"),
            Err(Error::FailedPrecondition(m)) if m.contains("run the rotation again") => {}
            Err(e) => panic!("{e:?}"),
        }
        assert!(runs < 50);
    }
    let blobs = writer.await.unwrap();
    // Every version, including those created during the rotation, opens in
    // a fresh process under the root keys the HSM still holds.
    let kms = Arc::into_inner(kms).unwrap();
    drop(kms);
    let kms = open(dir.path(), clock);
    for (blob, plaintext) in &blobs {
        let out = kms.decrypt(&svc(), blob, &ctx(), WHY, None).await.unwrap();
        assert_eq!(out.plaintext.expose(), plaintext.expose());
    }
}

/// Whether the simulator whose state is in `dir` holds a key object `name`
/// (read from its state file, as a restarted HSM would).
async fn sim_holds_object(dir: &Path, name: &str) -> bool {
    let sim = LocalSimHsm::open(&dir.join("hsm.state"), "lifecycle-pin").unwrap();
    match sim.create_key_object(name).await {
        Err(crate::hsm::HsmError::Rejected(m)) => {
            assert!(m.contains("exists"), "{m}");
            true
        }
        Ok(()) => {
            sim.destroy_key_object(name).await.unwrap();
            false
        }
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn hsm_protection_level_keys_live_and_die_in_the_hsm() {
    use crate::model::ProtectionLevel;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START));
    let kms = open(dir.path(), Arc::clone(&clock));
    let view = kms
        .create_key(
            &op(),
            CreateKeyInput {
                protection_level: Some(ProtectionLevel::Hsm),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let id = view.key.id;
    let k = KeyRef::Id(id);
    assert_eq!(view.key.protection_level, ProtectionLevel::Hsm);
    let v1 = &view.versions[0];
    let v1_object = v1.hsm_object.clone().unwrap();
    // The attempt's own name: the key, the version, 8 random bytes.
    let prefix = format!("coffre-cmk-{id}-v1-");
    assert!(
        v1_object.starts_with(&prefix) && v1_object.len() == prefix.len() + 16,
        "{v1_object}"
    );
    assert!(v1.wrapped_material.is_empty(), "no material leaves the HSM");
    assert!(sim_holds_object(dir.path(), &v1_object).await);

    // Data keys: suite 2 blobs, opened by the HSM; the wrong context, a
    // flipped byte, or the blob relabelled as suite 1 fail as any bad blob.
    let dk = kms
        .generate_data_key(&svc(), &k, &ctx(), WHY, 32, true)
        .await
        .unwrap();
    assert_eq!(dk.ciphertext_blob[3], crate::envelope::SUITE_HSM_AES256GCM);
    let plain = dk.plaintext.unwrap();
    let back = kms
        .decrypt(&svc(), &dk.ciphertext_blob, &ctx(), WHY, None)
        .await
        .unwrap();
    assert_eq!(back.plaintext.expose(), plain.expose());
    let other_ctx = EncryptionContext::new([("t".to_string(), "2".to_string())]).unwrap();
    let mut flipped = dk.ciphertext_blob.clone();
    flipped[80] ^= 1;
    let mut as_suite_1 = dk.ciphertext_blob.clone();
    as_suite_1[3] = crate::envelope::SUITE_HKDF_SHA256_AES256GCM;
    for (what, blob, context) in [
        ("other context", &dk.ciphertext_blob, &other_ctx),
        ("flipped byte", &flipped, &ctx()),
        ("suite 1 label", &as_suite_1, &ctx()),
    ] {
        let err = kms
            .decrypt(&svc(), blob, context, WHY, None)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidCiphertext), "{what}: {err:?}");
    }
    let batch = kms
        .generate_data_keys(&svc(), &k, &ctx(), WHY, 16, 5, true)
        .await
        .unwrap();
    assert_eq!(batch.items.len(), 5);
    for item in batch.items {
        let item = item.unwrap();
        let back = kms
            .decrypt(&svc(), &item.ciphertext_blob, &ctx(), WHY, None)
            .await
            .unwrap();
        assert_eq!(back.plaintext.expose(), item.plaintext.unwrap().expose());
    }

    // Rotation makes version 2 another key object; version 1 still opens;
    // ReEncrypt moves the blob to version 2 inside the HSM.
    let rotated = kms.rotate_key(&op(), &k).await.unwrap();
    assert_eq!(rotated.primary_version, 2);
    let objects: Vec<String> = kms
        .get_key(&op(), &k)
        .await
        .unwrap()
        .versions
        .iter()
        .map(|v| v.hsm_object.clone().unwrap())
        .collect();
    assert_eq!(objects.len(), 2);
    assert!(objects[1].starts_with(&format!("coffre-cmk-{id}-v2-")));
    assert!(sim_holds_object(dir.path(), &objects[1]).await);
    let moved = kms
        .re_encrypt(&svc(), &dk.ciphertext_blob, &ctx(), None, None, None, WHY)
        .await
        .unwrap();
    assert_eq!(moved.key_version, 2);
    let back = kms
        .decrypt(&svc(), &moved.ciphertext_blob, &ctx(), WHY, None)
        .await
        .unwrap();
    assert_eq!(back.plaintext.expose(), plain.expose());

    // An HSM root-key rotation leaves these versions alone (no root key
    // wraps them) and they keep working.
    let done = kms.rotate_root_key(&op(), |_| true).await.unwrap();
    assert_eq!(done.rewrapped, 0, "{done:?}");
    kms.decrypt(&svc(), &dk.ciphertext_blob, &ctx(), WHY, None)
        .await
        .unwrap();

    // A restart changes nothing.
    drop(kms);
    let kms = open(dir.path(), Arc::clone(&clock));
    let back = kms
        .decrypt(&svc(), &dk.ciphertext_blob, &ctx(), WHY, None)
        .await
        .unwrap();
    assert_eq!(back.plaintext.expose(), plain.expose());

    // Destruction destroys the key objects in the HSM.
    kms.schedule_key_deletion(&op(), &k, Some(7)).await.unwrap();
    clock.advance(DAY * 7);
    // Once due, its objects may be half destroyed: no way back.
    let err = kms.cancel_key_deletion(&op(), &k).await.unwrap_err();
    assert!(
        matches!(&err, Error::FailedPrecondition(m) if m.contains("no longer be cancelled")),
        "{err:?}"
    );
    assert_eq!(kms.run_scheduler_once().await.destroyed, vec![id]);
    drop(kms);
    for object in &objects {
        assert!(
            !sim_holds_object(dir.path(), object).await,
            "{object} survived its key"
        );
    }
}

/// Several-nodes design 1.2: two attempts at the same HSM-level version
/// (two nodes rotating one key at once, or a retry after a crash) each get
/// an object of their own, so the loser's cleanup never destroys the
/// winner's object. Before, both used `coffre-cmk-<id>-v<n>` and each began
/// by destroying whatever had that name.
#[tokio::test]
async fn two_attempts_at_one_hsm_version_never_destroy_each_other() {
    use crate::model::ProtectionLevel;
    let dir = tempfile::tempdir().unwrap();
    let kms = open(dir.path(), Arc::new(ManualClock::new(START)));
    let id = crate::model::KeyId::new_random();
    let (winner, _) = kms.new_version(id, 5, ProtectionLevel::Hsm).await.unwrap();
    let (loser, _) = kms.new_version(id, 5, ProtectionLevel::Hsm).await.unwrap();
    let (w, l) = (winner.hsm_object.unwrap(), loser.hsm_object.unwrap());
    assert_ne!(w, l, "two attempts share one object name");
    assert!(
        sim_holds_object(dir.path(), &w).await,
        "the second attempt destroyed the first's object"
    );
    assert!(sim_holds_object(dir.path(), &l).await);
}

/// Several-nodes design 1.2: the destruction of an HSM-level key commits
/// its intent before any object is destroyed. Interrupted (an HSM outage
/// here, a crash or another node's pass alike), the key cannot have its
/// deletion cancelled, whatever the caller's clock says, and the next pass
/// resumes it, after a restart too.
#[tokio::test]
async fn an_interrupted_destruction_is_never_cancelled_and_is_resumed() {
    use crate::model::ProtectionLevel;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START));
    let hsm = Arc::new(LocalSimHsm::open(&dir.path().join("hsm.state"), "lifecycle-pin").unwrap());
    let kms = Kms::new(
        Arc::new(SledStore::open(&dir.path().join("store")).unwrap()),
        Arc::clone(&hsm) as Arc<dyn crate::hsm::Hsm>,
        Arc::new(StaticRoles::new([
            ("op".to_string(), Role::Operator),
            ("svc".to_string(), Role::Service),
        ])),
        Arc::clone(&clock) as Arc<dyn crate::model::Clock>,
        KmsOptions::default(),
    );
    let view = kms
        .create_key(
            &op(),
            CreateKeyInput {
                protection_level: Some(ProtectionLevel::Hsm),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let id = view.key.id;
    let object = view.versions[0].hsm_object.clone().unwrap();
    let k = KeyRef::Id(id);
    kms.schedule_key_deletion(&op(), &k, Some(7)).await.unwrap();
    clock.advance(DAY * 8);
    hsm.simulator()
        .set_faults(hsm_sim::Faults {
            outage: true,
            ..hsm_sim::Faults::default()
        })
        .unwrap();
    let report = kms.run_scheduler_once().await;
    assert!(report.destroyed.is_empty(), "{report:?}");
    assert_eq!(report.failed, 1, "{report:?}");
    let record = kms.get_key(&op(), &k).await.unwrap().key;
    assert_eq!(record.state, KeyState::PendingDeletion);
    assert!(record.destroy_started_at.is_some(), "{record:?}");

    // A caller whose clock is a day behind (another node) still cannot
    // cancel: the intent is in the store.
    clock.set(START.plus(DAY * 2));
    let err = kms.cancel_key_deletion(&op(), &k).await.unwrap_err();
    assert!(
        matches!(&err, Error::FailedPrecondition(m) if m.contains("began")),
        "{err:?}"
    );

    // A restart, the HSM back: the next pass finishes the destruction.
    drop(kms);
    hsm.simulator()
        .set_faults(hsm_sim::Faults::default())
        .unwrap();
    clock.set(START.plus(DAY * 9));
    let kms = Kms::new(
        Arc::new(SledStore::open(&dir.path().join("store")).unwrap()),
        Arc::clone(&hsm) as Arc<dyn crate::hsm::Hsm>,
        Arc::new(StaticRoles::new([("op".to_string(), Role::Operator)])),
        Arc::clone(&clock) as Arc<dyn crate::model::Clock>,
        KmsOptions::default(),
    );
    assert_eq!(kms.run_scheduler_once().await.destroyed, vec![id]);
    let record = kms.get_key(&op(), &k).await.unwrap().key;
    assert_eq!(record.state, KeyState::Destroyed);
    assert_eq!(record.destroy_started_at, None);
    drop(kms);
    assert!(
        !sim_holds_object(dir.path(), &object).await,
        "its object survived"
    );
}

/// Cancels the deletion of every key the scheduler is about to destroy,
/// through another core on the same store: the cancel commits between the
/// scheduler's read and its write, as one on another node can.
struct CancelledMeanwhile<'a>(&'a Kms);

impl Announce for CancelledMeanwhile<'_> {
    async fn announce(&self, action: &'static str, key: KeyId) -> Result<()> {
        if action == "DestroyKey" {
            self.0.cancel_key_deletion(&op(), &KeyRef::Id(key)).await?;
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_deletion_cancelled_meanwhile_is_not_a_scheduler_failure() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START));
    let store: Arc<dyn crate::store::KeyStore> =
        Arc::new(SledStore::open(&dir.path().join("store")).unwrap());
    let hsm: Arc<dyn crate::hsm::Hsm> =
        Arc::new(LocalSimHsm::open(&dir.path().join("hsm.state"), "lifecycle-pin").unwrap());
    let core = || {
        Kms::new(
            Arc::clone(&store),
            Arc::clone(&hsm),
            Arc::new(StaticRoles::new([("op".to_string(), Role::Operator)])),
            Arc::clone(&clock) as Arc<dyn crate::model::Clock>,
            KmsOptions::default(),
        )
    };
    let (scheduler, other) = (core(), core());
    // A SOFTWARE key: an HSM-level one can no longer be cancelled once its
    // deletion time has passed (its objects may be going).
    let k = new_key(&scheduler, None).await;
    scheduler
        .schedule_key_deletion(&op(), &k, Some(7))
        .await
        .unwrap();
    clock.advance(DAY * 8);
    let report = scheduler
        .run_scheduler_announcing(&CancelledMeanwhile(&other))
        .await;
    assert!(report.destroyed.is_empty(), "{report:?}");
    assert_eq!(report.failed, 0, "a lost race is no failure: {report:?}");
    let record = other.get_key(&op(), &k).await.unwrap().key;
    assert_eq!(record.state, KeyState::Disabled, "the cancel stands");
    assert_eq!(record.deletion_at, None);
    // Nothing is due any more: the next pass leaves it alone.
    let again = scheduler.run_scheduler_once().await;
    assert!(again.destroyed.is_empty() && again.failed == 0, "{again:?}");
}
