//! The in-process simulator API.

use std::time::{Duration, Instant};

use hsm_sim::{Faults, MAX_SESSIONS, SessionId, SimError, Simulator};

use crate::{PIN, login, token};

#[tokio::test]
async fn wrap_unwrap_round_trip() {
    let (_d, _p, sim) = token();
    let s = login(&sim).await;
    for len in [1, 32, 1024] {
        let pt: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let (blob, id) = sim.wrap(&s, &pt, b"ctx").await.unwrap();
        assert_eq!(id, 1);
        assert_eq!(&blob[..3], b"HS\x01");
        assert_eq!(
            blob.len(),
            hsm_sim::format::HEADER_LEN + len + hsm_sim::format::TAG_LEN
        );
        assert_ne!(
            &blob[hsm_sim::format::HEADER_LEN..][..len.min(16)],
            &pt[..len.min(16)]
        );
        let back = sim.unwrap(&s, &blob, b"ctx").await.unwrap();
        assert_eq!(back.as_slice(), pt.as_slice());
    }
    // Two wraps of the same plaintext differ (random IV).
    let (a, _) = sim.wrap(&s, b"same", b"").await.unwrap();
    let (b, _) = sim.wrap(&s, b"same", b"").await.unwrap();
    assert_ne!(a, b);
}

#[tokio::test]
async fn plaintext_and_random_lengths_are_checked() {
    let (_d, _p, sim) = token();
    let s = login(&sim).await;
    assert!(matches!(
        sim.wrap(&s, b"", b"").await,
        Err(SimError::InvalidInput(_))
    ));
    assert!(matches!(
        sim.wrap(&s, &[0; 1025], b"").await,
        Err(SimError::InvalidInput(_))
    ));
    assert_eq!(sim.generate_random(&s, 1024).await.unwrap().len(), 1024);
    let r1 = sim.generate_random(&s, 32).await.unwrap();
    let r2 = sim.generate_random(&s, 32).await.unwrap();
    assert_ne!(*r1, *r2);
    for len in [0, 1025] {
        assert!(matches!(
            sim.generate_random(&s, len).await,
            Err(SimError::InvalidInput(_))
        ));
    }
}

#[tokio::test]
async fn tampered_blobs_fail_with_one_generic_error() {
    let (_d, _p, sim) = token();
    let s = login(&sim).await;
    let (blob, _) = sim.wrap(&s, b"secret material", b"aad").await.unwrap();
    let auth_failed = |r: Result<_, SimError>| matches!(r, Err(SimError::AuthenticationFailed));
    assert!(auth_failed(sim.unwrap(&s, &blob, b"other aad").await));
    assert!(auth_failed(sim.unwrap(&s, &blob, b"").await));
    for i in 0..blob.len() {
        let mut b = blob.clone();
        b[i] ^= 0x01;
        assert!(auth_failed(sim.unwrap(&s, &b, b"aad").await), "byte {i}");
    }
    for len in 0..blob.len() {
        assert!(
            auth_failed(sim.unwrap(&s, &blob[..len], b"aad").await),
            "len {len}"
        );
    }
    let mut longer = blob.clone();
    longer.push(0);
    assert!(auth_failed(sim.unwrap(&s, &longer, b"aad").await));
    for garbage in [vec![], vec![0u8; 36], vec![0xFF; 2000], b"HS\x01".to_vec()] {
        assert!(auth_failed(sim.unwrap(&s, &garbage, b"aad").await));
    }
    // Unknown root key id in an otherwise well-formed blob.
    let mut b = blob.clone();
    b[3..7].copy_from_slice(&99u32.to_be_bytes());
    assert!(auth_failed(sim.unwrap(&s, &b, b"aad").await));
}

#[tokio::test]
async fn state_persists_across_reopen_and_wrong_pin_is_refused() {
    let (_d, path, sim) = token();
    let s = login(&sim).await;
    let (blob, _) = sim.wrap(&s, b"persisted", b"a").await.unwrap();
    let rotated = sim.rotate_root_key(&s).await.unwrap();
    drop(sim);

    assert!(matches!(
        Simulator::open(&path, "wrong pin", "x"),
        Err(SimError::BadPin)
    ));
    let sim = Simulator::open(&path, PIN, "ignored-label").unwrap();
    let info = sim.info().unwrap();
    assert_eq!(info.label, "test-token");
    assert_eq!(info.root_key_ids, vec![1, rotated]);
    assert_eq!(info.current_root_key_id, rotated);
    // Sessions do not survive a restart.
    assert!(matches!(
        sim.unwrap(&s, &blob, b"a").await,
        Err(SimError::NotLoggedIn)
    ));
    let s = login(&sim).await;
    assert_eq!(
        sim.unwrap(&s, &blob, b"a").await.unwrap().as_slice(),
        b"persisted"
    );

    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // The file does not contain the label or anything in clear.
    let bytes = std::fs::read(&path).unwrap();
    assert!(!bytes.windows(10).any(|w| w == b"test-token"));
}

