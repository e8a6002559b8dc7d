//! Issue #19, the promise end to end, with the real binaries: `coffre dev`
//! and `examples/hosted-store` (an object store that seals every object
//! with `coffre-client`). A thousand customer records are stored; the
//! store's directory, dumped as a provider would hand it over, holds none
//! of them; the operator disables the key and reads fail within the
//! cache's bound; enabled again, they work; a read declared as a third
//! party's data request is refused; the auditor exports the log, verifies
//! it offline and finds the refusal.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::binary::{
    export_and_verify, run_json, spawn_ready, start_dev, workspace_binary,
};

/// The cache bound the store is started with.
const CACHE_MS: u64 = 500;

/// One HTTP/1.1 request on a connection of its own; (status, body).
fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).unwrap();
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let status: u16 = String::from_utf8_lossy(&answer[9..12]).parse().unwrap();
    (status, answer[split + 4..].to_vec())
}

fn record(i: usize) -> String {
    format!(
        "{{\"customer\": \"client-{i:05}\", \"name\": \"Marianne Dupont {i}\", \"iban\": \"FR76 3000 6000 0112 3456 {i:04} 189\", \"balance_eur\": {}}}",
        i * 37 % 100_000
    )
}

#[test]
fn a_provider_holds_only_ciphertext_and_the_operator_holds_the_switch() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("coffre");
    let (_dev, endpoint) = start_dev(&data);
    run_json(
        &data,
        &endpoint,
        &["key", "create", "--alias", "customer-records"],
    );
    let pki = data.join("pki");
    let storage = dir.path().join("provider-disk");
    let mut cmd = Command::new(workspace_binary("hosted-store"));
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--coffre",
        &endpoint,
        "--key",
        "customer-records",
    ])
    .arg("--storage")
    .arg(&storage)
    .arg("--ca")
    .arg(pki.join("ca.pem"))
    .arg("--cert")
    .arg(pki.join("service.pem"))
    .arg("--cert-key")
    .arg(pki.join("service-key.pem"))
    .args(["--cache-max-age-ms", &CACHE_MS.to_string()]);
    let (_store, url) = spawn_ready(cmd, "hosted-store listening on ");
    let addr = url.trim_start_matches("http://").to_string();

    // A thousand records stored, each sealed by the store.
    for i in 0..1000 {
        let (status, body) = http(
            &addr,
            "PUT",
            &format!("/objects/record-{i}"),
            &[],
            record(i).as_bytes(),
        );
        assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    }
    // The provider's disk, dumped byte for byte: no record, nor any 16
    // bytes of one, is in it.
    let mut dump = Vec::new();
    let mut files = 0;
    for entry in std::fs::read_dir(storage.join("objects")).unwrap() {
        dump.extend(std::fs::read(entry.unwrap().path()).unwrap());
        files += 1;
    }
    assert_eq!(files, 1000);
    let windows: HashSet<&[u8]> = dump.windows(16).collect();
    for i in 0..1000 {
        let r = record(i);
        for w in r.as_bytes().windows(16) {
            assert!(
                !windows.contains(w),
                "{:?} of record {i} is on the disk",
                String::from_utf8_lossy(w)
            );
        }
    }
    for i in (0..1000).step_by(7) {
        let (status, body) = http(&addr, "GET", &format!("/objects/record-{i}"), &[], b"");
        assert_eq!(status, 200);
        assert_eq!(body, record(i).as_bytes());
    }
    // A sealed object put under another name does not open there.
    std::fs::copy(
        storage.join("objects").join(hex::encode("record-1")),
        storage.join("objects").join(hex::encode("record-2")),
    )
    .unwrap();
    let (status, _) = http(&addr, "GET", "/objects/record-2", &[], b"");
    assert_eq!(status, 422, "a file moved to another object's name");

    // The operator's kill switch: reads stop within the cache's bound.
    run_json(&data, &endpoint, &["key", "disable", "customer-records"]);
    let disabled = Instant::now();
    let refused_after = loop {
        let (status, body) = http(&addr, "GET", "/objects/record-7", &[], b"");
        if status == 403 {
            assert!(
                String::from_utf8_lossy(&body).contains("DISABLED"),
                "{}",
                String::from_utf8_lossy(&body)
            );
            break disabled.elapsed();
        }
        assert_eq!(status, 200);
        assert!(
            disabled.elapsed() < Duration::from_secs(10),
            "still served 10 s after the disable"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // The bound is the cache's age; the slack is the machine's.
    assert!(
        refused_after < Duration::from_millis(CACHE_MS + 1500),
        "refused only {refused_after:?} after the disable (cache {CACHE_MS} ms)"
    );
    // Once coffre refused, nothing of that key is served from the cache.
    for i in [0, 14, 999] {
        let (status, _) = http(&addr, "GET", &format!("/objects/record-{i}"), &[], b"");
        assert_eq!(status, 403, "record {i}");
    }
    let (status, _) = http(&addr, "PUT", "/objects/new", &[], b"new");
    assert_eq!(status, 403);

    run_json(&data, &endpoint, &["key", "enable", "customer-records"]);
    let (status, body) = http(&addr, "GET", "/objects/record-14", &[], b"");
    assert_eq!((status, body), (200, record(14).into_bytes()));

    // A foreign authority's request, declared as such: refused by the
    // key's policy (the default refuses THIRD_PARTY_DATA_REQUEST).
    let (status, body) = http(
        &addr,
        "GET",
        "/objects/record-14",
        &[("X-Access-Justification", "third-party-data-request")],
        b"",
    );
    assert_eq!(status, 403);
    assert!(String::from_utf8_lossy(&body).contains("THIRD_PARTY_DATA_REQUEST"));

    // The auditor: the log exported, verified offline, the refusal in it.
    export_and_verify(&data, &endpoint);
    let log = std::fs::read_to_string(data.join("../export.log")).unwrap();
    let records: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r.get("operation").is_some())
        .collect();
    let third_party: Vec<&Value> = records
        .iter()
        .filter(|r| r["justification"] == "THIRD_PARTY_DATA_REQUEST")
        .collect();
    assert_eq!(third_party.len(), 1, "{third_party:?}");
    assert_eq!(third_party[0]["outcome"], "refused");
    assert_eq!(third_party[0]["operation"], "Decrypt");
    assert!(
        third_party[0]["principal"]
            .as_str()
            .unwrap()
            .ends_with("/service")
    );
    let refused_while_disabled = records
        .iter()
        .filter(|r| r["operation"] == "Decrypt" && r["status_code"] == "FAILED_PRECONDITION")
        .count();
    assert!(refused_while_disabled >= 1);
    // The cache saved coffre most calls: far fewer data-key requests than
    // the 1,000 objects stored and the reads made.
    let generated = records
        .iter()
        .filter(|r| r["operation"] == "GenerateDataKey")
        .count();
    assert!(
        generated < 100,
        "{generated} GenerateDataKey for 1,000 objects"
    );
    eprintln!(
        "hosted-store: the disable was obeyed {refused_after:?} after it (cache {CACHE_MS} ms); \
         {generated} GenerateDataKey for 1,000 objects"
    );
}
