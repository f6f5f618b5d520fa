"""Time to first token in vLLM, 1K to 8K-token prompts: no connector (recompute), vLLM's
``ExampleConnector`` (safetensors files), and kvstore's ``KVStoreConnector`` (G2 hit, then G3 hit
after a service restart), in one run on one model.

    ~/.cache/kvstore/vllm-venv/bin/python -m benchmarks.vllm_ttft [--quick] [--repeats N]

The model is a randomly initialised Llama built here (see ``build_model``) with a word-level
tokenizer; prompts are random token ids. Each configuration is one vLLM engine process
(``benchmarks/vllm_ttft_engine.py``: float32, eager, prefix caching off, the whole prompt in one
step), run one after the other: no connector, ExampleConnector, kvstore, and no connector again
(the machine's load moves; speedups are against the faster of the two). TTFT is the wall time
of ``llm.generate`` of one prompt with ``max_tokens=1``, greedy.

With a connector every prompt is generated twice: a store pass over all prompts computes and
stores them (timed, not the TTFT of the table), then a load pass over all prompts loads every
full block but the one holding the last token, and is timed. For kvstore the service is then
restarted (same G3, G2 empty) and every prompt generated once more by the same engine: the G3
hit, loaded aside (``load_async`` "lower", the default: the request waits while its fetch runs).
A second kvstore engine with ``load_async`` "never" does the same after another restart: the G3
hit loaded within the step, layer by layer. The first no-connector engine caches prefixes (vLLM's
own) and generates every prompt a second time: the floor, the step of the last block alone on a
cached prefix, to which the table adds one memcpy of the hit's K/V (measured here). The first
token must be the same in every configuration. Writes ``benchmarks/vllm_ttft.png`` and prints
a Markdown table; raw results go to a temporary folder (printed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
BLOCK_SIZE = 32  # vLLM on CPU: a multiple of 32
LENGTHS = [1024, 2048, 4096, 8192]
MAX_MODEL_LEN = 8192 + 256
VOCAB = (4, 1000)  # token ids drawn from here: no special tokens
SHAPE = {
    "num_hidden_layers": 6,
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
}
CONFIGS = [
    "recompute",
    "recompute, again",
    "example",
    "kvstore G2",
    "kvstore G3",
    "kvstore G3, in step",
]
LABELS = {
    "recompute": "no connector (recompute), first engine",
    "recompute, again": "no connector (recompute), last engine",
    "example": "ExampleConnector (files)",
    "kvstore G2": "kvstore, G2 hit",
    "kvstore G3": "kvstore, G3 hit (loaded aside: load_async lower)",
    "kvstore G3, in step": "kvstore, G3 hit (in the step: load_async never)",
}


def build_model(folder: Path) -> Path:
    """A Llama of ``SHAPE`` with random weights and a word-level tokenizer, in ``folder``."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = sorted({f"w{rng.randrange(10**6)}" for _ in range(2000)})[:1000]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(
        vocab_size=len(words) + 16, special_tokens=["<unk>", "<s>", "</s>", "<pad>"]
    )
    tok.train_from_iterator([" ".join(words)], trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    fast.save_pretrained(folder)
    config = transformers.LlamaConfig(
        **SHAPE,
        vocab_size=tok.get_vocab_size(),
        max_position_embeddings=MAX_MODEL_LEN,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=0.1,  # the output depends on the context, not only the last token
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
    model.to(torch.float32).save_pretrained(folder, safe_serialization=True)
    return folder


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Service:
    """``kvstore serve`` with G2 (in memory) and G3 (LMDB in ``g3_path``); ``restart`` keeps the
    port and G3."""

    def __init__(self, g3_path: Path, log_path: Path) -> None:
        self.g3_path, self.log_path, self.port = g3_path, log_path, 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60) -> None:
        out = self.log_path.with_suffix(".out")
        out.write_text("")
        sets = [
            f"g3.path={self.g3_path}",
            "g2.capacity_bytes=4GiB",
        ]
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "kvstore.cli", "serve", "--listen", f"127.0.0.1:{self.port}"]
            + [a for s in sets for a in ("--set", s)],
            stdout=out.open("w"),
            stderr=self.log_path.open("a"),
            env=child_env(),
            cwd=REPO,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            for line in out.read_text().splitlines():
                if "serving on " in line:
                    self.port = int(line.split("serving on ", 1)[1].split()[0].rsplit(":", 1)[1])
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


