"""Block allocation in resource groups.

Each group's header and bitmap are loaded under its ("rgrp", n) lock and logged
as metadata when they change. Freed blocks are cleared in the on-disk bitmap at
once (in the freeing transaction) but stay unavailable ("quarantined") until the
next journal checkpoint: until then a replay of an older transaction could
rewrite a freed metadata block over its new contents.
"""

from __future__ import annotations

import errno
import re

from clusterfs.errors import FSError
from clusterfs.format.block import BLOCK_SIZE
from clusterfs.format.rgrp import (
    BITMAP_BYTES,
    RgrpHeader,
    count_used,
    decode_bitmap,
    decode_rgrp,
    encode_bitmap,
    encode_rgrp,
    set_range,
)
from clusterfs.format.superblock import Superblock

_NOT_FULL = re.compile(rb"[^\xff]")
# A group's free count in its lock's value block: magic + little-endian count, so a
# never-written (all zero) block is told apart from "0 free".
LVB_MAGIC = b"RGF1"
SLACK = 64


def encode_free_lvb(free: int) -> bytes:
    return (LVB_MAGIC + free.to_bytes(8, "little")).ljust(32, b"\0")


def decode_free_lvb(lvb: bytes) -> int | None:
    """The free count a group's last EX holder left in its lock value block, or None
    if none did (a never-written block)."""
    if lvb[:4] != LVB_MAGIC:
        return None
    return int.from_bytes(lvb[4:12], "little")



