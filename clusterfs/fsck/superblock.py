"""Pass 1a: the superblock.

A bad magic means this is not clusterfs at all (an operational error, exit 8).
A bad checksum is reported; if the fields still make a sane geometry the check
goes on with them (read-only), because everything else can still be judged and
the user learns more than "superblock bad". A bad geometry ends the check:
nothing else can be located.
"""

from __future__ import annotations

import struct

from clusterfs.errors import ChecksumError, FormatError, NotClusterFS
from clusterfs.format.block import BLOCK_SIZE, block_crc
from clusterfs.format.superblock import SUPERBLOCK_BLKNO, Superblock, decode_superblock
from clusterfs.fsck.report import Report
from clusterfs.storage.device import BlockDevice

_CRC_OFFSET = 24


class CannotCheck(Exception):
    """The superblock is too damaged to locate anything else."""


def _decode_ignoring_crc(buf: bytes) -> Superblock:
    fixed = bytearray(buf)
    struct.pack_into("<I", fixed, _CRC_OFFSET, block_crc(fixed))
    return decode_superblock(fixed)


def load_superblock(dev: BlockDevice, report: Report) -> Superblock:
    """The superblock, checked; NotClusterFS propagates; CannotCheck if unusable."""
    buf = dev.read(SUPERBLOCK_BLKNO) if dev.blocks > SUPERBLOCK_BLKNO else b""
    try:
        sb = decode_superblock(buf)     # NotClusterFS on a short device or bad magic
    except ChecksumError:
        report.error("superblock", f"block {SUPERBLOCK_BLKNO}: bad checksum")
        try:
            sb = _decode_ignoring_crc(buf)
        except FormatError as exc:
            raise CannotCheck(f"superblock: {exc}") from exc
        report.warn("superblock checksum is bad; checking with its fields as they are")
    except NotClusterFS:
        raise
    except FormatError as exc:
        report.error("superblock", str(exc))
        raise CannotCheck(f"superblock: {exc}") from exc
    if sb.total_blocks > dev.blocks:
        report.error("superblock", f"filesystem has {sb.total_blocks} blocks but the device "
                                   f"only {dev.blocks} ({dev.size} bytes): truncated image?")
        raise CannotCheck("device smaller than the filesystem")
    if sb.block_size != BLOCK_SIZE:
        raise CannotCheck(f"block size {sb.block_size} unsupported")
    return sb
