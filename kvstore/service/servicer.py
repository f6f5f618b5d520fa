"""The servicer: the generated ``KVStoreServicer`` with every RPC implemented, put together from
one class per group of RPCs. Like the servicers of the gRPC examples it only turns request
messages into plain engine calls and results back into messages; what every call shares
(authentication, the request id, the log line, metrics, the exception -> status mapping) is in
the wrappers of kvstore/service/calls.py, so no handler picks a status code itself.

The groups, each a subclass of ``ServicerBase`` (kvstore/service/servicer_base.py: the state and
request checks they share):

- ``ReadRpcs``   (rpc_reads.py)   Lookup, Fetch, OpenSegment, CloseSegment
- ``WriteRpcs``  (rpc_writes.py)  Put
- ``HoldRpcs``   (rpc_holds.py)   Reserve, Release, Pin, Unpin
- ``G1Rpcs``     (rpc_g1.py)      HandOffG1 (same-GPU peers take G1 blocks through CUDA IPC)
- ``RepairRpcs`` (rpc_repair.py)  Repair, Work (model workers attach there)
- ``AdminRpcs``  (rpc_admin.py)   Stats, Evict, Flush, ListBlocks, Inspect, Watch

Validation happens before anything is stored: a request with a malformed field is refused with
INVALID_ARGUMENT and a message that names the field, what was expected and what came.
"""

from __future__ import annotations

from kvstore.service.rpc_admin import AdminRpcs
from kvstore.service.rpc_g1 import G1Rpcs
from kvstore.service.rpc_holds import HoldRpcs
from kvstore.service.rpc_reads import ReadRpcs
from kvstore.service.rpc_repair import RepairRpcs
from kvstore.service.rpc_writes import WriteRpcs
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc

__all__ = ["Servicer"]


class Servicer(
    ReadRpcs,
    WriteRpcs,
    G1Rpcs,
    HoldRpcs,
    RepairRpcs,
    AdminRpcs,
    pb_grpc.KVStoreServicer,  # type: ignore[misc]  # generated: Any to mypy
):
    """Every RPC of ``kvstore.v1.KVStore``. The generated base comes last in the method order: its
    methods (UNIMPLEMENTED) answer only for a method no group defines."""
