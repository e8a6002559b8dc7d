"""Why a message cannot be read, or why coffre refused: the exceptions of
``coffre_client``, each a :class:`CoffreError`.

- :class:`FormatError` and its kinds: the message itself. Every
  cryptographic failure (another data key, a tampered header or frame, a
  truncation, a frame dropped, repeated, reordered or appended) is the one
  :class:`NotAuthenticError`: no oracle says which part was wrong.
  :class:`NotSealedError` says the input is no sealed message at all; the
  others, that its header is malformed or of another version or suite.
- :class:`ClientError` and its kinds: coffre's answer, by what the caller
  can do about it (the mapping of ``client/src/rpc.rs``): the key cannot be
  used now (:class:`KeyUnusableError`, with :class:`KeyDisabledError` and
  its siblings when coffre says the key's state), refused
  (:class:`RefusedError`: :class:`PermissionDeniedError`,
  :class:`NotFoundError`), invalid, throttled, unavailable, not
  authenticated.

No exception carries key material: the messages are the format's own
words or coffre's (which never names a secret), with coffre's request id
(the ``request_id`` of the request's audit record) when it gave one.
"""

from __future__ import annotations

import re
from typing import Dict, Mapping, Optional

__all__ = [
    "CoffreError",
    "FormatError",
    "NotSealedError",
    "UnsupportedVersionError",
    "UnsupportedSuiteError",
    "BadHeaderError",
    "TruncatedHeaderError",
    "NotAuthenticError",
    "InvalidInputError",
    "DataKeyLengthError",
    "ClientError",
    "KeyUnusableError",
    "KeyDisabledError",
    "KeyPendingDeletionError",
    "KeyDestroyedError",
    "RefusedError",
    "PermissionDeniedError",
    "NotFoundError",
    "InvalidRequestError",
    "ThrottledError",
    "UnavailableError",
    "UnauthenticatedError",
    "ConnectError",
    "ContextMismatchError",
]


class CoffreError(Exception):
    """Every error of this package."""


# ---- the message format ----------------------------------------------------


class FormatError(CoffreError):
    """The message cannot be read (``FormatError`` of the Rust crate)."""


class NotSealedError(FormatError):
    """The input does not start as a sealed message does."""

    def __init__(self) -> None:
        super().__init__('not a coffre sealed message (it does not start with "CS")')


class UnsupportedVersionError(FormatError):
    def __init__(self, version: int) -> None:
        self.version = version
        super().__init__(
            f"sealed message format version {version} is not supported "
            "(this build reads version 1)"
        )


class UnsupportedSuiteError(FormatError):
    def __init__(self, suite: int) -> None:
        self.suite = suite
        super().__init__(
            f"sealed message suite {suite} is not supported (this build knows suite 1)"
        )


