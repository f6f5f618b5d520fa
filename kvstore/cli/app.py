"""The ``kvstore`` command group: ``main``, which the console script and ``python -m kvstore.cli``
run, with every command of the modules below added to it.

The command modules define plain click commands and know nothing of this group, so that none of
them imports it (no import circle) and a command is registered exactly once, whichever way the
CLI was started. Each module lists its commands in ``COMMANDS``; their order here is the order of
the modules, and ``--help`` sorts them by name anyway.

Start-up cost is kept to click, rich, numpy and our option modules: torch, transformers, the
client, the engine and the server are imported inside the commands that use them, so that a
command that only talks to a server, or any ``--help``, starts in a fraction of a second.
"""

from __future__ import annotations

import click

from kvstore.cli import admin, bench, events, inspection, roles, serve, store, transfer
from kvstore.demo.demo import demo

__all__ = ["main"]


@click.group()
@click.version_option(package_name="kvstore")
def main() -> None:
    """kvstore: tiered KV-cache storage for LLM inference."""


for _module in (store, serve, roles, inspection, events, transfer, admin, bench):
    for _command in _module.COMMANDS:
        main.add_command(_command)
main.add_command(demo)
