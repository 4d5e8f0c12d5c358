"""The state one fsck run shares between passes, and the range rules every
block pointer is held to."""

from __future__ import annotations

from dataclasses import dataclass, field

from clusterfs.format.superblock import Superblock
from clusterfs.fsck.blockmap import BlockMap, describe
from clusterfs.fsck.reader import Reader
from clusterfs.fsck.report import Problem, Report
from clusterfs.fsck.rgrps import Group


@dataclass
class Context:
    sb: Superblock
    reader: Reader
    report: Report
    bmap: BlockMap
    groups: list[Group] = field(default_factory=list)
    # the walk could not follow something (unreadable inode, leaf, extent block):
    # blocks it did not reach may still be in use, so leaks are not cleared
    incomplete: bool = False
    # inode fields --repair rewrites: ino -> {field: value}, and the problems they fix
    inode_fixes: dict[int, dict[str, int]] = field(default_factory=dict)
    fix_problems: dict[int, list[Problem]] = field(default_factory=dict)
    # inodes listed in the slots' orphan blocks (unlinked while open) -> slot
    orphans: dict[int, int] = field(default_factory=dict)

    def fix_inode(self, ino: int, name: str, value: int, problem: Problem) -> None:
        self.inode_fixes.setdefault(ino, {})[name] = value
        self.fix_problems.setdefault(ino, []).append(problem)

    def group_of(self, blkno: int) -> Group | None:
        if blkno < self.sb.rgrp_start:
            return None
        index = self.sb.rgrp_of(blkno)
        return self.groups[index] if index < len(self.groups) else None

    def placement_problem(self, start: int, count: int) -> str | None:
        """Why blocks start..start+count-1 cannot belong to a file, or None.

        They must lie in one group's data area: not before the groups (superblock,
        heartbeats, journals), not past the end, not over a header or bitmap."""
        end = start + count
        if count <= 0:
            return f"empty run at {start}"
        if start < self.sb.rgrp_start:
            return f"block {start} is before the resource groups (superblock/journals)"
        if end > self.sb.total_blocks:
            return f"blocks {start}..{end - 1} run past the end ({self.sb.total_blocks})"
        group = self.group_of(start)
        if group is None:
            return f"block {start} is in no resource group"
        if start < group.data_start:
            return f"block {start} is rgrp {group.index}'s header/bitmap"
        if end > group.end:
            return f"blocks {start}..{end - 1} cross the end of rgrp {group.index}"
        return None

    def bitmap_says(self, blkno: int) -> str:
        group = self.group_of(blkno)
        if group is None or group.bits is None:
            return "unknown in bitmap"
        rel = blkno - group.first
        return "used in bitmap" if group.bits[rel >> 3] & (1 << (rel & 7)) else "free in bitmap"

    def claim(self, start: int, count: int, owner: int, what: str) -> str | None:
        """Claim a run for inode `owner`; a description of the collision, or None."""
        other = self.bmap.claim(start, count, owner, what)
        if other is None:
            return None
        span = f"block {start}" if count == 1 else f"blocks {start}..{start + count - 1}"
        return f"{what} {span} already used by {describe(other)}"
