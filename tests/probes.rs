//! Health for orchestrators (issue #16): plain-HTTP `/healthz` and
//! `/readyz` on the metrics listener, agreeing with `grpc.health.v1`; and
//! server reflection in both versions, v1alpha beside v1, over mTLS.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::common::binary::{free_port, start_dev_with};
use crate::common::{TestServer, try_channel};

/// One answer of the metrics listener.
#[derive(Debug)]
struct Answer {
    /// `HTTP/1.1 200 OK`.
    status: String,
    /// The header lines, lowercased.
    headers: Vec<String>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        let prefix = format!("{name}: ");
        self.headers
            .iter()
            .find_map(|h| h.strip_prefix(prefix.as_str()))
    }
}

/// `METHOD path` over plain HTTP/1.1.
fn http(addr: SocketAddr, method: &str, path: &str) -> Answer {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    Answer {
        status: lines.next().unwrap().to_string(),
        headers: lines.map(str::to_ascii_lowercase).collect(),
        body: body.to_string(),
    }
}

/// Polls `GET /readyz` until `done` holds (bounded: readiness is checked
/// every second); the answer that satisfied it.
fn readyz_until(addr: SocketAddr, what: &str, done: impl Fn(&Answer) -> bool) -> Answer {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = http(addr, "GET", "/readyz");
        if done(&answer) {
            return answer;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never became {what}: {answer:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn readyz_until_async(
    addr: SocketAddr,
    what: &'static str,
    done: impl Fn(&Answer) -> bool + Send + 'static,
) -> Answer {
    tokio::task::spawn_blocking(move || readyz_until(addr, what, done))
        .await
        .unwrap()
}

fn is_ok(a: &Answer) -> bool {
    a.status == "HTTP/1.1 200 OK" && a.body == "ok\n"
}

fn is_unavailable(a: &Answer) -> bool {
    a.status == "HTTP/1.1 503 Service Unavailable"
}

async fn health(client: &mut HealthClient<tonic::transport::Channel>) -> i32 {
    client
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

/// Polls `grpc.health.v1` until it says `want` (bounded).
async fn health_until(client: &mut HealthClient<tonic::transport::Channel>, want: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while health(client).await != want as i32 {
        assert!(Instant::now() < deadline, "health never became {want:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn metrics_addr(server: &TestServer) -> SocketAddr {
    server.server.as_ref().unwrap().metrics_addr.unwrap()
}

/// `coffre dev --metrics-listen ADDR` as its own process: `/healthz` and
/// `/readyz` answer `ok` without a certificate, HEAD gives the same status
/// and headers without a body, another method is 405 naming the allowed
/// ones, another path 404; the page says `coffre_ready 1`.
#[test]
fn the_probes_answer_on_the_metrics_listener_of_coffre_dev() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (_guard, _endpoint) = start_dev_with(
        &dir.path().join("data"),
        &["--metrics-listen", &metrics.to_string()],
    );

    let alive = http(metrics, "GET", "/healthz");
    assert!(is_ok(&alive), "{alive:?}");
    assert_eq!(alive.header("cache-control"), Some("no-store"));
    let ready = readyz_until(metrics, "200 ok", is_ok);
    assert_eq!(
        ready.header("content-type"),
        Some("text/plain; charset=utf-8")
    );

    for path in ["/healthz", "/readyz"] {
        let head = http(metrics, "HEAD", path);
        assert_eq!(head.status, "HTTP/1.1 200 OK", "HEAD {path}: {head:?}");
        assert_eq!(head.body, "", "HEAD {path} has no body");
        assert_eq!(head.header("content-length"), Some("3"), "{head:?}");
    }
    for method in ["POST", "PUT", "DELETE"] {
        let refused = http(metrics, method, "/readyz");
        assert_eq!(
            refused.status, "HTTP/1.1 405 Method Not Allowed",
            "{method}: {refused:?}"
        );
        assert_eq!(refused.header("allow"), Some("get, head"));
    }
    let unknown = http(metrics, "GET", "/ready");
    assert_eq!(unknown.status, "HTTP/1.1 404 Not Found", "{unknown:?}");
    assert!(unknown.body.contains("/readyz"), "{unknown:?}");

    let page = http(metrics, "GET", "/metrics");
    assert_eq!(page.status, "HTTP/1.1 200 OK");
    assert!(page.body.contains("\ncoffre_ready 1\n"), "{}", page.body);
}

/// An HSM outage: `/readyz` turns 503 naming the HSM (and nothing else:
/// no endpoint, no error text), `grpc.health.v1` says NOT_SERVING too,
/// `/healthz` stays 200; when the HSM returns both say ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_an_hsm_outage_and_its_end() {
    let server = TestServer::start().await;
    let addr = metrics_addr(&server);
    let mut health = HealthClient::new(server.channel("service").await);
    readyz_until_async(addr, "200 ok", is_ok).await;
    health_until(&mut health, ServingStatus::Serving).await;

    let sim = server.server.as_ref().unwrap().simulator.clone().unwrap();
    sim.set_faults(hsm_sim::Faults {
        outage: true,
        ..Default::default()
    })
    .unwrap();
    let down = readyz_until_async(addr, "503", is_unavailable).await;
    assert_eq!(
        down.body,
        "hsm: the HSM does not answer (outage, timeout or refused session); see the server log\n"
    );
    health_until(&mut health, ServingStatus::NotServing).await;
    let alive = tokio::task::spawn_blocking(move || http(addr, "GET", "/healthz"))
        .await
        .unwrap();
    assert!(is_ok(&alive), "liveness checks nothing: {alive:?}");

    sim.set_faults(hsm_sim::Faults::default()).unwrap();
    readyz_until_async(addr, "200 ok again", is_ok).await;
    health_until(&mut health, ServingStatus::Serving).await;
    server.stop().await;
}

/// Less free space on the audit log's volume than both `[limits]` floors:
/// `/readyz` is 503 with the numbers and what to do, without the data
/// directory's path, and `grpc.health.v1` agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_while_the_audit_volume_is_low() {
    let limits = coffre::grpc::ServerLimits {
        audit_min_free_bytes: u64::MAX,
        audit_min_free_percent: 100,
        ..Default::default()
    };
    let server = TestServer::start_with_limits(
        &[
            ("operator", coffre::authz::Role::Operator, &[]),
            ("service", coffre::authz::Role::Service, &[]),
        ],
        coffre::server::dev::dev_kms_options(),
        limits,
    )
    .await;
    let addr = metrics_addr(&server);
    // Until the first check has finished it says "starting", a 503 too.
    let low = readyz_until_async(addr, "503 audit-volume", |a| {
        is_unavailable(a) && !a.body.starts_with("starting: ")
    })
    .await;
    let lines: Vec<&str> = low.body.lines().collect();
    assert_eq!(lines.len(), 1, "{low:?}");
    assert!(
        lines[0].starts_with("audit-volume: ") && lines[0].contains("audit_min_free_bytes"),
        "{low:?}"
    );
    assert!(lines[0].contains(" free of "), "{low:?}");
    let dir = server.data_dir().to_string_lossy().into_owned();
    assert!(!low.body.contains(&dir), "no path in {low:?}");
    let mut health = HealthClient::new(server.channel("service").await);
    health_until(&mut health, ServingStatus::NotServing).await;
    server.stop().await;
}

/// `chattr +i` on the open audit log (needs root, like
/// `audit_log::fail_closed_while_the_log_cannot_be_written_then_recover`):
/// after the first refused request `/readyz` is 503 `audit-log: …`; once
/// the file is writable again the writer recovers and `/readyz` is 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(coffre_has_chattr),
    ignore = "not run: needs root for chattr +i (CAP_LINUX_IMMUTABLE) and chattr"
)]
async fn readyz_is_503_while_the_audit_log_cannot_be_written() {
    crate::common::require(&crate::common::needs::CHATTR);
    use coffre::grpc::pb;
    let server = TestServer::start().await;
    let addr = metrics_addr(&server);
    readyz_until_async(addr, "200 ok", is_ok).await;
    let log = server.data_dir().join("audit.log");
    chattr("+i", &log);
    let refused = server
        .keys()
        .await
        .create_key(pb::CreateKeyRequest::default())
        .await;
    let down = readyz_until_async(addr, "503", is_unavailable).await;
    chattr("-i", &log);
    assert_eq!(refused.unwrap_err().code(), tonic::Code::Unavailable);
    assert!(down.body.starts_with("audit-log: "), "{down:?}");
    assert!(down.body.contains("fail closed"), "{down:?}");
    // The writer retries every second; a request finds it writable again.
    let deadline = Instant::now() + Duration::from_secs(20);
    while server
        .keys()
        .await
        .create_key(pb::CreateKeyRequest::default())
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "the audit log never recovered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    readyz_until_async(addr, "200 ok again", is_ok).await;
    server.stop().await;
}

fn chattr(flag: &str, path: &std::path::Path) {
    let out = std::process::Command::new("chattr")
        .arg(flag)
        .arg(path)
        .output()
        .expect("chattr (e2fsprogs) is required by this test");
    assert!(
        out.status.success(),
        "chattr {flag} failed (needs root and ext4/xfs/btrfs): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `grpc.reflection.v1alpha.ServerReflection` (what grpcio-reflection's
/// Python client and older tools speak) lists coffre's services, health
/// and both reflection versions, and serves the file that defines
/// `coffre.v1.DataKeyService`; v1 lists v1alpha too. Both need a client
/// certificate, like every connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_v1alpha_serves_the_same_descriptors_as_v1() {
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1alpha::{ServerReflectionRequest, ServerReflectionResponse};

    let server = TestServer::start().await;
    let mut client = ServerReflectionClient::new(server.channel("operator").await);
    let ask = |m: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    };
    let answers: Vec<ServerReflectionResponse> = {
        let mut stream = client
            .server_reflection_info(tokio_stream::iter(vec![
                ask(MessageRequest::ListServices(String::new())),
                ask(MessageRequest::FileContainingSymbol(
                    "coffre.v1.DataKeyService".into(),
                )),
            ]))
            .await
            .unwrap()
            .into_inner();
        let mut answers = Vec::new();
        while let Some(a) = stream.message().await.unwrap() {
            answers.push(a);
        }
        answers
    };
    assert_eq!(answers.len(), 2, "{answers:?}");
    let Some(MessageResponse::ListServicesResponse(list)) = &answers[0].message_response else {
        panic!("unexpected answer: {:?}", answers[0]);
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for expected in [
        "coffre.v1.KeyService",
        "coffre.v1.DataKeyService",
        "coffre.v1.ApprovalService",
        "coffre.v1.AuditService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(names.contains(&expected), "{expected} in {names:?}");
    }
    let Some(MessageResponse::FileDescriptorResponse(files)) = &answers[1].message_response else {
        panic!("unexpected answer: {:?}", answers[1]);
    };
    let file: prost_types::FileDescriptorProto =
        prost::Message::decode(files.file_descriptor_proto[0].as_slice()).unwrap();
    assert_eq!(file.package.as_deref(), Some("coffre.v1"));
    assert!(
        file.service
            .iter()
            .any(|s| s.name.as_deref() == Some("DataKeyService")),
        "{:?}",
        file.name
    );

    // v1 lists v1alpha as well: the same descriptors.
    {
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient as V1;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest as M1;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse as R1;
        let mut v1 = V1::new(server.channel("service").await);
        let mut stream = v1
            .server_reflection_info(tokio_stream::iter(vec![
                tonic_reflection::pb::v1::ServerReflectionRequest {
                    host: String::new(),
                    message_request: Some(M1::ListServices(String::new())),
                },
            ]))
            .await
            .unwrap()
            .into_inner();
        let answer = stream.message().await.unwrap().unwrap();
        let Some(R1::ListServicesResponse(list)) = answer.message_response else {
            panic!("unexpected answer: {answer:?}");
        };
        let v1_names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        let mut v1_sorted = v1_names.clone();
        v1_sorted.sort_unstable();
        assert_eq!(sorted, v1_sorted);
    }

    // Without a client certificate, v1alpha is refused like everything else.
    let pki = server.data_dir().join("pki");
    let refused = match try_channel(&server.endpoint(), &pki.join("ca.pem"), None).await {
        Err(_) => true,
        Ok(channel) => ServerReflectionClient::new(channel)
            .server_reflection_info(tokio_stream::iter(vec![ask(MessageRequest::ListServices(
                String::new(),
            ))]))
            .await
            .is_err(),
    };
    assert!(refused, "v1alpha answered a client without a certificate");
    server.stop().await;
}
