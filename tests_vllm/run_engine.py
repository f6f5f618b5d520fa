"""One vLLM engine in its own process: greedy generation over rounds of prompts, with or without
the kvstore connector; the results of each round as JSON.

    python tests_vllm/run_engine.py FOLDER

``FOLDER/spec.json``: ``model`` (folder), ``rounds`` (lists of prompts, each a list of token
ids), ``max_tokens``, ``block_size``, ``max_model_len`` and ``connector``
(``kv_connector_extra_config``, or null for plain vLLM; its counters go to ``FOLDER/stats``),
and optionally ``engine_args`` (more ``LLM`` arguments) and ``env`` (variables set before vLLM
is imported).
After round ``i`` the engine writes ``FOLDER/round-<i>.json`` (per prompt the generated token ids
and ``num_cached_tokens``, and the seconds taken) and reads one line of standard input before the
next round, so that the test can change the kvstore service in between. At the end of input it
exits.

A separate process per engine because that is what the tests are about: a second engine shares
nothing with the first but the kvstore service.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main(folder: Path) -> None:
    spec = json.loads((folder / "spec.json").read_text())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: the tiny model needs little
    os.environ.update(spec.get("env", {}))
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kv_transfer = None
    if spec["connector"] is not None:
        kv_transfer = KVTransferConfig(
            kv_connector="KVStoreConnector",
            kv_connector_module_path="client.vllm_connector",
            kv_role="kv_both",
            kv_load_failure_policy="recompute",
            kv_connector_extra_config={"stats_path": str(folder / "stats"), **spec["connector"]},
        )
    started = time.monotonic()
    llm = LLM(
        model=spec["model"],
        dtype="float32",
        block_size=spec["block_size"],
        max_model_len=spec["max_model_len"],
        enforce_eager=True,
        # Every cached token must come from kvstore: vLLM's own prefix cache would serve a
        # prompt from the blocks of the one before it in the same process.
        enable_prefix_caching=False,
        seed=0,
        kv_transfer_config=kv_transfer,
        **spec.get("engine_args", {}),
    )
    start_s = time.monotonic() - started
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
    for i, prompts in enumerate(spec["rounds"]):
        if i and not sys.stdin.readline():
            break
        began = time.monotonic()
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False
        )
        result = {
            "outputs": [list(o.outputs[0].token_ids) for o in outputs],
            "num_cached_tokens": [o.num_cached_tokens for o in outputs],
            "start_s": start_s,
            "generate_s": time.monotonic() - began,
        }
        tmp = folder / f"round-{i}.tmp"
        tmp.write_text(json.dumps(result))
        tmp.replace(folder / f"round-{i}.json")  # the test never reads half a file
    sys.stdin.readline()  # wait for the test to close our input: it may still read the stats


if __name__ == "__main__":
    main(Path(sys.argv[1]))
