"""The gRPC service: ``KVStoreServer`` opens the engine, binds the port and serves the servicer.

Operations, in the order a deployment uses them:

1. ``KVStoreServer(config)`` — ``config`` is any ``ServiceLayout`` (kvstore/service/config.py;
   ``kvstore.config.StoreConfig`` is one): tenants from ``config.tenants`` + ``server.secret`` +
   ``server.shared_models``; metrics in a registry of its own.
2. ``await server.start(progress=None)`` — lock the data folder, open the engine
   (``Engine.open``: the index is rebuilt from G3), bind ``server.listen`` (``host:0`` picks a
   free port; TLS when ``server.tls_cert`` is set), mark the standard health service SERVING,
   export ``/metrics`` when ``server.metrics_listen`` is set. Returns the port.
3. RPCs: Lookup, Reserve/Release, Put (client stream), Fetch (server stream), Pin/Unpin/Evict,
   Repair (and Fetch with ``repair_holes``), OpenSegment/CloseSegment (same-host shared memory,
   kvstore/service/segments.py), HandOffG1 (same-GPU peers, CUDA IPC: rpc_g1.py), Stats for
   every tenant; ListBlocks, Inspect, Watch, Flush and
   Work (model workers attach there) for admin tenants.
4. ``await server.stop(grace_s)`` — health NOT_SERVING, refuse new RPCs, end the Work streams,
   let running RPCs finish within the grace period, cancel the rest, close the segments, the
   metrics and the engine, unlock the data folder.

Where the rest lives, in kvstore/service/: ``config.py`` (``ServerConfig``, ``ServiceLayout``),
``errors.py`` (the service's errors and the one exception -> status mapping), ``calls.py`` (the
wrappers every RPC runs in: auth, request id, log line, metrics, status), ``servicer.py`` (the
servicer, from the RPC groups in ``rpc_*.py`` over ``servicer_base.py``), ``put_assembly.py``,
``remote_worker.py`` (workers attached through Work), ``fetch_wire.py`` (Fetch chunks encoded by
hand, and the adjusted handler table), ``segments.py``, ``auth.py``, ``metrics.py``. The proto <->
model conversions shared with the client are in kvstore/wire/convert.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from kvstore.core.data_folder import DataFolderLock
from kvstore.core.errors import ConfigError
from kvstore.engine.engine import Engine, ProgressCallback
from kvstore.engine.repair import HoleFiller, WorkerPool
from kvstore.service.auth import Tenants
from kvstore.service.config import ServerConfig, ServiceLayout
from kvstore.service.errors import (
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    UnauthenticatedError,
    UnimplementedError,
)
from kvstore.service.fetch_wire import WireAdjusted
from kvstore.service.metrics import ServerMetrics
from kvstore.service.segments import SegmentRegistry
from kvstore.service.servicer import Servicer
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc

# The errors and ServerConfig are re-exported: callers import them from here.
__all__ = [
    "SERVICE_NAME",
    "KVStoreServer",
    "NotFoundError",
    "PermissionDeniedError",
    "QuotaExceededError",
    "ServerConfig",
    "ServiceLayout",
    "UnauthenticatedError",
    "UnimplementedError",
]

log = logging.getLogger(__name__)

SERVICE_NAME = "kvstore.v1.KVStore"


def _read_pem(path: str, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror}") from None


def _host_port(value: str, setting: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    try:
        return host.strip("[]") or "0.0.0.0", int(port)
    except ValueError:
        raise ConfigError(f"{setting} must be host:port, got {value!r}") from None


class KVStoreServer:
    """The kvstore gRPC service over one engine; ``start`` opens both, ``stop`` closes both."""

    def __init__(self, config: ServiceLayout, *, workers: Sequence[HoleFiller] = ()) -> None:
        """``workers``: model workers that run in this process (``ModelWorker``); worker
        processes attach through the Work stream instead."""
        self.config = config
        self.pool = WorkerPool()
        for worker in workers:
            self.pool.attach(worker)
        self.metrics = ServerMetrics()
        self.tenants = Tenants(
            config.tenants,
            secret=config.server.secret,
            shared_models=config.server.shared_models,
        )
        self.metrics_port: int | None = None
        self._engine: Engine | None = None
        self._server: Any = None
        self._servicer: Servicer | None = None
        self._health: Any = None
        self._port: int | None = None
        self._stopped = False
        self._data_lock: DataFolderLock | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the server is not started")
        return self._port

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("the server is not started")
        return self._engine

    @property
    def segments(self) -> SegmentRegistry:
        """The same-host segments this server has handed out."""
        if self._servicer is None:
            raise RuntimeError("the server is not started")
        return self._servicer.segments

    async def start(self, *, progress: ProgressCallback | None = None) -> int:
        """Open the engine, bind ``server.listen`` and serve; returns the bound port."""
        if self._server is not None:
            raise RuntimeError("the server is already started")
        cfg = self.config.server
        credentials = None
        if cfg.tls_cert:
            ca = _read_pem(cfg.tls_client_ca, "server.tls_client_ca") if cfg.tls_client_ca else None
            key = _read_pem(cfg.tls_key, "server.tls_key")
            credentials = grpc.ssl_server_credentials(
                [(key, _read_pem(cfg.tls_cert, "server.tls_cert"))],
                root_certificates=ca,
                require_client_auth=ca is not None,
            )
        lock = None
        if self.config.g3 is not None:
            # One service per data folder: a second one would keep an index of its own.
            lock = DataFolderLock(self.config.g3.path)
            lock.acquire("kvstore serve")
        try:
            engine = await Engine.open(self.config, progress=progress)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        try:
            server = grpc.aio.server(
                options=[
                    ("grpc.max_send_message_length", cfg.max_message_bytes),
                    ("grpc.max_receive_message_length", cfg.max_message_bytes),
                    # Two servers must not share a port silently.
                    ("grpc.so_reuseport", 0),
                    ("grpc.keepalive_time_ms", int(cfg.keepalive_s * 1000)),
                    ("grpc.keepalive_timeout_ms", int(cfg.keepalive_timeout_s * 1000)),
                    ("grpc.keepalive_permit_without_calls", 1),
                    # The server's bound on client pings (GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_
                    # WITHOUT_DATA_MS); pings more frequent than this still count as strikes.
                    (
                        "grpc.http2.min_ping_interval_without_data_ms",
                        int(cfg.min_ping_interval_s * 1000),
                    ),
                ]
            )
            servicer = Servicer(engine, self.config, self.tenants, self.metrics, self.pool)
            pb_grpc.add_KVStoreServicer_to_server(servicer, WireAdjusted(server))
            health = health_aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(health, server)
            try:
                if credentials is None:
                    port = server.add_insecure_port(cfg.listen)
                else:
                    port = server.add_secure_port(cfg.listen, credentials)
            except RuntimeError as exc:
                raise ConfigError(f"server.listen: cannot bind {cfg.listen}: {exc}") from None
            if not port:
                raise ConfigError(f"server.listen: cannot bind {cfg.listen}")
            await server.start()
            for service in ("", SERVICE_NAME):
                await health.set(service, health_pb2.HealthCheckResponse.SERVING)
            self.metrics.watch_engine(engine, asyncio.get_running_loop())
            if cfg.metrics_listen:
                host, metrics_port = _host_port(cfg.metrics_listen, "server.metrics_listen")
                try:
                    self.metrics_port = self.metrics.serve_http(host, metrics_port)
                except OSError as exc:
                    await server.stop(None)
                    raise ConfigError(
                        f"server.metrics_listen: cannot bind {cfg.metrics_listen}: {exc.strerror}"
                    ) from None
        except BaseException:
            await engine.close()
            if lock is not None:
                lock.release()
            raise
        self._engine, self._server, self._servicer, self._health = engine, server, servicer, health
        self._data_lock = lock
        self._port = int(port)
        log.info("kvstore serving on %s (port %d)", cfg.listen, self._port)
        return self._port

    async def stop(self, grace_s: float | None = None) -> None:
        """Refuse new RPCs, give running ones ``grace_s`` (default ``server.shutdown_grace_s``)
        to finish, cancel the rest, close the engine. Idempotent."""
        if self._server is None or self._stopped:
            return
        self._stopped = True
        grace = self.config.server.shutdown_grace_s if grace_s is None else grace_s
        assert self._servicer is not None
        self._servicer.stopping = True
        self._servicer.close_workers()
        with contextlib.suppress(Exception):
            await self._health.enter_graceful_shutdown()
        try:
            await self._server.stop(grace)
        finally:
            self._servicer.segments.shutdown()
            self.metrics.close()
            await self.engine.close()
            if self._data_lock is not None:
                self._data_lock.release()

    async def wait_for_termination(self) -> None:
        if self._server is None:
            raise RuntimeError("the server is not started")
        await self._server.wait_for_termination()

    async def __aenter__(self) -> KVStoreServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
