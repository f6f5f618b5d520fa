"""The data folder of a node (G3's LMDB environment at ``g3.path``): who may use it, and
whether it holds a store at all.

Operations, in the order the commands use them:

1. ``stored_blocks(path)`` — the number of blocks of the LMDB store at ``path``, or None when
   there is no store there (``backup`` and ``stats`` refuse such a folder instead of reporting
   zero: an operator pointed at the wrong folder must be told, not handed an empty backup).
2. ``DataFolderLock(path).acquire(holder)`` — at most one service per folder, and no
   ``restore`` under a running service. An ``flock`` on ``<path>/kvstore.lock``: the kernel
   drops it when the holder dies, so a ``kill -9`` never leaves a stale lock behind, and the
   file names the holder (pid and role) for the message of whoever is refused.

Why a lock of our own rather than LMDB's: LMDB lets any number of processes open one
environment (that is what lets ``backup`` and ``stats`` run beside the service), so it cannot
tell a second service, which would keep an index of its own and evict behind the first one's
back, from a reader.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

import lmdb

from kvstore.core.errors import ConfigError

__all__ = ["LOCK_NAME", "DataFolderLock", "stored_blocks"]

LOCK_NAME = "kvstore.lock"
_BLOCKS_DB = b"blocks"  # the LMDB database G3 keeps its blocks in (tiers/lmdb_store.py)


def stored_blocks(path: str | Path) -> int | None:
    """Blocks in the kvstore LMDB store at ``path``; None if ``path`` holds no such store."""
    folder = Path(path)
    if not (folder / "data.mdb").is_file():
        return None
    # Read-only and without LMDB's lock file: this must work beside a running service and on a
    # backup copy alike, and must not create anything in a folder that is not ours.
    try:
        env = lmdb.open(str(folder), readonly=True, lock=False, max_dbs=4, subdir=True)
    except lmdb.Error:
        return None
    try:
        try:
            db = env.open_db(_BLOCKS_DB, create=False)
        except lmdb.NotFoundError:
            return None
        with env.begin(db=db) as txn:
            return int(txn.stat(db)["entries"])
    finally:
        env.close()


class DataFolderLock:
    """An exclusive hold on a data folder for one process (a service, or a restore)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def holder(self) -> str:
        """Who holds the lock, as its file says (``"kvstore serve, pid 1234"``), or ``""``."""
        with contextlib.suppress(OSError):
            return (self.path / LOCK_NAME).read_text().strip()
        return ""

    def acquire(self, role: str) -> None:
        """Hold the folder for ``role``, or raise ``ConfigError`` naming the current holder."""
        if self._fd is not None:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"the data folder {self.path} is in use by {self.holder() or 'another process'}; "
                "stop it first, or give this one another g3.path"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{role}, pid {os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> DataFolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
