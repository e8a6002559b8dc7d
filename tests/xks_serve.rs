//! Issue #18 with the real binaries: `coffre serve` with an `[xks]`
//! section (mTLS with the client's CN pinned, one credential from an
//! environment variable and one from a file) against `hsm-sim serve` in its
//! own process, called as AWS KMS calls it (`coffre::xks::client`: HTTP/2,
//! SigV4 by the AWS SDK's signer). Then the HSM fails, and the front
//! answers `DependencyTimeoutException` within its deadline rather than
//! after AWS KMS has given up (250 ms); then the HSM returns.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use coffre::authz::Role;
use coffre::grpc::pb;
use coffre::pki::{PkiPaths, issue_client_cert_for};
use coffre::xks::client::{self, Answer, Target, XksClient};
use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::common::binary::{COFFRE, HSM_PIN, free_port, hsm_fault, spawn_ready, start_hsm};
use crate::common::clients::Clients;

const PREFIX: &str = "/tenant-a";
const ENV_CREDENTIAL: (&str, &str) = (
    "ENVCREDENTIALAAAAAAAAAAA2",
    "ZW52aXJvbm1lbnQtc2VjcmV0LW9mLXRoZS1maXJzdC1jcmVkZW50aWFs",
);
const FILE_CREDENTIAL: (&str, &str) = (
    "FILECREDENTIALAAAAAAAAAA3",
    "ZmlsZS1zZWNyZXQtb2YtdGhlLXNlY29uZC1jcmVkZW50aWFsLXJvdGF0aW9u",
);
const AWS: &str = "spiffe://coffre.dev/aws-kms";
/// The CN the front pins (`[xks] client_cn`).
const PINNED_CN: &str = "aws-kms-xks-client";

fn write_config(dir: &Path, hsm_port: u16, xks_port: u16) -> PathBuf {
    coffre::pki::ensure_dev_pki(dir).unwrap();
    let pki = dir.join("pki");
    let secret_file = dir.join("xks-secret");
    std::fs::write(&secret_file, FILE_CREDENTIAL.1).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = format!(
        r#"
listen = "127.0.0.1:0"
data_dir = "{data}"
allow_root = true
allow_single_operator = true

[tls]
cert = "{pki}/server.pem"
key = "{pki}/server-key.pem"
operator_ca = "{pki}/operator-ca.pem"
service_ca = "{pki}/service-ca.pem"
auditor_ca = "{pki}/auditor-ca.pem"

[hsm]
backend = "simulator"
endpoint = "http://127.0.0.1:{hsm_port}"
pin_env = "COFFRE_HSM_PIN"
timeout_ms = 2000
allow_insecure_simulator = true

[roles]
operator = ["spiffe://coffre.dev/operator"]
service = ["spiffe://coffre.dev/service", "{AWS}"]
auditor = ["spiffe://coffre.dev/auditor"]

[xks]
listen = "127.0.0.1:{xks_port}"
uri_prefix = "{PREFIX}"
cert = "{pki}/server.pem"
key = "{pki}/server-key.pem"
client_ca = "{pki}/service-ca.pem"
client_cn = "{PINNED_CN}"

[[xks.credentials]]
access_key_id = "{env_id}"
secret_access_key_env = "COFFRE_TEST_XKS_SECRET"
principal = "{AWS}"

[[xks.credentials]]
access_key_id = "{file_id}"
secret_access_key_file = "{secret_file}"
principal = "{AWS}"
"#,
        data = dir.join("data").display(),
        pki = pki.display(),
        env_id = ENV_CREDENTIAL.0,
        file_id = FILE_CREDENTIAL.0,
        secret_file = secret_file.display(),
    );
    let path = dir.join("coffre.toml");
    std::fs::write(&path, config).unwrap();
    path
}

fn target(
    xks_port: u16,
    pki: &Path,
    credential: (&str, &str),
    client_name: Option<(&Path, &str)>,
) -> Target {
    Target {
        endpoint: format!("https://localhost:{xks_port}"),
        uri_prefix: PREFIX.to_string(),
        access_key_id: credential.0.to_string(),
        secret_access_key: Zeroizing::new(credential.1.to_string()),
        region: "eu-west-3".to_string(),
        ca_pem: std::fs::read(pki.join("ca.pem")).unwrap(),
        client_identity: client_name.map(|(dir, name)| {
            (
                std::fs::read(dir.join(format!("{name}.pem"))).unwrap(),
                Zeroizing::new(std::fs::read(dir.join(format!("{name}-key.pem"))).unwrap()),
            )
        }),
        principal: None,
    }
}

