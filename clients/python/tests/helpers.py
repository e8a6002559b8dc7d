"""What the tests share: the golden file, a stand-in wrapped key, plaintexts,
whole-message seal and open, and a switch for cryptography's two AESGCM
paths (``encrypt_into``/``decrypt_into`` when it has them, or not)."""

import contextlib
import io
import json
import os
import unittest

import coffre_client
from coffre_client import format as fmt

HERE = os.path.dirname(os.path.abspath(__file__))

#: tests/data/sealed-v1.json at the root of the repository, or where
#: COFFRE_SEALED_GOLDEN says.
GOLDEN = os.environ.get("COFFRE_SEALED_GOLDEN") or os.path.join(
    HERE, "..", "..", "..", "tests", "data", "sealed-v1.json"
)


def golden():
    """The golden vectors; a missing file fails the test (never a skip)."""
    if not os.path.isfile(GOLDEN):
        raise AssertionError(
            f"the golden messages are missing: {GOLDEN} (run the tests from the coffre "
            "repository, or set COFFRE_SEALED_GOLDEN)"
        )
    with open(GOLDEN, encoding="utf-8") as f:
        data = json.load(f)
    assert data["format"] == "coffre sealed message v1", data["format"]
    assert data["vectors"], "no vectors"
    return data["vectors"]


def blob():
    """A stand-in for coffre's wrapped data key (the format only carries
    it): the one the golden messages hold."""
    return b"CF\x01\x01" + bytes((i * 7) & 0xFF for i in range(112))


def key(byte):
    return coffre_client.DataKey(bytes([byte]) * 32)


def plaintext(n):
    """The golden messages' plaintext of ``n`` bytes."""
    return bytes(((i * 31 + i // 251) & 0xFF) for i in range(n))


def seal_bytes(dk, context, frame_len, plain, chunk=None):
    out = io.BytesIO()
    sealer = coffre_client.Sealer(out, dk, context, blob(), frame_len)
    if chunk is None:
        sealer.copy_from(io.BytesIO(plain))
    else:
        for at in range(0, len(plain), chunk):
            sealer.write(plain[at : at + chunk])
    sealer.finish()
    return out.getvalue()


def open_bytes(dk, message, context=None):
    """(header, plaintext) of a whole message."""
    out = io.BytesIO()
    opened = coffre_client.open(dk, io.BytesIO(message), out, context)
    return opened.header, out.getvalue()


def header_len(message):
    return len(coffre_client.read_header(io.BytesIO(message)).to_bytes())


@contextlib.contextmanager
def without_into():
    """AESGCM's encrypt/decrypt (bytes out) instead of the *_into forms."""
    saved = fmt._HAVE_INTO
    fmt._HAVE_INTO = False
    try:
        yield
    finally:
        fmt._HAVE_INTO = saved


class BothAesgcmPaths(unittest.TestCase):
    """A test case run twice: with cryptography's AESGCM *_into forms when
    it has them, and without."""

    use_into = True

    def setUp(self):
        self._saved_into = fmt._HAVE_INTO
        if not self.use_into:
            fmt._HAVE_INTO = False
        elif not fmt._HAVE_INTO:
            self.skipTest("this cryptography has no AESGCM.encrypt_into (covered by the other path)")

    def tearDown(self):
        fmt._HAVE_INTO = self._saved_into
