"""The store's configuration as the commands that open it resolve it (``serve``, ``stats``,
``selfcheck``, ``backup``, ``restore``, ``config``): the ``--config`` / ``--set`` /
``--print-config`` options, loading (defaults < TOML file < ``KVSTORE_*`` environment < flags) and
the masked printout.

``kvstore.config`` composes every layer's config, the server's included, and so imports most of
the service: it is imported inside the functions here, when a command runs, not when the CLI
starts.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import click
from rich.table import Table

from kvstore.cli.options import print_table, stdout
from kvstore.core.errors import KVStoreError

if TYPE_CHECKING:
    from kvstore.config import StoreConfig

__all__ = [
    "config_option",
    "load",
    "overrides",
    "print_config_option",
    "print_settings",
    "set_option",
]

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    envvar="KVSTORE_CONFIG",
    help="TOML file with [g1]..[g4] tables.",
)
set_option = click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="TIER.FIELD=VALUE",
    help="Override one setting, e.g. --set g4.enabled=true --set g4.url=redis://host:6379/0.",
)
print_config_option = click.option(
    "--print-config",
    is_flag=True,
    help="Print the effective configuration (tokens and secrets masked) and exit.",
)
_MASKED = frozenset({"secret", "token", "salt"})


def overrides(settings: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """``--set SECTION.FIELD=VALUE`` flags as ``load_config`` overrides."""
    out: dict[str, dict[str, str]] = {}
    for item in settings:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot:
            raise click.BadParameter(f"{item!r}: use TIER.FIELD=VALUE, e.g. g3.path=/data/g3")
        out.setdefault(section.strip().lower(), {})[name.strip()] = value
    return out


def load(
    config_path: str | None, settings: tuple[str, ...] | dict[str, dict[str, str]]
) -> StoreConfig:
    """The effective configuration; ``settings`` are ``--set`` flags, or overrides already
    merged with a command's own flags (as ``serve`` does)."""
    from kvstore.config import load_config

    merged = overrides(settings) if isinstance(settings, tuple) else settings
    try:
        return load_config(config_path, overrides=merged)
    except KVStoreError as exc:
        raise click.ClickException(str(exc)) from None


def print_settings(cfg: StoreConfig, title: str = "kvstore configuration") -> None:
    """Every section of the effective configuration, as every command resolves it (the data
    folder included), with tokens and secrets masked."""
    table = Table(title=title)
    table.add_column("section")
    table.add_column("setting")
    table.add_column("value", overflow="fold")
    sections: list[tuple[str, Any]] = [
        *cfg.tiers(),
        ("placement", cfg.placement),
        ("engine", cfg.engine),
        ("server", cfg.server),
        *((f"tenants[{i}]", tenant) for i, tenant in enumerate(cfg.tenants)),
    ]
    for name, section in sections:
        for field in dataclasses.fields(section):
            value = getattr(section, field.name)
            if field.name in _MASKED and value:
                value = "****"
            table.add_row(name, field.name, str(value))
    print_table(table, stdout)
