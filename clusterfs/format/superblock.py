"""The superblock: where everything else is, at a fixed byte offset (64 KiB, as GFS2).

mkfs zeroes bytes 0..64 KiB so an older filesystem's signature cannot survive.
"""

from __future__ import annotations

import re
import struct
import uuid as _uuid
from dataclasses import dataclass, field

from clusterfs.errors import ChecksumError, FormatError, NotClusterFS
from clusterfs.format.block import (
    BLOCK_SIZE,
    HEADER_SIZE,
    MAGIC,
    BlockType,
    block_crc,
    check,
    header_of,
    new_block,
    seal,
)

SUPERBLOCK_OFFSET = 64 * 1024
SUPERBLOCK_BLKNO = SUPERBLOCK_OFFSET // BLOCK_SIZE  # 16
_FIELDS = struct.Struct("<16sIQIQQQQIIIQqI32sI")
CONFIG_OFFSET = HEADER_SIZE + _FIELDS.size
CONFIG_MAX = BLOCK_SIZE - CONFIG_OFFSET
CLUSTER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,32}")
MAX_ORPHAN_BLOCKS = 1024      # per journal slot: 519 168 files unlinked while open
MIN_LOG_BLOCKS = 14           # a journal's circular log, at the least


@dataclass
class Superblock:
    uuid: bytes
    block_size: int
    total_blocks: int
    journal_count: int
    journal_start: int      # first block of journal 0
    journal_blocks: int     # blocks per journal (header + log)
    hb_start: int           # heartbeat slot blocks: one per journal slot
    rgrp_start: int         # first block of resource group 0
    rgrp_blocks: int        # blocks per resource group (the last may be shorter)
    rgrp_count: int
    bitmap_blocks: int      # bitmap blocks per resource group
    root_ino: int
    created: int            # unix seconds
    flags: int = 0
    label: bytes = b""
    config: bytes = b""     # optional cluster configuration blob
    seq: int = 0
    extra: dict = field(default_factory=dict, repr=False)

    def journal_location(self, slot: int) -> int:
        return self.journal_start + slot * self.journal_blocks

    @property
    def journal_log_blocks(self) -> int:
        """Blocks of a journal's circular log: all but the header and the orphan blocks."""
        return self.journal_blocks - 1 - self.orphan_blocks

    @property
    def orphan_blocks(self) -> int:
        """Orphan blocks per journal slot (the `orphan_blocks` setting; an image made
        before it existed has one)."""
        value = self._settings().get("orphan_blocks")
        try:
            return int(value) if value is not None else 1
        except ValueError:
            return 0                     # (check_superblock refuses it)

    def orphan_locations(self, slot: int) -> list[int]:
        """The slot's orphan blocks: the last `orphan_blocks` of its journal region."""
        first = self.journal_location(slot) + self.journal_blocks - self.orphan_blocks
        return list(range(first, first + self.orphan_blocks))

    def orphan_slot(self, blkno: int) -> int | None:
        """The slot whose orphan block `blkno` is, or None."""
        rel = blkno - self.journal_start
        if 0 <= rel < self.journal_count * self.journal_blocks and \
                rel % self.journal_blocks >= self.journal_blocks - self.orphan_blocks:
            return rel // self.journal_blocks
        return None

    def rgrp_location(self, index: int) -> tuple[int, int]:
        """(first block, length) of resource group `index`."""
        first = self.rgrp_start + index * self.rgrp_blocks
        return first, min(self.rgrp_blocks, self.total_blocks - first)

    def rgrp_of(self, blkno: int) -> int:
        return (blkno - self.rgrp_start) // self.rgrp_blocks

    @property
    def uuid_str(self) -> str:
        return str(_uuid.UUID(bytes=self.uuid))

    @property
    def cluster_name(self) -> str | None:
        """The cluster this device belongs to (GFS2's lock table), or None for a
        one-node filesystem. Kept in the config blob as a `cluster=NAME` line, so an
        old image (empty blob) reads as one-node."""
        return self._settings().get("cluster") or None

    def set_cluster_name(self, name: str | None) -> None:
        if name is not None and not CLUSTER_NAME.fullmatch(name):
            raise FormatError(f"cluster name {name!r}: use 1-32 letters, digits, '-', '_' "
                              "or '.'")
        self._set("cluster", name)

    def set_orphan_blocks(self, count: int) -> None:
        self._set("orphan_blocks", str(count))

    # The config blob: `key=value` lines of text. Settings added after the format was
    # first used live here, each with the value an image without its line means.
    def _settings(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for line in self.config.decode(errors="replace").splitlines():
            key, _, value = line.partition("=")
            if key.strip():
                out.setdefault(key.strip(), value.strip())
        return out

    def _set(self, key: str, value: str | None) -> None:
        settings = self._settings()
        settings.pop(key, None)
        if value is not None:
            settings[key] = value
        self.config = "".join(f"{k}={v}\n" for k, v in settings.items()).encode()


def encode_superblock(sb: Superblock) -> bytearray:
    if len(sb.config) > CONFIG_MAX:
        raise FormatError(f"cluster config blob too large ({len(sb.config)} > {CONFIG_MAX})")
    buf = new_block(BlockType.SUPER, SUPERBLOCK_BLKNO, sb.seq)
    _FIELDS.pack_into(
        buf, HEADER_SIZE, sb.uuid, sb.block_size, sb.total_blocks, sb.journal_count,
        sb.journal_start, sb.journal_blocks, sb.hb_start, sb.rgrp_start, sb.rgrp_blocks,
        sb.rgrp_count, sb.bitmap_blocks, sb.root_ino, sb.created, sb.flags,
        sb.label[:32], len(sb.config),
    )
    buf[CONFIG_OFFSET : CONFIG_OFFSET + len(sb.config)] = sb.config
    return seal(buf, BlockType.SUPER, SUPERBLOCK_BLKNO, sb.seq)


def decode_superblock(buf: bytes | bytearray | memoryview) -> Superblock:
    """Decode and check a superblock; NotClusterFS / ChecksumError / FormatError."""
    if len(buf) < BLOCK_SIZE:
        raise NotClusterFS("not a clusterfs filesystem (short superblock)")
    magic, btype, *_ = header_of(buf)
    if magic != MAGIC or btype != BlockType.SUPER:
        raise NotClusterFS("not a clusterfs filesystem (bad superblock magic)")
    try:
        seq = check(buf, SUPERBLOCK_BLKNO, BlockType.SUPER)
    except ChecksumError as exc:
        raise ChecksumError(SUPERBLOCK_BLKNO, "superblock") from exc
    (uuid, bsize, total, jcount, jstart, jblocks, hb, rstart, rblocks, rcount, bmblocks,
     root, created, flags, label, cfglen) = _FIELDS.unpack_from(buf, HEADER_SIZE)
    sb = Superblock(
        uuid=uuid, block_size=bsize, total_blocks=total, journal_count=jcount,
        journal_start=jstart, journal_blocks=jblocks, hb_start=hb, rgrp_start=rstart,
        rgrp_blocks=rblocks, rgrp_count=rcount, bitmap_blocks=bmblocks, root_ino=root,
        created=created, flags=flags, label=label.rstrip(b"\0"),
        config=bytes(buf[CONFIG_OFFSET : CONFIG_OFFSET + min(cfglen, CONFIG_MAX)]), seq=seq,
    )
    check_superblock(sb)
    return sb


def check_superblock(sb: Superblock) -> None:
    """Geometry sanity: every region inside the device and in order."""
    problems = []
    if sb.block_size != BLOCK_SIZE:
        problems.append(f"block size {sb.block_size} unsupported")
    if not 1 <= sb.journal_count <= 256:
        problems.append(f"journal count {sb.journal_count}")
    if sb.hb_start != SUPERBLOCK_BLKNO + 1:
        problems.append(f"heartbeat region at {sb.hb_start}")
    if sb.journal_start != sb.hb_start + sb.journal_count:
        problems.append(f"journals at {sb.journal_start}")
    if sb.journal_blocks < 16:
        problems.append(f"journal size {sb.journal_blocks}")
    if not 1 <= sb.orphan_blocks <= MAX_ORPHAN_BLOCKS:
        problems.append(f"orphan blocks per slot {sb._settings().get('orphan_blocks')!r}")
    elif sb.journal_log_blocks < MIN_LOG_BLOCKS:
        problems.append(f"journal log of {sb.journal_log_blocks} blocks (journal "
                        f"{sb.journal_blocks}, orphan blocks {sb.orphan_blocks})")
    if sb.rgrp_start != sb.journal_start + sb.journal_count * sb.journal_blocks:
        problems.append(f"resource groups at {sb.rgrp_start}")
    if sb.rgrp_count < 1 or sb.rgrp_blocks < 2 + sb.bitmap_blocks:
        problems.append(f"resource groups {sb.rgrp_count} x {sb.rgrp_blocks}")
    elif sb.rgrp_start + (sb.rgrp_count - 1) * sb.rgrp_blocks >= sb.total_blocks:
        problems.append("resource groups run past the end")
    if not sb.rgrp_start <= sb.root_ino < sb.total_blocks:
        problems.append(f"root inode {sb.root_ino} out of range")
    if problems:
        raise FormatError("bad superblock geometry: " + "; ".join(problems))


def superblock_crc_ok(buf: bytes) -> bool:
    return block_crc(buf) == header_of(buf)[5]
