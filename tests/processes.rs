//! coffre and hsm-sim as separate processes, as in production:
//! `hsm-sim serve` and `coffre serve --config FILE`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use coffre::grpc::pb::{self, data_key_service_client::DataKeyServiceClient};
use tonic::Code;

use crate::common::binary::{
    COFFRE, Guard, HSM_PIN, free_port, hsm_fault, spawn_ready, start_dev, start_hsm,
};
use crate::common::clients::{Clients, generate_request};
use crate::common::{REASON, channel_as, ctx};

fn start_coffre(config: &Path) -> (Guard, String) {
    let mut cmd = Command::new(COFFRE);
    cmd.args(["serve", "--config"])
        .arg(config)
        .env("COFFRE_HSM_PIN", HSM_PIN)
        .env("RUST_LOG", "warn");
    let (guard, addr) = spawn_ready(cmd, "coffre listening on ");
    (guard, format!("https://{addr}"))
}

fn write_config(dir: &Path, hsm_port: u16) -> std::path::PathBuf {
    coffre::pki::ensure_dev_pki(dir).unwrap();
    let pki = dir.join("pki");
    let config = format!(
        r#"
listen = "127.0.0.1:0"
data_dir = "{data}"
# CI runs the tests as root; production would not (see the root test below).
allow_root = true
# The tests drive one operator; production has a [quorum].
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

[default_key_policy]
grants = [{{ principal = "spiffe://coffre.dev/service", operations = ["GenerateDataKey", "Decrypt"] }}]

[roles]
operator = ["spiffe://coffre.dev/operator"]
service = ["spiffe://coffre.dev/service"]
auditor = ["spiffe://coffre.dev/auditor"]
"#,
        data = dir.join("data").display(),
        pki = pki.display(),
    );
    let path = dir.join("coffre.toml");
    std::fs::write(&path, config).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coffre_serve_with_hsm_sim_as_its_own_process() {
    let dir = tempfile::tempdir().unwrap();
    let hsm_port = free_port();
    let hsm_state = dir.path().join("hsm.state");
    let hsm = start_hsm(&hsm_state, hsm_port);
    let config = write_config(dir.path(), hsm_port);
    let (coffre, endpoint) = start_coffre(&config);
    let pki = dir.path().join("pki");

    let mut clients = Clients::connect(&endpoint, &pki).await;
    let (key, dk) = clients
        .key_with_data_key("remote", &[("t", "1")])
        .await
        .unwrap();
    let Clients { mut keys, .. } = clients;
    let decrypt = |blob: Vec<u8>| pb::DecryptRequest {
        ciphertext_blob: blob,
        encryption_context: ctx(&[("t", "1")]),
        justification: REASON,
        key_id: String::new(),
    };

    // An HSM outage: what needs the HSM fails with UNAVAILABLE and a clear
    // message; nothing is created.
    hsm_fault(hsm_port, &["set", "--outage"]);
    let err = keys
        .create_key(pb::CreateKeyRequest {
            alias: "during-outage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("HSM"), "{}", err.message());
    hsm_fault(hsm_port, &["clear"]);
    let err = keys
        .get_key(pb::GetKeyRequest {
            key_id: "during-outage".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::NotFound,
        "nothing was created during the outage"
    );

    // hsm-sim restarts (sessions lost): coffre logs in again by itself.
    drop(hsm);
    let hsm = start_hsm(&hsm_state, hsm_port);
    keys.rotate_key(pb::RotateKeyRequest {
        key_id: key.key_id.clone(),
    })
    .await
    .unwrap();

    // coffre restarts: the CMK versions are unwrapped by the HSM again.
    drop(coffre);
    let (_coffre, endpoint) = start_coffre(&config);
    let mut data = DataKeyServiceClient::new(channel_as(&endpoint, &pki, "service").await);
    let out = data
        .decrypt(decrypt(dk.ciphertext_blob.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.plaintext, dk.plaintext);
    let dk2 = data
        .generate_data_key(pb::GenerateDataKeyRequest {
            number_of_bytes: 16,
            ..generate_request("remote", &[("t", "1")])
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dk2.key_version, 2);
    drop(hsm);
}

#[test]
fn coffre_serve_refuses_a_simulator_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), free_port());
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("allow_insecure_simulator = true", "");
    std::fs::write(&config, text).unwrap();
    let out = Command::new(COFFRE)
        .args(["serve", "--config"])
        .arg(&config)
        .env("COFFRE_HSM_PIN", HSM_PIN)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not secure"), "{stderr}");
}

/// As root, `coffre serve` refuses to start unless the configuration (or
/// `--allow-root`) allows it; as another user the setting changes nothing.
#[test]
fn coffre_serve_refuses_root_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let hsm_port = free_port();
    let _hsm = start_hsm(&dir.path().join("hsm.state"), hsm_port);
    let config = write_config(dir.path(), hsm_port);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("allow_root = true", "");
    std::fs::write(&config, text).unwrap();
    if coffre::hardening::running_as_root() {
        let out = Command::new(COFFRE)
            .args(["serve", "--config"])
            .arg(&config)
            .env("COFFRE_HSM_PIN", HSM_PIN)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("refuses to run as root"), "{stderr}");
        // --allow-root is the other way to say so.
        let mut cmd = Command::new(COFFRE);
        cmd.args(["serve", "--allow-root", "--config"])
            .arg(&config)
            .env("COFFRE_HSM_PIN", HSM_PIN)
            .env("RUST_LOG", "warn");
        let (_coffre, addr) = spawn_ready(cmd, "coffre listening on ");
        assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    } else {
        let (_coffre, endpoint) = start_coffre(&config);
        assert!(endpoint.starts_with("https://127.0.0.1:"), "{endpoint}");
    }
}

/// The server's own process cannot dump core: RLIMIT_CORE is 0 and it is
/// not dumpable (Linux), read from /proc while it runs.
#[cfg(target_os = "linux")]
#[test]
fn coffre_disables_core_dumps_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (guard, _endpoint) = start_dev(&dir.path().join("data"));
    let pid = guard.0.id();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    let fields: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(&fields[4..6], ["0", "0"], "{core}");
    // Non-dumpable: /proc/PID/ belongs to root, whoever runs the process
    // (for a root process this holds either way; the limit above is the
    // check there).
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::metadata(format!("/proc/{pid}/environ"))
        .unwrap()
        .uid();
    assert_eq!(owner, 0);
}

