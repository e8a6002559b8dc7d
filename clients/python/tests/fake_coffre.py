"""An in-process stand-in for coffre's DataKeyService (plaintext gRPC on
loopback), which records every request and the metadata it came with, and
answers as coffre does: a data key and a blob, Decrypt of a blob it made
with the same context, or the status a test sets (with an
``x-request-id``, as coffre sends on every answer)."""

import os
import threading
from concurrent import futures

import grpc

import coffre_client
from coffre_client._proto import coffre_pb2 as pb
from coffre_client._proto import coffre_pb2_grpc as pb_grpc


class FakeDataKeys(pb_grpc.DataKeyServiceServicer):
    def __init__(self):
        self.calls = []
        self.fail = None  # (grpc.StatusCode, message) for the next calls
        self.keys = {}  # blob -> (context, data key)
        self.lock = threading.Lock()
        self.count = 0

    def _record(self, name, request, context):
        with self.lock:
            self.count += 1
            request_id = f"req-{self.count}"
            self.calls.append((name, request, tuple(context.invocation_metadata())))
        context.set_trailing_metadata((("x-request-id", request_id),))
        if self.fail is not None:
            code, message = self.fail
            context.abort(code, message)
        return request_id

    def GenerateDataKey(self, request, context):
        self._record("GenerateDataKey", request, context)
        data_key = os.urandom(request.number_of_bytes or 32)
        blob = b"CF\x01\x01" + os.urandom(112)
        self.keys[blob] = (dict(request.encryption_context), data_key)
        return pb.GenerateDataKeyResponse(
            plaintext=data_key,
            ciphertext_blob=blob,
            key_id="6f2c1b9e-4d1a-4f2e-9a53-0c9d2b7e8a11",
            key_version=3,
        )

    def Decrypt(self, request, context):
        self._record("Decrypt", request, context)
        known = self.keys.get(request.ciphertext_blob)
        if known is None or known[0] != dict(request.encryption_context):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "invalid ciphertext or context")
        return pb.DecryptResponse(
            plaintext=known[1], key_id="6f2c1b9e-4d1a-4f2e-9a53-0c9d2b7e8a11", key_version=3
        )


class FakeCoffre:
    """``with FakeCoffre() as fake: fake.client()``."""

    def __enter__(self):
        self.service = FakeDataKeys()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb_grpc.add_DataKeyServiceServicer_to_server(self.service, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.channels = []
        return self

    def client(self, **kwargs):
        channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.channels.append(channel)
        return coffre_client.Client.from_channel(
            channel, endpoint=f"https://127.0.0.1:{self.port}", **kwargs
        )

    def __exit__(self, *exc):
        for channel in self.channels:
            channel.close()
        self.server.stop(None)
