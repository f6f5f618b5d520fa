"""Prometheus metrics of one server: what the RPCs did, and what the engine holds right now.

Operations, in the order the server uses them:

1. ``ServerMetrics()`` — a private ``CollectorRegistry`` per server, so that tests (and a process
   that runs several servers) never collide on metric names in the global registry.
2. ``rpc_started`` / ``rpc_finished`` / ``lookup`` / ``bytes_in`` / ``bytes_out`` — counted by
   the RPC layer as it answers.
3. ``watch_engine(engine, loop)`` — the engine's own counters (evictions, promotions, demotions,
   corrupt blocks, ...), leases, and each tier's used and capacity bytes, read when scraped.
4. ``serve_http(host, port)`` — ``/metrics`` over HTTP; ``close()`` stops it.

The engine belongs to the event loop's thread, and the HTTP exporter scrapes from a thread of its
own. The collector therefore hands the snapshot to the loop (``call_soon_threadsafe``) and waits
for it, instead of reading dictionaries that the loop may be changing at that moment.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from kvstore.engine.engine import Engine

__all__ = ["EngineSnapshot", "ServerMetrics"]

# RPC latencies span a sub-millisecond Lookup to a multi-second durable Put of a long prompt.
_LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
_SCRAPE_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    counters: dict[str, int]
    num_blocks: int
    num_leases: int
    queue_depth: int
    tier_used_bytes: dict[str, int]
    tier_capacity_bytes: dict[str, int]
    tier_blocks: dict[str, int]

    @classmethod
    def of(cls, engine: Engine) -> EngineSnapshot:
        """Read on the engine's event loop thread only."""
        order = engine.tier_names
        return cls(
            counters=dict(engine.counters.values),
            num_blocks=len(engine.index),
            num_leases=engine.index.num_leases,
            queue_depth=engine.queue_depth,
            tier_used_bytes={n: engine.index.bytes_in(n) for n in order},
            tier_capacity_bytes={n: engine.placement.capacity[n] for n in order},
            tier_blocks={n: engine.index.num_in(n) for n in order},
        )


class _EngineCollector(Collector):
    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop) -> None:
        self._engine = engine
        self._loop = loop
        self._loop_thread = threading.get_ident()

    def _snapshot(self) -> EngineSnapshot | None:
        if threading.get_ident() == self._loop_thread:
            return EngineSnapshot.of(self._engine)
        if self._loop.is_closed():
            return None
        result: concurrent.futures.Future[EngineSnapshot] = concurrent.futures.Future()

        def take() -> None:
            try:
                result.set_result(EngineSnapshot.of(self._engine))
            except BaseException as exc:  # handed to the scraping thread, not lost
                result.set_exception(exc)

        try:
            self._loop.call_soon_threadsafe(take)
            return result.result(timeout=_SCRAPE_TIMEOUT_S)
        except (RuntimeError, concurrent.futures.TimeoutError):
            # The loop has stopped, or is too busy to answer: leave the engine metrics out of
            # this scrape rather than block the exporter.
            return None

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        if snap is None:
            return
        ops = CounterMetricFamily(
            "kvstore_engine_operations",
            "Engine counters: stored, evictions, promotions, demotions, corrupt, copies, ...",
            labels=["op"],
        )
        for name, value in sorted(snap.counters.items()):
            ops.add_metric([name], value)
        yield ops
        yield GaugeMetricFamily("kvstore_blocks", "Blocks in the index", value=snap.num_blocks)
        yield GaugeMetricFamily("kvstore_leases", "Leases held", value=snap.num_leases)
        yield GaugeMetricFamily(
            "kvstore_move_queue_depth", "Background copies waiting", value=snap.queue_depth
        )
        for metric, help_text, values in (
            ("kvstore_tier_used_bytes", "Bytes held in the tier", snap.tier_used_bytes),
            ("kvstore_tier_capacity_bytes", "Capacity of the tier", snap.tier_capacity_bytes),
            ("kvstore_tier_blocks", "Blocks held in the tier", snap.tier_blocks),
        ):
            family = GaugeMetricFamily(metric, help_text, labels=["tier"])
            for tier, value in values.items():
                family.add_metric([tier], value)
            yield family


