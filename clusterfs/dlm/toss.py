"""Tossing idle resources: a master frees a resource nobody has locked for a
while, and tells its directory node (DLM_REMOVE), as the Linux DLM's toss list.

Without it a master keeps every resource it ever mastered. With it freed too
early, every lock/unlock cycle pays a directory lookup; so a resource goes
only after it stayed idle for a whole toss period (TOSS_SECONDS, at most
twice that). The races (a request on its way to a master that just freed the
resource, a remove overtaking a newer lookup) are settled by "notmaster"
replies, `_repeat_remove` and the checks in `_receive_remove`.

Owns `ls_toss_seconds` and `ls_toss_epoch`; drops entries of `ls_mastered`,
`ls_master_of` (master.py, directory.py) and, as directory node, `ls_dir`.
A mixin of `Lockspace`.
"""

from __future__ import annotations

import os
from typing import Any

import trio

from clusterfs.wire.types import MsgType

# A master frees a resource with no locks after it stayed idle this long (and
# at most twice this long), like the Linux DLM's toss list (toss_secs = 10):
# long enough that lock/unlock cycles do not pay a directory lookup each time.
TOSS_SECONDS = float(os.environ.get("CLUSTERFS_DLM_TOSS_SECONDS", "10"))
# Resources freed per step of the toss loop, which yields between steps: after an
# orphan sweep a master may hold thousands of idle resources, and freeing them all in
# one step (each a table call, a dict update and a remove for its directory node)
# held the event loop for tens of milliseconds.
TOSS_BATCH = 256


class Toss:
    """Freeing idle resources, master and directory side (a mixin of Lockspace)."""

    async def _toss_loop(self) -> None:
        """Every toss period, free the resources idle since before the last one
        (a period spent recovering is skipped; an expelled node stops)."""
        while not self.ls_expelled:
            await trio.sleep(self.ls_toss_seconds)
            before = self._next_toss_epoch()
            while self.remove_idle_before(before, limit=TOSS_BATCH)[0] == TOSS_BATCH:
                await trio.sleep(0)

    def remove_idle_resources(self, *, everything: bool = False) -> int:
        """Free mastered resources idle for a whole toss period (all idle ones
        with everything=True) and tell their directory nodes, in one step."""
        before = self._next_toss_epoch()
        return self.remove_idle_before(before + 1 if everything else before)[1]

    def _next_toss_epoch(self) -> int:
        """Start a toss period; resources idle since before the returned epoch have
        stayed idle through a whole period."""
        self.ls_toss_epoch += 1
        self.ls_table.set_epoch(self.ls_toss_epoch)
        return self.ls_toss_epoch - 1

    def remove_idle_before(self, before: int, limit: int | None = None) -> tuple[int, int]:
        """Free up to `limit` resources idle since an epoch before `before` and tell
        the directory nodes of the mastered ones (one message per node); how many
        were freed, and how many of them we mastered. Runs only while
        locking runs, and never awaits: no request can slip in between. A request
        that comes between two calls finds its resource either still here (no
        longer idle: kept) or gone (answered "notmaster": it looks up again)."""
        if not self.ls_running:
            return 0, 0
        keys = self.ls_table.drop_idle(before, limit)
        removes: dict[int, list[bytes]] = {}
        removed = 0
        for key in keys:
            if key in self.ls_mastered:
                removed += 1
                dir_node = self._forget_mastered(key)
                if dir_node is not None:
                    removes.setdefault(dir_node, []).append(key)
        for dir_node, names in removes.items():
            self._send(dir_node, MsgType.DLM_REMOVE, {"names": names, "g": self.ls_recover_gen})
        self.stats["removed"] += removed
        return len(keys), removed

    def _forget_mastered(self, key: bytes) -> int | None:
        """We no longer master key: forget it here; the directory node that must be
        told (None: we are it, and our entry went here).

        A request already on its way (the owner found us in its cache or in the
        directory before our remove got there) is answered "notmaster" and the
        owner looks up again; per-pair FIFO puts our own later lookup behind
        the remove at the directory node."""
        self.ls_mastered.discard(key)
        self.ls_master_of.pop(key, None)
        dir_node = self._dir_node(key)
        if dir_node != self.ls_node:
            return dir_node
        if self.ls_dir.get(key) == self.ls_node:
            del self.ls_dir[key]
        return None

    def _repeat_remove(self, key: bytes) -> None:
        """A request came for a resource we do not master: the directory may
        still name us (a lost or slow remove), so say it again (Linux's
        send_repeat_remove). Not while our own lookup of it is under way: the
        directory may have just made us master."""
        if key in self.ls_lookups or key in self.ls_mastered or not self.ls_running:
            return
        dir_node = self._dir_node(key)
        if dir_node != self.ls_node:
            self._send(dir_node, MsgType.DLM_REMOVE, {"name": key, "g": self.ls_recover_gen})

    # -- the directory node's side ---------------------------------------------
    def _receive_remove(self, sender: int, body: dict[str, Any]) -> None:
        """DLM_REMOVE: the master freed idle resources ("names", or one "name");
        forget their entries.

        Only an entry naming the sender goes: a newer master (the sender's
        remove raced with a lookup that came after it) keeps its entry. A
        remove from an earlier generation is dropped: recovery rebuilt the
        directory since, from what the masters really master."""
        if self._defer(sender, MsgType.DLM_REMOVE, body):
            return
        if body.get("g") != self.ls_recover_gen:
            return
        for key in body["names"] if "names" in body else (body["name"],):
            if self._dir_node(key) == self.ls_node and self.ls_dir.get(key) == sender:
                del self.ls_dir[key]
