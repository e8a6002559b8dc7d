"""Sealing and opening byte streams in constant memory: one frame of
plaintext buffered at a time (``client/src/stream.rs``).

:class:`Sealer` takes plaintext by :meth:`Sealer.write` (or
:meth:`Sealer.copy_from` a reader) and writes a frame each time
``frame_len`` bytes have come and more follow; :meth:`Sealer.finish` seals
the last frame (perhaps empty), and must be called: a message without its
last frame does not open.

:class:`Opener` is a readable raw stream of a message's plaintext: it hands
out each frame's plaintext only once its tag verified, before later frames
are read. A message cut short or tampered with further on fails only when
the reader gets there: treat what was read as unverified until a read
returned ``b""`` (the end of the last frame, verified). The last frame is
the one the input ends after, as the format says.

:func:`seal` and :func:`open` do the whole: a data key from coffre (or
given), the header, every frame.

The buffers are ``bytearray``\\ s overwritten with zeros when a stream is
finished or closed. Writers get ``memoryview``\\ s of them, which they must
not keep past ``write`` (the contract of Python's file objects).
"""

from __future__ import annotations

import io
from typing import Any, Mapping, NamedTuple, Optional

from .errors import ContextMismatchError, InvalidInputError, NotAuthenticError
from .format import (
    DEFAULT_FRAME_LEN,
    MAX_FRAMES,
    TAG_LEN,
    DataKey,
    FrameKeys,
    GeneratedKey,
    Header,
    check_seal_arguments,
    normalize_context,
    read_header,
    read_into,
    read_up_to,
    wipe,
)

__all__ = ["Sealer", "Opener", "Sealed", "Opened", "seal", "open"]


def write_all(writer: Any, data: memoryview) -> None:
    """Writes all of ``data`` (a raw stream may take part of it per call;
    a writer returning ``None`` is taken to have written it all)."""
    while len(data):
        n = writer.write(data)
        if n is None:
            return
        data = data[n:]


class Sealer:
    """Writes a sealed message to ``writer``: the header at once, then a
    frame each time ``frame_len`` bytes of plaintext have come and more
    follow, the last frame at :meth:`finish`.

    As a context manager, leaving the block normally finishes the message;
    leaving it by an exception does not (the message will not open) and
    wipes the buffer."""

    def __init__(
        self,
        writer: Any,
        data_key: DataKey,
        context: Mapping[str, str],
        blob: bytes,
        frame_len: int = DEFAULT_FRAME_LEN,
    ) -> None:
        header, keys = Header.seal(data_key, context, blob, frame_len)
        raw = header.to_bytes()
        write_all(writer, memoryview(raw))
        self._start(writer, keys, frame_len, len(raw))

    @classmethod
    def started(cls, writer: Any, keys: FrameKeys, frame_len: int) -> "Sealer":
        """A sealer whose header is already written (golden messages)."""
        self = cls.__new__(cls)
        self._start(writer, keys, frame_len, 0)
        return self

    def _start(self, writer: Any, keys: FrameKeys, frame_len: int, written: int) -> None:
        self._writer = writer
        self._keys: Optional[FrameKeys] = keys
        self._frame_len = frame_len
        # The plaintext of the frame being filled, and the sealed frame.
        self._plain = bytearray(frame_len)
        self._sealed = bytearray(frame_len + TAG_LEN)
        self._fill = 0
        self._index = 0
        self._plaintext_len = 0
        self._written = written
        self._done = False

    def __repr__(self) -> str:
        return f"Sealer(frame_len={self._frame_len}, frames={self._index})"

    @property
    def plaintext_len(self) -> int:
        """Plaintext bytes taken so far."""
        return self._plaintext_len

    @property
    def sealed_len(self) -> int:
        """Bytes written to the writer so far (header included when this
        sealer wrote it)."""
        return self._written

    def _check_open(self) -> FrameKeys:
        if self._done or self._keys is None:
            raise ValueError("this sealer is finished or closed")
        return self._keys

    def _emit(self, last: bool) -> None:
        keys = self._check_open()
        if self._index >= MAX_FRAMES:
            raise InvalidInputError("the message is too long: at most 2^32 frames")
        n = self._fill
        out = memoryview(self._sealed)[: n + TAG_LEN]
        keys.seal_frame(self._index, last, memoryview(self._plain)[:n], out)
        write_all(self._writer, out)
        self._written += n + TAG_LEN
        self._index += 1
        self._fill = 0

    def write(self, data: Any) -> int:
        """Takes all of ``data`` (any bytes-like); its length."""
        self._check_open()
        view = memoryview(data).cast("B")
        size = len(view)
        at = 0
        while at < size:
            # A full frame goes out only once more plaintext comes: the
            # last frame must be the one finish() seals.
            if self._fill == self._frame_len:
                self._emit(last=False)
            take = min(self._frame_len - self._fill, size - at)
            self._plain[self._fill : self._fill + take] = view[at : at + take]
            self._fill += take
            at += take
        self._plaintext_len += size
        return size

    def copy_from(self, reader: Any) -> int:
        """Takes everything ``reader`` gives until its end, read straight
        into the frame buffer; the bytes taken."""
        self._check_open()
        total = 0
        one = bytearray(1)
        while True:
            if self._fill == self._frame_len:
                # Full: it is the last frame unless one more byte comes.
                if read_into(reader, memoryview(one)) == 0:
                    return total
                self._emit(last=False)
                self._plain[0] = one[0]
                self._fill = 1
                self._plaintext_len += 1
                total += 1
                continue
            n = read_into(reader, memoryview(self._plain)[self._fill :])
            if n == 0:
                return total
            self._fill += n
            self._plaintext_len += n
            total += n

    def finish(self) -> int:
        """Seals the last frame, flushes the writer, wipes the buffers; the
        plaintext's length."""
        try:
            self._emit(last=True)
            flush = getattr(self._writer, "flush", None)
            if flush is not None:
                flush()
            self._done = True
        finally:
            self.close()
        return self._plaintext_len

    def close(self) -> None:
        """Wipes the buffers and drops the frame key. A sealer closed before
        :meth:`finish` leaves a message that does not open."""
        wipe(self._plain)
        wipe(self._sealed)
        if self._keys is not None:
            self._keys.close()
            self._keys = None

    def __enter__(self) -> "Sealer":
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is None and not self._done:
            self.finish()
        else:
            self.close()