class BadHeaderError(FormatError):
    """The header breaks a rule of the format (a bound, the context's
    canonical encoding, the wrapped key's shape)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"the sealed message's header is malformed: {reason}")


class TruncatedHeaderError(FormatError):
    def __init__(self) -> None:
        super().__init__("the sealed message ends inside its header")


class NotAuthenticError(FormatError):
    """The one error of every cryptographic failure."""

    def __init__(self) -> None:
        super().__init__(
            "the sealed message is not authentic: it was tampered with or truncated, "
            "or it was not sealed under this data key"
        )


class InvalidInputError(FormatError, ValueError):
    """What the caller asked to seal cannot be sealed (a context beyond
    coffre's limits, a frame length out of range, ...)."""


class DataKeyLengthError(InvalidInputError):
    def __init__(self, length: int) -> None:
        self.length = length
        super().__init__(f"the data key is {length} bytes; a sealed message needs 32")


# ---- coffre's answers ------------------------------------------------------


class ClientError(CoffreError):
    """A call to coffre failed. ``code`` is the gRPC status code's name
    (``"FAILED_PRECONDITION"``; ``None`` for a failure on this side),
    ``message`` coffre's words, ``request_id`` the id of the request's
    audit record (``None`` when coffre did not answer)."""

    #: How the failure reads, before coffre's message.
    prefix = ""

    def __init__(
        self,
        message: str,
        code: Optional[str] = None,
        request_id: Optional[str] = None,
    ) -> None:
        self.message = message
        self.code = code
        self.request_id = request_id
        text = f"{self.prefix}{message}" if self.prefix else message
        if type(self) is ClientError and code is not None:
            text = f"{code}: {message}"
        if request_id:
            text += f" (request id {request_id})"
        super().__init__(text)


class KeyUnusableError(ClientError):
    """The key is disabled, pending deletion or destroyed (the operator's
    decision), or the data key's version is retired:
    ``FAILED_PRECONDITION``. ``key_state`` is the state coffre named
    (``"DISABLED"``, ...), or ``None``."""

    prefix = "the key cannot be used now: "

    @property
    def key_state(self) -> Optional[str]:
        return _key_state(self.message)


class KeyDisabledError(KeyUnusableError):
    """The operator disabled the key: the kill switch."""


class KeyPendingDeletionError(KeyUnusableError):
    pass


class KeyDestroyedError(KeyUnusableError):
    pass


class RefusedError(ClientError):
    """The key does not exist, or this principal may not use it for this
    operation, context or justification: ``PERMISSION_DENIED`` or
    ``NOT_FOUND`` (coffre does not always say which)."""

    prefix = "refused: "


class PermissionDeniedError(RefusedError):
    pass


class NotFoundError(RefusedError):
    pass


class InvalidRequestError(ClientError):
    """coffre found the request invalid, e.g. a wrapped data key that does
    not open with this context: ``INVALID_ARGUMENT`` / ``OUT_OF_RANGE``."""

    prefix = "invalid request: "


class ThrottledError(ClientError):
    """Rate-limited: ``RESOURCE_EXHAUSTED``. Retry later."""

    prefix = "throttled: "


class UnavailableError(ClientError):
    """coffre (or its HSM, store or audit log) cannot serve now, or the
    connection failed: ``UNAVAILABLE``, ``DEADLINE_EXCEEDED``,
    ``CANCELLED``. Retry."""

    prefix = "unavailable: "


class UnauthenticatedError(ClientError):
    """The client certificate was refused: ``UNAUTHENTICATED``."""

    prefix = "not authenticated: "


class ConnectError(ClientError):
    """Connecting cannot even start: a bad endpoint, certificate or key."""

    prefix = "connecting: "


class ContextMismatchError(ClientError):
    """The message's context (in its header, not secret) is not the one the
    caller asserted; nothing was asked of coffre."""

    def __init__(self, found: Mapping[str, str]) -> None:
        self.found: Dict[str, str] = dict(found)
        shown = ",".join(f"{k}={v}" for k, v in self.found.items())
        super().__init__(f"the message's context is {shown}, not the one expected")


_STATE = re.compile(r"\bkey \S+ is (DISABLED|PENDING_DELETION|DESTROYED)\b")

_BY_STATE = {
    "DISABLED": KeyDisabledError,
    "PENDING_DELETION": KeyPendingDeletionError,
    "DESTROYED": KeyDestroyedError,
}


def _key_state(message: str) -> Optional[str]:
    """The state in coffre's refusal of a key that is not enabled
    (``key <id> is DISABLED``, the server's ``KeyNotEnabled``)."""
    found = _STATE.search(message)
    return found.group(1) if found else None


#: The class of each gRPC status code (by name), as ``client/src/rpc.rs``
#: maps them; any other code is a plain :class:`ClientError`.
_BY_CODE = {
    "FAILED_PRECONDITION": KeyUnusableError,
    "PERMISSION_DENIED": PermissionDeniedError,
    "NOT_FOUND": NotFoundError,
    "INVALID_ARGUMENT": InvalidRequestError,
    "OUT_OF_RANGE": InvalidRequestError,
    "RESOURCE_EXHAUSTED": ThrottledError,
    "UNAVAILABLE": UnavailableError,
    "DEADLINE_EXCEEDED": UnavailableError,
    "CANCELLED": UnavailableError,
    "UNAUTHENTICATED": UnauthenticatedError,
}


def from_status(code: str, message: str, request_id: Optional[str]) -> ClientError:
    """The exception of a gRPC status (its code's name and details)."""
    cls = _BY_CODE.get(code, ClientError)
    if cls is KeyUnusableError:
        cls = _BY_STATE.get(_key_state(message) or "", KeyUnusableError)
    return cls(message, code=code, request_id=request_id)
