"""The passes in order, and what --repair does after them.

    1  superblock and journals (replayed first with --repair)
    2  resource-group headers and bitmaps
    3  the walk from the root: inodes, directories, extents
    4  directory parents and link counts
    5  bitmaps against the blocks reached

Without --repair the device is opened read-only: fsck cannot write by accident.
"""

from __future__ import annotations

import traceback

from clusterfs.errors import ClusterFSError, NotClusterFS, StorageError
from clusterfs.fsck.bitmaps import GroupFix, compare_bitmaps
from clusterfs.fsck.blockmap import BlockMap
from clusterfs.fsck.context import Context
from clusterfs.fsck.journals import OrphanBlocks, check_journals, check_orphan_blocks
from clusterfs.fsck.reader import Reader
from clusterfs.fsck.repair import Unit, group_unit, inode_unit, write_units
from clusterfs.fsck.report import EXIT_OPERATIONAL, EXIT_UNCORRECTED, Problem, Report
from clusterfs.fsck.rgrps import load_groups
from clusterfs.fsck.superblock import CannotCheck, load_superblock
from clusterfs.fsck.walk import Walker
from clusterfs.storage import holders, open_block_device
from clusterfs.storage.device import BlockDevice

PASSES = 5


class OperationalError(Exception):
    """fsck could not check at all (exit 8); the message is one line."""


def run_fsck(path: str, report: Report, repair: bool = False, force: bool = False) -> int:
    """Check (and with repair, fix) the filesystem on `path`; return the exit code."""
    try:
        return _run(path, report, repair, force)
    except OperationalError as exc:
        print(f"fsck.clusterfs: {path}: {exc}", file=report.err)
        return EXIT_OPERATIONAL
    except Exception as exc:
        # a bug in fsck must not look like "errors corrected" (a traceback exits 1)
        traceback.print_exc(file=report.err)
        print(f"fsck.clusterfs: {path}: internal error: {exc!r}", file=report.err)
        return EXIT_OPERATIONAL


def _run(path: str, report: Report, repair: bool, force: bool) -> int:
    _check_not_in_use(path, report, repair, force)
    try:
        dev = open_block_device(path, writable=repair)
    except StorageError as exc:
        raise OperationalError(str(exc).removeprefix(f"{path}: ")) from exc
    try:
        return _check_device(path, dev, report, repair)
    except StorageError as exc:
        raise OperationalError(f"I/O error: {exc}") from exc
    finally:
        dev.close()


def _check_not_in_use(path: str, report: Report, repair: bool, force: bool) -> None:
    busy = holders.users(path)
    if not busy:
        return
    text = "; ".join(busy)
    if repair and not force:
        raise OperationalError(f"in use ({text}); refusing to repair (--force overrides)")
    report.warn(f"{path} is in use ({text}): results describe a moving target")


def _check_device(path: str, dev: BlockDevice, report: Report, repair: bool) -> int:
    report.progress(f"pass 1/{PASSES}: superblock and journals")
    try:
        sb = load_superblock(dev, report)
    except NotClusterFS as exc:
        raise OperationalError(str(exc)) from exc
    except CannotCheck as exc:
        report.print_problems()
        print(f"{path}: cannot check further: {exc}", file=report.out)
        return EXIT_UNCORRECTED
    repair = repair and not report.problems     # never repair against a doubtful superblock
    reader = Reader(dev, sb.total_blocks)
    clean_slots = check_journals(dev, sb, reader, report, repair)
    ctx = Context(sb, reader, report, BlockMap(sb.total_blocks))
    orphan_blocks = check_orphan_blocks(sb, reader, report)
    ctx.orphans = orphan_blocks.listed
    ctx.bmap.mark_metadata(0, sb.rgrp_start, "superblock/heartbeat/journal area")
    report.progress(f"pass 2/{PASSES}: resource groups ({sb.rgrp_count})")
    ctx.groups = load_groups(reader, sb, ctx.bmap, report)
    report.progress(f"pass 3/{PASSES}: walking directories from the root")
    walker = Walker(ctx)
    walker.walk()
    report.progress(f"pass 4/{PASSES}: parents and link counts ({len(walker.seen)} inodes, "
                    f"{walker.directories} directories)")
    walker.check_parents()
    walker.check_links()
    report.progress(f"pass 5/{PASSES}: bitmaps against reachable blocks")
    group_fixes = compare_bitmaps(ctx)
    if ctx.incomplete:
        report.note("part of the tree could not be read: leaked blocks and link counts "
                    "are reported, not repaired")
    if repair:
        _repair(dev, ctx, group_fixes, clean_slots, orphan_blocks)
    report.progress_done()
    report.print_problems()
    report.print_summary(path, {"inodes": len(walker.seen), "dirs": walker.directories,
                                "used": ctx.bmap.used_count(), "blocks": sb.total_blocks})
    return report.exit_code()


def _repair(dev: BlockDevice, ctx: Context, group_fixes: list[GroupFix],
            clean_slots: list[int], orphan_blocks: OrphanBlocks) -> None:
    units: list[Unit] = []
    fixed: list[Problem] = []
    if orphan_blocks.rewrites and not ctx.incomplete and (
            orphan_blocks.corrupt or any(f.problems for f in group_fixes)):
        units.append(dict(orphan_blocks.rewrites))   # the leak repair frees what they name
        fixed += orphan_blocks.corrupt
    for ino, fields in sorted(ctx.inode_fixes.items()):
        units.append(inode_unit(ctx.reader.read(ino), ino, fields))
        fixed += ctx.fix_problems[ino]
    for fix in group_fixes:
        if fix.group.header is None:
            continue        # no header to rewrite: its problems stay reported
        units.append(group_unit(fix))
        fixed += [p for p in fix.problems if p.fixable]
    try:
        write_units(dev, ctx.sb, units, clean_slots, ctx.report)
    except ClusterFSError as exc:
        ctx.report.note(f"repair failed: {exc}")
        return
    for p in fixed:
        p.fixed = True

