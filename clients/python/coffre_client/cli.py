"""``python -m coffre_client seal|open``: the ``coffre seal`` and ``coffre
open`` commands (``src/cli/seal.rs``) in Python, with the same flags,
environment variables, outputs and error codes::

    python -m coffre_client seal --key K --context k=v [--in FILE|-] [--out FILE|-]
    python -m coffre_client open [--in FILE|-] [--out FILE|-] [--context k=v]

A file named by ``--out`` appears only once complete: written beside it
(mode 0600), fsynced, renamed; for ``open``, only once every frame
verified. On standard output, ``open`` writes each frame as it verifies,
so a failure half-way leaves a prefix there: the exit status says whether
it is the whole.

A failure prints ``error: ...`` on standard error and, with ``--json``,
``{"error": {"code", "message", "request_id"}}`` on standard output; the
exit status is 1 (2 for a bad command line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .errors import (
    ClientError,
    CoffreError,
    ConnectError,
    ContextMismatchError,
    FormatError,
    InvalidRequestError,
    KeyUnusableError,
    NotAuthenticError,
    RefusedError,
    ThrottledError,
    TruncatedHeaderError,
    UnauthenticatedError,
    UnavailableError,
)
from .format import DEFAULT_FRAME_LEN
from .rpc import DEFAULT_ENDPOINT, DEFAULT_TIMEOUT, AccessReason, Client
from .stream import write_all

#: ``--justification`` values, as the Rust CLI spells them.
REASONS = {
    "unspecified": AccessReason.ACCESS_REASON_UNSPECIFIED,
    "customer-initiated-access": AccessReason.CUSTOMER_INITIATED_ACCESS,
    "customer-initiated-support": AccessReason.CUSTOMER_INITIATED_SUPPORT,
    "provider-initiated-service": AccessReason.PROVIDER_INITIATED_SERVICE,
    "provider-system-operation": AccessReason.PROVIDER_SYSTEM_OPERATION,
    "provider-initiated-review": AccessReason.PROVIDER_INITIATED_REVIEW,
    "third-party-data-request": AccessReason.THIRD_PARTY_DATA_REQUEST,
}

#: The codes a user is told by name (``not found``); any other reads as a
#: plain ``error`` (the Rust CLI's ``code_words``).
NAMED_CODES = {
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "PERMISSION_DENIED",
    "FAILED_PRECONDITION",
    "UNAVAILABLE",
    "ALREADY_EXISTS",
    "UNAUTHENTICATED",
    "DEADLINE_EXCEEDED",
}


class CliError(Exception):
    """How a command failed: a gRPC code's name, a message, coffre's
    request id."""

    def __init__(self, code: str, message: str, request_id: Optional[str] = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id

    def __str__(self) -> str:
        text = self.message
        if self.code in NAMED_CODES:
            words = self.code.lower().replace("_", " ")
            text = f"{words}: {self.message}" if self.message else words
        if self.request_id:
            text += f" (request id {self.request_id})"
        return text


def cli_error(e: CoffreError) -> CliError:
    """The code closest to an error of the package, as ``coffre`` reports
    it (``src/cli/seal.rs``, ``cli_error``)."""
    if isinstance(e, ContextMismatchError):
        shown = ",".join(f"{k}={v}" for k, v in e.found.items())
        return CliError(
            "INVALID_ARGUMENT", f"the message's context is {shown}, not the --context given"
        )
    if isinstance(e, ConnectError):
        return CliError("INVALID_ARGUMENT", e.message)
    if isinstance(e, ClientError):
        by_kind: List[Tuple[type, str]] = [
            (KeyUnusableError, "FAILED_PRECONDITION"),
            (RefusedError, "PERMISSION_DENIED"),
            (InvalidRequestError, "INVALID_ARGUMENT"),
            (ThrottledError, "RESOURCE_EXHAUSTED"),
            (UnavailableError, "UNAVAILABLE"),
            (UnauthenticatedError, "UNAUTHENTICATED"),
        ]
        for kind, code in by_kind:
            if isinstance(e, kind):
                return CliError(code, e.message, e.request_id)
        return CliError("UNKNOWN", str(e), None)
    if isinstance(e, (NotAuthenticError, TruncatedHeaderError)):
        return CliError("DATA_LOSS", str(e))
    if isinstance(e, FormatError):
        return CliError("INVALID_ARGUMENT", str(e))
    return CliError("UNKNOWN", str(e))


def _pair(text: str) -> Tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    if not key:
        raise argparse.ArgumentTypeError(f"empty key in {text!r}")
    return key, value


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--endpoint",
        default=os.environ.get("COFFRE_ENDPOINT") or DEFAULT_ENDPOINT,
        metavar="URL",
        help="the server, e.g. https://127.0.0.1:7443 [env: COFFRE_ENDPOINT]",
    )
    common.add_argument(
        "--data-dir",
        default=os.environ.get("COFFRE_DATA_DIR") or "./coffre-data",
        metavar="DIR",
        help="the `coffre dev` data directory whose dev PKI (DIR/pki/) to use "
        "[env: COFFRE_DATA_DIR]",
    )
    common.add_argument(
        "--as",
        dest="identity",
        default=None,
        metavar="NAME",
        help="identity to use from the dev PKI (default: service)",
    )
    common.add_argument(
        "--ca",
        default=os.environ.get("COFFRE_CA") or None,
        help="CA certificate of the server (overrides the dev PKI) [env: COFFRE_CA]",
    )
    common.add_argument(
        "--cert",
        default=os.environ.get("COFFRE_CERT") or None,
        help="client certificate (overrides the dev PKI; needs --cert-key) [env: COFFRE_CERT]",
    )
    common.add_argument(
        "--cert-key",
        default=os.environ.get("COFFRE_CERT_KEY") or None,
        help="private key of the client certificate (needs --cert) [env: COFFRE_CERT_KEY]",
    )
    common.add_argument("--json", action="store_true", help="machine-readable output: one JSON object")
    common.add_argument(
        "--timeout", type=int, default=int(DEFAULT_TIMEOUT), help="per-call deadline, in seconds"
    )
    common.add_argument(
        "--context",
        action="append",
        type=_pair,
        default=[],
        metavar="KEY=VALUE",
        help="an encryption-context entry (repeat for more)",
    )
    common.add_argument(
        "--justification",
        choices=list(REASONS),
        default="customer-initiated-access",
        help="why the key is used",
    )
    common.add_argument(
        "--in",
        dest="input",
        default="-",
        metavar="FILE",
        help="the input ('-', the default: standard input)",
    )
    common.add_argument(
        "--out",
        dest="output",
        default="-",
        metavar="FILE",
        help="the output ('-', the default: standard output); a file appears only once complete",
    )
    parser = argparse.ArgumentParser(
        prog="python -m coffre_client",
        description="Client-side encryption with data keys from coffre (the sealed message format).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    seal = sub.add_parser(
        "seal",
        parents=[common],
        help="encrypt a file or stream on this side under a fresh data key from coffre",
    )
    seal.add_argument("--key", required=True, help="the key whose data key seals the data: its id or alias")
    sub.add_parser(
        "open",
        parents=[common],
        help="open what seal made: coffre decrypts its data key if the key and its policy allow it now",
    )
    return parser


# ---- input and output ------------------------------------------------------


def _open_input(path: str) -> Any:
    if path == "-":
        return sys.stdin.buffer
    try:
        return open(path, "rb", buffering=256 * 1024)
    except OSError as e:
        raise CliError("INVALID_ARGUMENT", f"cannot open {path}: {e.strerror or e}") from None


class _Output:
    """Standard output, or a file that appears only once committed: written
    beside it (mode 0600), fsynced, renamed."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.written = 0
        self._tmp: Optional[str] = None
        if path == "-":
            self._file: Any = sys.stdout.buffer
            return
        directory = os.path.dirname(path) or "."
        name = os.path.basename(path)
        if not name:
            raise CliError("INVALID_ARGUMENT", f"{path} names no file")
        tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise CliError("INVALID_ARGUMENT", f"cannot write beside {path}: {e.strerror or e}") from None
        self._tmp = tmp
        self._file = os.fdopen(fd, "wb", buffering=256 * 1024)

    def write(self, data: Any) -> int:
        n = self._file.write(data)
        self.written += len(memoryview(data)) if n is None else n
        return len(memoryview(data)) if n is None else n

    def flush(self) -> None:
        self._file.flush()

    def commit(self) -> int:
        """Flushes, and for a file makes it appear; the bytes written."""
        if self._tmp is None:
            self._file.flush()
            return self.written
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._tmp, self.path)
        except OSError as e:
            self.discard()
            raise CliError("INVALID_ARGUMENT", f"writing the output file: {e.strerror or e}") from None
        self._tmp = None
        try:
            dfd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
        return self.written

    def discard(self) -> None:
        """Removes what a file output wrote; nothing appears."""
        if self._tmp is not None:
            try:
                self._file.close()
            except OSError:
                pass
            try:
                os.unlink(self._tmp)
            except OSError:
                pass
            self._tmp = None


