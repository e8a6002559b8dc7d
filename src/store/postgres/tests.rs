//! What the conformance suite cannot see on PostgreSQL: rows edited behind
//! the store's back (someone with the database but not the MAC key), a
//! commit that outlives its caller, the root-key fence racing a rotation,
//! and the change feed's NOTIFY.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;
use std::time::Duration;

use super::test_support::{
    block_on, connector, new_database, open_sealed, open_store, require_postgres, test_mac,
};
use crate::model::{KeyState, Timestamp};
use crate::store::approvals::SensitiveOperation;
use crate::store::conformance::approvals::approval;
use crate::store::conformance::fixtures::{id, key, rotate, version};
use crate::store::integrity::IntegrityState;
use crate::store::{KeyStore, StoreError};

/// A client of `url` outside any store: the one who edits rows.
async fn raw(url: &str) -> tokio_postgres::Client {
    connector(url).connect().await.unwrap()
}

fn integrity<T: std::fmt::Debug>(what: &str, r: Result<T, StoreError>) {
    assert!(
        matches!(r, Err(StoreError::IntegrityFailure(_))),
        "{what}: {r:?}"
    );
}

#[test]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
fn rows_edited_behind_the_stores_back_are_refused() {
    require_postgres();
    block_on(async {
        let database = new_database().await;
        let url = database.url.clone();
        let mac = test_mac();
        let store = open_sealed(&url, &mac, true).await.unwrap();
        let mut one = key(id(1), Some("one"));
        one.state = KeyState::Disabled;
        store.create_key(&one, &version(one.id, 1)).await.unwrap();
        let two = key(id(2), Some("two"));
        store.create_key(&two, &version(two.id, 1)).await.unwrap();
        let a = approval(SensitiveOperation::EnableKey { key_id: one.id }, 1);
        store.create_approval(&a, Timestamp(1)).await.unwrap();
        let db = raw(&url).await;
        let (u1, u2) = (
            super::records::uuid_of(one.id),
            super::records::uuid_of(two.id),
        );

        // Re-enable key 1 by editing its record: its MAC fails.
        db.execute(
            "UPDATE keys SET record = convert_to(replace(convert_from(record, 'UTF8'), \
             'DISABLED', 'ENABLED'), 'UTF8'), state = 'ENABLED' WHERE id = $1",
            &[&u1],
        )
        .await
        .unwrap();
        integrity("an edited record", store.get_key(one.id).await);
        integrity(
            "listing an edited record",
            store.list_keys(&Default::default(), None, 10).await,
        );

        // Key 2's record and MAC copied over key 1's row: bound to its id.
        db.execute(
            "UPDATE keys k SET record = o.record, record_mac = o.record_mac \
             FROM keys o WHERE k.id = $1 AND o.id = $2",
            &[&u1, &u2],
        )
        .await
        .unwrap();
        integrity("a record moved to another row", store.get_key(one.id).await);

        // Unsealed (no MAC) is refused too.
        db.execute("UPDATE keys SET record_mac = '' WHERE id = $1", &[&u2])
            .await
            .unwrap();
        integrity("an unsealed record", store.get_key(two.id).await);

        // A version copied to another version's row.
        db.execute(
            "INSERT INTO key_versions (key_id, version, hsm_root_key_id, record, record_mac) \
             SELECT key_id, 5, hsm_root_key_id, record, record_mac FROM key_versions \
             WHERE key_id = $1 AND version = 1",
            &[&u2],
        )
        .await
        .unwrap();
        integrity(
            "a version copied to another number",
            store.get_version(two.id, 5).await,
        );

        // The alias column pointed at another key: refused, not followed.
        let three = key(id(3), Some("three"));
        store
            .create_key(&three, &version(three.id, 1))
            .await
            .unwrap();
        db.execute(
            "UPDATE keys SET alias = 'stolen' WHERE id = $1",
            &[&super::records::uuid_of(three.id)],
        )
        .await
        .unwrap();
        integrity(
            "an alias column edited",
            store.key_id_for_alias("stolen").await,
        );

        // A planted approval (no MAC key) is left out of the list and
        // refused when read; the genuine one is still listed.
        db.execute(
            "INSERT INTO approvals (id, status, expires_at_ms, record, record_mac) \
             SELECT gen_random_uuid(), status, expires_at_ms, record, record_mac \
             FROM approvals WHERE id = $1",
            &[&a.id],
        )
        .await
        .unwrap();
        let listed = store.list_approvals().await.unwrap();
        assert_eq!(listed, vec![a.clone()]);
        assert!(mac.failures() >= 6, "{} failures counted", mac.failures());

        // The sealed marker removed: a start without migration sees a store
        // that needs it, and installs nothing.
        db.execute("DELETE FROM store_meta WHERE name = 'sealed'", &[])
            .await
            .unwrap();
        let again = open_store(&url).await.unwrap();
        assert_eq!(
            again.install_integrity(&mac, false).await.unwrap(),
            IntegrityState::NeedsMigration
        );
        assert!(again.integrity().is_none());
    });
}

