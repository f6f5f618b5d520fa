from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    TIER_G1: _ClassVar[Tier]
    TIER_G2: _ClassVar[Tier]
    TIER_G3: _ClassVar[Tier]
    TIER_G4: _ClassVar[Tier]

class EventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_KIND_UNSPECIFIED: _ClassVar[EventKind]
    EVENT_KIND_STORED: _ClassVar[EventKind]
    EVENT_KIND_REMOVED: _ClassVar[EventKind]
    EVENT_KIND_MOVED: _ClassVar[EventKind]
    EVENT_KIND_CORRUPT: _ClassVar[EventKind]
TIER_UNSPECIFIED: Tier
TIER_G1: Tier
TIER_G2: Tier
TIER_G3: Tier
TIER_G4: Tier
EVENT_KIND_UNSPECIFIED: EventKind
EVENT_KIND_STORED: EventKind
EVENT_KIND_REMOVED: EventKind
EVENT_KIND_MOVED: EventKind
EVENT_KIND_CORRUPT: EventKind

class Namespace(_message.Message):
    __slots__ = ("model_id", "revision", "tokenizer_id", "num_layers", "num_kv_heads", "head_dim", "dtype", "block_tokens")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    revision: str
    tokenizer_id: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    block_tokens: int
    def __init__(self, model_id: _Optional[str] = ..., revision: _Optional[str] = ..., tokenizer_id: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[str] = ..., block_tokens: _Optional[int] = ...) -> None: ...

class ExtraKey(_message.Message):
    __slots__ = ("bytes_value", "string_value", "int_value")
    BYTES_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    bytes_value: bytes
    string_value: str
    int_value: int
    def __init__(self, bytes_value: _Optional[bytes] = ..., string_value: _Optional[str] = ..., int_value: _Optional[int] = ...) -> None: ...

