//! The service's calls to the data-key service: `coffre datakey generate`,
//! `coffre encrypt` and `coffre decrypt`.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use super::client::{connect, read_input, rpc_error};
use super::output;
use super::{ConnectArgs, DataArgs, DatakeyCommand, DecryptArgs, EncryptArgs};
use crate::grpc::pb;
use crate::grpc::pb::data_key_service_client::DataKeyServiceClient;

/// `coffre datakey generate`: one data key, or `--count` of them in one
/// batch request.
pub async fn generate(cmd: DatakeyCommand) -> anyhow::Result<()> {
    let DatakeyCommand::Generate {
        key,
        bytes,
        without_plaintext,
        count,
        data,
        connect: c,
    } = cmd;
    let mut client = client(&c).await?;
    let encryption_context = context_map(&data);
    let justification = data.justification as i32;
    if let Some(count) = count {
        let resp = client
            .batch_generate_data_key(pb::BatchGenerateDataKeyRequest {
                key_id: key,
                encryption_context,
                justification,
                number_of_bytes: bytes,
                count,
                without_plaintext,
            })
            .await
            .map_err(rpc_error)?
            .into_inner();
        output::data_keys(resp, c.json)
    } else if without_plaintext {
        let resp = client
            .generate_data_key_without_plaintext(pb::GenerateDataKeyWithoutPlaintextRequest {
                key_id: key,
                encryption_context,
                justification,
                number_of_bytes: bytes,
            })
            .await
            .map_err(rpc_error)?
            .into_inner();
        output::data_key(
            None,
            &resp.ciphertext_blob,
            &resp.key_id,
            resp.key_version,
            c.json,
        )
    } else {
        let resp = client
            .generate_data_key(pb::GenerateDataKeyRequest {
                key_id: key,
                encryption_context,
                justification,
                number_of_bytes: bytes,
            })
            .await
            .map_err(rpc_error)?
            .into_inner();
        let plaintext = Zeroizing::new(resp.plaintext);
        output::data_key(
            Some(&plaintext),
            &resp.ciphertext_blob,
            &resp.key_id,
            resp.key_version,
            c.json,
        )
    }
}

/// The data-key service, as the service identity unless `--as` names
/// another.
async fn client(c: &ConnectArgs) -> anyhow::Result<DataKeyServiceClient<Channel>> {
    Ok(DataKeyServiceClient::new(connect(c, "service").await?))
}

fn context_map(data: &DataArgs) -> HashMap<String, String> {
    data.context.iter().cloned().collect()
}

/// Writes `bytes` to `path` (mode 0600), or to standard output when it is
/// `-`.
fn write_output(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    if path == Path::new("-") {
        let mut out = std::io::stdout().lock();
        out.write_all(bytes).context("writing standard output")?;
        return out.flush().context("writing standard output");
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
}

/// `coffre encrypt`: a small secret wrapped under a key.
pub async fn encrypt(args: EncryptArgs) -> anyhow::Result<()> {
    let plaintext = read_input(&args.input)?;
    let resp = client(&args.connect)
        .await?
        .encrypt(pb::EncryptRequest {
            key_id: args.key,
            plaintext: plaintext.to_vec(),
            encryption_context: context_map(&args.data),
            justification: args.data.justification as i32,
        })
        .await
        .map_err(rpc_error)?
        .into_inner();
    if let Some(path) = &args.output {
        write_output(path, &resp.ciphertext_blob)?;
    }
    output::ciphertext(
        args.output.is_none().then_some(&resp.ciphertext_blob[..]),
        &resp.key_id,
        resp.key_version,
        args.connect.json,
    )
}

/// `coffre decrypt`: a blob unwrapped.
pub async fn decrypt(args: DecryptArgs) -> anyhow::Result<()> {
    let blob = match (&args.blob, &args.input) {
        (Some(b64), _) => B64
            .decode(b64.trim())
            .context("--blob is not valid base64")?,
        (None, Some(path)) => read_input(path)?.to_vec(),
        (None, None) => bail!("give the blob with --blob or --in"),
    };
    let resp = client(&args.connect)
        .await?
        .decrypt(pb::DecryptRequest {
            ciphertext_blob: blob,
            encryption_context: context_map(&args.data),
            justification: args.data.justification as i32,
            key_id: args.key.unwrap_or_default(),
        })
        .await
        .map_err(rpc_error)?
        .into_inner();
    let plaintext = Zeroizing::new(resp.plaintext);
    if let Some(path) = &args.output {
        write_output(path, &plaintext)?;
        if path == Path::new("-") {
            return Ok(());
        }
    }
    output::plaintext(
        args.output.is_none().then_some(&plaintext[..]),
        &resp.key_id,
        resp.key_version,
        args.connect.json,
    )
}
