"""``ConnectorConfig``: the connector's settings, vLLM's ``kv_connector_extra_config`` checked once.

The keys and what they do are listed in the docstring of ``client.vllm_connector``; unknown keys
and values of the wrong type are a ``ConfigError`` when the connector starts, not a surprise
later.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from kvstore.core.errors import ConfigError

__all__ = ["ConnectorConfig"]

_LOAD_ASYNC = ("lower", "always", "never")


@dataclass(frozen=True, slots=True)
class ConnectorConfig:
    """``kv_connector_extra_config``, checked once (the keys: ``client.vllm_connector``)."""

    server: str = "127.0.0.1:50051"
    token: str | None = None
    tls_ca: str | None = None
    timeout_s: float = 30.0
    repair_holes: bool = False
    block_tokens: int = 0  # 0: vLLM's block size
    revision: str = ""
    model_spec: str = ""
    lease_ttl_s: float = 60.0
    stats_path: str = ""
    # Which hits load asynchronously (the request waits aside, the other requests' steps go
    # on): "lower" those with a block below G2 (G3, G4: slow reads), "always", "never".
    load_async: str = "lower"

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> ConnectorConfig:
        """The settings vLLM passes on; unknown keys and wrong types are a ``ConfigError``."""
        values = dict(extra or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(
                f"KVStoreConnector: unknown kv_connector_extra_config keys {unknown}; "
                f"known: {sorted(known)}"
            )
        for name, value in values.items():
            default = known[name].default
            kinds: tuple[type, ...] = (type(default),) if default is not None else (str,)
            if isinstance(default, float):
                kinds = (int, float)
            if value is None and default is None:
                continue
            if not isinstance(value, kinds) or (isinstance(value, bool) and kinds != (bool,)):
                raise ConfigError(
                    f"KVStoreConnector: {name} must be {kinds[-1].__name__}, got {value!r}"
                )
        config = cls(**values)
        if not config.server:
            raise ConfigError("KVStoreConnector: server must not be empty")
        if config.timeout_s <= 0 or config.lease_ttl_s <= 0 or config.block_tokens < 0:
            raise ConfigError(
                "KVStoreConnector: timeout_s and lease_ttl_s must be > 0, block_tokens >= 0"
            )
        if config.load_async not in _LOAD_ASYNC:
            raise ConfigError(
                f"KVStoreConnector: load_async must be one of {list(_LOAD_ASYNC)}, "
                f"got {config.load_async!r}"
            )
        return config
