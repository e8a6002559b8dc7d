//! `coffre hsm ...`: `info` and `rotate-root` go through a running server;
//! `init-root-key`, `check` and `conformance` open the PKCS#11 HSM a server
//! configuration names, directly (at installation, before any server runs).

use std::io::Write;
use std::sync::Arc;

use anyhow::{Context, bail};
use serde_json::json;
use tonic::transport::Channel;

use super::client::{connect, rpc_error};
use super::output::{self, print_json};
use super::{ConnectArgs, HsmCommand, LocalHsmArgs, TokenCommand};
use crate::config::Config;
use crate::grpc::pb;
use crate::grpc::pb::hsm_service_client::HsmServiceClient;
use crate::hsm::pkcs11::Pkcs11Hsm;
use crate::hsm::{Hsm, conformance};
use crate::server::production::open_pkcs11;

pub async fn run(cmd: HsmCommand) -> anyhow::Result<()> {
    match cmd {
        HsmCommand::Info { connect } => info(&connect).await,
        HsmCommand::RotateRoot { connect } => rotate_root(&connect).await,
        HsmCommand::Token(TokenCommand::InitRootKey { local }) => init_root_key(&local).await,
        HsmCommand::Token(TokenCommand::Check { local }) => check(&local).await,
        HsmCommand::Token(TokenCommand::Conformance { local }) => conformance(&local).await,
    }
}

/// The HSM service, as the operator unless `--as` names another identity.
async fn client(c: &ConnectArgs) -> anyhow::Result<HsmServiceClient<Channel>> {
    Ok(HsmServiceClient::new(connect(c, "operator").await?))
}

async fn info(c: &ConnectArgs) -> anyhow::Result<()> {
    let info = client(c)
        .await?
        .get_hsm_info(pb::GetHsmInfoRequest {})
        .await
        .map_err(rpc_error)?
        .into_inner();
    output::hsm_info(&info, c.json)
}

async fn rotate_root(c: &ConnectArgs) -> anyhow::Result<()> {
    let mut stream = client(c)
        .await?
        .rotate_root_key(pb::RotateRootKeyRequest {})
        .await
        .map_err(rpc_error)?
        .into_inner();
    let mut bar = output::Progress::new(!c.json);
    let mut last = None;
    while let Some(p) = stream.message().await.map_err(rpc_error)? {
        if !p.pending_approval_id.is_empty() {
            return super::approval::print_pending(&p.pending_approval_id, c).await;
        }
        bar.update(&p);
        if c.json {
            output::progress_json(&p)?;
        }
        last = Some(p);
    }
    bar.finish();
    let last = last.context("the server sent no progress")?;
    if !last.done {
        bail!(
            "the rotation stopped before the end ({} re-wrapped, {} remaining); run it again to resume",
            last.rewrapped,
            last.remaining
        );
    }
    if !c.json {
        println!(
            "root key {} is current; {} versions re-wrapped; destroyed old root keys {:?}{}",
            last.new_root_key_id,
            last.rewrapped,
            last.destroyed_root_key_ids,
            if last.resumed {
                " (resumed an interrupted rotation)"
            } else {
                ""
            }
        );
    }
    Ok(())
}

async fn open(local: &LocalHsmArgs) -> anyhow::Result<Pkcs11Hsm> {
    let config = Config::load(&local.config)?;
    open_pkcs11(&config.hsm).await
}

async fn init_root_key(local: &LocalHsmArgs) -> anyhow::Result<()> {
    let hsm = open(local).await?;
    let id = hsm.init_root_key().await?;
    let report = hsm.report().await?;
    if local.json {
        return print_json(&json!({ "root_key_id": id, "token": report }));
    }
    println!(
        "created root key {id} ({}{id}) on token {:?}, slot {}",
        crate::hsm::pkcs11::ROOT_LABEL_PREFIX,
        report.token_label,
        report.slot
    );
    Ok(())
}

async fn check(local: &LocalHsmArgs) -> anyhow::Result<()> {
    let config = Config::load(&local.config)?;
    let hsm = open_pkcs11(&config.hsm).await?;
    let root = hsm.require_root_key()?;
    // The audit signing key, when the configuration keeps it in the token:
    // its attributes and a probe signature (made by `coffre serve` at its
    // first start, so absent before).
    let audit_key = if config.audit.checkpoint_key == crate::config::CheckpointKey::Hsm {
        let token = hsm.clone();
        let signer = tokio::task::spawn_blocking(move || token.audit_signer(false))
            .await
            .context("the audit signing key task failed")?;
        match signer {
            Ok(s) => Some(hex::encode(crate::audit::ExternalSigner::public_key(&s))),
            Err(crate::hsm::HsmError::Setup(m)) if m.contains("holds no audit signing key") => {
                Some("none yet (coffre serve makes it at its first start)".to_string())
            }
            Err(e) => return Err(e).context("checking the audit signing key"),
        }
    } else {
        None
    };
    // A round trip under the current root key: the path every CMK takes.
    hsm.self_test().await?;
    let report = hsm.report().await?;
    if local.json {
        return print_json(&json!({
            "ok": true,
            "token": report,
            "root_key_attributes": "checked",
            "round_trip": "ok",
            "key_objects": hsm.supports_key_objects(),
            "audit_signing_key": audit_key,
        }));
    }
    println!("module            {}", report.module);
    println!("library           {}", report.library);
    println!(
        "token             {:?} (slot {}, model {:?}, serial {:?})",
        report.token_label, report.slot, report.token_model, report.token_serial
    );
    println!(
        "root keys         {:?} (current {root})",
        report.root_key_ids
    );
    println!("attributes        every root key as SECURITY.md requires");
    if report.unrestricted_root_key_ids.is_empty() {
        println!("mechanisms        every root key restricted to CKM_AES_GCM");
    } else {
        println!(
            "mechanisms        root keys {:?} allow every mechanism (made before coffre set \
             CKA_ALLOWED_MECHANISMS): `coffre hsm rotate-root` replaces them",
            report.unrestricted_root_key_ids
        );
    }
    println!("round trip        wrap + unwrap under root key {root}: ok");
    println!(
        "protection HSM    {}",
        if hsm.supports_key_objects() {
            "available (CKM_AES_CBC_ENCRYPT_DATA)"
        } else {
            "not offered by this token"
        }
    );
    if let Some(k) = audit_key {
        println!("audit signing key {k}");
    }
    Ok(())
}

