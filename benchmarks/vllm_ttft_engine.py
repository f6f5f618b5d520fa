"""One vLLM engine of ``benchmarks/vllm_ttft.py`` in its own process.

    python benchmarks/vllm_ttft_engine.py FOLDER

``FOLDER/spec.json``: ``model``, ``block_size``, ``max_model_len``, ``kv_transfer``
(``KVTransferConfig`` keyword arguments, or null for plain vLLM) and ``prefix_caching``
(vLLM's own, default false). Each line of standard input is
one round, a JSON list of prompts (token ids); every prompt is generated on its own, greedy, one
token, and timed. The round's results go to ``FOLDER/round-<i>.json``: per prompt the seconds
``llm.generate`` took, the token and ``num_cached_tokens``. At the end of input the engine exits.
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
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kv_transfer = None
    if spec["kv_transfer"] is not None:
        kv_transfer = KVTransferConfig(**spec["kv_transfer"])
    started = time.monotonic()
    llm = LLM(
        model=spec["model"],
        dtype="float32",
        block_size=spec["block_size"],
        max_model_len=spec["max_model_len"],
        # the whole prompt in one step, so that a prompt is one forward pass whatever its length
        max_num_batched_tokens=spec["max_model_len"],
        max_num_seqs=4,
        enforce_eager=True,
        # a hit comes from the connector or not at all; the floor's engine caches prefixes
        enable_prefix_caching=bool(spec.get("prefix_caching", False)),
        seed=0,
        kv_transfer_config=kv_transfer,
    )
    start_s = time.monotonic() - started
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    for i, line in enumerate(sys.stdin):
        prompts = json.loads(line)
        results = []
        for p in prompts:
            began = time.perf_counter()
            out = llm.generate([TokensPrompt(prompt_token_ids=p)], params, use_tqdm=False)[0]
            seconds = time.perf_counter() - began
            results.append(
                {
                    "seconds": seconds,
                    "token": out.outputs[0].token_ids[0],
                    "num_cached_tokens": out.num_cached_tokens,
                }
            )
        tmp = folder / f"round-{i}.tmp"
        tmp.write_text(json.dumps({"start_s": start_s, "results": results}))
        tmp.replace(folder / f"round-{i}.json")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
