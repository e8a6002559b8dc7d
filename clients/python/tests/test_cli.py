"""``python -m coffre_client seal|open`` against a stand-in coffre: the
flags and environment variables of ``coffre seal|open``, a file that
appears only once complete (and never on a failure), the summary and the
``--json`` objects, and the error codes the Rust CLI gives."""

import contextlib
import io
import json
import os
import sys
import tempfile
import unittest
from unittest import mock

import grpc

from coffre_client import cli

from fake_coffre import FakeCoffre
from helpers import plaintext


class Std:
    """Standard input and output with the byte streams under them."""

    def __init__(self, stdin=b""):
        self.stdin = io.TextIOWrapper(io.BytesIO(stdin))
        self.stdout = io.TextIOWrapper(io.BytesIO(), write_through=True)
        self.stderr = io.StringIO()

    def out(self):
        self.stdout.flush()
        return self.stdout.buffer.getvalue()


class Cli(unittest.TestCase):
    def setUp(self):
        self.fake = FakeCoffre().__enter__()
        self.addCleanup(self.fake.__exit__, None, None, None)
        self.dir = tempfile.TemporaryDirectory()
        self.addCleanup(self.dir.cleanup)
        self.made = []

        def client(args):
            self.made.append(args)
            return self.fake.client(reason=cli.REASONS[args.justification])

        patcher = mock.patch.object(cli, "_client", client)
        patcher.start()
        self.addCleanup(patcher.stop)

    def p(self, name):
        return os.path.join(self.dir.name, name)

    def run_cli(self, *args, stdin=b""):
        std = Std(stdin)
        with mock.patch.object(sys, "stdin", std.stdin), mock.patch.object(
            sys, "stdout", std.stdout
        ), contextlib.redirect_stderr(std.stderr):
            code = cli.main(list(args))
        return code, std.out(), std.stderr.getvalue()

    def names(self):
        return sorted(os.listdir(self.dir.name))

    def test_seal_and_open_files_with_summaries(self):
        plain = plaintext(200_000)
        with open(self.p("plain"), "wb") as f:
            f.write(plain)
        code, out, err = self.run_cli(
            "seal", "--key", "files", "--context", "tenant=acme", "--in", self.p("plain"), "--out", self.p("plain.cs")
        )
        self.assertEqual(code, 0, err)
        size = os.path.getsize(self.p("plain.cs"))
        self.assertEqual(
            out.decode(),
            f"sealed 200000 bytes into {self.p('plain.cs')} ({size} bytes) under key "
            "6f2c1b9e-4d1a-4f2e-9a53-0c9d2b7e8a11 version 3\n",
        )
        self.assertEqual(os.stat(self.p("plain.cs")).st_mode & 0o777, 0o600)
        code, out, err = self.run_cli(
            "open", "--in", self.p("plain.cs"), "--out", self.p("back"), "--context", "tenant=acme", "--json"
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(
            json.loads(out), {"operation": "open", "context": {"tenant": "acme"}, "plaintext_bytes": 200000}
        )
        with open(self.p("back"), "rb") as f:
            self.assertEqual(f.read(), plain)
        self.assertEqual(self.names(), ["back", "plain", "plain.cs"])
        gen = self.fake.service.calls[0][1]
        self.assertEqual((gen.key_id, dict(gen.encryption_context), gen.number_of_bytes), ("files", {"tenant": "acme"}, 32))

    def test_pipes_and_json(self):
        plain = plaintext(70_000)
        code, sealed, err = self.run_cli("seal", "--key", "k", "--context", "a=1", "--context", "b=2", stdin=plain)
        self.assertEqual(code, 0, err)
        self.assertTrue(sealed.startswith(b"CS\x01\x01"))
        code, back, err = self.run_cli("open", stdin=sealed)
        self.assertEqual(code, 0, err)
        self.assertEqual(back, plain)
        code, out, err = self.run_cli("seal", "--key", "k", "--out", self.p("x.cs"), "--json", stdin=b"abc")
        self.assertEqual(code, 0, err)
        summary = json.loads(out)
        self.assertEqual(summary["plaintext_bytes"], 3)
        self.assertEqual(summary["sealed_bytes"], os.path.getsize(self.p("x.cs")))
        self.assertEqual(
            sorted(summary), ["context", "key_id", "key_version", "operation", "plaintext_bytes", "sealed_bytes"]
        )
        self.assertEqual(list(json.loads(out)), sorted(summary))  # sorted keys, as serde_json

    def test_refusals_leave_no_output_and_say_why(self):
        with open(self.p("plain"), "wb") as f:
            f.write(plaintext(5000))
        self.assertEqual(self.run_cli("seal", "--key", "k", "--context", "tenant=acme", "--in", self.p("plain"), "--out", self.p("m.cs"))[0], 0)
        with open(self.p("m.cs"), "rb") as f:
            message = f.read()
        bad = bytearray(message)
        bad[-20] ^= 1
        with open(self.p("tampered.cs"), "wb") as f:
            f.write(bad)
        with open(self.p("cut.cs"), "wb") as f:
            f.write(message[:-100])
        out = self.p("never")
        cases = [
            (["open", "--in", self.p("m.cs"), "--out", out, "--context", "tenant=globex"], "INVALID_ARGUMENT", "the message's context is tenant=acme, not the --context given"),
            (["open", "--in", self.p("tampered.cs"), "--out", out], "DATA_LOSS", "not authentic"),
            (["open", "--in", self.p("cut.cs"), "--out", out], "DATA_LOSS", "not authentic"),
            (["open", "--in", self.p("plain"), "--out", out], "INVALID_ARGUMENT", "not a coffre sealed message"),
            (["open", "--in", self.p("nope"), "--out", out], "INVALID_ARGUMENT", "cannot open"),
        ]
        for args, code_name, words in cases:
            with self.subTest(args=args[:3]):
                code, stdout, err = self.run_cli(*args, "--json")
                self.assertEqual(code, 1)
                e = json.loads(stdout)["error"]
                self.assertEqual(e["code"], code_name, e)
                self.assertIn(words, e["message"])
                self.assertIn(words, err)
                self.assertTrue(err.startswith("error: "), err)
                self.assertFalse(os.path.exists(out))
        self.assertEqual(self.names(), ["cut.cs", "m.cs", "plain", "tampered.cs"])

    def test_coffre_refusals_carry_their_code_and_request_id(self):
        self.assertEqual(self.run_cli("seal", "--key", "k", "--out", self.p("m.cs"), stdin=b"data")[0], 0)
        for status, message, code_name, words in (
            (grpc.StatusCode.FAILED_PRECONDITION, "key 6f2c is DISABLED", "FAILED_PRECONDITION", "failed precondition: key 6f2c is DISABLED"),
            (grpc.StatusCode.PERMISSION_DENIED, "not allowed: THIRD_PARTY_DATA_REQUEST", "PERMISSION_DENIED", "permission denied: not allowed"),
            (grpc.StatusCode.NOT_FOUND, "no such key", "PERMISSION_DENIED", "permission denied: no such key"),
            (grpc.StatusCode.UNAVAILABLE, "the HSM is unavailable", "UNAVAILABLE", "unavailable: the HSM"),
        ):
            with self.subTest(code=status.name):
                self.fake.service.fail = (status, message)
                code, stdout, err = self.run_cli("open", "--in", self.p("m.cs"), "--out", self.p("never"), "--json")
                self.assertEqual(code, 1)
                e = json.loads(stdout)["error"]
                self.assertEqual(e["code"], code_name)
                self.assertEqual(e["message"], message)
                self.assertTrue(e["request_id"].startswith("req-"))
                self.assertIn(words, err)
                self.assertIn(f"(request id {e['request_id']})", err)
                code, stdout, err = self.run_cli("seal", "--key", "k", "--out", self.p("never"), stdin=b"x")
                self.assertEqual(code, 1)
                self.assertIn(words, err)
                self.assertFalse(os.path.exists(self.p("never")))
        self.assertEqual(self.names(), ["m.cs"])

    def test_json_with_the_data_on_stdout_is_refused(self):
        code, out, err = self.run_cli("seal", "--key", "k", "--json", stdin=b"x")
        self.assertEqual(code, 1)
        self.assertIn("--out FILE", json.loads(out)["error"]["message"])
        self.assertEqual(self.fake.service.calls, [])

    def test_flags_and_environment_variables_are_coffres(self):
        env = {"COFFRE_ENDPOINT": "https://10.0.0.1:9443", "COFFRE_DATA_DIR": "/srv/coffre"}
        with mock.patch.dict(os.environ, env):
            args = cli._parser().parse_args(["open"])
        self.assertEqual((args.endpoint, args.data_dir), ("https://10.0.0.1:9443", "/srv/coffre"))
        with mock.patch.dict(os.environ, {}, clear=True):
            args = cli._parser().parse_args(["seal", "--key", "k"])
        self.assertEqual((args.endpoint, args.data_dir), ("https://127.0.0.1:7443", "./coffre-data"))
        self.assertEqual((args.input, args.output, args.justification), ("-", "-", "customer-initiated-access"))
        args = cli._parser().parse_args(
            ["open", "--endpoint", "https://h:1", "--data-dir", "d", "--as", "svc", "--justification", "provider-initiated-review", "--timeout", "5"]
        )
        self.assertEqual((args.endpoint, args.data_dir, args.identity, args.timeout), ("https://h:1", "d", "svc", 5))
        self.assertEqual(set(cli.REASONS), {
            "unspecified", "customer-initiated-access", "customer-initiated-support", "provider-initiated-service",
            "provider-system-operation", "provider-initiated-review", "third-party-data-request",
        })
        for bad in (["seal"], ["open", "--context", "novalue"], ["open", "--context", "=v"], ["open", "--justification", "because"]):
            with self.subTest(bad=bad), contextlib.redirect_stderr(io.StringIO()):
                with self.assertRaises(SystemExit) as caught:
                    cli._parser().parse_args(bad)
                self.assertEqual(caught.exception.code, 2)


class RealClientSetup(unittest.TestCase):
    def test_the_dev_pki_is_read_from_the_data_dir_or_refused_in_words(self):
        with tempfile.TemporaryDirectory() as d:
            args = cli._parser().parse_args(["open", "--data-dir", d])
            with self.assertRaises(cli.CliError) as caught:
                cli._client(args)
            self.assertIn(os.path.join(d, "pki", "ca.pem"), str(caught.exception))
            self.assertIn("coffre dev", str(caught.exception))
            args = cli._parser().parse_args(["open", "--cert", "c.pem"])
            with self.assertRaises(cli.CliError):
                cli._client(args)


if __name__ == "__main__":
    unittest.main()
