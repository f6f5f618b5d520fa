"""The gRPC service (being written; see issue 4). For now: its configuration."""

from __future__ import annotations

from dataclasses import dataclass

from kvstore.errors import ConfigError

__all__ = ["ServerConfig"]

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

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("server.tls_cert and server.tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("server.tls_client_ca needs server.tls_cert and server.tls_key")
        if not 4096 <= self.max_chunk_bytes <= self.max_message_bytes // 2:
            raise ConfigError("server.max_chunk_bytes must be in [4096, max_message_bytes / 2]")
        if self.max_prompt_tokens < 1:
            raise ConfigError("server.max_prompt_tokens must be >= 1")
        if ":" not in self.listen:
            raise ConfigError(f"server.listen must be host:port, got {self.listen!r}")
