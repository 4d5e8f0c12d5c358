"""The transport contract the layers above comms code against.

An Endpoint is one node's door to the others. Guarantees:
- messages from one sender to one receiver arrive in the order sent, each once;
  while both processes live, a message handed over without PeerUnreachable is
  not lost when a connection breaks (TCP sends again what the receiving process
  did not confirm, on the next connection); what was meant for a process that is
  gone never reaches the one that replaces it. The in-memory transport's cut() is
  harsher (it loses what was in flight): the layers above survive both;
- every delivered message was authenticated by the cluster key (TCP) and
  carries the sender's node id and the sender's view generation at send time;
- a peer whose host refused a connection is reported (`refused_at`): the one
  sign of a dead process that comes sooner than its silence;
- handlers for one sender run one at a time, in arrival order.

Implementations: `clusterfs.comms.memory` (in-process, for tests with many
nodes in one trio run) and the TCP transport (`clusterfs.comms.tcp`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Envelope:
    sender: int        # node id of the sender
    generation: int    # sender's view generation when it sent
    type: int          # a clusterfs.wire message type
    body: Any          # msgpack-able payload


Handler = Callable[[Envelope], Awaitable[None]]
InlineHandler = Callable[[Envelope], None]    # a plain function that never blocks
RefusalListener = Callable[[int], None]       # a plain function that never blocks


class Endpoint(Protocol):
    node_id: int
    generation: int    # stamped on every outgoing frame; membership keeps it current

    def send_nowait(self, dest: int, mtype: int, body: Any) -> None:
        """Queue one message for dest, now, without yielding to the scheduler.

        Raises PeerUnreachable if it cannot be queued. Messages queued by one
        node for one peer leave in the order of the calls, whatever task made
        them, so a caller that decides in order needs no queue of its own."""

    async def send(self, dest: int, mtype: int, body: Any) -> None:
        """The same as send_nowait, for callers that are coroutines anyway."""

    def register(self, mtypes: Iterable[int], handler: Handler) -> None:
        """Route incoming messages of these types to handler."""

    def register_inline(self, mtypes: Iterable[int], handler: InlineHandler) -> None:
        """Route these types to a plain function that must never block. The
        transport may call it in its reading task as the message arrives (no task
        switch); the guarantees of `register` (one at a time per sender, in arrival
        order, with the sender's other messages) still hold."""

    def refused_at(self, dest: int) -> float | None:
        """When (trio clock) dest's host last refused a connection to dest: nothing
        listens at its address, so the process that was dest is gone (killed, crashed,
        exited). None if it never did, or a connection to dest succeeded since. A
        silent peer (frozen, cut off, powered off) refuses nothing."""

    def on_refused(self, listener: RefusalListener) -> None:
        """Call listener(dest) the moment dest's host refuses a connection (whenever
        refused_at(dest) is set anew), so a death can be acted on at once rather than
        at the next look at refused_at."""
