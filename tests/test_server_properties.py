"""Random and malformed requests against a running server (hypothesis, bounded).

Whatever a client sends — random namespaces, token bytes of odd lengths, random chunk and slot
sequences, random hashes, tiers and TTLs — the server answers with a status a client can act on
(OK, INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, UNIMPLEMENTED), never INTERNAL and never by
crashing, and a prompt stored before is still there, bit for bit, afterwards.

The server runs on an event loop of its own in a background thread, so that hypothesis drives
it from plain synchronous tests through the generated synchronous stubs.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore.config import StoreConfig
from kvstore.core.keys import DTYPES, ModelSpec
from kvstore.engine.engine import EngineConfig
from kvstore.service.server import KVStoreServer, ServerConfig
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from tiers.lmdb_store import LmdbTierConfig
from tiers.pinned_memory import PinnedTierConfig

T = TypeVar("T")
SPEC = ModelSpec(
    "prop-test", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", block_tokens=4
)
N = SPEC.block_nbytes
SLOT = 64 * 1024
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,  # a segment id that is not open
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED,
}
PROPERTY = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class ServerThread:
    """A KVStoreServer on its own event loop in a daemon thread."""

    def __init__(self, config: StoreConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server = KVStoreServer(config)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        self.run(self.server.start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.run(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def namespace(spec: ModelSpec) -> pb.Namespace:
    return pb.Namespace(
        model_id=spec.model_id,
        num_layers=spec.num_layers,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        dtype=spec.dtype,
        block_tokens=spec.block_tokens,
    )


def u32(tokens: list[int]) -> bytes:
    return b"".join(t.to_bytes(4, "little") for t in tokens)


rng = random.Random(1234)
STORED_TOKENS = [rng.randrange(2**32) for _ in range(3 * 4)]
STORED = pb.Prompt(namespace=namespace(SPEC), tokens_u32le=u32(STORED_TOKENS))
STORED_BLOCKS = [rng.randbytes(N) for _ in range(3)]


class Harness:
    def __init__(self, stub: pb_grpc.KVStoreStub) -> None:
        self.stub = stub
        # A real segment: strategies draw the id REAL_SEGMENT to mean this one.
        self.segment_id = stub.OpenSegment(pb.OpenSegmentRequest(size_bytes=4 * N)).segment_id

    def real_segment(self, message: Any) -> None:
        if message.segment_id == REAL_SEGMENT:
            message.segment_id = self.segment_id

    def code(self, fn: Any, *args: Any) -> grpc.StatusCode:
        """Call, drain a stream, and return the status code; fail on INTERNAL and the like."""
        code, details = grpc.StatusCode.OK, ""
        try:
            result = fn(*args, timeout=30)
            if isinstance(result, Iterator):
                for _ in result:
                    pass
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
        assert code in ALLOWED, (code, details)
        assert code == grpc.StatusCode.OK or details, "every refusal says why"
        return code

    def intact(self) -> None:
        blocks: dict[int, bytearray] = {}
        header = None
        for message in self.stub.Fetch(pb.FetchRequest(prompt=STORED), timeout=30):
            if message.WhichOneof("msg") == "header":
                header = message.header
            else:
                blocks.setdefault(message.chunk.block_index, bytearray()).extend(
                    message.chunk.data
                )
        assert header is not None
        assert len(header.block_hashes) == 3
        assert [bytes(blocks[i]) for i in range(3)] == STORED_BLOCKS


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    tmp: Path = tmp_path_factory.mktemp("props")
    config = StoreConfig(
        g2=PinnedTierConfig(256 * SLOT, pin="never", segment_prefix="kvstore-ptest"),
        g3=LmdbTierConfig(str(tmp / "g3"), 64 << 20),
        engine=EngineConfig(reaper_interval_s=0.05),
        server=ServerConfig(listen="127.0.0.1:0", max_prompt_tokens=4096),
    )
    with ServerThread(config) as running, grpc.insecure_channel(
        f"127.0.0.1:{running.server.port}"
    ) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        put = [pb.PutRequest(header=pb.PutHeader(prompt=STORED, durable=True))] + [
            pb.PutRequest(chunk=pb.BlockChunk(block_index=i, offset=0, data=data))
            for i, data in enumerate(STORED_BLOCKS)
        ]
        stored = stub.Put(iter(put))
        # Pinned: random Evict and Flush requests may not take it (they are valid requests).
        assert stub.Pin(pb.BlocksRequest(block_hashes=stored.block_hashes)).count == 3
        h = Harness(stub)
        h.intact()
        yield h
        h.intact()


# -- strategies -----------------------------------------------------------------------------------

text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=12)
REAL_SEGMENT = 1
segment_ids = st.one_of(st.just(REAL_SEGMENT), st.integers(1, 2**64 - 1))
small_or_any = st.one_of(st.integers(0, 5), st.integers(0, 2**32 - 1))
random_namespace = st.builds(
    pb.Namespace,
    model_id=text,
    revision=text,
    tokenizer_id=text,
    num_layers=small_or_any,
    num_kv_heads=small_or_any,
    head_dim=small_or_any,
    dtype=st.one_of(st.sampled_from([*DTYPES, "", "int8", "float64"]), text),
    block_tokens=small_or_any,
)
namespaces = st.one_of(st.just(namespace(SPEC)), random_namespace)
token_bytes = st.one_of(
    st.binary(max_size=64),  # odd lengths, empty
    st.lists(st.integers(0, 2**32 - 1), max_size=24).map(u32),
    st.just(STORED.tokens_u32le),  # the stored prompt itself
    st.just(b"\0" * 4 * 4097),  # over max_prompt_tokens
)
extra_key = st.one_of(
    st.builds(pb.ExtraKey, bytes_value=st.binary(max_size=8)),
    st.builds(pb.ExtraKey, string_value=text),
    st.builds(pb.ExtraKey, int_value=st.integers(-(2**63), 2**63 - 1)),
    st.just(pb.ExtraKey()),  # no value
)
extra_keys = st.lists(
    st.builds(pb.BlockExtraKeys, keys=st.lists(extra_key, max_size=3)), max_size=4
)
prompts = st.builds(
    pb.Prompt, namespace=namespaces, tokens_u32le=token_bytes, extra_keys=extra_keys
) | st.builds(pb.Prompt, tokens_u32le=token_bytes)  # no namespace at all
# Prompts of the stored namespace that pass validation, so the deeper checks get their turn.
valid_prompts = st.builds(
    pb.Prompt,
    namespace=st.just(namespace(SPEC)),
    tokens_u32le=st.one_of(
        st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=20).map(u32),
        st.just(STORED.tokens_u32le),
    ),
)
any_prompts = st.one_of(valid_prompts, prompts)
seconds = st.one_of(
    st.just(0.0),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0.001, max_value=1000),
)
tiers = st.one_of(st.sampled_from([0, 1, 2, 3, 4]), st.integers(-5, 2**31 - 1))
hashes = st.lists(
    st.one_of(st.binary(min_size=16, max_size=16), st.binary(max_size=20)), max_size=5
)


@st.composite
def put_streams(draw: st.DrawFn) -> list[pb.PutRequest]:
    """Mostly-plausible Put streams: a header, then chunks and slot refs that are sometimes
    right, sometimes out of order, too long, empty, or cut off."""
    full = draw(st.integers(0, 4))
    if draw(st.integers(0, 3)):
        tokens = draw(st.lists(st.integers(0, 2**32 - 1), min_size=4 * full, max_size=4 * full))
        tokens += draw(st.lists(st.integers(0, 2**32 - 1), max_size=3))
        prompt = pb.Prompt(namespace=namespace(SPEC), tokens_u32le=u32(tokens) or b"\0" * 4)
        num_blocks = draw(st.integers(0, full))
    else:
        prompt = draw(prompts)
        num_blocks = draw(st.one_of(st.integers(0, 4), st.integers(0, 2**32 - 1)))
    header = pb.PutHeader(
        prompt=prompt,
        durable=draw(st.booleans()),
        num_blocks=num_blocks,
        segment_id=draw(segment_ids) if not draw(st.integers(0, 5)) else 0,
    )
    out = [pb.PutRequest(header=header)] if draw(st.integers(0, 9)) else []
    if draw(st.booleans()):
        # Well-formed chunks for the announced blocks, the stream cut anywhere (or not).
        messages = []
        for i in range(num_blocks or full if num_blocks <= 4 else 4):
            data = draw(st.binary(min_size=N, max_size=N))
            cut = draw(st.sampled_from([N, N, N // 3]))
            messages.append(pb.PutRequest(chunk=pb.BlockChunk(block_index=i, data=data[:cut])))
            if cut < N:
                messages.append(
                    pb.PutRequest(
                        chunk=pb.BlockChunk(block_index=i, offset=cut, data=data[cut:])
                    )
                )
        out += messages[: draw(st.sampled_from([len(messages), len(messages), 0, 1, 2, 3]))]
    else:
        chunk = st.builds(
            pb.BlockChunk,
            block_index=st.integers(0, 4),
            offset=st.one_of(st.sampled_from([0, N // 2, N, N + 1]), st.integers(0, 2**64 - 1)),
            data=st.one_of(st.binary(max_size=16), st.binary(min_size=N - 1, max_size=N + 1)),
        )
        slot = st.builds(
            pb.SlotRef,
            block_index=st.integers(0, 4),
            offset=st.one_of(st.integers(0, 4096), st.integers(0, 2**64 - 1)),
            length=st.one_of(st.just(N), st.integers(0, 2**64 - 1)),
        )
        out += draw(
            st.lists(
                st.one_of(
                    st.builds(pb.PutRequest, chunk=chunk),
                    st.builds(pb.PutRequest, slot=slot),
                    st.just(pb.PutRequest(header=header)),
                    st.just(pb.PutRequest()),
                ),
                max_size=6,
            )
        )
    return out


# -- properties -----------------------------------------------------------------------------------


@PROPERTY
@given(
    prompt=any_prompts,
    num_blocks=st.one_of(st.integers(0, 4), st.integers(0, 2**32 - 1)),
    ttl_s=seconds,
    max_blocks=st.integers(0, 2**32 - 1),
    max_chunk_bytes=st.one_of(st.just(0), st.integers(0, 2**32 - 1)),
    segment_id=st.one_of(st.just(0), segment_ids),
    segment_offset=st.integers(0, 2**64 - 1),
    repair_holes=st.booleans(),
)
def test_lookups_leases_and_fetches(
    harness: Harness,
    prompt: pb.Prompt,
    num_blocks: int,
    ttl_s: float,
    max_blocks: int,
    max_chunk_bytes: int,
    segment_id: int,
    segment_offset: int,
    repair_holes: bool,
) -> None:
    stub = harness.stub
    harness.code(stub.Lookup, pb.LookupRequest(prompt=prompt))
    reserve = pb.ReserveRequest(prompt=prompt, num_blocks=num_blocks, ttl_s=ttl_s)
    if harness.code(stub.Reserve, reserve) == grpc.StatusCode.OK:
        lease = stub.Reserve(reserve)
        assert stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id)).released
    request = pb.FetchRequest(
        prompt=prompt,
        max_blocks=max_blocks,
        max_chunk_bytes=max_chunk_bytes,
        segment_id=segment_id,
        segment_offset=segment_offset,
        repair_holes=repair_holes,
    )
    harness.real_segment(request)
    harness.code(stub.Fetch, request)
    harness.code(stub.Release, pb.ReleaseRequest(lease_id=2**63))
    harness.code(stub.Repair, pb.RepairRequest(prompt=prompt))
    harness.intact()


@PROPERTY
@given(stream=put_streams())
def test_put_streams(harness: Harness, stream: list[pb.PutRequest]) -> None:
    for message in stream:
        if message.WhichOneof("msg") == "header":
            harness.real_segment(message.header)
    harness.code(harness.stub.Put, iter(stream))
    harness.intact()


@PROPERTY
@given(
    block_hashes=hashes,
    ttl_s=seconds,
    tier=tiers,
    namespace=st.one_of(st.none(), namespaces),
    limit=st.integers(0, 2**32 - 1),
    after=st.binary(max_size=17),
    lease_id=st.integers(0, 2**64 - 1),
)
def test_block_requests(
    harness: Harness,
    block_hashes: list[bytes],
    ttl_s: float,
    tier: int,
    namespace: pb.Namespace | None,
    limit: int,
    after: bytes,
    lease_id: int,
) -> None:
    stub = harness.stub
    request = pb.BlocksRequest(block_hashes=block_hashes, ttl_s=ttl_s, tier=tier)
    if namespace is not None:
        request.namespace.CopyFrom(namespace)
    for method in (stub.Pin, stub.Unpin, stub.Evict):
        harness.code(method, request)
    harness.code(stub.Flush, pb.FlushRequest(tier=tier))
    harness.code(stub.ListBlocks, pb.ListBlocksRequest(tier=tier, limit=limit, after=after))
    for h in block_hashes:
        harness.code(stub.Inspect, pb.InspectRequest(block_hash=h))
    harness.code(stub.Release, pb.ReleaseRequest(lease_id=lease_id))
    harness.code(stub.Stats, pb.StatsRequest())
    harness.intact()