class Engine:
    """``vllm_ttft_engine.py`` in a subprocess; ``run`` sends one round of prompts."""

    def __init__(
        self,
        folder: Path,
        model: Path,
        kv_transfer: dict[str, Any] | None,
        *,
        prefix_caching: bool = False,
    ) -> None:
        self.folder = folder
        folder.mkdir(parents=True)
        spec = {
            "model": str(model),
            "block_size": BLOCK_SIZE,
            "max_model_len": MAX_MODEL_LEN,
            "kv_transfer": kv_transfer,
            "prefix_caching": prefix_caching,
        }
        (folder / "spec.json").write_text(json.dumps(spec))
        self.log_path = folder / "engine.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [PYTHON, str(REPO / "benchmarks" / "vllm_ttft_engine.py"), str(folder)],
            stdin=subprocess.PIPE,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            text=True,
            env=child_env(),
            cwd=REPO,
        )
        self.round = 0

    def run(self, prompts: list[list[int]], timeout_s: float = 900) -> list[dict[str, Any]]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(prompts) + "\n")
        self.proc.stdin.flush()
        path = self.folder / f"round-{self.round}.json"
        deadline = time.monotonic() + timeout_s
        while not path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-40:])
                self.proc.kill()
                raise RuntimeError(f"engine failed or timed out ({self.log_path}):\n{tail}")
            time.sleep(0.05)
        self.round += 1
        data = json.loads(path.read_text())
        self.start_s = data["start_s"]
        results: list[dict[str, Any]] = data["results"]
        return results

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def make_prompts(lengths: list[int], repeats: int) -> list[tuple[int, int, list[int]]]:
    """``(repeat, length, token ids)``, fresh ids for every repeat and length."""
    out = []
    for r in range(repeats):
        for n in lengths:
            rng = random.Random(f"{r}-{n}")
            out.append((r, n, [rng.randrange(*VOCAB) for _ in range(n)]))
    return out


def expected_hit(n: int) -> int:
    """Tokens a connector loads: every full block but one holding the last token."""
    return (n - 1) // BLOCK_SIZE * BLOCK_SIZE


