"""The recovery barrier: a step of recovery ends when every member has done it.

Each member sends DLM_RECOVER_STATUS (generation, step) to every other and
waits until it has heard the same from all of them (`_barrier`). Status
messages are idempotent, so they are re-sent every BARRIER_RESEND seconds in
case a peer was not listening yet, and a member that passed a barrier echoes
once to a late one. Separate from recovery.py because the rest of recovery
only needs "wait for step n everywhere", not how it is done.

The status of step 1 also carries one fact a member must know before step 4:
"resync" (to each member it resynchronises its locks with, recovery.py), so the
receiver purges the sender's locks before the sender re-sends them. Every copy
of that status carries it, echoes included, so whichever copy counts has it.

Owns `ls_recover_status` ((generation, step) -> members heard from),
`ls_resync_from` (generation -> members whose status asked us to resync) and
`ls_barrier_sent`. A mixin of `Lockspace`.
"""

from __future__ import annotations

from typing import Any

import trio

from clusterfs.wire.types import MsgType

BARRIER_RESEND = 0.5   # seconds between re-sends of a recovery status


class Barrier:
    """Waiting for every member to finish a recovery step (a mixin of Lockspace)."""

    async def _barrier(self, g: int, step: int) -> None:
        """Wait until every other member has reported step `step` of generation g."""
        # Status messages are idempotent: re-send them now and then, in case a
        # peer was not listening yet (a lockspace still starting, a reconnect).
        others = self.ls_members - {self.ls_node}
        self.ls_barrier_sent[g] = max(step, self.ls_barrier_sent.get(g, 0))
        since = trio.current_time()
        while True:
            for n in sorted(others):
                self._send(n, MsgType.DLM_RECOVER_STATUS, self._status_body(g, step, n))
            with trio.move_on_after(BARRIER_RESEND):
                while not others <= self.ls_recover_status.get((g, step), set()):
                    await self.ls_wake.wait()
                break
            # members silent at a barrier for answer_timeout are suspects (watch.py)
            self._suspect_missing(others - self.ls_recover_status.get((g, step), set()),
                                  f"recovery barrier {step} of gen {g}",
                                  trio.current_time() - since)
        for k in [k for k in self.ls_recover_status if k[0] < g]:
            del self.ls_recover_status[k]
        for old in [k for k in self.ls_resync_from if k < g]:
            del self.ls_resync_from[old]
        # A newer view cancels this recovery, but a wait the last status had already
        # woken returns normally, and a barrier with no other member left (the newer
        # view's) waits for nothing: without this checkpoint the overtaken recovery
        # ran its next steps (purge, regrant) on the newer view's state.
        await trio.lowlevel.checkpoint_if_cancelled()

    def _status_body(self, g: int, step: int, dest: int) -> dict[str, Any]:
        body: dict[str, Any] = {"g": g, "step": step}
        if step == 1 and g == self.ls_recover_gen and dest in self.ls_resync_with:
            body["resync"] = True
        return body

    def _receive_recover_status(self, sender: int, body: dict[str, Any]) -> None:
        g, step = body["g"], body["step"]
        self.ls_recover_status.setdefault((g, step), set()).add(sender)
        if body.get("resync"):
            self.ls_resync_from.setdefault(g, set()).add(sender)
        if not body.get("echo") and self.ls_barrier_sent.get(g, 0) >= step:
            # we passed this barrier already; the sender may have missed our
            # status (it was not listening yet): answer once.
            self._send(sender, MsgType.DLM_RECOVER_STATUS,
                       {**self._status_body(g, step, sender), "echo": True})
        self._wake()
