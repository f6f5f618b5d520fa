"""The service's own settings (``ServerConfig``) and the shape of the configuration the server
runs on (``ServiceLayout``): the engine's ``StoreLayout`` plus the ``[server]`` table and the
tenants. ``kvstore.config.StoreConfig`` composes every layer's config and satisfies this
protocol; the service never imports it, so the composition sits above the layers it composes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from kvstore.core.errors import ConfigError
from kvstore.engine.config import StoreLayout
from kvstore.service.auth import TenantConfig

__all__ = ["ServerConfig", "ServiceLayout"]

MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: str = "127.0.0.1:50051"
    metrics_listen: str = ""  # host:port for Prometheus /metrics; empty: off
    tls_cert: str = ""  # PEM files; both set: TLS on
    tls_key: str = ""
    tls_client_ca: str = ""  # set: clients must present a certificate signed by this CA
    secret: str = ""  # derives tenant salts (tenants without an explicit salt)
    shared_models: tuple[str, ...] = ()  # model ids whose blocks every tenant shares
    max_chunk_bytes: int = 1 * MiB
    max_message_bytes: int = 64 * MiB
    max_prompt_tokens: int = 1 << 21
    shutdown_grace_s: float = 5.0
    # A model worker that has not answered a repair task by then is taken for hung: its stream
    # is closed (it reconnects afresh) and the task goes to another worker.
    worker_timeout_s: float = 300.0
    # Keepalive, both ways. The server pings a connection idle for keepalive_s and drops it when
    # no answer comes within keepalive_timeout_s (a worker host that vanished). It accepts client
    # pings as often as every min_ping_interval_s even with no call carrying data: a model
    # worker waits for tasks on an idle stream and pings every 30 s (`kvstore worker
    # --keepalive`); gRPC's own default (5 min) answers such pings with GOAWAY too_many_pings,
    # which detached every idle worker every few minutes.
    keepalive_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    min_ping_interval_s: float = 10.0
    # Same-host segments (OpenSegment): sealed memfds handed to one tenant by descriptor.
    same_host: bool = True
    tenant_segment_bytes: int = 2 << 30
    segment_idle_s: float = 300.0
    # What one tenant may hold against eviction (admins are not bounded): pinned blocks, and
    # blocks under its Reserve leases, as counts and as bytes. The byte bounds are a share of G2's
    # capacity, so that no tenant can pin or lease all of it away from the others.
    max_pinned_blocks_per_tenant: int = 65536
    pin_share: float = 0.25
    max_leased_blocks_per_tenant: int = 65536
    lease_share: float = 0.5
    # Prompts longer than this are hashed off the event loop, at most max_heavy_requests at once
    # (the others wait their turn without holding up small requests).
    heavy_prompt_tokens: int = 65536
    max_heavy_requests: int = 1

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("server.tls_cert and server.tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("server.tls_client_ca needs server.tls_cert and server.tls_key")
        if not 4096 <= self.max_chunk_bytes <= self.max_message_bytes // 2:
            raise ConfigError("server.max_chunk_bytes must be in [4096, max_message_bytes / 2]")
        if self.max_prompt_tokens < 1:
            raise ConfigError("server.max_prompt_tokens must be >= 1")
        if not self.worker_timeout_s > 0:
            raise ConfigError("server.worker_timeout_s must be positive")
        if ":" not in self.listen:
            raise ConfigError(f"server.listen must be host:port, got {self.listen!r}")
        if not (self.keepalive_s > 0 and self.keepalive_timeout_s > 0):
            raise ConfigError("server.keepalive_s and server.keepalive_timeout_s must be positive")
        if not self.min_ping_interval_s >= 0:
            raise ConfigError("server.min_ping_interval_s must be >= 0")
        if self.tenant_segment_bytes < 0:
            raise ConfigError("server.tenant_segment_bytes must be >= 0")
        if not self.segment_idle_s > 0:
            raise ConfigError("server.segment_idle_s must be positive")
        if self.max_pinned_blocks_per_tenant < 1 or self.max_leased_blocks_per_tenant < 1:
            raise ConfigError(
                "server.max_pinned_blocks_per_tenant and max_leased_blocks_per_tenant must be >= 1"
            )
        if self.heavy_prompt_tokens < 0 or self.max_heavy_requests < 1:
            raise ConfigError(
                "server.heavy_prompt_tokens must be >= 0 and server.max_heavy_requests >= 1"
            )
        if not (0 < self.pin_share <= 1 and 0 < self.lease_share <= 1):
            raise ConfigError("server.pin_share and server.lease_share must be in (0, 1]")


class ServiceLayout(StoreLayout, Protocol):
    """What ``KVStoreServer`` reads of a configuration: what the engine opens, the server's
    settings and the tenants."""

    @property
    def server(self) -> ServerConfig: ...
    @property
    def tenants(self) -> tuple[TenantConfig, ...]: ...
