"""Configuration: one frozen dataclass per component, built once and handed down.

Precedence, lowest first: defaults < TOML file (``--config``) < ``KVSTORE_*`` environment
variables <
command-line flags. The TOML file has one table per tier (``[g1]`` .. ``[g4]``); each field ``f`` of
table ``t`` is also read from ``KVSTORE_<T>_<F>`` (for example ``KVSTORE_G3_PATH``,
``KVSTORE_G4_URL``), and a tier is switched on or off with ``enabled`` (``KVSTORE_G4_ENABLED=1``).
Sizes accept suffixes (``512MiB``, ``4GiB``, ``1.5GB``). Components never read the environment
themselves: ``load_config`` is the only place that does.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvstore.core.block_format import Codec
from kvstore.core.errors import ConfigError
from kvstore.engine.config import EngineConfig
from kvstore.engine.placement import PlacementConfig
from kvstore.service.auth import TenantConfig
from kvstore.service.config import ServerConfig
from tiers.gpu_memory import GpuTierConfig
from tiers.lmdb_store import LmdbTierConfig
from tiers.pinned_memory import PinnedTierConfig
from tiers.redis_store import RedisTierConfig

__all__ = ["DEFAULT_DATA_DIR", "StoreConfig", "load_config", "parse_size"]

log = logging.getLogger(__name__)

MiB = 1 << 20
GiB = 1 << 30
# Every command (serve, stats, backup, restore, config, selfcheck) resolves the data folder the
# same way: this default, relative to the working directory, unless g3.path is set in the file,
# the environment (KVSTORE_G3_PATH) or a flag. It is made absolute once, here, so that what
# `--print-config` shows is the folder every command then opens.
DEFAULT_DATA_DIR = Path("kvstore-data")

# Settings of earlier versions that a config may still carry: ignored with a warning, not refused,
# so that an upgrade does not stop a service from starting.
_SLOT_GONE = "G1 and G2 allocate by bytes and take blocks of any size up to their capacity"
_RETIRED: dict[str, dict[str, str]] = {
    "g1": {"slot_bytes": _SLOT_GONE},
    "g2": {"slot_bytes": _SLOT_GONE},
}
_TIERS: dict[str, type[Any]] = {
    "g1": GpuTierConfig,
    "g2": PinnedTierConfig,
    "g3": LmdbTierConfig,
    "g4": RedisTierConfig,
}
# Tables that are not tiers: no "enabled" switch, every field has a default.
_SECTIONS: dict[str, type[Any]] = {
    "placement": PlacementConfig,
    "engine": EngineConfig,
    "server": ServerConfig,
}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "g1": {"enabled": False, "capacity_bytes": 4 * GiB},
    "g2": {"enabled": True, "capacity_bytes": 1 * GiB},
    "g3": {"enabled": True, "capacity_bytes": 16 * GiB, "path": str(DEFAULT_DATA_DIR / "g3")},
    "g4": {"enabled": False, "capacity_bytes": 64 * GiB, "url": "redis://127.0.0.1:6379/0"},
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "B": 1,
    "K": 10**3,
    "KB": 10**3,
    "KIB": 2**10,
    "KI": 2**10,
    "M": 10**6,
    "MB": 10**6,
    "MIB": 2**20,
    "MI": 2**20,
    "G": 10**9,
    "GB": 10**9,
    "GIB": 2**30,
    "GI": 2**30,
    "T": 10**12,
    "TB": 10**12,
    "TIB": 2**40,
    "TI": 2**40,
}


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Which tiers run, and each one's settings. G2 is always on; the others are optional."""

    g2: PinnedTierConfig
    g1: GpuTierConfig | None = None
    g3: LmdbTierConfig | None = None
    g4: RedisTierConfig | None = None
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    tenants: tuple[TenantConfig, ...] = ()

    def tiers(self) -> list[tuple[str, Any]]:
        """``(name, config)`` of every enabled tier, hottest first."""
        pairs = [("G1", self.g1), ("G2", self.g2), ("G3", self.g3), ("G4", self.g4)]
        return [(name, cfg) for name, cfg in pairs if cfg is not None]


