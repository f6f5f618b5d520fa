"""Proto <-> model conversions that the service and its clients both need, in one place.

Each conversion exists once, in both directions where both are used:

- tiers: ``TIER_VALUE`` / ``TIER_NAME`` (``"G2"`` <-> ``TIER_G2``), ``tier_name`` (lenient, for
  replies), ``tier_value`` (a caller's name, checked) and ``tier_of`` (a request field, checked);
- event kinds: ``EVENT_KIND_VALUE`` / ``EVENT_KIND_NAME``;
- namespaces: ``namespace_of(spec)`` and ``spec_of(namespace, where)``;
- extra keys: ``extra_key_message(key)`` and ``extra_key_of(message, where)``;
- prompts: ``prompt_of(spec, tokens, extra_keys)`` builds the ``Prompt`` message a client sends,
  ``read_prompt(prompt, where, max_tokens)`` checks the one a server receives;
- block hashes: ``check_hash(value, where)``;
- lookup replies: ``lookup_reply(hashes, tiers, block_tokens, packed)`` builds the
  ``LookupResponse`` a server sends, ``pack_hashes`` / ``unpack_hashes`` and ``pack_tiers`` /
  ``unpack_tiers`` are its packed fields both ways;
- replies whose fields a plain object of either side carries under the same names (tier stats,
  worker info): ``same_fields(source, message_type, skip)``.

The readers a server uses (``where`` given) refuse a malformed field with
``InvalidArgumentError`` and a message that names the field, what was expected and what came; the
service turns that into INVALID_ARGUMENT. Imports ``kvstore.core`` and ``kvstore.v1`` only.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from kvstore.core.errors import ConfigError, InvalidArgumentError
from kvstore.core.keys import DIGEST_BYTES, BlockHash, ExtraKey, ModelSpec, tokens_to_u32
from kvstore.v1 import kvstore_pb2 as pb

if TYPE_CHECKING:
    import torch

__all__ = [
    "EVENT_KIND_NAME",
    "EVENT_KIND_VALUE",
    "TIER_NAME",
    "TIER_VALUE",
    "ExtraKeys",
    "PromptParts",
    "Tokens",
    "check_hash",
    "extra_key_message",
    "extra_key_of",
    "lookup_reply",
    "namespace_of",
    "pack_hashes",
    "pack_tiers",
    "prompt_of",
    "read_prompt",
    "same_fields",
    "spec_of",
    "tier_name",
    "tier_of",
    "tier_value",
    "unpack_hashes",
    "unpack_tiers",
]

TIER_VALUE: dict[str, pb.Tier.ValueType] = {
    name: pb.Tier.Value(f"TIER_{name}") for name in ("G1", "G2", "G3", "G4")
}
TIER_NAME: dict[int, str] = {value: name for name, value in TIER_VALUE.items()}
EVENT_KIND_VALUE: dict[str, pb.EventKind.ValueType] = {
    kind: pb.EventKind.Value(f"EVENT_KIND_{kind.upper()}")
    for kind in ("stored", "removed", "moved", "corrupt")
}
EVENT_KIND_NAME: dict[int, str] = {value: name for name, value in EVENT_KIND_VALUE.items()}
_INT64 = 1 << 63

# Quoted: torch is imported only where a tensor is made (the CLI's server commands never do).
Tokens: TypeAlias = "Sequence[int] | np.ndarray[Any, Any] | torch.Tensor"
ExtraKeys = Sequence[Sequence[ExtraKey]] | None


# -- tiers -----------------------------------------------------------------------------------------


def tier_name(value: int) -> str | None:
    """``TIER_G2`` -> ``"G2"``; ``TIER_UNSPECIFIED`` (a missing block) -> None."""
    return TIER_NAME.get(value)


def tier_value(name: str | None) -> pb.Tier.ValueType:
    """``"G2"`` (or ``"g2"``) -> ``TIER_G2``; None -> ``TIER_UNSPECIFIED`` (every tier)."""
    if name is None:
        return pb.TIER_UNSPECIFIED
    try:
        return TIER_VALUE[name.upper()]
    except KeyError:
        raise InvalidArgumentError(f"tier must be one of G1, G2, G3, G4; got {name!r}") from None


def tier_of(value: int, where: str) -> str | None:
    """A request's tier field: its name, None for ``TIER_UNSPECIFIED`` (all tiers)."""
    if value == pb.TIER_UNSPECIFIED:
        return None
    name = TIER_NAME.get(value)
    if name is None:
        raise InvalidArgumentError(
            f"{where} is {value}, not a tier (TIER_G1..TIER_G4, or TIER_UNSPECIFIED for all)"
        )
    return name


# -- namespace, keys, hashes -----------------------------------------------------------------------


