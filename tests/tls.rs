//! Client-certificate checks at the TLS layer: expiry, revocation (CRL) and
//! its reload while the server runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use coffre::pki::{self, PkiPaths};
use coffre::server::RunningServer;
use coffre::server::dev::start as start_dev;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::common::{TestServer, dev_options, try_channel};

/// Whether a NEW connection presenting `cert`/`key` gets an answer from the
/// server. Health needs no role, so any answer means TLS let the client in;
/// a refusal is at the transport (the handshake, or the first call when
/// TLS 1.3 reports the client's rejection after the client's Finished).
async fn accepted(endpoint: &str, pki: &Path, cert: &Path, key: &Path) -> bool {
    let (cert, key) = (cert.to_path_buf(), key.to_path_buf());
    let channel = match try_channel(endpoint, &pki.join("ca.pem"), Some((&cert, &key))).await {
        Ok(channel) => channel,
        Err(_) => return false,
    };
    match HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
    {
        Ok(_) => true,
        Err(status) => {
            assert!(
                matches!(
                    status.code(),
                    Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
                ),
                "expected a transport-level refusal, got {status:?}"
            );
            false
        }
    }
}

/// Whether the dev identity `name` (`pki/<name>.pem`) gets in.
async fn identity_accepted(endpoint: &str, pki: &Path, name: &str) -> bool {
    accepted(
        endpoint,
        pki,
        &pki.join(format!("{name}.pem")),
        &pki.join(format!("{name}-key.pem")),
    )
    .await
}

/// Writes an issued certificate and its key into `dir`.
fn write_issued(dir: &Path, stem: &str, issued: &pki::IssuedCert) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{stem}.pem"));
    let key = dir.join(format!("{stem}-key.pem"));
    std::fs::write(&cert, &issued.cert_pem).unwrap();
    std::fs::write(&key, issued.key_pem.as_bytes()).unwrap();
    (cert, key)
}

