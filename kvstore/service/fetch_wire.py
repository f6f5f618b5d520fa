"""The Fetch wire encoding, and the handler table adjusted to use it.

A 2 MiB-block Fetch spends most of its time copying payload bytes; building ``FetchResponse``
objects costs three copies (into ``bytes``, into the message, into its serialization), so chunk
replies are written in protobuf wire format by hand (``chunk_message``), one copy, and the Fetch
response serializer (``serialize_fetch``) passes such bytes through. ``WireAdjusted`` is what
``add_KVStoreServicer_to_server`` registers with: it installs that serializer and wraps every
request deserializer with ``safe_deserializer`` (kvstore/service/calls.py).
"""

from __future__ import annotations

from typing import Any

from kvstore.service.calls import safe_deserializer

__all__ = ["WireAdjusted", "chunk_message", "serialize_fetch"]


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def chunk_message(block_index: int, offset: int, data: memoryview) -> bytes:
    """``FetchResponse(chunk=BlockChunk(block_index, offset, data))`` in protobuf wire format.

    Building the message object costs three copies of the data (into ``bytes``, into the message,
    into its serialization); this is one, and a 2 MiB-block Fetch spends most of its time there.
    Field numbers as in kvstore.proto: FetchResponse.chunk = 2; BlockChunk.block_index = 1,
    offset = 2, data = 3. A test decodes these with the generated classes.
    """
    inner = (
        b"\x08" + _varint(block_index) + b"\x10" + _varint(offset) + b"\x1a" + _varint(len(data))
    )
    return b"".join((b"\x12", _varint(len(inner) + len(data)), inner, data))


def serialize_fetch(message: Any) -> bytes:
    return message if isinstance(message, bytes) else bytes(message.SerializeToString())


class WireAdjusted:
    """What ``add_KVStoreServicer_to_server`` registers with: the real server, except that every
    request deserializer turns undecodable bytes into ``Undecodable`` (refused with
    INVALID_ARGUMENT by the RPC wrappers) and Fetch replies may be bytes already in wire format
    (``chunk_message``). The generated code cannot be edited (a test regenerates it), so the
    handler table is adjusted on its way to the server."""

    def __init__(self, server: Any) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        # Registered handlers are looked up before generic ones, so this table is the one used.
        adjusted = {}
        for name, handler in handlers.items():
            handler = handler._replace(
                request_deserializer=safe_deserializer(handler.request_deserializer)
            )
            if name == "Fetch":
                handler = handler._replace(response_serializer=serialize_fetch)
            adjusted[name] = handler
        self._server.add_registered_method_handlers(service, adjusted)
