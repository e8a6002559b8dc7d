"""The sealed message format, version 1 (DESIGN.md, "Sealed message format,
version 1"; the Rust reference is ``client/src/format.rs``): the header,
its strict parser, and the key schedule. Big-endian, fixed widths, no
optional fields::

    header
     0      2    3       4                36             40                44
     | "CS" | 01 | suite | message_id (32) | frame_len u32 | context_len u32 |
     44            44+C          46+C        46+C+W            78+C+W           94+C+W
     | context (C) | blob_len u16 | blob (W) | commitment (32) | header_tag (16) |
    frames, i = 0, 1, ...
     | ciphertext (frame_len, or 0..=frame_len for the last) | tag (16) |

Suite 1: ``prk = HKDF-Extract(salt = message_id, ikm = data key)``, the
frame key ``HKDF-Expand(prk, "coffre/seal/v1/key", 32)``, the commitment
``HKDF-Expand(prk, "coffre/seal/v1/commit", 32)``; AES-256-GCM with the
nonce ``kind || 00 00 00 || u64be(i)`` (kind 0 for the header tag, 1 for a
frame, 2 for the last frame) and, for frames, the AAD ``SHA-256(header)``.

Every primitive is the ``cryptography`` package's (HKDF, AESGCM) or the
standard library's (SHA-256, ``hmac.compare_digest``, ``os.urandom``):
nothing here is a primitive. ``HKDF(salt, info).derive(ikm)`` is
Expand(Extract(salt, ikm), info): two of them, with the same salt and data
key, give the frame key and the commitment of one ``prk``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO, Dict, Mapping, Optional, Tuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import (
    BadHeaderError,
    DataKeyLengthError,
    InvalidInputError,
    NotAuthenticError,
    NotSealedError,
    TruncatedHeaderError,
    UnsupportedSuiteError,
    UnsupportedVersionError,
)

__all__ = [
    "MAGIC",
    "VERSION",
    "SUITE_HKDF_SHA256_AES256GCM_COMMIT",
    "MESSAGE_ID_LEN",
    "COMMITMENT_LEN",
    "TAG_LEN",
    "DATA_KEY_LEN",
    "DEFAULT_FRAME_LEN",
    "MIN_FRAME_LEN",
    "MAX_FRAME_LEN",
    "MAX_FRAMES",
    "MAX_CONTEXT_ENTRIES",
    "MAX_CONTEXT_KEY_LEN",
    "MAX_CONTEXT_VALUE_LEN",
    "MAX_CONTEXT_LEN",
    "MAX_BLOB_LEN",
    "FIXED_HEADER_LEN",
    "DataKey",
    "GeneratedKey",
    "Header",
    "FrameKeys",
    "canonical_context",
    "check_context",
    "parse_context",
    "read_header",
]

#: The first two bytes of every sealed message.
MAGIC = b"CS"
#: The format version this package writes and reads.
VERSION = 1
#: HKDF-SHA256 key schedule with key commitment, AES-256-GCM frames.
SUITE_HKDF_SHA256_AES256GCM_COMMIT = 1
MESSAGE_ID_LEN = 32
COMMITMENT_LEN = 32
TAG_LEN = 16
#: A data key's length: AES-256.
DATA_KEY_LEN = 32
#: Plaintext bytes per frame when the caller does not choose.
DEFAULT_FRAME_LEN = 64 * 1024
#: The smallest and largest frame lengths a message may declare.
MIN_FRAME_LEN = 256
MAX_FRAME_LEN = 4 * 1024 * 1024
#: At most this many frames in one message.
MAX_FRAMES = 1 << 32
#: coffre's limits on an encryption context (the server refuses more).
MAX_CONTEXT_ENTRIES = 64
MAX_CONTEXT_KEY_LEN = 256
MAX_CONTEXT_VALUE_LEN = 1024
#: The largest canonical context those limits allow.
MAX_CONTEXT_LEN = MAX_CONTEXT_ENTRIES * (8 + MAX_CONTEXT_KEY_LEN + MAX_CONTEXT_VALUE_LEN)
#: The wrapped data key: a coffre blob (format v1 is 116 bytes for 32).
MAX_BLOB_LEN = 1024
#: The fixed part of a header: everything but the context and the blob.
FIXED_HEADER_LEN = 2 + 1 + 1 + MESSAGE_ID_LEN + 4 + 4 + 2 + COMMITMENT_LEN + TAG_LEN

_LABEL_KEY = b"coffre/seal/v1/key"
_LABEL_COMMIT = b"coffre/seal/v1/commit"

# The nonce kinds: the header's tag, a frame, the last frame.
_KIND_HEADER = 0
_KIND_FRAME = 1
_KIND_LAST = 2

# Whether this cryptography has AESGCM.encrypt_into / decrypt_into, which
# write into a buffer of ours (overwritten after use) instead of returning
# an immutable bytes object. Tests turn it off to cover the other path.
_HAVE_INTO = hasattr(AESGCM, "encrypt_into") and hasattr(AESGCM, "decrypt_into")


def wipe(buf: Any) -> None:
    """Overwrites a writable buffer (``bytearray``, ``memoryview``) with
    zeros, in place."""
    view = memoryview(buf).cast("B")
    view[:] = bytes(len(view))


class DataKey:
    """A plaintext data key, held in a ``bytearray`` that :meth:`close`
    (or leaving a ``with`` block, or the object's collection) overwrites
    with zeros. Never shown (``repr`` and ``str`` say ``<redacted>``),
    never copied or pickled, compared by identity only."""

    __slots__ = ("_key", "__weakref__")

    def __init__(self, key: Any) -> None:
        """``key``: the 32 bytes (any bytes-like), copied. A caller holding
        them in a ``bytearray`` should wipe it after (see :func:`wipe`)."""
        view = memoryview(key).cast("B")
        if len(view) != DATA_KEY_LEN:
            raise DataKeyLengthError(len(view))
        self._key: Optional[bytearray] = bytearray(view)

    def _material(self) -> bytearray:
        if self._key is None:
            raise ValueError("this data key was closed")
        return self._key

    @property
    def closed(self) -> bool:
        return self._key is None

    def close(self) -> None:
        """Overwrites the key; it cannot be used after."""
        if self._key is not None:
            wipe(self._key)
            self._key = None

    def __enter__(self) -> "DataKey":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def __repr__(self) -> str:
        return "DataKey(<redacted>)"

    __str__ = __repr__

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("a DataKey cannot be pickled")

    def __copy__(self) -> Any:
        raise TypeError("a DataKey cannot be copied")

    def __deepcopy__(self, memo: Any) -> Any:
        raise TypeError("a DataKey cannot be copied")


class GeneratedKey:
    """A data key from GenerateDataKey: its plaintext (a :class:`DataKey`,
    wiped by :meth:`close`), its wrapped form and which key version wrapped
    it."""

    __slots__ = ("data_key", "blob", "key_id", "key_version")

    def __init__(self, data_key: DataKey, blob: bytes, key_id: str, key_version: int) -> None:
        self.data_key = data_key
        self.blob = blob
        self.key_id = key_id
        self.key_version = key_version

    def close(self) -> None:
        self.data_key.close()

    def __enter__(self) -> "GeneratedKey":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"GeneratedKey(data_key=<redacted>, blob=<{len(self.blob)} bytes>, "
            f"key_id={self.key_id!r}, key_version={self.key_version})"
        )

    __str__ = __repr__

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("a GeneratedKey cannot be pickled")


# ---- the encryption context ------------------------------------------------


def _utf8(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise InvalidInputError(f"a context {what} must be a str, not {type(text).__name__}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInputError(f"a context {what} is not valid Unicode") from None


def normalize_context(context: Optional[Mapping[str, str]]) -> Dict[str, str]:
    """A context as a dict in canonical order (sorted by key; Python orders
    ``str`` by code point, which is the order of their UTF-8 bytes, the
    Rust side's), its entries checked to be ``str`` and encodable."""
    if context is None:
        return {}
    if not isinstance(context, Mapping):
        raise InvalidInputError("the context must be a mapping of str to str")
    items = []
    for k, v in context.items():
        _utf8(k, "key")
        _utf8(v, "value")
        items.append((k, v))
    return dict(sorted(items))


def check_context(context: Mapping[str, str]) -> None:
    """Checks a context against coffre's limits (``InvalidInputError``)."""
    reason = _context_limits(normalize_context(context))
    if reason is not None:
        raise InvalidInputError(reason)


def _context_limits(context: Mapping[str, str]) -> Optional[str]:
    if len(context) > MAX_CONTEXT_ENTRIES:
        return "more than 64 context entries"
    for k, v in context.items():
        k_len = len(k.encode("utf-8"))
        if k_len == 0 or k_len > MAX_CONTEXT_KEY_LEN:
            return "a context key is empty or longer than 256 bytes"
        if len(v.encode("utf-8")) > MAX_CONTEXT_VALUE_LEN:
            return "a context value is longer than 1024 bytes"
    return None


def canonical_context(context: Mapping[str, str]) -> bytes:
    """The canonical encoding of a context: entries sorted by key, each key
    and value as a u32be length then its UTF-8 bytes (as coffre's blobs)."""
    out = bytearray()
    for k, v in normalize_context(context).items():
        for part in (k.encode("utf-8"), v.encode("utf-8")):
            out += struct.pack(">I", len(part))
            out += part
    return bytes(out)


def parse_context(data: bytes) -> Dict[str, str]:
    """Parses a canonical context: strictly increasing keys, valid UTF-8,
    coffre's limits, nothing left over; so a context has one encoding only
    (``BadHeaderError`` otherwise)."""
    view = memoryview(data)
    at = 0
    out: Dict[str, str] = {}
    last: Optional[str] = None

    def part() -> str:
        nonlocal at
        if len(view) - at < 4:
            raise BadHeaderError("a context entry is cut")
        (length,) = struct.unpack_from(">I", view, at)
        at += 4
        if len(view) - at < length:
            raise BadHeaderError("a context entry is cut")
        raw = bytes(view[at : at + length])
        at += length
        try:
            return raw.decode("utf-8", errors="strict")
        except UnicodeDecodeError:
            raise BadHeaderError("a context entry is not UTF-8") from None

    while at < len(view):
        key = part()
        value = part()
        if last is not None and last >= key:
            raise BadHeaderError("context keys are not in strictly increasing order")
        last = key
        out[key] = value
    reason = _context_limits(out)
    if reason is not None:
        raise BadHeaderError(reason)
    return out


# ---- reading ---------------------------------------------------------------


def read_into(reader: Any, view: memoryview) -> int:
    """One read of ``reader`` into ``view``; the bytes read (0 at the end
    of the input). ``readinto`` when the reader has it, else ``read``."""
    readinto = getattr(reader, "readinto", None)
    if readinto is not None:
        n = readinto(view)
    else:
        chunk = reader.read(len(view))
        if chunk is None:
            n = None
        else:
            n = len(chunk)
            view[:n] = chunk
    if n is None:
        raise BlockingIOError("the input is non-blocking and has no data now")
    return n


def read_up_to(reader: Any, buf: Any) -> int:
    """Reads until ``buf`` is full or the input ends; the bytes read."""
    view = memoryview(buf).cast("B")
    got = 0
    while got < len(view):
        n = read_into(reader, view[got:])
        if n == 0:
            break
        got += n
    return got


def _read_exact(reader: Any, n: int) -> bytes:
    buf = bytearray(n)
    if read_up_to(reader, buf) < n:
        raise TruncatedHeaderError()
    return bytes(buf)


# ---- the header ------------------------------------------------------------


@dataclass
class Header:
    """A message's header, parsed and bounded, not yet authenticated: its
    tag and commitment are checked by :meth:`keys` with the data key."""

    suite: int
    message_id: bytes
    frame_len: int
    #: The encryption context the data key is bound to (not secret: it is
    #: in every message, in clear), in canonical order.
    context: Dict[str, str]
    #: The wrapped data key, for coffre's Decrypt.
    blob: bytes
    commitment: bytes
    tag: bytes

    def authenticated_bytes(self) -> bytes:
        """Every header byte before the tag."""
        context = canonical_context(self.context)
        return b"".join(
            (
                MAGIC,
                bytes((VERSION, self.suite)),
                self.message_id,
                struct.pack(">II", self.frame_len, len(context)),
                context,
                struct.pack(">H", len(self.blob)),
                self.blob,
                self.commitment,
            )
        )

    def to_bytes(self) -> bytes:
        """The whole header, as written."""
        return self.authenticated_bytes() + self.tag

    def keys(self, data_key: DataKey) -> "FrameKeys":
        """The frame key, once the commitment (compared in constant time,
        first) and the header's tag check out under ``data_key``;
        :class:`NotAuthenticError` otherwise."""
        aead, commitment = _schedule(data_key, self.message_id)
        if not hmac.compare_digest(commitment, self.commitment):
            raise NotAuthenticError()
        authenticated = self.authenticated_bytes()
        try:
            aead.decrypt(_nonce(_KIND_HEADER, 0), self.tag, authenticated)
        except InvalidTag:
            raise NotAuthenticError() from None
        return FrameKeys(aead, hashlib.sha256(authenticated + self.tag).digest())

    @classmethod
    def seal(
        cls,
        data_key: DataKey,
        context: Mapping[str, str],
        blob: bytes,
        frame_len: int = DEFAULT_FRAME_LEN,
    ) -> Tuple["Header", "FrameKeys"]:
        """A new header for ``context`` and ``blob`` (the data key's wrapped
        form), sealed under ``data_key`` with a random message id; its
        frame keys."""
        context = check_seal_arguments(context, blob, frame_len)
        return cls.seal_with_id(data_key, context, blob, frame_len, os.urandom(MESSAGE_ID_LEN))

    @classmethod
    def seal_with_id(
        cls,
        data_key: DataKey,
        context: Mapping[str, str],
        blob: bytes,
        frame_len: int,
        message_id: bytes,
    ) -> Tuple["Header", "FrameKeys"]:
        """:meth:`seal` with a given message id: for golden messages only (a
        message id must be random and never reused)."""
        context = check_seal_arguments(context, blob, frame_len)
        if len(message_id) != MESSAGE_ID_LEN:
            raise InvalidInputError("a message id is 32 bytes")
        aead, commitment = _schedule(data_key, bytes(message_id))
        header = cls(
            suite=SUITE_HKDF_SHA256_AES256GCM_COMMIT,
            message_id=bytes(message_id),
            frame_len=frame_len,
            context=context,
            blob=bytes(blob),
            commitment=commitment,
            tag=b"",
        )
        header.tag = aead.encrypt(_nonce(_KIND_HEADER, 0), b"", header.authenticated_bytes())
        return header, FrameKeys(aead, hashlib.sha256(header.to_bytes()).digest())


def check_seal_arguments(context: Mapping[str, str], blob: bytes, frame_len: int) -> Dict[str, str]:
    """What a header may hold, checked before anything is asked of coffre
    or written; the context in canonical order."""
    if (
        not isinstance(frame_len, int)
        or isinstance(frame_len, bool)
        or not MIN_FRAME_LEN <= frame_len <= MAX_FRAME_LEN
    ):
        raise InvalidInputError("the frame length must be 256 bytes to 4 MiB")
    context = normalize_context(context)
    reason = _context_limits(context)
    if reason is not None:
        raise InvalidInputError(reason)
    if blob is not None and (
        not 0 < len(blob) <= MAX_BLOB_LEN or not bytes(blob[:2]) == b"CF"
    ):
        raise InvalidInputError(
            "the wrapped data key must be a coffre blob of at most 1024 bytes"
        )
    return context


def read_header(reader: BinaryIO) -> Header:
    """Reads exactly one header from ``reader``, strictly: magic, version,
    suite, bounds, a canonical context, a blob that looks like coffre's.
    The errors, and the order they are found in, are the Rust crate's."""
    start = bytearray(4)
    got = read_up_to(reader, start)
    # What the message is, first: a short input that is no sealed message
    # is said to be that, not a truncated one.
    if not MAGIC.startswith(bytes(start[: min(got, 2)])):
        raise NotSealedError()
    if got < 4:
        raise TruncatedHeaderError()
    fixed = bytes(start) + _read_exact(reader, 2 + 1 + 1 + MESSAGE_ID_LEN + 4 + 4 - 4)
    if fixed[:2] != MAGIC:
        raise NotSealedError()
    version, suite = fixed[2], fixed[3]
    if version != VERSION:
        raise UnsupportedVersionError(version)
    if suite != SUITE_HKDF_SHA256_AES256GCM_COMMIT:
        raise UnsupportedSuiteError(suite)
    message_id = fixed[4 : 4 + MESSAGE_ID_LEN]
    frame_len, context_len = struct.unpack_from(">II", fixed, 4 + MESSAGE_ID_LEN)
    if not MIN_FRAME_LEN <= frame_len <= MAX_FRAME_LEN:
        raise BadHeaderError("frame length out of range")
    if context_len > MAX_CONTEXT_LEN:
        raise BadHeaderError("context too long")
    context = parse_context(_read_exact(reader, context_len))
    (blob_len,) = struct.unpack(">H", _read_exact(reader, 2))
    if blob_len == 0 or blob_len > MAX_BLOB_LEN:
        raise BadHeaderError("wrapped data key length out of range")
    blob = _read_exact(reader, blob_len)
    if not blob.startswith(b"CF"):
        raise BadHeaderError("the wrapped data key is not a coffre blob")
    tail = _read_exact(reader, COMMITMENT_LEN + TAG_LEN)
    return Header(
        suite=suite,
        message_id=message_id,
        frame_len=frame_len,
        context=context,
        blob=blob,
        commitment=tail[:COMMITMENT_LEN],
        tag=tail[COMMITMENT_LEN:],
    )


# ---- the key schedule and the frames ---------------------------------------


class FrameKeys:
    """The frame key of one message and the frames' AAD (the header's
    digest). Never shown."""

    __slots__ = ("_aead", "_aad")

    def __init__(self, aead: AESGCM, aad: bytes) -> None:
        self._aead: Optional[AESGCM] = aead
        self._aad = aad

    def __repr__(self) -> str:
        return "FrameKeys(<redacted>)"

    __str__ = __repr__

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("FrameKeys cannot be pickled")

    def close(self) -> None:
        """Drops the cipher (and with it cryptography's copy of the key)."""
        self._aead = None

    def _cipher(self) -> AESGCM:
        if self._aead is None:
            raise ValueError("these frame keys were closed")
        return self._aead

    def seal_frame(self, index: int, last: bool, plaintext: memoryview, out: memoryview) -> int:
        """Seals frame ``index`` of ``plaintext`` into ``out`` (exactly
        ``len(plaintext) + 16`` bytes: ciphertext then tag); its length."""
        nonce = _nonce(_KIND_LAST if last else _KIND_FRAME, index)
        aead = self._cipher()
        if _HAVE_INTO:
            return aead.encrypt_into(nonce, plaintext, self._aad, out)
        sealed = aead.encrypt(nonce, bytes(plaintext), self._aad)
        out[: len(sealed)] = sealed
        return len(sealed)

    def open_frame(self, index: int, last: bool, frame: memoryview, out: memoryview) -> int:
        """Opens frame ``index`` (ciphertext then tag) into ``out``
        (exactly ``len(frame) - 16`` bytes); the plaintext's length.
        :class:`NotAuthenticError` if the tag does not verify, and then
        ``out`` is overwritten: nothing unverified is left in it."""
        if len(frame) < TAG_LEN:
            raise NotAuthenticError()
        nonce = _nonce(_KIND_LAST if last else _KIND_FRAME, index)
        aead = self._cipher()
        try:
            if _HAVE_INTO:
                return aead.decrypt_into(nonce, frame, self._aad, out)
            plain = aead.decrypt(nonce, bytes(frame), self._aad)
        except InvalidTag:
            wipe(out)
            raise NotAuthenticError() from None
        out[: len(plain)] = plain
        return len(plain)


def _nonce(kind: int, index: int) -> bytes:
    return bytes((kind, 0, 0, 0)) + struct.pack(">Q", index)


def _schedule(data_key: DataKey, message_id: bytes) -> Tuple[AESGCM, bytes]:
    """The frame cipher and the commitment of (data key, message id)."""
    if not isinstance(data_key, DataKey):
        raise TypeError("a DataKey is needed (coffre_client.DataKey)")
    ikm = data_key._material()

    def expand(label: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=message_id, info=label).derive(
            ikm
        )

    # The frame key goes to AESGCM as immutable bytes: an implementation
    # that keeps a reference to its key (rather than a copy) must never see
    # it change.
    return AESGCM(expand(_LABEL_KEY)), expand(_LABEL_COMMIT)
