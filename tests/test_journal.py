"""Journal commit / replay on a temporary image file (no mount)."""

import pytest

from clusterfs.format.block import BLOCK_SIZE, BlockType, new_block, seal
from clusterfs.format.mkfs import initial_blocks, plan_geometry
from clusterfs.format.superblock import SUPERBLOCK_BLKNO, decode_superblock
from clusterfs.journal.log import Journal, replay_journal, scan_journal
from clusterfs.storage.device import BlockDevice


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "img"
    with open(path, "wb") as f:
        f.truncate(32 << 20)
    sb = plan_geometry(32 << 20, journals=2, journal_blocks=64)
    dev = BlockDevice(str(path))
    for blkno, data in initial_blocks(sb):
        dev.write(blkno, data)
    yield dev, decode_superblock(dev.read(SUPERBLOCK_BLKNO))
    dev.close()


def _meta(blkno: int, fill: int) -> bytes:
    buf = new_block(BlockType.XATTR, blkno)
    buf[100:200] = bytes([fill]) * 100
    return bytes(seal(buf, BlockType.XATTR, blkno))


def test_committed_transactions_replay_home(image):
    dev, sb = image
    j = Journal(dev, sb, 1)
    j.open()
    target = sb.rgrp_start + 500
    j.commit({target: _meta(target, 1), target + 1: _meta(target + 1, 2)})
    j.commit({target: _meta(target, 3)})
    assert dev.read(target) != _meta(target, 3)       # not home yet: only in the log
    # "crash": a fresh mount replays
    res = replay_journal(dev, sb, 1)
    assert (res.transactions, res.blocks) == (2, 3)
    assert dev.read(target) == _meta(target, 3)         # the later copy wins
    assert dev.read(target + 1) == _meta(target + 1, 2)
    # idempotent: the tail moved, nothing left to replay
    assert replay_journal(dev, sb, 1).transactions == 0


def test_home_writes_go_one_run_at_a_time(image):
    """A checkpoint writes consecutive blocks home in one write per run (of at most
    HOME_RUN_BLOCKS), not one per block, and every block lands where it belongs."""
    dev, sb = image
    j = Journal(dev, sb, 1)
    j.open()
    first = sb.rgrp_start + 600
    copies = {first + i: _meta(first + i, i % 250) for i in range(40)}
    copies[first + 100] = _meta(first + 100, 7)              # a run of its own
    j.commit(copies)
    before = dev.writes
    j.checkpoint()
    home_writes = dev.writes - before - 1                    # (the journal head)
    assert home_writes == 2
    assert all(dev.read(blk) == copy for blk, copy in copies.items())


def test_torn_transaction_is_not_replayed(image):
    dev, sb = image
    j = Journal(dev, sb, 0)
    j.open()
    target = sb.rgrp_start + 600
    j.commit({target: _meta(target, 1)})
    pos = j.head_off
    j.commit({target: _meta(target, 9)})
    # damage the copy inside the second transaction: its commit crc no longer matches
    copy_blk = j.jstart + pos + 1
    raw = bytearray(dev.read(copy_blk))
    raw[150] ^= 0xFF
    dev.write(copy_blk, raw)
    res = replay_journal(dev, sb, 0)
    assert res.transactions == 1
    assert dev.read(target) == _meta(target, 1)


def test_wraparound_and_checkpoint(image):
    dev, sb = image
    j = Journal(dev, sb, 0)
    j.open()
    base = sb.rgrp_start + 700
    for i in range(40):           # 40 x 12 log blocks through a 63-block log
        j.commit({base + k: _meta(base + k, i) for k in range(10)})
    assert j.stats["checkpoints"] >= 5
    _head, txns, _ = scan_journal(dev, sb, 0)
    assert txns and txns[-1][1][base] == _meta(base, 39)
    replay_journal(dev, sb, 0)
    assert all(dev.read(base + k) == _meta(base + k, 39) for k in range(10))


def test_clean_close_leaves_nothing_to_replay(image):
    dev, sb = image
    j = Journal(dev, sb, 0)
    j.open()
    target = sb.rgrp_start + 800
    j.commit({target: _meta(target, 5)})
    j.close()
    assert dev.read(target) == _meta(target, 5)
    assert replay_journal(dev, sb, 0).transactions == 0
    assert len(dev.read(target)) == BLOCK_SIZE


def test_a_revoked_copy_is_not_replayed_and_a_later_one_is(image):
    """write_back puts a block home and revokes its logged copies: a replay then skips
    them (another node may have written the block since), replays the blocks not
    revoked, and replays a copy logged again after the revoke."""
    dev, sb = image
    j = Journal(dev, sb, 1)
    j.open()
    x, y, z = sb.rgrp_start + 700, sb.rgrp_start + 701, sb.rgrp_start + 702
    j.commit({x: _meta(x, 1), y: _meta(y, 2), z: _meta(z, 3)})
    j.write_back([x, z])
    assert dev.read(x) == _meta(x, 1) and x not in j.pending_home and y in j.pending_home
    dev.write(x, _meta(x, 7))                 # another node's newer x, once the lock went
    j.commit({z: _meta(z, 4)})                # z changed here again after its revoke
    res = replay_journal(dev, sb, 1)
    assert res.revoked == 2                   # x's and z's first copies
    assert dev.read(x) == _meta(x, 7)         # the newer x stands
    assert dev.read(y) == _meta(y, 2)         # never revoked: replayed
    assert dev.read(z) == _meta(z, 4)         # logged after the revoke: replayed


def test_revoke_records_span_several_blocks(image):
    dev, sb = image
    j = Journal(dev, sb, 0)
    j.open()
    base = sb.rgrp_start + 1000
    homes = [base, base + 1]
    many = [base + 5000 + i for i in range(600)]   # more than one revoke block holds
    j.commit({h: _meta(h, 8) for h in homes})
    j.write_back(homes)
    pending = j.begin_commit({}, many)
    j.write_commit(pending)
    j.end_commit(pending)
    _head, txns, _off = scan_journal(dev, sb, 0)
    assert [len(blocks) for _seq, blocks in txns] == [0, 0, 0]   # revoked, then revokes
