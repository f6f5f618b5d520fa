"""The scheduler-side half of ``KVStoreConnector``: lookups, leases, and each step's metadata.

In the order vLLM calls it: ``on_new_request`` (remember the prompt), ``get_num_new_matched_tokens``
(the lookup, and a repair of holes aside when asked for), ``update_state_after_alloc`` (a lease on
the hit vLLM accepted), ``build_connector_meta`` (every step: loads and saves for the worker
side), ``update_connector_output`` (failed loads: save again once recomputed) and
``request_finished`` (forget, release). What each does is in ``client.vllm_connector``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from client.errors import NoWorkerError
from client.results import Lookup
from client.vllm.metadata import KVStoreConnectorMetadata, Transfer
from client.vllm.namespace import engine_namespace, request_extra_keys, shard_specs
from client.vllm.store import Store
from kvstore.core.errors import KVStoreError
from kvstore.core.keys import ExtraKey, ModelSpec

__all__ = ["SchedulerSide"]

# Under vLLM's logger, whose handler and format vLLM sets up in every process it starts (the
# engine core, the workers): a logger of our own would print nothing there below WARNING.
log = logging.getLogger(f"vllm.{__name__}")

# After a failed call, lookups are skipped for this long: a kvstore service that is down must
# not cost every new request the client's retries.
_DOWN_BACKOFF_S = 5.0
_MEMORY_TIERS = ("G1", "G2")


@dataclass
class _Request:
    """The scheduler side's view of one running request."""

    tokens: list[int]  # the prompt
    extra_keys: list[list[ExtraKey]] | None
    block_ids: list[int] = field(default_factory=list)
    stored_end: int = 0  # tokens known to be in kvstore (a loaded hit)
    saved: bool = False
    lease_ids: list[int] = field(default_factory=list)  # one per namespace (see ``_shards``)

    def transfer(self, req_id: str, start: int, end: int, *, async_load: bool = False) -> Transfer:
        """Tokens ``[start, end)`` of this request's prompt, in its blocks as they are now."""
        return Transfer(
            req_id,
            self.tokens[:end],
            start,
            end,
            list(self.block_ids),
            self.extra_keys,
            async_load=async_load,
        )


