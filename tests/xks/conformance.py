#!/usr/bin/env python3
"""An independent XKS client: drives coffre's AWS XKS proxy API front with
requests signed by botocore's SigV4Auth (the signer of the AWS SDK for
Python), and checks every answer against the XKS proxy API specification.

Run by tests/xks.rs (cargo test), which starts coffre, creates the keys and
passes their ids:

    conformance.py SETUP.json REPORT.json

SETUP.json: {"endpoint", "uri_prefix", "region", "ca", "credentials":
{"primary": [akid, secret], "second": [...], "rotated_out": [...],
"throttled": [...]}, "keys": {"both": id, ...}}. REPORT.json gets one entry
per request sent to an API path, so that the Rust side can check that each
is exactly one audit record.
"""

import base64
import datetime
import hashlib
import http.client
import json
import ssl
import sys
import urllib.parse
import uuid

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

SERVICE = "kms-xks-proxy"
ALICE = "arn:aws:iam::123456789012:user/Alice"
BOB_OTHER_ACCOUNT = "arn:aws:iam::111122223333:role/Bob"

setup = json.load(open(sys.argv[1]))
report = []
failures = []
b64 = lambda b: base64.b64encode(b).decode()
unb64 = base64.b64decode


class StaleSigV4(SigV4Auth):
    """SigV4Auth at a chosen time (botocore's own steps, another clock)."""

    def __init__(self, credentials, service, region, when):
        super().__init__(credentials, service, region)
        self.when = when

    def add_auth(self, request):
        request.context["timestamp"] = self.when.strftime("%Y%m%dT%H%M%SZ")
        self._modify_request_before_signing(request)
        canonical = self.canonical_request(request)
        string_to_sign = self.string_to_sign(request, canonical)
        signature = self.signature(string_to_sign, request)
        self._inject_signature_to_request(request, signature)


def call(path, body, credential="primary", method="POST", prefix=None, sign=True,
         when=None, tamper_body=False, record=True, throttled=False):
    prefix = setup["uri_prefix"] if prefix is None else prefix
    url = setup["endpoint"] + prefix + "/kms/xks/v1/" + path
    data = json.dumps(body).encode() if body is not None else b""
    request = AWSRequest(method=method, url=url, data=data,
                         headers={"Content-Type": "application/json"})
    if sign:
        akid, secret = setup["credentials"][credential]
        creds = Credentials(akid, secret)
        signer = (SigV4Auth(creds, SERVICE, setup["region"]) if when is None
                  else StaleSigV4(creds, SERVICE, setup["region"], when))
        signer.add_auth(request)
    if tamper_body:
        data = data.replace(b"Alice", b"Alicf")
    parsed = urllib.parse.urlsplit(url)
    context = ssl.create_default_context(cafile=setup["ca"])
    conn = http.client.HTTPSConnection(parsed.hostname, parsed.port, context=context, timeout=10)
    headers = {k: v for k, v in request.headers.items()}
    conn.request(method, parsed.path, body=data if method == "POST" else None, headers=headers)
    response = conn.getresponse()
    text = response.read()
    conn.close()
    answer = json.loads(text) if text else {}
    request_id = (body or {}).get("requestMetadata", {}).get("kmsRequestId")
    report.append({"request_id": request_id, "status": response.status, "record": record,
                   "throttled": throttled, "path": path})
    return response.status, answer


def meta(operation="Encrypt", principal=ALICE, via=None):
    m = {"awsPrincipalArn": principal,
         "kmsKeyArn": "arn:aws:kms:eu-west-3:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
         "kmsOperation": operation, "kmsRequestId": str(uuid.uuid4())}
    if via:
        m["kmsViaService"] = via
    return m


def check(name, got, status, error=None):
    code, answer = got
    ok = code == status and (error is None or answer.get("errorName") == error)
    if error is not None and ok:
        message = answer.get("errorMessage", "")
        if not all(0x20 <= ord(c) <= 0x7E for c in message) or len(message) >= 512:
            ok = False
    if not ok:
        failures.append(f"{name}: expected {status} {error or ''}, got {code} {answer}")
    return answer