#[tokio::test]
async fn sessions_are_required() {
    let (_d, _p, sim) = token();
    assert!(matches!(sim.login("nope").await, Err(SimError::BadPin)));
    let bogus = SessionId::from_bytes(&[0; 16]).unwrap();
    assert!(matches!(
        sim.wrap(&bogus, b"x", b"").await,
        Err(SimError::NotLoggedIn)
    ));
    assert!(matches!(
        sim.generate_random(&bogus, 4).await,
        Err(SimError::NotLoggedIn)
    ));
    assert!(matches!(
        sim.rotate_root_key(&bogus).await,
        Err(SimError::NotLoggedIn)
    ));
    let s = login(&sim).await;
    let (blob, _) = sim.wrap(&s, b"x", b"").await.unwrap();
    sim.logout(&s).unwrap();
    assert!(matches!(
        sim.unwrap(&s, &blob, b"").await,
        Err(SimError::NotLoggedIn)
    ));
    assert!(matches!(sim.logout(&s), Err(SimError::NotLoggedIn)));
    assert!(SessionId::from_bytes(&[0; 15]).is_none());
}

#[tokio::test]
async fn full_session_table_evicts_the_least_recently_used() {
    let (_d, _p, sim) = token();
    let oldest = login(&sim).await; // never used again
    let recent = login(&sim).await; // used just before the table overflows
    let mut fillers = Vec::new();
    while fillers.len() < MAX_SESSIONS - 2 {
        fillers.push(login(&sim).await);
    }
    // The table is full; `recent` becomes the most recently used.
    sim.generate_random(&recent, 8).await.unwrap();
    // Clients that never log out (restarts) keep logging in.
    let mut newest = Vec::new();
    for _ in 0..10 {
        newest.push(sim.login(PIN).await.expect("login with a full table"));
    }
    assert!(matches!(
        sim.wrap(&oldest, b"x", b"").await,
        Err(SimError::NotLoggedIn)
    ));
    let (blob, _) = sim.wrap(&recent, b"kept", b"").await.unwrap();
    assert_eq!(&sim.unwrap(&recent, &blob, b"").await.unwrap()[..], b"kept");
    // 10 evicted: `oldest`, then the 9 oldest fillers; later ones remain.
    for evicted in &fillers[..9] {
        assert!(matches!(sim.logout(evicted), Err(SimError::NotLoggedIn)));
    }
    sim.generate_random(&fillers[9], 1).await.unwrap();
    for s in &newest {
        sim.generate_random(s, 1).await.unwrap();
    }
    // Logging out frees a slot: the next login evicts nobody.
    sim.logout(&fillers[10]).unwrap();
    let again = login(&sim).await;
    sim.generate_random(&fillers[11], 1).await.unwrap();
    sim.generate_random(&again, 1).await.unwrap();
}

#[tokio::test]
async fn rotate_and_destroy_root_keys() {
    let (_d, path, sim) = token();
    let s = login(&sim).await;
    let (old, old_id) = sim.wrap(&s, b"old", b"").await.unwrap();
    assert_eq!(old_id, 1);
    let new_id = sim.rotate_root_key(&s).await.unwrap();
    assert_eq!(new_id, 2);
    let (new, id) = sim.wrap(&s, b"new", b"").await.unwrap();
    assert_eq!(id, 2);
    assert_eq!(&new[3..7], &2u32.to_be_bytes());
    assert_eq!(sim.unwrap(&s, &old, b"").await.unwrap().as_slice(), b"old");

    assert!(matches!(
        sim.destroy_root_key(&s, 2).await,
        Err(SimError::CurrentRootKey(2))
    ));
    assert!(matches!(
        sim.destroy_root_key(&s, 7).await,
        Err(SimError::UnknownRootKey(7))
    ));
    sim.destroy_root_key(&s, 1).await.unwrap();
    assert!(matches!(
        sim.unwrap(&s, &old, b"").await,
        Err(SimError::AuthenticationFailed)
    ));
    assert_eq!(sim.unwrap(&s, &new, b"").await.unwrap().as_slice(), b"new");
    assert_eq!(sim.info().unwrap().root_key_ids, vec![2]);
    drop(sim);
    // Destruction is durable; ids are never reused.
    let sim = Simulator::open(&path, PIN, "x").unwrap();
    let s = login(&sim).await;
    assert!(matches!(
        sim.unwrap(&s, &old, b"").await,
        Err(SimError::AuthenticationFailed)
    ));
    assert_eq!(sim.rotate_root_key(&s).await.unwrap(), 3);
}

