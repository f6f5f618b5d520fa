"""The commands that only talk to a server start without torch: ``kvstore ls --help`` (and the
others) import click, rich, numpy and our option modules, not torch, transformers, the client,
the engine or the server (which take about 2 s to import). Checked on what the interpreter
imported, not on a clock."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "client", "kvstore.engine", "kvstore.service", "kvstore.config")
REMOTE_COMMANDS = ("tiers", "status", "health", "ls", "inspect", "lookup", "events", "put", "get",
                   "pin", "unpin", "evict", "flush", "repair", "bench")  # fmt: skip


def _imported(argv: list[str]) -> list[str]:
    """The heavy modules loaded after the CLI ran ``argv`` (``--help`` exits through SystemExit)."""
    code = (
        "import json, sys\n"
        "from kvstore.cli import main\n"
        "try:\n"
        f"    main({argv!r}, prog_name='kvstore')\n"
        "except SystemExit:\n"
        "    pass\n"
        f"heavy = {HEAVY!r}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.partition('.')[0] in heavy\n"
        "                        or any(m.startswith(h + '.') or m == h for h in heavy))))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return list(json.loads(run.stdout.splitlines()[-1]))


def test_ls_help_does_not_import_torch() -> None:
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "kvstore.cli", "ls", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "Usage:" in run.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if "|" in line}
    assert "kvstore.cli.app" in imported  # the walk sees the CLI's own modules
    assert not {"torch", "transformers", "client"} & imported, sorted(imported)


@pytest.mark.parametrize("command", REMOTE_COMMANDS)
def test_remote_command_help_loads_nothing_heavy(command: str) -> None:
    assert _imported([command, "--help"]) == []


def test_a_usage_error_loads_nothing_heavy() -> None:
    # A bad argument is reported before the command would connect (and import the client).
    assert _imported(["inspect", "not-a-hash"]) == []