def encrypt(key, plaintext, aad=None, cdiv=False, **kw):
    body = {"requestMetadata": meta(kw.pop("operation", "Encrypt"), kw.pop("principal", ALICE),
                                    kw.pop("via", None)),
            "plaintext": b64(plaintext), "encryptionAlgorithm": "AES_GCM"}
    if aad is not None:
        body["additionalAuthenticatedData"] = b64(aad)
    if cdiv:
        body["ciphertextDataIntegrityValueAlgorithm"] = "SHA_256"
    return call(f"keys/{key}/encrypt", body, **kw)


def decrypt(key, sealed, aad=None, **kw):
    body = {"requestMetadata": meta(kw.pop("operation", "Decrypt"), kw.pop("principal", ALICE)),
            "encryptionAlgorithm": "AES_GCM"}
    body.update({k: v for k, v in sealed.items() if k in (
        "ciphertext", "ciphertextMetadata", "initializationVector", "authenticationTag")})
    if aad is not None:
        body["additionalAuthenticatedData"] = b64(aad)
    return call(f"keys/{key}/decrypt", body, **kw)


def flip(field_b64):
    raw = bytearray(unb64(field_b64))
    raw[0] ^= 1
    return b64(bytes(raw))


keys = setup["keys"]

# --- health ---
h = check("health", call("health", {"requestMetadata": {"kmsRequestId": str(uuid.uuid4()),
                                                        "kmsOperation": "KmsHealthCheck"}}), 200)
if not (h.get("xksProxyFleetSize", 0) > 0 and h.get("xksProxyVendor") and h.get("ekmVendor")
        and 1 <= len(h.get("ekmFleetDetails", [])) <= 10
        and h["ekmFleetDetails"][0].get("healthStatus") == "ACTIVE"):
    failures.append(f"health answer: {h}")
check("health without requestMetadata", call("health", {}), 400, "ValidationException")

# --- metadata: usage follows the grant ---
for name, usage, status in [("both", ["ENCRYPT", "DECRYPT"], "ENABLED"),
                            ("encrypt_only", ["ENCRYPT"], "ENABLED"),
                            ("decrypt_only", ["DECRYPT"], "ENABLED"),
                            ("no_usage", [], "ENABLED"),
                            ("disabled", ["ENCRYPT", "DECRYPT"], "DISABLED"),
                            ("hsm", ["ENCRYPT", "DECRYPT"], "ENABLED")]:
    m = check(f"metadata {name}", call(f"keys/{keys[name]}/metadata",
                                       {"requestMetadata": meta("DescribeKey")}), 200)
    if m != {"keySpec": "AES_256", "keyUsage": usage, "keyStatus": status}:
        failures.append(f"metadata {name}: {m}")
missing = check("metadata of a key that does not exist",
                call("keys/no-such-key/metadata", {"requestMetadata": meta("DescribeKey")}),
                404, "KeyNotFoundException")
hidden = check("metadata of a key without a grant",
               call(f"keys/{keys['invisible']}/metadata", {"requestMetadata": meta("CreateKey")}),
               404, "KeyNotFoundException")
if missing.get("errorMessage", "").replace("no-such-key", "K") != \
        hidden.get("errorMessage", "").replace(keys["invisible"], "K"):
    failures.append(f"the answers tell a hidden key from a missing one: {missing} / {hidden}")
check("encrypt under a key without a grant", encrypt(keys["invisible"], b"x"), 404,
      "KeyNotFoundException")

# --- encrypt and decrypt, the integrity value recomputed here ---
aad = b"project=nile,department=marketing"
sealed = check("encrypt", encrypt(keys["both"], b"Hello World!", aad, cdiv=True, via="ebs"), 200)
for field in ("ciphertext", "ciphertextMetadata", "initializationVector", "authenticationTag"):
    if field not in sealed:
        failures.append(f"encrypt answer lacks {field}: {sealed}")
