"""coffre's data-key RPCs over mTLS, with typed errors, and sealing and
opening on top of them (``client/src/rpc.rs``): :meth:`Client.sealer` asks
for a data key and starts a message; :meth:`Client.opener` reads a
message's header, asks coffre to decrypt its data key (coffre checks the
key's state and policy and records the request), and opens the frames.

The requests are the Rust client's, field for field:
``GenerateDataKey{key_id, encryption_context, justification,
number_of_bytes: 32}`` and ``Decrypt{ciphertext_blob, encryption_context,
justification, key_id: ""}``, with no metadata of ours (the justification is
a field of each request, ``CUSTOMER_INITIATED_ACCESS`` unless told
otherwise) and a per-call deadline.
"""

from __future__ import annotations

import enum
import os
import urllib.parse
from typing import Any, Mapping, Optional, Sequence, Tuple

import grpc

from ._proto import coffre_pb2 as pb
from ._proto import coffre_pb2_grpc as pb_grpc
from .errors import ClientError, ConnectError, ContextMismatchError, from_status
from .format import (
    DATA_KEY_LEN,
    DEFAULT_FRAME_LEN,
    DataKey,
    GeneratedKey,
    Header,
    check_seal_arguments,
    normalize_context,
    read_header,
)
from .stream import Opener, Sealer

__all__ = ["AccessReason", "Client", "GeneratedKey", "DEFAULT_ENDPOINT", "DEFAULT_TIMEOUT"]

#: Where ``coffre dev`` listens unless told otherwise.
DEFAULT_ENDPOINT = "https://127.0.0.1:7443"
#: The per-call deadline, in seconds (the CLI's ``--timeout`` default).
DEFAULT_TIMEOUT = 30.0

#: The response header (or trailer) carrying the id of the request's audit
#: record.
REQUEST_ID_HEADER = "x-request-id"


class AccessReason(enum.IntEnum):
    """Why a data key is generated or unwrapped (the proto's
    ``AccessReason``); recorded in coffre's audit log, and a key's policy
    may refuse it."""

    ACCESS_REASON_UNSPECIFIED = pb.ACCESS_REASON_UNSPECIFIED
    CUSTOMER_INITIATED_ACCESS = pb.CUSTOMER_INITIATED_ACCESS
    CUSTOMER_INITIATED_SUPPORT = pb.CUSTOMER_INITIATED_SUPPORT
    PROVIDER_INITIATED_SERVICE = pb.PROVIDER_INITIATED_SERVICE
    PROVIDER_SYSTEM_OPERATION = pb.PROVIDER_SYSTEM_OPERATION
    PROVIDER_INITIATED_REVIEW = pb.PROVIDER_INITIATED_REVIEW
    THIRD_PARTY_DATA_REQUEST = pb.THIRD_PARTY_DATA_REQUEST


def _target(endpoint: str) -> str:
    """The gRPC target (``host:port``) of ``https://HOST[:PORT]``."""
    try:
        url = urllib.parse.urlsplit(endpoint)
        port = url.port
    except ValueError as e:
        raise ConnectError(f"invalid endpoint {endpoint!r}: {e}") from None
    if url.scheme != "https":
        raise ConnectError(
            f"the endpoint {endpoint!r} must start with https:// (coffre always uses TLS)"
        )
    host = url.hostname
    if not host or url.path not in ("", "/") or url.query or url.fragment:
        raise ConnectError(f"invalid endpoint {endpoint!r}: expected https://HOST:PORT")
    port = port or 443
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _read_pem(path: Any, what: str) -> bytes:
    try:
        with open(os.fspath(path), "rb") as f:
            return f.read()
    except OSError as e:
        raise ConnectError(f"cannot read the {what} {os.fspath(path)}: {e.strerror or e}") from None


def _check_pem(pem: bytes, marker: bytes, what: str) -> None:
    if marker not in pem:
        raise ConnectError(f"the {what} is not PEM (no {marker.decode()})")


def _request_id(e: Any) -> Optional[str]:
    for name in ("trailing_metadata", "initial_metadata"):
        getter = getattr(e, name, None)
        try:
            metadata = getter() if getter is not None else None
        except Exception:
            metadata = None
        for key, value in metadata or ():
            if key == REQUEST_ID_HEADER:
                return value if isinstance(value, str) else value.decode("ascii", "replace")
    return None


def rpc_error(e: grpc.RpcError, endpoint: str) -> ClientError:
    """The typed exception of a failed call."""
    code = e.code() if callable(getattr(e, "code", None)) else None
    name = code.name if code is not None else "UNKNOWN"
    message = (e.details() if callable(getattr(e, "details", None)) else None) or ""
    request_id = _request_id(e)
    if name == "UNAVAILABLE" and request_id is None:
        # The server never answered: the connection failed.
        message = f"cannot connect to {endpoint}: {message}" if message else (
            f"cannot connect to {endpoint}"
        )
    return from_status(name, message, request_id)


