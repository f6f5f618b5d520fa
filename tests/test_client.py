"""The clients against a real server: ``KVStoreServer`` in-process on port 0, G2 + G3 in tmp dirs.

The conversions (tokens, namespaces, block payloads in chunks and slots, DynamicCache) are tested
on their own first; then every call end to end, both byte paths (gRPC chunks and same-host shared
memory), typed errors, retries, the sync client from several threads, a real (tiny, randomly
initialised) Llama whose cache goes through the store and keeps generating the same tokens, and
32 clients at once. Block contents are derived from their hash (``content``), so any block that
comes back can be checked bit for bit against what must have been stored under its name.
"""

from __future__ import annotations

import asyncio
import copy
import random
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from client import (
    AsyncClient,
    AuthError,
    Client,
    CorruptBlockError,
    InvalidArgumentError,
    InvalidTokenError,
    ResourceExhaustedError,
    ServiceUnavailableError,
    SpecMismatchError,
    from_dynamic_cache,
    to_dynamic_cache,
)
from client.aio import _is_local
from client.convert import BlockSink, BlockSource, namespace_of, prompt_of, spec_of
from kvstore.config import StoreConfig
from kvstore.core.block_format import HEADER_BYTES, torch_dtype
from kvstore.core.keys import ModelSpec, block_hashes
from kvstore.engine.engine import EngineConfig
from kvstore.service.auth import TenantConfig
from kvstore.service.server import KVStoreServer, ServerConfig
from tiers.lmdb_store import LmdbTierConfig
from tiers.pinned_memory import PinnedTierConfig

# 6144-byte payloads: rows of 1536 bytes (one per layer and K/V), so 4096-byte chunks end
# inside rows.
SPEC = ModelSpec(
    "client-test", num_layers=2, num_kv_heads=2, head_dim=24, dtype="float16", block_tokens=16
)
BT = SPEC.block_tokens
SLOT = 8192
assert HEADER_BYTES + SPEC.block_nbytes <= SLOT
ADMIN_TOKEN = "admin-token-0123456789"
ALICE_TOKEN = "alice-token-0123456789"


# -- helpers -------------------------------------------------------------------------------------


_CONTENT: dict[tuple[str, bytes], torch.Tensor] = {}


def content(spec: ModelSpec, key: bytes) -> torch.Tensor:
    """The one K/V block that may ever be stored under ``key``."""
    if (spec.dtype, key) not in _CONTENT:
        g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & 0x7FFF_FFFF_FFFF)
        block = torch.randn(spec.block_shape, generator=g).to(torch_dtype(spec.dtype))
        _CONTENT[(spec.dtype, key)] = block
    return _CONTENT[(spec.dtype, key)]


def prompt_kv(spec: ModelSpec, tokens: list[int]) -> torch.Tensor:
    """A prompt's K/V: each full block is ``content`` of its hash; the partial tail is noise."""
    kv = torch.randn((spec.num_layers, 2, len(tokens), spec.num_kv_heads, spec.head_dim)).to(
        torch_dtype(spec.dtype)
    )
    for i, h in enumerate(block_hashes(spec, tokens)):
        kv[:, :, i * spec.block_tokens : (i + 1) * spec.block_tokens] = content(spec, h)
    return kv


