"""``Store``: one connector's handle on the kvstore service, shared by its two sides.

It holds the ``Client`` (made on first use, in the process and thread that uses it: vLLM may
build the connector in one process and fork or spawn the engine core or workers from it), the
``Counters`` of what the connector did, and writes them to ``stats_path`` (``<role>-<pid>.json``,
with the namespace the side uses) for whoever watches the engine.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.same_host import Segment
from client.sync import Client
from client.vllm.config import ConnectorConfig
from kvstore.core.keys import ModelSpec

__all__ = ["Counters", "Store"]


@dataclass
class Counters:
    """What a connector did, summed over its life; the stats file holds them."""

    lookups: int = 0
    lookup_errors: int = 0
    lookup_hit_tokens: int = 0  # what kvstore had, before the last-token rule
    matched_tokens: int = 0  # what was claimed to vLLM
    repairs: int = 0
    repaired_blocks: int = 0
    loads: int = 0
    async_loads: int = 0  # of them, loads the request waited for aside (``load_async``)
    loaded_tokens: int = 0
    load_error_blocks: int = 0
    saves: int = 0
    saved_tokens: int = 0
    stored_blocks: int = 0
    already_stored_blocks: int = 0
    save_errors: int = 0
    # Seconds spent in each part of the hit and store paths, summed over calls.
    lookup_s: float = 0.0
    reserve_s: float = 0.0
    fetch_s: float = 0.0  # start of the fetch to the end of the step's loads
    inject_s: float = 0.0  # copies into vLLM's paged cache (on the client's thread)
    load_wait_s: float = 0.0  # vLLM's forward waiting for a layer to arrive
    gather_s: float = 0.0
    put_s: float = 0.0


class Store:
    """The kvstore side of one connector (``role``: "scheduler" or "worker")."""

    def __init__(self, config: ConnectorConfig, role: str) -> None:
        self.config = config
        self.role = role
        self.counters = Counters()
        self.spec: ModelSpec | None = None  # the namespace this side uses, once known
        self._client: Client | None = None
        self._lock = threading.Lock()

    def client(self) -> Client:
        with self._lock:
            if self._client is None:
                self._client = Client(
                    self.config.server,
                    token=self.config.token,
                    tls_ca=self.config.tls_ca,
                    timeout_s=self.config.timeout_s,
                )
            return self._client

    def open_segments(self) -> list[Segment]:
        """The client's open shared segments (where same-host fetches land), for the CUDA copies
        to register. Only on the client's thread, where they are opened and closed."""
        client = self._client
        return [] if client is None else client.same_host_segments

    def write_stats(self) -> None:
        if not self.config.stats_path:
            return
        folder = Path(self.config.stats_path)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{self.role}-{os.getpid()}.json"
        tmp = target.with_suffix(".tmp")
        state: dict[str, Any] = {"role": self.role, "pid": os.getpid(), **vars(self.counters)}
        if self.spec is not None:
            state["namespace"] = self.spec.to_dict()
        tmp.write_text(json.dumps(state))
        tmp.replace(target)  # a reader never sees half a file

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
