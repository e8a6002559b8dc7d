//! Identity bound to its issuing CA (issue #15, H1) and CRL staleness and
//! rollback (M4), over real gRPC: a principal's certificate must come from
//! its role's CA, carry clientAuth, and a CN never stands for a URI; a CRL
//! past its nextUpdate or older than one already seen is refused.

use std::path::{Path, PathBuf};
use std::time::Duration;

use coffre::authz::Role;
use coffre::grpc::pb;
use coffre::pki::{self, DevCertSpec, DevCrlSpec, PkiPaths};
use coffre::server::RunningServer;
use coffre::server::dev::start as start_dev;
use tonic::Code;
use tonic::transport::Channel;

use crate::common::{TestServer, dev_options, try_channel};

/// Writes an issued certificate and its key into `dir`.
fn write_issued(dir: &Path, stem: &str, issued: &pki::IssuedCert) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{stem}.pem"));
    let key = dir.join(format!("{stem}-key.pem"));
    std::fs::write(&cert, &issued.cert_pem).unwrap();
    std::fs::write(&key, issued.key_pem.as_bytes()).unwrap();
    (cert, key)
}

/// A certificate from the dev CA of `ca`, as `spec` says, in a channel.
async fn channel_with(server: &TestServer, ca: Role, spec: &DevCertSpec) -> Channel {
    let paths = PkiPaths::new(server.data_dir());
    let issued = pki::issue_dev_cert(&paths, ca, spec).unwrap();
    let scratch = server.data_dir().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let (cert, key) = write_issued(&scratch, "forged", &issued);
    try_channel(
        &server.endpoint(),
        &server.data_dir().join("pki/ca.pem"),
        Some((&cert, &key)),
    )
    .await
    .unwrap()
}

fn validity() -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    (
        now - time::Duration::hours(1),
        now + time::Duration::days(1),
    )
}

/// An operator call (ListKeys) through `channel`: its status.
async fn list_keys(channel: Channel) -> Result<(), tonic::Status> {
    pb::key_service_client::KeyServiceClient::new(channel)
        .list_keys(pb::ListKeysRequest::default())
        .await
        .map(|_| ())
}

