//! `coffre reencrypt`: a blob moved to the newest version of its key, or to
//! another key or context, over the `ReEncrypt` RPC (the plaintext never
//! leaves the server). `--batch` is in `lines.rs`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::json;

use super::args::ReencryptArgs;
use super::datakey::{client, context_map, is_stdout, read_blob, refused_blob_error, write_output};
use super::output::print_json;
use crate::grpc::pb;

/// `coffre reencrypt`.
pub async fn run(args: ReencryptArgs) -> anyhow::Result<()> {
    if let Some(batch) = &args.batch {
        return super::lines::reencrypt(&args, batch).await;
    }
    let blob = read_blob(args.blob.as_deref(), args.input.as_deref())?;
    let result = client(&args.connect)
        .await?
        .re_encrypt(pb::ReEncryptRequest {
            ciphertext_blob: blob.clone(),
            source_encryption_context: context_map(&args.data),
            destination_key_id: args.to.clone().unwrap_or_default(),
            destination_encryption_context: args.to_context.iter().cloned().collect(),
            justification: args.data.justification as i32,
            source_key_id: args.key.clone().unwrap_or_default(),
        })
        .await;
    let resp = match result {
        Ok(resp) => resp.into_inner(),
        Err(status) => {
            return Err(refused_blob_error(
                status,
                &blob,
                args.key.as_deref(),
                &args.data,
                &args.connect,
            )
            .await);
        }
    };
    if let Some(path) = &args.output {
        write_output(path, &resp.ciphertext_blob)?;
        if is_stdout(path) {
            return Ok(());
        }
    }
    let blob64 = args
        .output
        .is_none()
        .then(|| B64.encode(&resp.ciphertext_blob));
    if args.connect.json {
        return print_json(&json!({
            "ciphertext_blob": blob64,
            "key_id": resp.key_id,
            "key_version": resp.key_version,
            "source_key_id": resp.source_key_id,
            "source_key_version": resp.source_key_version,
        }));
    }
    println!("key id            {}", resp.key_id);
    println!("key version       {}", resp.key_version);
    println!(
        "from              key {} version {}",
        resp.source_key_id, resp.source_key_version
    );
    if let Some(b) = blob64 {
        println!("ciphertext_blob   {b}");
    }
    Ok(())
}
