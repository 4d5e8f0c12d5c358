"""Pass 5: every group's bitmap against the blocks the walk reached.

A bit set for a block nothing reaches is a leak: space lost until fsck frees
it. A bit clear for a block something reaches is serious: the allocator will
hand the block out again and two owners will overwrite each other. Both are
reported as runs of blocks, and both are fixable by rewriting the bitmap to
match the walk -- except that leaks are not cleared when the walk was
incomplete (some inode or directory was unreadable), because then "not
reached" does not mean "not used".
"""

from __future__ import annotations

from dataclasses import dataclass, field

from clusterfs.errors import ClusterFSError
from clusterfs.format.block import BlockType, block_type
from clusterfs.format.inode import decode_inode
from clusterfs.format.rgrp import count_used, set_range
from clusterfs.fsck.blockmap import describe
from clusterfs.fsck.context import Context
from clusterfs.fsck.report import Problem
from clusterfs.fsck.rgrps import Group

# byte value -> its 8 bits as 8 bytes of 0/1, least significant bit first
_EXPAND = [bytes((b >> i) & 1 for i in range(8)) for b in range(256)]


@dataclass
class GroupFix:
    group: Group
    bits: bytearray            # the corrected bitmap
    free: int                  # its free count
    problems: list[Problem] = field(default_factory=list)


def expand(bits: bytes | bytearray, length: int) -> bytes:
    """One byte (0/1) per block of the group."""
    return b"".join(map(_EXPAND.__getitem__, bits[: -(-length // 8)]))[:length]


def compare_bitmaps(ctx: Context) -> list[GroupFix]:
    """Report mismatches; return the groups whose bitmap or free count needs rewriting."""
    fixes = []
    for group in ctx.groups:
        if group.bits is None:
            continue
        fix = _compare_group(ctx, group)
        if fix is not None:
            fixes.append(fix)
    return fixes


def _compare_group(ctx: Context, group: Group) -> GroupFix | None:
    disk = expand(group.bits, group.length)
    want = ctx.bmap.used_bytes(group.first, group.length)
    fix = GroupFix(group, bytearray(group.bits), 0)
    if disk != want:
        for start, count, used in _runs(disk, want):
            fix.problems.append(_report_run(ctx, group, fix, start, count, used))
    fix.free = group.length - count_used(fix.bits, group.length)
    free_wrong = group.header is not None and group.header.free != fix.free
    if group.free_problem is not None:
        fix.problems.append(group.free_problem)
    if not fix.problems and not free_wrong:
        return None
    return fix


def _runs(disk: bytes, want: bytes) -> list[tuple[int, int, int]]:
    """(start, count, disk bit) of each maximal run where disk and want differ."""
    runs: list[tuple[int, int, int]] = []
    i, n = 0, len(disk)
    while i < n:
        if disk[i] == want[i]:
            i += 1
            continue
        start, bit = i, disk[i]
        while i < n and disk[i] != want[i] and disk[i] == bit:
            i += 1
        runs.append((start, i - start, bit))
    return runs


def _report_run(ctx: Context, group: Group, fix: GroupFix, rel: int, count: int,
                used_on_disk: int) -> Problem:
    start = group.first + rel
    span = f"block {start}" if count == 1 else f"blocks {start}..{start + count - 1}"
    if used_on_disk:
        p = ctx.report.error(group.where, f"{span} marked used but unreachable (leaked)"
                                          f"{_what_leaked(ctx, start)}",
                             fixable=not ctx.incomplete)
        if p.fixable:
            set_range(fix.bits, rel, count, False)
        return p
    owner = ctx.bmap.owner_at(start)
    whose = f" ({describe(owner)})" if owner is not None else ""
    p = ctx.report.error(group.where, f"{span}{whose} in use but free in the bitmap "
                                      "(could be allocated twice)", fixable=True)
    set_range(fix.bits, rel, count, True)
    return p


def _what_leaked(ctx: Context, start: int) -> str:
    """Name an inode at the head of a leaked run: after a crash that is usually an
    orphan, a file unlinked while still open, allocated just before its data.
    One read per run, so a huge leak costs nothing extra."""
    try:
        raw = ctx.reader.read(start)
        if block_type(raw) != BlockType.INODE:
            return ""
        inode = decode_inode(raw, start)
    except ClusterFSError:
        return ""
    if inode.nlink == 0:
        slot = ctx.orphans.get(start)
        listed = "" if slot is None else \
            f" (in journal slot {slot}'s orphan list: a mount frees it)"
        return f"; orphan inode {start}, unlinked while open{listed}"
    return f"; unreachable inode {start} (nlink {inode.nlink})"
