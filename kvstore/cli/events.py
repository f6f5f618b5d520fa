"""``kvstore events``: tail a server's Watch stream, one line (or one JSON object) per event,
until ``--count`` events, ``--idle-timeout`` of silence or Ctrl-C."""

from __future__ import annotations

import json
import queue
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

import click

from kvstore.cli.options import seconds_option
from kvstore.cli.remote import Remote, hex_or_none, remote_command

if TYPE_CHECKING:
    from client.results import Event

__all__ = ["COMMANDS"]


def _event_line(event: Event) -> str:
    kind = event.kind + ("*" if event.snapshot else "")
    line = (
        f"{event.seq:>10}  {kind:<8} {event.tier or '-':<3} {event.from_tier or '-':<3} "
        f"{event.block_hash.hex()}"
    )
    return f"{line}  {event.reason}" if event.reason else line


def _event_doc(event: Event) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "kind": event.kind,
        "tier": event.tier,
        "from": event.from_tier,
        "hash": event.block_hash.hex(),
        "parent": hex_or_none(event.parent_hash),
        "namespace": event.namespace_fingerprint.hex(),
        "time_s": event.time_s,
        "snapshot": event.snapshot,
        "reason": event.reason,
    }


# A tail that has seen nothing for this long says on stderr that it is waiting, once.
_WAITING_NOTICE_S = 1.0


@click.command("events")
@click.option(
    "--after",
    "after_seq",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    metavar="SEQ",
    help="Resume after this sequence number (0: from now).",
)
@click.option(
    "--count",
    type=click.IntRange(min=0),
    default=0,
    help="Stop after this many events (default: run until Ctrl-C).",
)
@seconds_option(
    "--idle-timeout",
    "idle_timeout_s",
    None,
    help="Stop once no event has come for this long (default: wait for ever).",
)
@click.option(
    "--snapshot",
    is_flag=True,
    help="Also print the snapshot of what is stored that the server sends first (kind marked *).",
)
@remote_command
def events_command(
    remote: Remote, after_seq: int, count: int, idle_timeout_s: float | None, snapshot: bool
) -> None:
    """Tail the server's events: one line per event (seq, kind, tier, from, hash).

    With --json, one JSON object per line. A watch that starts at 0, or resumes after events the
    server no longer keeps, begins with a snapshot of what is stored; it is skipped unless
    --snapshot is given. On a quiet server the tail says on stderr that it waits; --count,
    --idle-timeout or Ctrl-C end it.
    """
    # Ctrl-C (and SIGTERM) end the tail even where the process inherited SIGINT ignored, as a
    # command started in the background of a shell does: Python then installs no handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    seen = 0
    gap_noted = False
    waiting_noted = False
    last_seq = after_seq
    with remote.client() as kv:
        # The stream is read on a thread of its own so that this one can notice silence (a
        # blocking iterator cannot say "nothing yet"); the thread ends with the client.
        inbox: queue.Queue[Event | BaseException | None] = queue.Queue()

        def read() -> None:
            try:
                for event in kv.watch(after_seq):
                    inbox.put(event)
                inbox.put(None)
            except BaseException as exc:  # handed to the main thread, which reports it
                inbox.put(exc)

        threading.Thread(target=read, name="kvstore-events", daemon=True).start()
        idle_since = time.monotonic()
        try:
            while not (count and seen >= count):
                wait_s = _WAITING_NOTICE_S if not waiting_noted else 0.5
                if idle_timeout_s is not None:
                    wait_s = min(wait_s, max(0.0, idle_since + idle_timeout_s - time.monotonic()))
                try:
                    item = inbox.get(timeout=wait_s)
                except queue.Empty:
                    idle_s = time.monotonic() - idle_since
                    if idle_timeout_s is not None and idle_s >= idle_timeout_s:
                        click.echo(
                            f"no event for {idle_timeout_s:g} s after seq {last_seq}; stopping",
                            err=True,
                        )
                        break
                    if not waiting_noted and idle_s >= _WAITING_NOTICE_S:
                        waiting_noted = True
                        how = "Ctrl-C stops"
                        if count:
                            how = f"{count - seen} more to go; Ctrl-C stops"
                        click.echo(
                            f"waiting for events after seq {last_seq} on {remote.server} ({how})",
                            err=True,
                        )
                    continue
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                idle_since = time.monotonic()
                last_seq = max(last_seq, item.seq)
                if item.snapshot and not snapshot:
                    if after_seq and not gap_noted:
                        gap_noted = True
                        click.echo(
                            f"events after {after_seq} are no longer kept by the server; it "
                            "resent a snapshot (--snapshot prints it)",
                            err=True,
                        )
                    continue
                click.echo(json.dumps(_event_doc(item)) if remote.as_json else _event_line(item))
                seen += 1
        except KeyboardInterrupt:
            pass  # Ctrl-C is how a tail without --count ends


COMMANDS = (events_command,)
