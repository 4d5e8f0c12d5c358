"""Pass 1b: the journals.

Each slot's header must decode (checksum, type, address) and name its slot.
A header not marked clean means a mount is using the journal or its node died.
scan_journal (the journal layer's own reader, so fsck and mount agree on what
"committed" means) then finds the committed transactions: a torn transaction
(no valid commit block) ends the scan and is simply not committed, as replay
treats it. Committed transactions that were not replayed are a problem:
--repair replays them with replay_journal and marks the journal clean;
without --repair the check reads through them (reader overlay) and writes
nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from clusterfs.errors import ClusterFSError
from clusterfs.format.journal import JF_CLEAN, JournalHeader, decode_jhead, encode_jhead
from clusterfs.format.orphan import decode_orphans, encode_orphans
from clusterfs.format.superblock import Superblock
from clusterfs.fsck.reader import Reader
from clusterfs.fsck.report import Problem, Report
from clusterfs.storage.device import BlockDevice

try:  # the journal layer: fsck uses its scan and replay when they exist
    from clusterfs.journal.log import replay_journal, scan_journal
except ImportError:  # pragma: no cover - only before the journal layer landed
    replay_journal = scan_journal = None


def check_journals(dev: BlockDevice, sb: Superblock, reader: Reader, report: Report,
                   repair: bool) -> list[int]:
    """Check every journal; return the slots whose header is clean (usable for repairs)."""
    clean: list[int] = []
    for slot in range(sb.journal_count):
        head = _check_header(dev, sb, slot, report)
        if head is None:
            continue
        if head.flags & JF_CLEAN:
            clean.append(slot)
            continue
        if _check_dirty(dev, sb, slot, head, reader, report, repair):
            clean.append(slot)
    return clean


def _check_header(dev: BlockDevice, sb: Superblock, slot: int, report: Report
                  ) -> JournalHeader | None:
    where = f"journal {slot}"
    blk = sb.journal_location(slot)
    try:
        head = decode_jhead(dev.read(blk), blk)
    except ClusterFSError as exc:
        report.error(where, f"header block {blk}: {exc}")
        return None
    if head.slot != slot:
        report.error(where, f"header block {blk} names slot {head.slot}")
        return None
    if not 1 <= head.tail_off <= sb.journal_log_blocks:
        report.error(where, f"header block {blk}: tail offset {head.tail_off} outside the log")
        return None
    return head


def _check_dirty(dev: BlockDevice, sb: Superblock, slot: int, head: JournalHeader,
                 reader: Reader, report: Report, repair: bool) -> bool:
    """A journal not marked clean; True if it is clean after this."""
    where = f"journal {slot}"
    report.warn(f"{where} is not marked clean: the filesystem is mounted or a node died")
    if scan_journal is None:
        report.error(where, "not clean, and this build has no journal replay to check it")
        return False
    try:
        _, txns, _ = scan_journal(dev, sb, slot)
    except ClusterFSError as exc:
        report.error(where, f"log unreadable: {exc}")
        return False
    if not txns:
        if repair:
            _mark_clean(dev, sb, slot, head)
            report.note(f"{where}: no committed transactions; marked clean")
            return True
        return False
    for seq, blocks in txns:
        wild = sorted(h for h in blocks if not sb.rgrp_start <= h < sb.total_blocks
                      and sb.orphan_slot(h) is None)
        if wild:
            report.error(where, f"committed transaction {seq} targets block {wild[0]}, "
                                "outside the resource groups and orphan blocks")
            return False
    nblocks = sum(len(blocks) for _, blocks in txns)
    p = report.error(where, f"{len(txns)} committed transactions ({nblocks} blocks) "
                            "not replayed", fixable=True)
    if not repair:
        for _, blocks in txns:
            reader.add_overlay(blocks)
        report.info(f"{where}: checking as if replayed (nothing written)")
        return False
    try:
        done = replay_journal(dev, sb, slot)
    except ClusterFSError as exc:
        report.error(where, f"replay failed: {exc}")
        return False
    _mark_clean(dev, sb, slot, JournalHeader(slot, done.next_seq, done.next_off))
    p.fixed = True
    return True


def _mark_clean(dev: BlockDevice, sb: Superblock, slot: int, head: JournalHeader) -> None:
    blk = sb.journal_location(slot)
    dev.write(blk, encode_jhead(JournalHeader(slot, head.tail_seq, head.tail_off, JF_CLEAN),
                                blk))
    dev.flush()


@dataclass
class OrphanBlocks:
    """What check_orphan_blocks found: the inodes listed (inode -> slot), the rewrites
    --repair makes (every list emptied: the leak pass frees what they name; a corrupt
    block rewritten empty) and the problems of corrupt blocks those rewrites fix."""
    listed: dict[int, int] = field(default_factory=dict)
    rewrites: dict[int, bytes] = field(default_factory=dict)
    corrupt: list[Problem] = field(default_factory=list)


def check_orphan_blocks(sb: Superblock, reader: Reader, report: Report) -> OrphanBlocks:
    """Each slot's orphan blocks, read through the journals' overlay."""
    found = OrphanBlocks()
    for slot in range(sb.journal_count):
        for blk in sb.orphan_locations(slot):
            _check_orphan_block(slot, blk, reader, report, found)
    return found


def _check_orphan_block(slot: int, blk: int, reader: Reader, report: Report,
                        found: OrphanBlocks) -> None:
    try:
        inodes = decode_orphans(reader.read(blk), blk)
    except ClusterFSError as exc:
        found.corrupt.append(report.error(f"journal {slot}", f"orphan block {blk}: {exc}",
                                          fixable=True))
        found.rewrites[blk] = bytes(encode_orphans([], blk))
        return
    for ino in inodes:
        found.listed.setdefault(ino, slot)
    if inodes:
        found.rewrites[blk] = bytes(encode_orphans([], blk))
