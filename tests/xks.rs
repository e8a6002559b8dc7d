//! Issue #18: the AWS XKS proxy API front, driven by an independent client
//! (`tests/xks/conformance.py`, signing with botocore's SigV4Auth) over
//! HTTPS, against a server with keys of every usage, a disabled key, an
//! HSM-level key, a context rule on the AWS account, two credentials at
//! once and a rate-limited one; then the audit log is read back: one record
//! per request, with the request metadata in it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use coffre::authz::{Caller, Role, StaticRoles};
use coffre::model::{ContextRule, DataKeyOperation, Grant, KeyPolicy, KeyRef, ProtectionLevel};
use coffre::pki::dev_principal;
use coffre::server::DataDir;
use coffre::service::{CreateKeyInput, RateLimit};
use coffre::xks::{Credential, XksSetup, XksTls};
use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::common::{self, needs};

const PRIMARY: (&str, &str) = (
    "AAAAAAAAAAAAAAAAAAAAAAAA",
    "c2VjcmV0LWFjY2Vzcy1rZXktb2YtdGhlLXByaW1hcnktY3JlZGVudGlhbA",
);
const SECOND: (&str, &str) = (
    "BBBBBBBBBBBBBBBBBBBBBBB2",
    "c2Vjb25kLXNlY3JldC1hY2Nlc3Mta2V5LWZvci10aGUtcm90YXRpb24tdGVzdA",
);
const ROTATED_OUT: (&str, &str) = (
    "CCCCCCCCCCCCCCCCCCCCCCC3",
    "dGhpcy1jcmVkZW50aWFsLXdhcy1yZW1vdmVkLWZyb20tdGhlLWNvbmZpZ3VyYXRpb24",
);
const THROTTLED: (&str, &str) = (
    "DDDDDDDDDDDDDDDDDDDDDDD4",
    "YSByYXRlLWxpbWl0ZWQtcHJpbmNpcGFsJ3Mtc2VjcmV0LWFjY2Vzcy1rZXk",
);

fn credential(pair: (&str, &str), principal: &str) -> Credential {
    Credential {
        access_key_id: pair.0.to_string(),
        secret_access_key: Zeroizing::new(pair.1.to_string()),
        principal: principal.to_string(),
    }
}

fn grant(principal: &str, ops: &[DataKeyOperation]) -> Grant {
    Grant {
        principal: principal.to_string(),
        operations: ops.iter().copied().collect(),
    }
}