def check_blocks(spec: ModelSpec, tokens: list[int], kv: torch.Tensor) -> None:
    for i, h in enumerate(block_hashes(spec, tokens)[: kv.shape[2] // spec.block_tokens]):
        got = kv[:, :, i * spec.block_tokens : (i + 1) * spec.block_tokens]
        assert torch.equal(got, content(spec, h)), f"block {i} differs"


def tokens_of(seed: int, num_tokens: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(50_000) for _ in range(num_tokens)]


def store_config(
    tmp_path: Path,
    *,
    listen: str = "127.0.0.1:0",
    g2_slots: int = 256,
    tenants: tuple[TenantConfig, ...] = (),
) -> StoreConfig:
    return StoreConfig(
        g2=PinnedTierConfig(g2_slots * SLOT, pin="never", segment_prefix="kvstore-ctest"),
        g3=LmdbTierConfig(str(tmp_path / "g3"), 64 << 20),
        engine=EngineConfig(reaper_interval_s=0.05),
        server=ServerConfig(listen=listen, shutdown_grace_s=0.5),
        tenants=tenants,
    )


def mapped_segments() -> list[str]:
    """The same-host segments mapped in this process (by its clients or its servers)."""
    maps = Path("/proc/self/maps").read_text().splitlines()
    return [line for line in maps if "memfd:kvstore-segment" in line]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def shm_bytes(server: KVStoreServer, direction: str) -> float:
    """Payload bytes the server moved through shared memory (its own metrics)."""
    name = f"kvstore_payload_bytes_{direction}_total"
    return server.metrics.registry.get_sample_value(name, {"path": "shm"}) or 0.0


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[KVStoreServer]:
    s = KVStoreServer(store_config(tmp_path))
    await s.start()
    yield s
    await s.stop(0)


def target(server: KVStoreServer) -> str:
    return f"127.0.0.1:{server.port}"


class ServerThread:
    """A server on an event loop of its own, for callers that block (the sync ``Client``)."""

    def __init__(self, config: StoreConfig) -> None:
        self.server = KVStoreServer(config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result()
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"


# -- conversions, no server --------------------------------------------------------------------


def test_tokens_in_any_form_become_the_same_u32le_bytes() -> None:
    tokens = [0, 1, 70_000, 2**32 - 1]
    want = np.array(tokens, dtype="<u4").tobytes()
    for form in (
        tokens,
        np.array(tokens, dtype=np.uint32),
        torch.tensor(tokens, dtype=torch.int64),
    ):
        assert prompt_of(SPEC, form).tokens_u32le == want
    with pytest.raises(InvalidTokenError, match="token 1"):
        prompt_of(SPEC, [1, -1])
    assert spec_of(namespace_of(SPEC)) == SPEC
    prompt = prompt_of(SPEC, list(range(2 * BT + 3)), [[7, "7", b"7"], []])
    kinds = [k.WhichOneof("value") for k in prompt.extra_keys[0].keys]
    assert kinds == ["int_value", "string_value", "bytes_value"]
    assert len(prompt.extra_keys) == 2
    with pytest.raises(InvalidArgumentError, match="full blocks"):
        prompt_of(SPEC, list(range(2 * BT)), [[1]])
    with pytest.raises(InvalidArgumentError, match="bool"):
        prompt_of(SPEC, list(range(BT)), [[True]])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_block_payloads_survive_any_chunking(dtype: str) -> None:
    spec = replace(SPEC, dtype=dtype)
    kv = torch.randn((2, 2, 3 * BT + 5, 2, 24)).to(torch_dtype(dtype))
    source = BlockSource(spec, kv)
    assert source.num_blocks == 3
    for chunk_bytes in (7, 1000, spec.block_nbytes // 4 + 1, spec.block_nbytes, 1 << 20):
        sink = BlockSink(spec, 3)
        chunks = list(source.chunks(3, chunk_bytes))
        random.Random(chunk_bytes).shuffle(chunks)  # the sink does not depend on order
        for c in chunks:
            sink.write(c.block_index, c.offset, c.data)
        assert torch.equal(sink.result(), kv[:, :, : 3 * BT])
    # A block's payload is the C-order bytes of that block alone.
    for i in range(3):
        block = kv[:, :, i * BT : (i + 1) * BT].contiguous()
        assert source.payload(i) == block.view(torch.uint8).numpy().tobytes()
    # Back to back into a shared-memory-like buffer, and out of it as slots.
    buffer = bytearray(3 * spec.block_nbytes)
    source.copy_into(3, memoryview(buffer))
    out = torch.zeros((2, 2, 5 * BT, 2, 24), dtype=torch_dtype(dtype))
    sink = BlockSink(spec, 3, out)
    for i in range(3):
        sink.write(i, 0, memoryview(buffer)[i * spec.block_nbytes : (i + 1) * spec.block_nbytes])
    result = sink.result()
    assert result.data_ptr() == out.data_ptr()  # a view of out: written in place
    assert torch.equal(result, kv[:, :, : 3 * BT])
    assert not out[:, :, 3 * BT :].any()


def test_sink_fills_a_non_contiguous_out_and_refuses_bad_replies() -> None:
    kv = prompt_kv(SPEC, tokens_of(1, 2 * BT))
    source = BlockSource(SPEC, kv)
    out = torch.zeros((2, 2, 2, 2 * BT, 24), dtype=torch.float16).transpose(2, 3)
    sink = BlockSink(SPEC, 2, out)
    for c in source.chunks(2, 4096):
        sink.write(c.block_index, c.offset, c.data)
    sink.result()
    assert torch.equal(out, kv)
    sink = BlockSink(SPEC, 2)
    sink.write(0, 0, source.payload(0))
    with pytest.raises(CorruptBlockError, match="block 1 arrived with 0"):
        sink.result()
    with pytest.raises(CorruptBlockError, match="block 2"):
        sink.write(2, 0, b"x")
    with pytest.raises(CorruptBlockError, match="6144"):
        sink.write(1, 6000, bytes(200))


def test_dynamic_cache_conversions_round_trip() -> None:
    kv = torch.randn((3, 2, 11, 2, 8))
    cache = to_dynamic_cache(kv)
    assert len(cache.layers) == 3
    assert tuple(cache.layers[1].keys.shape) == (1, 2, 11, 8)
    assert torch.equal(cache.layers[1].values[0, 1], kv[1, 1, :, 1])
    assert torch.equal(from_dynamic_cache(cache), kv)
    legacy = tuple((layer.keys, layer.values) for layer in cache.layers)
    assert torch.equal(from_dynamic_cache(legacy), kv)
    with pytest.raises(InvalidArgumentError, match="batch=1"):
        from_dynamic_cache([(torch.zeros(2, 2, 11, 8), torch.zeros(2, 2, 11, 8))])
    transformers: Any = pytest.importorskip("transformers")
    sliding = transformers.DynamicCache()
    sliding.layers = [transformers.cache_utils.DynamicSlidingWindowLayer(sliding_window=8)]
    sliding.update(torch.zeros(1, 2, 11, 8), torch.zeros(1, 2, 11, 8), 0)
    with pytest.raises(InvalidArgumentError, match="sliding-window"):
        from_dynamic_cache(sliding)


@pytest.mark.parametrize(
    ("where", "local"),
    [
        ("localhost:5", True),
        ("127.0.0.1:5", True),
        ("127.8.9.1:5", True),
        ("[::1]:5", True),
        ("dns:///localhost:5", True),
        ("ipv4:127.0.0.1:5", True),
        ("unix:/run/kvstore.sock", True),
        ("10.0.0.7:5", False),
        ("kvstore.internal:5", False),
        ("[2001:db8::1]:5", False),
    ],
)
def test_same_host_auto_means_a_loopback_target(where: str, local: bool) -> None:
    assert _is_local(where) is local


async def test_wrong_tensors_are_refused_before_anything_is_sent() -> None:
    # Nothing listens on port 1: these checks must not need a server.
    async with AsyncClient("127.0.0.1:1", retries=0) as client:
        tokens = tokens_of(2, 2 * BT)
        kv = prompt_kv(SPEC, tokens)
        with pytest.raises(SpecMismatchError, match="dtype is float32"):
            await client.put(SPEC, tokens, kv.float())
        with pytest.raises(SpecMismatchError, match="shape"):
            await client.put(SPEC, tokens, kv[:, :, :, :1])
        with pytest.raises(InvalidArgumentError, match="prompt only"):
            await client.put(SPEC, tokens[:BT], kv)
        with pytest.raises(InvalidTokenError):
            await client.lookup(SPEC, [1.5])  # type: ignore[list-item]
        with pytest.raises(SpecMismatchError, match="out dtype"):
            await client.get_prefix(SPEC, tokens, out=torch.zeros(2, 2, BT, 2, 24))


# -- end to end ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
async def test_put_lookup_get_prefix_bit_exact_over_both_paths(
    server: KVStoreServer, dtype: str
) -> None:
    spec = replace(SPEC, dtype=dtype)
    tokens = tokens_of(3, 5 * BT + 7)  # a trailing partial block is not stored
    kv = prompt_kv(spec, tokens)
    async with (
        AsyncClient(target(server), same_host=False, max_chunk_bytes=4096) as remote,
        AsyncClient(target(server), same_host=True) as local,
    ):
        result = await remote.put(spec, tokens, kv)
        assert (result.stored, result.already) == (5, 0)
        assert result.hashes == block_hashes(spec, tokens)  # anonymous tenant: no salt
        found = await local.lookup(spec, tokens)
        assert found.tiers == ["G2"] * 5
        assert (found.hit_blocks, found.hit_tokens, found.holes) == (5, 5 * BT, [])
        assert found.hashes == result.hashes

        by_bytes, n = await remote.get_prefix(spec, tokens)
        assert n == 5 * BT
        assert by_bytes.dtype == torch_dtype(dtype)
        assert torch.equal(by_bytes, kv[:, :, : 5 * BT])
        before = shm_bytes(server, "out")
        by_shm, n = await local.get_prefix(spec, tokens)
        assert shm_bytes(server, "out") - before == 5 * spec.block_nbytes  # slots, not bytes
        assert n == 5 * BT
        assert torch.equal(by_shm, by_bytes)
        check_blocks(spec, tokens, by_shm)
        assert (await remote.put(spec, tokens, kv)).already == 5
        assert (await server.engine.stats()).num_leases == 0  # the fetch lease was released


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_tensors_on_the_gpu_go_in_and_come_back(server: KVStoreServer) -> None:
    tokens = tokens_of(19, 3 * BT)
    kv = prompt_kv(SPEC, tokens)
    async with AsyncClient(target(server)) as client:
        assert (await client.put(SPEC, tokens, kv.cuda())).stored == 3
        out = torch.zeros((2, 2, 4 * BT, 2, 24), dtype=torch.float16, device="cuda")
        got, n = await client.get_prefix(SPEC, tokens, out=out)
        assert n == 3 * BT
        assert got.device == out.device
        assert torch.equal(out[:, :, :n].cpu(), kv)


async def test_same_host_put_reuses_and_grows_its_segment(server: KVStoreServer) -> None:
    async with (
        AsyncClient(target(server), same_host=True) as local,
        AsyncClient(target(server), same_host=False) as remote,
    ):
        for seed, blocks in ((4, 2), (5, 3), (6, 200)):  # 200 blocks: 1.2 MiB, past the first MiB
            tokens = tokens_of(seed, blocks * BT)
            kv = prompt_kv(SPEC, tokens)
            before = shm_bytes(server, "in")
            result = await local.put(SPEC, tokens, kv)
            assert result.stored == blocks
            assert shm_bytes(server, "in") - before == blocks * SPEC.block_nbytes
            got, n = await remote.get_prefix(SPEC, tokens)
            assert n == blocks * BT
            assert torch.equal(got, kv)
        # One segment, grown in place of the first (the smaller one closed on the server too).
        assert [n for n, _ in server.segments.usage().values()] == [1]
        assert len(mapped_segments()) == 2  # the client's mapping and the server's
    assert server.segments.usage() == {}  # closed with the client
    assert mapped_segments() == []


async def test_get_prefix_stops_at_the_first_hole(server: KVStoreServer) -> None:
    tokens = tokens_of(7, 6 * BT)
    kv = prompt_kv(SPEC, tokens)
    async with AsyncClient(target(server)) as client:
        assert (await client.put(SPEC, tokens, kv[:, :, : BT + 3])).stored == 1  # K/V may be short
        result = await client.put(SPEC, tokens, kv, durable=True)  # G3 copies done: evict is final
        assert (result.stored, result.already) == (5, 1)
        hashes = (await client.lookup(SPEC, tokens)).hashes
        assert await client.evict(SPEC, [hashes[2], hashes[4]]) == 2
        found = await client.lookup(SPEC, tokens)
        assert found.tiers == ["G2", "G2", None, "G2", None, "G2"]
        assert (found.hit_blocks, found.holes) == (2, [2, 4])
        got, n = await client.get_prefix(SPEC, tokens)
        assert n == 2 * BT
        assert torch.equal(got, kv[:, :, : 2 * BT])
        got, n = await client.get_prefix(SPEC, tokens, max_blocks=1)
        assert (n, got.shape[2]) == (BT, BT)
        out = torch.zeros((2, 2, BT + 3, 2, 24), dtype=torch.float16)  # room for one block
        got, n = await client.get_prefix(SPEC, tokens, out=out)
        assert n == BT
        assert got.data_ptr() == out.data_ptr()
        assert torch.equal(out[:, :, :BT], kv[:, :, :BT])
        empty, n = await client.get_prefix(SPEC, tokens_of(8, 3 * BT))
        assert n == 0
        assert tuple(empty.shape) == (2, 2, 0, 2, 24)


async def test_reserve_holds_until_the_context_exits(server: KVStoreServer) -> None:
    tokens = tokens_of(9, 3 * BT)
    async with AsyncClient(target(server)) as client:
        await client.put(SPEC, tokens, prompt_kv(SPEC, tokens))
        async with client.reserve(SPEC, tokens, ttl_s=60) as lease:
            assert lease.hashes == block_hashes(SPEC, tokens)
            assert lease.ttl_s == 60
            assert (await client.stats()).num_leases == 1
            assert await client.evict(SPEC, lease.hashes) == 0  # leased blocks stay
        assert (await client.stats()).num_leases == 0
        lease = await client.reserve(SPEC, tokens, num_blocks=2)
        assert len(lease.hashes) == 2
        assert await client.release(lease.lease_id) is True
        assert await client.release(lease.lease_id) is False  # twice is harmless
        assert (await client.stats()).num_leases == 0


async def test_operator_calls(server: KVStoreServer) -> None:
    tokens = tokens_of(10, 2 * BT)
    async with AsyncClient(target(server)) as client:
        assert await client.health() == "SERVING"
        result = await client.put(SPEC, tokens, prompt_kv(SPEC, tokens), durable=True)
        listed = [b async for b in client.list_blocks("G3", page_size=1)]
        assert sorted(b.block_hash for b in listed) == sorted(result.hashes)
        info = await client.inspect(result.hashes[1])
        assert info is not None
        assert info.parent_hash == result.hashes[0]
        assert set(info.tiers) == {"G2", "G3"}
        assert (info.dtype, info.shape, info.codec) == ("float16", SPEC.block_shape, "RAW")
        assert await client.inspect(bytes(16)) is None
        assert await client.pin(SPEC, result.hashes) == 2
        assert await client.flush("G2") == 0  # pinned
        assert await client.unpin(SPEC, result.hashes) == 2
        assert await client.flush("G2") == 2
        assert (await client.lookup(SPEC, tokens)).tiers == ["G3", "G3"]
        stats = await client.stats()
        assert {t.tier for t in stats.tiers} == {"G2", "G3"}
        assert stats.counters["stored"] == 2

        # A watch starts with a snapshot of what is stored, then follows changes.
        events = client.watch()
        snapshot = [await anext(events) for _ in range(2)]
        assert all(e.snapshot and e.tier == "G3" for e in snapshot)
        assert {e.block_hash for e in snapshot} == set(result.hashes)
        following = asyncio.ensure_future(anext(events))
        longer = tokens + tokens_of(99, BT)
        grown = await client.put(SPEC, longer, prompt_kv(SPEC, longer))
        event = await asyncio.wait_for(following, 5)
        assert (event.kind, event.block_hash, event.tier) == ("stored", grown.hashes[0], "G2")
        assert not event.snapshot
        await events.aclose()  # type: ignore[attr-defined]


async def test_server_errors_are_typed(tmp_path: Path) -> None:
    tenants = (
        TenantConfig("admin", ADMIN_TOKEN, salt="admin-salt", admin=True),
        TenantConfig("alice", ALICE_TOKEN, salt="alice-salt"),
    )
    tokens = tokens_of(11, 2 * BT)
    async with KVStoreServer(store_config(tmp_path, tenants=tenants)) as server:
        async with AsyncClient(target(server), token=ALICE_TOKEN) as alice:
            result = await alice.put(SPEC, tokens, prompt_kv(SPEC, tokens))
            assert result.hashes != block_hashes(SPEC, tokens)  # salted per tenant
            with pytest.raises(InvalidArgumentError, match="num_blocks"):
                await alice.reserve(SPEC, tokens, num_blocks=5)
            with pytest.raises(AuthError, match="admin") as denied:
                await alice.flush()
            assert denied.value.code == "PERMISSION_DENIED"
        async with AsyncClient(target(server), token="not-a-token-of-anyone") as stranger:
            with pytest.raises(AuthError) as unknown:
                await stranger.lookup(SPEC, tokens)
            assert unknown.value.code == "UNAUTHENTICATED"
        async with AsyncClient(target(server), token=ADMIN_TOKEN) as admin:
            assert (await admin.lookup(SPEC, tokens)).hit_blocks == 0  # another tenant's salt
            assert await admin.flush() == 2


async def test_a_full_store_is_resource_exhausted(tmp_path: Path) -> None:
    tokens = tokens_of(18, 5 * BT)
    async with (
        KVStoreServer(store_config(tmp_path, g2_slots=2)) as server,
        AsyncClient(target(server), same_host=False) as client,
    ):
        with pytest.raises(ResourceExhaustedError, match="G2") as full:
            await client.put(SPEC, tokens, prompt_kv(SPEC, tokens))
        assert full.value.code == "RESOURCE_EXHAUSTED"
        assert (await client.lookup(SPEC, tokens)).hit_blocks == 0  # nothing half-stored


async def test_retries_reach_a_server_that_starts_late(tmp_path: Path) -> None:
    port = free_port()
    server = KVStoreServer(store_config(tmp_path, listen=f"127.0.0.1:{port}"))

    async def start_later() -> None:
        await asyncio.sleep(0.5)
        await server.start()

    starting = asyncio.create_task(start_later())
    try:
        began = time.monotonic()
        async with AsyncClient(f"127.0.0.1:{port}", retries=6, backoff_s=0.1) as client:
            found = await client.lookup(SPEC, tokens_of(12, BT))
        assert found.tiers == [None]
        assert time.monotonic() - began >= 0.5
    finally:
        await starting
        await server.stop(0)
    began = time.monotonic()
    async with AsyncClient(f"127.0.0.1:{port}", retries=0) as client:
        with pytest.raises(ServiceUnavailableError, match=str(port)) as failed:
            await client.lookup(SPEC, tokens_of(12, BT))
    assert failed.value.code == "UNAVAILABLE"
    assert time.monotonic() - began < 1.0


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, and a server and a client certificate it signed (for localhost and 127.0.0.1)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    d = tmp_path_factory.mktemp("certs")
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")

    def openssl(command: str) -> None:
        subprocess.run(["openssl", *command.split()], cwd=d, check=True, capture_output=True)

    openssl("req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=ca -keyout ca.key -out ca.pem")
    for name in ("server", "client"):
        openssl(f"req -newkey rsa:2048 -nodes -subj /CN={name} -keyout {name}.key -out {name}.csr")
        openssl(
            f"x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 "
            f"-extfile san.ext -out {name}.pem"
        )
    return d


async def test_tls_with_a_client_certificate(tmp_path: Path, certs: Path) -> None:
    config = replace(
        store_config(tmp_path),
        server=ServerConfig(
            listen="127.0.0.1:0",
            tls_cert=str(certs / "server.pem"),
            tls_key=str(certs / "server.key"),
            tls_client_ca=str(certs / "ca.pem"),
        ),
    )
    tokens = tokens_of(17, 2 * BT)
    kv = prompt_kv(SPEC, tokens)
    async with KVStoreServer(config) as server:
        where = f"localhost:{server.port}"
        async with AsyncClient(
            where,
            tls_ca=certs / "ca.pem",
            tls_cert=(certs / "client.pem").read_bytes(),  # paths or PEM bytes
            tls_key=certs / "client.key",
        ) as client:
            assert (await client.put(SPEC, tokens, kv)).stored == 2
            got, _ = await client.get_prefix(SPEC, tokens)
            assert torch.equal(got, kv)
        async with AsyncClient(where, tls_ca=certs / "ca.pem", retries=0) as no_cert:
            with pytest.raises(ServiceUnavailableError):
                await no_cert.stats()
        async with AsyncClient(where, retries=0) as plain:
            with pytest.raises(ServiceUnavailableError):
                await plain.stats()


def test_sync_client_from_several_threads(tmp_path: Path) -> None:
    with ServerThread(store_config(tmp_path)) as st, Client(st.target) as client:
        assert client.health() == "SERVING"
        tokens = tokens_of(13, 3 * BT + 1)
        kv = prompt_kv(SPEC, tokens)
        assert client.put(SPEC, tokens, kv).stored == 3
        assert client.lookup(SPEC, tokens).hit_tokens == 3 * BT
        got, n = client.get_prefix(SPEC, tokens)
        assert n == 3 * BT
        assert torch.equal(got, kv[:, :, :n])
        with client.reserve(SPEC, tokens) as lease:
            assert len(lease.hashes) == 3
            assert client.stats().num_leases == 1
        assert client.stats().num_leases == 0
        assert len(list(client.list_blocks())) == 3
        events = client.watch()
        assert next(events).snapshot
        events.close()  # type: ignore[attr-defined]

        def work(seed: int) -> int:
            rng = random.Random(seed)
            for _ in range(10):
                mine = tokens_of(seed * 100 + rng.randrange(3), rng.randrange(1, 6) * BT)
                client.put(SPEC, mine, prompt_kv(SPEC, mine))
                got, n = client.get_prefix(SPEC, mine)
                assert n == len(mine)
                check_blocks(SPEC, mine, got)
            return seed

        with ThreadPoolExecutor(4) as pool:
            assert sorted(pool.map(work, range(4))) == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="closed"):
        client.stats()


async def test_32_clients_at_once_get_exact_blocks(tmp_path: Path) -> None:
    """Overlapping prompts (a shared system prompt, shared conversations) from 32 clients for
    about 4 s, half over shared memory: no errors, every block returned is exact."""
    system = tokens_of(14, 2 * BT)
    conversations = [system + tokens_of(15 + i, 6 * BT) for i in range(8)]
    counts = {"puts": 0, "fetches": 0, "hit_blocks": 0}
    with ServerThread(store_config(tmp_path, g2_slots=160)) as st:
        deadline = time.monotonic() + 4.0

        async def worker(i: int) -> None:
            rng = random.Random(i)
            async with AsyncClient(st.target, same_host=i % 2 == 0) as client:
                while time.monotonic() < deadline:
                    full = rng.choice(conversations)
                    tokens = full[: rng.randrange(1, len(full) // BT + 1) * BT + rng.randrange(BT)]
                    if rng.random() < 0.5:
                        await client.put(SPEC, tokens, prompt_kv(SPEC, tokens))
                        counts["puts"] += 1
                    got, n = await client.get_prefix(SPEC, tokens)
                    assert got.shape[2] == n
                    check_blocks(SPEC, tokens, got)
                    counts["fetches"] += 1
                    counts["hit_blocks"] += n // BT

        await asyncio.gather(*(worker(i) for i in range(32)))
    assert counts["puts"] > 32
    assert counts["hit_blocks"] > counts["fetches"]


def test_llama_cache_round_trip_keeps_generation_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers: Any = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    spec = ModelSpec(
        "tiny-llama", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float32", block_tokens=8
    )
    prompt = [t % 1000 for t in tokens_of(16, 37)]  # 4 full blocks + 5 tokens
    with torch.no_grad():
        original = model(torch.tensor([prompt]), use_cache=True).past_key_values

    def greedy(cache: Any, rest: list[int], steps: int = 8) -> list[int]:
        ids, out = torch.tensor([rest]), []
        with torch.no_grad():
            for _ in range(steps):
                logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
                out.append(int(logits[0, -1].argmax()))
                ids = torch.tensor([[out[-1]]])
        return out

    with ServerThread(store_config(tmp_path)) as st, Client(st.target) as client:
        assert client.put(spec, prompt, from_dynamic_cache(original)).stored == 4
        kv, n = client.get_prefix(spec, prompt)
    assert n == 32
    fetched = to_dynamic_cache(kv, config=config)
    for layer in range(2):
        assert torch.equal(fetched.layers[layer].keys, original.layers[layer].keys[:, :, :32])
        assert torch.equal(fetched.layers[layer].values, original.layers[layer].values[:, :, :32])
    reference = copy.deepcopy(original)
    reference.crop(32 - len(prompt))  # negative: drop that many tokens, in every version
    assert greedy(fetched, prompt[32:]) == greedy(reference, prompt[32:])


@pytest.fixture(autouse=True)
def _no_leaked_segments() -> Iterator[None]:
    yield
    assert mapped_segments() == []
