"""Wiring a proxy mount to the cluster (docs/storage.md, "Preferred servers").

A node outside the storage group reaches the disk through a ProxyDevice
(clusterfs.storage.proxy). Three layers meet here, and only the node layer may
join them:

- the filesystem's lock names decide which resource covers a block: the journal
  of slot s (("journal", s)), resource group n (("rgrp", n): its header, bitmap
  and everything allocated in it), else the fixed area (("live",), held by every
  mounted node); `covering_resource` turns the superblock's geometry into that map;
- the DLM names a preferred server in every grant (clusterfs.dlm.routing): each
  name goes to the device (`ProxyDevice.prefer`), which routes the I/O of the
  resource's region by it;
- when the device finds a server silent (`on_silent`, from whatever thread did
  the I/O), the masters are asked to name another server for the locks that named
  it (`Lockspace.reprefer`), and membership is told to look at that node
  (`MembershipService.suspect`) by the rule the DLM's answers follow
  (clusterfs/dlm/watch.py): a probe only if it has also been silent - not even a
  heartbeat heard - for as long as it owed the I/O its answer (`quiet`; one that
  refused, or whose connection broke: for a heartbeat interval). A server that
  answers late, or refuses, while its heartbeats arrive is alive: re-targeting
  from it is enough, and a probe would only be answered. A stopped server's
  heartbeats stopped before its I/O was due, so that one is probed as soon as
  before (membership/detection.py has the one exception, and what a quiet shorter
  than a heartbeat interval spares);
- when the survivors' fence of a removed server is done (membership's Fenced
  event, on every member), the device hears of it (`ProxyDevice.server_fenced`):
  only then do the writes that server may still have had under way count as
  settled, and the newer writes of their bytes go out (`follow_fences`);
- a block server whose disk hangs (one of its device I/Os under way longer than
  `[storage] disk_timeout`) stops serving and fences itself (`fence_self`), as
  OCFS2's o2hb does when its heartbeat write times out and SBD when its watchdog
  is not fed: the proxies re-target, the survivors remove and fence it, and the
  writes held behind its stalled one settle by that fence.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import trio

from clusterfs.dlm.interface import resource_key
from clusterfs.format.block import BLOCK_SIZE
from clusterfs.format.superblock import Superblock
from clusterfs.membership.view import Fenced

log = logging.getLogger("clusterfs.mount")


def covering_resource(sb: Superblock) -> Callable[[int], bytes]:
    """offset -> the key of the lock resource whose region holds that byte."""
    journal_end = sb.journal_start + sb.journal_count * sb.journal_blocks
    journals = [resource_key(("journal", s)) for s in range(sb.journal_count)]
    groups = [resource_key(("rgrp", g)) for g in range(sb.rgrp_count)]
    fixed = resource_key(("live",))

    def locate(offset: int) -> bytes:
        blkno = offset // BLOCK_SIZE
        if sb.journal_start <= blkno < journal_end:
            return journals[(blkno - sb.journal_start) // sb.journal_blocks]
        if blkno >= sb.rgrp_start:
            return groups[min(sb.rgrp_of(blkno), len(groups) - 1)]
        return fixed

    return locate


def wire_proxy(dev: Any, sb: Superblock, ls: Any, membership: Any) -> None:
    """Route `dev`'s I/O by the grants of `ls`, and report its silent servers.
    Call from the trio thread, once the lockspace exists."""
    if not getattr(dev, "proxied", False):
        return
    dev.route_by(covering_resource(sb))
    ls.on_preferred = dev.prefer
    token = trio.lowlevel.current_trio_token()

    def look_at(server: int, waited: float) -> None:
        ls.reprefer(server)
        why = (f"block I/O not answered for {waited:g} s" if waited
               else "block I/O refused or its connection broken")
        membership.suspect(server, why, quiet=waited)

    def on_silent(server: int, waited: float) -> None:
        try:
            token.run_sync_soon(look_at, server, waited)
        except trio.RunFinishedError:
            log.debug("block server %d silent after the node stopped", server)

    dev.on_silent = on_silent


def follow_fences(dev: Any, membership: Any) -> Callable[[], Any]:
    """Hand every Fenced of `membership` to the proxy device `dev`. Subscribes now (so
    nothing published after this call is missed); returns the task to run for the
    node's lifetime (node.nursery.start_soon)."""
    events = membership.subscribe()

    async def follow() -> None:
        async for ev in events:
            if isinstance(ev, Fenced):
                dev.server_fenced(ev.nodes, ev.generation)

    return follow


def fence_self(node_id: int, why: str) -> None:
    """This node's disk hangs (its block server saw a device I/O outlast disk_timeout):
    stop it at once, as o2hb fences its node when a heartbeat write times out and
    SBD's watchdog resets a node that cannot reach its disk. A hung write may land
    at any time; while this node lives it could still write, and it cannot serve, so
    it goes: its heartbeats stop and its sockets close (once no thread of it is in a
    device call), the survivors remove it, fence it and replay its journal, and the
    proxies' writes held behind its stalled one settle by that fence. Any thread."""
    log.critical("node %d: %s; stopping this node (self-fence) so that the others fence "
                 "it and go on", node_id, why)
    for handler in logging.getLogger().handlers + log.handlers:
        try:
            handler.flush()
        except (OSError, ValueError):
            pass                           # the line is best effort; the stop is not
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