# ---- the commands ----------------------------------------------------------


def _client(args: argparse.Namespace) -> Client:
    if (args.cert is None) != (args.cert_key is None):
        raise CliError("INVALID_ARGUMENT", "--cert and --cert-key go together")
    pki = os.path.join(args.data_dir, "pki")
    name = args.identity or "service"
    ca = args.ca or os.path.join(pki, "ca.pem")
    cert = args.cert or os.path.join(pki, f"{name}.pem")
    key = args.cert_key or os.path.join(pki, f"{name}-key.pem")
    for path, what in ((ca, "CA certificate"), (cert, "client certificate"), (key, "client key")):
        if not os.path.isfile(path):
            raise CliError(
                "INVALID_ARGUMENT",
                f"cannot read the {what} {path} (is `coffre dev` running with --data-dir "
                f"{args.data_dir}? or pass --ca, --cert and --cert-key)",
            )
    return Client(
        args.endpoint,
        ca,
        cert,
        key,
        timeout=max(1, args.timeout),
        reason=REASONS[args.justification],
    )


def _refuse_json_on_stdout(args: argparse.Namespace) -> None:
    if args.json and args.output == "-":
        raise CliError(
            "INVALID_ARGUMENT",
            "--json prints a summary on standard output, which carries the data here: give --out FILE",
        )