fn health() -> Value {
    json!({ "requestMetadata": client::health_metadata("KmsHealthCheck") })
}

fn encrypt(key: &str) -> Value {
    json!({
        "requestMetadata": client::request_metadata(
            "Encrypt",
            "arn:aws:iam::111122223333:role/ebs",
            &format!("arn:aws:kms:eu-west-3:111122223333:key/{key}"),
        ),
        "plaintext": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        "encryptionAlgorithm": "AES_GCM",
        "additionalAuthenticatedData": "dm9sdW1lPXZvbC0x",
    })
}

fn decrypt(key: &str, encrypted: &Value) -> Value {
    let mut body = json!({
        "requestMetadata": client::request_metadata(
            "Decrypt",
            "arn:aws:iam::111122223333:role/ebs",
            &format!("arn:aws:kms:eu-west-3:111122223333:key/{key}"),
        ),
        "encryptionAlgorithm": "AES_GCM",
        "additionalAuthenticatedData": "dm9sdW1lPXZvbC0x",
    });
    for f in [
        "ciphertext",
        "ciphertextMetadata",
        "initializationVector",
        "authenticationTag",
    ] {
        body[f] = encrypted[f].clone();
    }
    body
}

fn assert_ok(answer: &Answer, what: &str) {
    assert_eq!(answer.status, 200, "{what}: {answer:?}");
}

/// Whether the front refuses this client at the TLS layer: no connection,
/// or (TLS 1.3 checks the client's certificate after the client's side of
/// the handshake) no answer to its first request.
async fn tls_refused(target: &Target) -> bool {
    match XksClient::connect(target).await {
        Err(_) => true,
        Ok(mut c) => c.post("health", &health()).await.is_err(),
    }
}

