"""Placement: which node is at home in which part of the shared disk.

Each configured node gets its own stretch of resource groups, by its rank among
the configured node ids: it allocates its new inodes and blocks there, and it is
the DLM directory node (so, asking first, the master) of the locks on the inodes
and groups of that stretch while it is a member. A node working on what it
created then locks without a network round trip; another node's files cost one,
as before. The mapping depends only on the config's node list and the device's
geometry, so every member computes the same directory node for every name (the
DLM requires that).
"""

from __future__ import annotations

from clusterfs.format.superblock import Superblock

LOCATED_KINDS = (b"inode", b"iopen", b"data")     # resources named by a block number


class Placement:
    def __init__(self, sb: Superblock, node_ids: list[int] | tuple[int, ...]) -> None:
        self.sb = sb
        self.nodes = sorted(node_ids)

    def home_group(self, node_id: int) -> int:
        """The first group of the node's stretch: ceil(rank * groups / nodes), the
        smallest group that node_of_group maps back to it."""
        rank = self.nodes.index(node_id)
        return min(-(-rank * self.sb.rgrp_count // len(self.nodes)), self.sb.rgrp_count - 1)

    def node_of_group(self, group: int) -> int:
        return self.nodes[min(group * len(self.nodes) // self.sb.rgrp_count,
                              len(self.nodes) - 1)]

    def dir_hint(self, key: bytes) -> int | None:
        """The lockspace's directory hint (dlm new_lockspace): the node at home where
        an inode or a resource group lies; None for anything else."""
        kind, _, number = key.partition(b":")
        if not number.isdigit():
            return None
        if kind == b"rgrp":
            group = int(number)
        elif kind in LOCATED_KINDS:
            blkno = int(number)
            if not self.sb.rgrp_start <= blkno < self.sb.total_blocks:
                return None
            group = self.sb.rgrp_of(blkno)
        else:
            return None
        if not 0 <= group < self.sb.rgrp_count:
            return None
        return self.node_of_group(group)
