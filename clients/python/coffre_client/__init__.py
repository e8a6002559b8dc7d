"""``coffre_client``: client-side envelope encryption with data keys from
coffre, in the sealed message format version 1 (DESIGN.md, "Sealed message
format, version 1"), byte for byte the Rust ``coffre-client`` crate's.

A hosted service seals its data on its own side: coffre gives it a data
key (plaintext and wrapped, bound to an encryption context); the service
encrypts the data with the plaintext key and forgets the key; the message
carries the wrapped key and the context. To open it, the service asks
coffre to decrypt the wrapped key (coffre checks the key's state and
policy, and records the request), then opens the frames.

- :mod:`coffre_client.format`: the header, its strict parser, the key
  schedule and key commitment, the frame keys; :class:`DataKey`.
- :mod:`coffre_client.stream`: :class:`Sealer`, :class:`Opener`,
  :func:`seal` and :func:`open` over file-like objects, in constant memory.
- :mod:`coffre_client.rpc`: :class:`Client`, coffre's GenerateDataKey and
  Decrypt over mTLS, with typed errors (:mod:`coffre_client.errors`).
- ``python -m coffre_client seal|open``: the ``coffre seal|open`` commands.
"""

from .errors import (
    BadHeaderError,
    ClientError,
    CoffreError,
    ConnectError,
    ContextMismatchError,
    DataKeyLengthError,
    FormatError,
    InvalidInputError,
    InvalidRequestError,
    KeyDestroyedError,
    KeyDisabledError,
    KeyPendingDeletionError,
    KeyUnusableError,
    NotAuthenticError,
    NotFoundError,
    NotSealedError,
    PermissionDeniedError,
    RefusedError,
    ThrottledError,
    TruncatedHeaderError,
    UnauthenticatedError,
    UnavailableError,
    UnsupportedSuiteError,
    UnsupportedVersionError,
)
from .format import DEFAULT_FRAME_LEN, DataKey, GeneratedKey, Header, read_header
from .rpc import AccessReason, Client
from .stream import Opened, Opener, Sealed, Sealer, open, seal

__version__ = "0.1.0"

__all__ = [
    "AccessReason",
    "BadHeaderError",
    "Client",
    "ClientError",
    "CoffreError",
    "ConnectError",
    "ContextMismatchError",
    "DEFAULT_FRAME_LEN",
    "DataKey",
    "DataKeyLengthError",
    "FormatError",
    "GeneratedKey",
    "Header",
    "InvalidInputError",
    "InvalidRequestError",
    "KeyDestroyedError",
    "KeyDisabledError",
    "KeyPendingDeletionError",
    "KeyUnusableError",
    "NotAuthenticError",
    "NotFoundError",
    "NotSealedError",
    "Opened",
    "Opener",
    "PermissionDeniedError",
    "RefusedError",
    "Sealed",
    "Sealer",
    "ThrottledError",
    "TruncatedHeaderError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnsupportedSuiteError",
    "UnsupportedVersionError",
    "open",
    "read_header",
    "seal",
]
