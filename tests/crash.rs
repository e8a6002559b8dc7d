//! The crash harness: `coffre dev` (the real binary, its own process) is
//! SIGKILLed at a random moment of a mixed load — key creation, rotation,
//! disable and enable, data keys generated and decrypted, an audit record for
//! each — then restarted on the same data directory and checked against
//! everything it acknowledged before the kill:
//!
//! - every acknowledged key exists, with every acknowledged version;
//! - every acknowledged disable (and enable) still holds, and a disabled key
//!   refuses new data keys;
//! - every acknowledged data key still decrypts to its plaintext;
//! - the audit log exports and verifies (hash chain and signed checkpoints):
//!   after every restart in a run of up to 20 cycles, 20 times spread over
//!   a longer one, and after the last kill.
//!
//! An operation in flight at the kill may or may not have happened; the
//! check accepts either outcome for it, and nothing else.
//!
//! `COFFRE_CRASH_CYCLES` sets the number of kill-and-restart cycles (20 by
//! default, the CI run); `COFFRE_CRASH_SEED` replays a run (each run prints
//! its seed). The long form is documented in README.md.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coffre::grpc::pb::{
    self, data_key_service_client::DataKeyServiceClient, key_service_client::KeyServiceClient,
};
use tonic::transport::Channel;

use crate::common::binary::{export_and_verify, start_dev};
use crate::common::{REASON, channel_as};

/// Keys of each kind the model keeps checking (older ones are let go once
/// they have survived a restart), so that a long run's checks stay bounded.
const MAX_KEYS: usize = 24;
/// Data keys the model keeps checking, likewise.
const MAX_BLOBS: usize = 4_000;
/// Pause of each load task between two acknowledged operations.
const PACE: Duration = Duration::from_millis(3);

/// SplitMix64: a reproducible schedule from one seed (not for secrets).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A key that rotates and wraps data keys, never disabled.
struct DataKey {
    id: String,
    /// The primary version acknowledged last.
    version: u32,
    /// A rotation was sent and not answered.
    rotating: bool,
    /// Checked after at least one restart.
    survived: bool,
}

/// A key that is disabled and enabled.
struct ToggleKey {
    id: String,
    enabled: bool,
    /// A disable (`Some(false)`) or enable (`Some(true)`) sent, not answered.
    pending: Option<bool>,
    survived: bool,
}

struct Blob {
    blob: Vec<u8>,
    plaintext: Vec<u8>,
    context: BTreeMap<String, String>,
    survived: bool,
}

#[derive(Default)]
struct Model {
    data_keys: Vec<DataKey>,
    toggles: Vec<ToggleKey>,
    blobs: Vec<Blob>,
    /// What the load saw go wrong before the kill (a real failure).
    failures: Vec<String>,
    acknowledged: u64,
}

impl Model {
    /// Lets go of the oldest keys and blobs that survived a restart.
    fn trim(&mut self) {
        fn keep<T>(items: &mut Vec<T>, max: usize, survived: impl Fn(&T) -> bool) {
            while items.len() > max {
                match items.iter().position(&survived) {
                    Some(i) => {
                        items.remove(i);
                    }
                    None => break,
                }
            }
        }
        keep(&mut self.data_keys, MAX_KEYS, |k| k.survived && !k.rotating);
        keep(&mut self.toggles, MAX_KEYS, |k| {
            k.survived && k.pending.is_none()
        });
        keep(&mut self.blobs, MAX_BLOBS, |b| b.survived);
    }
}

type Shared = Arc<Mutex<Model>>;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, got {v:?}"))
    })
}

