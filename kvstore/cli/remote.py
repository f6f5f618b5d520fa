"""What every command that talks to a running server shares: the connection options and the
``Remote`` they become, the namespace options, block hashes and tier names as arguments, and
the formatting of blocks.

Every such command takes ``--server HOST:PORT``, ``--token``, ``--tls-ca``, ``--timeout`` (also
from ``KVSTORE_SERVER``, ``KVSTORE_TOKEN``, ``KVSTORE_TLS_CA``, ``KVSTORE_TIMEOUT``) and ``--json``
(one JSON document on stdout instead of rich tables). Failures the client reports
(``KVStoreError``) become one line on stderr and exit status 1; usage errors exit 2, as click
does.

The client is imported when a command connects, not when the CLI starts: ``client`` imports
torch, and ``kvstore ls --help`` (or a usage error) should not wait for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import click
from rich.table import Table

from kvstore.cli.options import CONNECT_OPTIONS, bundle, one_line, seconds_option
from kvstore.core.errors import KVStoreError
from kvstore.core.keys import DIGEST_BYTES, DTYPES, BlockHash, ModelSpec

if TYPE_CHECKING:
    from client import Client
    from client.errors import ServiceUnavailableError
    from client.results import BlockInfo

__all__ = [
    "TIERS",
    "Remote",
    "block_doc",
    "closing",
    "hash_column",
    "hash_of",
    "hashes_callback",
    "hex_or_none",
    "namespace",
    "percent",
    "rate",
    "remote_command",
    "short",
    "tier_option",
]

TIERS = ("G1", "G2", "G3", "G4")


@dataclass(frozen=True, slots=True)
class Remote:
    """Where the server is and how to talk to it: the options every command here shares."""

    server: str
    token: str | None
    tls_ca: str | None
    timeout_s: float
    as_json: bool

    @contextlib.contextmanager
    def client(self) -> Iterator[Client]:
        """A connected ``Client``; every ``KVStoreError`` leaves as a one-line click error."""
        from client.errors import AuthError, ServiceUnavailableError

        try:
            with self._client() as kv:
                yield kv
        except ServiceUnavailableError as exc:
            raise click.ClickException(self._unavailable(exc)) from None
        except AuthError as exc:
            what = "permission denied" if exc.code == "PERMISSION_DENIED" else "not authenticated"
            raise click.ClickException(
                f"kvstore at {self.server}: {what}: {one_line(str(exc))}"
            ) from None
        except KVStoreError as exc:
            raise click.ClickException(one_line(str(exc))) from None

    def _client(self, **overrides: Any) -> Client:
        from client import Client

        options: dict[str, Any] = {"token": self.token, "timeout_s": self.timeout_s}
        if self.tls_ca is not None:
            options["tls_ca"] = self.tls_ca
        return Client(self.server, **(options | overrides))

    def _unavailable(self, exc: ServiceUnavailableError) -> str:
        # UNAVAILABLE means either "no server there" or "the server is up but a tier behind it
        # is down"; the status code alone cannot tell them apart, and its text is no API. The
        # health service answers without touching any tier: ask it, once, without retries.
        detail = one_line(str(exc)).removeprefix(f"{self.server}: ")
        try:
            with self._client(retries=0, timeout_s=min(self.timeout_s, 3.0)) as probe:
                probe.health()
        except KVStoreError:
            return f"cannot reach kvstore at {self.server}: {detail}"
        return f"kvstore at {self.server} is unavailable: {detail}"

    def emit(self, document: Any) -> None:
        click.echo(json.dumps(document, indent=2))

    def report(self, document: Any, line: str) -> None:
        """A command's result: ``document`` with ``--json``, else one line of text."""
        if self.as_json:
            self.emit(document)
        else:
            click.echo(line)


_REMOTE_OPTIONS = (
    *CONNECT_OPTIONS,
    seconds_option(
        "--timeout",
        "timeout_s",
        10.0,
        envvar="KVSTORE_TIMEOUT",
        help="Limit for each call to the server.",
    ),
    click.option(
        "--json", "as_json", is_flag=True, help="Print one JSON document instead of tables."
    ),
)


