"""A clean leave at unmount: the unmounting node tells the others it is going.

Without it a clean unmount looks like a death: the others wait `failure_timeout`,
fence the node's (already exited) process, recover, and read its (clean) journal;
and with three nodes, after two clean unmounts the third has no quorum. With it
the others install a view without the node at once, with no fencing and no
journal recovery, and its vote goes with it, so the rest stay quorate (corosync's
votequorum_leaving with allow_downscale, but for a clean leave only: a node that
fails keeps its vote).

The promise a leave makes: this node will never write to the shared disk again in
this life. So it is made only when that is checked, here, after the filesystem
was shut down: the journal head on the disk says clean, the filesystem did not
withdraw, and the lockspace holds no lock of ours. Otherwise the node simply goes,
and the others treat it as a failure (fence, recover, replay): slower, never unsafe.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("clusterfs.mount")


def why_not_clean(ls: Any, dev: Any, sb: Any, slot: int, withdrawn: bool) -> str | None:
    """Why this node may not leave cleanly, or None if it may."""
    from clusterfs.errors import ClusterFSError
    from clusterfs.format.journal import JF_CLEAN, decode_jhead

    if withdrawn:
        return "the filesystem withdrew"
    owned = ls.statistics().owned_locks
    if owned:
        return f"{owned} locks still held"
    start = sb.journal_location(slot)
    try:
        clean = decode_jhead(dev.read(start), start).flags & JF_CLEAN
    except ClusterFSError as exc:
        return f"journal {slot} unreadable: {exc}"
    return None if clean else f"journal {slot} not marked clean"


async def leave_cleanly(membership: Any, ls: Any, dev: Any, sb: Any, slot: int,
                        withdrawn: bool, timeout: float, disk: Any = None) -> bool:
    """Announce the leave if it is honest (see the module doc); True once the others
    installed a view without us. Once announced, the disk heartbeat stops too (a last
    STOPPED beat): on the disk as on the network, we are gone, not dead."""
    why = why_not_clean(ls, dev, sb, slot, withdrawn)
    if why is not None:
        log.warning("not leaving the cluster cleanly (%s): the others will take this "
                    "node for dead, fence it and recover its journal", why)
        return False
    return await _announce(membership, timeout, disk)


async def leave_unmounted(membership: Any, ls: Any, timeout: float, disk: Any = None) -> bool:
    """A mount refused after it joined, before it claimed a journal slot (all taken):
    it wrote nothing to the shared disk and has no journal, so once it holds no lock
    it leaves as a clean unmount does, and the others neither fence it nor wait for
    the failure timeout (they used to, and the refused process died by their fence,
    its exit status lost)."""
    owned = ls.statistics().owned_locks
    if owned:
        log.warning("not leaving the cluster cleanly (%d locks still held): the others "
                    "will take this node for dead and fence it", owned)
        return False
    return await _announce(membership, timeout, disk)


async def _announce(membership: Any, timeout: float, disk: Any) -> bool:
    left = await membership.leave(timeout)
    if disk is not None and membership.state == "leaving":
        await disk.stop()
    return left