if sealed.get("ciphertext"):
    if len(unb64(sealed["ciphertext"])) != 12 or len(unb64(sealed["authenticationTag"])) != 16 \
            or len(unb64(sealed["initializationVector"])) not in (12, 16) \
            or len(unb64(sealed["ciphertextMetadata"])) > 20:
        failures.append(f"encrypt field lengths: {sealed}")
    cdiv = hashlib.sha256(aad + unb64(sealed["ciphertextMetadata"]) + unb64(sealed["initializationVector"])
                          + unb64(sealed["ciphertext"]) + unb64(sealed["authenticationTag"])).digest()
    if sealed.get("ciphertextDataIntegrityValue") != b64(cdiv):
        failures.append("the ciphertextDataIntegrityValue is not SHA-256 over the fields")
    opened = check("decrypt", decrypt(keys["both"], sealed, aad), 200)
    if opened.get("plaintext") != b64(b"Hello World!"):
        failures.append(f"decrypt gave {opened}")
    # Tampering with any field, or another AAD, fails alike.
    for field in ("ciphertext", "initializationVector", "authenticationTag", "ciphertextMetadata"):
        bad = dict(sealed, **{field: flip(sealed[field])})
        check(f"decrypt with a tampered {field}", decrypt(keys["both"], bad, aad), 400,
              "InvalidCiphertextException")
    check("decrypt with a tampered AAD", decrypt(keys["both"], sealed, b"Project=nile,department=marketing"),
          400, "InvalidCiphertextException")
    check("decrypt with another AAD", decrypt(keys["both"], sealed, b"other"), 400,
          "InvalidCiphertextException")
    check("decrypt without the AAD", decrypt(keys["both"], sealed), 400, "InvalidCiphertextException")
    no_md = {k: v for k, v in sealed.items() if k != "ciphertextMetadata"}
    check("decrypt without the metadata", decrypt(keys["both"], no_md, aad), 400,
          "InvalidCiphertextException")
    # The metadata passed as AAD (the spec's example of a framing attack).
    check("decrypt with the metadata moved into the AAD",
          decrypt(keys["both"], no_md, aad + unb64(sealed["ciphertextMetadata"])), 400,
          "InvalidCiphertextException")
    check("decrypt under another key", decrypt(keys["hsm"], sealed, aad), 400,
          "InvalidCiphertextException")
    check("decrypt with a 21-byte metadata",
          decrypt(keys["both"], dict(sealed, ciphertextMetadata=b64(b"x" * 21)), aad), 400,
          "ValidationException")
    check("decrypt with a 15-byte tag",
          decrypt(keys["both"], dict(sealed, authenticationTag=b64(b"t" * 15)), aad), 400,
          "ValidationException")
    check("decrypt by a decrypt-less grant", decrypt(keys["encrypt_only"], sealed, aad), 400,
          "InvalidKeyUsageException")

# 4 KiB with 8 KiB of AAD; the specified 4300-byte maximum; one more byte.
big = bytes(range(256)) * 16
big_aad = b"A" * 8192
s = check("encrypt 4 KiB with 8 KiB AAD", encrypt(keys["both"], big, big_aad, cdiv=True), 200)
o = check("decrypt 4 KiB with 8 KiB AAD", decrypt(keys["both"], s, big_aad), 200)
if o.get("plaintext") != b64(big):
    failures.append("4 KiB did not round-trip")
check("encrypt 4300 bytes", encrypt(keys["both"], b"p" * 4300), 200)
check("encrypt 4301 bytes", encrypt(keys["both"], b"p" * 4301), 501, "UnsupportedOperationException")
check("encrypt with 8193 bytes of AAD", encrypt(keys["both"], b"p", b"a" * 8193), 501,
      "UnsupportedOperationException")
check("encrypt with another algorithm", call(f"keys/{keys['both']}/encrypt", {
    "requestMetadata": meta(), "plaintext": b64(b"x"), "encryptionAlgorithm": "RSAES_OAEP_SHA_256"}),
    501, "UnsupportedOperationException")
check("encrypt with bad base64", call(f"keys/{keys['both']}/encrypt", {
    "requestMetadata": meta(), "plaintext": "***", "encryptionAlgorithm": "AES_GCM"}),
    400, "ValidationException")
check("encrypt without requestMetadata", call(f"keys/{keys['both']}/encrypt", {
    "plaintext": b64(b"x"), "encryptionAlgorithm": "AES_GCM"}), 400, "ValidationException")
