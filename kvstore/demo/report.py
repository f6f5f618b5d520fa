"""The printout of ``kvstore demo``: the model, store and scenario, a table of the turns (prefill
with and without kvstore, hit rate, whether the answers match) and one of the hole section."""

from __future__ import annotations

from rich import box
from rich.console import Console, JustifyMethod
from rich.table import Table

from kvstore.demo.results import DemoResult, HoleRepair

__all__ = ["print_result", "repair_table", "turns_table"]


def _yes(ok: bool) -> str:
    return "[green]yes" if ok else "[bold red]NO"


def _table(title: str, columns: list[tuple[str, JustifyMethod]]) -> Table:
    # No rules between columns and no edges: the turns' ten columns then fit 80 characters.
    table = Table(
        title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True
    )
    for name, justify in columns:
        table.add_column(name, justify=justify)
    return table


def turns_table(result: DemoResult) -> Table:
    table = _table(
        "Prefill per turn, up to the first token: without kvstore and with it",
        [
            ("turn", "right"),
            ("prompt\ntokens", "right"),
            ("hit\ntokens", "right"),
            ("hit %", "right"),
            ("without\nms", "right"),
            ("with\nms", "right"),
            ("of it\nread ms", "right"),
            ("speedup", "right"),
            ("blocks\nstored", "right"),
            ("same\ntokens", "center"),
        ],
    )
    for t in result.turns:
        table.add_row(
            str(t.turn),
            str(t.prompt_tokens),
            str(t.hit_tokens),
            f"{100 * t.hit_rate:.1f}",
            f"{t.prefill_ms_without:.0f}",
            f"{t.prefill_ms_with:.0f}",
            f"{t.load_ms:.0f}",
            f"{t.speedup:.1f}x",
            str(t.stored_blocks),
            _yes(t.identical),
        )
    return table


def repair_table(repair: HoleRepair) -> Table:
    table = _table(
        f"A hole at block {repair.hole}: recompute from it, or repair it",
        [
            ("path", "left"),
            ("tokens\ncomputed", "right"),
            ("ms", "right"),
            ("speedup", "right"),
            ("same\ntokens", "center"),
        ],
    )
    rows = [
        ("without kvstore", len(repair.prompt), repair.scratch_ms, "reference"),
        (
            "recompute from the hole",
            repair.recompute_tokens,
            repair.recompute_ms,
            _yes(repair.answer_recompute == repair.answer_scratch),
        ),
        (
            "repair the hole, then read",
            repair.repaired_tokens,
            repair.repair_ms + repair.after_repair_ms,
            _yes(repair.answer_repaired == repair.answer_scratch),
        ),
    ]
    for path, tokens, ms, same in rows:
        table.add_row(path, str(tokens), f"{ms:.0f}", f"{repair.scratch_ms / ms:.1f}x", same)
    return table


def print_result(console: Console, result: DemoResult) -> None:
    opts = result.options
    found = f"; {result.blocks_at_open} blocks found in G3" if result.blocks_at_open else ""
    console.print(f"[bold]model[/]     {result.model}")
    console.print(
        f"[bold]store[/]     {' + '.join(result.tiers)}; {opts.block_tokens} tokens per block "
        f"({result.spec.block_nbytes / 1024:.0f} KiB){found}"
    )
    console.print(
        f"[bold]scenario[/]  a shared document of {opts.doc_tokens} tokens, then {opts.turns} "
        f"turns; each appends a {opts.question_tokens}-token question to the conversation so "
        f"far and the model answers {opts.answer_tokens} tokens (greedy). There is no tokenizer "
        f"offline: the token ids come from a generator seeded with {opts.seed}, and the answers "
        "are token ids, not words."
    )
    console.print(
        "[dim]without: the whole prompt from scratch. with: lookup + read of the stored prefix "
        "+ prefill of the rest. same tokens: the two answers are identical.[/]"
    )
    console.print(turns_table(result))
    r = result.repair
    if r is not None:
        after = r.stored_blocks - r.hole - 1
        console.print(
            f"Evicted block {r.hole} of the {r.stored_blocks} stored blocks of the conversation: "
            f"lookup reports holes {r.holes_reported} and a leading hit of "
            f"{r.hit_tokens_with_hole} tokens.\n"
            f"- recompute from the hole: read {r.hit_tokens_with_hole} tokens, prefill the "
            f"{r.recompute_tokens} after them.\n"
            f"- repair: ModelWorker.repair computed blocks {r.repaired} "
            f"({len(r.repaired) * r.block_tokens} tokens) in {r.repair_ms:.0f} ms, keeping the "
            f"{after} blocks after the hole; then read {r.hit_tokens_after_repair} tokens and "
            f"prefill the {len(r.prompt) - r.hit_tokens_after_repair} after them."
        )
        console.print(repair_table(r))
    elif opts.repair:
        console.print("[yellow]No hole section: fewer than 3 blocks were stored.")
    blocks = ", ".join(f"{name} {n}" for name, n in result.tier_blocks.items())
    console.print(f"Blocks held at the end: {blocks}. Ran in {result.elapsed_s:.1f} s.")
    if result.identical:
        console.print("[green]Generated tokens are identical with and without kvstore.")
    else:
        console.print("[bold red]Generated tokens DIFFER with and without kvstore.")


