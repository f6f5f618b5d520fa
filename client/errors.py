"""What the clients raise: kvstore's own error tree, plus one class per remote failure.

Errors found before anything is sent (a token that is not a u32, a tensor whose dtype or shape
does not match the ``ModelSpec``) are the classes of ``kvstore.core.errors``, exactly as the engine
raises them. Errors the server answers with arrive as gRPC status codes and become::

    KVStoreError                       (kvstore.core.errors)
     ├── InvalidArgumentError          INVALID_ARGUMENT: malformed request; also local checks
     │    ├── InvalidTokenError        local: a token id is not an integer in [0, 2**32)
     │    └── SpecMismatchError        local: a tensor's dtype or shape is not the namespace's
     ├── CorruptBlockError             DATA_LOSS
     ├── AuthError                     UNAUTHENTICATED (no or unknown token), PERMISSION_DENIED
     ├── NotFoundError                 NOT_FOUND: unknown lease or block
     ├── ResourceExhaustedError        RESOURCE_EXHAUSTED: tier full, quota, or overloaded
     ├── ServiceUnavailableError       UNAVAILABLE (retried first), DEADLINE_EXCEEDED
     ├── NotSupportedError             UNIMPLEMENTED (also a NotImplementedError)
     ├── NoWorkerError                 FAILED_PRECONDITION: repair without a model worker
     ├── HandOffUnavailableError       FAILED_PRECONDITION of HandOffG1: no same-GPU path here
     └── ServerError                   any other code (INTERNAL, UNKNOWN, CANCELLED, ...)

Every remote error carries the status name in ``code`` and the server's message as its text.

RESOURCE_EXHAUSTED is one class on purpose: the server uses the code for a full tier, a tenant's
quota and an overloaded move queue, and the remedy is the same for the caller (back off, put
less, or free space); telling them apart by parsing message text would make the server's
wording an API. The message says which it was.
"""

from __future__ import annotations

from typing import Final

import grpc

from kvstore.core.errors import CorruptBlockError, InvalidArgumentError, KVStoreError

__all__ = [
    "AuthError",
    "HandOffUnavailableError",
    "NoWorkerError",
    "NotFoundError",
    "NotSupportedError",
    "ResourceExhaustedError",
    "ServerError",
    "ServiceUnavailableError",
    "error_from_rpc",
]


class _RemoteError(KVStoreError):
    code: str = ""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code or type(self).code


class AuthError(_RemoteError):
    """The server does not know the token, or the tenant may not do this."""

    code = "UNAUTHENTICATED"


class NotFoundError(_RemoteError):
    """The lease or block named in the request does not exist (any more)."""

    code = "NOT_FOUND"


class ResourceExhaustedError(_RemoteError):
    """A tier is full, the tenant's quota is used up, or the server is overloaded: back off."""

    code = "RESOURCE_EXHAUSTED"


class ServiceUnavailableError(_RemoteError):
    """The server (or a tier behind it) is down or did not answer in time, after retries."""

    code = "UNAVAILABLE"


class NotSupportedError(_RemoteError, NotImplementedError):
    """The server does not implement this call (an older server)."""

    code = "UNIMPLEMENTED"


class NoWorkerError(_RemoteError):
    """Repair was asked for, but no model worker of the prompt's namespace is attached to the
    server (start one with ``kvstore worker``); the message lists the workers that are."""

    code = "FAILED_PRECONDITION"


class HandOffUnavailableError(_RemoteError):
    """No same-GPU hand-off (``get_prefix_from_g1``) here: G1 is off or not on a CUDA device, the
    caller is on another GPU or host, the server has several tenants, or cupy is missing on
    either side. ``get_prefix`` instead."""

    code = "FAILED_PRECONDITION"


class ServerError(_RemoteError):
    """Any other failure the server reported (INTERNAL, UNKNOWN, ...); see ``code``."""

    code = "UNKNOWN"


_BY_CODE: Final[dict[grpc.StatusCode, type[_RemoteError]]] = {
    grpc.StatusCode.UNAUTHENTICATED: AuthError,
    grpc.StatusCode.PERMISSION_DENIED: AuthError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: ServiceUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: ServiceUnavailableError,
    grpc.StatusCode.UNIMPLEMENTED: NotSupportedError,
    grpc.StatusCode.FAILED_PRECONDITION: NoWorkerError,
}


def error_from_rpc(error: grpc.RpcError, target: str) -> KVStoreError:
    """The typed exception for a failed call; raise it ``from None``."""
    code: grpc.StatusCode = error.code()
    details = error.details() or code.name
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgumentError(details)
    if code is grpc.StatusCode.DATA_LOSS:
        return CorruptBlockError(details)
    if code is grpc.StatusCode.UNAVAILABLE:
        details = f"{target}: {details}"
    elif code is grpc.StatusCode.DEADLINE_EXCEEDED:
        details = f"{target} did not answer in time: {details}"
    return _BY_CODE.get(code, ServerError)(details, code.name)