/// `channel`'s ListKeys is refused UNAUTHENTICATED with a message holding
/// `why`, and the refusal is audited (one more record).
async fn assert_refused(server: &TestServer, channel: Channel, why: &str) {
    let audit = &server.server.as_ref().unwrap().audit;
    let before = audit.last_seq();
    let status = list_keys(channel).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains(why), "{status:?}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while audit.last_seq() <= before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the refusal was not audited"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_certificate_from_the_service_ca_is_refused() {
    let server = TestServer::start().await;
    let (nb, na) = validity();
    // The genuine operator gets in: the test is about the issuer alone.
    let genuine = channel_with(
        &server,
        Role::Operator,
        &DevCertSpec::client("operator", nb, na),
    )
    .await;
    list_keys(genuine).await.unwrap();

    // The provider's CA (the service CA) issues a certificate for the
    // operator's URI: the handshake accepts it (the service CA is a client
    // CA), the binding does not.
    let forged = channel_with(
        &server,
        Role::Service,
        &DevCertSpec::client("operator", nb, na),
    )
    .await;
    assert_refused(&server, forged, "operator role").await;

    // Nor may the auditor CA issue an operator.
    let forged = channel_with(
        &server,
        Role::Auditor,
        &DevCertSpec::client("operator", nb, na),
    )
    .await;
    assert_refused(&server, forged, "operator role").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cn_only_certificate_is_never_an_operator() {
    let server = TestServer::start().await;
    let (nb, na) = validity();
    // From the right CA, with clientAuth, but no URI SAN: its CN is the
    // operator's URI.
    let spec = DevCertSpec {
        common_name: pki::dev_principal("operator"),
        uri: None,
        client_auth_eku: true,
        not_before: nb,
        not_after: na,
    };
    let channel = channel_with(&server, Role::Operator, &spec).await;
    assert_refused(&server, channel, "CN").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_without_the_client_auth_eku_is_refused() {
    let server = TestServer::start().await;
    let (nb, na) = validity();
    let spec = DevCertSpec {
        client_auth_eku: false,
        ..DevCertSpec::client("operator", nb, na)
    };
    let channel = channel_with(&server, Role::Operator, &spec).await;
    assert_refused(&server, channel, "clientAuth").await;
    server.stop().await;
}

/// Whether a NEW connection presenting the dev identity `name` gets an
/// answer (health needs no role).
async fn identity_accepted(endpoint: &str, pki: &Path, name: &str) -> bool {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let (cert, key) = (
        pki.join(format!("{name}.pem")),
        pki.join(format!("{name}-key.pem")),
    );
    let Ok(channel) = try_channel(endpoint, &pki.join("ca.pem"), Some((&cert, &key))).await else {
        return false;
    };
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .is_ok()
}

async fn start_with_crl(dir: &Path) -> anyhow::Result<RunningServer> {
    let mut opts = dev_options(dir);
    opts.crl = Some(dir.join("crl.pem"));
    opts.crl_reload_interval = Duration::from_secs(3600);
    start_dev(&opts).await
}

/// A CRL file with one CRL per role CA, as `spec` says.
fn crl_file(paths: &PkiPaths, revoked: &[Vec<u8>], spec: DevCrlSpec) -> String {
    pki::ROLES
        .iter()
        .map(|role| pki::dev_crl_from(paths, *role, revoked, spec).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_crl_is_refused_and_the_revocation_stays() {
    let dir = tempfile::tempdir().unwrap();
    pki::ensure_dev_pki(dir.path()).unwrap();
    let paths = PkiPaths::new(dir.path());
    let pki_dir = dir.path().join("pki");
    let crl = dir.path().join("crl.pem");
    let now = time::OffsetDateTime::now_utc();
    let old = DevCrlSpec {
        this_update: now - time::Duration::hours(2),
        next_update: now + time::Duration::days(30),
        crl_number: 1,
    };
    let new = DevCrlSpec {
        this_update: now - time::Duration::hours(1),
        crl_number: 2,
        ..old
    };
    // The old CRL revokes nothing: the one an attacker replays.
    let old_crl = crl_file(&paths, &[], old);
    std::fs::write(&crl, &old_crl).unwrap();
    let server = start_with_crl(dir.path()).await.unwrap();
    let endpoint = format!("https://{}", server.addr);
    assert!(identity_accepted(&endpoint, &pki_dir, "service").await);

    // CRL 2 revokes the service's certificate.
    let service_pem = std::fs::read_to_string(pki_dir.join("service.pem")).unwrap();
    let serial = pki::cert_serial(&service_pem).unwrap();
    std::fs::write(&crl, crl_file(&paths, &[serial], new)).unwrap();
    server.reload_crl().unwrap();
    assert!(!identity_accepted(&endpoint, &pki_dir, "service").await);

    // CRL 1 again, validly signed: refused, and the revocation stays.
    std::fs::write(&crl, &old_crl).unwrap();
    let err = server.reload_crl().unwrap_err();
    assert!(format!("{err:#}").contains("rollback"), "{err:#}");
    assert!(
        !identity_accepted(&endpoint, &pki_dir, "service").await,
        "a replayed older CRL must not lift a revocation"
    );
    assert!(identity_accepted(&endpoint, &pki_dir, "operator").await);

    // Counted on the metrics page.
    let metrics = server.metrics_addr.unwrap();
    let (_, page) = crate::observability::http_get(metrics, "/metrics");
    assert!(
        page.lines()
            .any(|l| l == "coffre_crl_rollbacks_refused_total 1"),
        "{page}"
    );
    server.stop().await.unwrap();

    // The highest number is persisted: a restart on the old CRL is refused.
    assert!(dir.path().join("crl-state.json").is_file());
    let err = start_with_crl(dir.path()).await.unwrap_err();
    assert!(format!("{err:#}").contains("rollback"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_crl_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    pki::ensure_dev_pki(dir.path()).unwrap();
    let paths = PkiPaths::new(dir.path());
    let crl = dir.path().join("crl.pem");
    let now = time::OffsetDateTime::now_utc();
    let expired = DevCrlSpec {
        this_update: now - time::Duration::days(31),
        next_update: now - time::Duration::days(1),
        crl_number: 1,
    };
    // At start: the server does not start on a stale CRL.
    std::fs::write(&crl, crl_file(&paths, &[], expired)).unwrap();
    let err = start_with_crl(dir.path()).await.unwrap_err();
    assert!(format!("{err:#}").contains("nextUpdate"), "{err:#}");

    // On reload: refused, the fresh CRL in force stays.
    let fresh = DevCrlSpec {
        this_update: now - time::Duration::hours(1),
        next_update: now + time::Duration::days(1),
        crl_number: 2,
    };
    std::fs::write(&crl, crl_file(&paths, &[], fresh)).unwrap();
    let server = start_with_crl(dir.path()).await.unwrap();
    let endpoint = format!("https://{}", server.addr);
    let pki_dir = dir.path().join("pki");
    assert!(identity_accepted(&endpoint, &pki_dir, "service").await);
    let stale_but_newer = DevCrlSpec {
        crl_number: 3,
        ..expired
    };
    std::fs::write(&crl, crl_file(&paths, &[], stale_but_newer)).unwrap();
    let err = server.reload_crl().unwrap_err();
    assert!(format!("{err:#}").contains("nextUpdate"), "{err:#}");
    assert!(identity_accepted(&endpoint, &pki_dir, "service").await);
    server.stop().await.unwrap();
}

/// A `coffre serve` configuration's [tls] section, the rest minimal.
fn serve_config(tls: &str) -> String {
    format!(
        r#"
data_dir = "/tmp/unused"
allow_single_operator = true
[tls]
{tls}
[hsm]
backend = "simulator"
endpoint = "http://127.0.0.1:7444"
allow_insecure_simulator = true
[roles]
operator = ["spiffe://coffre.dev/operator"]
service = ["spiffe://coffre.dev/service"]
"#
    )
}

/// What `coffre serve` does with its TLS files before it serves anything.
fn prepare(config: &str) -> anyhow::Result<()> {
    let config = coffre::config::Config::parse(config)?;
    coffre::grpc::PreparedTls::new(&config.tls.load()?).map(|_| ())
}

#[test]
fn coffre_serve_refuses_a_shared_or_overlapping_client_ca_without_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    pki::ensure_dev_pki(dir.path()).unwrap();
    let pki = dir.path().join("pki");
    let p = |f: &str| pki.join(f).display().to_string();
    let server = format!(
        "cert = \"{}\"\nkey = \"{}\"\n",
        p("server.pem"),
        p("server-key.pem")
    );

    // Today's layout: one client_ca for every role.
    let shared = format!("{server}client_ca = \"{}\"\n", p("ca.pem"));
    let err = prepare(&serve_config(&shared)).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("tls.operator_ca") && msg.contains("allow_shared_client_ca = true"),
        "the message says how to migrate: {msg}"
    );
    prepare(&serve_config(&format!(
        "{shared}allow_shared_client_ca = true\n"
    )))
    .unwrap();

    // Role CAs where the operators' CA is the services' CA.
    let same = format!(
        "{server}operator_ca = \"{}\"\nservice_ca = \"{}\"\n",
        p("service-ca.pem"),
        p("service-ca.pem")
    );
    let err = prepare(&serve_config(&same)).unwrap_err();
    assert!(format!("{err:#}").contains("overlap"), "{err:#}");
    prepare(&serve_config(&format!(
        "{same}allow_shared_client_ca = true\n"
    )))
    .unwrap();

    // The operator CA issued by the service CA: one anchor too.
    let paths = PkiPaths::new(dir.path());
    let sub = sub_ca_of_service(&paths);
    std::fs::write(pki.join("sub-ca.pem"), sub).unwrap();
    let issued = format!(
        "{server}operator_ca = \"{}\"\nservice_ca = \"{}\"\n",
        p("sub-ca.pem"),
        p("service-ca.pem")
    );
    let err = prepare(&serve_config(&issued)).unwrap_err();
    assert!(format!("{err:#}").contains("issued by"), "{err:#}");

    // Separate CAs: accepted.
    let split = format!(
        "{server}operator_ca = \"{}\"\nservice_ca = \"{}\"\n",
        p("operator-ca.pem"),
        p("service-ca.pem")
    );
    prepare(&serve_config(&split)).unwrap();
}

/// A CA certificate (PEM) signed by the dev service CA.
fn sub_ca_of_service(paths: &PkiPaths) -> String {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(paths.role_ca_key(Role::Service)).unwrap())
            .unwrap();
    let issuer = Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(paths.role_ca_cert(Role::Service)).unwrap(),
        ca_key,
    )
    .unwrap();
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "a CA under the service CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    params.signed_by(&key, &issuer).unwrap().pem()
}
