//! What operators see: the Prometheus page, JSON logs whose request ids
//! are the audit records', and `coffre bench` against the real binary.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use coffre::grpc::pb;
use serde_json::Value;

use crate::common::binary::{COFFRE, Guard, dev_command, free_port, run, spawn_dev};
use crate::common::{REASON, TestServer, ctx};

/// GET `path` over plain HTTP/1.1; (status line, body).
pub(crate) fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// The value of the sample `name{labels}` (exact label text), if present.
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_caches_hsm_and_audit() {
    let mut server = TestServer::start().await;
    let (key, generated) = server
        .clients()
        .await
        .key_with_data_key("metrics/demo", &[("tenant", "acme")])
        .await
        .unwrap();
    // A fresh process: the key's material is no longer cached.
    server.restart().await;
    let addr = server.server.as_ref().unwrap().metrics_addr.unwrap();
    let mut data = server.data().await;
    for _ in 0..3 {
        data.decrypt(pb::DecryptRequest {
            ciphertext_blob: generated.ciphertext_blob.clone(),
            encryption_context: ctx(&[("tenant", "acme")]),
            justification: REASON,
            key_id: String::new(),
        })
        .await
        .unwrap();
    }
    for _ in 0..2 {
        data.decrypt(pb::DecryptRequest {
            ciphertext_blob: b"junk".to_vec(),
            justification: REASON,
            ..Default::default()
        })
        .await
        .unwrap_err();
    }

    let (status, page) = http_get(addr, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let get = |series: &str| sample(&page, series).unwrap_or_else(|| panic!("{series}:\n{page}"));
    assert_eq!(
        get("coffre_requests_total{rpc=\"Decrypt\",code=\"OK\"}"),
        3.0
    );
    assert_eq!(
        get("coffre_requests_total{rpc=\"Decrypt\",code=\"INVALID_ARGUMENT\"}"),
        2.0
    );
    assert_eq!(
        get("coffre_request_duration_seconds_count{rpc=\"Decrypt\"}"),
        5.0
    );
    assert_eq!(
        get("coffre_request_duration_seconds_bucket{rpc=\"Decrypt\",le=\"+Inf\"}"),
        5.0
    );
    // The first use of the version unwrapped it in the HSM; the next ones hit
    // the cache.
    assert!(get("coffre_hsm_requests_total{call=\"unwrap\"}") >= 1.0);
    assert_eq!(get("coffre_hsm_errors_total{call=\"unwrap\"}"), 0.0);
    assert!(get("coffre_cache_hits_total{cache=\"material\"}") >= 2.0);
    assert!(get("coffre_cache_misses_total{cache=\"material\"}") >= 1.0);
    assert_eq!(get("coffre_audit_backlog"), 0.0);
    assert_eq!(get("coffre_audit_healthy"), 1.0);
    // Every request left a record: 1 + 1 before the restart, 5 after.
    assert!(get("coffre_audit_records_total") >= 7.0);
    // At least one write since this start, and never more than one per
    // record and checkpoint.
    let writes = get("coffre_audit_writes_total");
    assert!(writes >= 1.0, "{writes} audit writes");
    assert!(
        writes <= get("coffre_audit_records_total") + 2.0,
        "{writes} audit writes"
    );
    // Labels come from fixed sets: no key id, alias, principal or context.
    for secretish in [
        key.key_id.as_str(),
        "metrics/demo",
        "spiffe://",
        "acme",
        &hex::encode(&generated.plaintext),
    ] {
        assert!(!page.contains(secretish), "{secretish} on the page");
    }

    let (status, _) = http_get(addr, "/other");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    server.stop().await;
}

/// `coffre dev --log-json --metrics-listen …` as its own process, loaded by
/// `coffre bench`: the bench reports no error, the metrics page counts what
/// it sent, and the debug log carries each request's audit request id.
#[test]
fn bench_logs_and_metrics_with_the_real_binaries() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let log_path = dir.path().join("server.log");
    let data_dir = dir.path().join("data");
    let (guard, endpoint) = start_dev_logging(&data_dir, &log_path, metrics);

    let bench = Command::new(COFFRE)
        .args([
            "bench",
            "--ops",
            "null,generate,decrypt,batch-generate,batch-decrypt",
            "--duration",
            "1s",
            "--warmup",
            "200ms",
            "--concurrency",
            "4",
            "--connections",
            "2",
            "--batch-size",
            "10",
            "--blobs",
            "50",
            "--json",
            "--endpoint",
            &endpoint,
            "--data-dir",
        ])
        .arg(&data_dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&bench.stdout);
    assert!(
        bench.status.success(),
        "coffre bench failed: {}",
        String::from_utf8_lossy(&bench.stderr)
    );
    let rows: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ops: Vec<&str> = rows.iter().map(|r| r["op"].as_str().unwrap()).collect();
    assert_eq!(
        ops,
        [
            "null",
            "generate",
            "decrypt",
            "batch-generate",
            "batch-decrypt"
        ]
    );
    for r in &rows {
        assert_eq!(r["errors"], 0, "{r}");
        assert!(r["requests"].as_u64().unwrap() > 0, "{r}");
        assert!(r["ops_per_sec"].as_f64().unwrap() > 0.0, "{r}");
        let (p50, p99) = (r["p50_ms"].as_f64().unwrap(), r["p99_ms"].as_f64().unwrap());
        assert!(0.0 < p50 && p50 <= p99, "{r}");
    }
    let batch = &rows[3];
    assert_eq!(batch["batch_size"], 10);
    let per_key = batch["items_per_sec"].as_f64().unwrap() / batch["ops_per_sec"].as_f64().unwrap();
    assert!((per_key - 10.0).abs() < 1e-6, "{batch}");

    // The page counts at least the measured decrypts (warm-up ones too).
    let (_, page) = http_get(metrics, "/metrics");
    let decrypts = sample(&page, "coffre_requests_total{rpc=\"Decrypt\",code=\"OK\"}").unwrap();
    assert!(decrypts >= rows[2]["requests"].as_f64().unwrap(), "{page}");

    // A record's request id is on the log line of its request.
    let (ok, events, stderr) = run(
        &data_dir,
        &endpoint,
        &[
            "audit",
            "events",
            "--operation",
            "BatchDecrypt",
            "--limit",
            "1",
            "--json",
        ],
    );
    assert!(ok, "{stderr}");
    let events: Value = serde_json::from_str(&events).unwrap();
    let request_id = events["events"][0]["request_id"]
        .as_str()
        .unwrap()
        .to_string();
    drop(guard);
    let log = std::fs::read_to_string(&log_path).unwrap();
    let line = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["span"]["request_id"] == request_id.as_str())
        .unwrap_or_else(|| panic!("no log line for request {request_id}"));
    assert_eq!(line["span"]["rpc"], "BatchDecrypt", "{line}");
    assert_eq!(line["fields"]["code"], "OK", "{line}");
}

/// `coffre dev` with JSON debug logs to `log` and metrics on `metrics`.
fn start_dev_logging(data_dir: &Path, log: &Path, metrics: SocketAddr) -> (Guard, String) {
    let mut cmd = dev_command(data_dir);
    cmd.args(["--log-json", "--metrics-listen", &metrics.to_string()])
        .env("RUST_LOG", "coffre=debug")
        .stderr(std::fs::File::create(log).unwrap());
    spawn_dev(cmd)
}
