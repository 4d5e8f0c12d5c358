"""The block-server protocol: proxy I/O over authenticated frames (clusterfs.wire).

One TCP connection per (proxy, server) pair, opened by the proxy. The handshake is
the cluster comms' (clusterfs.comms.tcp): HELLO frames MAC'd with the cluster key
carry fresh nonces both ways, everything after it is MAC'd with the session key
derived from them, and each direction numbers its frames 1, 2, ... (a replayed,
dropped or reordered frame fails the check and closes the connection). The HELLO
body says `"service": "block"`, so a block connection is never mistaken for a
comms one.

Requests (the frame's generation field is the proxy's membership generation):

    BLOCK_INFO   {id}                       -> {id, ok, size}
    BLOCK_READ   {id, off, len}             -> {id, ok, data}
    BLOCK_WRITE  {id, off, data, by}        -> {id, ok}
    BLOCK_FLUSH  {id}                       -> {id, ok}
    BLOCK_FENCE  {id, node, gen, preempt}   -> {id, ok}   (storage/groupfence.py)

A refused or failed request answers {id, ok: False, error: "..."}. Every reply, and
the server's HELLO, also carries `t`: the server's monotonic clock when it sent it.
From those the proxy keeps a lower bound of (server clock - its own clock) per
connection, and a write's `by` is the latest moment, on the server's clock, at which
the server may still start it: the proxy's send time mapped through that bound, plus
half the time the proxy waits for the reply. A write that reaches the device later is
refused, so a write the proxy gave up on (and re-sent elsewhere) never starts after
it gave up, however long it sat in sockets or behind a held event loop. Several requests
may be in flight on a connection (the proxy sends up to its window); the server works
on them side by side and answers each when it is done, so replies come in any order
and are matched by id. The proxy never has two requests in flight that overlap when
one of them writes (storage/proxy.py). At most MAX_IO bytes per read or write.
"""

from __future__ import annotations

import secrets
from typing import Any

from clusterfs.errors import WireError
from clusterfs.wire import frame as wf
from clusterfs.wire.types import MsgType

MAX_IO = 1 << 20                       # bytes per proxied read or write
MAX_FRAME = MAX_IO + (64 << 10)        # a frame carrying MAX_IO bytes, and its header
NONCE_SIZE = 16
SERVICE = "block"
REQUESTS = frozenset({MsgType.BLOCK_INFO, MsgType.BLOCK_READ, MsgType.BLOCK_WRITE,
                      MsgType.BLOCK_FLUSH, MsgType.BLOCK_FENCE})


def hello(cluster: str, to: int, nonce: bytes, echo: bytes | None = None,
          now: float | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"cluster": cluster, "to": to, "nonce": nonce, "service": SERVICE}
    if echo is not None:
        body["echo"] = echo
    if now is not None:
        body["t"] = now                    # the server's clock (module doc)
    return body


def clock(body: Any) -> float | None:
    """The server's clock a reply or HELLO carries (`t`), or None."""
    t = body.get("t") if isinstance(body, dict) else None
    return float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) else None


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_SIZE)


def check_hello(f: wf.Frame, cluster: str, me: int, echo: bytes | None = None) -> bytes:
    """The peer's nonce from a HELLO meant for us (WireError if it is not one)."""
    b = f.body
    if f.type != MsgType.HELLO or f.seq != 0:
        raise WireError(f"expected HELLO, got type {f.type} seq {f.seq}")
    if (not isinstance(b, dict) or b.get("to") != me or b.get("cluster") != cluster
            or b.get("service") != SERVICE or not isinstance(b.get("nonce"), bytes)
            or len(b["nonce"]) != NONCE_SIZE):
        raise WireError(f"bad block-service HELLO from node {f.sender}")
    if echo is not None and b.get("echo") != echo:
        raise WireError(f"node {f.sender} did not echo our nonce")
    return b["nonce"]


class Sequencer:
    """Frame numbering of one direction of a connection."""

    def __init__(self) -> None:
        self.next = 1

    def take(self) -> int:
        n = self.next
        self.next += 1
        return n

    def check(self, f: wf.Frame, sender: int) -> None:
        if f.sender != sender:
            raise WireError(f"frame claims sender {f.sender} on node {sender}'s connection")
        if f.seq != self.next:
            raise WireError(f"sequence {f.seq} from node {sender}, expected {self.next}")
        self.next += 1