#[test]
fn sigkill_under_mixed_load_loses_nothing_acknowledged() {
    let cycles = env_u64("COFFRE_CRASH_CYCLES").unwrap_or(20);
    let seed = env_u64("COFFRE_CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    eprintln!("crash harness: {cycles} cycles, COFFRE_CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let model: Shared = Arc::default();
    let audit_every = (cycles / 20).max(1);
    let started = Instant::now();
    for cycle in 0..cycles {
        let (mut guard, endpoint) = start_dev(&data);
        let pki = data.join("pki");
        runtime.block_on(check_after_restart(&endpoint, &pki, &model, cycle));
        // Exporting and verifying the whole log every cycle would make a
        // long run quadratic: 20 times over the run, and after the last kill.
        if cycle % audit_every == 0 {
            export_and_verify(&data, &endpoint);
        }

        // Load, then SIGKILL at a random moment of it.
        let killed = Arc::new(AtomicBool::new(false));
        let kill_after = Duration::from_millis(20 + rng.next() % 600);
        let load_seed = rng.next();
        runtime.block_on(async {
            let tasks = start_load(&endpoint, &pki, &model, &killed, cycle, load_seed).await;
            tokio::time::sleep(kill_after).await;
            killed.store(true, Ordering::SeqCst);
            guard.0.kill().unwrap(); // SIGKILL
            guard.0.wait().unwrap();
            for task in tasks {
                tokio::time::timeout(Duration::from_secs(30), task)
                    .await
                    .expect("a load task did not stop after the kill")
                    .unwrap();
            }
        });
        let m = model.lock().unwrap();
        assert!(
            m.failures.is_empty(),
            "cycle {cycle} (COFFRE_CRASH_SEED={seed}): {:?}",
            m.failures
        );
        eprintln!(
            "cycle {cycle}: killed after {kill_after:?}; {} acknowledged so far; \
             checking {} data keys, {} toggled keys, {} blobs",
            m.acknowledged,
            m.data_keys.len(),
            m.toggles.len(),
            m.blobs.len()
        );
    }
    // The last kill is checked too.
    let (_guard, endpoint) = start_dev(&data);
    runtime.block_on(check_after_restart(
        &endpoint,
        &data.join("pki"),
        &model,
        cycles,
    ));
    export_and_verify(&data, &endpoint);
    let m = model.lock().unwrap();
    assert!(
        m.acknowledged > cycles,
        "the load made too little progress to test anything: {} acknowledged",
        m.acknowledged
    );
    eprintln!(
        "crash harness: {cycles} cycles, {} acknowledged operations, all found after restarts, in {:.0?}",
        m.acknowledged,
        started.elapsed()
    );
}

/// Starts the load tasks; each runs until its first failed RPC.
async fn start_load(
    endpoint: &str,
    pki: &Path,
    model: &Shared,
    killed: &Arc<AtomicBool>,
    cycle: u64,
    seed: u64,
) -> Vec<tokio::task::JoinHandle<()>> {
    let operator = channel_as(endpoint, pki, "operator").await;
    let service = channel_as(endpoint, pki, "service").await;
    let mut tasks = Vec::new();
    let kinds: [(Kind, &Channel); 6] = [
        (Kind::Create, &operator),
        (Kind::Rotate, &operator),
        (Kind::Toggle, &operator),
        (Kind::Generate, &service),
        (Kind::Generate, &service),
        (Kind::Decrypt, &service),
    ];
    for (i, (kind, channel)) in kinds.into_iter().enumerate() {
        let load = Load {
            kind,
            channel: channel.clone(),
            model: Arc::clone(model),
            killed: Arc::clone(killed),
            cycle,
            rng: Rng(seed ^ (i as u64).wrapping_mul(0x5851_f42d_4c95_7f2d)),
        };
        tasks.push(tokio::spawn(load.run()));
    }
    tasks
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Create,
    Rotate,
    Toggle,
    Generate,
    Decrypt,
}

struct Load {
    kind: Kind,
    channel: Channel,
    model: Shared,
    killed: Arc<AtomicBool>,
    cycle: u64,
    rng: Rng,
}

impl Load {
    async fn run(mut self) {
        let mut keys = KeyServiceClient::new(self.channel.clone());
        let mut data = DataKeyServiceClient::new(self.channel.clone());
        for n in 0u64.. {
            let outcome = match self.kind {
                Kind::Create => self.create(&mut keys, n).await,
                Kind::Rotate => self.rotate(&mut keys).await,
                Kind::Toggle => self.toggle(&mut keys).await,
                Kind::Generate => self.generate(&mut data, n).await,
                Kind::Decrypt => self.decrypt(&mut data).await,
            };
            match outcome {
                Ok(true) => {
                    self.model.lock().unwrap().acknowledged += 1;
                    // Paced, so that a long run's audit log (which every
                    // start verifies whole) grows by hundreds of records a
                    // cycle, not thousands.
                    tokio::time::sleep(PACE).await;
                }
                // Nothing to work on yet (no request was made, so no error
                // will tell this task that the server is gone: ask).
                Ok(false) => {
                    if self.killed.load(Ordering::SeqCst) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(status) => {
                    if !self.killed.load(Ordering::SeqCst) {
                        self.model.lock().unwrap().failures.push(format!(
                            "{:?} failed before the kill: {status:?}",
                            self.kind
                        ));
                    }
                    return;
                }
            }
        }
    }

    async fn create(
        &mut self,
        keys: &mut KeyServiceClient<Channel>,
        n: u64,
    ) -> Result<bool, tonic::Status> {
        let key = keys
            .create_key(pb::CreateKeyRequest {
                description: format!("crash harness, cycle {}", self.cycle),
                // Every other data-key key is held by the (simulated) HSM:
                // its versions are key objects made before the store write.
                protection_level: if n % 4 == 2 {
                    pb::ProtectionLevel::Hsm as i32
                } else {
                    pb::ProtectionLevel::Software as i32
                },
                ..Default::default()
            })
            .await?
            .into_inner()
            .key
            .unwrap();
        let mut m = self.model.lock().unwrap();
        if n % 2 == 0 {
            m.data_keys.push(DataKey {
                id: key.key_id,
                version: key.primary_version,
                rotating: false,
                survived: false,
            });
        } else {
            m.toggles.push(ToggleKey {
                id: key.key_id,
                enabled: true,
                pending: None,
                survived: false,
            });
        }
        Ok(true)
    }

    async fn rotate(
        &mut self,
        keys: &mut KeyServiceClient<Channel>,
    ) -> Result<bool, tonic::Status> {
        let id = {
            let mut m = self.model.lock().unwrap();
            if m.data_keys.is_empty() {
                return Ok(false);
            }
            let i = self.rng.below(m.data_keys.len());
            m.data_keys[i].rotating = true;
            m.data_keys[i].id.clone()
        };
        let key = keys
            .rotate_key(pb::RotateKeyRequest { key_id: id.clone() })
            .await?
            .into_inner()
            .key
            .unwrap();
        let mut m = self.model.lock().unwrap();
        let k = m.data_keys.iter_mut().find(|k| k.id == id).unwrap();
        k.version = key.primary_version;
        k.rotating = false;
        Ok(true)
    }

    async fn toggle(
        &mut self,
        keys: &mut KeyServiceClient<Channel>,
    ) -> Result<bool, tonic::Status> {
        let (id, enable) = {
            let mut m = self.model.lock().unwrap();
            if m.toggles.is_empty() {
                return Ok(false);
            }
            let i = self.rng.below(m.toggles.len());
            let k = &mut m.toggles[i];
            k.pending = Some(!k.enabled);
            (k.id.clone(), !k.enabled)
        };
        let key = if enable {
            keys.enable_key(pb::EnableKeyRequest { key_id: id.clone() })
                .await?
                .into_inner()
                .key
        } else {
            keys.disable_key(pb::DisableKeyRequest { key_id: id.clone() })
                .await?
                .into_inner()
                .key
        };
        let expected = if enable {
            pb::KeyState::Enabled
        } else {
            pb::KeyState::Disabled
        };
        let mut m = self.model.lock().unwrap();
        if key.unwrap().state != expected as i32 {
            m.failures
                .push(format!("{id}: answered a state other than {expected:?}"));
        }
        let k = m.toggles.iter_mut().find(|k| k.id == id).unwrap();
        k.enabled = enable;
        k.pending = None;
        Ok(true)
    }

    async fn generate(
        &mut self,
        data: &mut DataKeyServiceClient<Channel>,
        n: u64,
    ) -> Result<bool, tonic::Status> {
        let id = {
            let m = self.model.lock().unwrap();
            if m.data_keys.is_empty() {
                return Ok(false);
            }
            m.data_keys[self.rng.below(m.data_keys.len())].id.clone()
        };
        let context = BTreeMap::from([
            ("cycle".to_string(), self.cycle.to_string()),
            ("n".to_string(), n.to_string()),
        ]);
        let out = data
            .generate_data_key(pb::GenerateDataKeyRequest {
                key_id: id,
                encryption_context: context.clone(),
                justification: REASON,
                number_of_bytes: 32,
            })
            .await?
            .into_inner();
        self.model.lock().unwrap().blobs.push(Blob {
            blob: out.ciphertext_blob,
            plaintext: out.plaintext,
            context,
            survived: false,
        });
        Ok(true)
    }

    async fn decrypt(
        &mut self,
        data: &mut DataKeyServiceClient<Channel>,
    ) -> Result<bool, tonic::Status> {
        let (blob, context, plaintext) = {
            let m = self.model.lock().unwrap();
            if m.blobs.is_empty() {
                return Ok(false);
            }
            let b = &m.blobs[self.rng.below(m.blobs.len())];
            (b.blob.clone(), b.context.clone(), b.plaintext.clone())
        };
        let out = data
            .decrypt(pb::DecryptRequest {
                ciphertext_blob: blob,
                encryption_context: context,
                justification: REASON,
                key_id: String::new(),
            })
            .await?
            .into_inner();
        if out.plaintext != plaintext {
            self.model
                .lock()
                .unwrap()
                .failures
                .push("Decrypt returned another plaintext".to_string());
        }
        Ok(true)
    }
}

/// Everything acknowledged before the last kill, checked against the
/// restarted server; outcomes of operations in flight at the kill are
/// settled from what the server now says.
async fn check_after_restart(endpoint: &str, pki: &Path, model: &Shared, cycle: u64) {
    let mut keys = KeyServiceClient::new(channel_as(endpoint, pki, "operator").await);
    let mut data = DataKeyServiceClient::new(channel_as(endpoint, pki, "service").await);
    let (data_keys, toggles): (Vec<_>, Vec<_>) = {
        let m = model.lock().unwrap();
        (
            m.data_keys
                .iter()
                .map(|k| (k.id.clone(), k.version, k.rotating))
                .collect(),
            m.toggles
                .iter()
                .map(|k| (k.id.clone(), k.enabled, k.pending))
                .collect(),
        )
    };
    let mut versions = HashMap::new();
    for (id, acknowledged, rotating) in data_keys {
        let got = keys
            .get_key(pb::GetKeyRequest { key_id: id.clone() })
            .await
            .unwrap_or_else(|s| panic!("cycle {cycle}: acknowledged key {id} is gone: {s:?}"))
            .into_inner();
        let key = got.key.unwrap();
        let primary = key.primary_version;
        let allowed = if rotating {
            acknowledged..=acknowledged + 1
        } else {
            acknowledged..=acknowledged
        };
        assert!(
            allowed.contains(&primary),
            "cycle {cycle}: key {id} has primary version {primary}, acknowledged {acknowledged} \
             (a rotation in flight: {rotating})"
        );
        let stored: Vec<u32> = got.versions.iter().map(|v| v.version).collect();
        assert_eq!(
            stored,
            (1..=primary).collect::<Vec<_>>(),
            "cycle {cycle}: versions of key {id}"
        );
        assert_eq!(
            key.state,
            pb::KeyState::Enabled as i32,
            "cycle {cycle}: {id}"
        );
        versions.insert(id, primary);
    }
    let mut states = HashMap::new();
    for (id, enabled, pending) in toggles {
        let key = keys
            .get_key(pb::GetKeyRequest { key_id: id.clone() })
            .await
            .unwrap_or_else(|s| panic!("cycle {cycle}: acknowledged key {id} is gone: {s:?}"))
            .into_inner()
            .key
            .unwrap();
        let now_enabled = if key.state == pb::KeyState::Enabled as i32 {
            true
        } else {
            assert_eq!(
                key.state,
                pb::KeyState::Disabled as i32,
                "cycle {cycle}: key {id}"
            );
            false
        };
        assert!(
            now_enabled == enabled || pending == Some(now_enabled),
            "cycle {cycle}: key {id} is {} but {} was acknowledged (in flight: {pending:?})",
            if now_enabled { "enabled" } else { "disabled" },
            if enabled { "enabled" } else { "disabled" },
        );
        // A disabled key refuses new data keys: the disable is in force, not
        // only recorded.
        let generated = data
            .generate_data_key(pb::GenerateDataKeyRequest {
                key_id: id.clone(),
                encryption_context: BTreeMap::new(),
                justification: REASON,
                number_of_bytes: 32,
            })
            .await;
        match (now_enabled, generated) {
            (true, Ok(_)) => {}
            (false, Err(s)) if s.code() == tonic::Code::FailedPrecondition => {}
            (enabled, other) => panic!(
                "cycle {cycle}: GenerateDataKey under key {id} (enabled: {enabled}): {other:?}"
            ),
        }
        states.insert(id, now_enabled);
    }

    // Every acknowledged data key, in batches of 1,000.
    let items: Vec<(pb::BatchDecryptItem, Vec<u8>)> = {
        let m = model.lock().unwrap();
        m.blobs
            .iter()
            .map(|b| {
                (
                    pb::BatchDecryptItem {
                        ciphertext_blob: b.blob.clone(),
                        encryption_context: b.context.clone(),
                        key_id: String::new(),
                    },
                    b.plaintext.clone(),
                )
            })
            .collect()
    };
    for chunk in items.chunks(1000) {
        let results = data
            .batch_decrypt(pb::BatchDecryptRequest {
                items: chunk.iter().map(|(item, _)| item.clone()).collect(),
                justification: REASON,
            })
            .await
            .unwrap_or_else(|s| panic!("cycle {cycle}: BatchDecrypt: {s:?}"))
            .into_inner()
            .results;
        assert_eq!(results.len(), chunk.len());
        for (result, (_, plaintext)) in results.iter().zip(chunk) {
            assert!(
                result.error.is_none() && &result.plaintext == plaintext,
                "cycle {cycle}: an acknowledged data key no longer decrypts to its plaintext: {:?}",
                result.error
            );
        }
    }

    let mut m = model.lock().unwrap();
    for k in &mut m.data_keys {
        if let Some(v) = versions.get(&k.id) {
            k.version = *v;
            k.rotating = false;
            k.survived = true;
        }
    }
    for k in &mut m.toggles {
        if let Some(enabled) = states.get(&k.id) {
            k.enabled = *enabled;
            k.pending = None;
            k.survived = true;
        }
    }
    for b in m.blobs.iter_mut().take(items.len()) {
        b.survived = true;
    }
    m.trim();
}