def namespace_of(spec: ModelSpec) -> pb.Namespace:
    return pb.Namespace(
        model_id=spec.model_id,
        revision=spec.revision,
        tokenizer_id=spec.tokenizer_id,
        num_layers=spec.num_layers,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        dtype=spec.dtype,
        block_tokens=spec.block_tokens,
    )


def spec_of(namespace: pb.Namespace, where: str | None = None) -> ModelSpec:
    """The ``ModelSpec`` of a ``Namespace`` message. One that is no valid spec raises
    ``ConfigError``, or, with ``where`` (the field of a request), ``InvalidArgumentError``
    naming the field."""
    fields = (
        namespace.model_id,
        namespace.num_layers,
        namespace.num_kv_heads,
        namespace.head_dim,
        namespace.dtype,
        namespace.block_tokens,
        namespace.revision,
        namespace.tokenizer_id,
    )
    try:
        if len(fields[0]) + len(fields[6]) + len(fields[7]) <= _MAX_CACHED_NAMES:
            return _cached_spec(*fields)
        return ModelSpec(*fields)
    except ConfigError as exc:
        if where is None:
            raise
        raise InvalidArgumentError(f"{where}: {exc}") from None


# Every request names its namespace, and a ModelSpec costs a JSON encoding and a blake2b of it (a
# tenth of a one-block Lookup's time in the server): the specs of the namespaces in use are kept.
# Only valid ones (lru_cache keeps no exceptions) with names of reasonable length, so that
# requests cannot fill memory through the cache.
_MAX_CACHED_NAMES = 1024
_cached_spec = functools.lru_cache(maxsize=256)(ModelSpec)


def extra_key_message(key: ExtraKey) -> pb.ExtraKey:
    # The same typing rules as kvstore.core.keys.encode_extra_keys, checked here so that a bad key
    # fails before anything is sent.
    if isinstance(key, bool):
        raise InvalidArgumentError("extra keys must be bytes, str or int, not bool")
    if isinstance(key, bytes | bytearray | memoryview):
        return pb.ExtraKey(bytes_value=bytes(key))
    if isinstance(key, str):
        return pb.ExtraKey(string_value=key)
    if isinstance(key, int):
        if not -_INT64 <= key < _INT64:
            raise InvalidArgumentError(f"integer extra key {key} does not fit in 64 bits")
        return pb.ExtraKey(int_value=key)
    raise InvalidArgumentError(f"extra keys must be bytes, str or int, got {type(key).__name__}")


def extra_key_of(key: pb.ExtraKey, where: str) -> ExtraKey:
    kind = key.WhichOneof("value")
    if kind == "bytes_value":
        return bytes(key.bytes_value)
    if kind == "string_value":
        return str(key.string_value)
    if kind == "int_value":
        return int(key.int_value)
    raise InvalidArgumentError(f"{where} has no value: set bytes_value, string_value or int_value")


def check_hash(value: bytes, where: str) -> BlockHash:
    if len(value) != DIGEST_BYTES:
        raise InvalidArgumentError(
            f"{where} is {len(value)} bytes; block hashes are {DIGEST_BYTES} bytes"
        )
    return BlockHash(bytes(value))


# -- lookup replies --------------------------------------------------------------------------------

_TIER_CODE: dict[str | None, int] = {name: value for name, value in TIER_VALUE.items()}
_TIER_CODE[None] = pb.TIER_UNSPECIFIED
# Byte -> tier name; a value no tier has here (a newer server's) reads as missing, as in tier_name.
_TIER_OF_CODE: tuple[str | None, ...] = tuple(TIER_NAME.get(code) for code in range(256))


def pack_tiers(tiers: Sequence[str | None]) -> bytes:
    """One byte per block: its ``Tier`` value, 0 (``TIER_UNSPECIFIED``) for a missing block."""
    code = _TIER_CODE
    # A prompt is most often in one tier throughout: counted in C, 20x faster than the loop.
    if tiers and tiers.count(tiers[0]) == len(tiers):
        return bytes((code[tiers[0]],)) * len(tiers)
    return bytes([code[t] for t in tiers])


def unpack_tiers(packed: bytes) -> list[str | None]:
    names = _TIER_OF_CODE
    if packed and packed.count(packed[0]) == len(packed):
        return [names[packed[0]]] * len(packed)
    return [names[b] for b in packed]


def pack_hashes(hashes: Sequence[bytes]) -> bytes:
    return b"".join(hashes)


def unpack_hashes(packed: bytes) -> list[BlockHash]:
    """The 16-byte hashes of ``pack_hashes``; ``len(packed)`` must be a multiple of 16."""
    # One C call that makes every bytes object (a comprehension of slices takes 4x as long).
    hashes: list[BlockHash] = np.frombuffer(packed, dtype=f"V{DIGEST_BYTES}").tolist()
    return hashes


