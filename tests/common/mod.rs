//! Shared fixtures: a real coffre server on loopback (port 0) with mTLS, and
//! clients holding the dev PKI's certificates.
//!
//! - [`binary`]: the real binaries as processes (`coffre dev`, the CLI,
//!   `hsm-sim serve`).
//! - [`clients`]: the operator's and the service's clients of a server, and
//!   the key-plus-data-key set-up.
//! - [`pg`]: private PostgreSQL servers (initdb, a standby, TLS, a
//!   password) for the PostgreSQL store's tests.
//! - [`needs`]: what some tests need from the machine (`build/needs.rs`,
//!   shared with the build script), and [`require`], their check at start.

#![allow(dead_code)]

pub mod binary;
pub mod clients;
pub mod cluster;
#[path = "../../build/needs.rs"]
pub mod needs;
pub mod pg;
pub mod ports;
pub mod proxy;

use std::path::{Path, PathBuf};
use std::time::Duration;

use coffre::grpc::pb::data_key_service_client::DataKeyServiceClient;
use coffre::grpc::pb::key_service_client::KeyServiceClient;
use coffre::server::RunningServer;
use coffre::server::dev::{DevOptions, dev_kms_options, start as start_dev};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// The justification of every request that needs one, unless a test is
/// about justifications.
pub const REASON: i32 = coffre::grpc::pb::AccessReason::CustomerInitiatedAccess as i32;

/// A test identity: certificate name, role, attributes.
pub type TestIdentity<'a> = (&'a str, coffre::authz::Role, &'a [(&'a str, &'a str)]);

pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub server: Option<RunningServer>,
}

impl TestServer {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let server = start_dev(&dev_options(dir.path())).await.unwrap();
        Self {
            dir,
            server: Some(server),
        }
    }

    /// A server with the given roles and attributes (principals are dev
    /// URIs `spiffe://coffre.dev/<name>`; certificates are issued for every
    /// name) and the dev default policy.
    pub async fn start_with(identities: &[TestIdentity<'_>]) -> Self {
        Self::start_with_options(identities, dev_kms_options()).await
    }

    pub async fn start_with_options(
        identities: &[TestIdentity<'_>],
        options: coffre::service::KmsOptions,
    ) -> Self {
        Self::start_with_limits(identities, options, Default::default()).await
    }

    /// As [`Self::start_with_options`], with the listener's bounds too.
    pub async fn start_with_limits(
        identities: &[TestIdentity<'_>],
        options: coffre::service::KmsOptions,
        limits: coffre::grpc::ServerLimits,
    ) -> Self {
        use coffre::authz::StaticRoles;
        use coffre::pki::{dev_principal, issue_client_cert_for};
        use coffre::server::DataDir;

        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        coffre::server::dev::ensure_dev_dir(&data).unwrap();
        let paths = data.pki();
        let mut roles = Vec::new();
        let mut attributes = std::collections::HashMap::new();
        for (name, role, attrs) in identities {
            if !paths.client_cert(name).exists() {
                issue_client_cert_for(&paths, name, *role).unwrap();
            }
            roles.push((dev_principal(name), *role));
            attributes.insert(
                dev_principal(name),
                attrs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            );
        }
        let server = coffre::server::dev::builder(
            &data,
            StaticRoles::new(roles).with_attributes(attributes),
            options,
            &Default::default(),
            None,
            Duration::from_secs(10),
            "127.0.0.1:0".parse().unwrap(),
        )
        .await
        .unwrap()
        .metrics(Some("127.0.0.1:0".parse().unwrap()))
        .limits(limits)
        .start()
        .await
        .unwrap();
        Self {
            dir,
            server: Some(server),
        }
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn endpoint(&self) -> String {
        format!("https://{}", self.server.as_ref().unwrap().addr)
    }

    /// Stops the server and starts a new one on the same data directory.
    pub async fn restart(&mut self) {
        self.server.take().unwrap().stop().await.unwrap();
        self.server = Some(start_dev(&dev_options(self.dir.path())).await.unwrap());
    }

    pub async fn channel(&self, identity: &str) -> Channel {
        channel_as(&self.endpoint(), &self.dir.path().join("pki"), identity).await
    }

    pub async fn keys(&self) -> KeyServiceClient<Channel> {
        KeyServiceClient::new(self.channel("operator").await)
    }

    /// Creates a key with `alias` as the operator; its metadata.
    pub async fn create_key(&self, alias: &str) -> coffre::grpc::pb::KeyMetadata {
        self.keys()
            .await
            .create_key(coffre::grpc::pb::CreateKeyRequest {
                alias: alias.to_string(),
                description: "test key".to_string(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .key
            .unwrap()
    }

    pub async fn data(&self) -> DataKeyServiceClient<Channel> {
        DataKeyServiceClient::new(self.channel("service").await)
    }

    /// The operator's and the service's clients together.
    pub async fn clients(&self) -> clients::Clients {
        clients::Clients::connect(&self.endpoint(), &self.dir.path().join("pki")).await
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.stop().await.unwrap();
        }
    }
}

pub fn dev_options(dir: &Path) -> DevOptions {
    DevOptions {
        data_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        options: dev_kms_options(),
        scheduler_interval: None,
        quorum: 1,
        crl: None,
        crl_reload_interval: Duration::from_secs(10),
        audit: Default::default(),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        preload_keys: 0,
        accept_audit_log_loss: false,
        attributes: Vec::new(),
        xks_listen: None,
    }
}

/// An mTLS channel presenting `pki/<identity>.pem`.
pub async fn channel_as(endpoint: &str, pki: &Path, identity: &str) -> Channel {
    try_channel(
        endpoint,
        &pki.join("ca.pem"),
        Some((
            &pki.join(format!("{identity}.pem")),
            &pki.join(format!("{identity}-key.pem")),
        )),
    )
    .await
    .unwrap()
}

pub async fn try_channel(
    endpoint: &str,
    ca: &Path,
    identity: Option<(&PathBuf, &PathBuf)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    }
    Endpoint::from_shared(endpoint.to_string())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .timeout(Duration::from_secs(20))
        .connect()
        .await
}

/// An encryption context as the wire carries it (a map), from pairs.
pub fn ctx(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The start of a test that needs `need` from the machine: fails, saying
/// what is missing and how to get it, unless the machine has it. Such a test
/// is `#[ignore]`d when the build did not find `need` (see `build/needs.rs`);
/// it gets here anyway when `need.require` was `1` at build time, when run
/// with `--include-ignored`, or when the machine changed since the build.
pub fn require(need: &needs::Need) {
    if let Err(missing) = need.detect(&|var| std::env::var(var).ok()) {
        panic!(
            "this test needs {}, and this machine lacks it: {missing}. To run it, {}. Without \
             it (and without {}=1 at build time) `cargo test` reports it as ignored, not run",
            need.what, need.how, need.require
        );
    }
}