#[test]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
fn a_write_runs_to_its_commit_after_its_caller_went_away() {
    require_postgres();
    block_on(async {
        let database = new_database().await;
        let url = database.url.clone();
        let store = Arc::new(open_sealed(&url, &test_mac(), true).await.unwrap());
        // Another session holds the feed's counter: every key write waits.
        let mut blocker = raw(&url).await;
        let tx = blocker.transaction().await.unwrap();
        tx.execute("SELECT 1 FROM coffre_cluster FOR UPDATE", &[])
            .await
            .unwrap();
        let k = key(id(1), Some("late"));
        let gave_up = tokio::time::timeout(
            Duration::from_millis(300),
            store.create_key(&k, &version(k.id, 1)),
        )
        .await;
        assert!(gave_up.is_err(), "the write did not wait: {gave_up:?}");
        assert_eq!(store.get_key(k.id).await.unwrap(), None);
        // The caller is gone; its transaction still waits, then commits.
        tx.commit().await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if store.get_key(k.id).await.unwrap() == Some(k.clone()) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the abandoned write never committed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(store.changes_since(0, 10).await.unwrap().head, 1);
    });
}

#[test]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
fn the_root_key_fence_and_a_rotation_under_the_old_root_never_both_win() {
    require_postgres();
    block_on(async {
        let database = new_database().await;
        let url = database.url.clone();
        let a = Arc::new(open_sealed(&url, &test_mac(), true).await.unwrap());
        let b = Arc::new(open_sealed(&url, &test_mac(), false).await.unwrap());
        let mut under_9 = version(id(1), 1);
        under_9.hsm_root_key_id = 9;
        let mut k = key(id(1), None);
        a.create_key(&k, &under_9).await.unwrap();
        let mut outcomes = [0u32; 2];
        for round in 0..12u32 {
            let old = 100 + round;
            let mut v = version(k.id, k.primary_version + 1);
            v.hsm_root_key_id = old;
            let (a2, b2, current, next) = (Arc::clone(&a), Arc::clone(&b), k.clone(), v.clone());
            let rotation = tokio::spawn(async move {
                let mut updated = current.clone();
                updated.primary_version = next.version;
                a2.add_version(&current, &updated, &next)
                    .await
                    .map(|()| updated)
            });
            // Staggered, so that either comes first in some rounds.
            let delay = Duration::from_millis(u64::from(round % 4) * 4);
            let fence = tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                b2.fence_root_keys(9, &[old]).await
            });
            let (rotated, fenced) = (rotation.await.unwrap(), fence.await.unwrap().unwrap());
            match rotated {
                Ok(updated) => {
                    assert_eq!(
                        fenced, 1,
                        "round {round}: a version landed under a fenced root"
                    );
                    outcomes[0] += 1;
                    // Move it to root 9 for the next round.
                    let mut moved = v.clone();
                    moved.hsm_root_key_id = 9;
                    a.rewrap_version(&v, &moved).await.unwrap();
                    k = updated;
                }
                Err(StoreError::RootKeyRetired(r)) => {
                    assert_eq!((r, fenced), (old, 0), "round {round}");
                    outcomes[1] += 1;
                }
                Err(e) => panic!("round {round}: {e:?}"),
            }
            let live_under_old = a
                .versions_not_under_root(9, None, 100)
                .await
                .unwrap()
                .into_iter()
                .filter(|v| v.hsm_root_key_id == old)
                .count();
            assert!(fenced > 0 || live_under_old == 0, "round {round}");
        }
        eprintln!(
            "rotation won {} rounds, the fence {}",
            outcomes[0], outcomes[1]
        );
    });
}

#[test]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
fn key_writes_notify_coffre_keys_with_their_generation() {
    require_postgres();
    block_on(async {
        let database = new_database().await;
        let url = database.url.clone();
        let store = open_sealed(&url, &test_mac(), true).await.unwrap();
        let (client, mut connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                if let Ok(tokio_postgres::AsyncMessage::Notification(n)) = message {
                    let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN {}", super::store::KEYS_CHANNEL))
            .await
            .unwrap();
        let k = key(id(1), None);
        store.create_key(&k, &version(k.id, 1)).await.unwrap();
        rotate(&store, &k, &version(k.id, 2)).await.unwrap();
        // A refused write rolls back its notification with it.
        assert!(store.compare_and_swap_key(&k, &k).await.is_err());
        let mut got = Vec::new();
        for _ in 0..2 {
            got.push(
                tokio::time::timeout(Duration::from_secs(5), rx.recv())
                    .await
                    .unwrap()
                    .unwrap(),
            );
        }
        assert_eq!(
            got,
            vec![
                ("coffre_keys".to_string(), "1".to_string()),
                ("coffre_keys".to_string(), "2".to_string())
            ]
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(300), rx.recv())
                .await
                .is_err()
        );
    });
}
