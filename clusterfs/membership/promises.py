"""A target's side of a view change: promise a proposal (one promise per
generation, recorded durably first), keep a committed one as the tentative
next view, and answer with what we hold (see service.py, three phases).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import trio

from clusterfs import failover
from clusterfs.comms.interface import Envelope
from clusterfs.errors import StateError
from clusterfs.membership.detection import FailureDetection
from clusterfs.membership.state import (
    AHEAD,
    BEHIND,
    EXPELLED,
    LEAVING,
    MEMBER,
    Key,
    body_key_of_base,
    guarded,
    log,
)
from clusterfs.wire.types import MsgType


class Promises(FailureDetection):
    def _answer(self, key: Key, ok: bool, phase: int, why: str = "") -> dict[str, Any]:
        """An answer to a proposal: yes/no, and what we hold, so the coordinator can
        catch up on a view we installed, finish one we committed, or learn a Fenced."""
        held = self._tentative
        if held is not None and (int(held["gen"]) <= self.view.generation
                                 or not self._follows(held)):
            held = None      # installed, or overtaken by a view we installed since
        return {"gen": key[0], "coord": key[1], "cinc": key[2], "ok": ok, "why": why,
                "inc": self.incarnation, "max_gen": self._max_gen, "phase": phase,
                "vkey": list(self._view_key), "view": self._view_body,
                "held": None if held is None else dict(held, prior=None),
                "fenced": self._fenced_here}

    @guarded
    async def _on_propose(self, env: Envelope) -> None:
        b = env.body
        gen, coord, cinc = int(b["gen"]), int(b["coord"]), int(b["cinc"])
        self._max_gen = max(self._max_gen, gen)
        members = {int(k): int(v) for k, v in b["members"].items()}
        ok = True
        why = ""
        prior = b.get("prior")
        if (prior is not None and self.state != EXPELLED
                and int(prior["gen"]) > self.view.generation and self._can_install(prior)):
            # the coordinator installed it, so it was decided; we missed its activation
            log.info("node %d gen %d: catching up on view %d (the proposer's)", self.node_id,
                     self.view.generation, int(prior["gen"]))
            self._install(prior)
        if self.state == EXPELLED:
            ok, why = False, "expelled"
        elif self.state == LEAVING:
            ok, why = False, "leaving"     # it is left out of the next proposal
        elif members.get(self.node_id) != self.incarnation:
            ok, why = False, "not my incarnation"
        elif gen <= self._promised[0] or gen <= self.view.generation:
            # one promise per generation: of two competing proposals of one generation
            # at most one can gather its acks
            ok, why = False, f"promised {self._promised}, at gen {self.view.generation}"
        elif self.state == MEMBER and self.view.quorate and coord not in self.view.members:
            ok, why = False, "coordinator outside my quorate view"
        elif not self._follows(b):
            ok = False
            why = (AHEAD if self.view.generation > int(b["bkey"][0])
                   and not self._missed_view_of(b) else BEHIND)
        if ok:
            self._promised = (gen, coord, cinc)
            self._promised_body = b
            ok, why = await self._make_durable((gen, coord, cinc))
        if not ok:
            log.info("node %d gen %d: refusing view %d from %d: %s", self.node_id,
                     self.view.generation, gen, coord, why)
        await self._send(coord, MsgType.VIEW_ACK,
                         self._answer((gen, coord, cinc), ok, int(MsgType.VIEW_PROPOSE), why))

    def _missed_view_of(self, b: Mapping[str, Any]) -> bool:
        """b is built on a view that holds us and is newer than the last quorate view we
        installed, and we never installed it: we went on without quorum meanwhile (our
        answer to it lost, or late). Our view is newer, but the coordinator cannot learn
        it (it is not in it) nor merge us back (_follows: our history does not lead from
        its base): we are behind it, not ahead, and must be left out and restart clean.
        Said ahead, the coordinator asked us again for ever (the churn test with message
        jitter: 60 s of refused proposals, no view)."""
        return (self.node_id in {int(n) for n in b["base"]}
                and int(b["bkey"][0]) > self._last_quorate_key[0]
                and body_key_of_base(b) != self._view_key)

    @guarded
    async def _on_commit(self, env: Envelope) -> None:
        b = env.body
        key = (int(b["gen"]), int(b["coord"]), int(b["cinc"]))
        promised = self._promised_body
        ok = (key == self._promised and promised is not None
              and key[0] > self.view.generation and self.state not in (EXPELLED, LEAVING)
              and self._follows(promised))
        if ok:
            self._tentative = promised
            self._committed_at = trio.current_time()
        else:
            log.info("node %d gen %d: refusing commit of view %d from %d (promised %s)",
                     self.node_id, self.view.generation, key[0], key[1], self._promised)
        await self._send(key[1], MsgType.VIEW_ACK,
                         self._answer(key, ok, int(MsgType.VIEW_COMMIT)))

    async def _make_durable(self, key: Key) -> tuple[bool, str]:
        """Record the generation we just promised before anyone may count on the
        promise; (True, "") once it is, else (False, why) and the promise is void."""
        if self.state == MEMBER and self._promises_a_departure():
            failover.enter("membership")     # from here on, in a departure's path
        try:
            await self.generation_record.raise_to(key[0])
            return True, ""
        except StateError as exc:
            log.error("node %d gen %d: cannot record generation %d: %s", self.node_id,
                      self.view.generation, key[0], exc)
            if self._promised == key:
                self._promised_body = None    # a commit of it is refused
            return False, "generation not durable"
