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
  than a heartbeat interval spares).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from clusterfs.dlm.interface import resource_key
from clusterfs.format.block import BLOCK_SIZE
from clusterfs.format.superblock import Superblock

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