def run_all(lengths: list[int], repeats: int, work: Path, model: Path) -> dict[str, Any]:
    prompts = make_prompts(lengths, repeats)
    ids = [p for _, _, p in prompts]
    warm = [random.Random("warm").randrange(*VOCAB) for _ in range(lengths[0])]
    rows: dict[str, list[dict[str, Any]]] = {}
    stores: dict[str, list[dict[str, Any]]] = {}
    starts: dict[str, float] = {}

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def recompute(name: str, *, floor: bool = False) -> None:
        log(f"engine: no connector ({name})")
        engine = Engine(work / name.replace(" ", "-"), model, None, prefix_caching=floor)
        try:
            engine.run([warm])
            rows[name] = engine.run(ids)
            if floor:
                # The same prompts again: vLLM's own prefix cache holds every full block but
                # the last one's, so this is the step alone, with no K/V to bring in.
                rows["floor"] = engine.run(ids)
            starts[name] = engine.start_s
        finally:
            engine.close()

    # (a) no connector, first and last: the machine's load moves over a run. The first one
    # also measures the floor (the last block computed on vLLM's own cached prefix).
    recompute("recompute", floor=True)

    # (b) ExampleConnector: store pass, then load pass
    log("engine: ExampleConnector")
    files = work / "example-files"
    files.mkdir()
    engine = Engine(
        work / "example",
        model,
        {
            "kv_connector": "ExampleConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"shared_storage_path": str(files)},
        },
    )
    try:
        engine.run([warm, warm])
        stores["example"] = engine.run(ids)
        rows["example"] = engine.run(ids)
        starts["example"] = engine.start_s
    finally:
        engine.close()

    # (c) kvstore: store pass, load pass (G2), restart the service, load pass (G3); a second
    # engine loads G3 hits within the step instead of aside (another restart: G2 empty again)
    log("engine: KVStoreConnector")
    service = Service(work / "g3", work / "service.log")
    service.start()

    def kvstore_engine(name: str, **extra: Any) -> Engine:
        return Engine(
            work / name,
            model,
            {
                "kv_connector": "KVStoreConnector",
                "kv_connector_module_path": "client.vllm_connector",
                "kv_role": "kv_both",
                "kv_load_failure_policy": "recompute",
                "kv_connector_extra_config": {
                    "server": service.target,
                    "stats_path": str(work / f"{name}-stats"),
                    **extra,
                },
            },
        )

    try:
        engine = kvstore_engine("kvstore")
        try:
            engine.run([warm, warm])
            stores["kvstore"] = engine.run(ids)
            before = _phase_seconds(work / "kvstore-stats")
            rows["kvstore G2"] = engine.run(ids)
            after = _phase_seconds(work / "kvstore-stats")
            phases = {k: (after[k] - before.get(k, 0.0)) / len(ids) for k in after}
            log(
                "kvstore G2 load pass, connector seconds per prompt: "
                + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in phases.items())
            )
            log("restarting the kvstore service (G2 empty, G3 kept)")
            service.stop()
            service.start()
            rows["kvstore G3"] = engine.run([warm, *ids])[1:]
            starts["kvstore"] = engine.start_s
        finally:
            engine.close()
        log("engine: KVStoreConnector, load_async never; restarting the service (G2 empty)")
        engine = kvstore_engine("kvstore-in-step", load_async="never")
        try:
            service.stop()
            service.start()
            rows["kvstore G3, in step"] = engine.run([warm, *ids])[1:]
        finally:
            engine.close()
    finally:
        service.stop()
    recompute("recompute, again")

    for i, (r, n, _) in enumerate(prompts):
        tokens = {c: rows[c][i]["token"] for c in CONFIGS}
        tokens |= {f"{c} store": stores[c][i]["token"] for c in stores}
        assert len(set(tokens.values())) == 1, f"first token differs, repeat {r}, {n}: {tokens}"
        assert rows["recompute"][i]["num_cached_tokens"] == 0
        assert rows["recompute, again"][i]["num_cached_tokens"] == 0
        for c in CONFIGS[2:]:
            cached = rows[c][i]["num_cached_tokens"]
            assert cached == expected_hit(n), f"{c}, repeat {r}, {n} tokens: {cached} cached"
        assert rows["floor"][i]["num_cached_tokens"] == expected_hit(n)
        assert rows["floor"][i]["token"] == tokens["recompute"]
    return {
        "lengths": lengths,
        "repeats": repeats,
        "memcpy_ms": memcpy_ms(lengths),
        "prompts": [(r, n) for r, n, _ in prompts],
        "rows": rows,
        "stores": stores,
        "engine_start_s": starts,
        "shape": SHAPE,
    }


