"""G3 ``LmdbTier``: blocks in an LMDB environment on local SSD; crash-safe, survives restarts.

LMDB rules this module relies on (py-lmdb documentation):

- **One writer.** LMDB serialises write transactions with a lock anyway; all writes go through one
  dedicated thread so that a batch is one transaction (one commit, all or nothing) and the
  capacity check and the write happen atomically, without a Python lock around the event loop.
- **Readers on other threads.** py-lmdb opens environments with ``MDB_NOTLS``, so read transactions
  are not tied to threads; reads run in a small pool so a cold read (0.04 GB/s here with readahead
  off) never stalls the event loop. ``max_readers`` bounds concurrent read transactions.
- **Zero-copy reads.** ``buffers=True`` returns memoryviews into the memory map, valid only inside
  the transaction: the one copy out happens before the transaction ends, and verification (by the
  Tier base) runs on that copy.
- **Durability.** A commit writes its pages into the kernel page cache before it returns, so an
  acknowledged write survives ``kill -9`` of this process even with ``sync_on_commit=False``; only a
  power loss or kernel crash can lose it. ``sync_on_commit=True`` adds an fsync per commit
  (0.2–0.4 GB/s puts here against 0.8–2.2 without).
- **Map size.** The map is sized from ``capacity_bytes`` plus headroom for LMDB's page rounding and
  B-tree pages; ``capacity_bytes`` is enforced on our own byte count, and a ``MapFullError`` (only
  possible through fragmentation) is reported as ``TierFullError`` too.
- **No fork.** An open environment must not be used in a child process after ``fork``; open the
  tier in the process that uses it.
- **Stale readers.** A process killed while reading leaves a reader slot behind; ``reader_check()``
  at open clears them.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import lmdb

from kvstore.core.block_format import HEADER_BYTES, copy_and_checksum
from kvstore.core.errors import ConfigError, TierError, TierFullError, TierUnavailableError
from kvstore.core.keys import BlockHash
from tiers.base import (
    BlockBytes,
    Buffer,
    CorruptionCallback,
    Read,
    Tier,
    check_capacity,
    check_fits,
)

__all__ = ["LmdbTier", "LmdbTierConfig"]

_T = TypeVar("_T")
_DB_NAME = b"blocks"
_PAGE = 4096
_KEY_BATCH = 4096


@dataclass(frozen=True, slots=True)
class LmdbTierConfig:
    path: str
    capacity_bytes: int
    # False: acknowledged writes survive a crash of this process, not a power loss (fast).
    # True: fsync on every commit; survives power loss.
    sync_on_commit: bool = False
    readahead: bool = True
    max_readers: int = 126
    num_reader_threads: int = 4

    def __post_init__(self) -> None:
        check_capacity("G3", self.capacity_bytes)
        if not self.path:
            raise ConfigError("G3.path must name a directory")
        if self.max_readers < 1 or self.num_reader_threads < 1:
            raise ConfigError("G3.max_readers and G3.num_reader_threads must be >= 1")

    @property
    def map_size(self) -> int:
        # Each value rounds up to whole overflow pages and the B-tree needs pages of its own;
        # 25% + 64 MiB covers that for blocks from 4 KiB up.
        size = int(self.capacity_bytes * 1.25) + (64 << 20)
        return (size + _PAGE - 1) // _PAGE * _PAGE


class LmdbTier(Tier):
    verify_reads = True

    def __init__(
        self, config: LmdbTierConfig, on_corrupt: CorruptionCallback | None = None
    ) -> None:
        super().__init__("G3", config.capacity_bytes, on_corrupt)
        self.config = config
        try:
            os.makedirs(config.path, exist_ok=True)
            self._env = lmdb.open(
                config.path,
                map_size=config.map_size,
                max_dbs=4,
                max_readers=config.max_readers,
                sync=config.sync_on_commit,
                metasync=config.sync_on_commit,
                readahead=config.readahead,
                subdir=True,
            )
        except (lmdb.Error, OSError) as exc:
            raise ConfigError(f"G3: cannot open LMDB at {config.path}: {exc}") from None
        self._env.reader_check()
        self._db = self._env.open_db(_DB_NAME)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="kvstore-g3-writer")
        self._readers = ThreadPoolExecutor(
            config.num_reader_threads, thread_name_prefix="kvstore-g3-reader"
        )
        self._used_bytes, self._num_blocks = self._scan_usage()
        self._closed = False

    def _scan_usage(self) -> tuple[int, int]:
        used = count = 0
        with self._env.begin(db=self._db, buffers=True) as txn:
            for value in txn.cursor().iternext(keys=False, values=True):
                used += len(value)
                count += 1
        return used, count

    async def _run(self, pool: ThreadPoolExecutor, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    # -- reads ----------------------------------------------------------------------------------

    def _get_sync(self, keys: list[BlockHash]) -> list[BlockBytes | None]:
        out: list[BlockBytes | None] = []
        with self._env.begin(db=self._db, buffers=True) as txn:
            for key in keys:
                value = txn.get(key)
                out.append(None if value is None else bytes(value))
        return out

    async def _get(self, keys: list[BlockHash]) -> list[BlockBytes | None]:
        return await self._run(self._readers, self._get_sync, keys)

    def _get_into_sync(self, keys: list[BlockHash], views: list[memoryview]) -> list[Read | None]:
        out: list[Read | None] = []
        with self._env.begin(db=self._db, buffers=True) as txn:
            for key, view in zip(keys, views, strict=True):
                value = txn.get(key)
                if value is None:
                    out.append(None)
                    continue
                check_fits(key, len(value), view)
                if len(value) < HEADER_BYTES:  # too short to be a block: let verification say so
                    view[: len(value)] = value
                    out.append(Read(len(value)))
                else:
                    out.append(Read(len(value), copy_and_checksum(value, view)))
        return out

    async def _get_into(self, keys: list[BlockHash], views: list[memoryview]) -> list[Read | None]:
        return await self._run(self._readers, self._get_into_sync, keys, views)

    def _exists_sync(self, keys: list[BlockHash]) -> list[bool]:
        with self._env.begin(db=self._db, buffers=True) as txn:
            return [txn.get(key) is not None for key in keys]

    async def _exists(self, keys: list[BlockHash]) -> list[bool]:
        return await self._run(self._readers, self._exists_sync, keys)

    def _key_batch(self, after: bytes | None) -> list[BlockHash]:
        with self._env.begin(db=self._db) as txn:
            cursor = txn.cursor()
            if after is None:
                if not cursor.first():
                    return []
            elif not cursor.set_range(after) or (cursor.key() == after and not cursor.next()):
                return []
            batch: list[BlockHash] = []
            for key in cursor.iternext(keys=True, values=False):
                batch.append(BlockHash(bytes(key)))
                if len(batch) == _KEY_BATCH:
                    break
            return batch

    def _header_batch(self, after: bytes | None) -> list[tuple[BlockHash, bytes, int]]:
        with self._env.begin(db=self._db, buffers=True) as txn:
            cursor = txn.cursor()
            if after is None:
                if not cursor.first():
                    return []
            elif not cursor.set_range(after) or (
                bytes(cursor.key()) == after and not cursor.next()
            ):
                return []
            batch: list[tuple[BlockHash, bytes, int]] = []
            for key, value in cursor.iternext(keys=True, values=True):
                # Only the first page of each value is touched: the header, not the payload.
                batch.append((BlockHash(bytes(key)), bytes(value[:HEADER_BYTES]), len(value)))
                if len(batch) == _KEY_BATCH:
                    break
            return batch

    async def iter_headers(self) -> AsyncIterator[tuple[BlockHash, bytes, int]]:
        """``(key, first 128 bytes, stored length)`` of every block, without reading payloads:
        what an index needs to rebuild itself at start (namespace, parent, size)."""
        after: bytes | None = None
        while True:
            batch = await self._run(self._readers, self._header_batch, after)
            for item in batch:
                yield item
            if len(batch) < _KEY_BATCH:
                return
            after = batch[-1][0]

    async def _keys(self) -> AsyncIterator[BlockHash]:
        # Batches in separate read transactions: a long listing must not pin an old snapshot
        # (which would stop LMDB from reusing freed pages) while the caller processes keys.
        after: bytes | None = None
        while True:
            batch = await self._run(self._readers, self._key_batch, after)
            for key in batch:
                yield key
            if len(batch) < _KEY_BATCH:
                return
            after = batch[-1]

    # -- writes (one writer thread) ---------------------------------------------------------------

    def _put_sync(self, items: list[tuple[BlockHash, Buffer]]) -> int:
        try:
            with self._env.begin(db=self._db, write=True, buffers=True) as txn:
                new = [(k, v) for k, v in items if txn.get(k) is None]
                need = sum(len(v) for _, v in new)
                if self._used_bytes + need > self.capacity_bytes:
                    raise TierFullError(
                        "G3", f"needs {need} bytes, {self.capacity_bytes - self._used_bytes} free"
                    )
                for key, value in new:
                    txn.put(key, value, overwrite=False)
        except lmdb.MapFullError:
            raise TierFullError("G3", f"LMDB map of {self.config.map_size} bytes is full") from None
        except lmdb.Error as exc:
            raise _write_error(exc, self.config.path) from None
        self._used_bytes += need
        self._num_blocks += len(new)
        return len(new)

    async def _put(self, items: list[tuple[BlockHash, Buffer]]) -> int:
        return await self._run(self._writer, self._put_sync, items)

    def _delete_sync(self, keys: list[BlockHash]) -> int:
        freed = removed = 0
        try:
            with self._env.begin(db=self._db, write=True, buffers=True) as txn:
                for key in keys:
                    value = txn.get(key)
                    if value is not None:
                        freed += len(value)
                        txn.delete(key)
                        removed += 1
        except lmdb.Error as exc:
            # Even a delete writes pages (LMDB copies on write): it can hit a full disk.
            raise _write_error(exc, self.config.path) from None
        self._used_bytes -= freed
        self._num_blocks -= removed
        return removed

    async def _delete(self, keys: list[BlockHash]) -> int:
        return await self._run(self._writer, self._delete_sync, keys)

    async def _usage(self) -> tuple[int, int]:
        return self._used_bytes, self._num_blocks

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Finish queued writes first: they were acknowledged to nobody yet, but callers awaiting
        # them must get an answer, not a closed environment.
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self._env.close()


_FULL_BELOW = 4 << 20  # bytes free under which a failed write is taken for a full disk


def _write_error(exc: lmdb.Error, path: str) -> TierError:
    """An LMDB write that failed: the disk is full (RESOURCE_EXHAUSTED), else G3 is unusable."""
    text = str(exc)
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        free = -1
    # A full disk shows as ENOSPC, or as EIO from a short write at commit (seen on tmpfs).
    if "No space left" in text or "Disk quota" in text or 0 <= free < _FULL_BELOW:
        return TierFullError("G3", f"the disk under {path} is full ({free} bytes free): {text}")
    return TierUnavailableError("G3", f"LMDB write under {path} failed: {text}")
