"""The processes of the vLLM connector tests: a kvstore service that can be restarted on the
same port, and vLLM engines (``run_engine.py``) each in a subprocess of its own."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.request import urlopen

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable  # the vLLM environment's: kvstore is installed there too (editable)
BLOCK_SIZE = 32  # vLLM on CPU: a multiple of 32


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Service:
    """`kvstore serve` with G2 and G3 (in ``g3_path``) and Prometheus metrics; ``restart``
    keeps the ports and G3."""

    def __init__(self, g3_path: Path, log_path: Path) -> None:
        self.g3_path = g3_path
        self.log_path = log_path
        self.port = 0
        with socket.socket() as probe:  # a free port for /metrics (the CLI does not print it)
            probe.bind(("127.0.0.1", 0))
            self.metrics_port = probe.getsockname()[1]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60) -> None:
        out = self.log_path.with_suffix(".out")
        out.write_text("")
        self.proc = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "kvstore.cli",
                "serve",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--set",
                f"g3.path={self.g3_path}",
                "--set",
                "g2.capacity_bytes=256MiB",
                "--set",
                f"server.metrics_listen=127.0.0.1:{self.metrics_port}",
            ],
            stdout=out.open("w"),
            stderr=self.log_path.open("a"),
            env=child_env(),
            cwd=REPO,
        )
        deadline = time.monotonic() + timeout_s
        while True:  # stdout has "kvstore serving on 127.0.0.1:PORT (...)" once it listens
            for line in out.read_text().splitlines():
                if "serving on " in line:
                    address = line.split("serving on ", 1)[1].split()[0]
                    self.port = int(address.rsplit(":", 1)[1])
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"kvstore serve did not start; see {self.log_path}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def metrics(self) -> dict[str, float]:
        """The service's counters since it started, as ``name`` or ``name{label=value}``."""
        with urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return values


class Engine:
    """`run_engine.py` in a subprocess: one vLLM engine, one or more rounds of prompts.

    Rounds after the first wait for ``proceed()``, so that the test can change the kvstore
    service (restart it, evict blocks) under a running engine.
    """

    def __init__(
        self,
        folder: Path,
        name: str,
        model_dir: Path,
        rounds: list[list[list[int]]],
        connector: dict[str, Any] | None,
        max_tokens: int = 12,
        engine_args: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.folder = folder / name
        self.folder.mkdir(parents=True)
        self.log_path = self.folder / "engine.log"
        spec = {
            "model": str(model_dir),
            "rounds": rounds,
            "max_tokens": max_tokens,
            "block_size": BLOCK_SIZE,
            "max_model_len": 512,
            "connector": connector,
            "engine_args": engine_args or {},
            "env": env or {},
        }
        (self.folder / "spec.json").write_text(json.dumps(spec))
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [PYTHON, str(REPO / "tests_vllm" / "run_engine.py"), str(self.folder)],
            stdin=subprocess.PIPE,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            text=True,
            env=child_env(),
            cwd=REPO,
        )
        self.round = 0

    def result(self, timeout_s: float = 240) -> dict[str, Any]:
        """The results of the next round, once the engine has written them."""
        path = self.folder / f"round-{self.round}.json"
        deadline = time.monotonic() + timeout_s
        while not path.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM engine exited ({self.proc.returncode}): {self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no result after {timeout_s} s: {self.tail()}")
            time.sleep(0.2)
        self.round += 1
        result: dict[str, Any] = json.loads(path.read_text())
        return result

    def proceed(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def close(self, timeout_s: float = 60) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # the engine exits at end of input
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


def run_engine(
    folder: Path,
    name: str,
    model_dir: Path,
    prompts: list[list[int]],
    connector: dict[str, Any] | None,
    engine_args: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One engine, one round."""
    engine = Engine(
        folder, name, model_dir, [prompts], connector, engine_args=engine_args, env=env
    )
    try:
        return engine.result()
    finally:
        engine.close()


def connector_stats(folder: Path) -> dict[str, dict[str, Any]]:
    """The counters the connectors of one engine wrote: ``{"scheduler": ..., "worker": ...}``
    (one process may hold both)."""
    stats: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        stats[data["role"]] = data
    return stats
