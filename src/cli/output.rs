//! Output: aligned tables for people, one JSON object for scripts.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Serialize;
use serde_json::json;

use crate::grpc::pb;
use crate::model::Timestamp;

#[derive(Debug, Serialize)]
pub struct KeyOut {
    pub key_id: String,
    pub alias: String,
    pub state: String,
    pub primary_version: u32,
    pub min_decryption_version: u32,
    pub protection_level: String,
    pub created: String,
    pub created_by: String,
    pub description: String,
    pub labels: std::collections::BTreeMap<String, String>,
}

fn time(t: Option<&prost_types::Timestamp>) -> String {
    t.map(|t| Timestamp(t.seconds.saturating_mul(1000)).to_rfc3339())
        .unwrap_or_default()
}

impl From<&pb::KeyMetadata> for KeyOut {
    fn from(k: &pb::KeyMetadata) -> Self {
        Self {
            key_id: k.key_id.clone(),
            alias: k.alias.clone(),
            state: k.state().as_str_name().to_string(),
            primary_version: k.primary_version,
            min_decryption_version: k.min_decryption_version,
            protection_level: k.protection_level().as_str_name().to_string(),
            created: time(k.create_time.as_ref()),
            created_by: k.created_by.clone(),
            description: k.description.clone(),
            labels: k.labels.clone().into_iter().collect(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct VersionOut {
    pub version: u32,
    pub created: String,
    pub hsm_root_key_id: u32,
}

impl From<&pb::KeyVersion> for VersionOut {
    fn from(v: &pb::KeyVersion) -> Self {
        Self {
            version: v.version,
            created: time(v.create_time.as_ref()),
            hsm_root_key_id: v.hsm_root_key_id,
        }
    }
}

fn print_json(value: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints rows as columns padded to their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

pub fn key(key: &KeyOut, versions: &[VersionOut], json: bool) -> anyhow::Result<()> {
    if json {
        let mut value = serde_json::to_value(key)?;
        if !versions.is_empty() {
            if let Some(obj) = value.as_object_mut() {
                obj.insert("versions".into(), serde_json::to_value(versions)?);
            }
        }
        return print_json(&value);
    }
    let alias = if key.alias.is_empty() {
        "-"
    } else {
        &key.alias
    };
    println!("key id            {}", key.key_id);
    println!("alias             {alias}");
    println!("state             {}", key.state);
    println!("primary version   {}", key.primary_version);
    println!("min. decryption   {}", key.min_decryption_version);
    println!("protection        {}", key.protection_level);
    println!("created           {} by {}", key.created, key.created_by);
    if !key.description.is_empty() {
        println!("description       {}", key.description);
    }
    for (k, v) in &key.labels {
        println!("label             {k}={v}");
    }
    if !versions.is_empty() {
        println!();
        let rows: Vec<Vec<String>> = versions
            .iter()
            .map(|v| {
                vec![
                    v.version.to_string(),
                    v.created.clone(),
                    v.hsm_root_key_id.to_string(),
                ]
            })
            .collect();
        table(&["VERSION", "CREATED", "HSM ROOT KEY"], &rows);
    }
    Ok(())
}

pub fn key_list(keys: &[KeyOut], next_page_token: &str, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(&json!({ "keys": keys, "next_page_token": next_page_token }));
    }
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            vec![
                k.key_id.clone(),
                if k.alias.is_empty() {
                    "-".into()
                } else {
                    k.alias.clone()
                },
                k.state.clone(),
                k.primary_version.to_string(),
                k.created.clone(),
            ]
        })
        .collect();
    table(&["KEY ID", "ALIAS", "STATE", "VERSION", "CREATED"], &rows);
    if !next_page_token.is_empty() {
        println!("\nmore keys: --page-token {next_page_token}   (or --all)");
    }
    Ok(())
}

pub fn data_key(
    plaintext: Option<&[u8]>,
    blob: &[u8],
    key_id: &str,
    key_version: u32,
    json: bool,
) -> anyhow::Result<()> {
    let blob64 = B64.encode(blob);
    let plain64 = plaintext.map(|p| zeroize::Zeroizing::new(B64.encode(p)));
    if json {
        let mut v = json!({
            "ciphertext_blob": blob64,
            "key_id": key_id,
            "key_version": key_version,
        });
        if let (Some(p), Some(obj)) = (&plain64, v.as_object_mut()) {
            obj.insert("plaintext".into(), json!(p.as_str()));
        }
        return print_json(&v);
    }
    println!("key id            {key_id}");
    println!("key version       {key_version}");
    if let Some(p) = &plain64 {
        println!("plaintext         {}", p.as_str());
    }
    println!("ciphertext_blob   {blob64}");
    Ok(())
}

pub fn ciphertext(
    blob: Option<&[u8]>,
    key_id: &str,
    key_version: u32,
    json: bool,
) -> anyhow::Result<()> {
    let blob64 = blob.map(|b| B64.encode(b));
    if json {
        return print_json(&json!({
            "ciphertext_blob": blob64,
            "key_id": key_id,
            "key_version": key_version,
        }));
    }
    println!("key id            {key_id}");
    println!("key version       {key_version}");
    if let Some(b) = blob64 {
        println!("ciphertext_blob   {b}");
    }
    Ok(())
}

pub fn plaintext(
    plain: Option<&[u8]>,
    key_id: &str,
    key_version: u32,
    json: bool,
) -> anyhow::Result<()> {
    let plain64 = plain.map(|p| zeroize::Zeroizing::new(B64.encode(p)));
    if json {
        return print_json(&json!({
            "plaintext": plain64.as_ref().map(|p| p.as_str()),
            "key_id": key_id,
            "key_version": key_version,
        }));
    }
    println!("key id            {key_id}");
    println!("key version       {key_version}");
    if let Some(p) = &plain64 {
        println!("plaintext         {}", p.as_str());
    }
    Ok(())
}
