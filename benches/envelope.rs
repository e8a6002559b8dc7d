//! Micro-benchmarks of the data-key path's pieces, each beside a raw ring
//! AES-256-GCM seal of 32 bytes measured in the same run (the floor).
//!
//! `cargo bench --bench envelope` (results in BENCHMARKS.md).

use std::hint::black_box;

use coffre::audit::{AuditEntry, AuditLog, CheckpointSigner, Outcome};
use coffre::crypto::{self, Rng};
use coffre::envelope;
use coffre::model::{EncryptionContext, KeyId};
use coffre::secret::CmkMaterial;
use criterion::{Criterion, criterion_group, criterion_main};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

fn context() -> EncryptionContext {
    EncryptionContext::new(
        [
            ("tenant", "acme"),
            ("table", "orders"),
            ("column", "card_number"),
            ("region", "eu-west-paris"),
            ("purpose", "storage"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string())),
    )
    .unwrap_or_default()
}

fn benches(c: &mut Criterion) {
    let Some(cmk) = CmkMaterial::from_slice(&[7u8; 32]) else {
        return;
    };
    let rng = Rng::default();
    let id = KeyId::new_random();
    let ctx = context();
    let digest = crypto::context_digest(&ctx);
    let data_key = [9u8; 32];
    let Ok(blob) = crypto::seal(&rng, &cmk, id, 1, &digest, &data_key) else {
        return;
    };

    let Ok(unbound) = UnboundKey::new(&AES_256_GCM, &[5u8; 32]) else {
        return;
    };
    let ring_key = LessSafeKey::new(unbound);
    c.bench_function("raw ring AES-256-GCM seal 32 B (floor)", |b| {
        b.iter(|| {
            let mut buf = data_key.to_vec();
            let _ = ring_key.seal_in_place_append_tag(
                Nonce::assume_unique_for_key([1u8; 12]),
                Aad::from(&[0u8; 100][..]),
                &mut buf,
            );
            black_box(buf)
        })
    });
    c.bench_function("wrap 32 B (HKDF + AES-256-GCM seal)", |b| {
        b.iter(|| black_box(crypto::seal(&rng, &cmk, id, 1, &digest, &data_key)))
    });
    c.bench_function("unwrap 32 B (parse + HKDF + AES-256-GCM open)", |b| {
        b.iter(|| {
            let parsed = envelope::parse(black_box(&blob));
            black_box(parsed.map(|p| crypto::open(&cmk, &p, &digest).is_ok()))
        })
    });
    c.bench_function("blob parse", |b| {
        b.iter(|| black_box(envelope::parse(black_box(&blob)).is_ok()))
    });
    c.bench_function("context canonicalization + SHA-256 (5 entries)", |b| {
        b.iter(|| black_box(crypto::context_digest(black_box(&ctx))))
    });

    let dir = std::env::temp_dir().join(format!("coffre-bench-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    if let (Ok((signer, _)), true) = (CheckpointSigner::generate(), dir.is_dir()) {
        if let Ok(mut log) = AuditLog::open(&dir.join("audit.log"), signer) {
            let entry = || AuditEntry {
                key_name: None,
                request_id: "0b5c1e8e-4a57-4c1c-9d0a-2f3c4b5a6d7e".into(),
                principal: "spiffe://coffre.dev/service".into(),
                role: Some("service".into()),
                operation: "GenerateDataKey".into(),
                key_id: Some(id.to_string()),
                key_version: Some(1),
                context_digest: Some("ab".repeat(32)),
                justification: Some("CUSTOMER_INITIATED_ACCESS".into()),
                context: None,
                detail: None,
                outcome: Outcome::Allowed,
                status_code: "OK".into(),
                items: None,
            };
            c.bench_function("audit append, 1 record per write (write mode)", |b| {
                b.iter(|| black_box(log.append(entry())))
            });
            // What the writer thread does under load: many records, one write.
            c.bench_function("audit append, 64 records per write, per batch", |b| {
                b.iter(|| black_box(log.append_batch((0..64).map(|_| entry()).collect())))
            });
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(envelope_benches, benches);
criterion_main!(envelope_benches);