def _report(args: argparse.Namespace, value: Dict[str, Any], line: str) -> None:
    if args.json:
        print(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False))
    elif args.output != "-":
        print(line)


def _seal(args: argparse.Namespace) -> None:
    _refuse_json_on_stdout(args)
    context = dict(args.context)
    with _client(args) as client:
        reader = _open_input(args.input)
        output = _Output(args.output)
        try:
            sealer, generated = client.sealer(args.key, context, output, DEFAULT_FRAME_LEN)
            with generated:
                try:
                    sealer.copy_from(reader)
                    plaintext_len = sealer.finish()
                finally:
                    sealer.close()
            written = output.commit()
        except BaseException:
            output.discard()
            raise
    _report(
        args,
        {
            "operation": "seal",
            "key_id": generated.key_id,
            "key_version": generated.key_version,
            "context": dict(sorted(context.items())),
            "plaintext_bytes": plaintext_len,
            "sealed_bytes": written,
        },
        f"sealed {plaintext_len} bytes into {args.output} ({written} bytes) under key "
        f"{generated.key_id} version {generated.key_version}",
    )


def _open(args: argparse.Namespace) -> None:
    _refuse_json_on_stdout(args)
    expected = dict(args.context) if args.context else None
    with _client(args) as client:
        reader = _open_input(args.input)
        # The header is read, and coffre asked, before anything is created:
        # a file that is no sealed message, or a refusal, leaves no output.
        opener, header = client.opener(reader, expected)
        try:
            output = _Output(args.output)
            try:
                plaintext_len = 0
                while True:
                    chunk = opener._verified_chunk()
                    if chunk is None:
                        break
                    write_all(output, chunk)
                    plaintext_len += len(chunk)
                output.commit()
            except BaseException:
                output.discard()
                raise
        finally:
            opener.close()
    _report(
        args,
        {"operation": "open", "context": header.context, "plaintext_bytes": plaintext_len},
        f"opened {plaintext_len} bytes into {args.output}",
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        try:
            if args.command == "seal":
                _seal(args)
            else:
                _open(args)
            return 0
        except CoffreError as e:
            raise cli_error(e) from None
        except OSError as e:
            raise CliError("INVALID_ARGUMENT", f"{e.strerror or e}" + (
                f": {e.filename}" if getattr(e, "filename", None) else ""
            )) from None
    except CliError as e:
        sys.stdout.flush()
        print(f"error: {e}", file=sys.stderr)
        if args.json:
            print(
                json.dumps(
                    {"error": {"code": e.code, "message": e.message, "request_id": e.request_id}},
                    indent=2,
                    sort_keys=True,
                    ensure_ascii=False,
                )
            )
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
