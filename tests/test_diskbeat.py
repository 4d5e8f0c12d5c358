"""Disk heartbeat blocks (format/diskbeat.py) and the node's reader/writer
(node/diskbeat.py) on an image file: tier 1."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from clusterfs.errors import FormatError
from clusterfs.format.block import BLOCK_SIZE
from clusterfs.format.diskbeat import (
    BEATING,
    DISKBEAT_BLOCKS,
    QUORATE,
    DiskBeat,
    beat_blkno,
    decode_beat,
    encode_beat,
)
from clusterfs.format.signatures import SIGNATURE_BYTES, detect_signature
from clusterfs.node.diskbeat import DiskHeartbeat
from clusterfs.storage.device import BlockDevice


def test_round_trip_and_a_zero_block_holds_no_beat():
    b = DiskBeat(7, BEATING, 0x1234567, 9, QUORATE, 42, 5)
    assert decode_beat(encode_beat(b, 3), 3) == b
    with pytest.raises(FormatError):
        decode_beat(bytes(BLOCK_SIZE), 3)
    with pytest.raises(FormatError):
        decode_beat(encode_beat(b, 3), 4)             # another block's


def test_blocks_by_node_position_and_beats_look_like_no_other_filesystem():
    ids = [10, 3, 77]
    assert [beat_blkno(ids, n) for n in (3, 10, 77)] == list(DISKBEAT_BLOCKS[:3])
    assert beat_blkno(list(range(20)), 13) is None     # only the first 13 have one
    head = bytearray(SIGNATURE_BYTES)
    for i, blk in enumerate(DISKBEAT_BLOCKS):
        head[blk * BLOCK_SIZE:(blk + 1) * BLOCK_SIZE] = encode_beat(
            DiskBeat(i + 1, BEATING, 2**63 - 1, 2**40, QUORATE, 2**62, 2**50), blk)
    assert detect_signature(head) is None


def _node(path: str, nid: int, ids: frozenset[int], quorate: bool) -> DiskHeartbeat:
    hb = DiskHeartbeat(BlockDevice(path), ids, nid, interval=0.05, timeout=0.3)
    hb.attach(SimpleNamespace(state="member", incarnation=nid * 2 + 1,
                              view=SimpleNamespace(generation=4, quorate=quorate)))
    return hb


def test_alive_while_the_block_changes_dead_after_the_timeout_gone_when_stopped(tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(64 * BLOCK_SIZE))
    ids = frozenset({1, 2})
    a, b = _node(str(img), 1, ids, True), _node(str(img), 2, ids, False)
    try:
        assert not a.own_ok()                        # nothing written yet
        for _ in range(3):
            a._round()
            b._round()
        assert a.own_ok() and a.alive() == {2} and b.alive() == {1}
        assert b.quorate_members() == {1} and a.quorate_members() == set()
        a._round()                                   # (seen b's last beat)
        time.sleep(0.35)                             # node 2 stops beating
        a._round()
        assert a.alive() == set() and a.own_ok()
        b._round()
        a._round()
        assert a.alive() == {2}                      # it beats again
        b.stopped = True
        b._write(2)                                  # a clean leave's last beat
        a._round()
        assert a.alive() == set()
    finally:
        a.close()
        b.close()
