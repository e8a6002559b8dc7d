"""The sealed message format, version 1, as DESIGN.md and the Rust crate
have it: the golden messages open, seal again to the same bytes and are
rebuilt from the specification alone; headers are parsed strictly with the
Rust crate's errors; a tamper matrix (every byte flipped, every
truncation, frames dropped, reordered, repeated or appended, another data
key) gets the one generic error; round trips at the frame boundaries."""

import hashlib
import hmac
import io
import struct
import unittest

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

import coffre_client
from coffre_client import errors
from coffre_client import format as fmt

from helpers import (
    BothAesgcmPaths,
    blob,
    golden,
    header_len,
    key,
    open_bytes,
    plaintext,
    seal_bytes,
)

MIN = fmt.MIN_FRAME_LEN
TAG = fmt.TAG_LEN


def parse(message):
    return coffre_client.read_header(io.BytesIO(message))


def from_the_spec(data_key, message_id, frame_len, context, blob_bytes, plain):
    """A message from DESIGN.md alone: cryptography's HKDF and AESGCM,
    hashlib's SHA-256, none of the package's code."""

    def expand(label):
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=message_id, info=label).derive(
            data_key
        )

    k = AESGCM(expand(b"coffre/seal/v1/key"))
    commitment = expand(b"coffre/seal/v1/commit")
    ctx = b""
    for name in sorted(context):
        for part in (name.encode(), context[name].encode()):
            ctx += struct.pack(">I", len(part)) + part
    before_tag = (
        b"CS\x01\x01"
        + message_id
        + struct.pack(">II", frame_len, len(ctx))
        + ctx
        + struct.pack(">H", len(blob_bytes))
        + blob_bytes
        + commitment
    )
    header = before_tag + k.encrypt(b"\x00\x00\x00\x00" + bytes(8), b"", before_tag)
    aad = hashlib.sha256(header).digest()
    frames = [plain[i : i + frame_len] for i in range(0, len(plain), frame_len)] or [b""]
    out = header
    for i, frame in enumerate(frames):
        kind = 2 if i == len(frames) - 1 else 1
        out += k.encrypt(bytes([kind, 0, 0, 0]) + struct.pack(">Q", i), frame, aad)
    return out


class Golden(BothAesgcmPaths):
    """tests/data/sealed-v1.json: every build opens them."""

    def test_every_golden_message_opens_to_its_plaintext_and_context(self):
        for v in golden():
            with self.subTest(v["name"]):
                dk = coffre_client.DataKey(bytes.fromhex(v["data_key"]))
                header, plain = open_bytes(dk, bytes.fromhex(v["message"]))
                self.assertEqual(plain, bytes.fromhex(v["plaintext"]))
                self.assertEqual(header.context, v["context"])
                # Asserting the context it has opens too.
                open_bytes(dk, bytes.fromhex(v["message"]), v["context"])

    def test_every_golden_message_seals_again_to_the_same_bytes(self):
        for v in golden():
            with self.subTest(v["name"]):
                message = bytes.fromhex(v["message"])
                parsed = parse(message)
                dk = coffre_client.DataKey(bytes.fromhex(v["data_key"]))
                header, keys = coffre_client.Header.seal_with_id(
                    dk, v["context"], parsed.blob, parsed.frame_len, parsed.message_id
                )
                self.assertEqual(header, parsed)
                out = io.BytesIO()
                out.write(header.to_bytes())
                sealer = coffre_client.Sealer.started(out, keys, parsed.frame_len)
                sealer.write(bytes.fromhex(v["plaintext"]))
                sealer.finish()
                self.assertEqual(out.getvalue().hex(), v["message"])

    def test_every_golden_message_is_what_the_specification_says(self):
        for v in golden():
            with self.subTest(v["name"]):
                message = bytes.fromhex(v["message"])
                parsed = parse(message)
                self.assertEqual(parsed.blob, blob())
                rebuilt = from_the_spec(
                    bytes.fromhex(v["data_key"]),
                    parsed.message_id,
                    parsed.frame_len,
                    v["context"],
                    parsed.blob,
                    bytes.fromhex(v["plaintext"]),
                )
                self.assertEqual(rebuilt.hex(), v["message"])

    def test_a_golden_message_under_another_key_is_not_authentic(self):
        v = golden()[-1]
        with self.assertRaises(errors.NotAuthenticError):
            open_bytes(key(0x77), bytes.fromhex(v["message"]))


