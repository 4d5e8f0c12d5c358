"""Reading a directory for fsck, and checking its structure on the way.

Linear directories are the inode payload. Hashed ones (extendible hashing, see
docs/format.md) are checked as a whole: the table's blocks, the runs of slots
pointing at each leaf (a leaf of local depth L fills exactly 2^(depth-L)
consecutive, aligned slots), every entry's hash against its leaf's slots, and
overflow chains. Every leaf and table block is claimed for the directory, so
a block two directories share, or a chain that loops, is caught by the block map.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from clusterfs.errors import ClusterFSError
from clusterfs.format import directory as fmt
from clusterfs.format.block import BLOCK_SIZE
from clusterfs.format.inode import F_DIR_HASHED, MAP_FLAGS, Inode
from clusterfs.fsck.context import Context


@dataclass
class DirContents:
    entries: list[fmt.DirEntry] = field(default_factory=list)
    blocks: int = 0         # blocks owned besides the inode: leaves and table blocks
    size: int = 0           # the size the inode should report
    complete: bool = True   # every leaf/table block was readable (size and links are known)


def read_directory(ctx: Context, inode: Inode) -> DirContents:
    earlier, ctx.incomplete = ctx.incomplete, False
    if inode.flags & MAP_FLAGS == F_DIR_HASHED:
        out = _read_hashed(ctx, inode)
    else:
        out = _read_linear(ctx, inode)
    out.complete = not ctx.incomplete
    ctx.incomplete = earlier or ctx.incomplete
    _check_names(ctx, inode.ino, out.entries)
    return out


def _read_linear(ctx: Context, inode: Inode) -> DirContents:
    try:
        entries = fmt.decode_linear(inode.payload)
    except ClusterFSError as exc:
        ctx.report.error(f"directory {inode.ino}", f"linear entries unreadable: {exc}")
        ctx.incomplete = True
        entries = []
    return DirContents(entries, 0, len(inode.payload))


def _check_names(ctx: Context, ino: int, entries: list[fmt.DirEntry]) -> None:
    seen: set[bytes] = set()
    for e in entries:
        if e.name in (b".", b"..") or b"/" in e.name or b"\0" in e.name:
            ctx.report.error(f"directory {ino}", f"entry with invalid name {e.name!r}")
        if e.name in seen:
            ctx.report.error(f"directory {ino}", f"name {e.name!r} appears twice")
        seen.add(e.name)


def _read_hashed(ctx: Context, inode: Inode) -> DirContents:
    where = f"directory {inode.ino}"
    try:
        depth, tables = fmt.decode_hashed_payload(inode.payload)
    except (ClusterFSError, struct.error) as exc:
        ctx.report.error(where, f"hashed directory header unreadable: {exc}")
        ctx.incomplete = True
        return DirContents()
    out = DirContents(blocks=len(tables))
    table = _read_table(ctx, inode.ino, depth, tables)
    if table is None:
        ctx.incomplete = True
        return out
    leaves = 0
    for leaf, (start, span) in _leaf_runs(ctx, inode.ino, table).items():
        leaves += _read_leaf_chain(ctx, inode.ino, depth, leaf, start, span, out.entries)
    out.blocks += leaves
    out.size = BLOCK_SIZE * (1 + leaves + len(tables))
    return out


def _read_table(ctx: Context, ino: int, depth: int, tables: list[int]) -> list[int] | None:
    table: list[int] = []
    size = 1 << depth
    for i, blk in enumerate(tables):
        n = min(fmt.TABLE_PER_BLOCK, size - i * fmt.TABLE_PER_BLOCK)
        why = ctx.placement_problem(blk, 1) or ctx.claim(blk, 1, ino, "hash table block")
        if why is None:
            try:
                table += fmt.decode_table_block(ctx.reader.read(blk), blk, n)
                continue
            except ClusterFSError as exc:
                why = str(exc)
        ctx.report.error(f"directory {ino}", f"hash table block {i} ({blk}): {why}")
        return None
    return table


def _leaf_runs(ctx: Context, ino: int, table: list[int]) -> dict[int, tuple[int, int]]:
    """leaf address -> (first slot, number of consecutive slots pointing at it)."""
    runs: dict[int, tuple[int, int]] = {}
    slot = 0
    while slot < len(table):
        leaf, start = table[slot], slot
        while slot < len(table) and table[slot] == leaf:
            slot += 1
        if leaf in runs:
            ctx.report.error(f"directory {ino}", f"leaf {leaf} is in slots {runs[leaf][0]}.. "
                                                 f"and again in non-adjacent slot {start}")
            ctx.incomplete = True
            continue
        runs[leaf] = (start, slot - start)
    return runs


def _read_leaf_chain(ctx: Context, ino: int, depth: int, blk: int, start: int, span: int,
                     entries: list[fmt.DirEntry]) -> int:
    """Read a leaf and its overflow chain; return how many leaves were read."""
    where = f"directory {ino}"
    slots = f"slots {start}..{start + span - 1}"
    count = 0
    if blk == 0:
        ctx.report.error(where, f"{slots} point to no leaf")
        ctx.incomplete = True
    while blk:
        why = ctx.placement_problem(blk, 1) or ctx.claim(blk, 1, ino, "directory leaf")
        if why is None:
            try:
                ldepth, nxt, ents = fmt.decode_leaf(ctx.reader.read(blk), blk)
            except ClusterFSError as exc:
                why = str(exc)
        if why is not None:
            ctx.report.error(where, f"leaf for {slots}: {why}")
            ctx.incomplete = True
            return count
        count += 1
        if ldepth > depth or span != 1 << (depth - ldepth) or start % span:
            ctx.report.error(where, f"leaf {blk}: local depth {ldepth}, but {slots} point to "
                                    f"it (table depth {depth})")
        for e in ents:
            slot = fmt.table_slot(fmt.name_hash(e.name), depth)
            if not start <= slot < start + span:
                ctx.report.error(where, f"leaf {blk}: entry {e.name!r} hashes to slot {slot}, "
                                        f"not {slots}: lookups cannot find it")
        entries += ents
        blk = nxt
    return count
