"""Recognise what a device already holds, from its first SIGNATURE_BYTES bytes.

mkfs refuses to overwrite any of these without --force; mount names them in
its "not a clusterfs filesystem" error.
"""

from __future__ import annotations

from clusterfs.format.block import MAGIC, BlockType
from clusterfs.format.superblock import SUPERBLOCK_OFFSET

SIGNATURE_BYTES = 128 * 1024

# (offset, bytes, what)
_SIGNATURES: list[tuple[int, bytes, str]] = [
    (SUPERBLOCK_OFFSET, MAGIC.to_bytes(4, "little") + int(BlockType.SUPER).to_bytes(2, "little"),
     "a clusterfs filesystem"),
    (1080, b"\x53\xef", "an ext2/ext3/ext4 filesystem"),
    (0, b"XFSB", "an xfs filesystem"),
    (65600, b"_BHRfS_M", "a btrfs filesystem"),
    (65536, b"\x01\x16\x19\x70", "a gfs2 filesystem"),
    (4086, b"SWAPSPACE2", "swap space"),
    (4086, b"SWAP-SPACE", "swap space"),
    (0, b"LUKS\xba\xbe", "a LUKS volume"),
    (512, b"LABELONE", "an LVM physical volume"),
    (512, b"EFI PART", "a GPT partition table"),
    (3, b"NTFS    ", "an NTFS filesystem"),
    (82, b"FAT32   ", "a FAT filesystem"),
    (54, b"FAT1", "a FAT filesystem"),
    (32769, b"CD001", "an ISO 9660 filesystem"),
    (0x10040, b"ReIsEr", "a reiserfs filesystem"),
]


def detect_signature(head: bytes | bytearray | memoryview) -> str | None:
    """What `head` (the device's first bytes) holds, or None if nothing known."""
    head = bytes(head)
    for offset, sig, what in _SIGNATURES:
        if head[offset : offset + len(sig)] == sig:
            return what
    if len(head) >= 512 and head[510:512] == b"\x55\xaa" and any(head[446:510]):
        return "a partition table"
    return None