class ResourceGroup:
    """One group's header and whole bitmap, as loaded under its lock."""

    def __init__(self, header: RgrpHeader, bits: bytearray) -> None:
        self.header = header
        self.bits = bits                              # 1 = used or quarantined
        self.quarantine: list[tuple[int, int]] = []   # (relative start, count)
        self.quarantined = 0
        self.free = header.length - count_used(bits, header.length)
        # every bitmap byte below this one is full: a search for a free bit starts
        # here, not at the group's start (a cluster node aims every new inode at its
        # home group's first block, and scanned all that it had filled, each time)
        self.full_below = 0

    @classmethod
    def load(cls, read, first: int) -> ResourceGroup:
        header = decode_rgrp(read(first), first)
        bits = bytearray()
        for i in range(header.bitmap_blocks):
            bits += decode_bitmap(read(first + 1 + i), first + 1 + i)
        group = cls(header, bits)
        if group.free != header.free:
            # header and bitmap disagree: trust the bitmap, fsck will say so
            header.free = group.free
        return group

    @property
    def index(self) -> int:
        return self.header.index

    def block_estimate(self) -> int:
        return 1 + self.header.bitmap_blocks

    def to_blocks(self) -> dict[int, bytes]:
        bits = self.bits
        if self.quarantine:
            bits = bytearray(bits)
            for start, count in self.quarantine:
                set_range(bits, start, count, False)
        self.header.free = self.free + self.quarantined
        out = {self.header.first: bytes(encode_rgrp(self.header))}
        for i in range(self.header.bitmap_blocks):
            blk = self.header.first + 1 + i
            out[blk] = bytes(encode_bitmap(bits[i * BITMAP_BYTES : (i + 1) * BITMAP_BYTES], blk))
        return out

    def find_run(self, goal: int, want: int) -> tuple[int, int] | None:
        """(relative start, length ≤ want) of a free run, preferring `goal` (relative)."""
        if self.free == 0:
            return None
        bits = self.bits
        floor = self.full_below
        at_goal = max(goal // 8, floor)
        if want >= 16:
            zeros = bytes(min(want // 8, 64))
            pos = bits.find(zeros, at_goal)
            if pos < 0:
                pos = bits.find(zeros, floor)
            if pos >= 0:
                start = pos * 8
                return self._extend(start, want)
        for begin in (at_goal, floor):
            m = _NOT_FULL.search(bits, begin)
            if m:
                byte = m.start()
                if begin == floor:
                    self.full_below = byte
                value = bits[byte]
                bit = (~value & (value + 1)).bit_length() - 1   # lowest clear bit
                start = byte * 8 + bit
                if start < self.header.length:
                    return self._extend(start, want)
        return None

    def _extend(self, start: int, want: int) -> tuple[int, int]:
        """Length of the free run from start, up to want."""
        bits = self.bits
        end = start
        limit = min(start + want, self.header.length)
        while end < limit:
            if end % 8 == 0 and end + 8 <= limit and bits[end >> 3] == 0:
                end += 8
                continue
            if bits[end >> 3] & (1 << (end & 7)):
                break
            end += 1
        return start, end - start

    def take(self, start: int, count: int) -> None:
        set_range(self.bits, start, count)
        self.free -= count

    def give_back(self, start: int, count: int) -> None:
        """Blocks allocatable again: taken and never used (no quarantine needed), or
        out of quarantine."""
        set_range(self.bits, start, count, False)
        self.free += count
        self.full_below = min(self.full_below, start // 8)

    def release(self, start: int, count: int) -> None:
        self.quarantine.append((start, count))
        self.quarantined += count

    def end_quarantine(self, upto: int) -> None:
        """Make the first `upto` quarantined ranges allocatable again."""
        for start, count in self.quarantine[:upto]:
            self.give_back(start, count)
            self.quarantined -= count
        del self.quarantine[:upto]


class Allocator:
    def __init__(self, sb: Superblock) -> None:
        self.sb = sb
        self.groups: dict[int, ResourceGroup] = {}       # loaded (locked) groups
        self.free_hint: list[int] = [0] * sb.rgrp_count   # last known free per group
        self.dirty: list[ResourceGroup] = []
        # the groups the running operation holds locks on: the only ones it may
        # allocate from or free into (a loaded group whose lock is cached but not
        # held may be half-way through a demote)
        self.usable: set[int] = set()

    def group_of(self, blkno: int) -> int:
        return self.sb.rgrp_of(blkno)

    def groups_for(self, goal: int, want: int) -> list[int]:
        """Groups to lock for allocating `want` blocks near `goal`: the goal's group
        and following ones until their known free space covers the request with
        SLACK to spare (a cascade of directory splits may take more blocks than the
        operation reserved, and it may allocate only in the groups it holds)."""
        want += SLACK
        first = self.group_of(goal) if goal >= self.sb.rgrp_start else 0
        first = min(max(first, 0), self.sb.rgrp_count - 1)
        chosen, total = [], 0
        for k in range(self.sb.rgrp_count):
            index = (first + k) % self.sb.rgrp_count
            if self.free_hint[index] > 0 or index not in self.groups:
                chosen.append(index)
                total += self.free_hint[index]
                if total >= want and len(chosen) >= 1:
                    break
        return chosen or [first]

    def allocate(self, goal: int, want: int, mark_dirty) -> tuple[int, int]:
        """One contiguous run (absolute start, count ≤ want) near goal; ENOSPC if none.
        Only the groups the operation holds are searched."""
        order = sorted(self.usable & self.groups.keys(),
                       key=lambda i: (i != self.group_of(goal), i))
        for index in order:
            group = self.groups[index]
            rel_goal = goal - group.header.first if index == self.group_of(goal) else 0
            found = group.find_run(rel_goal, want)
            if found is not None:
                start, count = found
                group.take(start, count)
                self.free_hint[index] = group.free
                mark_dirty(group)
                return group.header.first + start, count
        raise FSError(errno.ENOSPC, "no free blocks")

    def release(self, start: int, count: int, mark_dirty) -> None:
        while count > 0:
            index = self.group_of(start)
            if index not in self.usable:
                raise FSError(errno.EIO, f"freeing block {start} in group {index}, "
                              "whose lock the operation does not hold")
            group = self.groups[index]
            rel = start - group.header.first
            n = min(count, group.header.length - rel)
            group.release(rel, n)
            mark_dirty(group)
            start += n
            count -= n

    def quarantine_mark(self) -> dict[int, int]:
        """How many ranges each group has quarantined now (see end_quarantine)."""
        return {i: len(g.quarantine) for i, g in self.groups.items() if g.quarantine}

    def end_quarantine(self, mark: dict[int, int] | None) -> None:
        """Release the ranges counted in `mark`: their freeing transactions are
        committed and the log was checkpointed past every older copy of them."""
        for index, upto in (mark or {}).items():
            group = self.groups.get(index)
            if group is not None:
                group.end_quarantine(upto)
                self.free_hint[index] = group.free

    @property
    def quarantined(self) -> int:
        return sum(g.quarantined for g in self.groups.values())

    def free_blocks(self) -> int:
        return sum(g.free + g.quarantined if i in self.groups else self.free_hint[i]
                   for i, g in ((i, self.groups.get(i)) for i in range(self.sb.rgrp_count)))

    def data_blocks(self) -> int:
        return self.sb.total_blocks - self.sb.rgrp_start

    def drop(self, index: int) -> None:
        self.groups.pop(index, None)


def bytes_to_blocks(n: int) -> int:
    return -(-n // BLOCK_SIZE)
