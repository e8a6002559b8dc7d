"""The data-key RPCs against a stand-in coffre: the requests are the Rust
client's field for field, with no metadata of ours; each gRPC status
becomes the exception ``client/src/rpc.rs`` maps it to, with coffre's
request id; seal and open through a client wipe the data key and ask
coffre nothing when the context asserted is not the message's."""

import io
import socket
import unittest

import grpc

import coffre_client
from coffre_client import errors
from coffre_client._proto import coffre_pb2 as pb

from fake_coffre import FakeCoffre
from helpers import plaintext

CTX = {"tenant": "acme", "object": "a/b.pdf"}


def our_metadata(metadata):
    """The metadata keys a call carried beyond what gRPC itself sends."""
    return {k for k, _ in metadata if k != "user-agent" and not k.startswith("grpc-")}


class Requests(unittest.TestCase):
    def test_generate_and_decrypt_send_the_rust_clients_requests(self):
        with FakeCoffre() as fake:
            client = fake.client()
            with client.generate_data_key("files", CTX) as generated:
                self.assertEqual(generated.key_id, "6f2c1b9e-4d1a-4f2e-9a53-0c9d2b7e8a11")
                self.assertEqual(generated.key_version, 3)
                self.assertTrue(generated.blob.startswith(b"CF"))
                with client.decrypt(generated.blob, CTX) as back:
                    self.assertEqual(bytes(back._key), bytes(generated.data_key._key))
            (gen_name, gen, gen_md), (dec_name, dec, dec_md) = fake.service.calls
            self.assertEqual(gen_name, "GenerateDataKey")
            self.assertEqual(
                gen,
                pb.GenerateDataKeyRequest(
                    key_id="files",
                    encryption_context=CTX,
                    justification=pb.CUSTOMER_INITIATED_ACCESS,
                    number_of_bytes=32,
                ),
            )
            self.assertEqual(dec_name, "Decrypt")
            self.assertEqual(
                dec,
                pb.DecryptRequest(
                    ciphertext_blob=generated.blob,
                    encryption_context=CTX,
                    justification=pb.CUSTOMER_INITIATED_ACCESS,
                ),
            )
            self.assertEqual(dec.key_id, "")
            self.assertEqual(our_metadata(gen_md), set(), gen_md)
            self.assertEqual(our_metadata(dec_md), set(), dec_md)

    def test_the_justification_is_the_one_the_client_declares(self):
        with FakeCoffre() as fake:
            client = fake.client(reason=coffre_client.AccessReason.PROVIDER_INITIATED_REVIEW)
            client.generate_data_key("k", {}).close()
            client.reason = coffre_client.AccessReason.THIRD_PARTY_DATA_REQUEST
            client.generate_data_key("k", {}).close()
            reasons = [call[1].justification for call in fake.service.calls]
            self.assertEqual(reasons, [pb.PROVIDER_INITIATED_REVIEW, pb.THIRD_PARTY_DATA_REQUEST])
            self.assertEqual(
                [r.name for r in coffre_client.AccessReason],
                [pb.AccessReason.Name(v) for v in pb.AccessReason.values()],
            )

    def test_seal_and_open_through_a_client_wipe_the_data_key(self):
        with FakeCoffre() as fake:
            client = fake.client()
            issued = []
            real = client.generate_data_key

            def spy(key_id, context):
                generated = real(key_id, context)
                issued.append(generated)
                return generated

            client.generate_data_key = spy
            plain = plaintext(3 * 65536 + 5)
            sealed = io.BytesIO()
            result = coffre_client.seal(client, "files", CTX, io.BytesIO(plain), sealed)
            self.assertEqual(result.plaintext_len, len(plain))
            self.assertEqual(result.key_version, 3)
            self.assertEqual(result.sealed_len, len(sealed.getvalue()))
            self.assertTrue(issued[0].data_key.closed)
            out = io.BytesIO()
            opened = coffre_client.open(client, io.BytesIO(sealed.getvalue()), out, CTX)
            self.assertEqual(out.getvalue(), plain)
            self.assertEqual(opened.header.context, dict(sorted(CTX.items())))
            # Streaming through the client's own opener, too.
            opener, header = client.opener(io.BytesIO(sealed.getvalue()))
            with opener:
                self.assertEqual(opener.read(), plain)
            self.assertEqual(header.blob, issued[0].blob)
            names = [call[0] for call in fake.service.calls]
            self.assertEqual(names, ["GenerateDataKey", "Decrypt", "Decrypt"])

    def test_a_context_mismatch_asks_coffre_nothing(self):
        with FakeCoffre() as fake:
            client = fake.client()
            sealed = io.BytesIO()
            coffre_client.seal(client, "files", CTX, io.BytesIO(b"x"), sealed)
            with self.assertRaises(errors.ContextMismatchError) as caught:
                coffre_client.open(client, io.BytesIO(sealed.getvalue()), io.BytesIO(), {"tenant": "globex"})
            self.assertEqual(caught.exception.found, dict(sorted(CTX.items())))
            self.assertEqual([c[0] for c in fake.service.calls], ["GenerateDataKey"])

    def test_what_a_header_cannot_hold_is_refused_before_coffre_is_asked(self):
        with FakeCoffre() as fake:
            client = fake.client()
            for ctx, frame_len in (({"": "v"}, 65536), ({}, 10)):
                with self.assertRaises(errors.InvalidInputError):
                    coffre_client.seal(client, "k", ctx, io.BytesIO(b""), io.BytesIO(), frame_len)
                with self.assertRaises(errors.InvalidInputError):
                    client.sealer("k", ctx, io.BytesIO(), frame_len)
            self.assertEqual(fake.service.calls, [])


