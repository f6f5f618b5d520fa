"""``kvstore bench``: load a running server with puts and fetches of random prompts that share a
prefix, verifying every block, and print throughput and latency per operation. The load
generator itself is ``kvstore.cli.loadgen``, imported when the command runs."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import click
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kvstore.cli.options import print_table, seconds_option, size, stderr, stdout
from kvstore.cli.remote import Remote, namespace, percent, remote_command
from kvstore.core.keys import ModelSpec

__all__ = ["BENCH_SPEC", "COMMANDS"]

# The default namespace is an 8B Llama's (32 layers, 8 KV heads of 128) with 64-token blocks:
# 8 MiB blocks.
BENCH_SPEC = ModelSpec(
    "kvstore/bench", num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16", block_tokens=64
)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


@click.command("bench")
@seconds_option("--duration", "duration_s", 10.0)
@click.option("--concurrency", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option(
    "--shared-prefix-tokens",
    type=click.IntRange(min=0),
    default=512,
    show_default=True,
    help="Leading tokens every prompt shares (what later prompts hit).",
)
@click.option("--seed", type=int, default=None, help="Seed of the prompts (default: random).")
@namespace(default=BENCH_SPEC)
@remote_command
def bench_command(
    remote: Remote,
    spec: ModelSpec,
    duration_s: float,
    concurrency: int,
    prompt_tokens: int,
    shared_prefix_tokens: int,
    seed: int | None,
) -> None:
    """Load a running server with puts and fetches of random prompts that share a prefix.

    Each worker fetches the leading hit of a prompt, checks every block bit for bit against the
    bytes it must hold, and puts the prompt when part of it was missing. The namespace defaults
    to an 8B Llama's with 64-token (8 MiB) blocks; any block size up to the server's G2 works.
    Exits 1 if any call failed or any block differed.
    """
    if shared_prefix_tokens > prompt_tokens:
        raise click.BadParameter(
            f"{shared_prefix_tokens} is more than --prompt-tokens {prompt_tokens}",
            param_hint="--shared-prefix-tokens",
        )
    if prompt_tokens < spec.block_tokens:
        raise click.BadParameter(
            f"{prompt_tokens} tokens make no full block of {spec.block_tokens}",
            param_hint="--prompt-tokens",
        )
    from kvstore.cli.loadgen import Bench, bench_doc

    seed = random.randrange(1 << 31) if seed is None else seed
    with remote.client() as kv:
        status = kv.health()
        if status != "SERVING":
            raise click.ClickException(f"kvstore at {remote.server} is {status}")
        bench = Bench(kv, spec, prompt_tokens, shared_prefix_tokens, seed)
        bench.warm_up()
        threads = [
            threading.Thread(target=bench.worker, args=(i,), name=f"bench-{i}", daemon=True)
            for i in range(concurrency)
        ]
        with Progress(
            TextColumn("bench"),
            BarColumn(),
            TextColumn("{task.fields[ops]} ops, {task.fields[errors]} errors"),
            TimeElapsedColumn(),
            console=stderr,
        ) as progress:
            task = progress.add_task("bench", total=duration_s, ops=0, errors=0)
            t0 = time.perf_counter()
            for thread in threads:
                thread.start()
            try:
                while (elapsed := time.perf_counter() - t0) < duration_s:
                    progress.update(
                        task, completed=elapsed, ops=bench.num_ops, errors=bench.num_errors
                    )
                    time.sleep(min(0.1, duration_s - elapsed))
            except KeyboardInterrupt:
                click.echo("interrupted: finishing the calls in flight", err=True)
            finally:
                bench.stop.set()
                for thread in threads:
                    thread.join()
            seconds = time.perf_counter() - t0
            progress.update(task, completed=duration_s, ops=bench.num_ops, errors=bench.num_errors)
    doc = bench_doc(bench, seconds, concurrency)
    if remote.as_json:
        remote.emit(doc)
    else:
        _print_bench(doc)
    if bench.num_errors:
        for line in bench.errors:
            click.echo(f"bench error: {line}", err=True)
        raise click.ClickException(
            f"{bench.num_errors} errors ({bench.mismatched_blocks} blocks differed)"
        )


def _print_bench(doc: dict[str, Any]) -> None:
    table = Table(title=f"kvstore bench: {doc['duration_s']:.1f} s, {doc['concurrency']} workers")
    table.add_column("op")
    for col in ("ops", "errors", "GB/s", "p50 ms", "p99 ms"):
        table.add_column(col, justify="right", no_wrap=True)
    for name, op in doc["by_op"].items():
        table.add_row(
            name,
            str(op["count"]),
            f"[red]{op['errors']}" if op["errors"] else "0",
            f"{op['gb_per_s']:.3f}",
            _ms(op["p50_ms"]),
            _ms(op["p99_ms"]),
        )
    table.add_section()
    errors = f"[red]{doc['errors']}" if doc["errors"] else "0"
    table.add_row("total", str(doc["ops"]), errors, "", "", "")
    print_table(table, stdout)
    ns = doc["namespace"]
    click.echo(
        f"prompts of {doc['prompt_tokens']} tokens, the first {doc['shared_prefix_tokens']} "
        f"shared; {size(doc['block_bytes'])} blocks of {ns['model_id']}"
    )
    click.echo(
        f"hit rate {percent(doc['hit_rate'])} of fetched tokens; "
        f"{doc['mismatched_blocks']} blocks differed from what was put"
    )


COMMANDS = (bench_command,)
