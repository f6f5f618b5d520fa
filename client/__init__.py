"""Clients of the kvstore service: store a prompt's K/V once, get the prefix back anywhere.

``AsyncClient`` for asyncio code, ``Client`` for everything else; both have the same calls and
take and return torch tensors ``[layers, 2 (K,V), tokens, kv_heads, head_dim]`` in the dtype of
the model's ``ModelSpec``. With a Hugging Face model::

    import torch
    from transformers import AutoModelForCausalLM
    from client import Client, from_dynamic_cache, to_dynamic_cache
    from kvstore import ModelSpec

    model = AutoModelForCausalLM.from_pretrained(name, torch_dtype=torch.bfloat16)
    cfg = model.config
    spec = ModelSpec(name, num_layers=cfg.num_hidden_layers, num_kv_heads=cfg.num_key_value_heads,
                     head_dim=cfg.hidden_size // cfg.num_attention_heads, dtype="bfloat16",
                     block_tokens=256)

    with Client("127.0.0.1:50051", token=TOKEN) as store:
        past, n = store.get_prefix(spec, tokens)        # the longest stored prefix, n tokens
        n = min(n, len(tokens) - 1)                     # leave a token to compute logits for
        cache = to_dynamic_cache(past[:, :, :n], config=cfg)
        out = model(torch.tensor([tokens[n:]]), past_key_values=cache, use_cache=True)
        store.put(spec, tokens, from_dynamic_cache(out.past_key_values))  # repeats are free

Only full blocks (``spec.block_tokens`` tokens) are stored and returned. Blocks are named by a
hash chain over the tokens, salted per tenant on the server, so a hit is always the K/V of
exactly those leading tokens. On the same host, bulk bytes go through shared memory, not gRPC.

Errors: local checks raise ``kvstore.core.errors`` classes (``SpecMismatchError`` for a tensor of
the wrong dtype or shape, ``InvalidTokenError``); the server's status codes become the classes of
``client.errors`` (the tree is drawn there). Every one is a ``KVStoreError``.

torch is imported only where a tensor is made or checked (inside those functions, types under
``TYPE_CHECKING``), never at module level: it takes about a second to import, and the calls that
carry no K/V (``lookup``, ``stats``, ``list_blocks``, so ``kvstore ls`` and ``kvstore tiers``)
must not pay it. tests/test_client_imports.py holds this.
"""

from client.aio import AsyncClient
from client.convert import from_dynamic_cache, to_dynamic_cache
from client.errors import (
    AuthError,
    HandOffUnavailableError,
    NotFoundError,
    NotSupportedError,
    NoWorkerError,
    ResourceExhaustedError,
    ServerError,
    ServiceUnavailableError,
)
from client.results import (
    BlockInfo,
    Event,
    Lease,
    Lookup,
    PutResult,
    Repair,
    Stats,
    TierUsage,
    WorkerInfo,
)
from client.sync import Client
from kvstore.core.errors import (
    CorruptBlockError,
    InvalidArgumentError,
    InvalidTokenError,
    KVStoreError,
    SpecMismatchError,
)

__all__ = [
    "AsyncClient",
    "AuthError",
    "BlockInfo",
    "Client",
    "CorruptBlockError",
    "Event",
    "HandOffUnavailableError",
    "InvalidArgumentError",
    "InvalidTokenError",
    "KVStoreError",
    "Lease",
    "Lookup",
    "NoWorkerError",
    "NotFoundError",
    "NotSupportedError",
    "PutResult",
    "Repair",
    "ResourceExhaustedError",
    "ServerError",
    "ServiceUnavailableError",
    "SpecMismatchError",
    "Stats",
    "TierUsage",
    "WorkerInfo",
    "from_dynamic_cache",
    "to_dynamic_cache",
]