/// A dev server whose dev PKI exists before it starts, with `crl.pem`
/// (initially an empty CRL from the dev CA) as its revocation list.
async fn start_with_crl(
    dir: &Path,
    reload_every: Duration,
) -> anyhow::Result<(RunningServer, PathBuf)> {
    pki::ensure_dev_pki(dir).unwrap();
    let crl = dir.join("crl.pem");
    if !crl.exists() {
        std::fs::write(&crl, pki::dev_crl(&PkiPaths::new(dir), &[]).unwrap()).unwrap();
    }
    let mut opts = dev_options(dir);
    opts.crl = Some(crl.clone());
    opts.crl_reload_interval = reload_every;
    Ok((start_dev(&opts).await?, crl))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_client_certificate_is_refused() {
    let server = TestServer::start().await;
    let endpoint = server.endpoint();
    let pki_dir = server.data_dir().join("pki");
    let paths = PkiPaths::new(server.data_dir());
    let now = time::OffsetDateTime::now_utc();
    let scratch = tempfile::tempdir().unwrap();

    // Same CA, same (valid) principal, only the validity window differs.
    let fresh = pki::issue_dev_client_cert(
        &paths,
        "operator",
        now - time::Duration::hours(1),
        now + time::Duration::days(1),
    )
    .unwrap();
    let (cert, key) = write_issued(scratch.path(), "fresh", &fresh);
    assert!(
        accepted(&endpoint, &pki_dir, &cert, &key).await,
        "a current certificate from the same issuance path gets in"
    );

    let expired = pki::issue_dev_client_cert(
        &paths,
        "operator",
        now - time::Duration::days(30),
        now - time::Duration::days(1),
    )
    .unwrap();
    assert_ne!(expired.serial, fresh.serial, "serial numbers are distinct");
    let (cert, key) = write_issued(scratch.path(), "expired", &expired);
    assert!(
        !accepted(&endpoint, &pki_dir, &cert, &key).await,
        "an expired certificate must be refused"
    );

    let not_yet_valid = pki::issue_dev_client_cert(
        &paths,
        "operator",
        now + time::Duration::days(1),
        now + time::Duration::days(30),
    )
    .unwrap();
    let (cert, key) = write_issued(scratch.path(), "future", &not_yet_valid);
    assert!(
        !accepted(&endpoint, &pki_dir, &cert, &key).await,
        "a certificate not yet valid must be refused"
    );

    // A refused handshake never stops the accept loop.
    assert!(identity_accepted(&endpoint, &pki_dir, "operator").await);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_is_refused_after_reload_and_a_bad_crl_keeps_the_previous() {
    let dir = tempfile::tempdir().unwrap();
    // Only explicit reloads in this test.
    let (server, crl) = start_with_crl(dir.path(), Duration::from_secs(3600))
        .await
        .unwrap();
    let endpoint = format!("https://{}", server.addr);
    let pki_dir = dir.path().join("pki");
    let paths = PkiPaths::new(dir.path());

    assert!(identity_accepted(&endpoint, &pki_dir, "service").await);
    assert!(identity_accepted(&endpoint, &pki_dir, "operator").await);

    // Revoke the service's certificate: refused once the CRL is reloaded.
    let service_pem = std::fs::read_to_string(pki_dir.join("service.pem")).unwrap();
    let serial = pki::cert_serial(&service_pem).unwrap();
    std::fs::write(&crl, pki::dev_crl(&paths, &[serial]).unwrap()).unwrap();
    server.reload_crl().unwrap();
    assert!(
        !identity_accepted(&endpoint, &pki_dir, "service").await,
        "a revoked certificate must be refused on a new connection"
    );
    assert!(
        identity_accepted(&endpoint, &pki_dir, "operator").await,
        "another identity still gets in"
    );

    // A corrupt CRL: the reload fails and the previous CRL stays in force.
    std::fs::write(
        &crl,
        "-----BEGIN X509 CRL-----\nnot base64!\n-----END X509 CRL-----\n",
    )
    .unwrap();
    let err = server.reload_crl().unwrap_err();
    assert!(format!("{err:#}").contains("CRL"), "{err:#}");
    std::fs::write(&crl, b"\x30\x03\x02\x01\x00").unwrap();
    assert!(server.reload_crl().is_err(), "garbage DER");
    std::fs::write(&crl, b"").unwrap();
    assert!(
        server.reload_crl().is_err(),
        "an empty file is not an empty CRL"
    );
    assert!(
        !identity_accepted(&endpoint, &pki_dir, "service").await,
        "a bad CRL must not lift the revocation (never fail open)"
    );
    assert!(identity_accepted(&endpoint, &pki_dir, "operator").await);

    // A well-formed CRL from another CA with the same name: its signature
    // does not verify, so it is refused too.
    let other = tempfile::tempdir().unwrap();
    pki::ensure_dev_pki(other.path()).unwrap();
    std::fs::write(
        &crl,
        pki::dev_crl(&PkiPaths::new(other.path()), &[]).unwrap(),
    )
    .unwrap();
    let err = server.reload_crl().unwrap_err();
    assert!(format!("{err:#}").contains("signature"), "{err:#}");
    assert!(!identity_accepted(&endpoint, &pki_dir, "service").await);

    // A CRL without the entry (DER this time: one CRL, the service CA's)
    // lets it back in.
    let empty_pem = pki::dev_crl_from(
        &paths,
        coffre::authz::Role::Service,
        &[],
        pki::DevCrlSpec::fresh(),
    )
    .unwrap();
    let (_, der) = x509_parser::pem::parse_x509_pem(empty_pem.as_bytes()).unwrap();
    std::fs::write(&crl, &der.contents).unwrap();
    server.reload_crl().unwrap();
    assert!(identity_accepted(&endpoint, &pki_dir, "service").await);

    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crl_is_reloaded_when_the_file_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (server, crl) = start_with_crl(dir.path(), Duration::from_millis(100))
        .await
        .unwrap();
    let endpoint = format!("https://{}", server.addr);
    let pki_dir = dir.path().join("pki");
    assert!(identity_accepted(&endpoint, &pki_dir, "service").await);

    let service_pem = std::fs::read_to_string(pki_dir.join("service.pem")).unwrap();
    let serial = pki::cert_serial(&service_pem).unwrap();
    let revoking = pki::dev_crl(&PkiPaths::new(dir.path()), &[serial]).unwrap();
    // Write-and-rename, as an operator should, so a half-written file is
    // never read.
    let tmp = dir.path().join("crl.pem.tmp");
    std::fs::write(&tmp, revoking).unwrap();
    std::fs::rename(&tmp, &crl).unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if !identity_accepted(&endpoint, &pki_dir, "service").await {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the changed CRL was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(identity_accepted(&endpoint, &pki_dir, "operator").await);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_crl_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    pki::ensure_dev_pki(dir.path()).unwrap();
    std::fs::write(dir.path().join("crl.pem"), "not a CRL").unwrap();
    let err = start_with_crl(dir.path(), Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("CRL"), "{err:#}");

    let mut opts = dev_options(dir.path());
    opts.crl = Some(dir.path().join("missing.crl"));
    let err = start_dev(&opts).await.unwrap_err();
    assert!(format!("{err:#}").contains("missing.crl"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_handshake_does_not_hold_up_other_clients() {
    let server = TestServer::start().await;
    let addr = server.server.as_ref().unwrap().addr;
    let pki_dir = server.data_dir().join("pki");
    // Clients that connect and never speak, and one that speaks garbage.
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let mut garbage = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut garbage, b"GET / HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let answered = tokio::time::timeout(
        Duration::from_secs(5),
        identity_accepted(&server.endpoint(), &pki_dir, "operator"),
    )
    .await
    .expect("a legitimate client waited behind stalled handshakes");
    assert!(answered);
    drop(idle);
    server.stop().await;
}

/// `coffre dev --crl FILE` in its own process: SIGHUP reloads the CRL.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_crl_of_coffre_dev() {
    use std::process::Command;

    use crate::common::binary::{dev_command, spawn_dev};

    let dir = tempfile::tempdir().unwrap();
    pki::ensure_dev_pki(dir.path()).unwrap();
    let paths = PkiPaths::new(dir.path());
    let crl = dir.path().join("clients.crl");
    std::fs::write(&crl, pki::dev_crl(&paths, &[]).unwrap()).unwrap();

    let mut cmd = dev_command(dir.path());
    cmd.args(["--crl-reload-secs", "3600", "--crl"])
        .arg(&crl)
        .env("RUST_LOG", "warn");
    // Reading the banner blocks: off the runtime.
    let (guard, endpoint) = tokio::task::spawn_blocking(move || spawn_dev(cmd))
        .await
        .unwrap();
    let pid = guard.0.id();
    let pki_dir = dir.path().join("pki");
    assert!(identity_accepted(&endpoint, &pki_dir, "service").await);

    let service_pem = std::fs::read_to_string(pki_dir.join("service.pem")).unwrap();
    let serial = pki::cert_serial(&service_pem).unwrap();
    std::fs::write(&crl, pki::dev_crl(&paths, &[serial]).unwrap()).unwrap();
    // The poll is an hour away: only the signal can make this pass.
    let status = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while identity_accepted(&endpoint, &pki_dir, "service").await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "SIGHUP did not reload the CRL"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        identity_accepted(&endpoint, &pki_dir, "operator").await,
        "the server survived SIGHUP and still serves others"
    );
}
