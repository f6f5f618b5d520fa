"""Same-host segments: shared memory that the server creates, owns and hands to one tenant; this
module holds the hand-over both sides speak (the server's registry is kvstore/service/segments.py).

A client on the server's host asks for a segment (``OpenSegment``); the server creates a memfd of
that size, seals it so that it can neither shrink nor grow (``F_SEAL_SHRINK | F_SEAL_GROW |
F_SEAL_SEAL``), maps it, and answers with the segment's id, a one-time ticket and the name of an
abstract unix socket. The client connects to that socket, sends the ticket and receives the file
descriptor (``SCM_RIGHTS``), which it maps read-write. From then on a Put may point its SlotRefs
into the segment and a Fetch may ask for its blocks to be copied into it.

What that rules out, against the named ``/dev/shm`` segments of before:

- A client never maps server memory: the server's G2 (every tenant's blocks) is never handed out.
  A Fetch copies verified payloads into the caller's own segment.
- A client never names memory for the server to open: a Put names a segment *id* the server
  issued to that tenant; any other id, another tenant's included, is refused.
- A client cannot make the server fault: the seals forbid truncation, so every page of the
  server's mapping stays backed (a truncated ``/dev/shm`` file killed the server with SIGBUS).
- A ticket is 32 random bytes, good once and for ``ticket_s``; the descriptor reaches only the
  process that presents it, and an abstract socket is reachable only in the server's network
  namespace, so a client in another container fails to connect and falls back to bytes.

The hand-over, on the abstract unix socket ``socket_address(name)``: the client sends the
``TICKET_BYTES``-byte ticket; the server answers ``GRANTED`` with the descriptor attached
(``SCM_RIGHTS``), or ``REFUSED`` without one.
"""

from __future__ import annotations

import os
import socket

__all__ = ["GRANTED", "REFUSED", "TICKET_BYTES", "receive_segment_fd", "socket_address"]

TICKET_BYTES = 32
GRANTED = b"Y"
REFUSED = b"N"


def socket_address(socket_name: str) -> str:
    """The abstract-namespace address of the hand-over socket ``socket_name`` (the leading NUL:
    no file, reachable only in the server's network namespace)."""
    return "\0" + socket_name


def receive_segment_fd(socket_name: str, ticket: bytes, timeout_s: float = 5.0) -> int:
    """The client's side of the hand-over: the segment's descriptor for a ticket.

    Raises ``OSError`` when the socket cannot be reached (another host, another network
    namespace) and ``PermissionError`` when the server refuses the ticket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as conn:
        conn.settimeout(timeout_s)
        conn.connect(socket_address(socket_name))
        conn.sendall(ticket)
        msg, fds, _, _ = socket.recv_fds(conn, 1, 1)
        if msg != GRANTED or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise PermissionError("the server refused the segment ticket (used or expired)")
        return fds[0]
