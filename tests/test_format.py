"""Pure unit tests of clusterfs.format: round trips and checks, no I/O."""

import pytest

from clusterfs.errors import ChecksumError, FormatError, NotClusterFS
from clusterfs.format import directory as d
from clusterfs.format import extent as x
from clusterfs.format import journal as j
from clusterfs.format.block import BLOCK_SIZE, BlockType, check
from clusterfs.format.inode import F_EXTENTS, Inode, decode_inode, encode_inode
from clusterfs.format.mkfs import free_blocks, initial_blocks, plan_geometry
from clusterfs.format.rgrp import (
    RgrpHeader,
    count_used,
    decode_bitmap,
    decode_rgrp,
    encode_bitmap,
    encode_rgrp,
    set_range,
)
from clusterfs.format.signatures import detect_signature
from clusterfs.format.superblock import (
    SUPERBLOCK_OFFSET,
    decode_superblock,
    encode_superblock,
)


def test_superblock_round_trip_and_bit_flip():
    sb = plan_geometry(256 << 20, journals=3)
    buf = encode_superblock(sb)
    assert decode_superblock(buf) == sb
    buf[200] ^= 1
    with pytest.raises(ChecksumError):
        decode_superblock(buf)


def test_zeroes_are_not_a_filesystem():
    with pytest.raises(NotClusterFS, match="bad superblock magic"):
        decode_superblock(bytes(BLOCK_SIZE))


def test_geometry_regions_do_not_overlap():
    sb = plan_geometry(1 << 30, journals=4)
    assert sb.journal_start + 4 * sb.journal_blocks == sb.rgrp_start
    last_first, last_len = sb.rgrp_location(sb.rgrp_count - 1)
    assert last_first + last_len == sb.total_blocks
    assert 0 < free_blocks(sb) < sb.total_blocks


def test_too_small_device_is_refused():
    with pytest.raises(FormatError, match="too small"):
        plan_geometry(100 * 1024)


def test_initial_image_blocks_all_check():
    sb = plan_geometry(64 << 20, journals=2)
    for blkno, data in initial_blocks(sb):
        if blkno and any(data):
            check(data, blkno)


def test_rgrp_and_bitmap_round_trip():
    h = RgrpHeader(index=2, first=5000, length=2048, bitmap_blocks=1, free=2000, inodes=3)
    assert decode_rgrp(encode_rgrp(h), 5000) == h
    bits = bytearray(4064)
    set_range(bits, 3, 30)
    assert count_used(bits, 2048) == 30
    assert decode_bitmap(encode_bitmap(bits, 5001), 5001) == bytes(bits)
    with pytest.raises(FormatError):
        decode_rgrp(encode_rgrp(h), 5001)   # written at the wrong address


def test_inode_round_trip_with_xattrs_and_ns():
    ino = Inode(ino=1234, mode=0o100644, uid=7, gid=8, nlink=2, flags=F_EXTENTS,
                size=(5 << 32) + 3, blocks=9, atime=-5, atime_ns=999_999_999,
                xattrs={b"user.a": b"1", b"trusted.b": bytes(300)},
                payload=x.encode_records([x.Extent(0, 9000, 4), x.Extent(1 << 21, 9100, 1)]))
    out = decode_inode(encode_inode(ino), 1234)
    assert out == ino
    assert x.decode_records(out.payload, 2)[1].lblk == 1 << 21


def test_extent_block_rejects_overlap():
    blk = x.encode_extent_block([x.Extent(0, 100, 5), x.Extent(3, 200, 1)], 77)
    with pytest.raises(FormatError):
        x.decode_extent_block(blk, 77)


def test_directory_structures_round_trip():
    entries = [d.DirEntry(b"file%d" % i, 100 + i, 8) for i in range(50)]
    assert d.decode_linear(d.encode_linear(entries)) == entries
    depth, nxt, got = d.decode_leaf(d.encode_leaf(entries, 3, 42, 900), 900)
    assert (depth, nxt, got) == (3, 42, entries)
    assert d.decode_table_block(d.encode_table_block([1, 2, 3], 901), 901, 3) == [1, 2, 3]
    assert d.decode_hashed_payload(d.encode_hashed_payload(10, [5, 6, 7])) == (10, [5, 6, 7])


def test_journal_blocks_round_trip():
    hd = j.JournalHeader(slot=1, tail_seq=99, tail_off=17, flags=j.JF_CLEAN)
    assert j.decode_jhead(j.encode_jhead(hd, 500), 500) == hd
    assert j.decode_descriptor(j.encode_descriptor([10, 20], 501, 99), 501) == (99, [10, 20])
    assert j.decode_commit(j.encode_commit(3, 0xABC, 1, 504, 99), 504) == (99, 3, 0xABC)
    with pytest.raises(FormatError):
        check(j.encode_commit(3, 0xABC, 1, 504, 99), 504, BlockType.JDESC)


@pytest.mark.parametrize("offset,sig,what", [
    (1080, b"\x53\xef", "ext"), (0, b"XFSB", "xfs"), (65600, b"_BHRfS_M", "btrfs"),
    (4086, b"SWAPSPACE2", "swap"),
])
def test_foreign_signatures_are_recognised(offset, sig, what):
    head = bytearray(128 * 1024)
    head[offset : offset + len(sig)] = sig
    assert what in detect_signature(head)


def test_own_signature_is_recognised():
    sb = plan_geometry(64 << 20)
    head = bytearray(128 * 1024)
    head[SUPERBLOCK_OFFSET : SUPERBLOCK_OFFSET + BLOCK_SIZE] = encode_superblock(sb)
    assert "clusterfs" in detect_signature(head)
    assert detect_signature(bytes(128 * 1024)) is None
