"""mkfs.clusterfs / clusterfs mkfs: format a device or image file."""

from __future__ import annotations

import argparse
import sys

from clusterfs.errors import ClusterFSError
from clusterfs.format.block import BLOCK_SIZE
from clusterfs.format.mkfs import free_blocks, initial_blocks, plan_geometry
from clusterfs.format.orphan import ORPHANS_PER_BLOCK
from clusterfs.format.signatures import SIGNATURE_BYTES, detect_signature
from clusterfs.format.superblock import Superblock
from clusterfs.storage import holders, open_block_device


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-j", "--journals", type=_positive_int, default=1,
                        help="number of journals = node slots (default 1)")
    parser.add_argument("-J", "--journal-size", type=_positive_int, default=None, metavar="MIB",
                        help="size of each journal in MiB (default: scaled to the device)")
    parser.add_argument("--orphans", type=_positive_int, default=None, metavar="FILES",
                        help="files a node may hold unlinked while open and still have "
                             "freed if it dies (default 8112, fewer for a small journal; "
                             "rounded up to a multiple of 507)")
    parser.add_argument("-b", "--block-size", type=int, default=BLOCK_SIZE,
                        help="block size in bytes (only 4096 is supported)")
    parser.add_argument("-c", "--cluster", metavar="NAME",
                        help="the cluster (config `name`) whose nodes may mount it together; "
                             "without it the filesystem is for one node at a time")
    parser.add_argument("-f", "--force", action="store_true",
                        help="overwrite an existing filesystem")
    parser.add_argument("-q", "--quiet", action="store_true")
    parser.add_argument("device")


def make_filesystem(path: str, journals: int = 1, journal_mib: int | None = None,
                    force: bool = False, cluster: str | None = None,
                    orphans: int | None = None) -> Superblock:
    """Format `path`; raises ClusterFSError with a one-line reason."""
    busy = holders.users(path)
    if busy:
        # even --force: overwriting a live filesystem under its mount is never wanted
        raise ClusterFSError(f"{path} is in use ({'; '.join(busy)})")
    dev = open_block_device(path)
    try:
        head = dev.pread(0, SIGNATURE_BYTES)
        found = detect_signature(head)
        if found and not force:
            raise ClusterFSError(f"{path} already holds {found}; use --force to overwrite")
        jblocks = None if journal_mib is None else journal_mib * (1 << 20) // BLOCK_SIZE
        sb = plan_geometry(dev.size, journals, jblocks, orphans=orphans)
        sb.set_cluster_name(cluster)
        # Build every block before writing the first: an error found while encoding must
        # leave the device as it was.
        blocks = list(initial_blocks(sb))
        for blkno, data in blocks:
            dev.write(blkno, data)
        dev.flush()
        return sb
    finally:
        dev.close()


def run(args: argparse.Namespace) -> int:
    if args.block_size != BLOCK_SIZE:
        print(f"mkfs.clusterfs: block size {args.block_size} unsupported (only {BLOCK_SIZE})",
              file=sys.stderr)
        return 1
    try:
        sb = make_filesystem(args.device, args.journals, args.journal_size, args.force,
                             args.cluster, args.orphans)
    except ClusterFSError as exc:
        print(f"mkfs.clusterfs: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        size_mib = sb.total_blocks * BLOCK_SIZE / (1 << 20)
        print(f"{args.device}: clusterfs, uuid {sb.uuid_str}")
        print(f"  cluster {sb.cluster_name} (mount with --config of that cluster; "
              f"{_nodes_at_once(sb.journal_count)})"
              if sb.cluster_name else "  one node at a time (no --cluster)")
        print(f"  size {size_mib:.1f} MiB, {sb.total_blocks} blocks of {sb.block_size} bytes")
        print(f"  journals {sb.journal_count} x {sb.journal_blocks} blocks "
              f"({sb.journal_blocks * BLOCK_SIZE >> 20} MiB) from block {sb.journal_start}, "
              f"each with {sb.orphan_blocks} orphan blocks "
              f"({sb.orphan_blocks * ORPHANS_PER_BLOCK} files unlinked while open)")
        print(f"  resource groups {sb.rgrp_count} x {sb.rgrp_blocks} blocks from block "
              f"{sb.rgrp_start}")
        print(f"  root inode {sb.root_ino}, free blocks {free_blocks(sb)} "
              f"({free_blocks(sb) * BLOCK_SIZE / (1 << 20):.1f} MiB)")
    return 0


def _nodes_at_once(journals: int) -> str:
    """How many nodes may mount it together: one journal slot each."""
    if journals == 1:
        return "one node at a time: -j N formats a journal for each of N nodes"
    return f"up to {journals} nodes at once, a journal each"