def parse_size(value: str | int) -> int:
    """``"512MiB"`` -> 536870912; plain integers pass through."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ConfigError(f"{value!r} is not a size (examples: 1048576, 512MiB, 4GiB, 1.5GB)")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "").upper()])


def _field_types(cls: type[Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _coerce(section: str, name: str, typ: Any, value: Any) -> Any:
    where = f"{section}.{name}"
    origin = typing.get_origin(typ)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            return None
        typ = args[0]
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(str(v).strip() for v in items if str(v).strip())
    if origin is typing.Literal:
        if value not in typing.get_args(typ):
            raise ConfigError(f"{where} must be one of {typing.get_args(typ)}, got {value!r}")
        return value
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typ is int:
            if name.endswith("_bytes"):
                try:
                    return parse_size(value)
                except ConfigError as exc:
                    raise ConfigError(f"{where}: {exc}") from None
            return int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return str(value)
        if isinstance(typ, type) and issubclass(typ, Codec):
            return value if isinstance(value, Codec) else Codec[str(value).upper()]
    except (ValueError, KeyError):
        raise ConfigError(
            f"{where}: cannot read {value!r} as {getattr(typ, '__name__', typ)}"
        ) from None
    return value


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> StoreConfig:
    """Build the ``StoreConfig``: defaults < TOML file < ``KVSTORE_*`` env < ``overrides``."""
    sections = {**_TIERS, **_SECTIONS}
    layers: dict[str, dict[str, Any]] = {k: dict(_DEFAULTS.get(k, {})) for k in sections}
    tenants: list[TenantConfig] = []
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
        tenant_tables = data.pop("tenants", [])
        if not isinstance(tenant_tables, list):
            raise ConfigError(f"{path}: tenants must be an array of tables ([[tenants]])")
        for i, table in enumerate(tenant_tables):
            types_ = _field_types(TenantConfig)
            unknown_keys = set(table) - set(types_)
            if unknown_keys:
                raise ConfigError(
                    f"{path}: tenants[{i}] has unknown settings {sorted(unknown_keys)}"
                )
            tenants.append(
                TenantConfig(**{k: _coerce("tenants", k, types_[k], v) for k, v in table.items()})
            )
        unknown = set(data) - set(sections)
        if unknown:
            raise ConfigError(
                f"{path}: unknown tables {sorted(unknown)}; known: {sorted(sections)}"
            )
        for section, values in data.items():
            layers[section].update(values)
    env = os.environ if env is None else env
    for section, cls in sections.items():
        names = [
            *_field_types(cls),
            *(["enabled"] if section in _TIERS else []),
            *_RETIRED.get(section, ()),
        ]
        keys = {f"KVSTORE_{section.upper()}_{name.upper()}": name for name in names}
        for key, name in keys.items():
            if key in env:
                layers[section][name] = env[key]
        # A misspelt variable would otherwise be ignored without a word.
        prefix = f"KVSTORE_{section.upper()}_"
        stray = sorted(k for k in env if k.startswith(prefix) and k not in keys)
        if stray:
            raise ConfigError(
                f"{', '.join(stray)}: no such setting in [{section}]; its variables are "
                f"{', '.join(sorted(keys))}"
            )
    for section, values in (overrides or {}).items():
        if section not in sections:
            raise ConfigError(f"unknown table {section!r}; known: {sorted(sections)}")
        layers[section].update({k: v for k, v in values.items() if v is not None})

    built: dict[str, Any] = {}
    for section, cls in sections.items():
        values = layers[section]
        enabled = section not in _TIERS or _coerce(
            section, "enabled", bool, values.pop("enabled", True)
        )
        types_ = _field_types(cls)
        for name in _RETIRED.get(section, ()):
            if values.pop(name, None) is not None:
                log.warning(
                    "%s.%s is no longer used and is ignored: %s; remove it from your settings",
                    section,
                    name,
                    _RETIRED[section][name],
                )
        unknown = set(values) - set(types_)
        if unknown:
            raise ConfigError(
                f"[{section}] has unknown settings {sorted(unknown)}; known: {sorted(types_)}"
            )
        if not enabled:
            if section == "g2":
                raise ConfigError("G2 cannot be disabled: it is where puts land")
            continue
        kwargs = {k: _coerce(section, k, types_[k], v) for k, v in values.items()}
        try:
            built[section] = cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"[{section}] {exc}") from None
    if "g3" in built:
        g3 = built["g3"]
        built["g3"] = dataclasses.replace(g3, path=os.path.abspath(os.path.expanduser(g3.path)))
    return StoreConfig(**built, tenants=tuple(tenants))
