//! Shared fixtures: a real coffre server on loopback (port 0) with mTLS, and
//! clients holding the dev PKI's certificates.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use coffre::cli::{DevOptions, RunningServer, start_dev};
use coffre::grpc::pb::data_key_service_client::DataKeyServiceClient;
use coffre::grpc::pb::key_service_client::KeyServiceClient;
use coffre::service::KmsOptions;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

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

    pub async fn data(&self) -> DataKeyServiceClient<Channel> {
        DataKeyServiceClient::new(self.channel("service").await)
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
        options: KmsOptions::default(),
        scheduler_interval: None,
        crl: None,
        crl_reload_interval: Duration::from_secs(10),
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

/// A context map from pairs.
pub fn ctx(pairs: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The path of a binary built by this workspace (coffre or hsm-sim), next to
/// the test executable's directory (target/<profile>/).
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build it first (`cargo test` at the workspace root builds every member; \
         or `cargo build -p {name}`)",
        path.display()
    );
    path
}