class BlockExtraKeys(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[ExtraKey]
    def __init__(self, keys: _Optional[_Iterable[_Union[ExtraKey, _Mapping]]] = ...) -> None: ...

class Prompt(_message.Message):
    __slots__ = ("namespace", "tokens_u32le", "extra_keys")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_U32LE_FIELD_NUMBER: _ClassVar[int]
    EXTRA_KEYS_FIELD_NUMBER: _ClassVar[int]
    namespace: Namespace
    tokens_u32le: bytes
    extra_keys: _containers.RepeatedCompositeFieldContainer[BlockExtraKeys]
    def __init__(self, namespace: _Optional[_Union[Namespace, _Mapping]] = ..., tokens_u32le: _Optional[bytes] = ..., extra_keys: _Optional[_Iterable[_Union[BlockExtraKeys, _Mapping]]] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("prompt", "packed_reply")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PACKED_REPLY_FIELD_NUMBER: _ClassVar[int]
    prompt: Prompt
    packed_reply: bool
    def __init__(self, prompt: _Optional[_Union[Prompt, _Mapping]] = ..., packed_reply: _Optional[bool] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("block_hashes", "tiers", "hit_blocks", "hit_tokens", "holes", "block_tokens", "packed_hashes", "packed_tiers")
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    HIT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HOLES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PACKED_HASHES_FIELD_NUMBER: _ClassVar[int]
    PACKED_TIERS_FIELD_NUMBER: _ClassVar[int]
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    tiers: _containers.RepeatedScalarFieldContainer[Tier]
    hit_blocks: int
    hit_tokens: int
    holes: _containers.RepeatedScalarFieldContainer[int]
    block_tokens: int
    packed_hashes: bytes
    packed_tiers: bytes
    def __init__(self, block_hashes: _Optional[_Iterable[bytes]] = ..., tiers: _Optional[_Iterable[_Union[Tier, str]]] = ..., hit_blocks: _Optional[int] = ..., hit_tokens: _Optional[int] = ..., holes: _Optional[_Iterable[int]] = ..., block_tokens: _Optional[int] = ..., packed_hashes: _Optional[bytes] = ..., packed_tiers: _Optional[bytes] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("prompt", "num_blocks", "ttl_s")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    prompt: Prompt
    num_blocks: int
    ttl_s: float
    def __init__(self, prompt: _Optional[_Union[Prompt, _Mapping]] = ..., num_blocks: _Optional[int] = ..., ttl_s: _Optional[float] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("lease_id", "block_hashes", "ttl_s")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    ttl_s: float
    def __init__(self, lease_id: _Optional[int] = ..., block_hashes: _Optional[_Iterable[bytes]] = ..., ttl_s: _Optional[float] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    def __init__(self, lease_id: _Optional[int] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class PutHeader(_message.Message):
    __slots__ = ("prompt", "durable", "num_blocks", "segment_id", "tensor", "slots")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    DURABLE_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_ID_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    prompt: Prompt
    durable: bool
    num_blocks: int
    segment_id: int
    tensor: SegmentTensor
    slots: _containers.RepeatedCompositeFieldContainer[SlotRef]
    def __init__(self, prompt: _Optional[_Union[Prompt, _Mapping]] = ..., durable: _Optional[bool] = ..., num_blocks: _Optional[int] = ..., segment_id: _Optional[int] = ..., tensor: _Optional[_Union[SegmentTensor, _Mapping]] = ..., slots: _Optional[_Iterable[_Union[SlotRef, _Mapping]]] = ...) -> None: ...

class SegmentTensor(_message.Message):
    __slots__ = ("offset", "layer_stride", "kv_stride", "num_tokens")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LAYER_STRIDE_FIELD_NUMBER: _ClassVar[int]
    KV_STRIDE_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    offset: int
    layer_stride: int
    kv_stride: int
    num_tokens: int
    def __init__(self, offset: _Optional[int] = ..., layer_stride: _Optional[int] = ..., kv_stride: _Optional[int] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class BlockChunk(_message.Message):
    __slots__ = ("block_index", "offset", "data")
    BLOCK_INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    block_index: int
    offset: int
    data: bytes
    def __init__(self, block_index: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class SlotRef(_message.Message):
    __slots__ = ("block_index", "offset", "length")
    BLOCK_INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    block_index: int
    offset: int
    length: int
    def __init__(self, block_index: _Optional[int] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("header", "chunk", "slot")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    header: PutHeader
    chunk: BlockChunk
    slot: SlotRef
    def __init__(self, header: _Optional[_Union[PutHeader, _Mapping]] = ..., chunk: _Optional[_Union[BlockChunk, _Mapping]] = ..., slot: _Optional[_Union[SlotRef, _Mapping]] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("block_hashes", "stored", "already")
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    ALREADY_FIELD_NUMBER: _ClassVar[int]
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    stored: int
    already: int
    def __init__(self, block_hashes: _Optional[_Iterable[bytes]] = ..., stored: _Optional[int] = ..., already: _Optional[int] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("prompt", "max_blocks", "repair_holes", "max_chunk_bytes", "segment_id", "segment_offset", "by_layer", "tensor")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    REPAIR_HOLES_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    BY_LAYER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    prompt: Prompt
    max_blocks: int
    repair_holes: bool
    max_chunk_bytes: int
    segment_id: int
    segment_offset: int
    by_layer: bool
    tensor: SegmentTensor
    def __init__(self, prompt: _Optional[_Union[Prompt, _Mapping]] = ..., max_blocks: _Optional[int] = ..., repair_holes: _Optional[bool] = ..., max_chunk_bytes: _Optional[int] = ..., segment_id: _Optional[int] = ..., segment_offset: _Optional[int] = ..., by_layer: _Optional[bool] = ..., tensor: _Optional[_Union[SegmentTensor, _Mapping]] = ...) -> None: ...

class FetchHeader(_message.Message):
    __slots__ = ("block_hashes", "block_tokens", "block_bytes", "slots", "by_layer")
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    BY_LAYER_FIELD_NUMBER: _ClassVar[int]
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    block_tokens: int
    block_bytes: int
    slots: _containers.RepeatedCompositeFieldContainer[SlotRef]
    by_layer: bool
    def __init__(self, block_hashes: _Optional[_Iterable[bytes]] = ..., block_tokens: _Optional[int] = ..., block_bytes: _Optional[int] = ..., slots: _Optional[_Iterable[_Union[SlotRef, _Mapping]]] = ..., by_layer: _Optional[bool] = ...) -> None: ...

class FetchProgress(_message.Message):
    __slots__ = ("layers_done", "done", "verified_blocks")
    LAYERS_DONE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    layers_done: int
    done: bool
    verified_blocks: int
    def __init__(self, layers_done: _Optional[int] = ..., done: _Optional[bool] = ..., verified_blocks: _Optional[int] = ...) -> None: ...

class FetchResponse(_message.Message):
    __slots__ = ("header", "chunk", "slot", "progress")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    header: FetchHeader
    chunk: BlockChunk
    slot: SlotRef
    progress: FetchProgress
    def __init__(self, header: _Optional[_Union[FetchHeader, _Mapping]] = ..., chunk: _Optional[_Union[BlockChunk, _Mapping]] = ..., slot: _Optional[_Union[SlotRef, _Mapping]] = ..., progress: _Optional[_Union[FetchProgress, _Mapping]] = ...) -> None: ...

class RepairRequest(_message.Message):
    __slots__ = ("prompt", "exact")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    EXACT_FIELD_NUMBER: _ClassVar[int]
    prompt: Prompt
    exact: bool
    def __init__(self, prompt: _Optional[_Union[Prompt, _Mapping]] = ..., exact: _Optional[bool] = ...) -> None: ...

class RepairResponse(_message.Message):
    __slots__ = ("repaired", "hit_blocks", "hit_blocks_before", "kept", "worker")
    REPAIRED_FIELD_NUMBER: _ClassVar[int]
    HIT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HIT_BLOCKS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    repaired: _containers.RepeatedScalarFieldContainer[int]
    hit_blocks: int
    hit_blocks_before: int
    kept: _containers.RepeatedScalarFieldContainer[int]
    worker: str
    def __init__(self, repaired: _Optional[_Iterable[int]] = ..., hit_blocks: _Optional[int] = ..., hit_blocks_before: _Optional[int] = ..., kept: _Optional[_Iterable[int]] = ..., worker: _Optional[str] = ...) -> None: ...

class WorkerHello(_message.Message):
    __slots__ = ("namespace", "name")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    namespace: Namespace
    name: str
    def __init__(self, namespace: _Optional[_Union[Namespace, _Mapping]] = ..., name: _Optional[str] = ...) -> None: ...

class WorkerWelcome(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    def __init__(self, worker_id: _Optional[int] = ...) -> None: ...

class WorkTask(_message.Message):
    __slots__ = ("task_id", "tokens_u32le", "num_blocks", "targets", "block_bytes")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_U32LE_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    task_id: int
    tokens_u32le: bytes
    num_blocks: int
    targets: _containers.RepeatedScalarFieldContainer[int]
    block_bytes: int
    def __init__(self, task_id: _Optional[int] = ..., tokens_u32le: _Optional[bytes] = ..., num_blocks: _Optional[int] = ..., targets: _Optional[_Iterable[int]] = ..., block_bytes: _Optional[int] = ...) -> None: ...

class WorkDone(_message.Message):
    __slots__ = ("task_id", "error", "status_code")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    task_id: int
    error: str
    status_code: int
    def __init__(self, task_id: _Optional[int] = ..., error: _Optional[str] = ..., status_code: _Optional[int] = ...) -> None: ...

class WorkRequest(_message.Message):
    __slots__ = ("hello", "chunk", "done")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    hello: WorkerHello
    chunk: BlockChunk
    done: WorkDone
    def __init__(self, hello: _Optional[_Union[WorkerHello, _Mapping]] = ..., chunk: _Optional[_Union[BlockChunk, _Mapping]] = ..., done: _Optional[_Union[WorkDone, _Mapping]] = ...) -> None: ...

class WorkResponse(_message.Message):
    __slots__ = ("welcome", "task", "chunk")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    welcome: WorkerWelcome
    task: WorkTask
    chunk: BlockChunk
    def __init__(self, welcome: _Optional[_Union[WorkerWelcome, _Mapping]] = ..., task: _Optional[_Union[WorkTask, _Mapping]] = ..., chunk: _Optional[_Union[BlockChunk, _Mapping]] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "name", "namespace", "tasks_done", "blocks_computed", "busy", "address")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TASKS_DONE_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_COMPUTED_FIELD_NUMBER: _ClassVar[int]
    BUSY_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    name: str
    namespace: Namespace
    tasks_done: int
    blocks_computed: int
    busy: bool
    address: str
    def __init__(self, worker_id: _Optional[int] = ..., name: _Optional[str] = ..., namespace: _Optional[_Union[Namespace, _Mapping]] = ..., tasks_done: _Optional[int] = ..., blocks_computed: _Optional[int] = ..., busy: _Optional[bool] = ..., address: _Optional[str] = ...) -> None: ...

class BlocksRequest(_message.Message):
    __slots__ = ("namespace", "block_hashes", "ttl_s", "tier")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    namespace: Namespace
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    ttl_s: float
    tier: Tier
    def __init__(self, namespace: _Optional[_Union[Namespace, _Mapping]] = ..., block_hashes: _Optional[_Iterable[bytes]] = ..., ttl_s: _Optional[float] = ..., tier: _Optional[_Union[Tier, str]] = ...) -> None: ...

class CountResponse(_message.Message):
    __slots__ = ("count",)
    COUNT_FIELD_NUMBER: _ClassVar[int]
    count: int
    def __init__(self, count: _Optional[int] = ...) -> None: ...

class FlushRequest(_message.Message):
    __slots__ = ("tier",)
    TIER_FIELD_NUMBER: _ClassVar[int]
    tier: Tier
    def __init__(self, tier: _Optional[_Union[Tier, str]] = ...) -> None: ...

class OpenSegmentRequest(_message.Message):
    __slots__ = ("size_bytes",)
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    size_bytes: int
    def __init__(self, size_bytes: _Optional[int] = ...) -> None: ...

class OpenSegmentResponse(_message.Message):
    __slots__ = ("segment_id", "size_bytes", "socket", "ticket", "idle_s")
    SEGMENT_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SOCKET_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    IDLE_S_FIELD_NUMBER: _ClassVar[int]
    segment_id: int
    size_bytes: int
    socket: str
    ticket: bytes
    idle_s: float
    def __init__(self, segment_id: _Optional[int] = ..., size_bytes: _Optional[int] = ..., socket: _Optional[str] = ..., ticket: _Optional[bytes] = ..., idle_s: _Optional[float] = ...) -> None: ...

class CloseSegmentRequest(_message.Message):
    __slots__ = ("segment_id",)
    SEGMENT_ID_FIELD_NUMBER: _ClassVar[int]
    segment_id: int
    def __init__(self, segment_id: _Optional[int] = ...) -> None: ...

class CloseSegmentResponse(_message.Message):
    __slots__ = ("closed",)
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    closed: bool
    def __init__(self, closed: _Optional[bool] = ...) -> None: ...

class G1HandOffRequest(_message.Message):
    __slots__ = ("prompt", "num_blocks", "ttl_s", "segment_id", "device_uuid")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    prompt: Prompt
    num_blocks: int
    ttl_s: float
    segment_id: int
    device_uuid: bytes
    def __init__(self, prompt: _Optional[_Union[Prompt, _Mapping]] = ..., num_blocks: _Optional[int] = ..., ttl_s: _Optional[float] = ..., segment_id: _Optional[int] = ..., device_uuid: _Optional[bytes] = ...) -> None: ...

class G1Extent(_message.Message):
    __slots__ = ("offset", "nbytes", "payload_xxh3")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_XXH3_FIELD_NUMBER: _ClassVar[int]
    offset: int
    nbytes: int
    payload_xxh3: int
    def __init__(self, offset: _Optional[int] = ..., nbytes: _Optional[int] = ..., payload_xxh3: _Optional[int] = ...) -> None: ...

class G1HandOffResponse(_message.Message):
    __slots__ = ("lease_id", "ipc_handle", "slab_bytes", "device_uuid", "block_hashes", "extents", "ttl_s", "num_blocks")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    IPC_HANDLE_FIELD_NUMBER: _ClassVar[int]
    SLAB_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    EXTENTS_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    ipc_handle: bytes
    slab_bytes: int
    device_uuid: bytes
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    extents: _containers.RepeatedCompositeFieldContainer[G1Extent]
    ttl_s: float
    num_blocks: int
    def __init__(self, lease_id: _Optional[int] = ..., ipc_handle: _Optional[bytes] = ..., slab_bytes: _Optional[int] = ..., device_uuid: _Optional[bytes] = ..., block_hashes: _Optional[_Iterable[bytes]] = ..., extents: _Optional[_Iterable[_Union[G1Extent, _Mapping]]] = ..., ttl_s: _Optional[float] = ..., num_blocks: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("tier", "name", "capacity_bytes", "used_bytes", "num_blocks", "num_hits", "num_misses", "num_corrupt", "allocated_bytes", "largest_free_bytes", "fragmentation", "free_extents")
    TIER_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_HITS_FIELD_NUMBER: _ClassVar[int]
    NUM_MISSES_FIELD_NUMBER: _ClassVar[int]
    NUM_CORRUPT_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    LARGEST_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FRAGMENTATION_FIELD_NUMBER: _ClassVar[int]
    FREE_EXTENTS_FIELD_NUMBER: _ClassVar[int]
    tier: Tier
    name: str
    capacity_bytes: int
    used_bytes: int
    num_blocks: int
    num_hits: int
    num_misses: int
    num_corrupt: int
    allocated_bytes: int
    largest_free_bytes: int
    fragmentation: float
    free_extents: int
    def __init__(self, tier: _Optional[_Union[Tier, str]] = ..., name: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., num_blocks: _Optional[int] = ..., num_hits: _Optional[int] = ..., num_misses: _Optional[int] = ..., num_corrupt: _Optional[int] = ..., allocated_bytes: _Optional[int] = ..., largest_free_bytes: _Optional[int] = ..., fragmentation: _Optional[float] = ..., free_extents: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("tiers", "num_blocks", "num_leases", "queue_depth", "counters", "workers", "tenant", "tenants")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TIERS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_LEASES_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    tiers: _containers.RepeatedCompositeFieldContainer[TierStats]
    num_blocks: int
    num_leases: int
    queue_depth: int
    counters: _containers.ScalarMap[str, int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    tenant: TenantUsage
    tenants: _containers.RepeatedCompositeFieldContainer[TenantUsage]
    def __init__(self, tiers: _Optional[_Iterable[_Union[TierStats, _Mapping]]] = ..., num_blocks: _Optional[int] = ..., num_leases: _Optional[int] = ..., queue_depth: _Optional[int] = ..., counters: _Optional[_Mapping[str, int]] = ..., workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ..., tenant: _Optional[_Union[TenantUsage, _Mapping]] = ..., tenants: _Optional[_Iterable[_Union[TenantUsage, _Mapping]]] = ...) -> None: ...

class TenantUsage(_message.Message):
    __slots__ = ("name", "stored_bytes", "quota_bytes", "segments", "segment_bytes", "max_segment_bytes", "pinned_blocks", "pinned_bytes", "max_pinned_blocks", "max_pinned_bytes", "leased_blocks", "leased_bytes", "max_leased_blocks", "max_leased_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    QUOTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SEGMENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    PINNED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PINNED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_PINNED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MAX_PINNED_BYTES_FIELD_NUMBER: _ClassVar[int]
    LEASED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LEASED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_LEASED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MAX_LEASED_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    stored_bytes: int
    quota_bytes: int
    segments: int
    segment_bytes: int
    max_segment_bytes: int
    pinned_blocks: int
    pinned_bytes: int
    max_pinned_blocks: int
    max_pinned_bytes: int
    leased_blocks: int
    leased_bytes: int
    max_leased_blocks: int
    max_leased_bytes: int
    def __init__(self, name: _Optional[str] = ..., stored_bytes: _Optional[int] = ..., quota_bytes: _Optional[int] = ..., segments: _Optional[int] = ..., segment_bytes: _Optional[int] = ..., max_segment_bytes: _Optional[int] = ..., pinned_blocks: _Optional[int] = ..., pinned_bytes: _Optional[int] = ..., max_pinned_blocks: _Optional[int] = ..., max_pinned_bytes: _Optional[int] = ..., leased_blocks: _Optional[int] = ..., leased_bytes: _Optional[int] = ..., max_leased_blocks: _Optional[int] = ..., max_leased_bytes: _Optional[int] = ...) -> None: ...

class BlockInfo(_message.Message):
    __slots__ = ("block_hash", "parent_hash", "namespace_fingerprint", "tiers", "nbytes", "hits", "pinned", "leases")
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    PARENT_HASH_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    block_hash: bytes
    parent_hash: bytes
    namespace_fingerprint: bytes
    tiers: _containers.RepeatedScalarFieldContainer[Tier]
    nbytes: int
    hits: int
    pinned: bool
    leases: int
    def __init__(self, block_hash: _Optional[bytes] = ..., parent_hash: _Optional[bytes] = ..., namespace_fingerprint: _Optional[bytes] = ..., tiers: _Optional[_Iterable[_Union[Tier, str]]] = ..., nbytes: _Optional[int] = ..., hits: _Optional[int] = ..., pinned: _Optional[bool] = ..., leases: _Optional[int] = ...) -> None: ...

class ListBlocksRequest(_message.Message):
    __slots__ = ("tier", "limit", "after")
    TIER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    tier: Tier
    limit: int
    after: bytes
    def __init__(self, tier: _Optional[_Union[Tier, str]] = ..., limit: _Optional[int] = ..., after: _Optional[bytes] = ...) -> None: ...

class ListBlocksResponse(_message.Message):
    __slots__ = ("blocks", "next_after")
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NEXT_AFTER_FIELD_NUMBER: _ClassVar[int]
    blocks: _containers.RepeatedCompositeFieldContainer[BlockInfo]
    next_after: bytes
    def __init__(self, blocks: _Optional[_Iterable[_Union[BlockInfo, _Mapping]]] = ..., next_after: _Optional[bytes] = ...) -> None: ...

class InspectRequest(_message.Message):
    __slots__ = ("block_hash",)
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    block_hash: bytes
    def __init__(self, block_hash: _Optional[bytes] = ...) -> None: ...

class InspectResponse(_message.Message):
    __slots__ = ("block", "dtype", "shape", "codec", "raw_xxh3", "payload_xxh3")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    RAW_XXH3_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_XXH3_FIELD_NUMBER: _ClassVar[int]
    block: BlockInfo
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    codec: str
    raw_xxh3: int
    payload_xxh3: int
    def __init__(self, block: _Optional[_Union[BlockInfo, _Mapping]] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., codec: _Optional[str] = ..., raw_xxh3: _Optional[int] = ..., payload_xxh3: _Optional[int] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("after_seq",)
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    after_seq: int
    def __init__(self, after_seq: _Optional[int] = ...) -> None: ...

class WatchEvent(_message.Message):
    __slots__ = ("seq", "kind", "block_hash", "tier", "from_tier", "parent_hash", "namespace_fingerprint", "time_s", "snapshot", "reason")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    FROM_TIER_FIELD_NUMBER: _ClassVar[int]
    PARENT_HASH_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TIME_S_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    seq: int
    kind: EventKind
    block_hash: bytes
    tier: Tier
    from_tier: Tier
    parent_hash: bytes
    namespace_fingerprint: bytes
    time_s: float
    snapshot: bool
    reason: str
    def __init__(self, seq: _Optional[int] = ..., kind: _Optional[_Union[EventKind, str]] = ..., block_hash: _Optional[bytes] = ..., tier: _Optional[_Union[Tier, str]] = ..., from_tier: _Optional[_Union[Tier, str]] = ..., parent_hash: _Optional[bytes] = ..., namespace_fingerprint: _Optional[bytes] = ..., time_s: _Optional[float] = ..., snapshot: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...
