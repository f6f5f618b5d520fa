"""G1 ``GpuMemoryTier``: blocks of any size in one preallocated uint8 slab on a device.

Payloads are extents of the slab handed out by the offset allocator of ``tiers/slab.py`` (best
fit, coalescing, 256-byte granularity, so every payload is aligned for any dtype's view).

The payload (the raw K/V tensor bytes) lives on the device, so an engine sharing the GPU can use a
block in place (``tensor_of``); the 128-byte header stays on the host, where it is needed for
verification and costs no device memory traffic. G1 therefore holds raw-codec blocks only: a
compressed payload would be useless to a GPU consumer.

On CUDA:

- The slab is ONE ``cudaMalloc`` made through cupy (``cupy.cuda.Memory``, not cupy's pool) and
  viewed as a torch tensor, so offset 0 of the slab is the base of the allocation: a CUDA IPC
  handle (``ipc_handle``) maps a whole allocation, and a same-GPU peer finds a block at
  ``extent_of(key)[0]`` in it. Without cupy the slab comes from torch's allocator (an extent of
  one of its segments, at an unknown offset) and ``ipc_handle`` is None.
- Copies to and from the host are queued on the tier's own CUDA stream (``non_blocking``); a batch
  records an event after its copies and the call waits for it in a worker thread, never on the
  event loop's. A put commits its extents only once its event has completed, so a block being
  written is never readable (and a concurrent put of the same key waits for it); a failed or
  cancelled copy releases them. A get returns once its bytes are complete. Every copy of the tier
  is on one stream, in order, so an extent freed and reused while a copy out of it is queued is
  overwritten only after that copy. No call returns, or raises, with a copy of its own still in
  flight: a caller may reuse its buffers at once.
- Host memory: a source or destination in pinned memory (G2's segment, registered with
  ``cudaHostRegister``; a ``pin_memory`` tensor) is copied by DMA while the event loop runs on.
  Pageable memory cannot be: CUDA stages it through the driver's own pinned buffer, and
  ``cudaMemcpyAsync`` then returns once a pageable source is staged, and only once a copy into a
  pageable destination is complete (CUDA's "API synchronization behavior"). So a ``get`` into
  fresh ``bytearray`` s, or a ``get_into`` of pageable buffers, holds the event loop for the copy,
  as the CPU memcpy of G2 does. A staging buffer of our own would only add a second host copy.

On a CPU-only machine the slab can be built on ``cpu`` for tests (copies inline, as above with
no stream); in production G1 is off unless the engine shares the GPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import KW_ONLY, dataclass
from typing import Any

import torch
from torch.utils.dlpack import from_dlpack

from kvstore.core.block_format import HEADER_BYTES, BlockHeader, Codec, read_header, torch_dtype
from kvstore.core.cuda import DEVICE_UUID_BYTES, device_uuid
from kvstore.core.errors import ConfigError, InvalidArgumentError
from kvstore.core.keys import BlockHash
from tiers.base import (
    BlockBytes,
    Buffer,
    CorruptionCallback,
    Read,
    check_capacity,
    check_fits,
)
from tiers.slab import SlabTable, SlabTier

__all__ = ["DEVICE_UUID_BYTES", "IPC_HANDLE_BYTES", "GpuMemoryTier", "GpuTierConfig"]

log = logging.getLogger(__name__)

IPC_HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t)


@dataclass(frozen=True, slots=True)
class GpuTierConfig:
    capacity_bytes: int
    _: KW_ONLY
    device: str = "cuda"

    def __post_init__(self) -> None:
        check_capacity("G1", self.capacity_bytes)
        try:
            dev = torch.device(self.device)
        except RuntimeError as exc:
            raise ConfigError(f"G1.device {self.device!r} is not a torch device: {exc}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                "G1.device is cuda but this machine has no CUDA device; disable G1 or use "
                "device='cpu' (tests only)"
            )
        if dev.type == "cuda" and dev.index is not None:
            count = torch.cuda.device_count()
            if dev.index >= count:
                raise ConfigError(
                    f"G1.device is {self.device} but this machine has {count} CUDA device(s)"
                )


def _host_bytes(buf: Buffer) -> torch.Tensor:
    with warnings.catch_warnings():
        # torch.frombuffer warns on read-only buffers (bytes); we only read from it.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buf, dtype=torch.uint8)


def _cupy_slab(device: torch.device, nbytes: int) -> tuple[torch.Tensor, Any] | None:
    """One ``cudaMalloc`` of ``nbytes`` on ``device`` through cupy, as a torch uint8 tensor that
    starts at the allocation's base, and the ``cupy.cuda.Memory`` that owns it; None without cupy
    or when cupy cannot allocate there (then the caller uses torch's allocator, without IPC)."""
    try:
        import cupy
    except ImportError:
        return None
    try:
        with cupy.cuda.Device(device.index):
            # Memory(n) is cudaMalloc itself (cupy's pool would hand out a piece of a larger
            # allocation, which an IPC handle could not name at offset 0).
            memory = cupy.cuda.Memory(nbytes)
            array = cupy.ndarray(
                (nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(memory, 0)
            )
            # Zero-copy; the DLPack capsule keeps ``array`` (and so ``memory``) alive for as long
            # as any view of the tensor lives.
            tensor = from_dlpack(array)
    except Exception as exc:  # a cupy that does not match the driver, or out of memory
        log.warning(
            "G1: cupy could not allocate the slab on %s (%s); using torch's allocator, so the "
            "slab has no CUDA IPC handle",
            device,
            exc,
        )
        return None
    if tensor.data_ptr() != memory.ptr or tensor.device != device or tensor.numel() != nbytes:
        raise RuntimeError(
            f"G1: the torch view of the cupy slab is {tensor.numel()} bytes at "
            f"{tensor.data_ptr():#x} on {tensor.device}, not {nbytes} at {memory.ptr:#x} on "
            f"{device}"
        )
    return tensor, memory


class GpuMemoryTier(SlabTier):
    def __init__(self, config: GpuTierConfig, on_corrupt: CorruptionCallback | None = None) -> None:
        super().__init__("G1", config.capacity_bytes, on_corrupt)
        self.config = config
        # The slab holds payloads only; the header is kept on the host.
        self._slab = SlabTable("G1", config.capacity_bytes)
        device = torch.device(config.device)
        self._stream: torch.cuda.Stream | None = None
        self._waiter: ThreadPoolExecutor | None = None
        self._cupy_memory: Any = None  # the cudaMalloc that holds the slab, when cupy made it
        self._ipc_handle: bytes | None = None
        self._device_uuid: bytes | None = None
        if device.type == "cuda":
            index: int | None = device.index  # torch's stubs say int; "cuda" alone has None
            if index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            self._stream = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
            slab = _cupy_slab(device, self._slab.capacity)
            if slab is None:
                memory = torch.empty(self._slab.capacity, dtype=torch.uint8, device=device)
            else:
                memory, self._cupy_memory = slab
            # Zeroed so that no earlier contents of device memory are ever handed out; on the
            # tier's stream, waited for, so that every later copy is ordered after it.
            with torch.cuda.stream(self._stream):
                memory.fill_(0)
            self._stream.synchronize()
            # One thread waits for the copies' events: the copies of the tier run in order on
            # one stream, so their events complete in order too.
            self._waiter = ThreadPoolExecutor(1, thread_name_prefix="kvstore-g1-copies")
        else:
            memory = torch.empty(self._slab.capacity, dtype=torch.uint8, device=device)
            # Write every page now: a fresh host allocation costs ~10 ms of page faults per
            # 32 MiB, which would otherwise land on the first puts.
            memory.fill_(0)
        self.device = device
        self._memory = memory
        self._headers: dict[BlockHash, tuple[bytes, BlockHeader]] = {}
        # Keys whose copies into the slab are queued but not yet complete, with the future that
        # their put sets when it has committed (or released) them.
        self._writing: dict[BlockHash, asyncio.Future[None]] = {}

    # -- what same-GPU peers need (CUDA IPC) ----------------------------------------------------

    @property
    def slab_bytes(self) -> int:
        """The slab's size in bytes (the whole allocation when ``ipc_handle`` is not None)."""
        return self._slab.capacity

    def ipc_handle(self) -> bytes | None:
        """The 64-byte ``cudaIpcMemHandle_t`` of the slab's allocation, whose offset 0 is the
        slab's offset 0; None on the CPU, without cupy, or after ``close``."""
        if self._cupy_memory is None:
            return None
        if self._ipc_handle is None:
            import cupy

            with cupy.cuda.Device(self.device.index):
                handle = bytes(cupy.cuda.runtime.ipcGetMemHandle(self._cupy_memory.ptr))
            if len(handle) != IPC_HANDLE_BYTES:
                raise RuntimeError(f"G1: a CUDA IPC handle of {len(handle)} bytes")
            self._ipc_handle = handle
        return self._ipc_handle

    def device_uuid(self) -> bytes | None:
        """The 16 bytes of the slab's GPU's UUID (``nvidia-smi -L`` prints them as
        ``GPU-<8>-<4>-<4>-<4>-<12>`` hex); None on the CPU."""
        if self.device.type != "cuda":
            return None
        if self._device_uuid is None:
            self._device_uuid = device_uuid(self.device)
        return self._device_uuid

    def _stored_nbytes(self, nbytes: int) -> int:
        return max(1, nbytes - HEADER_BYTES)  # the header stays on the host

    def _stored(self, key: bytes) -> tuple[int, int, BlockHeader] | None:
        """``(offset, payload nbytes, header)`` of a stored block."""
        k = BlockHash(bytes(key))
        where = self._slab.lookup(k)
        stored = self._headers.get(k)
        if where is None or stored is None:
            return None
        return where[0], where[1], stored[1]

    def extent_of(self, key: bytes) -> tuple[int, int, int] | None:
        """``(offset in the slab, payload nbytes, payload xxh3-64)`` of a stored block, or None.

        The header stays on the host: the payload is all the slab holds. Valid until the block
        is deleted; callers hold a lease."""
        stored = self._stored(key)
        if stored is None:
            return None
        start, n, header = stored
        return start, n, header.payload_xxh3

    def tensor_of(self, key: bytes) -> torch.Tensor | None:
        """The stored block as a tensor view on the device (no copy), or None.

        The view is valid until the block is deleted; callers hold a lease (a later layer) so that
        placement does not delete it under them.
        """
        stored = self._stored(key)
        if stored is None:
            return None
        start, n, header = stored
        return self._memory[start : start + n].view(torch_dtype(header.dtype)).view(header.shape)

    # -- copies ---------------------------------------------------------------------------------

    def _on_stream(self) -> contextlib.AbstractContextManager[object]:
        """Where the copies of a batch are queued: the tier's stream (CUDA), inline (CPU)."""
        if self._stream is None:
            return contextlib.nullcontext()
        return torch.cuda.stream(self._stream)

    async def _copied(self) -> None:
        """Return once every copy queued so far on the tier's stream is complete, waiting in the
        tier's worker thread, not on the event loop. At once on the CPU: its copies are done."""
        stream = self._stream
        if stream is None:
            return
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(stream)
        if event.query():  # type: ignore[no-untyped-call]
            return
        device = self.device

        def wait() -> None:
            # The device made current in the worker thread: a thread's first CUDA call would
            # otherwise bind it to device 0, creating a context there if G1 is elsewhere.
            with torch.cuda.device(device):
                event.synchronize()

        await asyncio.get_running_loop().run_in_executor(self._waiter, wait)

    def _settle(self) -> None:
        """After a failed or cancelled batch: block until the tier's queued copies are done, so
        that none outlives the call (the caller's buffers, the extents released)."""
        if self._stream is not None:
            # After a CUDA error the same error comes back here; the caller re-raises the first.
            with contextlib.suppress(RuntimeError):
                self._stream.synchronize()

    # -- the contract ---------------------------------------------------------------------------

    async def _get(self, keys: list[BlockHash]) -> list[BlockBytes | None]:
        # Fresh buffers, filled by ``_get_into``: one copy path, one wait for the batch.
        out: list[BlockBytes | None] = []
        for key in keys:
            where = self._slab.lookup(key)
            out.append(None if where is None else bytearray(HEADER_BYTES + where[1]))
        hits = [(k, memoryview(d)) for k, d in zip(keys, out, strict=True) if d is not None]
        await self._get_into([k for k, _ in hits], [v for _, v in hits])
        return out

    async def _get_into(self, keys: list[BlockHash], views: list[memoryview]) -> list[Read | None]:
        out: list[Read | None] = []
        non_blocking = self._stream is not None
        try:
            with self._on_stream():
                for key, view in zip(keys, views, strict=True):
                    where = self._slab.lookup(key)
                    if where is None:
                        out.append(None)
                        continue
                    start, n = where
                    check_fits(key, HEADER_BYTES + n, view)
                    view[:HEADER_BYTES] = self._headers[key][0]
                    dst = torch.frombuffer(view, dtype=torch.uint8, count=HEADER_BYTES + n)
                    dst[HEADER_BYTES:].copy_(
                        self._memory[start : start + n], non_blocking=non_blocking
                    )
                    out.append(Read(HEADER_BYTES + n))
            if any(r is not None for r in out):
                await self._copied()
        except BaseException:
            self._settle()
            raise
        return out

    async def _put(self, items: list[tuple[BlockHash, Buffer]]) -> int:
        writing = self._writing
        # A key that another put is still copying in is not copied twice (two commits of one
        # key would leak an extent): this put waits for that one instead, below.
        others = {writing[k] for k, _ in items if k in writing}
        new = [(k, v) for k, v in items if k not in self._slab and k not in writing]
        headers = [read_header(v) for _, v in new]
        for (key, _), header in zip(new, headers, strict=True):
            if header.codec is not Codec.RAW:
                raise InvalidArgumentError(
                    f"G1 stores raw blocks only; block {key.hex()} is compressed"
                )
        sizes = [(k, len(v) - HEADER_BYTES) for k, v in new]
        offsets = self._slab.allocate(sizes)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for key, _ in new:
            writing[key] = done
        non_blocking = self._stream is not None
        try:
            with self._on_stream():
                for (_, value), start in zip(new, offsets, strict=True):
                    payload = memoryview(value)[HEADER_BYTES:]
                    self._memory[start : start + len(payload)].copy_(
                        _host_bytes(payload), non_blocking=non_blocking
                    )
            if new:
                await self._copied()
        except BaseException:
            self._settle()
            self._slab.release([(o, n) for o, (_, n) in zip(offsets, sizes, strict=True)])
            raise
        else:
            # Visible only now that every byte of the batch is in the slab.
            for (key, value), start, header, (_, n) in zip(
                new, offsets, headers, sizes, strict=True
            ):
                self._headers[key] = (bytes(memoryview(value)[:HEADER_BYTES]), header)
                self._slab.commit(key, start, n)
        finally:
            for key, _ in new:
                del writing[key]
            done.set_result(None)
        if others:
            # Stored (or, if that put failed, not) once the other puts are done: after a put
            # returns, its blocks are readable unless another put of them failed.
            await asyncio.wait(others)
        return len(new)

    async def _delete(self, keys: list[BlockHash]) -> int:
        removed = 0
        for key in keys:
            if self._slab.remove(key):
                del self._headers[key]
                removed += 1
        return removed

    async def _usage(self) -> tuple[int, int]:
        # Payload bytes on the device plus the host-side headers: the same total as other tiers.
        return self._slab.used_bytes + HEADER_BYTES * len(self._slab), len(self._slab)

    async def close(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()
        if self._waiter is not None:
            self._waiter.shutdown(wait=True)
        self._headers.clear()
        self._memory = torch.empty(0, dtype=torch.uint8, device=self.device)
        # cudaFree happens when the last view of the slab (``tensor_of``) is gone too: the
        # DLPack capsule holds the allocation for as long as any view lives.
        self._cupy_memory = None
        self._ipc_handle = None
