"""Journal recovery by the survivors, and the gate that keeps locks unused until it is done.

When a view removes nodes, their journals may hold committed metadata that never
reached home, under locks the DLM has just purged. Until one survivor has replayed
those journals, no node may use a lock the dead node may have held: it would read
a stale home copy, and a later replay would write the old journal copy over its
change. GFS2 holds every ordinary lock request during journal recovery; so do we,
on each node, with a gate in front of every glock use (cached ones too: during a
view change the DLM is not running, and without quorum nothing may be written).

The gate is open when the lockspace runs in a quorate view this node has seen, and
every view that removed nodes has had its journals recovered. Recovery, on every
survivor: take `("recovery",)` EX (one survivor at a time in the cluster), then try
`("journal", s)` EX for every slot but our own; a slot whose lock is free belongs to
no live node, so replay it (idempotent: a clean journal costs one read) and let it
go; a slot whose lock is held is a live node's. The first survivor through does the
work, the others find clean journals. A recovery overtaken by a newer view starts
again under it; a survivor that dies mid-replay is replaced by the next one through
(replay is idempotent).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import trio

from clusterfs import failover, workers
from clusterfs.dlm.interface import Mode
from clusterfs.errors import Expelled, Withdrawn, WouldBlock
from clusterfs.journal.log import advance, replay_steps
from clusterfs.membership.view import ViewChange

log = logging.getLogger(__name__)
GATE_POLL = 0.01       # seconds between looks at a closed gate
FAILOVER_PHASE = "journal recovery"     # clusterfs.failover: a departure until replayed


class JournalRecovery:
    def __init__(self, ls: Any, dev: Any, sb: Any, own_slot: int) -> None:
        self.ls = ls
        self.dev = dev
        self.sb = sb
        self.own_slot = own_slot
        self.seen_gen = 0       # newest view whose event this node has handled
        self.need_gen = 0       # newest view that removed nodes
        self.done_gen = 0       # newest view whose departures' journals are replayed
        self.last: dict[str, Any] | None = None    # the last recovery, for status
        # called once a recovery is done (the fs then frees the departed nodes' orphans)
        self.on_recovered: Callable[[], None] | None = None

    # -- the gate ------------------------------------------------------------------------
    def is_open(self) -> bool:
        view = self.ls.ls_view
        return (self.ls.ls_running and view is not None and view.quorate
                and self.seen_gen >= view.generation and self.done_gen >= self.need_gen)

    async def wait_open(self) -> None:
        while not self.is_open():
            if self.ls.ls_expelled:
                # the gate never opens again: every call fails (EIO), none waits forever
                raise Withdrawn("this node was expelled from the cluster")
            await trio.sleep(GATE_POLL)

    # -- the survivors' side -------------------------------------------------------------
    async def run(self, membership: Any) -> None:
        """Follow the views; recover for each that removed nodes (a task for the mount's
        lifetime; a newer view cancels a recovery under way and starts it again)."""
        try:
            await self._follow(membership)
        finally:
            # the mount is ending (or was expelled): no journal is recovered here now
            failover.leave(FAILOVER_PHASE)

    async def _follow(self, membership: Any) -> None:
        scope: trio.CancelScope | None = None
        async with trio.open_nursery() as nursery:
            async for ev in membership.subscribe():
                if not isinstance(ev, ViewChange):
                    continue
                # a node that left cleanly marked its journal clean first: nothing to
                # replay, nothing to hold the gate for (membership's ViewChange.clean)
                departed = ev.left - ev.clean
                if departed:
                    failover.enter(FAILOVER_PHASE)
                    self.need_gen = ev.view.generation
                    if scope is not None:
                        scope.cancel()
                    scope = trio.CancelScope()
                    nursery.start_soon(self._recover, ev.view.generation, sorted(departed),
                                       scope)
                self.seen_gen = ev.view.generation

    async def _recover(self, generation: int, left: list[int], scope: trio.CancelScope) -> None:
        try:
            await self._recover_in(generation, left, scope)
        except Expelled:
            # the others recover for us now; the mount withdraws (and stays up, so that
            # `clusterfs umount` works)
            log.warning("gen %d: journal recovery abandoned: this node was expelled",
                        generation)
            failover.leave(FAILOVER_PHASE)   # it never recovers a journal again

    async def _recover_in(self, generation: int, left: list[int],
                          scope: trio.CancelScope) -> None:
        with scope:
            start = time.monotonic()
            log.info("gen %d: journal recovery for departed %s: waiting for the DLM",
                     generation, left)
            gate = await self.ls.lock(("recovery",), Mode.EX)
            took = time.monotonic()
            replayed: list[tuple[int, int]] = []
            try:
                for slot in range(self.sb.journal_count):
                    if slot != self.own_slot:
                        found = await self._replay_if_free(slot)
                        if found is not None:
                            replayed.append((slot, found))
            finally:
                with trio.CancelScope(shield=True):
                    await self.ls.unlock(gate)
            self.done_gen = max(self.done_gen, generation)
            done = time.monotonic()
            self.last = {"generation": generation, "departed": left,
                         "replayed": [{"slot": s, "transactions": t} for s, t in replayed],
                         "dlm_wait_s": round(took - start, 3),
                         "replay_s": round(done - took, 3), "total_s": round(done - start, 3)}
            log.info("gen %d: journal recovery done in %.3f s (DLM %.3f s, replay %.3f s): "
                     "%s", generation, done - start, took - start, done - took,
                     ", ".join(f"slot {s}: {t} transactions" for s, t in replayed)
                     or "no journal needed replay")
            if self.on_recovered is not None:
                self.on_recovered()
            if self.done_gen >= self.need_gen:
                failover.leave(FAILOVER_PHASE)

    async def _replay_if_free(self, slot: int) -> int | None:
        """Replay `slot` if no live node holds it; the transactions replayed, or None."""
        try:
            lock = await self.ls.lock(("journal", slot), Mode.EX, try_=True)
        except WouldBlock:
            return None                       # a live node's journal
        try:
            # step by step, each in a worker thread: every write home and flush waits
            # for this node's own queued data writes first, as long as a busy disk
            # takes (in the event loop that stalled a survivor past a second, under
            # stress-ng's open); and a newer view can cancel between two steps
            steps = replay_steps(self.dev, self.sb, slot)
            while True:
                ended, result = await workers.run(advance, steps, self.dev.flush)
                if ended:
                    break
        finally:
            with trio.CancelScope(shield=True):
                await self.ls.unlock(lock)
        if result.transactions:
            log.info("journal %d: replayed %d transactions (%d blocks) of a departed node; "
                     "%d revoked copies skipped", slot, result.transactions, result.blocks,
                     result.revoked)
        return result.transactions