#[tokio::test]
async fn tamper_destroys_every_root_key_for_good() {
    let (_d, path, sim) = token();
    let s = login(&sim).await;
    let (blob, _) = sim.wrap(&s, b"gone", b"").await.unwrap();
    sim.tamper().unwrap();
    let info = sim.info().unwrap();
    assert!(info.tampered);
    assert!(info.root_key_ids.is_empty());
    assert_eq!(info.current_root_key_id, 0);
    assert!(matches!(
        sim.wrap(&s, b"x", b"").await,
        Err(SimError::Tampered)
    ));
    assert!(matches!(
        sim.unwrap(&s, &blob, b"").await,
        Err(SimError::Tampered)
    ));
    assert!(matches!(
        sim.generate_random(&s, 8).await,
        Err(SimError::Tampered)
    ));
    assert!(matches!(
        sim.rotate_root_key(&s).await,
        Err(SimError::Tampered)
    ));
    assert!(matches!(
        sim.destroy_root_key(&s, 1).await,
        Err(SimError::Tampered)
    ));
    drop(sim);
    let sim = Simulator::open(&path, PIN, "x").unwrap();
    assert!(sim.info().unwrap().tampered);
    assert!(sim.info().unwrap().root_key_ids.is_empty());
    let s = login(&sim).await;
    assert!(matches!(
        sim.unwrap(&s, &blob, b"").await,
        Err(SimError::Tampered)
    ));
}

#[tokio::test]
async fn outage_and_error_rate_faults() {
    let (_d, _p, sim) = token();
    let s = login(&sim).await;
    sim.set_faults(Faults {
        outage: true,
        ..Faults::default()
    })
    .unwrap();
    assert!(sim.faults().outage);
    assert!(matches!(
        sim.login(PIN).await,
        Err(SimError::Unavailable(_))
    ));
    assert!(matches!(
        sim.wrap(&s, b"x", b"").await,
        Err(SimError::Unavailable(_))
    ));
    assert!(matches!(sim.info(), Err(SimError::Unavailable(_))));

    sim.set_faults(Faults {
        error_rate: 1.0,
        ..Faults::default()
    })
    .unwrap();
    for _ in 0..20 {
        assert!(matches!(
            sim.generate_random(&s, 4).await,
            Err(SimError::Unavailable(_))
        ));
    }
    sim.set_faults(Faults {
        error_rate: 0.5,
        ..Faults::default()
    })
    .unwrap();
    let mut failures = 0;
    for _ in 0..200 {
        if sim.generate_random(&s, 4).await.is_err() {
            failures += 1;
        }
    }
    assert!((40..=160).contains(&failures), "{failures} of 200");
    sim.set_faults(Faults::default()).unwrap();
    for _ in 0..50 {
        sim.generate_random(&s, 4).await.unwrap();
    }
    assert!(
        sim.set_faults(Faults {
            error_rate: 1.5,
            ..Faults::default()
        })
        .is_err()
    );
    assert!(
        sim.set_faults(Faults {
            error_rate: f64::NAN,
            ..Faults::default()
        })
        .is_err()
    );
}

#[tokio::test]
async fn latency_is_observable() {
    let (_d, _p, sim) = token();
    let s = login(&sim).await;
    let latency = Duration::from_millis(150);
    sim.set_faults(Faults {
        latency,
        ..Faults::default()
    })
    .unwrap();
    let start = Instant::now();
    sim.wrap(&s, b"slow", b"").await.unwrap();
    assert!(start.elapsed() >= latency);
    let start = Instant::now();
    sim.login(PIN).await.unwrap();
    assert!(start.elapsed() >= latency);
}

#[test]
fn debug_shows_no_key_or_pin() {
    let (_d, _p, sim) = token();
    let shown = format!("{sim:?}");
    assert!(shown.contains("test-token"));
    assert!(!shown.contains(PIN));
    assert!(!shown.contains("key:"), "{shown}");
}

/// Wrong PINs are answered one at a time, each after `LOGIN_BACKOFF`, so
/// guessing is slow however many callers try at once; the right PIN does
/// not queue behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_pins_are_slowed_down_and_the_right_one_is_not() {
    let (_d, _p, sim) = token();
    let sim = std::sync::Arc::new(sim);
    let started = Instant::now();
    let guesses: Vec<_> = (0..4)
        .map(|i| {
            let sim = std::sync::Arc::clone(&sim);
            tokio::spawn(async move { sim.login(&format!("guess-{i}")).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The right PIN gets its session while the guesses still queue.
    let session = sim.login(PIN).await.unwrap();
    let pending = guesses.iter().filter(|g| !g.is_finished()).count();
    assert!(pending >= 2, "{pending} guesses still pending");
    sim.logout(&session).unwrap();
    for guess in guesses {
        assert!(matches!(guess.await.unwrap(), Err(SimError::BadPin)));
    }
    // Four wrong PINs, one after the other.
    assert!(
        started.elapsed() >= hsm_sim::LOGIN_BACKOFF * 4,
        "{:?}",
        started.elapsed()
    );
}
