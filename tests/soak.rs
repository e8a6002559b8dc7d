//! The soak's short form (the 10-minute one is in BENCHMARKS.md): `coffre
//! dev` as its own process under `coffre bench` at a steady rate, Decrypt
//! then GenerateDataKey, with no error and no growth of the server's
//! resident memory beyond noise between the end of the warm-up and the end.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::common::binary::{COFFRE, dev_command, spawn_dev};

/// Resident memory of `pid` in KiB (Linux: /proc/PID/status).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[cfg(target_os = "linux")]
#[test]
fn a_short_soak_has_no_error_and_flat_memory() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut cmd = dev_command(&data);
    cmd.env("RUST_LOG", "error").stderr(Stdio::inherit());
    let (guard, endpoint) = spawn_dev(cmd);
    let pid = guard.0.id();

    let bench = Command::new(COFFRE)
        .args([
            "bench",
            "--ops",
            "decrypt,generate",
            "--rate",
            "300",
            "--duration",
            "6s",
            "--warmup",
            "2s",
            "--concurrency",
            "8",
            "--connections",
            "2",
            "--keys",
            "20",
            "--blobs",
            "200",
            "--json",
            "--endpoint",
            &endpoint,
            "--data-dir",
        ])
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Sample after the key and blob set-up and the first warm-up.
    let mut samples = Vec::new();
    let child_id = bench.id();
    let sampler = std::thread::spawn(move || {
        let mut out = Vec::new();
        std::thread::sleep(Duration::from_secs(6));
        while std::path::Path::new(&format!("/proc/{child_id}")).exists() && out.len() < 20 {
            out.push(rss_kib(pid));
            std::thread::sleep(Duration::from_millis(500));
        }
        out
    });
    let out = bench.wait_with_output().unwrap();
    samples.extend(sampler.join().unwrap());
    samples.push(rss_kib(pid));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    for row in &rows {
        assert_eq!(row["errors"], 0, "{row}");
        assert!(row["requests"].as_u64().unwrap() >= 1000, "{row}");
    }
    assert!(samples.len() >= 5, "{samples:?}");
    let first = samples[0];
    let last = *samples.last().unwrap();
    eprintln!("soak: server RSS {first} KiB → {last} KiB over the run ({samples:?})");
    assert!(
        last <= first + 8 * 1024,
        "the server's memory grew from {first} KiB to {last} KiB: {samples:?}"
    );
    drop(guard);
}
