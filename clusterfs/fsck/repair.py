"""Writing fixes: whole blocks with fresh checksums, crash-safe where possible.

Each fix is a unit of blocks that must change together: one inode block, or
one group's header with its bitmap blocks. Units go through a clean journal
slot as one transaction each (the journal layer's Journal: log, commit,
checkpoint home, mark clean), so a crash mid-repair leaves every unit either
fully applied or replayable by the next mount or fsck. Without a usable
journal the units are written home directly, inodes first and groups last,
with a flush after each: a crash then leaves at most a wrong free count or a
leak, which the next fsck finds and fixes.

Inode fixes patch the fixed fields of the block as read (nothing else in the
block changes), then reseal it with the format's `seal`.
"""

from __future__ import annotations

from clusterfs.format.block import BlockType, header_of, seal
from clusterfs.format.inode import INODE_FIELDS
from clusterfs.format.rgrp import encode_bitmap, encode_rgrp, split_bitmap
from clusterfs.format.superblock import Superblock
from clusterfs.fsck.bitmaps import GroupFix
from clusterfs.fsck.report import Report
from clusterfs.storage.device import BlockDevice

try:
    from clusterfs.journal.log import Journal
except ImportError:  # pragma: no cover - only before the journal layer landed
    Journal = None

_FIELD_INDEX = {"nlink": 3, "size": 6, "blocks": 7, "parent": 10}   # in INODE_FIELDS
_HEADER_SIZE = 32

Unit = dict[int, bytes]


def inode_unit(raw: bytes, ino: int, fields: dict[str, int]) -> Unit:
    buf = bytearray(raw)
    values = list(INODE_FIELDS.unpack_from(buf, _HEADER_SIZE))
    for name, value in fields.items():
        values[_FIELD_INDEX[name]] = value
    INODE_FIELDS.pack_into(buf, _HEADER_SIZE, *values)
    seq = header_of(buf)[4]
    return {ino: bytes(seal(buf, BlockType.INODE, ino, seq))}


def group_unit(fix: GroupFix) -> Unit:
    header = fix.group.header
    assert header is not None
    header.free = fix.free
    unit = {header.first: bytes(encode_rgrp(header))}
    for i, piece in enumerate(split_bitmap(fix.bits, header.bitmap_blocks)):
        blk = header.first + 1 + i
        unit[blk] = bytes(encode_bitmap(piece, blk))
    return unit


def write_units(dev: BlockDevice, sb: Superblock, units: list[Unit], clean_slots: list[int],
                report: Report) -> None:
    """Apply units in order; StorageError/JournalError propagate (nothing is marked fixed)."""
    if not units:
        return
    if Journal is not None and clean_slots:
        _through_journal(dev, sb, units, clean_slots[0])
        report.note(f"repairs: {len(units)} transactions through journal {clean_slots[0]}")
        return
    for unit in units:
        for blkno, data in sorted(unit.items()):
            dev.write(blkno, data)
        dev.flush()
    report.note(f"repairs: {len(units)} units written in place (no clean journal to use)")


def _through_journal(dev: BlockDevice, sb: Superblock, units: list[Unit], slot: int) -> None:
    journal = Journal(dev, sb, slot)
    journal.open()
    for unit in units:
        journal.commit(unit)   # on failure the journal stays dirty: replay finishes it
    journal.close()