def memcpy_ms(lengths: list[int], repeats: int = 9) -> list[float]:
    """Median ms of one copy of a hit's K/V (``expected_hit(n)`` tokens of every layer) between
    two warm tensors, one thread: the copy every load has to make at least."""
    import torch

    per_token = 2 * SHAPE["num_hidden_layers"] * SHAPE["num_key_value_heads"] * SHAPE["head_dim"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = []
    try:
        for n in lengths:
            src = torch.rand(expected_hit(n) * per_token)
            dst = torch.zeros_like(src)
            times = []
            for _ in range(repeats):
                began = time.perf_counter()
                dst.copy_(src)
                times.append((time.perf_counter() - began) * 1000)
            out.append(statistics.median(times))
    finally:
        torch.set_num_threads(threads)
    return out


def _phase_seconds(folder: Path) -> dict[str, float]:
    """The connectors' summed ``*_s`` counters (scheduler and worker), from their stats files."""
    out: dict[str, float] = {}
    for path in sorted(folder.glob("*.json")):
        for key, value in json.loads(path.read_text()).items():
            if key.endswith("_s"):
                out[key] = out.get(key, 0.0) + float(value)
    return out


def medians(data: dict[str, Any], rows: dict[str, list[dict[str, Any]]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for c, results in rows.items():
        out[c] = [
            statistics.median(
                x["seconds"] * 1000
                for (_, m), x in zip(data["prompts"], results, strict=True)
                if m == n
            )
            for n in data["lengths"]
        ]
    return out


def table(data: dict[str, Any]) -> str:
    med = medians(data, data["rows"])
    store = medians(data, data["stores"])
    head = "| prompt tokens | loaded | " + " | ".join(LABELS[c] for c in CONFIGS)
    head += " | store pass: ExampleConnector | store pass: kvstore |"
    lines = [head, "|---:|---:|" + "---:|" * (len(CONFIGS) + 2)]
    for i, n in enumerate(data["lengths"]):
        # speedup against the faster of the two recompute engines
        base = min(med["recompute"][i], med["recompute, again"][i])
        cells = [f"{med[c][i]:,.0f} ms" for c in CONFIGS[:2]]
        cells += [f"{med[c][i]:,.0f} ms ({base / med[c][i]:.1f}×)" for c in CONFIGS[2:]]
        cells += [f"{store[c][i]:,.0f} ms" for c in ("example", "kvstore")]
        lines.append(f"| {n:,} | {expected_hit(n):,} | " + " | ".join(cells) + " |")
    # The targets: kvstore against ExampleConnector and against the floor, in the same run.
    lines += [
        "",
        "| prompt tokens | floor: last block on a cached prefix + memcpy of the hit | "
        "G2 hit / ExampleConnector | G3 hit / ExampleConnector (aside, in step) | "
        "G2 hit / floor | store pass: kvstore / ExampleConnector |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for i, n in enumerate(data["lengths"]):
        floor = med["floor"][i] + data["memcpy_ms"][i]
        example = med["example"][i]
        lines.append(
            f"| {n:,} | {med['floor'][i]:,.0f} + {data['memcpy_ms'][i]:.1f} = {floor:,.0f} ms | "
            f"{med['kvstore G2'][i] / example:.2f}× | {med['kvstore G3'][i] / example:.2f}×, "
            f"{med['kvstore G3, in step'][i] / example:.2f}× | "
            f"{med['kvstore G2'][i] / floor:.2f}× | "
            f"{store['kvstore'][i] / store['example'][i]:.2f}× |"
        )
    return "\n".join(lines)


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = medians(data, data["rows"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c, marker in zip(CONFIGS, "ovsD^x", strict=True):
        xs = [n for (_, n) in data["prompts"]]
        ys = [x["seconds"] * 1000 for x in data["rows"][c]]
        style = "--" if c == "recompute, again" else "-"
        line = ax.plot(data["lengths"], med[c], style, marker=marker, label=LABELS[c])[0]
        ax.scatter(xs, ys, s=10, color=line.get_color(), alpha=0.4)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(data["lengths"], [f"{n // 1024}K" for n in data["lengths"]])
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("time to first token (ms)")
    s = data["shape"]
    ax.set_title(
        f"vLLM TTFT, Llama {s['num_hidden_layers']}×{s['hidden_size']} fp32, 2 CPU cores "
        f"(median of {data['repeats']}, dots: each)",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1K and 2K tokens, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=REPO / "benchmarks" / "vllm_ttft.png")
    args = parser.parse_args()
    lengths = LENGTHS[:2] if args.quick else LENGTHS
    repeats = 1 if args.quick else args.repeats
    shape = "-".join(str(v) for v in SHAPE.values())
    model_dir = args.model_dir or Path.home() / ".cache" / "kvstore" / f"ttft-llama-{shape}"
    model = build_model(model_dir)
    work = Path(tempfile.mkdtemp(prefix="vllm-ttft-"))
    print(f"model {model}; work folder {work}", flush=True)
    began = time.monotonic()
    data = run_all(lengths, repeats, work, model)
    (work / "results.json").write_text(json.dumps(data, indent=1))
    print(f"\nraw results: {work / 'results.json'}; took {time.monotonic() - began:.0f} s")
    starts = {k: round(v, 1) for k, v in data["engine_start_s"].items()}
    print(f"engine start (s): {json.dumps(starts)}")
    print(table(data))
    if not args.quick:
        plot(data, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