@dataclass(frozen=True, slots=True)
class _MethodMetrics:
    """The children of one method's labelled metrics (``rpcs`` by status code)."""

    in_flight: Gauge
    seconds: Histogram
    codes: dict[str, Counter]


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.rpc_seconds = Histogram(
            "kvstore_rpc_duration_seconds",
            "Time to answer an RPC, by method",
            ["method"],
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.rpcs = Counter(
            "kvstore_rpcs", "RPCs answered, by method and status code", ["method", "code"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "kvstore_rpcs_in_flight", "RPCs being answered, by method", ["method"],
            registry=self.registry,
        )
        self.lookups = Counter("kvstore_lookups", "Prompts looked up", registry=self.registry)
        self.hit_tokens = Counter(
            "kvstore_lookup_hit_tokens", "Tokens of leading prefix hits", registry=self.registry
        )
        self.hit_blocks = Counter(
            "kvstore_lookup_hit_blocks", "Blocks of leading prefix hits, by the tier they were in",
            ["tier"], registry=self.registry,
        )
        self.payload_bytes_in = Counter(
            "kvstore_payload_bytes_in", "Block payload bytes received, by path (stream, shm)",
            ["path"], registry=self.registry,
        )
        self.payload_bytes_out = Counter(
            "kvstore_payload_bytes_out",
            "Block payload bytes sent (stream) or handed over as slots (shm)",
            ["path"], registry=self.registry,
        )
        # The labelled children, made once each: ``labels()`` costs as much as the rest of the
        # accounting of a call (a Lookup asked for five of them).
        self._of_method: dict[str, _MethodMetrics] = {}
        self._hit_blocks_of: dict[str, Counter] = {}
        self._collector: _EngineCollector | None = None
        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None

    def _method(self, method: str) -> _MethodMetrics:
        children = self._of_method.get(method)
        if children is None:
            children = self._of_method[method] = _MethodMetrics(
                self.in_flight.labels(method), self.rpc_seconds.labels(method), {}
            )
        return children

    def rpc_started(self, method: str) -> None:
        self._method(method).in_flight.inc()

    def rpc_finished(self, method: str, code: str, seconds: float) -> None:
        children = self._method(method)
        children.in_flight.dec()
        children.seconds.observe(seconds)
        answered = children.codes.get(code)
        if answered is None:
            answered = children.codes[code] = self.rpcs.labels(method, code)
        answered.inc()

    def lookup(self, hit_tiers: list[str], block_tokens: int) -> None:
        """One lookup whose leading hit is in ``hit_tiers`` (one tier name per hit block)."""
        self.lookups.inc()
        self.hit_tokens.inc(len(hit_tiers) * block_tokens)
        if not hit_tiers:
            return
        # Most hits lie in one tier: counted in C, without a set of the tiers.
        first = hit_tiers[0]
        count = hit_tiers.count(first)
        self._hit_blocks(first).inc(count)
        if count < len(hit_tiers):
            for tier in set(hit_tiers) - {first}:
                self._hit_blocks(tier).inc(hit_tiers.count(tier))

    def _hit_blocks(self, tier: str) -> Counter:
        counter = self._hit_blocks_of.get(tier)
        if counter is None:
            counter = self._hit_blocks_of[tier] = self.hit_blocks.labels(tier)
        return counter

    def bytes_in(self, path: str, n: int) -> None:
        self.payload_bytes_in.labels(path).inc(n)

    def bytes_out(self, path: str, n: int) -> None:
        self.payload_bytes_out.labels(path).inc(n)

    def watch_engine(self, engine: Engine, loop: asyncio.AbstractEventLoop) -> None:
        """Export the engine's state; call from the thread that runs ``loop``."""
        if self._collector is not None:
            self.registry.unregister(self._collector)
        self._collector = _EngineCollector(engine, loop)
        self.registry.register(self._collector)

    def serve_http(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` (0: a free port) from a thread; returns the port."""
        self._http, self._http_thread = start_http_server(port, host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._http_thread is not None:
            self._http_thread.join(timeout=5)
            self._http_thread = None
