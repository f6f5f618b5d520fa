"""G2 ``PinnedMemoryTier``: blocks of any size in one named POSIX shared-memory segment.

Blocks are extents of the segment handed out by the offset allocator of ``tiers/slab.py``
(best fit, coalescing, 256-byte granularity), so capacity and every figure are in bytes. The
segment is named (``/dev/shm/<prefix>-<pid>-<random>``) so that operators can see it and a crashed
server's segment can be swept; clients never map it (see kvstore/wire/segments.py). When CUDA is
present the whole segment is registered with ``cudaHostRegister`` once, so host<->device copies
from any block run at pinned-memory speed without a staging buffer.

No leak on a crash: Python's ``multiprocessing.resource_tracker`` (a separate process started with
the segment) unlinks every segment it was told about when our process dies, ``kill -9`` included;
``close()`` unlinks it in the normal case; and at start we unlink segments with our prefix whose
owner pid is dead, for the case where the tracker itself was killed too.

Copies run inline on the event loop: a block copy is a memcpy (about 0.4 ms for a 2 MiB block
here), cheaper than a thread hop, and keeping bookkeeping and copies on one thread means an extent
cannot be freed and reused while it is being read.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from multiprocessing import shared_memory
from pathlib import Path
from typing import Literal

import numpy as np

from kvstore.core.errors import ConfigError
from kvstore.core.keys import BlockHash
from tiers.base import (
    BlockBytes,
    Buffer,
    CorruptionCallback,
    Read,
    check_capacity,
    check_fits,
    check_header,
)
from tiers.slab import SlabTable, SlabTier

__all__ = ["PinnedMemoryTier", "PinnedTierConfig", "sweep_stale_segments"]

log = logging.getLogger(__name__)
_SHM_DIR = Path("/dev/shm")


@dataclass(frozen=True, slots=True)
class PinnedTierConfig:
    capacity_bytes: int
    _: KW_ONLY
    segment_prefix: str = "kvstore-g2"
    # auto: pin when CUDA is available; never: plain shared memory; require: fail without CUDA.
    pin: Literal["auto", "never", "require"] = "auto"

    def __post_init__(self) -> None:
        check_capacity("G2", self.capacity_bytes)
        if self.pin not in ("auto", "never", "require"):
            raise ConfigError(f"G2.pin must be auto, never or require, got {self.pin!r}")
        if not self.segment_prefix or "/" in self.segment_prefix:
            raise ConfigError(
                f"G2.segment_prefix must be a plain name, got {self.segment_prefix!r}"
            )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_segments(prefix: str) -> list[str]:
    """Unlink ``<prefix>-<pid>-*`` segments whose owner process is gone; returns their names."""
    removed: list[str] = []
    if not _SHM_DIR.is_dir():
        return removed
    for path in _SHM_DIR.glob(f"{prefix}-*-*"):
        pid_text = path.name[len(prefix) + 1 :].split("-", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            try:
                path.unlink()
                removed.append(path.name)
            except FileNotFoundError:
                pass
    return removed


def _cuda_host_register(buf: memoryview, nbytes: int) -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    # cudaHostRegisterPortable (1): pinned for every CUDA context of the process, so copies to a
    # G1 (or an engine) on any GPU of the host run as DMA, not only on the current device's.
    err = torch.cuda.cudart().cudaHostRegister(address, nbytes, 1)  # type: ignore[no-untyped-call]
    return int(err) == 0


def _cuda_host_unregister(buf: memoryview) -> None:
    import torch

    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    torch.cuda.cudart().cudaHostUnregister(address)  # type: ignore[no-untyped-call]


def _check_shm_room(size: int, where: str = "/dev/shm") -> None:
    """A segment larger than the free space of /dev/shm is created anyway (sparse), and the first
    write past the free space kills the process with SIGBUS — a bare "Bus error". Docker gives
    containers 64 MiB of /dev/shm unless told otherwise (--shm-size, compose shm_size)."""
    try:
        st = os.statvfs(where)
    except OSError:
        return  # no /dev/shm (not Linux): shared_memory reports its own errors
    free = st.f_bavail * st.f_frsize
    if size > free:
        raise ConfigError(
            f"G2 needs {size} bytes of shared memory but {where} has {free} bytes free: lower "
            "g2.capacity_bytes, or give the container more (docker --shm-size, compose shm_size)"
        )


class PinnedMemoryTier(SlabTier):
    def __init__(
        self, config: PinnedTierConfig, on_corrupt: CorruptionCallback | None = None
    ) -> None:
        super().__init__("G2", config.capacity_bytes, on_corrupt)
        self.config = config
        self._slab = SlabTable("G2", config.capacity_bytes)
        for name in sweep_stale_segments(config.segment_prefix):
            log.warning("G2: removed shared-memory segment %s left by a dead process", name)
        name = f"{config.segment_prefix}-{os.getpid()}-{secrets.token_hex(4)}"
        size = self._slab.capacity
        _check_shm_room(size)
        self._shm = shared_memory.SharedMemory(name=name, create=True, size=size)
        buf = self._shm.buf
        assert buf is not None  # None only after close()
        self._buf: memoryview = buf
        self._closed = False
        # Touch every page once now: a fresh mapping costs ~10 ms of page faults per 32 MiB, which
        # would otherwise land on the first puts.
        np.frombuffer(self._buf, dtype=np.uint8)[:: os.sysconf("SC_PAGE_SIZE")] = 0
        self.pinned = False
        if config.pin != "never":
            self.pinned = _cuda_host_register(self._buf, size)
            if config.pin == "require" and not self.pinned:
                self.close_now()
                raise ConfigError(
                    "G2.pin=require but CUDA is not available or cudaHostRegister failed"
                )

    @property
    def segment_name(self) -> str:
        return self._shm.name

    def slot_of(self, key: bytes) -> tuple[int, int] | None:
        """``(byte offset in the segment, nbytes)`` of a stored block."""
        return self._slab.lookup(BlockHash(bytes(key)))

    async def _get(self, keys: list[BlockHash]) -> list[BlockBytes | None]:
        out: list[BlockBytes | None] = []
        buf, lookup = self._buf, self._slab.lookup
        for key in keys:
            where = lookup(key)
            if where is None:
                out.append(None)
            else:
                start, n = where
                out.append(bytes(buf[start : start + n]))
        return out

    def view_of(self, key: bytes) -> memoryview | None:
        """The stored block itself (no copy), valid until it is deleted: callers hold a lease."""
        where = self._slab.lookup(BlockHash(bytes(key)))
        if where is None:
            return None
        start, n = where
        return self._buf[start : start + n]

    async def _get_into(self, keys: list[BlockHash], views: list[memoryview]) -> list[Read | None]:
        out: list[Read | None] = []
        buf, lookup = self._buf, self._slab.lookup
        for key, view in zip(keys, views, strict=True):
            where = lookup(key)
            if where is None:
                out.append(None)
                continue
            start, n = where
            check_fits(key, n, view)
            view[:n] = buf[start : start + n]
            out.append(Read(n))
        return out

    async def _put(self, items: list[tuple[BlockHash, Buffer]]) -> int:
        slab = self._slab
        new = [(k, v) for k, v in items if k not in slab]
        offsets = slab.allocate([(k, len(v)) for k, v in new])
        buf, commit = self._buf, slab.commit
        for (key, value), start in zip(new, offsets, strict=True):
            if isinstance(value, memoryview) and (value.format != "B" or value.ndim != 1):
                value = value.cast("B")
            n = len(value)
            buf[start : start + n] = value
            commit(key, start, n)
        return len(new)

    async def _put_with(
        self, key: BlockHash, nbytes: int, fill: Callable[[memoryview], int]
    ) -> bool:
        if key in self._slab:
            return False
        (start,) = self._slab.allocate([(key, nbytes)])
        try:
            written = fill(self._buf[start : start + nbytes])
            if not 0 < written <= nbytes:
                raise ValueError(f"fill wrote {written} bytes into a buffer of {nbytes}")
            check_header(key, self._buf[start : start + written])
        except BaseException:
            self._slab.release([(start, nbytes)])
            raise
        self._slab.shrink(start, nbytes, written)
        self._slab.commit(key, start, written)
        return True

    async def _delete(self, keys: list[BlockHash]) -> int:
        return sum(self._slab.remove(k) for k in keys)

    async def _usage(self) -> tuple[int, int]:
        return self._slab.used_bytes, len(self._slab)

    async def close(self) -> None:
        self.close_now()

    def close_now(self) -> None:
        """Unmap and unlink the segment (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.pinned:
            _cuda_host_unregister(self._buf)
            self.pinned = False
        self._buf.release()
        self._shm.close()
        with contextlib.suppress(FileNotFoundError):  # already unlinked by someone else
            self._shm.unlink()