/// The PKCS#11-only check `coffre hsm conformance` adds to the suite.
pub const RELOGIN_CHECK: &str =
    "PKCS#11: after the token logs coffre out, the next calls log in again by themselves";

async fn relogin(token: &Pkcs11Hsm, hsm: &dyn Hsm) -> Result<(), conformance::Failure> {
    let fail = |detail: String| conformance::Failure {
        check: RELOGIN_CHECK,
        detail,
    };
    let aad = b"coffre/conformance/relogin";
    let wrapped = hsm
        .wrap(&[3u8; 32], aad)
        .await
        .map_err(|e| fail(e.to_string()))?;
    token
        .log_out()
        .await
        .map_err(|e| fail(format!("logging out: {e}")))?;
    // The readiness probe's call first: a logged-out session sees no root
    // key, which must not pass for a tamper response.
    let info = hsm
        .info()
        .await
        .map_err(|e| fail(format!("info after the logout: {e}")))?;
    if info.root_key_ids.is_empty() {
        return Err(fail("info after the logout lists no root key".into()));
    }
    token
        .log_out()
        .await
        .map_err(|e| fail(format!("logging out: {e}")))?;
    let back = hsm
        .unwrap(&wrapped.blob, aad)
        .await
        .map_err(|e| fail(format!("unwrap after the logout: {e}")))?;
    if back.expose() != [3u8; 32] {
        return Err(fail("unwrapped other bytes after the logout".into()));
    }
    token
        .log_out()
        .await
        .map_err(|e| fail(format!("logging out: {e}")))?;
    hsm.wrap(&[4u8; 32], aad)
        .await
        .map_err(|e| fail(format!("wrap after the logout: {e}")))?;
    Ok(())
}

async fn conformance(local: &LocalHsmArgs) -> anyhow::Result<()> {
    let hsm = open(local).await?;
    let report = hsm.report().await?;
    if let Some(id) = report.current_root_key_id {
        bail!(
            "the token {:?} already holds root key {id}: the conformance suite rotates and \
             destroys root keys, so it runs only on a token without one (a test token)",
            report.token_label
        );
    }
    hsm.init_root_key()
        .await
        .context("creating the suite's first root key")?;
    let token = hsm.clone();
    let hsm: Arc<dyn Hsm> = Arc::new(hsm);
    let json = local.json;
    let mut passed = Vec::new();
    let mut last: Option<&str> = None;
    let result = conformance::run(Arc::clone(&hsm), |check| {
        if let Some(done) = last.take() {
            passed.push(done.to_string());
        }
        if !json {
            let mut err = std::io::stderr();
            let _ = writeln!(err, "  checking: {check}");
        }
        last = conformance::CHECKS.iter().copied().find(|c| *c == check);
    })
    .await;
    if result.is_ok() {
        if let Some(done) = last.take() {
            passed.push(done.to_string());
        }
    }
    // PKCS#11 only: coffre's sessions logged out behind its back.
    let result = match result {
        Ok(()) => {
            if !json {
                let _ = writeln!(std::io::stderr(), "  checking: {RELOGIN_CHECK}");
            }
            relogin(&token, hsm.as_ref())
                .await
                .map(|()| passed.push(RELOGIN_CHECK.to_string()))
        }
        failed => failed,
    };
    match result {
        Ok(()) => {
            if json {
                return print_json(
                    &json!({ "ok": true, "token": report.token_label, "passed": passed }),
                );
            }
            println!(
                "conformance: {} of {} checks passed on token {:?}",
                passed.len(),
                conformance::CHECKS.len(),
                report.token_label
            );
            Ok(())
        }
        Err(failure) => {
            if json {
                print_json(&json!({
                    "ok": false,
                    "token": report.token_label,
                    "passed": passed,
                    "failed": { "check": failure.check, "detail": failure.detail },
                }))?;
            }
            bail!("conformance failed: {failure}")
        }
    }
}