class Client:
    """A connection to coffre's DataKeyService over mTLS, as a hosted
    service (the dev PKI's ``service.pem``). Thread-safe (one gRPC
    channel); close it, or use it as a context manager.

    ``ca``, ``cert``, ``key``: paths of PEM files: the CA that issued
    coffre's certificate, this service's certificate and its key. Every call
    declares ``reason`` (``CUSTOMER_INITIATED_ACCESS`` by default) and has
    ``timeout`` seconds. The connection is made at the first call: a
    refused or failed connection is an :class:`UnavailableError` then.
    """

    def __init__(
        self,
        endpoint: str,
        ca: Any,
        cert: Any,
        key: Any,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        reason: AccessReason = AccessReason.CUSTOMER_INITIATED_ACCESS,
        channel_options: Sequence[Tuple[str, Any]] = (),
    ) -> None:
        target = _target(endpoint)
        ca_pem = _read_pem(ca, "CA certificate")
        cert_pem = _read_pem(cert, "client certificate")
        key_pem = _read_pem(key, "client key")
        _check_pem(ca_pem, b"-----BEGIN CERTIFICATE-----", "CA certificate")
        _check_pem(cert_pem, b"-----BEGIN CERTIFICATE-----", "client certificate")
        _check_pem(key_pem, b"PRIVATE KEY-----", "client key")
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
        )
        del key_pem
        options = [
            # As the Rust client: straight to coffre, never through a proxy.
            ("grpc.enable_http_proxy", 0),
            ("grpc.primary_user_agent", "coffre-client-python"),
        ]
        options.extend(channel_options)
        channel = grpc.secure_channel(target, credentials, options=options)
        self._setup(channel, endpoint, timeout, reason)

    @classmethod
    def from_data_dir(
        cls,
        data_dir: Any,
        endpoint: str = DEFAULT_ENDPOINT,
        identity: str = "service",
        **kwargs: Any,
    ) -> "Client":
        """A client with the dev PKI of a ``coffre dev --data-dir DIR``
        (``DIR/pki/ca.pem``, ``DIR/pki/<identity>.pem`` and
        ``<identity>-key.pem``)."""
        pki = os.path.join(os.fspath(data_dir), "pki")
        return cls(
            endpoint,
            os.path.join(pki, "ca.pem"),
            os.path.join(pki, f"{identity}.pem"),
            os.path.join(pki, f"{identity}-key.pem"),
            **kwargs,
        )

    @classmethod
    def from_channel(
        cls,
        channel: grpc.Channel,
        *,
        endpoint: str = "",
        timeout: float = DEFAULT_TIMEOUT,
        reason: AccessReason = AccessReason.CUSTOMER_INITIATED_ACCESS,
    ) -> "Client":
        """A client on a channel made elsewhere (with its own TLS settings)."""
        self = cls.__new__(cls)
        self._setup(channel, endpoint, timeout, reason)
        return self

    def _setup(self, channel: grpc.Channel, endpoint: str, timeout: float, reason: Any) -> None:
        self._channel = channel
        self._stub = pb_grpc.DataKeyServiceStub(channel)
        self.endpoint = endpoint
        self.timeout = float(timeout)
        self.reason = AccessReason(reason)

    def __repr__(self) -> str:
        return f"Client(endpoint={self.endpoint!r}, reason={self.reason.name})"

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def generate_data_key(self, key_id: str, context: Optional[Mapping[str, str]] = None) -> GeneratedKey:
        """GenerateDataKey: a fresh 32-byte data key under ``key_id`` (the
        key's UUID or alias), bound to ``context``."""
        request = pb.GenerateDataKeyRequest(
            key_id=key_id,
            encryption_context=normalize_context(context),
            justification=int(self.reason),
            number_of_bytes=DATA_KEY_LEN,
        )
        try:
            response = self._stub.GenerateDataKey(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise rpc_error(e, self.endpoint) from None
        try:
            data_key = DataKey(response.plaintext)
            return GeneratedKey(
                data_key=data_key,
                blob=bytes(response.ciphertext_blob),
                key_id=response.key_id,
                key_version=response.key_version,
            )
        finally:
            # Best effort: protobuf's copy is not ours to overwrite.
            response.Clear()

    def decrypt(self, blob: bytes, context: Optional[Mapping[str, str]] = None) -> DataKey:
        """Decrypt: the data key ``blob`` wraps, if ``context`` is the one it
        was made with and coffre allows it now."""
        request = pb.DecryptRequest(
            ciphertext_blob=bytes(blob),
            encryption_context=normalize_context(context),
            justification=int(self.reason),
            key_id="",
        )
        try:
            response = self._stub.Decrypt(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise rpc_error(e, self.endpoint) from None
        try:
            return DataKey(response.plaintext)
        finally:
            response.Clear()

    def sealer(
        self,
        key_id: str,
        context: Optional[Mapping[str, str]],
        writer: Any,
        frame_len: int = DEFAULT_FRAME_LEN,
    ) -> Tuple[Sealer, GeneratedKey]:
        """Starts a sealed message to ``writer`` under a fresh data key of
        ``key_id`` bound to ``context`` (the header is written at once);
        write the plaintext to it, then call :meth:`Sealer.finish`. Close
        the :class:`GeneratedKey` when done."""
        context = check_seal_arguments(normalize_context(context), None, frame_len)
        generated = self.generate_data_key(key_id, context)
        try:
            sealer = Sealer(writer, generated.data_key, context, generated.blob, frame_len)
        except BaseException:
            generated.close()
            raise
        return sealer, generated

    def opener(
        self, reader: Any, expected: Optional[Mapping[str, str]] = None
    ) -> Tuple[Opener, Header]:
        """Reads the header of the message on ``reader``, has coffre decrypt
        its data key with the header's context (which must equal
        ``expected`` when given), and returns a reader of its plaintext,
        with the header."""
        header = read_header(reader)
        if expected is not None and normalize_context(expected) != header.context:
            raise ContextMismatchError(header.context)
        with self.decrypt(header.blob, header.context) as data_key:
            return Opener(reader, header, data_key), header