def lookup_reply(
    hashes: Sequence[bytes], tiers: Sequence[str | None], block_tokens: int, *, packed: bool
) -> pb.LookupResponse:
    """The ``LookupResponse`` of a lookup's per-block residency: in the packed fields when the
    request asked for them (``packed_reply``), else in the repeated ones.

    The leading hit and the holes are found in the packed tiers with C calls (``find``,
    ``rstrip``): a Python walk over the blocks, twice, cost as much as the rest of the reply."""
    codes = pack_tiers(tiers)
    hit = codes.find(0)
    holes: list[int] = []
    if hit < 0:  # every block present: no holes
        hit = len(codes)
    else:
        end = len(codes.rstrip(b"\0"))  # one past the last present block
        holes = [i for i in range(hit, end) if not codes[i]]
    if packed:
        # One constructor call: setting the fields one by one afterwards cost a fifth more.
        return pb.LookupResponse(
            hit_blocks=hit,
            hit_tokens=hit * block_tokens,
            holes=holes,
            block_tokens=block_tokens,
            packed_hashes=pack_hashes(hashes),
            packed_tiers=codes,
        )
    reply = pb.LookupResponse(
        hit_blocks=hit, hit_tokens=hit * block_tokens, holes=holes, block_tokens=block_tokens
    )
    reply.block_hashes.extend(hashes)
    reply.tiers.extend(codes)
    return reply


def same_fields(source: Any, message: Any, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """``{name: getattr(source, name)}`` for each field of the message type ``message`` but
    ``skip``: for a message and a plain object that name their fields alike (the server's
    engine stats and the client's result dataclasses), so that the list is the proto's alone."""
    return {
        f.name: getattr(source, f.name) for f in message.DESCRIPTOR.fields if f.name not in skip
    }


# -- prompts ---------------------------------------------------------------------------------------


def prompt_of(
    spec: ModelSpec,
    tokens: Tokens,
    extra_keys: ExtraKeys = None,
) -> pb.Prompt:
    """Token ids go as u32 LE bytes (``InvalidTokenError`` names the first bad one);
    ``extra_keys[i]`` are the extra keys of full block ``i`` (one entry per full block)."""
    prompt = pb.Prompt(namespace=namespace_of(spec), tokens_u32le=tokens_to_u32(tokens))
    if extra_keys is not None:
        full_blocks = len(prompt.tokens_u32le) // (4 * spec.block_tokens)
        if len(extra_keys) < full_blocks:
            raise InvalidArgumentError(
                f"extra_keys has {len(extra_keys)} entries but the prompt has {full_blocks} "
                "full blocks"
            )
        prompt.extra_keys.extend(
            pb.BlockExtraKeys(keys=[extra_key_message(k) for k in keys or ()])
            for keys in extra_keys[:full_blocks]
        )
    return prompt


@dataclass(frozen=True, slots=True)
class PromptParts:
    """A received ``Prompt``, checked: what hashing it needs."""

    spec: ModelSpec
    tokens: np.ndarray[Any, np.dtype[np.uint32]]
    extra_keys: list[list[ExtraKey]] | None  # one list per full block, or None: no extra keys


def read_prompt(prompt: pb.Prompt, where: str, *, max_tokens: int) -> PromptParts:
    """The checked parts of a request's ``Prompt`` field ``where``; at most ``max_tokens``
    tokens (``server.max_prompt_tokens``)."""
    if not prompt.HasField("namespace"):
        raise InvalidArgumentError(f"{where}.namespace is missing")
    spec = spec_of(prompt.namespace, f"{where}.namespace")
    raw = prompt.tokens_u32le
    if not raw:
        raise InvalidArgumentError(
            f"{where}.tokens_u32le is empty: send the token ids as u32 little-endian bytes"
        )
    if len(raw) % 4:
        raise InvalidArgumentError(
            f"{where}.tokens_u32le is {len(raw)} bytes, not a multiple of 4 (one u32 "
            "little-endian per token)"
        )
    num_tokens = len(raw) // 4
    if num_tokens > max_tokens:
        raise InvalidArgumentError(
            f"{where} has {num_tokens} tokens, more than server.max_prompt_tokens ({max_tokens})"
        )
    num_full = num_tokens // spec.block_tokens
    extra: list[list[ExtraKey]] | None = None
    if prompt.extra_keys:
        if len(prompt.extra_keys) != num_full:
            raise InvalidArgumentError(
                f"{where}.extra_keys has {len(prompt.extra_keys)} entries; send none, or one "
                f"per full block ({num_full} blocks of {spec.block_tokens} tokens)"
            )
        extra = [
            [extra_key_of(k, f"{where}.extra_keys[{i}].keys[{j}]") for j, k in enumerate(b.keys)]
            for i, b in enumerate(prompt.extra_keys)
        ]
    return PromptParts(spec, np.frombuffer(raw, dtype="<u4"), extra)
