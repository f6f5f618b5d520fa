"""The server's side of same-host segments: the registry of every tenant's open segments and the
socket thread that hands their descriptors over (the hand-over itself, and why segments are built
this way, are in kvstore/wire/segments.py, which the client shares).

Each tenant's segments are bounded in bytes (``max_bytes_per_tenant``) and a segment not used for
``idle_s`` is closed; closing drops the server's mapping and descriptor (the memory is freed once
the client unmaps too). The registry is used from the event loop and from the socket thread that
hands out descriptors, hence the lock.

A Put or Fetch may also name a K/V tensor inside a segment (a ``SegmentTensor``: what a client's
``kv_buffer`` hands out). ``kv_rows`` turns it into a byte view of the server's own mapping once
every byte of it is known to lie inside the segment; ``kvstore.core.copies.copy_verified`` copies
a block payload into its place in such a tensor, checksumming the payload in the same pass.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvstore.core.errors import InvalidArgumentError, KVStoreError
from kvstore.core.keys import ModelSpec
from kvstore.wire.segments import GRANTED, REFUSED, TICKET_BYTES, socket_address

__all__ = [
    "Segment",
    "SegmentClosedError",
    "SegmentLimitError",
    "SegmentRegistry",
    "SegmentsOffError",
    "kv_rows",
]

log = logging.getLogger(__name__)

_SEALS = (
    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
    if hasattr(fcntl, "F_SEAL_SHRINK")
    else 0
)


class SegmentsOffError(KVStoreError):
    """Same-host segments are off on this server, or this platform has no sealed memfds."""


class SegmentClosedError(KVStoreError):
    """A Put or Fetch named a segment that is not open for this tenant (closed, expired, or
    never issued to it)."""


class SegmentLimitError(KVStoreError):
    """The tenant's segments would exceed its byte bound."""


@dataclass(slots=True, eq=False)
class Segment:
    segment_id: int
    tenant: str
    size: int
    fd: int
    mapping: mmap.mmap
    ticket: bytes
    ticket_expires: float
    last_used: float
    closed: bool = False
    # The descriptor went to a process that connected to the abstract socket: one on this host
    # (the proof a same-GPU hand-off asks for, kvstore/service/rpc_g1.py).
    handed_over: bool = False

    def check_range(self, offset: int, length: int, what: str) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidArgumentError(
                f"{what} covers [{offset}, {offset + length}), outside the {self.size}-byte "
                f"segment {self.segment_id}"
            )

    def view(self, offset: int, length: int) -> memoryview:
        """A view of ``[offset, offset + length)``; the caller checked the range."""
        return memoryview(self.mapping)[offset : offset + length]

    def strided(
        self, offset: int, shape: tuple[int, ...], strides: tuple[int, ...], what: str
    ) -> np.ndarray[Any, np.dtype[np.uint8]]:
        """A uint8 view of the server's mapping with byte ``strides``, once every byte it covers
        is checked to lie inside the segment (the values come from the client: none is trusted,
        and Python's integers cannot overflow)."""
        last = offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
        if offset < 0 or any(s < 0 for s in strides) or (all(shape) and last >= self.size):
            raise InvalidArgumentError(
                f"{what} covers bytes [{offset}, {last + 1}), outside the {self.size}-byte "
                f"segment {self.segment_id}"
            )
        base = np.frombuffer(self.mapping, dtype=np.uint8)
        if not all(shape):
            return base[:0].reshape(shape)
        return np.lib.stride_tricks.as_strided(base[offset:], shape=shape, strides=strides)

    def try_unmap(self) -> bool:
        """Unmap and close the descriptor; False while a view is still referenced."""
        try:
            self.mapping.close()
        except BufferError:
            return False
        with contextlib.suppress(OSError):
            os.close(self.fd)
        return True


