"""What the scheduler-side connector tells the worker side each step, and vLLM's base classes.

This is the one module of the connector that imports vLLM (``KVConnectorBase_V1`` and
``KVConnectorMetadata``): without vLLM it raises an ImportError that says so, and so does
``client.vllm_connector``; ``import client`` needs no vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvstore.core.keys import ExtraKey

if TYPE_CHECKING:
    # What this module uses of vLLM's base classes; the real ones are imported at run time (vLLM
    # is not installed where mypy runs, and these few members are all the typing needs).

    class ConnectorBase:
        _vllm_config: Any
        _kv_transfer_config: Any

        def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any) -> None: ...

        @property
        def role(self) -> Any: ...

        def _get_connector_metadata(self) -> Any: ...

        def has_connector_metadata(self) -> bool: ...

    class _MetadataBase:
        pass

    SCHEDULER: Any = None
else:
    try:
        from vllm.distributed.kv_transfer.kv_connector.v1.base import (
            KVConnectorBase_V1 as ConnectorBase,
        )
        from vllm.distributed.kv_transfer.kv_connector.v1.base import (
            KVConnectorMetadata as _MetadataBase,
        )
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "client.vllm_connector needs vLLM (0.32: the KVConnectorBase_V1 API) installed next "
            "to kvstore; `import client` alone does not"
        ) from exc
    SCHEDULER = KVConnectorRole.SCHEDULER

__all__ = ["SCHEDULER", "ConnectorBase", "KVStoreConnectorMetadata", "Transfer"]


@dataclass
class Transfer:
    """One request's load or save: tokens ``[start, end)`` of ``tokens`` between kvstore and
    the vLLM blocks ``block_ids`` (the request's, in order: token ``t`` is in
    ``block_ids[t // block_size]``)."""

    req_id: str
    tokens: list[int]  # the prompt up to ``end``
    start: int
    end: int
    block_ids: list[int]
    extra_keys: list[list[ExtraKey]] | None = None
    # A load that vLLM does not wait for in a step: the request waits aside until
    # ``get_finished`` reports it.
    async_load: bool = False


@dataclass
class KVStoreConnectorMetadata(_MetadataBase):
    """What the scheduler-side connector tells the worker side for one step."""

    spec: dict[str, Any] | None = None  # ModelSpec.to_dict(); set when there is work
    loads: list[Transfer] = field(default_factory=list)
    saves: list[Transfer] = field(default_factory=list)