async fn create_key(clients: &mut Clients, alias: &str, level: pb::ProtectionLevel) -> String {
    clients
        .keys
        .create_key(pb::CreateKeyRequest {
            alias: alias.to_string(),
            protection_level: level as i32,
            policy: Some(pb::KeyPolicy {
                grants: vec![pb::Grant {
                    principal: AWS.to_string(),
                    operations: vec![
                        pb::DataKeyOperation::Encrypt as i32,
                        pb::DataKeyOperation::Decrypt as i32,
                    ],
                }],
                accepted_reasons: vec![pb::AccessReason::CustomerInitiatedAccess as i32],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap()
        .key_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coffre_serve_pins_the_xks_client_and_answers_in_time_without_its_hsm() {
    let dir = tempfile::tempdir().unwrap();
    let (hsm_port, xks_port) = (free_port(), free_port());
    let _hsm = start_hsm(&dir.path().join("hsm.state"), hsm_port);
    let config = write_config(dir.path(), hsm_port, xks_port);
    let pki = dir.path().join("pki");
    let paths = PkiPaths::new(dir.path());
    // The pinned CN and an impostor, from the CA the front trusts; the
    // pinned CN from another CA too.
    issue_client_cert_for(&paths, PINNED_CN, Role::Service).unwrap();
    issue_client_cert_for(&paths, "impostor", Role::Service).unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    coffre::pki::ensure_dev_pki(elsewhere.path()).unwrap();
    issue_client_cert_for(&PkiPaths::new(elsewhere.path()), PINNED_CN, Role::Service).unwrap();

    let mut cmd = Command::new(COFFRE);
    cmd.args(["serve", "--config"])
        .arg(&config)
        .env("COFFRE_HSM_PIN", HSM_PIN)
        .env("COFFRE_TEST_XKS_SECRET", ENV_CREDENTIAL.1)
        .env("RUST_LOG", "warn");
    let (_coffre, addr) = spawn_ready(cmd, "coffre listening on ");
    let mut clients = Clients::connect(&format!("https://{addr}"), &pki).await;
    let soft = create_key(&mut clients, "xks-soft", pb::ProtectionLevel::Software).await;
    let hsm = create_key(&mut clients, "xks-hsm", pb::ProtectionLevel::Hsm).await;

    // mTLS: the pinned CN from the trusted CA gets in, with either
    // credential; no certificate, another CN, or another CA does not.
    let pinned = Some((pki.as_path(), PINNED_CN));
    let from_env = target(xks_port, &pki, ENV_CREDENTIAL, pinned);
    let from_file = target(xks_port, &pki, FILE_CREDENTIAL, pinned);
    let mut aws = XksClient::connect(&from_env).await.unwrap();
    let answer = aws.post("health", &health()).await.unwrap();
    assert_ok(&answer, "health");
    assert_eq!(
        answer.body["ekmFleetDetails"][0]["healthStatus"], "ACTIVE",
        "{answer:?}"
    );
    let mut rotated = XksClient::connect(&from_file).await.unwrap();
    for key in [&soft, &hsm] {
        let sealed = aws
            .post(&format!("keys/{key}/encrypt"), &encrypt(key))
            .await
            .unwrap();
        assert_ok(&sealed, "encrypt");
        let opened = rotated
            .post(&format!("keys/{key}/decrypt"), &decrypt(key, &sealed.body))
            .await
            .unwrap();
        assert_ok(&opened, "decrypt with the second credential");
        assert_eq!(
            opened.body["plaintext"], "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
            "{opened:?}"
        );
    }
    for (refused, what) in [
        (
            target(xks_port, &pki, ENV_CREDENTIAL, None),
            "no certificate",
        ),
        (
            target(
                xks_port,
                &pki,
                ENV_CREDENTIAL,
                Some((pki.as_path(), "impostor")),
            ),
            "another CN",
        ),
        (
            target(
                xks_port,
                &pki,
                ENV_CREDENTIAL,
                Some((&elsewhere.path().join("pki"), PINNED_CN)),
            ),
            "another CA",
        ),
    ] {
        assert!(tls_refused(&refused).await, "{what}: let in");
    }

    // The HSM-level key needs the HSM for every call; made before the
    // outage, a software-level key's ciphertext still opens (its CMK
    // version is cached, as for gRPC).
    let soft_sealed = aws
        .post(&format!("keys/{soft}/encrypt"), &encrypt(&soft))
        .await
        .unwrap();
    let hsm_sealed = aws
        .post(&format!("keys/{hsm}/encrypt"), &encrypt(&hsm))
        .await
        .unwrap();
    assert_ok(&hsm_sealed, "encrypt before the outage");

    // An outage: the HSM refuses at once.
    hsm_fault(hsm_port, &["set", "--outage"]);
    let started = Instant::now();
    let answer = aws
        .post(
            &format!("keys/{hsm}/decrypt"),
            &decrypt(&hsm, &hsm_sealed.body),
        )
        .await
        .unwrap();
    let waited = started.elapsed();
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(answer.error_name(), Some("DependencyTimeoutException"));
    assert!(waited < Duration::from_millis(1000), "{waited:?}");
    let answer = aws.post("health", &health()).await.unwrap();
    assert_ok(&answer, "health during the outage");
    assert_eq!(
        answer.body["ekmFleetDetails"][0]["healthStatus"], "UNAVAILABLE",
        "{answer:?}"
    );
    let answer = aws
        .post(
            &format!("keys/{soft}/decrypt"),
            &decrypt(&soft, &soft_sealed.body),
        )
        .await
        .unwrap();
    assert_ok(&answer, "a cached software key during the outage");

    // A hung HSM (3 s a call): the front answers at its deadline (150 ms),
    // not when the HSM does. The bound here is loose (a loaded CI machine);
    // the deadline is what makes it hold, and the HSM takes 3 s.
    hsm_fault(hsm_port, &["set", "--latency-ms", "3000"]);
    for api in ["encrypt", "decrypt", "health"] {
        let body = match api {
            "encrypt" => encrypt(&hsm),
            "decrypt" => decrypt(&hsm, &hsm_sealed.body),
            _ => health(),
        };
        let path = match api {
            "health" => "health".to_string(),
            _ => format!("keys/{hsm}/{api}"),
        };
        let started = Instant::now();
        let answer = aws.post(&path, &body).await.unwrap();
        let waited = started.elapsed();
        assert!(waited < Duration::from_millis(1000), "{api}: {waited:?}");
        if api == "health" {
            assert_ok(&answer, "health with a hung HSM");
            assert_eq!(
                answer.body["ekmFleetDetails"][0]["healthStatus"], "UNAVAILABLE",
                "{answer:?}"
            );
        } else {
            assert_eq!(answer.status, 503, "{api}: {answer:?}");
            assert_eq!(
                answer.error_name(),
                Some("DependencyTimeoutException"),
                "{api}"
            );
        }
    }

    // The HSM returns: served again once the calls abandoned above have
    // drained from it (each was still held for its 3 s).
    hsm_fault(hsm_port, &["clear"]);
    let until = Instant::now() + Duration::from_secs(15);
    let answer = loop {
        let answer = aws
            .post(
                &format!("keys/{hsm}/decrypt"),
                &decrypt(&hsm, &hsm_sealed.body),
            )
            .await
            .unwrap();
        if answer.status == 200 || Instant::now() > until {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_ok(&answer, "decrypt once the HSM is back");
    assert_eq!(
        answer.body["plaintext"],
        "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
    );
}
