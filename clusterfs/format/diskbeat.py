"""Disk heartbeat blocks: membership's second path (docs/format.md, "Disk heartbeats").

Every cluster node that has the device open rewrites its own block every heartbeat
interval (the header's seq is its counter, one more each time); every such node reads
them all, and a node whose block stops changing for the failure timeout is dead on the
disk too. A node that left cleanly writes a last block marked STOPPED.

The blocks live in the area mkfs leaves zero before the superblock (blocks 0..15), in
the blocks no other filesystem's signature touches (mkfs and mount look for those
there): blocks 2..7 and 9..15, one per configured node in the order of its position in
the sorted node list, so the first 13 nodes have one. They are apart from the
poison-pill heartbeat slots (format/heartbeat.py), because the owner rewrites this one
all the time: a pill written into the same block by another node would race it.

Layout (little-endian), after the 32-byte block header (type DISKBEAT, its own
address, seq = the counter, crc32c over the whole block):

    32  u32 node           the node id writing it
    36  u32 state          1 BEATING, 2 STOPPED (left cleanly)
    40  u64 incarnation    its membership incarnation
    48  u64 generation     its view's generation when it wrote
    56  u32 flags          1 QUORATE: it was a member of a quorate view
    60  u32 reserved       zero
    64  u64 written_ns     its clock when it wrote (for dumps; never compared)

A zero block (mkfs) or one that does not decode holds no heartbeat. Pure: no I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from clusterfs.errors import FormatError
from clusterfs.format.block import BLOCK_SIZE, HEADER_SIZE, BlockType, check, new_block, seal

DISKBEAT_BLOCKS = (2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15)
AREA = range(16)          # blocks the area may use (what tests leave out of digests)
BEATING = 1
STOPPED = 2
QUORATE = 1
_BODY = struct.Struct("<IIQQIIQ")


@dataclass(frozen=True)
class DiskBeat:
    node: int
    state: int
    incarnation: int
    generation: int = 0
    flags: int = 0
    written_ns: int = 0
    counter: int = 0         # the header's seq


def beat_blkno(node_ids: list[int] | tuple[int, ...] | frozenset[int], node: int) -> int | None:
    """The disk heartbeat block of `node` among the configured `node_ids` (None: it is
    past the 13th node and has none)."""
    index = sorted(node_ids).index(node)
    return DISKBEAT_BLOCKS[index] if index < len(DISKBEAT_BLOCKS) else None


def encode_beat(beat: DiskBeat, blkno: int) -> bytearray:
    buf = new_block(BlockType.DISKBEAT, blkno, beat.counter)
    _BODY.pack_into(buf, HEADER_SIZE, beat.node, beat.state, beat.incarnation,
                    beat.generation, beat.flags, 0, beat.written_ns)
    return seal(buf, BlockType.DISKBEAT, blkno, beat.counter)


def decode_beat(buf: bytes | bytearray | memoryview, blkno: int) -> DiskBeat:
    """The beat in block `blkno`; FormatError (ChecksumError) if it holds none."""
    if len(buf) < BLOCK_SIZE:
        raise FormatError(f"disk heartbeat block {blkno}: short ({len(buf)} bytes)")
    seq = check(buf, blkno, BlockType.DISKBEAT)
    node, state, inc, gen, flags, _r, ns = _BODY.unpack_from(buf, HEADER_SIZE)
    if state not in (BEATING, STOPPED):
        raise FormatError(f"disk heartbeat block {blkno}: state {state}")
    return DiskBeat(node, state, inc, gen, flags, ns, seq)
