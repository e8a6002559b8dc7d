//! gRPC clients of a server reached by its endpoint (a `coffre dev` or
//! `coffre serve` process, or a [`TestServer`](super::TestServer)), and the
//! set-up most tests start with: a key, then a data key under it.

use std::path::Path;

use coffre::grpc::pb::{
    self, data_key_service_client::DataKeyServiceClient, key_service_client::KeyServiceClient,
};
use tonic::transport::Channel;

use super::{REASON, channel_as, ctx};

/// The operator's key client and the service's data-key client, over the
/// dev PKI's certificates.
#[derive(Clone, Debug)]
pub struct Clients {
    /// As `operator`: creates and manages keys.
    pub keys: KeyServiceClient<Channel>,
    /// As `service`: data keys, Encrypt, Decrypt.
    pub data: DataKeyServiceClient<Channel>,
}

impl Clients {
    /// Connects to `endpoint` with the certificates in `pki`.
    pub async fn connect(endpoint: &str, pki: &Path) -> Self {
        Self {
            keys: KeyServiceClient::new(channel_as(endpoint, pki, "operator").await),
            data: DataKeyServiceClient::new(channel_as(endpoint, pki, "service").await),
        }
    }

    /// Creates a software key named `alias` (no alias if empty) under the
    /// default policy; its metadata.
    pub async fn create_key(&mut self, alias: &str) -> Result<pb::KeyMetadata, tonic::Status> {
        let created = self
            .keys
            .create_key(pb::CreateKeyRequest {
                alias: alias.to_string(),
                ..Default::default()
            })
            .await?
            .into_inner();
        Ok(created.key.unwrap())
    }

    /// A 32-byte data key under `key` (an id or alias), bound to `context`,
    /// for [`REASON`].
    pub async fn generate_data_key(
        &mut self,
        key: &str,
        context: &[(&str, &str)],
    ) -> Result<pb::GenerateDataKeyResponse, tonic::Status> {
        let generated = self
            .data
            .generate_data_key(generate_request(key, context))
            .await?;
        Ok(generated.into_inner())
    }

    /// Creates the key `alias` (none if empty), then a 32-byte data key under
    /// its id bound to `context`: the key's metadata and the data key.
    pub async fn key_with_data_key(
        &mut self,
        alias: &str,
        context: &[(&str, &str)],
    ) -> Result<(pb::KeyMetadata, pb::GenerateDataKeyResponse), tonic::Status> {
        let key = self.create_key(alias).await?;
        let data_key = self.generate_data_key(&key.key_id, context).await?;
        Ok((key, data_key))
    }
}

/// GenerateDataKey for 32 bytes under `key`, bound to `context`, for
/// [`REASON`].
pub fn generate_request(key: &str, context: &[(&str, &str)]) -> pb::GenerateDataKeyRequest {
    pb::GenerateDataKeyRequest {
        key_id: key.to_string(),
        encryption_context: ctx(context),
        justification: REASON,
        number_of_bytes: 32,
    }
}

/// Creates keys `flaky-0` … `flaky-59` while the HSM fails now and then:
/// each is created or refused with UNAVAILABLE naming the HSM, and both
/// happen. The created aliases, sorted.
pub async fn create_keys_through_errors(keys: &mut KeyServiceClient<Channel>) -> Vec<String> {
    let mut created = Vec::new();
    let mut failed = 0;
    for i in 0..60 {
        let alias = format!("flaky-{i}");
        match keys
            .create_key(pb::CreateKeyRequest {
                alias: alias.clone(),
                ..Default::default()
            })
            .await
        {
            Ok(_) => created.push(alias),
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
                assert!(e.message().contains("HSM"), "{}", e.message());
                failed += 1;
            }
        }
    }
    // P(no failure in 60) = 0.81^60 ≈ 3e-6 with two HSM calls per key.
    assert!(failed > 0 && !created.is_empty(), "{failed} failed");
    created.sort();
    created
}

/// The `flaky-` keys the server lists are exactly `created`.
pub async fn assert_exactly_these_exist(keys: &mut KeyServiceClient<Channel>, created: &[String]) {
    let mut listed: Vec<String> = keys
        .list_keys(pb::ListKeysRequest {
            page_size: 1000,
            alias_prefix: "flaky-".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .keys
        .into_iter()
        .map(|k| k.alias)
        .collect();
    listed.sort();
    assert_eq!(listed, created, "exactly the acknowledged keys exist");
}