class Errors(unittest.TestCase):
    CASES = [
        (grpc.StatusCode.FAILED_PRECONDITION, "key 6f2c is DISABLED", errors.KeyDisabledError),
        (grpc.StatusCode.FAILED_PRECONDITION, "key 6f2c is PENDING_DELETION", errors.KeyPendingDeletionError),
        (grpc.StatusCode.FAILED_PRECONDITION, "key 6f2c is DESTROYED", errors.KeyDestroyedError),
        (
            grpc.StatusCode.FAILED_PRECONDITION,
            "version 1 of key 6f2c is retired (minimum decryption version 2)",
            errors.KeyUnusableError,
        ),
        (grpc.StatusCode.PERMISSION_DENIED, "key \"x\" does not exist or you are not allowed", errors.PermissionDeniedError),
        (grpc.StatusCode.NOT_FOUND, "no key \"x\"", errors.NotFoundError),
        (grpc.StatusCode.INVALID_ARGUMENT, "invalid ciphertext or context", errors.InvalidRequestError),
        (grpc.StatusCode.OUT_OF_RANGE, "out", errors.InvalidRequestError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limited", errors.ThrottledError),
        (grpc.StatusCode.UNAVAILABLE, "the HSM is unavailable", errors.UnavailableError),
        (grpc.StatusCode.UNAUTHENTICATED, "no certificate", errors.UnauthenticatedError),
        (grpc.StatusCode.INTERNAL, "odd", errors.ClientError),
    ]

    def test_each_status_is_the_exception_rpc_rs_maps_it_to_with_its_request_id(self):
        with FakeCoffre() as fake:
            client = fake.client()
            for code, message, kind in self.CASES:
                with self.subTest(code=code.name, message=message):
                    fake.service.fail = (code, message)
                    for call in (
                        lambda: client.generate_data_key("k", {}),
                        lambda: client.decrypt(b"CF\x01\x01" + bytes(10), {}),
                    ):
                        with self.assertRaises(errors.ClientError) as caught:
                            call()
                        e = caught.exception
                        self.assertIs(type(e), kind)
                        self.assertEqual(e.code, code.name)
                        self.assertEqual(e.message, message)
                        self.assertTrue(e.request_id and e.request_id.startswith("req-"), e.request_id)
                        self.assertIn(message, str(e))
                        self.assertTrue(str(e).endswith(f"(request id {e.request_id})"), str(e))
            disabled = errors.from_status("FAILED_PRECONDITION", "key 6f2c is DISABLED", "r")
            self.assertIsInstance(disabled, errors.KeyUnusableError)
            self.assertEqual(disabled.key_state, "DISABLED")
            self.assertEqual(str(disabled), "the key cannot be used now: key 6f2c is DISABLED (request id r)")
            refused = errors.from_status("NOT_FOUND", "no", None)
            self.assertIsInstance(refused, errors.RefusedError)

    def test_no_server_is_unavailable_and_says_where(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        client = coffre_client.Client.from_channel(channel, endpoint=f"https://127.0.0.1:{port}", timeout=5)
        with client:
            with self.assertRaises(errors.UnavailableError) as caught:
                client.generate_data_key("k", {})
        self.assertIn(f"cannot connect to https://127.0.0.1:{port}", str(caught.exception))
        self.assertIsNone(caught.exception.request_id)

    def test_bad_endpoints_and_certificates_are_connect_errors(self):
        import os
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            pem = os.path.join(d, "x.pem")
            with open(pem, "w") as f:
                f.write("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
            key = os.path.join(d, "k.pem")
            with open(key, "w") as f:
                f.write("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
            for endpoint in ("http://127.0.0.1:7443", "127.0.0.1:7443", "https://", "https://h:99999", "https://h:1/path"):
                with self.subTest(endpoint=endpoint):
                    with self.assertRaises(errors.ConnectError):
                        coffre_client.Client(endpoint, pem, pem, key)
            with self.assertRaises(errors.ConnectError) as caught:
                coffre_client.Client("https://127.0.0.1:1", os.path.join(d, "missing.pem"), pem, key)
            self.assertIn("missing.pem", str(caught.exception))
            with self.assertRaises(errors.ConnectError):
                coffre_client.Client("https://127.0.0.1:1", pem, pem, pem)
            coffre_client.Client("https://[::1]:1", pem, pem, key).close()
            os.mkdir(os.path.join(d, "pki"))
            for name, src in (("ca.pem", pem), ("svc.pem", pem), ("svc-key.pem", key)):
                with open(src) as f, open(os.path.join(d, "pki", name), "w") as g:
                    g.write(f.read())
            coffre_client.Client.from_data_dir(d, "https://localhost:1", identity="svc").close()
            with self.assertRaises(errors.ConnectError):
                coffre_client.Client.from_data_dir(d, "https://localhost:1")  # no service.pem


if __name__ == "__main__":
    unittest.main()