/// Polls `attempt` every 10 ms until it succeeds; how long that took.
async fn time_until_ok<F, Fut>(mut attempt: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !attempt().await {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "coffre did not serve again within 30 s of the HSM's return"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

/// Faults injected into hsm-sim as its own process, with `hsm-sim fault`:
/// 500 ms of latency (served, slower; a caller's shorter deadline is kept),
/// one call in ten failing (clean UNAVAILABLE, exactly the acknowledged keys
/// exist), an outage and an hsm-sim restart (coffre serves again within a
/// second of the HSM's return), and a tamper response (coffre stops
/// serving, cached keys included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsm_sim_faults_as_its_own_process() {
    let dir = tempfile::tempdir().unwrap();
    let hsm_port = free_port();
    let hsm_state = dir.path().join("hsm.state");
    let hsm = start_hsm(&hsm_state, hsm_port);
    let config = write_config(dir.path(), hsm_port);
    let (_coffre, endpoint) = start_coffre(&config);
    let pki = dir.path().join("pki");
    let mut clients = Clients::connect(&endpoint, &pki).await;
    let (_, dk) = clients
        .key_with_data_key("warm", &[("t", "1")])
        .await
        .unwrap();
    let Clients {
        mut keys, mut data, ..
    } = clients;
    let decrypt = pb::DecryptRequest {
        ciphertext_blob: dk.ciphertext_blob.clone(),
        encryption_context: ctx(&[("t", "1")]),
        justification: REASON,
        key_id: String::new(),
    };

    // 500 ms per HSM call: served, only slower; a 200 ms deadline is kept.
    hsm_fault(hsm_port, &["set", "--latency-ms", "500"]);
    let started = Instant::now();
    keys.create_key(pb::CreateKeyRequest {
        alias: "slow".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "two HSM calls"
    );
    let mut request = tonic::Request::new(pb::CreateKeyRequest {
        alias: "too-slow".into(),
        ..Default::default()
    });
    request.set_timeout(Duration::from_millis(200));
    let started = Instant::now();
    let err = keys.create_key(request).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    // Well before the HSM could have answered (two calls: 1 s).
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    // Cached keys do not wait for the HSM.
    let opened = data.decrypt(decrypt.clone()).await.unwrap().into_inner();
    assert_eq!(opened.plaintext, dk.plaintext);
    hsm_fault(hsm_port, &["clear"]);

    // One HSM call in ten fails.
    hsm_fault(hsm_port, &["set", "--error-rate", "0.1"]);
    let created = crate::common::clients::create_keys_through_errors(&mut keys).await;
    hsm_fault(hsm_port, &["clear"]);
    crate::common::clients::assert_exactly_these_exist(&mut keys, &created).await;

    // An outage, then the HSM's return: served again within a second.
    hsm_fault(hsm_port, &["set", "--outage"]);
    let err = keys
        .create_key(pb::CreateKeyRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let opened = data.decrypt(decrypt.clone()).await.unwrap().into_inner();
    assert_eq!(
        opened.plaintext, dk.plaintext,
        "cached keys serve through an outage"
    );
    hsm_fault(hsm_port, &["clear"]);
    let back = time_until_ok(|| {
        let mut keys = keys.clone();
        async move {
            keys.create_key(pb::CreateKeyRequest::default())
                .await
                .is_ok()
        }
    })
    .await;
    eprintln!("served again {back:?} after the outage ended");
    assert!(back < Duration::from_secs(1), "{back:?}");

    // hsm-sim stops, then comes back (a new process on the same state).
    drop(hsm);
    let err = keys
        .create_key(pb::CreateKeyRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let hsm = start_hsm(&hsm_state, hsm_port);
    let back = time_until_ok(|| {
        let mut keys = keys.clone();
        async move {
            keys.create_key(pb::CreateKeyRequest::default())
                .await
                .is_ok()
        }
    })
    .await;
    eprintln!("served again {back:?} after hsm-sim restarted");
    assert!(back < Duration::from_secs(1), "{back:?}");

    // Tamper: the root keys are gone; coffre stops serving cached keys too.
    hsm_fault(hsm_port, &["tamper"]);
    let stopped = time_until_ok(|| {
        let mut data = data.clone();
        let decrypt = decrypt.clone();
        async move {
            matches!(data.decrypt(decrypt).await, Err(e) if e.code() == Code::Unavailable)
        }
    })
    .await;
    eprintln!("cached keys refused {stopped:?} after the tamper response");
    let shown = keys
        .get_key(pb::GetKeyRequest {
            key_id: "warm".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.versions.len(), 1, "the store is unchanged");
    drop(hsm);
}