def remote_command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add the connection options; the command gets them as one ``Remote`` first argument."""

    @functools.wraps(fn)
    def command(*args: Any, remote: Remote, **kwargs: Any) -> Any:
        # An empty token (--token '' or KVSTORE_TOKEN=) is no token.
        return fn(dataclasses.replace(remote, token=remote.token or None), *args, **kwargs)

    decorated: Callable[..., Any] = bundle("remote", Remote, _REMOTE_OPTIONS)(command)
    return decorated



# -- namespace, hashes and tiers as arguments ------------------------------------------------


_SPEC_FIELDS = {
    "model": "--model",
    "layers": "--layers",
    "kv_heads": "--kv-heads",
    "head_dim": "--head-dim",
    "dtype": "--dtype",
}
_SPEC_OPTIONS = (
    click.option(
        "--model-spec",
        "model_spec",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        metavar="SPEC.json",
        help='The namespace as JSON: {"model_id": ..., "num_layers": ..., "num_kv_heads": ..., '
        '"head_dim": ..., "dtype": ..., "block_tokens": ..., "revision": ..., '
        '"tokenizer_id": ...}.',
    ),
    click.option("--model", default=None, metavar="MODEL_ID", help="Or give it field by field."),
    click.option("--layers", type=click.IntRange(min=1), default=None, metavar="N"),
    click.option("--kv-heads", type=click.IntRange(min=1), default=None, metavar="N"),
    click.option("--head-dim", type=click.IntRange(min=1), default=None, metavar="N"),
    click.option("--dtype", type=click.Choice(sorted(DTYPES)), default=None),
    click.option(
        "--block-tokens",
        type=click.IntRange(min=1),
        default=None,
        help="Tokens per block (default 256, as ModelSpec).",
    ),
    click.option("--revision", default=None, help="Weights revision (default empty)."),
    click.option("--tokenizer-id", default=None, help="Tokenizer id (default empty)."),
)


# The parameters of _SPEC_OPTIONS, in the order _spec_from takes them.
_SPEC_PARAMS = (
    "model_spec",
    "model",
    "layers",
    "kv_heads",
    "head_dim",
    "dtype",
    "block_tokens",
    "revision",
    "tokenizer_id",
)


def _spec_from(
    model_spec: Path | None,
    model: str | None,
    layers: int | None,
    kv_heads: int | None,
    head_dim: int | None,
    dtype: str | None,
    block_tokens: int | None,
    revision: str | None,
    tokenizer_id: str | None,
    *,
    default: ModelSpec | None,
) -> ModelSpec:
    given = {
        "model": model,
        "layers": layers,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "dtype": dtype,
        "block_tokens": block_tokens,
        "revision": revision,
        "tokenizer_id": tokenizer_id,
    }
    if model_spec is not None:
        if any(v is not None for v in given.values()):
            raise click.UsageError("give the namespace with --model-spec or with --model, not both")
        try:
            data = json.loads(model_spec.read_text())
            if not isinstance(data, dict):
                raise click.BadParameter("must hold a JSON object", param_hint="--model-spec")
            return ModelSpec.from_dict(data)
        except (OSError, ValueError, TypeError, KVStoreError) as exc:
            raise click.BadParameter(
                f"{model_spec}: {one_line(str(exc))}", param_hint="--model-spec"
            ) from None
    if all(v is None for v in given.values()):
        if default is not None:
            return default
        raise click.UsageError(
            "this command needs the namespace: --model-spec SPEC.json, or --model MODEL_ID "
            "--layers N --kv-heads N --head-dim N --dtype D [--block-tokens N]"
        )
    missing = [flag for name, flag in _SPEC_FIELDS.items() if given[name] is None]
    if missing:
        raise click.UsageError(f"--model also needs {', '.join(missing)}")
    try:
        return ModelSpec(
            cast(str, model),
            num_layers=cast(int, layers),
            num_kv_heads=cast(int, kv_heads),
            head_dim=cast(int, head_dim),
            dtype=cast(str, dtype),
            block_tokens=block_tokens or 256,
            revision=revision or "",
            tokenizer_id=tokenizer_id or "",
        )
    except KVStoreError as exc:
        raise click.UsageError(str(exc)) from None


def namespace(*, default: ModelSpec | None = None) -> Callable[[Callable[..., Any]], Any]:
    """Add the namespace options; the command gets a ``spec: ModelSpec`` keyword (``default``
    when none is given, a usage error when there is no default)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            given = {name: kwargs.pop(name) for name in _SPEC_PARAMS}
            return fn(*args, spec=_spec_from(**given, default=default), **kwargs)

        decorated: Callable[..., Any] = command
        for option in reversed(_SPEC_OPTIONS):
            decorated = option(decorated)
        return decorated

    return decorate


def hash_of(value: str) -> BlockHash:
    try:
        raw = bytes.fromhex(value.strip())
    except ValueError:
        raw = b""
    if len(raw) != DIGEST_BYTES:
        raise click.BadParameter(f"{value!r} is not a block hash ({2 * DIGEST_BYTES} hex digits)")
    return BlockHash(raw)


def hashes_callback(ctx: click.Context, param: click.Parameter, values: Any) -> Any:
    # A callback rather than a click.ParamType subclass: ParamType is generic only from click
    # 8.2 on, and we support 8.1.
    if isinstance(values, str):
        return hash_of(values)
    return tuple(hash_of(v) for v in values)


def _tier(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    # Not click.Choice(case_sensitive=False): its error lists the choices lower-cased
    # ("'G9' is not one of 'g1', 'g2', ..."), which are not the names anything else shows.
    if value is None:
        return None
    name = value.strip().upper()
    if name not in TIERS:
        raise click.BadParameter(f"{value!r} is not a tier; use one of {', '.join(TIERS)}")
    return name


tier_option = click.option(
    "--tier",
    default=None,
    callback=_tier,
    metavar="|".join(TIERS),
    help="Only this tier (default: every tier).",
)


def hex_or_none(value: bytes | None) -> str | None:
    return None if value is None else value.hex()


def short(value: bytes | None) -> str:
    return "-" if value is None else value.hex()[:8]


def rate(hits: int, misses: int) -> float | None:
    return hits / (hits + misses) if hits + misses else None


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def hash_column(table: Table, name: str = "hash") -> None:
    table.add_column(name, no_wrap=True, min_width=2 * DIGEST_BYTES)


def block_doc(info: BlockInfo) -> dict[str, Any]:
    return {
        "hash": info.block_hash.hex(),
        "parent": hex_or_none(info.parent_hash),
        "namespace": info.namespace_fingerprint.hex(),
        "tiers": info.tiers,
        "nbytes": info.nbytes,
        "hits": info.hits,
        "pinned": info.pinned,
        "leases": info.leases,
    }


@contextlib.contextmanager
def closing(items: Iterator[Any]) -> Iterator[Iterator[Any]]:
    """Close a client iterator (and the server stream behind it) when leaving early."""
    try:
        yield items
    finally:
        if isinstance(items, Generator):
            items.close()