/// The python with botocore (`COFFRE_XKS_PYTHON`, else `python3`).
fn python() -> String {
    std::env::var("COFFRE_XKS_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(coffre_has_botocore),
    ignore = "not run: needs Python with botocore (COFFRE_XKS_PYTHON; .ci/run installs it)"
)]
async fn an_independent_sigv4_client_gets_every_answer_the_api_specifies() {
    common::require(&needs::BOTOCORE);
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::new(dir.path());
    coffre::server::dev::ensure_dev_dir(&data).unwrap();
    let aws = dev_principal("aws-kms");
    let throttled = dev_principal("aws-kms-throttled");
    let operator = dev_principal("operator");
    let roles = StaticRoles::new([
        (operator.clone(), Role::Operator),
        (aws.clone(), Role::Service),
        (throttled.clone(), Role::Service),
    ]);
    let mut options = coffre::server::dev::dev_kms_options();
    options.rate_limits.principals.insert(
        throttled.clone(),
        RateLimit {
            per_second: 0.2,
            burst: 2.0,
        },
    );
    let paths = data.pki();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let setup = XksSetup {
        listener,
        tls: XksTls {
            cert_pem: std::fs::read(paths.server_cert()).unwrap(),
            key_pem: Zeroizing::new(std::fs::read(paths.server_key()).unwrap()),
            client_ca_pem: None,
            client_cn: None,
        },
        uri_prefix: "/tenant-a".to_string(),
        credentials: vec![
            credential(PRIMARY, &aws),
            credential(SECOND, &aws),
            credential(THROTTLED, &throttled),
        ],
        deadline: coffre::xks::DEFAULT_DEADLINE,
    };
    let server = coffre::server::dev::builder(
        &data,
        roles,
        options,
        &Default::default(),
        None,
        Duration::from_secs(10),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap()
    .xks(setup)
    .start()
    .await
    .unwrap();

    let op = Caller::new(operator.clone());
    let both = [DataKeyOperation::Encrypt, DataKeyOperation::Decrypt];
    let mut keys = BTreeMap::new();
    let mut ids = BTreeMap::new();
    for (name, grants, level, rule) in [
        (
            "both",
            vec![grant(&aws, &both)],
            ProtectionLevel::Software,
            false,
        ),
        (
            "encrypt_only",
            vec![grant(&aws, &[DataKeyOperation::Encrypt])],
            ProtectionLevel::Software,
            false,
        ),
        (
            "decrypt_only",
            vec![grant(&aws, &[DataKeyOperation::Decrypt])],
            ProtectionLevel::Software,
            false,
        ),
        (
            "no_usage",
            vec![grant(&aws, &[DataKeyOperation::GenerateDataKey])],
            ProtectionLevel::Software,
            false,
        ),
        (
            "disabled",
            vec![grant(&aws, &both)],
            ProtectionLevel::Software,
            false,
        ),
        (
            "invisible",
            vec![grant(&dev_principal("service"), &both)],
            ProtectionLevel::Software,
            false,
        ),
        ("hsm", vec![grant(&aws, &both)], ProtectionLevel::Hsm, false),
        (
            "account_rule",
            vec![grant(&aws, &both)],
            ProtectionLevel::Software,
            true,
        ),
    ] {
        let mut policy = KeyPolicy {
            grants,
            ..KeyPolicy::default()
        };
        if rule {
            policy.required_context.insert(
                "aws:PrincipalAccount".to_string(),
                ContextRule {
                    values: BTreeSet::from(["111122223333".to_string()]),
                    equals_caller_attribute: None,
                },
            );
        }
        let view = server
            .kms
            .create_key(
                &op,
                CreateKeyInput {
                    alias: Some(format!("xks-{}", name.replace('_', "-"))),
                    description: String::new(),
                    protection_level: Some(level),
                    labels: BTreeMap::new(),
                    rotation_period: None,
                    policy: Some(policy),
                },
            )
            .await
            .unwrap();
        ids.insert(name, view.key.id.to_string());
        // By alias for most, by id for the HSM key: both name a key.
        let external = if name == "hsm" {
            view.key.id.to_string()
        } else {
            format!("xks-{}", name.replace('_', "-"))
        };
        keys.insert(name, external);
    }
    server
        .kms
        .disable_key(&op, &KeyRef::Alias("xks-disabled".to_string()))
        .await
        .unwrap();

    let setup_file = dir.path().join("xks-setup.json");
    let report_file = dir.path().join("xks-report.json");
    std::fs::write(
        &setup_file,
        serde_json::to_vec(&json!({
            "endpoint": format!("https://localhost:{port}"),
            "uri_prefix": "/tenant-a",
            "region": "eu-west-3",
            "ca": paths.ca_cert(),
            "credentials": {
                "primary": [PRIMARY.0, PRIMARY.1],
                "second": [SECOND.0, SECOND.1],
                "rotated_out": [ROTATED_OUT.0, ROTATED_OUT.1],
                "wrong_secret": [PRIMARY.0, SECOND.1],
                "throttled": [THROTTLED.0, THROTTLED.1],
            },
            "keys": keys,
        }))
        .unwrap(),
    )
    .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/xks/conformance.py");
    let out = tokio::process::Command::new(python())
        .arg(&script)
        .arg(&setup_file)
        .arg(&report_file)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the XKS client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Vec<Value> = serde_json::from_slice(&std::fs::read(&report_file).unwrap()).unwrap();
    assert!(report.len() > 60, "{} requests only", report.len());

    // One record per request on an API path, before its answer: each
    // authenticated request's kmsRequestId in exactly one record; each
    // unauthenticated one a record of its own; paths that are no API none.
    let log = std::fs::read_to_string(data.audit_log()).unwrap();
    let records: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &Value| {
            r["operation"]
                .as_str()
                .is_some_and(|o| o.starts_with("Xks"))
        })
        .collect();
    let mut by_request: HashMap<&str, Vec<&Value>> = HashMap::new();
    for r in &records {
        if let Some(id) = r["context"]["kms:RequestId"].as_str() {
            by_request.entry(id).or_default().push(r);
        }
    }
    let recorded: Vec<&Value> = report.iter().filter(|r| r["record"] == true).collect();
    let unauthenticated = recorded.iter().filter(|r| r["status"] == 401).count();
    // A body without requestMetadata gives the record no request id.
    let anonymous = recorded
        .iter()
        .filter(|r| r["status"] != 401 && r["request_id"].is_null())
        .count();
    let mut expected = anonymous;
    for r in &recorded {
        if r["status"] == 401 || r["throttled"] == true || r["request_id"].is_null() {
            continue;
        }
        expected += 1;
        let id = r["request_id"].as_str().unwrap();
        let found = by_request.get(id).map_or(0, Vec::len);
        assert_eq!(found, 1, "request {id} ({}) has {found} records", r["path"]);
    }
    let not_throttled = records
        .iter()
        .filter(|r| r["principal"] != throttled.as_str())
        .count();
    assert_eq!(not_throttled, expected + unauthenticated);
    assert_eq!(
        records
            .iter()
            .filter(|r| r["status_code"] == "UNAUTHENTICATED")
            .count(),
        unauthenticated
    );
    // Throttled: the first refusal is a record, the others are counted.
    assert!(
        records
            .iter()
            .any(|r| r["principal"] == throttled.as_str()
                && r["status_code"] == "RESOURCE_EXHAUSTED")
    );

    // What the operator reads: the first encrypt names the key, its
    // version, the AWS principal, the KMS key, the service, AWS's request id.
    let encrypt = records
        .iter()
        .find(|r| r["operation"] == "XksEncrypt" && r["context"]["kms:ViaService"] == "ebs")
        .unwrap();
    assert_eq!(encrypt["key_id"], ids["both"].as_str());
    assert_eq!(encrypt["key_name"], "xks-both");
    assert_eq!(encrypt["key_version"], 1);
    assert_eq!(encrypt["principal"], aws.as_str());
    assert_eq!(encrypt["outcome"], "allowed");
    assert_eq!(encrypt["justification"], "CUSTOMER_INITIATED_ACCESS");
    assert_eq!(
        encrypt["context"]["aws:PrincipalArn"],
        "arn:aws:iam::123456789012:user/Alice"
    );
    assert_eq!(encrypt["context"]["aws:PrincipalAccount"], "123456789012");
    assert!(
        encrypt["context"]["kms:KeyArn"]
            .as_str()
            .unwrap()
            .starts_with("arn:aws:kms:eu-west-3:123456789012:key/")
    );
    assert_eq!(encrypt["context"]["kms:Operation"], "Encrypt");
    // Nothing of the plaintext or the AAD in the log.
    for secret in ["SGVsbG8gV29ybGQh", "Hello World", "project=nile"] {
        assert!(!log.contains(secret), "{secret} in the audit log");
    }
    server.stop().await.unwrap();
}