class GoldenWithoutInto(Golden):
    use_into = False


class RoundTrips(BothAesgcmPaths):
    def test_every_size_around_the_frame_boundaries_round_trips(self):
        dk = key(0x42)
        ctx = {"tenant": "acme", "object": "invoices/2026/12.pdf"}
        for frame_len in (MIN, 1000):
            for n in (
                0,
                1,
                frame_len - 1,
                frame_len,
                frame_len + 1,
                2 * frame_len - 1,
                2 * frame_len,
                2 * frame_len + 1,
                3 * frame_len,
                5 * frame_len + 17,
            ):
                with self.subTest(frame_len=frame_len, n=n):
                    plain = plaintext(n)
                    for chunk in (None, 1, 97, frame_len, 10_000):
                        message = seal_bytes(dk, ctx, frame_len, plain, chunk)
                        # One frame per started frame_len of plaintext, and
                        # one (empty) for an empty plaintext: never an empty
                        # frame after a full one.
                        frames = max(1, -(-n // frame_len))
                        self.assertEqual(len(message), header_len(message) + n + frames * TAG)
                        header, opened = open_bytes(dk, message)
                        self.assertEqual(opened, plain)
                        self.assertEqual(header.context, dict(sorted(ctx.items())))
                        self.assertEqual(header.blob, blob())
                        self.assertEqual(header.frame_len, frame_len)

    def test_the_default_frame_length_round_trips_at_its_boundaries(self):
        dk = key(0x43)
        f = fmt.DEFAULT_FRAME_LEN
        self.assertEqual(f, 65536)
        for n in (0, 1, f - 1, f, f + 1, 3 * f):
            with self.subTest(n=n):
                plain = plaintext(n)
                out = io.BytesIO()
                sealed = coffre_client.seal(
                    coffre_client.GeneratedKey(dk, blob(), "kid", 1), None, {}, io.BytesIO(plain), out
                )
                self.assertEqual(sealed.plaintext_len, n)
                self.assertEqual(sealed.sealed_len, len(out.getvalue()))
                frames = max(1, -(-n // f))
                message = out.getvalue()
                self.assertEqual(len(message), header_len(message) + n + frames * TAG)
                self.assertEqual(open_bytes(dk, message)[1], plain)

    def test_two_seals_of_the_same_input_differ(self):
        dk = key(1)
        self.assertNotEqual(seal_bytes(dk, {}, MIN, b"same"), seal_bytes(dk, {}, MIN, b"same"))

    def test_utf8_contexts_are_sorted_by_their_bytes(self):
        dk = key(2)
        ctx = {"é": "1", "z": "2", "a": "3", "Z": "4", "日本": "5"}
        message = seal_bytes(dk, ctx, MIN, b"x")
        header = parse(message)
        self.assertEqual(list(header.context), sorted(ctx, key=lambda k: k.encode()))
        self.assertEqual(open_bytes(dk, message, ctx)[1], b"x")


class RoundTripsWithoutInto(RoundTrips):
    use_into = False


def three_frames():
    """A 3-frame message (the last partial), its key, plaintext and header
    length."""
    dk = key(0x17)
    plain = plaintext(2 * MIN + 100)
    message = seal_bytes(dk, {"k": "v"}, MIN, plain)
    return dk, message, plain, header_len(message)


class Tamper(BothAesgcmPaths):
    def assert_refused(self, dk, message, what):
        """Refused; with the generic error when the header parses."""
        try:
            parse(message)
        except errors.FormatError:
            header_ok = False
        else:
            header_ok = True
        with self.assertRaises(errors.FormatError, msg=what) as caught:
            open_bytes(dk, message)
        if header_ok:
            self.assertIsInstance(caught.exception, errors.NotAuthenticError, what)

    def test_every_byte_flipped_is_refused(self):
        dk, message, _, hlen = three_frames()
        for i in range(len(message)):
            for bit in (0x01, 0x80):
                m = bytearray(message)
                m[i] ^= bit
                self.assert_refused(dk, bytes(m), f"byte {i} ^ {bit:#x}")
                if i >= hlen:
                    with self.assertRaises(errors.NotAuthenticError):
                        open_bytes(dk, bytes(m))

    def test_every_header_byte_flipped_past_the_parser_is_the_generic_error(self):
        dk, message, _, hlen = three_frames()
        generic = 0
        for i in range(hlen):
            m = bytearray(message)
            m[i] ^= 0x01
            try:
                parse(bytes(m))
            except errors.FormatError as e:
                # What the parser refuses is a format error of its own kind,
                # never the generic one (no key has been tried yet).
                self.assertNotIsInstance(e, errors.NotAuthenticError)
                continue
            generic += 1
            with self.assertRaises(errors.NotAuthenticError):
                open_bytes(dk, bytes(m))
        # The message id, the commitment, the tag, the blob and the context
        # bytes at least.
        self.assertGreater(generic, 32 + 32 + 16 + 100)

    def test_every_truncation_and_any_extension_is_refused(self):
        dk, message, _, hlen = three_frames()
        for n in range(len(message)):
            self.assert_refused(dk, message[:n], f"cut at {n}")
            if n >= hlen:
                with self.assertRaises(errors.NotAuthenticError):
                    open_bytes(dk, message[:n])
        for extra in (b"\x00", bytes(16), bytes(300), message[hlen : hlen + MIN + TAG]):
            with self.assertRaises(errors.NotAuthenticError):
                open_bytes(dk, message + extra)

    def test_frames_swapped_dropped_repeated_or_moved_are_refused(self):
        dk, message, plain, hlen = three_frames()
        full = MIN + TAG
        header = message[:hlen]
        f0 = message[hlen : hlen + full]
        f1 = message[hlen + full : hlen + 2 * full]
        last = message[hlen + 2 * full :]
        cases = {
            "0 and 1 swapped": [header, f1, f0, last],
            "frame 1 dropped": [header, f0, last],
            "last frame dropped": [header, f0, f1],
            "frame 0 twice": [header, f0, f0, f1, last],
            "last frame twice": [header, f0, f1, last, last],
            "only the last frame": [header, last],
            "no frame at all": [header],
            "last frame first": [header, last, f0, f1],
        }
        for what, parts in cases.items():
            with self.subTest(what):
                with self.assertRaises(errors.NotAuthenticError):
                    open_bytes(dk, b"".join(parts))
        # A second message under the same data key: its header with the
        # first one's frames does not open (another message id, another key).
        other = seal_bytes(dk, {"k": "v"}, MIN, plain)
        with self.assertRaises(errors.NotAuthenticError):
            open_bytes(dk, other[: header_len(other)] + message[hlen:])
        # A frame of another message, at the same index.
        mixed = header + other[header_len(other) : header_len(other) + full] + f1 + last
        with self.assertRaises(errors.NotAuthenticError):
            open_bytes(dk, mixed)
        # The intact message, for contrast.
        self.assertEqual(open_bytes(dk, message)[1], plain)

    def test_another_key_or_context_edited_in_place_is_refused(self):
        dk, message, _, _ = three_frames()
        with self.assertRaises(errors.NotAuthenticError):
            open_bytes(key(0x18), message)
        # The context starts at byte 44; its value "v" follows the key "k"
        # and two length prefixes.
        at = 44 + 4 + 1 + 4
        self.assertEqual(message[at : at + 1], b"v")
        edited = bytearray(message)
        edited[at] = ord("w")
        with self.assertRaises(errors.NotAuthenticError):
            open_bytes(dk, bytes(edited))

    def test_an_opener_hands_out_no_frame_before_its_tag_verifies(self):
        dk, message, plain, hlen = three_frames()
        m = bytearray(message)
        m[hlen + MIN + TAG + 5] ^= 1  # in the second frame
        reader = io.BytesIO(bytes(m))
        header = coffre_client.read_header(reader)
        opener = coffre_client.Opener(reader, header, dk)
        got = bytearray()
        with self.assertRaises(errors.NotAuthenticError):
            while True:
                chunk = opener.read(97)
                if not chunk:
                    self.fail("a tampered message read to its end")
                got += chunk
        self.assertEqual(bytes(got), plain[:MIN])
        # And it stays refused.
        with self.assertRaises(errors.NotAuthenticError):
            opener.read(1)
        opener.close()

    def test_open_writes_only_verified_frames(self):
        dk, message, plain, hlen = three_frames()
        m = bytearray(message)
        m[-1] ^= 1  # the last frame's tag
        out = io.BytesIO()
        with self.assertRaises(errors.NotAuthenticError):
            coffre_client.open(dk, io.BytesIO(bytes(m)), out)
        self.assertEqual(out.getvalue(), plain[: 2 * MIN])


class TamperWithoutInto(Tamper):
    use_into = False


class StrictHeaders(unittest.TestCase):
    def test_headers_are_parsed_strictly_with_the_rust_crates_errors(self):
        _, message, _, _ = three_frames()

        def edited(at, value):
            m = bytearray(message)
            m[at : at + len(value)] = value
            return bytes(m)

        with self.assertRaises(errors.NotSealedError):
            parse(edited(0, b"X"))
        with self.assertRaises(errors.NotSealedError):
            parse(b"PK\x03\x04" + bytes(100))
        with self.assertRaises(errors.NotSealedError):
            parse(b"X")
        with self.assertRaises(errors.UnsupportedVersionError) as e:
            parse(edited(2, b"\x02"))
        self.assertEqual(e.exception.version, 2)
        with self.assertRaises(errors.UnsupportedSuiteError) as e:
            parse(edited(3, b"\x09"))
        self.assertEqual(e.exception.suite, 9)
        for frame_len in (0, MIN - 1, fmt.MAX_FRAME_LEN + 1, 2**32 - 1):
            with self.assertRaises(errors.BadHeaderError, msg=frame_len):
                parse(edited(36, struct.pack(">I", frame_len)))
        with self.assertRaises(errors.BadHeaderError):
            parse(edited(40, struct.pack(">I", 2**32 - 1)))
        with self.assertRaises(errors.BadHeaderError):
            parse(edited(40, struct.pack(">I", fmt.MAX_CONTEXT_LEN + 1)))
        # What is read first decides: an empty input, or "C", is a cut
        # header (it may be one); a cut fixed part too, whatever its version.
        for cut in (b"", b"C", b"CS", b"CS\x01", message[:10], b"CS\x02\x01"):
            with self.assertRaises(errors.TruncatedHeaderError, msg=cut):
                parse(cut)

    def test_the_context_and_the_blob_are_parsed_strictly(self):
        dk = key(3)

        def with_context(raw, blob_bytes=None):
            b = blob() if blob_bytes is None else blob_bytes
            return (
                b"CS\x01\x01"
                + bytes(32)
                + struct.pack(">II", MIN, len(raw))
                + raw
                + struct.pack(">H", len(b))
                + b
                + bytes(48)
            )

        def entry(k, v):
            return struct.pack(">I", len(k)) + k + struct.pack(">I", len(v)) + v

        bad = {
            "keys out of order": entry(b"b", b"1") + entry(b"a", b"2"),
            "a key twice": entry(b"a", b"1") + entry(b"a", b"2"),
            "not UTF-8": entry(b"\xff", b"1"),
            "a surrogate (CESU-8)": entry(b"\xed\xa0\x80", b"1"),
            "an entry cut": entry(b"a", b"1")[:-1],
            "a value missing": struct.pack(">I", 1) + b"a",
            "an empty key": entry(b"", b"1"),
            "a key of 257 bytes": entry(b"k" * 257, b"1"),
            "a value of 1025 bytes": entry(b"k", b"v" * 1025),
            "65 entries": b"".join(entry(b"k%02d" % i, b"") for i in range(65)),
        }
        for what, raw in bad.items():
            with self.subTest(what):
                with self.assertRaises(errors.BadHeaderError):
                    parse(with_context(raw))
        good = entry(b"a", b"") + entry(b"k" * 256, b"v" * 1024)
        self.assertEqual(parse(with_context(good)).context, {"a": "", "k" * 256: "v" * 1024})
        for b in (b"", b"XX" + bytes(10), b"C" * 1025):
            with self.subTest(blob=b[:4]):
                with self.assertRaises(errors.BadHeaderError):
                    parse(with_context(b"", b))
        with self.assertRaises(errors.TruncatedHeaderError):
            parse(with_context(b"")[:-1])
        # Parsed, then refused under the key: the tag is not authentic.
        with self.assertRaises(errors.NotAuthenticError):
            open_bytes(dk, with_context(b"") + bytes(16))

    def test_sealing_refuses_what_a_header_may_not_hold(self):
        dk = key(4)
        for ctx, frame_len in (
            ({"": "v"}, MIN),
            ({"k": "v" * 1025}, MIN),
            ({"k" * 257: "v"}, MIN),
            ({f"k{i}": "" for i in range(65)}, MIN),
            ({"k": 1}, MIN),
            ({"k": "\ud800"}, MIN),
            ({}, MIN - 1),
            ({}, fmt.MAX_FRAME_LEN + 1),
            ({}, True),
        ):
            with self.subTest(ctx=list(ctx)[:2], frame_len=frame_len):
                with self.assertRaises(errors.InvalidInputError):
                    coffre_client.Header.seal(dk, ctx, blob(), frame_len)
        for b in (b"XX", b"", b"CF" + bytes(1023)):
            with self.assertRaises(errors.InvalidInputError):
                coffre_client.Header.seal(dk, {}, b, MIN)
        self.assertEqual(len(coffre_client.Header.seal(dk, {}, b"CF" + bytes(1022), MIN)[0].blob), 1024)
        with self.assertRaises(errors.DataKeyLengthError):
            coffre_client.DataKey(bytes(16))

    def test_the_commitment_is_checked_before_the_tag_and_in_constant_time(self):
        # A header whose commitment is another key's: refused under this
        # key with the generic error (the commitment alone decides).
        dk, message, _, _ = three_frames()
        header = parse(message)
        header.commitment = bytes(32)
        with self.assertRaises(errors.NotAuthenticError):
            header.keys(dk)
        # The comparison is hmac.compare_digest's.
        self.assertIs(fmt.hmac.compare_digest, hmac.compare_digest)
        self.assertIn("compare_digest", fmt.Header.keys.__code__.co_names)


class Secrets(unittest.TestCase):
    def test_a_data_key_is_never_shown_copied_or_pickled_and_is_wiped(self):
        import copy
        import pickle

        dk = coffre_client.DataKey(b"\x5a" * 32)
        self.assertEqual(repr(dk), "DataKey(<redacted>)")
        self.assertEqual(str(dk), "DataKey(<redacted>)")
        self.assertEqual(f"{dk}", "DataKey(<redacted>)")
        for attempt in (lambda: pickle.dumps(dk), lambda: copy.copy(dk), lambda: copy.deepcopy(dk)):
            with self.assertRaises(TypeError):
                attempt()
        buf = dk._key
        dk.close()
        self.assertTrue(dk.closed)
        self.assertEqual(bytes(buf), bytes(32))
        with self.assertRaises(ValueError):
            coffre_client.Header.seal(dk, {}, blob(), MIN)
        with coffre_client.DataKey(b"\x11" * 32) as k2:
            inner = k2._key
        self.assertEqual(bytes(inner), bytes(32))
        gk = coffre_client.GeneratedKey(coffre_client.DataKey(b"\x22" * 32), blob(), "id", 3)
        self.assertNotIn("22" * 4, repr(gk))
        self.assertIn("<redacted>", repr(gk))
        _, keys = coffre_client.Header.seal(key(9), {}, blob(), MIN)
        self.assertEqual(repr(keys), "FrameKeys(<redacted>)")

    def test_no_error_names_the_key(self):
        dk, message, _, _ = three_frames()
        m = bytearray(message)
        m[-1] ^= 1
        try:
            open_bytes(dk, bytes(m))
        except errors.NotAuthenticError as e:
            text = str(e) + repr(e) + repr(e.args)
        self.assertNotIn(bytes([0x17]) * 4, text.encode("latin-1", "replace"))
        self.assertNotIn("17171717", text)

    def test_buffers_are_wiped_when_streams_end(self):
        dk, message, plain, _ = three_frames()
        reader = io.BytesIO(message)
        header = coffre_client.read_header(reader)
        opener = coffre_client.Opener(reader, header, dk)
        self.assertEqual(opener.read(), plain)
        buffers = (opener._plain, opener._frame)
        self.assertTrue(any(any(b) for b in buffers))
        opener.close()
        for b in buffers:
            self.assertEqual(bytes(b), bytes(len(b)))
        sealer = coffre_client.Sealer(io.BytesIO(), dk, {}, blob(), MIN)
        sealer.write(plain)
        buffers = (sealer._plain, sealer._sealed)
        sealer.finish()
        for b in buffers:
            self.assertEqual(bytes(b), bytes(len(b)))

    def test_memory_is_one_frame_whatever_the_message_length(self):
        dk = key(5)
        plain = plaintext(50 * MIN + 3)
        message = seal_bytes(dk, {}, MIN, plain)
        reader = io.BytesIO(message)
        header = coffre_client.read_header(reader)
        opener = coffre_client.Opener(reader, header, dk)
        self.assertEqual(len(opener._frame), MIN + TAG)
        self.assertEqual(len(opener._plain), MIN)
        self.assertEqual(opener.read(), plain)
        self.assertTrue(opener.verified)


if __name__ == "__main__":
    unittest.main()
