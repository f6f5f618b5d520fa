"""What the server's G1 and its same-GPU peers must compute alike: a CUDA device's UUID, the
name by which the hand-off (``HandOffG1``) checks that the caller's GPU is G1's."""

from __future__ import annotations

import uuid
from typing import Any

__all__ = ["DEVICE_UUID_BYTES", "device_uuid"]

DEVICE_UUID_BYTES = 16


def device_uuid(device: Any) -> bytes:
    """The 16 bytes of a CUDA device's UUID (``nvidia-smi -L`` prints them as
    ``GPU-<8>-<4>-<4>-<4>-<12>`` hex)."""
    import torch  # torch is imported when a CUDA device is named, not with kvstore.core

    props = torch.cuda.get_device_properties(device)
    # torch's _CUuuid: ``bytes`` is the 16 bytes as ints; str() is their 8-4-4-4-12 hex form.
    raw = getattr(props.uuid, "bytes", None)
    value = bytes(raw) if raw is not None else uuid.UUID(str(props.uuid).removeprefix("GPU-")).bytes
    if len(value) != DEVICE_UUID_BYTES:
        raise RuntimeError(f"a CUDA device UUID of {len(value)} bytes")
    return value
