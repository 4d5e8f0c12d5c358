"""Operations on a file's in-memory extent list (sorted, non-overlapping Extents)."""

from __future__ import annotations

from bisect import bisect_right

from clusterfs.format.extent import Extent

Run = tuple[int, int | None, int]   # (logical block, physical block or None for a hole, count)


def map_range(extents: list[Extent], lblk: int, count: int) -> list[Run]:
    """Cover [lblk, lblk+count) with mapped runs and holes, in order."""
    out: list[Run] = []
    end = lblk + count
    i = max(bisect_right(extents, (lblk, 2**64)) - 1, 0)
    pos = lblk
    while pos < end:
        if i < len(extents) and extents[i].lend <= pos:
            i += 1
            continue
        if i >= len(extents) or extents[i].lblk >= end:
            out.append((pos, None, end - pos))
            break
        e = extents[i]
        if e.lblk > pos:
            out.append((pos, None, e.lblk - pos))
            pos = e.lblk
        n = min(e.lend, end) - pos
        out.append((pos, e.pblk + (pos - e.lblk), n))
        pos += n
        i += 1
    return out


def insert(extents: list[Extent], new: Extent) -> None:
    """Add a mapping for a hole, merging with physically contiguous neighbours."""
    i = bisect_right(extents, (new.lblk, 2**64))
    if i > 0:
        prev = extents[i - 1]
        if prev.lend == new.lblk and prev.pblk + prev.count == new.pblk:
            new = Extent(prev.lblk, prev.pblk, prev.count + new.count)
            i -= 1
            del extents[i]
    if i < len(extents):
        nxt = extents[i]
        if new.lend == nxt.lblk and new.pblk + new.count == nxt.pblk:
            new = Extent(new.lblk, new.pblk, new.count + nxt.count)
            del extents[i]
    extents.insert(i, new)


def truncate(extents: list[Extent], keep_blocks: int) -> list[tuple[int, int]]:
    """Drop mappings at or past logical block keep_blocks; return freed (pblk, count)."""
    freed: list[tuple[int, int]] = []
    while extents and extents[-1].lend > keep_blocks:
        e = extents.pop()
        if e.lblk >= keep_blocks:
            freed.append((e.pblk, e.count))
        else:
            keep = keep_blocks - e.lblk
            extents.append(Extent(e.lblk, e.pblk, keep))
            freed.append((e.pblk + keep, e.count - keep))
    return freed


def mapped_blocks(extents: list[Extent]) -> int:
    return sum(e.count for e in extents)