/// `coffre dev --xks-listen` (the library path the CLI runs): DIR/xks.json
/// as DESIGN.md fixes it, private, the same credential after a restart,
/// and a health check through it.
#[tokio::test(flavor = "multi_thread")]
#[cfg_attr(
    not(coffre_has_botocore),
    ignore = "not run: needs Python with botocore (COFFRE_XKS_PYTHON; .ci/run installs it)"
)]
async fn coffre_dev_describes_its_xks_front_in_xks_json() {
    use std::os::unix::fs::PermissionsExt;
    common::require(&needs::BOTOCORE);
    let dir = tempfile::tempdir().unwrap();
    let mut opts = common::dev_options(dir.path());
    opts.xks_listen = Some("127.0.0.1:0".parse().unwrap());
    let server = coffre::server::dev::start(&opts).await.unwrap();
    let path = dir.path().join("xks.json");
    let first: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let port = server.xks_addr.unwrap().port();
    assert_eq!(first["endpoint"], format!("https://localhost:{port}"));
    assert_eq!(first["principal"], dev_principal("aws-kms"));
    assert_eq!(
        first["ca"],
        dir.path().join("pki/ca.pem").display().to_string()
    );
    for field in ["uri_prefix", "access_key_id", "secret_access_key", "region"] {
        assert!(first[field].is_string(), "{field}: {first}");
    }
    let health = format!(
        r#"
import json, ssl, http.client, sys, uuid
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
j = json.load(open(sys.argv[1]))
url = j["endpoint"] + j["uri_prefix"] + "/kms/xks/v1/health"
body = json.dumps({{"requestMetadata": {{"kmsRequestId": str(uuid.uuid4()), "kmsOperation": "CreateCustomKeyStore"}}}})
r = AWSRequest(method="POST", url=url, data=body, headers={{"Content-Type": "application/json"}})
SigV4Auth(Credentials(j["access_key_id"], j["secret_access_key"]), "kms-xks-proxy", j["region"]).add_auth(r)
c = http.client.HTTPSConnection("localhost", {port}, context=ssl.create_default_context(cafile=j["ca"]))
c.request("POST", url.split(str({port}), 1)[1], body=body, headers=dict(r.headers.items()))
resp = c.getresponse()
print(resp.status, resp.read().decode())
"#
    );
    let out = tokio::process::Command::new(python())
        .arg("-c")
        .arg(&health)
        .arg(&path)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("200 ") && stdout.contains("\"healthStatus\":\"ACTIVE\""),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    server.stop().await.unwrap();
    let server = coffre::server::dev::start(&opts).await.unwrap();
    let second: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(first["access_key_id"], second["access_key_id"]);
    assert_eq!(first["secret_access_key"], second["secret_access_key"]);
    server.stop().await.unwrap();
}
