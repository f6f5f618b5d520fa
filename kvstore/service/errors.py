"""The service's own refusals and the one mapping from exceptions to gRPC status codes.

The tree, beside that of kvstore/core/errors.py (every class here is a ``KVStoreError``)::

    KVStoreError
     ├── UnauthenticatedError      UNAUTHENTICATED
     ├── PermissionDeniedError     PERMISSION_DENIED
     ├── NotFoundError             NOT_FOUND
     ├── QuotaExceededError        RESOURCE_EXHAUSTED
     ├── UnimplementedError        UNIMPLEMENTED
     ├── HandOffUnavailableError   FAILED_PRECONDITION (no same-GPU hand-off here: use Fetch)
     └── WorkerFailedError         INTERNAL (a model worker said why it could not compute a task)

``STATUS_OF`` also maps the core, engine, repair and segment errors; the RPC wrappers
(kvstore/service/calls.py) are its only users, so no handler picks a status code itself.
"""

from __future__ import annotations

import grpc

from kvstore.core.errors import (
    ConfigError,
    InvalidArgumentError,
    KVStoreError,
    OverloadedError,
    TierFullError,
    TierUnavailableError,
)
from kvstore.engine.repair import NoWorkerError, WorkerLostError
from kvstore.service.segments import SegmentClosedError, SegmentLimitError, SegmentsOffError

__all__ = [
    "STATUS_OF",
    "HandOffUnavailableError",
    "NotFoundError",
    "PermissionDeniedError",
    "QuotaExceededError",
    "UnauthenticatedError",
    "UnimplementedError",
    "WorkerFailedError",
    "status_of",
]


class UnauthenticatedError(KVStoreError):
    """No token, a malformed ``authorization`` header, or a token no tenant has."""


class PermissionDeniedError(KVStoreError):
    """The tenant is known but may not call this method."""


class NotFoundError(KVStoreError):
    """An unknown lease or block."""


class QuotaExceededError(KVStoreError):
    """Storing the blocks would put the tenant over its byte quota."""


class UnimplementedError(KVStoreError):
    """The method exists on the wire but not in this release."""


class HandOffUnavailableError(KVStoreError):
    """A same-GPU hand-off (HandOffG1) cannot be had: G1 is off or has no CUDA IPC handle, the
    caller is on another GPU, or it did not prove it runs on the server's host."""


class WorkerFailedError(KVStoreError):
    """A model worker could not compute a task for a reason of its own (it said why)."""


# The only place where exceptions become status codes; the first matching row wins. Anything
# not listed is a bug on our side: INTERNAL, with the request id and a logged traceback.
STATUS_OF: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (UnimplementedError, grpc.StatusCode.UNIMPLEMENTED),
    # InvalidTokenError, SpecMismatchError and BlockTooLargeError are InvalidArgumentErrors.
    (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),  # a namespace that is no valid ModelSpec
    (QuotaExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TierFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TierUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (NoWorkerError, grpc.StatusCode.FAILED_PRECONDITION),
    (HandOffUnavailableError, grpc.StatusCode.FAILED_PRECONDITION),
    (SegmentsOffError, grpc.StatusCode.FAILED_PRECONDITION),
    (SegmentClosedError, grpc.StatusCode.FAILED_PRECONDITION),
    (SegmentLimitError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (WorkerLostError, grpc.StatusCode.UNAVAILABLE),
    (WorkerFailedError, grpc.StatusCode.INTERNAL),
)


def status_of(exc: BaseException) -> grpc.StatusCode | None:
    for kind, code in STATUS_OF:
        if isinstance(exc, kind):
            return code
    return None