class SchedulerSide:
    """The connector in vLLM's scheduler process; ``store`` is the connector's."""

    def __init__(self, store: Store, vllm_config: Any, transfer: Any) -> None:
        self._store = store
        self._config = store.config
        self._counters = store.counters
        self._block_size = int(vllm_config.cache_config.block_size)
        self._load_enabled = bool(transfer.is_kv_consumer)
        self._save_enabled = bool(transfer.is_kv_producer)
        self._down_until = 0.0
        # Derived here (hashing the weights) and shipped to the worker side in the metadata, so
        # that the workers need not hash them again.
        self._spec = store.spec = engine_namespace(vllm_config, self._config)
        world = int(vllm_config.parallel_config.tensor_parallel_size)
        self._shards = shard_specs(self._spec, world)  # the ranks' namespaces
        log.info(
            "KVStoreConnector: kvstore %s, namespace %s%s",
            self._config.server,
            self._spec,
            f", one per tensor-parallel head slice: {[s.model_id for s in self._shards]}"
            if len(self._shards) > 1
            else "",
        )
        if self._load_enabled and transfer.kv_load_failure_policy != "recompute":
            log.warning(
                "KVStoreConnector: kv_load_failure_policy=%r fails a request whose blocks "
                "vanish between lookup and load; 'recompute' recomputes them instead",
                transfer.kv_load_failure_policy,
            )
        self._requests: dict[str, _Request] = {}
        # req_id -> (local computed, hit end, load asynchronously)
        self._matched: dict[str, tuple[int, int, bool]] = {}
        self._pending_loads: dict[str, tuple[int, int, bool]] = {}  # req_id -> (start, end, async)
        self._repairs: dict[str, Future[int]] = {}  # req_id -> the hit once holes are filled
        self._repairer: ThreadPoolExecutor | None = None

    def close(self) -> None:
        if self._repairer is not None:
            self._repairer.shutdown(wait=False, cancel_futures=True)

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """Tokens beyond ``num_computed_tokens`` (vLLM's own hit) that kvstore can supply."""
        self._matched.pop(request.request_id, None)
        spec = self._spec
        tokens = request.prompt_token_ids
        if (
            not self._load_enabled
            or tokens is None
            or getattr(request, "mm_features", None)
            or time.monotonic() < self._down_until
        ):
            return 0, False
        # Never the last prompt token: vLLM computes at least one token to sample from.
        limit = (len(tokens) - 1) // spec.block_tokens * spec.block_tokens
        if limit <= num_computed_tokens:
            return 0, False
        # The lookup covers every full block, the last one too: when kvstore has them all, the
        # request's save after its prefill is skipped (it would store nothing new).
        full = len(tokens) // spec.block_tokens * spec.block_tokens
        prompt = list(tokens[:full])
        extra_keys = request_extra_keys(request, full // spec.block_tokens)
        repair = self._repairs.get(request.request_id)
        founds: list[Lookup] = []  # one per rank's namespace (none after a repair)
        if repair is not None:
            if not repair.done():
                return None, False  # vLLM asks again at its next step
            del self._repairs[request.request_id]
            hit = repair.result()
        else:
            self._counters.lookups += 1
            started = time.perf_counter()
            try:
                # Every rank's heads must be there: the hit is the shortest of them.
                kv = self._store.client()
                founds = [kv.lookup(s, prompt, extra_keys=extra_keys) for s in self._shards]
                found = min(founds, key=lambda f: f.hit_tokens)
            except KVStoreError as exc:
                self._counters.lookup_errors += 1
                self._down_until = time.monotonic() + _DOWN_BACKOFF_S
                log.warning(
                    "KVStoreConnector: lookup failed, no hits for %.0f s: %s", _DOWN_BACKOFF_S, exc
                )
                self._store.write_stats()
                return 0, False
            hit = found.hit_tokens
            self._counters.lookup_s += time.perf_counter() - started
            if self._config.repair_holes and found.holes:
                # The model worker's time must not stall the scheduler (every running request
                # waits on it): the repair runs aside, and this request waits for it alone.
                self._repairs[request.request_id] = self._repair_pool().submit(
                    self._repair, spec, prompt, extra_keys, hit
                )
                return None, False
        self._counters.lookup_hit_tokens += hit
        state = self._requests.get(request.request_id)
        if state is not None:
            state.stored_end = max(state.stored_end, hit)
        hit = min(hit, limit)
        if hit <= num_computed_tokens:
            self._store.write_stats()
            return 0, False
        mode = self._config.load_async
        first, last = num_computed_tokens // spec.block_tokens, hit // spec.block_tokens
        slow = any(t not in _MEMORY_TIERS for f in founds for t in f.tiers[first:last])
        load_async = mode == "always" or (mode == "lower" and slow)
        self._matched[request.request_id] = (num_computed_tokens, hit, load_async)
        self._counters.matched_tokens += hit - num_computed_tokens
        self._store.write_stats()
        return hit - num_computed_tokens, load_async

    def _repair(
        self,
        spec: ModelSpec,
        prompt: list[int],
        extra_keys: list[list[ExtraKey]] | None,
        hit: int,
    ) -> int:
        """Have the service's model worker fill the holes; the new leading hit in tokens, or
        ``hit`` (the one before the holes) when the repair fails."""
        try:
            result = self._store.client().repair(spec, prompt, extra_keys=extra_keys)
        except NoWorkerError as exc:
            log.warning("KVStoreConnector: holes not repaired (no model worker): %s", exc)
            return hit
        except KVStoreError as exc:
            log.warning("KVStoreConnector: repair failed: %s", exc)
            return hit
        self._counters.repairs += 1
        self._counters.repaired_blocks += len(result.repaired)
        return result.hit_blocks * spec.block_tokens

    def _repair_pool(self) -> ThreadPoolExecutor:
        if self._repairer is None:
            self._repairer = ThreadPoolExecutor(2, thread_name_prefix="kvstore-repair")
        return self._repairer

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        req_id = request.request_id
        matched = self._matched.pop(req_id, None)
        if num_external_tokens <= 0 or matched is None:
            return
        _, end, load_async = matched
        start = end - num_external_tokens
        state = self._requests.get(req_id)
        if state is None:
            return
        if load_async:
            # The request is not scheduled until the load is done: its blocks are known now.
            state.block_ids = list(blocks.get_block_ids()[0])
        self._pending_loads[req_id] = (start, end, load_async)
        state.stored_end = max(state.stored_end, end)
        # Hold the blocks until the worker has read them (or the TTL passes): an eviction in
        # between would turn the hit into a recompute.
        started = time.perf_counter()
        for lease_id in state.lease_ids:
            self._release(lease_id)
        state.lease_ids = []
        for shard in self._shards:
            with contextlib.suppress(KVStoreError):
                lease = self._store.client().reserve(
                    shard,
                    state.tokens[:end],
                    num_blocks=end // shard.block_tokens,
                    ttl_s=self._config.lease_ttl_s,
                    extra_keys=state.extra_keys,
                )
                state.lease_ids.append(lease.lease_id)
        self._counters.reserve_s += time.perf_counter() - started

    def on_new_request(self, request: Any) -> None:
        """Track a request whose K/V depends on its token ids alone (and on the extra keys)."""
        tokens = request.prompt_token_ids
        if tokens is None or getattr(request, "mm_features", None):
            return
        num_blocks = len(tokens) // self._spec.block_tokens
        self._requests[request.request_id] = _Request(
            list(tokens), request_extra_keys(request, num_blocks)
        )

    def _release(self, lease_id: int) -> None:
        with contextlib.suppress(KVStoreError):
            self._store.client().release(lease_id)

    def build_connector_meta(self, scheduler_output: Any) -> KVStoreConnectorMetadata:
        meta = KVStoreConnectorMetadata()
        spec = self._spec
        scheduled = scheduler_output.num_scheduled_tokens
        steps: list[tuple[str, int]] = []  # (req_id, tokens computed by the end of this step)
        for new in scheduler_output.scheduled_new_reqs:
            if new.prompt_token_ids is None:
                continue
            state = self._requests.get(new.req_id)
            if state is None:
                continue  # not one of ours (see on_new_request)
            state.block_ids = list(new.block_ids[0])
            steps.append((new.req_id, new.num_computed_tokens + scheduled.get(new.req_id, 0)))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._requests.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                # Preempted and back: its blocks were freed, these replace them; the prompt is
                # computed again, so its blocks are saved again (repeats are free in kvstore).
                state.block_ids = list(new_ids[0]) if new_ids is not None else []
                state.saved = False
            elif new_ids is not None:
                state.block_ids.extend(new_ids[0])
            steps.append((req_id, cached.num_computed_tokens[i] + scheduled.get(req_id, 0)))
        # Async loads first: their requests wait aside, so none of them is in ``steps``.
        for req_id, (start, end, load_async) in list(self._pending_loads.items()):
            state = self._requests.get(req_id)
            if load_async and state is not None:
                del self._pending_loads[req_id]
                meta.loads.append(state.transfer(req_id, start, end, async_load=True))
        for req_id, computed in steps:
            state = self._requests[req_id]
            load = self._pending_loads.pop(req_id, None)
            if load is not None:
                start, end, _ = load
                meta.loads.append(state.transfer(req_id, start, end))
            if not self._save_enabled or state.saved:
                continue
            full = len(state.tokens) // spec.block_tokens * spec.block_tokens
            if computed < full:
                continue  # chunked prefill: save once, at the chunk that completes the prompt
            state.saved = True
            if full > state.stored_end:
                meta.saves.append(state.transfer(req_id, state.stored_end, full))
        # Loads whose request was not scheduled after all (allocation raced): nothing to do.
        self._pending_loads.clear()
        if meta.loads or meta.saves:
            meta.spec = spec.to_dict()
        return meta

    def update_connector_output(self, connector_output: Any) -> None:
        """Blocks that failed to load are recomputed by vLLM: save the prompt again once they
        are (the service dropped what it could not serve, so it lacks them now)."""
        invalid = connector_output.invalid_block_ids
        if not invalid:
            return
        for state in self._requests.values():
            for i, block in enumerate(state.block_ids):
                if block in invalid:
                    state.stored_end = min(state.stored_end, i * self._block_size)
                    state.saved = False
                    break

    def request_finished(
        self, request: Any, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        state = self._requests.pop(request.request_id, None)
        self._matched.pop(request.request_id, None)
        self._pending_loads.pop(request.request_id, None)
        self._repairs.pop(request.request_id, None)  # a repair still running stores all the same
        for lease_id in state.lease_ids if state is not None else ():
            self._release(lease_id)
        return False, None

    # -- worker side ---------------------------------------------------------------------------