check("an unknown kmsOperation is accepted", encrypt(keys["both"], b"x", operation="BulkEncrypt"), 200)

# The HSM-level key seals inside the HSM.
s = check("encrypt, HSM key", encrypt(keys["hsm"], b"in the HSM", aad, cdiv=True), 200)
o = check("decrypt, HSM key", decrypt(keys["hsm"], s, aad), 200)
if o.get("plaintext") != b64(b"in the HSM"):
    failures.append(f"HSM key round trip: {o}")
if s.get("ciphertextMetadata"):
    check("decrypt, HSM key, tampered tag", decrypt(keys["hsm"], dict(s, authenticationTag=flip(
        s["authenticationTag"])), aad), 400, "InvalidCiphertextException")

# --- usage follows the policy ---
eo = check("encrypt, encrypt-only", encrypt(keys["encrypt_only"], b"x"), 200)
check("encrypt with an integrity value, encrypt-only",
      encrypt(keys["encrypt_only"], b"x", cdiv=True), 400, "InvalidKeyUsageException")
check("encrypt, decrypt-only", encrypt(keys["decrypt_only"], b"x"), 400, "InvalidKeyUsageException")
check("encrypt, no usage", encrypt(keys["no_usage"], b"x"), 400, "InvalidKeyUsageException")
if eo.get("ciphertext"):
    check("decrypt, no usage", decrypt(keys["no_usage"], eo), 400, "InvalidKeyUsageException")
check("encrypt, disabled key", encrypt(keys["disabled"], b"x"), 400, "InvalidStateException")
check("decrypt, disabled key", decrypt(keys["disabled"], sealed), 400, "InvalidStateException")
# A context rule on the request metadata: only account 111122223333.
check("encrypt, account rule, other account", encrypt(keys["account_rule"], b"x"), 403,
      "AccessDeniedException")
check("encrypt, account rule, its account",
      encrypt(keys["account_rule"], b"x", principal=BOB_OTHER_ACCOUNT), 200)

# --- authentication ---
check("the second credential (rotation)", encrypt(keys["both"], b"x", credential="second"), 200)
check("a rotated-out credential", encrypt(keys["both"], b"x", credential="rotated_out"), 401,
      "AuthenticationFailedException")
check("a wrong secret", encrypt(keys["both"], b"x", credential="wrong_secret"), 401,
      "AuthenticationFailedException")
stale = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=10)
check("a stale date", encrypt(keys["both"], b"x", when=stale), 401, "AuthenticationFailedException")
recent = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=2)
check("a date two minutes old", encrypt(keys["both"], b"x", when=recent), 200)
check("unsigned", encrypt(keys["both"], b"x", sign=False), 401, "AuthenticationFailedException")
check("a body changed after signing", encrypt(keys["both"], b"x", tamper_body=True), 401,
      "AuthenticationFailedException")
check("a wrong prefix", call("health", {"requestMetadata": meta("KmsHealthCheck")}, prefix="/other",
                             record=False), 404, "InvalidUriPathException")
check("an unknown path", call(f"keys/{keys['both']}/sign", {"requestMetadata": meta()}, record=False),
      404, "InvalidUriPathException")
for path in ("health", f"keys/{keys['both']}/metadata", f"keys/{keys['both']}/encrypt",
             f"keys/{keys['both']}/decrypt"):
    code, _ = call(path, None, method="GET", record=False)
    if code != 405:
        failures.append(f"GET {path}: {code}, expected 405")

# --- throttling (last: its principal has a tiny rate limit) ---
codes = []
for i in range(5):
    codes.append(call("health", {"requestMetadata": {"kmsRequestId": str(uuid.uuid4()),
                                                     "kmsOperation": "KmsHealthCheck"}},
                      credential="throttled", throttled=True))
if not any(c == 429 and a.get("errorName") == "ThrottlingException" for c, a in codes):
    failures.append(f"no ThrottlingException over the limit: {codes}")

json.dump(report, open(sys.argv[2], "w"))
for f in failures:
    print("FAIL:", f)
print(f"{len(report)} requests, {len(failures)} failures")
sys.exit(1 if failures else 0)
