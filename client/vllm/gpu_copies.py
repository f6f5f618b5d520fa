"""``GpuCopies``: the worker side's copies when vLLM's paged cache is on a CUDA device.

Loads and saves run on side streams of the cache's device, through page-locked host memory, and
are ordered against the forward (the current, compute stream) by events, so that they overlap
its kernels instead of queueing behind them or blocking the host. In the order the worker side
uses them:

- ``begin_loads`` (``start_load_kv``): the step's loads wait for the compute stream's work so far
  (the blocks they fill may have been read by the step before);
- ``load`` (the client's thread, one layer of one load as it arrives): host -> device on the
  loads' stream, then the scatter into the paged cache; returns the layer's event, and the
  event the host waits on before the layer's host bytes may change;
- ``wait`` (``wait_for_layer_load``): the compute stream waits for a layer's event (the host
  does not wait for the copy);
- ``settle`` (a load's end): the compute stream waits for every load copy issued so far, so no
  late scatter lands in a block vLLM recomputes or hands to another request;
- ``save`` (``save_kv_layer``): the saves' stream waits for the compute stream, then copies the
  layer's blocks into page-locked staging, device -> host;
- ``saved`` and ``put_after`` (``wait_for_save``): an event after the step's save copies (the
  compute stream waits for it too: the saved blocks may be freed after the step), and a put
  that waits for it in a background thread, never in the forward;
- ``close``.

Host memory. On the same host a layer arrives in one of the client's shared segments: the
segment is registered (``cudaHostRegister``) the first time a layer lies in it, and unregistered
by the first load after the client has closed it (or at ``close``). We hold a tensor over the
segment while it is registered: the mapping cannot be unmapped under the registration (the
client's ``mmap.close`` is refused while an export lives), so a later mapping at the same
address is never mistaken for it. A layer that is not in a registered segment (bytes from a
remote service) is copied into a reused page-locked staging buffer first. Either way the
client's thread waits for the host -> device copy before its ``on_layer`` call returns (once
vLLM has been told the layer is coming): the layer's bytes are valid only during that call (the
region is reused after the fetch), and the staging buffer is reused by the next layer.
Rejected: leaving the copy in flight past the call; a fetch that fails after a layer would free
its region under the copy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from client.same_host import Segment, _tensor_over
from client.vllm.layout import BlockLayout, ViewLayout

__all__ = ["GpuCopies"]

T = TypeVar("T")
# cudaHostRegisterPortable: pinned for every CUDA context of the process (as G2 registers).
_PORTABLE = 1


class GpuCopies:
    """The side streams, page-locked host memory and background puts of one worker's caches on
    ``device``; see the module docstring."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.load_stream = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
        self.save_stream = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
        self._segments = _RegisteredSegments()
        self._staging = torch.empty(0, dtype=torch.uint8)  # page-locked, for remote loads
        # The puts wait for their copies here: a host wait in the forward would stall the
        # kernels it launches. Two threads: one step's saves put side by side.
        self._puts = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvstore-save")

    def begin_loads(self) -> None:
        self.load_stream.wait_stream(torch.cuda.current_stream(self.device))

    def load(
        self,
        layout: BlockLayout | ViewLayout,
        cache: torch.Tensor,
        block_ids: list[int],
        kv: torch.Tensor,
        start: int,
        segments: Sequence[Segment],
    ) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        """Tokens ``[start, end)`` of one layer's ``kv`` (host, ``[2, end, kv_heads, head_dim]``)
        into their blocks of ``cache``, on the loads' stream: (the event after the scatter, the
        blocking event after the host -> device copy, which the caller must synchronize before
        ``kv`` changes)."""
        b = layout.block_size
        skip = start // b * b  # whole blocks before ``start``: vLLM's own hit, not copied
        host = kv[:, skip:]
        with torch.cuda.stream(self.load_stream):
            try:
                src = host if self._segments.holds(segments, host) else self._stage(host)
                dev = torch.empty(host.shape, dtype=host.dtype, device=self.device)
                for which in range(2):  # K, then V: each one contiguous run of host memory
                    dev[which].copy_(src[which], non_blocking=True)
                copied = _event(blocking=True)
                copied.record()
                layout.scatter(cache, block_ids[skip // b :], dev, start - skip)
                ready = _event()
                ready.record()
            except BaseException:
                self.load_stream.synchronize()  # nothing issued may read ``kv`` after this
                raise
        return ready, copied

    def _stage(self, host: torch.Tensor) -> torch.Tensor:
        """``host`` copied into the page-locked staging buffer (free: see the module docstring)."""
        nbytes = host.numel() * host.element_size()
        if self._staging.numel() < nbytes:
            self._staging = torch.empty(
                max(nbytes, 2 * self._staging.numel()), dtype=torch.uint8, pin_memory=True
            )
        staged = self._staging[:nbytes].view(host.dtype).view(host.shape)
        staged.copy_(host)
        return staged

    def wait(self, ready: torch.cuda.Event) -> None:
        torch.cuda.current_stream(self.device).wait_event(ready)

    def settle(self) -> None:
        torch.cuda.current_stream(self.device).wait_stream(self.load_stream)

    def save(
        self,
        layout: BlockLayout | ViewLayout,
        cache: torch.Tensor,
        outs: Sequence[tuple[list[int], torch.Tensor]],
    ) -> None:
        """Each ``(block_ids, out)``: the layer's tokens of those blocks into ``out`` (page-locked
        staging), on the saves' stream, after what the compute stream has written so far."""
        self.save_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.save_stream):
            for block_ids, out in outs:
                layout.gather(cache, block_ids, out=out)

    def saved(self) -> torch.cuda.Event:
        """A blocking event after every save copy issued; the compute stream waits for it too
        (vLLM may give the saved blocks to another request after the step)."""
        event = _event(blocking=True)
        event.record(self.save_stream)
        torch.cuda.current_stream(self.device).wait_event(event)
        return event

    def put_after(self, event: torch.cuda.Event, start: Callable[[], Future[T]]) -> Future[T]:
        """``start()`` (a put of staging that ``event``'s copies fill), once they are done, in a
        background thread; the future of its result."""
        return self._puts.submit(functools.partial(_put_after, event, start))

    def close(self) -> None:
        """After the client is closed (no fetch runs any more) and the puts are done."""
        self._puts.shutdown(wait=True)
        self._segments.release_all()


def _event(*, blocking: bool = False) -> torch.cuda.Event:
    """A CUDA event; ``blocking``: a host wait on it sleeps instead of spinning a core."""
    return torch.cuda.Event(blocking=blocking)  # type: ignore[no-untyped-call]


def _put_after(event: torch.cuda.Event, start: Callable[[], Future[T]]) -> T:
    event.synchronize()
    return start().result()


class _RegisteredSegments:
    """The client's shared segments that are registered with CUDA, each with a tensor over its
    mapping that keeps it mapped while registered. Used on the client's thread only (where the
    segments are opened and closed, and where every copy from them is waited for)."""

    def __init__(self) -> None:
        # Segment compares by identity (eq=False): a segment the client reopened is a new one.
        self._held: dict[Segment, torch.Tensor] = {}
        self._refused: set[Segment] = set()  # registration failed: not tried again

    def holds(self, open_segments: Sequence[Segment], host: torch.Tensor) -> bool:
        """Whether ``host`` lies in a registered segment, its K and V rows each contiguous;
        registers the open segment it lies in the first time, and lets go of the segments the
        client has closed since the last call."""
        still = set(open_segments)
        for gone in [s for s in self._held if s not in still]:
            _unregister(self._held.pop(gone))
        self._refused &= still
        if host.numel() == 0 or not (host[0].is_contiguous() and host[1].is_contiguous()):
            return False
        first = host.data_ptr()
        end = first + (host.stride(0) + host[1].numel()) * host.element_size()
        for segment in open_segments:
            held = self._held.get(segment)
            # While the tensor lives the client's ``mmap.close`` is refused: the memory stays
            # mapped (client.same_host).
            whole = held if held is not None else _tensor_over(segment.mapping)
            if not whole.data_ptr() <= first < end <= whole.data_ptr() + whole.numel():
                continue
            if held is None:
                if segment in self._refused or not _register(whole):
                    self._refused.add(segment)
                    return False  # copied through the staging buffer instead
                self._held[segment] = whole
            return True
        return False

    def release_all(self) -> None:
        while self._held:
            _unregister(self._held.popitem()[1])


def _register(whole: torch.Tensor) -> bool:
    cudart: Any = torch.cuda.cudart()  # type: ignore[no-untyped-call]
    return int(cudart.cudaHostRegister(whole.data_ptr(), whole.numel(), _PORTABLE)) == 0


def _unregister(whole: torch.Tensor) -> None:
    cudart: Any = torch.cuda.cudart()  # type: ignore[no-untyped-call]
    cudart.cudaHostUnregister(whole.data_ptr())