class SegmentRegistry:
    """The open segments of every tenant, and the socket that hands out their descriptors."""

    def __init__(
        self,
        *,
        enabled: bool = True,
        max_bytes_per_tenant: int = 2 << 30,
        idle_s: float = 300.0,
        ticket_s: float = 10.0,
    ) -> None:
        self.enabled = enabled and hasattr(os, "memfd_create") and bool(_SEALS)
        self.max_bytes_per_tenant = max_bytes_per_tenant
        self.idle_s = idle_s
        self.ticket_s = ticket_s
        self.socket_name = f"kvstore-seg-{os.getpid()}-{secrets.token_hex(8)}"
        self._lock = threading.Lock()
        self._segments: dict[int, Segment] = {}
        self._by_ticket: dict[bytes, Segment] = {}
        self._unmapping: list[Segment] = []
        self._next_id = secrets.randbelow(1 << 40) + 1
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- the event loop's side -------------------------------------------------------------------

    def open(self, tenant: str, size: int) -> Segment:
        if not self.enabled:
            raise SegmentsOffError(
                "same-host segments are off on this server (server.same_host=false, or no sealed "
                "memfds on this platform): send blocks as chunks"
            )
        if size <= 0:
            raise InvalidArgumentError(f"size_bytes must be positive, got {size}")
        self.expire()
        with self._lock:
            used = sum(s.size for s in self._segments.values() if s.tenant == tenant)
        if used + size > self.max_bytes_per_tenant:
            raise SegmentLimitError(
                f"tenant {tenant!r} holds {used} bytes of same-host segments; {size} more would "
                f"pass its bound of {self.max_bytes_per_tenant} (server.tenant_segment_bytes):"
                " close a segment, or send blocks as chunks"
            )
        self._start_listener()
        fd = os.memfd_create("kvstore-segment", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            mapping = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        now = time.monotonic()
        with self._lock:
            segment = Segment(
                segment_id=self._next_id,
                tenant=tenant,
                size=size,
                fd=fd,
                mapping=mapping,
                ticket=secrets.token_bytes(TICKET_BYTES),
                ticket_expires=now + self.ticket_s,
                last_used=now,
            )
            self._next_id += 1
            self._segments[segment.segment_id] = segment
            self._by_ticket[segment.ticket] = segment
        return segment

    def get(self, segment_id: int, tenant: str) -> Segment:
        """The open segment ``segment_id`` of ``tenant``; another tenant's id reads as unknown."""
        with self._lock:
            segment = self._segments.get(segment_id)
            if segment is None or segment.tenant != tenant:
                raise SegmentClosedError(
                    f"segment {segment_id} is not open for this tenant (closed, idle for more than "
                    f"{self.idle_s:g} s, or never issued to it): open another one (OpenSegment)"
                )
            segment.last_used = time.monotonic()
            return segment

    def close(self, segment_id: int, tenant: str) -> bool:
        with self._lock:
            segment = self._segments.get(segment_id)
            if segment is None or segment.tenant != tenant:
                return False
            self._drop(segment)
        self.unmap_pending()
        return True

    def expire(self, now: float | None = None) -> int:
        """Close segments idle for ``idle_s``; forget tickets not claimed in time."""
        now = time.monotonic() if now is None else now
        with self._lock:
            for ticket, segment in list(self._by_ticket.items()):
                if segment.ticket_expires < now:
                    del self._by_ticket[ticket]
            idle = [s for s in self._segments.values() if now - s.last_used > self.idle_s]
            for segment in idle:
                log.info("segment %d of tenant %s idle: closed", segment.segment_id, segment.tenant)
                self._drop(segment)
        self.unmap_pending()
        return len(idle)

    def usage(self) -> dict[str, tuple[int, int]]:
        """``tenant -> (segments, bytes)`` of the open segments."""
        out: dict[str, tuple[int, int]] = {}
        with self._lock:
            for s in self._segments.values():
                n, b = out.get(s.tenant, (0, 0))
                out[s.tenant] = (n + 1, b + s.size)
        return out

    def unmap_pending(self) -> None:
        """Unmap closed segments whose views are gone (a request still copying holds one)."""
        with self._lock:
            self._unmapping = [s for s in self._unmapping if not s.try_unmap()]

    def shutdown(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                self._listener.close()
        if self._thread is not None:
            self._thread.join(timeout=2)
        with self._lock:
            for segment in list(self._segments.values()):
                self._drop(segment)
        self.unmap_pending()

    def _drop(self, segment: Segment) -> None:  # under the lock
        segment.closed = True
        self._segments.pop(segment.segment_id, None)
        self._by_ticket.pop(segment.ticket, None)
        self._unmapping.append(segment)

    # -- the socket thread's side ----------------------------------------------------------------

    def _start_listener(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            listener.bind(socket_address(self.socket_name))
            listener.listen(64)
            self._listener = listener
        self._thread = threading.Thread(
            target=self._serve, args=(listener,), name="kvstore-segments", daemon=True
        )
        self._thread.start()

    def _serve(self, listener: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed by shutdown()
            with conn:
                try:
                    self._hand_over(conn)
                except OSError as exc:
                    log.info("segment hand-over failed: %s", exc)

    def _hand_over(self, conn: socket.socket) -> None:
        conn.settimeout(2.0)
        ticket = b""
        while len(ticket) < TICKET_BYTES:
            part = conn.recv(TICKET_BYTES - len(ticket))
            if not part:
                return
            ticket += part
        with self._lock:
            segment = self._by_ticket.pop(ticket, None)
            if segment is not None and segment.ticket_expires < time.monotonic():
                segment = None
            fd = None if segment is None else os.dup(segment.fd)
        if segment is None or fd is None:
            conn.sendall(REFUSED)
            return
        try:
            socket.send_fds(conn, [GRANTED], [fd])
            segment.handed_over = True
        finally:
            os.close(fd)


# -- K/V tensors inside a segment ------------------------------------------------------------------

def kv_rows(
    segment: Segment, spec: ModelSpec, tensor: Any, what: str = "tensor"
) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """The K/V tensor that a ``SegmentTensor`` message names in ``segment``, as bytes ``[layers,
    2, num_tokens * token_bytes]`` (a view of the server's own mapping, never of the client's),
    refused with ``InvalidArgumentError`` unless it lies wholly inside the segment."""
    item = spec.itemsize
    for name in ("offset", "layer_stride", "kv_stride"):
        if getattr(tensor, name) % item:
            raise InvalidArgumentError(
                f"{what}.{name} is {getattr(tensor, name)}, not a multiple of the {item}-byte "
                f"items of {spec.dtype}"
            )
    token_bytes = spec.num_kv_heads * spec.head_dim * item
    return segment.strided(
        tensor.offset,
        (spec.num_layers, 2, tensor.num_tokens * token_bytes),
        (tensor.layer_stride, tensor.kv_stride, 1),
        what,
    )