class Opener(io.RawIOBase):
    """The plaintext of a sealed message whose header was read from
    ``reader`` already, frame by frame, each verified before any of it is
    returned; ``b""`` (or ``readinto`` returning 0) only after the last
    frame verified. Any failure is :class:`NotAuthenticError`, raised again
    by every later read. The commitment and the header's tag are checked
    here, under ``data_key`` (what coffre's Decrypt gave for
    ``header.blob`` and ``header.context``)."""

    def __init__(self, reader: Any, header: Header, data_key: DataKey) -> None:
        super().__init__()
        self._keys: Optional[FrameKeys] = header.keys(data_key)
        self._reader = reader
        self._frame_len = header.frame_len
        # The current frame as read (ciphertext then tag), and its plaintext.
        self._frame = bytearray(header.frame_len + TAG_LEN)
        self._plain = bytearray(header.frame_len)
        self._pos = 0
        self._plain_len = 0
        # One byte read past a full frame to learn that another follows.
        self._peeked: Optional[int] = None
        self._index = 0
        self._done = False
        self._failed = False

    def __repr__(self) -> str:
        return f"Opener(frame_len={self._frame_len}, frames={self._index}, done={self._done})"

    def readable(self) -> bool:
        return True

    @property
    def verified(self) -> bool:
        """Whether the whole message was read and verified."""
        return self._done and self._pos == self._plain_len

    def _next_frame(self) -> None:
        keys = self._keys
        if keys is None:
            raise ValueError("this opener is closed")
        frame = memoryview(self._frame)
        filled = 0
        if self._peeked is not None:
            frame[0] = self._peeked
            self._peeked = None
            filled = 1
        filled += read_up_to(self._reader, frame[filled:])
        # A full frame is the last one only if nothing follows it.
        if filled < len(frame):
            last = True
        else:
            one = bytearray(1)
            if read_into(self._reader, memoryview(one)) == 1:
                self._peeked = one[0]
                last = False
            else:
                last = True
        if filled < TAG_LEN or self._index >= MAX_FRAMES:
            raise NotAuthenticError()
        n = filled - TAG_LEN
        keys.open_frame(self._index, last, frame[:filled], memoryview(self._plain)[:n])
        self._index += 1
        self._pos = 0
        self._plain_len = n
        self._done = last

    def _available(self) -> bool:
        """Makes verified plaintext available (reading and opening the next
        frame if need be); ``False`` at the verified end."""
        if self._failed:
            raise NotAuthenticError()
        try:
            while self._pos == self._plain_len:
                if self._done:
                    return False
                self._next_frame()
        except NotAuthenticError:
            self._failed = True
            wipe(self._plain)
            raise
        return True

    def _verified_chunk(self) -> Optional[memoryview]:
        """All the verified plaintext not handed out yet (the rest of the
        current frame); ``None`` at the verified end."""
        if not self._available():
            return None
        chunk = memoryview(self._plain)[self._pos : self._plain_len]
        self._pos = self._plain_len
        return chunk

    def readinto(self, b: Any) -> int:
        out = memoryview(b).cast("B")
        if len(out) == 0 or not self._available():
            return 0
        n = min(len(out), self._plain_len - self._pos)
        out[:n] = memoryview(self._plain)[self._pos : self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        """Wipes the buffers and drops the frame key."""
        if not self.closed:
            wipe(self._frame)
            wipe(self._plain)
            if self._keys is not None:
                self._keys.close()
                self._keys = None
        super().close()


class Sealed(NamedTuple):
    """What :func:`seal` did."""

    key_id: str
    key_version: int
    context: Mapping[str, str]
    plaintext_len: int
    sealed_len: int


class Opened(NamedTuple):
    """What :func:`open` did: the message's header (its context, ...) and
    the plaintext's length."""

    header: Header
    plaintext_len: int


def seal(
    client_or_datakey: Any,
    key_id: Optional[str],
    context: Optional[Mapping[str, str]],
    reader: Any,
    writer: Any,
    frame_len: int = DEFAULT_FRAME_LEN,
) -> Sealed:
    """Seals all of ``reader`` into ``writer``.

    ``client_or_datakey``: a :class:`~coffre_client.Client` (or anything
    with its ``generate_data_key(key_id, context)``), which gives a fresh
    data key of ``key_id`` bound to ``context``, wiped after; or a
    :class:`~coffre_client.GeneratedKey` from an earlier
    ``generate_data_key`` with that same context (its data key, its blob;
    ``key_id`` is then not used, and the caller closes it).
    """
    # What the header may hold is checked before coffre is asked anything.
    context = check_seal_arguments(normalize_context(context), None, frame_len)
    if isinstance(client_or_datakey, GeneratedKey):
        generated, owned = client_or_datakey, False
    elif isinstance(client_or_datakey, DataKey):
        raise TypeError(
            "seal needs the data key's wrapped form too: pass a Client or a GeneratedKey"
        )
    else:
        if not key_id:
            raise InvalidInputError("seal needs the key (its id or alias)")
        generated, owned = client_or_datakey.generate_data_key(key_id, context), True
    try:
        sealer = Sealer(writer, generated.data_key, context, generated.blob, frame_len)
        try:
            sealer.copy_from(reader)
            plaintext_len = sealer.finish()
        finally:
            sealer.close()
        return Sealed(
            key_id=generated.key_id,
            key_version=generated.key_version,
            context=context,
            plaintext_len=plaintext_len,
            sealed_len=sealer.sealed_len,
        )
    finally:
        if owned:
            generated.close()


def open(  # noqa: A001 - the name of the operation, as in the Rust crate
    client_or_datakey: Any,
    reader: Any,
    writer: Any,
    context: Optional[Mapping[str, str]] = None,
) -> Opened:
    """Opens the message on ``reader``, writing its plaintext to ``writer``
    frame by frame as each verifies. On an error, what was written is not
    to be trusted (write to a temporary file and keep it only on success,
    as the CLI does).

    ``client_or_datakey``: a :class:`~coffre_client.Client` (or anything
    with its ``decrypt(blob, context)``), asked for the data key of the
    header's blob and context, wiped after; or the
    :class:`~coffre_client.DataKey` itself (or a ``GeneratedKey``).
    ``context``: when given, the header's context must be exactly it, or
    :class:`ContextMismatchError` before anything is asked of coffre.
    """
    header = read_header(reader)
    if context is not None and normalize_context(context) != header.context:
        raise ContextMismatchError(header.context)
    if isinstance(client_or_datakey, DataKey):
        data_key, owned = client_or_datakey, False
    elif isinstance(client_or_datakey, GeneratedKey):
        data_key, owned = client_or_datakey.data_key, False
    else:
        data_key, owned = client_or_datakey.decrypt(header.blob, header.context), True
    try:
        opener = Opener(reader, header, data_key)
        try:
            total = 0
            while True:
                chunk = opener._verified_chunk()
                if chunk is None:
                    return Opened(header=header, plaintext_len=total)
                write_all(writer, chunk)
                total += len(chunk)
        finally:
            opener.close()
    finally:
        if owned:
            data_key.close()
