"""The coordinator's side of a view change: decide whether a new view is needed,
propose it, learn from the answers, commit, activate (see service.py).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from typing import Any

import trio

from clusterfs.comms.interface import Envelope
from clusterfs.membership.promises import Promises
from clusterfs.membership.state import (
    BEHIND,
    EXPELLED,
    JOINING,
    LEAVING,
    MEMBER,
    Key,
    body_key,
    body_key_of_base,
    guarded,
    log,
)
from clusterfs.wire.types import MsgType

# a target that does not answer although we hear its heartbeats is suspected (left
# out of the next proposal) only after this many rounds in a row without its answer
ROUNDS_BEFORE_SUSPECT = 3


class Proposals(Promises):
    def _evaluate(self) -> None:
        if self.state in (EXPELLED, LEAVING):
            return
        now = trio.current_time()
        if self.state == JOINING and now - self._started_at < self.settle:
            return   # listen a little before forming a view of our own

        def usable(n: int) -> bool:
            return self._alive(n, now) and self._suspect_until.get(n, -math.inf) < now

        base = self.view.members if self.state == MEMBER else frozenset()
        keep = {self.node_id}
        merged: set[int] = set()     # not counted for who coordinates: it is elsewhere
        lagging = False
        silent = False
        for n in base:
            if n == self.node_id:
                continue
            p = self._peers.get(n)
            if self._left_cleanly(n):
                continue      # unmounted cleanly: removed, not fenced (_proposal_body)
            if not usable(n):
                silent = True
                continue
            if p is None:
                keep.add(n)   # not heard from since we started, but presumed alive
                continue
            if p.inc != self._incs.get(n):
                continue      # restarted: the view's incarnation is gone
            if self._gone_without_quorum(n):
                merged.add(n)   # back in the next view (see _gone_without_quorum)
                continue
            if p.state == MEMBER and self.node_id not in p.members and (
                    p.gen > self.view.generation
                    or (p.gen == self.view.generation and p.members != self.view.members)):
                continue   # it moved on to a view without us: it is no longer in ours
            keep.add(n)
            # heard since well after our install, still on another view: resync
            if ((p.gen != self.view.generation or p.members != self.view.members)
                    and p.state == MEMBER
                    and now - self._installed_at > 2 * self.interval + self.timeout / 2):
                lagging = True
        self._mark_failover(silent)
        admissible: set[int] = set()
        member_elsewhere = quorate_elsewhere = False
        for n, p in self._peers.items():
            if n in base or not usable(n):
                continue
            if p.state == MEMBER:
                member_elsewhere = True
                quorate_elsewhere |= p.quorate
            if self._removed.get(n) == p.inc:
                continue
            if p.state == JOINING or (p.state == MEMBER and not p.quorate):
                admissible.add(n)
        if self.state == JOINING:
            # propose only if nobody is a member anywhere and we are the lowest joiner
            if (member_elsewhere or self._quorate_on_disk_only(usable)
                    or min(admissible | {self.node_id}) != self.node_id):
                return
        elif self.view.quorate:
            # the lowest live member coordinates a quorate view; it admits joiners
            # and members of non-quorate partitions
            if min(keep) != self.node_id:
                return
        else:
            # without quorum: wait to be admitted by a quorate partition if one is in
            # sight; else the lowest member of all non-quorate partitions merges them
            if quorate_elsewhere:
                admissible = set()
            candidates = keep | {n for n in admissible if self._peers[n].state == MEMBER}
            if min(candidates) != self.node_id or self._merge_too_soon(admissible, keep, now):
                return
        target = keep | merged | admissible
        if (self.state == MEMBER and target == base and not lagging and not merged
                and self._quorate(target, self._expected) == self.view.quorate):
            self._maybe_fence()
            return
        assert self._nursery is not None
        self._round_running = True
        self._nursery.start_soon(self._propose_round, frozenset(target), base)

    async def _propose_round(self, target: frozenset[int], base: frozenset[int]) -> None:
        try:
            await self._propose(target, base)
        finally:
            self._round_running = False
        self._evaluate_if_asked()         # detection.py: a refusal during the round

    async def _propose(self, target: frozenset[int], base: frozenset[int]) -> None:
        gen = max(self.view.generation, self._promised[0], self._max_gen) + 1
        self._max_gen = gen
        key = (gen, self.node_id, self.incarnation)
        body = self._proposal_body(gen, target, base)
        members: dict[int, int] = body["members"]
        self.proposals += 1
        log.info("node %d gen %d: proposing view %d members %s (base %s, quorate %s)",
                 self.node_id, self.view.generation, gen, sorted(target), sorted(base),
                 body["quorate"])
        self._promised = key
        self._promised_body = body
        durable, why = await self._make_durable(key)
        if not durable:
            self.proposals_failed += 1
            log.error("node %d gen %d: not proposing view %d: %s", self.node_id,
                      self.view.generation, gen, why)
            await trio.sleep(self.interval)
            return
        others = [n for n in target if n != self.node_id]
        started = trio.current_time()
        # phase 1: propose; every target promises (or refuses) and tells us what it holds
        replies, missing = await self._phase(key, others, MsgType.VIEW_PROPOSE, body, members)
        refused = {n for n, r in replies.items() if not r["ok"]}
        learned = not missing and await self._learn_from(replies)
        if not (missing or refused or learned or self._superseded(key, body)):
            # phase 2: commit; every target holds it as its tentative next view
            self._tentative = body
            replies, missing = await self._phase(key, others, MsgType.VIEW_COMMIT,
                                                 {"gen": gen, "coord": self.node_id,
                                                  "cinc": self.incarnation}, members)
            refused = {n for n, r in replies.items() if not r["ok"]}
            if not (missing or refused or self._superseded(key, body)
                    or self._tentative is not body):
                self._learn_fenced(replies)
                self._unanswered.clear()
                await self._activate(body, others)
                return
        self._round_failed(gen, refused, missing, replies, learned, started, members)
        await trio.sleep(random.uniform(0, self.interval))

    def _quorate_on_disk_only(self, usable: Callable[[int], bool]) -> bool:
        """A member of a quorate view beats on the disk and we cannot hear it: a cluster
        runs out of our sight (a cut, or nodes that left cleanly and so shrank its
        voters below what we count). A joiner forms no view of its own then."""
        if self.disk is None:
            return False
        return any(n not in self._peers or not usable(n) for n in self.disk.quorate_members())

    def _merge_too_soon(self, admissible: set[int], keep: set[int], now: float) -> bool:
        """Merging partitions without quorum into one that has quorum and leaves some of
        our members out (they get fenced and expelled) waits until the partitions we
        hear again have been heard for a failure timeout: when links come back,
        connections come back one by one (each with its own backoff and connect
        timeout), and the first two partitions to hear each other would otherwise fence
        a third that was about to join them."""
        target = keep | admissible
        voters = self._expected | target
        # who a quorate view would fence: what our views without quorum left pending
        fenced = (set(self._pending_fence) | self.view.members) - target
        if not self._quorate(target, voters) or not fenced:
            return False
        return any(now - self._peers[n].heard_since < self.timeout for n in admissible)

    def _gone_without_quorum(self, n: int) -> bool:
        """Member n of our quorate view went on into a newer view without us that has
        no quorum (its peers went silent to it: SIGSTOPped, cut off, and back now). No
        view without quorum fences, purges a lock or replays a journal (DLM recovery
        stops at "wait for fencing"), so its state is still that of our view: it is
        merged back (as `merged` in the proposal) rather than removed, which would
        fence and expel a node that did nothing wrong. It accepts only if no quorate
        view came between (promises.py, _follows)."""
        p = self._peers.get(n)
        return (self.state == MEMBER and self.view.quorate and p is not None
                and p.state == MEMBER and p.inc == self._incs.get(n) and not p.quorate
                and p.gen > self.view.generation and self.node_id not in p.members)

    def _proposal_body(self, gen: int, target: frozenset[int], base: frozenset[int]
                       ) -> dict[str, Any]:
        members = {n: (self.incarnation if n == self.node_id
                       else self._incs[n] if n in base else self._peers[n].inc)
                   for n in target}
        # a member that announced a clean leave goes without fencing, and its vote with
        # it (only then: a failed node keeps its vote, so the survivors of a failure
        # never count themselves a majority of a smaller cluster)
        clean = {n: self._incs[n] for n in base - target if self._left_cleanly(n)}
        voters = self._expected if self.state == MEMBER else self.node_ids
        expected = (voters - set(clean)) | target
        quorate = self._quorate(target, expected)
        pending = dict(self._pending_fence)
        for n in base - target:
            if n not in clean:
                pending[n] = self._incs[n]
        for n in list(pending):
            if n in target:
                # same incarnation: merged back from a non-quorate partition (it granted
                # nothing); new incarnation: the old process is gone (the new one owns the
                # node's address). Either way there is nothing left to fence.
                del pending[n]
        removed = dict(self._removed)
        if quorate:
            removed.update(pending)   # a quorate view expels what it removes
        # base, bkey and prior tie the view to the one it follows: a member of the
        # base installs it only from exactly that view (catching up on `prior`, the
        # view we installed, if it missed its activation), so members that carry on
        # together deliver the same sequence of views
        return {"gen": gen, "coord": self.node_id, "cinc": self.incarnation,
                "members": members, "base": sorted(base), "bkey": list(self._view_key),
                "bfenced": self._fenced_here, "quorate": quorate, "removed": removed,
                "fence": pending, "prior": self._view_body, "expected": sorted(expected),
                "clean": clean,
                "merged": {n: self._incs[n] for n in target & base
                           if self._gone_without_quorum(n)}}

    def _superseded(self, key: Key, body: Mapping[str, Any]) -> bool:
        """True if we may no longer decide this proposal: we promised a newer one,
        installed another view meanwhile, or were expelled."""
        return (self._promised != key or self.state in (EXPELLED, LEAVING)
                or self._view_key != body_key_of_base(body))

    async def _activate(self, body: dict[str, Any], others: list[int]) -> None:
        """Every member holds the proposal: it is decided. Tell the members and install
        it; each member relays the activation once (see _on_activate), so one member
        that got it is enough for all of them to get it, even if we die now. It
        carries the Fenced we delivered in the base view (see _deliver_base_fenced)."""
        activation = dict(body, bfenced=self._fenced_for(body), prior=None)
        for n in others:
            await self._send(n, MsgType.VIEW_ACTIVATE, activation)
        self._install(activation)

    def _round_failed(self, gen: int, refused: set[int], missing: set[int],
                      replies: Mapping[int, Mapping[str, Any]], learned: bool,
                      started: float, members: Mapping[int, int]) -> None:
        self.proposals_failed += 1
        now = trio.current_time()
        # cannot follow our view at all (missed more than one view), or no answer:
        # leave it out of the next proposal - but a target we heard from during the
        # round is alive, and only a message was lost: ask it again, a few rounds in
        # a row (a link that carries its heartbeats but never our proposals, an
        # asymmetric cut, is then suspected too). Left out of a quorate view, a live
        # node is expelled and must restart.
        behind = {n for n in refused if replies[n].get("why") == BEHIND}
        for n in replies:
            self._unanswered.pop(n, None)
        retried = {n for n in missing if self._heard_since(n, members[n], started)
                   and self._unanswered.get(n, 0) + 1 < ROUNDS_BEFORE_SUSPECT}
        for n in retried:
            self._unanswered[n] = self._unanswered.get(n, 0) + 1
        for n in (missing - retried) | behind:
            self._unanswered.pop(n, None)
            self._suspect_until[n] = now + self.timeout
        log.info("node %d gen %d: proposal %d failed (refused by %s, no answer from %s, "
                 "behind %s, asked again %s, learned %s)", self.node_id,
                 self.view.generation, gen, sorted(refused), sorted(missing), sorted(behind),
                 sorted(retried), learned)

    def _heard_since(self, n: int, inc: int, since: float) -> bool:
        """A heartbeat of incarnation inc of node n arrived after `since`."""
        p = self._peers.get(n)
        return p is not None and p.inc == inc and p.last_seen > since

    async def _phase(self, key: Key, others: list[int], mtype: int, body: Any,
                     members: Mapping[int, int]
                     ) -> tuple[dict[int, Mapping[str, Any]], set[int]]:
        """Send to every other target and collect their answers; (answers, missing)."""
        self._acks_key = (key, mtype)
        self._acks_incs = members
        self._acks = {}
        self._acks_changed = trio.Event()
        for n in others:
            await self._send(n, mtype, body)
        with trio.move_on_after(max(self.timeout / 2, 2 * self.interval)):
            # wait for every answer, refusals included: what each target holds counts
            while not all(n in self._acks for n in others):
                await self._acks_changed.wait()
                self._acks_changed = trio.Event()
        acks = self._acks
        self._acks = None
        return acks, {n for n in others if n not in acks}

    @guarded
    async def _on_ack(self, env: Envelope) -> None:
        b = env.body
        self._max_gen = max(self._max_gen, int(b["max_gen"]))
        if self._acks is None or ((int(b["gen"]), int(b["coord"]), int(b["cinc"])),
                                  int(b["phase"])) != self._acks_key:
            return
        if self._acks_incs.get(env.sender) != int(b["inc"]):
            return      # from an earlier life of that node
        self._acks[env.sender] = b
        self._acks_changed.set()

    async def _learn_from(self, replies: Mapping[int, Mapping[str, Any]]) -> bool:
        """Take in what the targets know and we do not. True if that changes our state
        (the proposal, built on what we knew, is then dropped and rebuilt)."""
        for r in replies.values():
            v = r.get("view")
            if v is not None and int(v["gen"]) > self.view.generation and self._can_install(v):
                log.info("node %d gen %d: catching up on view %d (installed by a target)",
                         self.node_id, self.view.generation, int(v["gen"]))
                self._install(v)
                return True
        learned = self._learn_fenced(replies)
        # after the Fenced: a view we finish carries it (see _fenced_for)
        return await self._complete_held(replies) or learned

    def _learn_fenced(self, replies: Mapping[int, Mapping[str, Any]]) -> bool:
        """A target of our view delivered its Fenced and we did not (its coordinator was
        cut off from us): deliver it too, so the next view carries it. True if so."""
        for r in replies.values():
            fenced = r.get("fenced")
            if (fenced is not None and self._fenced_here is None and self.state == MEMBER
                    and tuple(r["vkey"]) == self._view_key):
                self._fence_done(self.view.generation, frozenset(int(n) for n in fenced))
                return True
        return False

    def _fenced_for(self, b: Mapping[str, Any]) -> list[int] | None:
        """The Fenced that view b carries for its base view: the one we delivered there
        if we hold that view (it may be newer than b's proposal), else its proposer's."""
        if self._view_key == body_key_of_base(b) and self._fenced_here is not None:
            return self._fenced_here
        fenced = b.get("bfenced")
        return None if fenced is None else [int(n) for n in fenced]

    async def _complete_held(self, replies: Mapping[int, Mapping[str, Any]]) -> bool:
        """A view some targets committed but nobody we can reach installed: its
        coordinator died or was cut off between commit and activation. If every target
        that is one of its members committed it (or installed it), it may have been
        decided: finish it (install, activate) so that all its members deliver it.
        If one of them did not, it can never be decided (that member promised us a
        newer generation and refuses its commit): forget it."""
        mine = self._tentative
        held = [mine] if mine is not None and self._follows(mine) else []
        held += [r["held"] for r in replies.values() if r.get("held") is not None]
        held = [h for h in held if int(h["gen"]) > self.view.generation]
        if not held:
            return False
        h = max(held, key=body_key)
        key = body_key(h)
        for n in h["members"]:
            n = int(n)
            if n == self.node_id:
                has = self._tentative is not None and body_key(self._tentative) == key
            elif n in replies:
                r = replies[n]
                has = (tuple(r["vkey"]) == key
                       or r.get("held") is not None and body_key(r["held"]) == key)
            else:
                continue
            if not has:
                return False
        log.info("node %d gen %d: completing view %d of node %d (committed, coordinator "
                 "gone before activating it)", self.node_id, self.view.generation, key[0],
                 key[1])
        activation = dict(h, bfenced=self._fenced_for(h), prior=None)
        for n in h["members"]:
            if int(n) != self.node_id:
                await self._send(int(n), MsgType.VIEW_ACTIVATE, activation)
        if self._can_install(activation):
            self._install(activation)
        return True
