"""Installing a decided view (and being expelled): the only places a node's view
and state change. A view is installed only if it names this incarnation and
follows the view this node holds (see service.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import trio

from clusterfs.comms.interface import Envelope
from clusterfs.membership.fencing import Fencing
from clusterfs.membership.state import (
    EXPELLED,
    LEAVING,
    MEMBER,
    body_key,
    body_key_of_base,
    guarded,
    log,
)
from clusterfs.membership.view import ExpelledEvent, View, ViewChange
from clusterfs.wire.types import MsgType


class ViewInstallation(Fencing):
    @guarded
    async def _on_activate(self, env: Envelope) -> None:
        b = env.body
        key = body_key(b)
        if (self.state in (EXPELLED, LEAVING) or key[0] <= self.view.generation
                or not self._can_install(b)):
            log.info("node %d gen %d: ignoring activation of view %d from %d", self.node_id,
                     self.view.generation, key[0], env.sender)
            return
        self._install(b)
        # relay once: if the coordinator died while activating, any member that got
        # the activation hands it on, so either no survivor installs it or all do
        for n in b["members"]:
            if int(n) not in (self.node_id, env.sender, key[1]):
                await self._send(int(n), MsgType.VIEW_ACTIVATE, b)
        await self._send(key[1], MsgType.HEARTBEAT, self._heartbeat_body())  # confirms it

    def _follows(self, b: Mapping[str, Any]) -> bool:
        """True if our history leads into view b: we are not in its base (we join it),
        the view we hold is exactly its base, or b merges us back from views without
        quorum that we went into from its base (proposals.py, _gone_without_quorum)."""
        if (self.node_id not in {int(n) for n in b["base"]}
                or self._view_key == body_key_of_base(b)):
            return True
        merged = {int(k): int(v) for k, v in (b.get("merged") or {}).items()}
        return (merged.get(self.node_id) == self.incarnation and not self.view.quorate
                and self._last_quorate_key == body_key_of_base(b))

    def _can_install(self, b: Mapping[str, Any]) -> bool:
        """A decided view b may be installed here: it names this incarnation and our
        history leads into it."""
        inc = {int(k): int(v) for k, v in b["members"].items()}.get(self.node_id)
        return (inc == self.incarnation and self.state != EXPELLED
                and int(b["gen"]) > self.view.generation and self._follows(b))

    def _install(self, b: Mapping[str, Any]) -> None:
        gen = int(b["gen"])
        if gen <= self.view.generation:   # generations only grow, whatever the race
            log.error("node %d gen %d: not installing older view %d", self.node_id,
                      self.view.generation, gen)
            return
        if gen > self.generation_record.durable:   # we promised it first: never happens
            log.error("node %d gen %d: installing view %d above the recorded generation %d",
                      self.node_id, self.view.generation, gen, self.generation_record.durable)
        self._deliver_base_fenced(b)
        members = {int(k): int(v) for k, v in b["members"].items()}
        # a node merged back from views without quorum arrives from elsewhere: for
        # the events it joins (so every member computes the same joined and left)
        merged = frozenset(int(n) for n in (b.get("merged") or {}))
        base = frozenset(int(n) for n in b["base"]) - merged
        expected = frozenset(int(n) for n in b.get("expected", self.node_ids))
        new = View(gen, frozenset(members), bool(b["quorate"]), self.cluster_size, expected)
        left = base - new.members
        clean = frozenset(int(n) for n in b.get("clean", {})) & left
        change = ViewChange(new, new.members - base, left, clean)
        self.view = new
        self._view_key = body_key(b)
        self._view_body = dict(b, prior=None)
        self._fenced_here = None
        if self._tentative is not None and int(self._tentative["gen"]) <= gen:
            self._tentative = None
        self._incs = members
        self._forget_suspicions(members)
        self._expected = expected
        if new.quorate:
            self._last_quorate_key = self._view_key
        self.installed_incarnations[gen] = dict(members)
        self.state = MEMBER
        self._installed_at = trio.current_time()
        self._removed = {int(k): int(v) for k, v in b["removed"].items()}
        self._pending_fence = {int(k): int(v) for k, v in b["fence"].items()}
        self.endpoint.generation = gen
        self.views_installed += 1
        log.info("node %d gen %d: installed view: members %s joined %s left %s (cleanly %s) "
                 "quorate %s (voters %s) coordinator %d", self.node_id, gen,
                 sorted(new.members), sorted(change.joined), sorted(change.left),
                 sorted(clean), new.quorate, sorted(expected), new.coordinator)
        self._publish(change)
        self._maybe_fence()

    def _forget_suspicions(self, members: Mapping[int, int]) -> None:
        """Every member of a decided view held its proposal moments ago: alive,
        whatever a round that failed before suspected of it. Kept, that suspicion made
        the coordinator propose the member out again at once (it had merged us back
        after a SIGSTOP: views alternating with and without it until the suspicion ran
        out, each one a DLM recovery)."""
        for n in members:
            self._suspect_until.pop(n, None)
            self._unanswered.pop(n, None)

    def _deliver_base_fenced(self, b: Mapping[str, Any]) -> None:
        """The view's coordinator had seen Fenced in the base view; a member of that
        view that missed the FENCE_DONE delivers it now, before the new view, so every
        member's events between the two views are the same."""
        fenced = b.get("bfenced")
        if (fenced is not None and self._fenced_here is None and self.state == MEMBER
                and self._view_key == body_key_of_base(b)):
            self._fence_done(self.view.generation, frozenset(int(n) for n in fenced))

    @guarded
    async def _on_expelled(self, env: Envelope) -> None:
        if self.state == EXPELLED or int(env.body["inc"]) != self.incarnation:
            return
        self.state = EXPELLED
        self.view = View(self.view.generation, self.view.members, False, self.cluster_size,
                         self.view.expected)
        log.error("node %d gen %d: EXPELLED by node %d (its generation %d); must restart "
                  "clean", self.node_id, self.view.generation, env.sender, int(env.body["gen"]))
        self._publish(ExpelledEvent(int(env.body["gen"])))
