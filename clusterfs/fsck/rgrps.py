"""Pass 2: resource-group headers and bitmaps.

Every header and bitmap block must decode (checksum, type, own address); the
header must describe the group the superblock's geometry puts there; the
header and bitmap blocks must be marked used in the bitmap, as must the bits
past a short last group's end; the header's free count must equal the clear
bits. Whether each used bit belongs to something is pass 5 (bitmaps.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from clusterfs.errors import ClusterFSError
from clusterfs.format.rgrp import (
    BITMAP_BYTES,
    RgrpHeader,
    bitmap_blocks_for,
    count_used,
    decode_bitmap,
    decode_rgrp,
)
from clusterfs.format.superblock import Superblock
from clusterfs.fsck.blockmap import BlockMap
from clusterfs.fsck.reader import Reader
from clusterfs.fsck.report import Problem, Report


@dataclass
class Group:
    index: int
    first: int
    length: int
    bitmap_blocks: int
    header: RgrpHeader | None            # None: the header block is unreadable
    bits: bytearray | None               # the whole bitmap; None if a bitmap block is bad
    free_problem: Problem | None = None  # header free count wrong (fixed by repair)

    @property
    def data_start(self) -> int:
        return self.first + 1 + self.bitmap_blocks

    @property
    def end(self) -> int:
        return self.first + self.length

    @property
    def where(self) -> str:
        return f"rgrp {self.index}"


def load_groups(reader: Reader, sb: Superblock, bmap: BlockMap, report: Report) -> list[Group]:
    groups = []
    for index in range(sb.rgrp_count):
        first, length = sb.rgrp_location(index)
        bm = bitmap_blocks_for(length)
        bmap.mark_metadata(first, 1, f"rgrp {index} header")
        bmap.mark_metadata(first + 1, bm, f"rgrp {index} bitmap")
        group = Group(index, first, length, bm, _load_header(reader, index, first, length, bm,
                                                              report), None)
        group.bits = _load_bitmap(reader, group, report)
        _check_counts(group, report)
        groups.append(group)
    return groups


def _load_header(reader: Reader, index: int, first: int, length: int, bm: int,
                 report: Report) -> RgrpHeader | None:
    where = f"rgrp {index}"
    try:
        h = decode_rgrp(reader.read(first), first)
    except ClusterFSError as exc:
        report.error(where, f"header block {first}: {exc}")
        return None
    if h.index != index or h.length != length or h.bitmap_blocks != bm:
        report.error(where, f"header block {first} says group {h.index}, {h.length} blocks, "
                            f"{h.bitmap_blocks} bitmap blocks; expected {index}, {length}, {bm}")
        return None
    return h


def _load_bitmap(reader: Reader, group: Group, report: Report) -> bytearray | None:
    bits = bytearray()
    ok = True
    for i in range(group.bitmap_blocks):
        blk = group.first + 1 + i
        try:
            bits += decode_bitmap(reader.read(blk), blk)
        except ClusterFSError as exc:
            report.error(group.where, f"bitmap block {blk}: {exc}")
            bits += bytes(BITMAP_BYTES)
            ok = False
    return bits if ok else None


def _check_counts(group: Group, report: Report) -> None:
    bits = group.bits
    if bits is None:
        return
    tail = len(bits) * 8 - group.length
    if tail and count_used(bits, len(bits) * 8) - count_used(bits, group.length) != tail:
        report.error(group.where, f"bits past the group's last block ({group.end - 1}) "
                                  "are not all set")
    free = group.length - count_used(bits, group.length)
    if group.header is not None and group.header.free != free:
        group.free_problem = report.error(
            group.where, f"header free count {group.header.free}, bitmap has {free} "
                         "free blocks", fixable=True)
