"""How long a ``kvstore`` command that only talks to a server takes, against the interpreter alone.

Run ``python -m benchmarks.cli_startup [--quick]`` from the repository root. A kvstore server runs
in a child process (G2 + G3 in a temporary folder, a free port) holding a few blocks; each case
runs a command in a fresh process, the way an operator's shell does, sampled round-robin:

- ``python -c pass``: the baseline, the interpreter's own start;
- ``kvstore tiers``, ``kvstore ls``, ``kvstore inspect PREFIX``: start, connect, one or two RPCs,
  the table; the target is under 0.5 s each;
- ``kvstore ls --help``: start and click's help, no server;
- ``python -c "import torch"``: what every command paid before the commands' imports went lazy
  (the whole CLI imported torch, the engine and the server up front);
- with ``--before DIR``, ``kvstore tiers`` and ``ls`` run from another checkout (``python -m
  kvstore.cli`` in DIR imports DIR's code), against the same server, in the same rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.report import Settings, Table, medians_s, print_tables

FULL = Settings(repeats=7, warmup=1, min_sample_s=0.0)
QUICK = Settings(repeats=3, warmup=1, min_sample_s=0.0)
TARGET_S = 0.5
HEADERS = ("command", "s median", "s baseline", "ratio", "target met")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_serving(port: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = subprocess.run(
            [sys.executable, "-m", "kvstore.cli", "health", "--server", f"127.0.0.1:{port}"],
            capture_output=True,
        )
        if done.returncode == 0:
            return
        time.sleep(0.3)
    raise RuntimeError(f"the server on port {port} did not come up in {timeout_s} s")


async def _store_blocks(port: int) -> str:
    """Put one small prompt; return a hash prefix of one of its blocks, as `kvstore ls` shows."""
    import torch

    from client import AsyncClient
    from kvstore.core.keys import ModelSpec, block_hashes

    spec = ModelSpec("bench-cli", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16",
                     block_tokens=16)
    tokens = list(range(64))
    async with AsyncClient(f"127.0.0.1:{port}") as client:
        await client.put(spec, tokens, torch.ones((2, 2, 64, 2, 8), dtype=torch.float16))
    return block_hashes(spec, tokens)[1].hex()[:8]


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvstore.cli", *args]


def _runner(argv: list[str], cwd: str | None = None) -> Callable[[], None]:
    def run() -> None:
        subprocess.run(
            argv, check=True, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    return run


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cli_startup", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument(
        "--before",
        metavar="DIR",
        help="also run `kvstore tiers` and `kvstore ls` from this checkout (an earlier commit: "
        "`git worktree add DIR REV`), in the same rounds",
    )
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    port = _free_port()
    server_at = f"127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as folder:
        server = subprocess.Popen(
            _command("serve", "--listen", server_at, "--set", f"g3.path={Path(folder) / 'g3'}"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_serving(port)
            prefix = asyncio.run(_store_blocks(port))
            cases = {
                "python -c pass": _runner([sys.executable, "-c", "pass"]),
                "kvstore tiers": _runner(_command("tiers", "--server", server_at)),
                "kvstore ls": _runner(_command("ls", "--server", server_at)),
                "kvstore inspect PREFIX": _runner(
                    _command("inspect", prefix, "--server", server_at)
                ),
                "kvstore ls --help": _runner(_command("ls", "--help")),
                'python -c "import torch"': _runner([sys.executable, "-c", "import torch"]),
            }
            if args.before:
                for name in ("tiers", "ls"):
                    cases[f"kvstore {name} (before)"] = _runner(
                        _command(name, "--server", server_at), cwd=args.before
                    )
            medians = medians_s(cases, settings)
        finally:
            server.terminate()
            server.wait(timeout=30)
    base = medians["python -c pass"]
    rows = []
    for name, seconds in medians.items():
        if name == "python -c pass":
            continue
        met = "yes" if seconds < TARGET_S else "no"
        target = met if name.startswith("kvstore") and "--help" not in name else "-"
        name = name.replace("(before)", f"(before: {args.before})")
        rows.append((name, f"{seconds:.3f}", f"{base:.3f}", f"{seconds / base:.1f}", target))
    table = Table(
        f"CLI start-up: a command in a fresh process, against the bare interpreter "
        f"(target < {TARGET_S} s for the server commands)",
        HEADERS,
        rows,
        frozenset({"command", "target met"}),
    )
    print_tables([table], "grpcio", "click", "rich")


if __name__ == "__main__":
    main()
