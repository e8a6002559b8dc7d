//! The durability barrier against a real PostgreSQL (design §3.3): a
//! version the primary shows before its standbys have it is not wrapped
//! under, on the node that wrote it or on another.
//!
//! The server is private to the test, since it changes a server-wide
//! setting: `synchronous_standby_names` names a standby that never
//! connects, so every commit waits for it. An administrator then cancels
//! the rotation's wait (`pg_cancel_backend`): PostgreSQL commits locally,
//! tells the client only a WARNING (on which coffre drops the connection,
//! so the rotation is not acknowledged), and shows the new version to
//! every session, while a failover now would erase it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::authz::{Caller, Role, StaticRoles};
use crate::cluster::postgres::PgCoordination;
use crate::cluster::{BarrierError, Coordination};
use crate::error::Error;
use crate::hsm::Hsm;
use crate::hsm::sim::LocalSimHsm;
use crate::model::{AccessReason, EncryptionContext, KeyPolicy, KeyRef, SystemClock};
use crate::service::freshness::{SharedStore, StaleMode};
use crate::service::{CreateKeyInput, DataKeyOutput, Kms, KmsOptions};
use crate::store::postgres::migrate::migrate;
use crate::store::postgres::test_support::{
    block_on, connector, open_sealed, pg::PgCluster, require_postgres, test_mac,
};

const WHY: AccessReason = AccessReason::CustomerInitiatedAccess;
const BOUND: Duration = Duration::from_millis(1000);

fn context() -> EncryptionContext {
    EncryptionContext::new([("tenant".to_string(), "barrier".to_string())]).unwrap()
}

async fn node(url: &str, hsm: &Arc<dyn Hsm>, name: &str) -> Kms {
    let store = Arc::new(open_sealed(url, &test_mac(), false).await.unwrap());
    let coordination = Arc::new(PgCoordination::new(
        connector(url),
        name,
        uuid::Uuid::new_v4(),
    ));
    coordination.heartbeat(None).await.unwrap();
    Kms::new(
        store,
        Arc::clone(hsm),
        Arc::new(StaticRoles::new([
            ("op".to_string(), Role::Operator),
            ("svc".to_string(), Role::Service),
        ])),
        Arc::new(SystemClock),
        KmsOptions {
            default_policy: KeyPolicy::granting(["svc".to_string()]),
            ..KmsOptions::default()
        },
    )
    .with_coordination(coordination)
    .with_shared_store(SharedStore {
        mode: StaleMode::Strict,
        max_staleness: BOUND,
    })
}

/// A poll (to be fresh), then a data key.
async fn data_key(kms: &Kms, key: &KeyRef) -> Result<DataKeyOutput, Error> {
    kms.poll_changes(0).await.unwrap();
    kms.generate_data_key(&Caller::new("svc"), key, &context(), WHY, 32, false)
        .await
}

/// Sets `synchronous_standby_names` server-wide and waits until a new
/// session sees it.
fn require_standby(pg: &PgCluster, names: Option<&str>) {
    match names {
        Some(names) => pg.psql(
            "postgres",
            &format!("ALTER SYSTEM SET synchronous_standby_names = '{names}'"),
        ),
        None => pg.psql("postgres", "ALTER SYSTEM RESET synchronous_standby_names"),
    };
    pg.psql("postgres", "SELECT pg_reload_conf()");
    let want = names.unwrap_or("");
    let deadline = Instant::now() + Duration::from_secs(10);
    while pg.psql("postgres", "SHOW synchronous_standby_names") != want {
        assert!(Instant::now() < deadline, "the reload did not take");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[cfg_attr(
    not(coffre_has_postgres),
    ignore = "not run: needs PostgreSQL 15+ (initdb, pg_ctl)"
)]
fn a_version_shown_before_it_is_replicated_is_not_wrapped_under() {
    require_postgres();
    let pg = PgCluster::primary();
    let url = pg.url(&pg.create_database());
    block_on(async {
        let c = connector(&url);
        migrate(&mut c.connect().await.unwrap(), &c).await.unwrap();
        drop(open_sealed(&url, &test_mac(), true).await.unwrap());
        let dir = tempfile::tempdir().unwrap();
        let hsm: Arc<dyn Hsm> =
            Arc::new(LocalSimHsm::open(&dir.path().join("hsm.state"), "barrier-pin").unwrap());
        let a = Arc::new(node(&url, &hsm, "a").await);
        let b = node(&url, &hsm, "b").await;
        let op = Caller::new("op");
        let key = KeyRef::Id(
            a.create_key(&op, CreateKeyInput::default())
                .await
                .unwrap()
                .key
                .id,
        );
        let v1 = data_key(&b, &key).await.unwrap();
        assert_eq!(v1.key_version, 1);

        // The standby every commit must reach is gone.
        require_standby(&pg, Some("gone"));
        let rotating = {
            let (a, key, op) = (Arc::clone(&a), key.clone(), op.clone());
            tokio::spawn(async move { a.rotate_key(&op, &key).await })
        };
        // An administrator cancels the rotation's wait: committed locally.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut cancelled = 0;
        while !rotating.is_finished() {
            let now: u32 = pg
                .psql(
                    "postgres",
                    "SELECT count(pg_cancel_backend(pid)) FROM pg_stat_activity \
                     WHERE wait_event = 'SyncRep'",
                )
                .parse()
                .unwrap();
            cancelled += now;
            assert!(
                Instant::now() < deadline,
                "the rotation did not end (waits cancelled: {cancelled})"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(cancelled > 0, "the rotation never waited for the standby");
        // PostgreSQL reports that commit as done, with a WARNING; coffre
        // drops the connection on it, so the rotation fails (outcome
        // unknown) rather than being acknowledged.
        let refused = rotating.await.unwrap().unwrap_err();
        assert!(
            matches!(&refused, Error::Store(e) if e.to_string().contains("connection closed")),
            "{refused:?}"
        );

        // Both nodes see version 2; neither wraps under it, since no
        // commit of theirs is acknowledged any more.
        for (name, kms) in [("b", &b), ("a", &*a)] {
            let started = Instant::now();
            let err = data_key(kms, &key).await.unwrap_err();
            match &err {
                Error::NotDurable {
                    version: 2,
                    reason: BarrierError::TimedOut(waited),
                    ..
                } => assert_eq!(*waited, BOUND),
                other => panic!("node {name}: expected NotDurable for version 2, got {other:?}"),
            }
            assert!(
                started.elapsed() >= BOUND,
                "node {name} refused before the bound"
            );
        }
        // Unwraps need no barrier.
        b.poll_changes(0).await.unwrap();
        let opened = b
            .decrypt(
                &Caller::new("svc"),
                &v1.ciphertext_blob,
                &context(),
                WHY,
                None,
            )
            .await
            .unwrap();
        assert_eq!(opened.key_version, 1);

        // The standby requirement is dropped: the hung commits are
        // acknowledged, and both nodes wrap under version 2.
        require_standby(&pg, None);
        for (name, kms) in [("b", &b), ("a", &*a)] {
            let deadline = Instant::now() + Duration::from_secs(15);
            let made = loop {
                match data_key(kms, &key).await {
                    Ok(made) => break made,
                    Err(Error::NotDurable { .. }) if Instant::now() < deadline => {}
                    Err(e) => panic!("node {name}: {e:?}"),
                }
            };
            assert_eq!(made.key_version, 2, "node {name}");
        }
    });
}
