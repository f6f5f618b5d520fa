"""Tenants: who may call the service, and the secret salt that keeps their blocks apart.

Operations, in the order the server uses them:

1. ``Tenants(configs, secret=..., shared_models=...)`` — built once from the config file.
2. ``authenticate(token)`` — the tenant a bearer token belongs to (constant-time comparison), or
   None. With no tenants configured, authentication is off and every caller is the anonymous
   admin tenant with an empty salt (a single-user deployment).
3. ``salt_for(tenant, spec)`` — the salt mixed into the root of the tenant's hash chains. It never
   leaves the server, so one tenant can neither hit nor probe another's blocks. A namespace whose
   model id is listed in ``shared_models`` uses the empty salt for everyone, on purpose.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from kvstore.core.errors import ConfigError
from kvstore.core.keys import ModelSpec

__all__ = ["ANONYMOUS", "Tenant", "TenantConfig", "Tenants"]


@dataclass(frozen=True, slots=True)
class TenantConfig:
    name: str
    token: str
    # The tenant's hash salt. Empty: derived from the server secret and the tenant name, so it
    # survives restarts without being written anywhere.
    salt: str = ""
    quota_bytes: int = 0  # 0: no quota
    admin: bool = False  # may list, inspect, watch, flush and see server-wide stats

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("a tenant needs a name")
        if len(self.token) < 16:
            raise ConfigError(f"tenant {self.name!r}: a token needs at least 16 characters")
        if self.quota_bytes < 0:
            raise ConfigError(f"tenant {self.name!r}: quota_bytes must be >= 0")


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    salt: bytes
    quota_bytes: int
    admin: bool


ANONYMOUS = Tenant("anonymous", b"", 0, True)


class Tenants:
    def __init__(
        self,
        configs: Sequence[TenantConfig],
        *,
        secret: str = "",
        shared_models: Sequence[str] = (),
    ) -> None:
        names = [c.name for c in configs]
        if len(set(names)) != len(names):
            raise ConfigError("tenant names must be unique")
        if len({c.token for c in configs}) != len(configs):
            raise ConfigError("tenant tokens must be unique")
        if any(not c.salt for c in configs) and len(secret) < 16:
            raise ConfigError(
                "tenants without an explicit salt need server.secret (16+ characters) to derive "
                "one from"
            )
        self._by_token: list[tuple[bytes, Tenant]] = []
        for c in configs:
            salt = (
                c.salt.encode()
                if c.salt
                else hmac.new(
                    secret.encode(),
                    b"kvstore.tenant-salt.v1\x00" + c.name.encode(),
                    hashlib.blake2b,
                ).digest()[:16]
            )
            self._by_token.append((c.token.encode(), Tenant(c.name, salt, c.quota_bytes, c.admin)))
        self.shared_models = frozenset(shared_models)

    def all(self) -> list[Tenant]:
        """Every configured tenant (none when tenants are off)."""
        return [tenant for _, tenant in self._by_token]

    @property
    def enabled(self) -> bool:
        return bool(self._by_token)

    def authenticate(self, token: str | None) -> Tenant | None:
        if not self.enabled:
            return ANONYMOUS
        if not token:
            return None
        given = token.encode()
        found = None
        for known, tenant in self._by_token:
            # Compare against every token, always: the time taken says nothing about which
            # prefix matched.
            if hmac.compare_digest(given, known):
                found = tenant
        return found

    def salt_for(self, tenant: Tenant, spec: ModelSpec) -> bytes:
        return b"" if spec.model_id in self.shared_models else tenant.salt
