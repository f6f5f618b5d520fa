"""G1 ``GpuMemoryTier``: blocks of any size in one preallocated torch uint8 slab on a device.

Payloads are extents of the slab handed out by the offset allocator of ``tiers/slab.py`` (best
fit, coalescing, 256-byte granularity, so every payload is aligned for any dtype's view).

The payload (the raw K/V tensor bytes) lives on the device, so an engine sharing the GPU can use a
block in place (``tensor_of``); the 128-byte header stays on the host, where it is needed for
verification and costs no device memory traffic. G1 therefore holds raw-codec blocks only: a
compressed payload would be useless to a GPU consumer.

On a CPU-only machine the slab can be built on ``cpu`` for tests; in production G1 is off unless the
engine shares the GPU. cupy is an optional extra for CUDA IPC handles to same-GPU peers; nothing
here needs it.
"""

from __future__ import annotations

import warnings
from dataclasses import KW_ONLY, dataclass

import torch

from kvstore.core.block_format import HEADER_BYTES, BlockHeader, Codec, read_header, torch_dtype
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

__all__ = ["GpuMemoryTier", "GpuTierConfig"]


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


def _host_bytes(buf: Buffer) -> torch.Tensor:
    with warnings.catch_warnings():
        # torch.frombuffer warns on read-only buffers (bytes); we only read from it.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buf, dtype=torch.uint8)


class GpuMemoryTier(SlabTier):
    def __init__(self, config: GpuTierConfig, on_corrupt: CorruptionCallback | None = None) -> None:
        super().__init__("G1", config.capacity_bytes, on_corrupt)
        self.config = config
        # The slab holds payloads only; the header is kept on the host.
        self._slab = SlabTable("G1", config.capacity_bytes)
        self.device = torch.device(config.device)
        self._memory = torch.empty(self._slab.capacity, dtype=torch.uint8, device=self.device)
        # Write every page now: a fresh host allocation costs ~10 ms of page faults per 32 MiB,
        # which would otherwise land on the first puts.
        self._memory.fill_(0)
        self._headers: dict[BlockHash, tuple[bytes, BlockHeader]] = {}

    def _stored_nbytes(self, nbytes: int) -> int:
        return max(1, nbytes - HEADER_BYTES)  # the header stays on the host

    def tensor_of(self, key: bytes) -> torch.Tensor | None:
        """The stored block as a tensor view on the device (no copy), or None.

        The view is valid until the block is deleted; callers hold a lease (a later layer) so that
        placement does not delete it under them.
        """
        stored = self._headers.get(BlockHash(bytes(key)))
        where = self._slab.lookup(BlockHash(bytes(key)))
        if stored is None or where is None:
            return None
        header = stored[1]
        start, n = where
        return self._memory[start : start + n].view(torch_dtype(header.dtype)).view(header.shape)

    async def _get(self, keys: list[BlockHash]) -> list[BlockBytes | None]:
        out: list[BlockBytes | None] = []
        for key in keys:
            where = self._slab.lookup(key)
            if where is None:
                out.append(None)
                continue
            start, n = where
            data = bytearray(HEADER_BYTES + n)
            data[:HEADER_BYTES] = self._headers[key][0]
            torch.frombuffer(data, dtype=torch.uint8)[HEADER_BYTES:].copy_(
                self._memory[start : start + n]
            )
            out.append(data)
        return out

    async def _get_into(self, keys: list[BlockHash], views: list[memoryview]) -> list[Read | None]:
        out: list[Read | None] = []
        for key, view in zip(keys, views, strict=True):
            where = self._slab.lookup(key)
            if where is None:
                out.append(None)
                continue
            start, n = where
            check_fits(key, HEADER_BYTES + n, view)
            view[:HEADER_BYTES] = self._headers[key][0]
            dst = torch.frombuffer(view, dtype=torch.uint8, count=HEADER_BYTES + n)
            dst[HEADER_BYTES:].copy_(self._memory[start : start + n])
            out.append(Read(HEADER_BYTES + n))
        return out

    async def _put(self, items: list[tuple[BlockHash, Buffer]]) -> int:
        new = [(k, v) for k, v in items if k not in self._slab]
        headers = [read_header(v) for _, v in new]
        for (key, _), header in zip(new, headers, strict=True):
            if header.codec is not Codec.RAW:
                raise InvalidArgumentError(
                    f"G1 stores raw blocks only; block {key.hex()} is compressed"
                )
        offsets = self._slab.allocate([(k, len(v) - HEADER_BYTES) for k, v in new])
        for (key, value), start, header in zip(new, offsets, headers, strict=True):
            payload = memoryview(value)[HEADER_BYTES:]
            n = len(payload)
            self._memory[start : start + n].copy_(_host_bytes(payload))
            self._headers[key] = (bytes(memoryview(value)[:HEADER_BYTES]), header)
            self._slab.commit(key, start, n)
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
        self._headers.clear()
        self._memory = torch.empty(0, dtype=torch.uint8, device=self.device)
