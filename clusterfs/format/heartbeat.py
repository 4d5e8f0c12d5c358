"""Heartbeat slots: one block per journal slot (`sb.hb_start + slot`), the mailbox of the
disk poison-pill fencing agent (clusterfs.fence.poison_pill), as SBD's slots.

A node claims the slot of the journal it claimed by writing its node id and
incarnation into it, before it writes anything else to the device; from then on it
only reads the slot (its watcher, every interval). Another node fences it by writing
a *pill* into that slot (read, set the pill, write), naming the incarnation it is
for and who sent it; the owner's watcher sees the pill and stops writing. Only the
claim and the pill are ever written, by different nodes at different times, so
nothing is lost to two writers of one block.

Layout (little-endian), after the 32-byte block header (type HEARTBEAT, its own
address, seq bumped on every rewrite, crc32c over the whole block):

    32  u32 flags          HB_CLAIMED: the owner fields are valid
    36  u32 owner          node id of the owner
    40  u64 incarnation    the owner's membership incarnation (odd, never 0)
    48  u64 claimed_ns     when it claimed the slot (the owner's clock, ns since epoch)
    56  u32 pill_flags     PILL: a pill is in the slot
    60  u32 pill_node      the node the pill is for
    64  u64 pill_inc       the incarnation it is for (0: whoever owns the slot)
    72  u32 fencer         node id of the node that wrote it
    76  u32 reserved       zero
    80  u64 fencer_gen     the membership generation it fenced in
    88  u64 pill_ns        when it was written (the fencer's clock)
    96  ...                zero

mkfs writes every slot unclaimed and empty (a sealed header, body zero). Pure: no
I/O, no clock (callers pass the times).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from clusterfs.errors import FormatError
from clusterfs.format.block import BLOCK_SIZE, HEADER_SIZE, BlockType, check, new_block, seal

HB_CLAIMED = 1
PILL = 1
_BODY = struct.Struct("<IIQQIIQIIQQ")


@dataclass(frozen=True)
class Pill:
    node: int              # the node it is for
    incarnation: int       # the incarnation it is for; 0: whoever owns the slot
    fencer: int
    generation: int
    written_ns: int = 0

    def targets(self, node_id: int, incarnation: int | None) -> bool:
        """Is this pill for `node_id` in its life `incarnation` (None: any)?"""
        return self.node == node_id and (self.incarnation == 0 or incarnation is None
                                         or self.incarnation == incarnation)


@dataclass(frozen=True)
class HeartbeatSlot:
    owner: int | None = None       # None: never claimed
    incarnation: int = 0
    claimed_ns: int = 0
    pill: Pill | None = None
    seq: int = 0                   # the block header's seq: bumped at every rewrite

    def owned_by(self, node_id: int, incarnation: int | None = None) -> bool:
        return self.owner == node_id and (incarnation is None
                                          or self.incarnation == incarnation)


def slot_blkno(hb_start: int, slot: int) -> int:
    return hb_start + slot


def encode_slot(hs: HeartbeatSlot, blkno: int) -> bytearray:
    buf = new_block(BlockType.HEARTBEAT, blkno, hs.seq)
    p = hs.pill
    _BODY.pack_into(
        buf, HEADER_SIZE,
        HB_CLAIMED if hs.owner is not None else 0, hs.owner or 0, hs.incarnation,
        hs.claimed_ns,
        PILL if p is not None else 0, p.node if p else 0, p.incarnation if p else 0,
        p.fencer if p else 0, 0, p.generation if p else 0, p.written_ns if p else 0)
    return seal(buf, BlockType.HEARTBEAT, blkno, hs.seq)


def decode_slot(buf: bytes | bytearray | memoryview, blkno: int) -> HeartbeatSlot:
    """The slot in heartbeat block `blkno`; ChecksumError for a bad crc, FormatError
    for a block that is not this heartbeat block (wrong magic, type or address)."""
    if len(buf) < BLOCK_SIZE:
        raise FormatError(f"heartbeat block {blkno}: short ({len(buf)} bytes)")
    seq = check(buf, blkno, BlockType.HEARTBEAT)
    (flags, owner, inc, claimed, pflags, pnode, pinc, fencer, _r, fgen,
     pns) = _BODY.unpack_from(buf, HEADER_SIZE)
    pill = Pill(pnode, pinc, fencer, fgen, pns) if pflags & PILL else None
    if not flags & HB_CLAIMED:
        return HeartbeatSlot(None, 0, 0, pill, seq)
    return HeartbeatSlot(owner, inc, claimed, pill, seq)


def claimed(hs: HeartbeatSlot, node_id: int, incarnation: int, now_ns: int) -> HeartbeatSlot:
    """The slot claimed by node_id in its life `incarnation` (any old pill dropped)."""
    return HeartbeatSlot(node_id, incarnation, now_ns, None, hs.seq + 1)


def with_pill(hs: HeartbeatSlot, pill: Pill) -> HeartbeatSlot:
    """The slot with `pill` in it, its owner unchanged."""
    return HeartbeatSlot(hs.owner, hs.incarnation, hs.claimed_ns, pill, hs.seq + 1)
