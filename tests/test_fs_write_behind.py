"""BlockDevice write-behind: queued data writes keep their order against every other
I/O on the device, and a failed one is reported by the next drain (flush, read).
Direct read-ahead: served bytes are never older than the last write to them."""

from __future__ import annotations

import mmap
import os
import threading
import time

import mountutil
import pytest

from clusterfs.errors import StorageError
from clusterfs.format.block import BLOCK_SIZE
from clusterfs.storage import device
from clusterfs.storage.device import BlockDevice


@pytest.fixture
def dev(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(64 * BLOCK_SIZE)
    d = BlockDevice(str(path))
    yield d
    d.close()


def test_queued_write_is_seen_by_a_later_read(dev):
    data = os.urandom(8 * BLOCK_SIZE)
    dev.write_behind(4 * BLOCK_SIZE, data)
    assert dev.read(4, 8) == data
    dev.drain()
    assert dev.read(4, 8) == data


def test_later_buffered_write_lands_after_the_queued_one(dev):
    dev.write_behind(0, b"A" * (4 * BLOCK_SIZE))
    dev.pwrite(BLOCK_SIZE, b"B" * BLOCK_SIZE)       # waits for the queue first
    got = dev.read(0, 4)
    assert got == b"A" * BLOCK_SIZE + b"B" * BLOCK_SIZE + b"A" * (2 * BLOCK_SIZE)


def test_unaligned_write_takes_the_buffered_path(dev):
    dev.write_behind(100, b"xyz")                   # not whole blocks: no O_DIRECT
    dev.flush()
    assert dev.pread(100, 3) == b"xyz"


def test_many_writes_respect_the_queue_limit(dev, monkeypatch):
    monkeypatch.setattr(device, "WRITE_BEHIND_LIMIT", 2 * BLOCK_SIZE)
    for i in range(64):
        dev.write_behind(i * BLOCK_SIZE, bytes([i]) * BLOCK_SIZE)
    dev.flush()
    raw = dev.read(0, 64)
    assert all(raw[i * BLOCK_SIZE] == i for i in range(64))


def test_failed_write_is_reported_by_the_next_flush(dev):
    dev.write_behind((1 << 62) // BLOCK_SIZE * BLOCK_SIZE, b"x" * BLOCK_SIZE)  # EFBIG
    with pytest.raises(StorageError):
        dev.flush()
    with pytest.raises(StorageError):                 # and stays reported
        dev.write_behind(0, b"y" * BLOCK_SIZE)


def test_close_finishes_the_queue(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(16 * BLOCK_SIZE)
    d = BlockDevice(str(path))
    d.write_behind(2 * BLOCK_SIZE, b"Z" * (2 * BLOCK_SIZE))
    d.close()
    with open(path, "rb") as f:
        f.seek(2 * BLOCK_SIZE)
        assert f.read(2 * BLOCK_SIZE) == b"Z" * (2 * BLOCK_SIZE)


# -- batching of contiguous direct writes ------------------------------------------


@pytest.fixture
def direct_puts(monkeypatch):
    """Record every pwrite the direct writer makes, as (offset, length); set `done`
    once one is made."""
    calls: list[tuple[int, int]] = []
    done = threading.Event()
    real = device._DirectWriter._put

    def put(self, staging, length, offset):
        real(self, staging, length, offset)
        calls.append((offset, length))
        done.set()
    monkeypatch.setattr(device._DirectWriter, "_put", put)
    return calls, done


def _needs_direct(d: BlockDevice) -> None:
    if device._open_direct(d.path, os.O_RDONLY) is None:
        pytest.skip("this file system refuses O_DIRECT: no direct writer, no batches")


def test_contiguous_writes_reach_the_device_as_one_write(dev, direct_puts):
    _needs_direct(dev)
    calls, _done = direct_puts
    data = os.urandom(12 * BLOCK_SIZE)
    for i in range(3):                          # three queued writes, one after another
        dev.write_behind(i * 4 * BLOCK_SIZE, data[i * 4 * BLOCK_SIZE : (i + 1) * 4 * BLOCK_SIZE])
    assert calls == []                          # held back: less than a batch
    dev.flush()                                 # needs them on the device
    assert calls == [(0, 12 * BLOCK_SIZE)]
    assert dev.read(0, 12) == data


def test_a_full_batch_is_written_without_being_asked(dev, direct_puts, monkeypatch):
    _needs_direct(dev)
    monkeypatch.setattr(device, "WRITE_BATCH", 8 * BLOCK_SIZE)
    calls, done = direct_puts
    dev.write_behind(0, b"a" * (4 * BLOCK_SIZE))
    dev.write_behind(4 * BLOCK_SIZE, b"b" * (4 * BLOCK_SIZE))
    assert done.wait(30), "a full batch stayed in the queue"
    assert calls == [(0, 8 * BLOCK_SIZE)]


def test_a_gap_ends_the_batch(dev, direct_puts):
    _needs_direct(dev)
    calls, _done = direct_puts
    dev.write_behind(0, b"a" * BLOCK_SIZE)
    dev.write_behind(8 * BLOCK_SIZE, b"b" * BLOCK_SIZE)     # not where the first ended
    dev.flush()
    assert sorted(calls) == [(0, BLOCK_SIZE), (8 * BLOCK_SIZE, BLOCK_SIZE)]
    assert dev.read(0, 1) == b"a" * BLOCK_SIZE and dev.read(8, 1) == b"b" * BLOCK_SIZE


# -- the newest copy of one block (BlockDevice.read_newest) -------------------------
# A direct write the kernel split at the page edges of the user's buffer ends inside
# a block; the next request starts there and needs that block's head back.


def test_a_queued_block_is_read_back_without_writing_the_queue(dev, direct_puts):
    _needs_direct(dev)
    calls, _done = direct_puts
    data = os.urandom(4 * BLOCK_SIZE)
    dev.write_behind(0, data)                   # held back: less than a batch
    assert dev.read_newest(2) == data[2 * BLOCK_SIZE : 3 * BLOCK_SIZE]
    assert calls == [] and dev.behind_pending == 4 * BLOCK_SIZE
    assert dev.read_newest(9) == bytes(BLOCK_SIZE)    # in no queued write: the device


def test_the_newest_queued_write_of_a_block_is_the_one_read(dev):
    old, new = b"o" * (4 * BLOCK_SIZE), b"n" * BLOCK_SIZE
    dev.write_behind(0, old)
    dev.write_behind(8 * BLOCK_SIZE, b"x" * BLOCK_SIZE)       # not the block: no matter
    dev.write_behind(BLOCK_SIZE, new)
    assert dev.read_newest(1) == new
    assert dev.read_newest(0) == old[:BLOCK_SIZE]
    dev.write_behind(2 * BLOCK_SIZE + 100, b"xyz")   # part of a block: read after the queue
    assert dev.read_newest(2) == b"o" * 100 + b"xyz" + b"o" * (BLOCK_SIZE - 103)


def _stall_direct_writes(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Batches of 4 blocks, and every device write held until `release` is set (at
    most 5 s: a read that waits for it waits that long); `started` is set when the
    first is taken."""
    monkeypatch.setattr(device, "WRITE_BATCH", 4 * BLOCK_SIZE)
    started, release = threading.Event(), threading.Event()
    real = device._DirectWriter._put

    def stalled(self, staging, length, offset):
        started.set()
        release.wait(5)
        real(self, staging, length, offset)
    monkeypatch.setattr(device._DirectWriter, "_put", stalled)
    return started, release


def test_a_block_being_written_is_read_from_its_write(dev, monkeypatch):
    _needs_direct(dev)
    started, release = _stall_direct_writes(monkeypatch)
    data = os.urandom(4 * BLOCK_SIZE)
    dev.write_behind(0, data)                   # a full batch: taken at once
    try:
        assert started.wait(30)
        assert dev.read_newest(3) == data[3 * BLOCK_SIZE :]   # the write is still stalled
        assert dev.behind_pending == 4 * BLOCK_SIZE
    finally:
        release.set()
    dev.flush()
    assert dev.read(0, 4) == data


def test_a_read_of_bytes_no_queued_write_touches_does_not_wait(dev, monkeypatch):
    """The fs reads on its event loop (the edge block of a write that ends inside a
    block, a metadata block): waiting there for the whole queue, up to 32 MiB of
    scattered writes, stalled three nodes under stress-ng's fpunch past the failure
    timeout and got a live node fenced. Only writes of the bytes read must land first."""
    _needs_direct(dev)
    started, release = _stall_direct_writes(monkeypatch)
    dev.pwrite(9 * BLOCK_SIZE, b"h" * BLOCK_SIZE)
    data = os.urandom(4 * BLOCK_SIZE)
    dev.write_behind(0, data)                   # a full batch: taken at once, stalled
    dev.write_behind(6 * BLOCK_SIZE, b"q" * BLOCK_SIZE)    # queued behind it
    try:
        assert started.wait(30)
        assert dev.read(9) == b"h" * BLOCK_SIZE         # touched by neither write
        assert dev.read_newest(5) == bytes(BLOCK_SIZE)
        assert dev.pread(4 * BLOCK_SIZE + 100, 200) == bytes(200)
        assert dev.behind_pending == 5 * BLOCK_SIZE     # nothing waited for the queue
    finally:
        release.set()
    assert dev.read(6) == b"q" * BLOCK_SIZE             # a queued write's bytes
    assert dev.read(0, 4) == data


def test_a_read_of_queued_bytes_lays_them_over_the_device_without_waiting(dev, monkeypatch):
    """A read that a queued write touches used to wait for the write, and so for the
    whole queue before it, on the event loop: three nodes running stress-ng's iomix
    (three instances each) had one taken for dead and fenced. The queued and in-flight
    writes are laid over the device's bytes in queue order instead."""
    _needs_direct(dev)
    started, release = _stall_direct_writes(monkeypatch)
    dev.pwrite(8 * BLOCK_SIZE, b"d" * (2 * BLOCK_SIZE))            # on the device
    data = os.urandom(4 * BLOCK_SIZE)
    dev.write_behind(0, data)                   # a full batch: taken at once, stalled
    dev.write_behind(8 * BLOCK_SIZE + 100, b"q" * 50)            # queued behind it
    dev.write_behind(8 * BLOCK_SIZE + 120, b"r" * 10)            # and a newer one over it
    try:
        assert started.wait(30)
        want = bytearray(b"d" * (2 * BLOCK_SIZE))
        want[100:150] = b"q" * 50
        want[120:130] = b"r" * 10
        assert dev.read(8, 2) == bytes(want)            # device + both, newest last
        assert dev.pread(2 * BLOCK_SIZE + 7, 9000) == (data + bytes(2 * BLOCK_SIZE)
                                                       )[2 * BLOCK_SIZE + 7:][:9000]
        assert dev.behind_pending > 0                   # nothing waited for the queue
    finally:
        release.set()
    dev.drain()
    assert dev.read(8, 2) == bytes(want)
    assert dev.read(0, 4) == data


def test_a_read_reports_a_write_known_to_have_failed(dev):
    """A read of other bytes no longer waits for a failing write, but once the
    failure is known every read reports it, as before."""
    dev.write_behind(1 << 62, b"xyz")      # EFBIG; not whole blocks: not held back
    deadline = time.monotonic() + 30
    while dev.behind_pending and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(StorageError):
        dev.read(3)


def test_a_write_of_the_last_queued_block_replaces_it_in_the_run(dev, direct_puts):
    """The rest of a block the last queued write ended inside comes as that whole
    block again: the queue drops its older copy and stays one run, one device write."""
    _needs_direct(dev)
    calls, _done = direct_puts
    first = os.urandom(4 * BLOCK_SIZE)
    again = os.urandom(2 * BLOCK_SIZE)
    dev.write_behind(0, first)
    dev.write_behind(3 * BLOCK_SIZE, again)     # block 3 anew, and block 4
    assert dev.behind_pending == 5 * BLOCK_SIZE
    dev.flush()
    assert calls == [(0, 5 * BLOCK_SIZE)]
    assert dev.read(0, 5) == first[: 3 * BLOCK_SIZE] + again


# -- direct read-ahead (BlockDevice.advise_willneed + read_data) ---------------------


def _fill(dev: BlockDevice, blocks: int) -> bytes:
    data = os.urandom(blocks * BLOCK_SIZE)
    dev.pwrite(0, data)
    dev.flush()
    return data


def test_read_ahead_serves_the_device_bytes(dev):
    data = _fill(dev, 64)
    dev.advise_willneed(8, 32)
    for blk in range(8, 40, 4):
        got = dev.read_data(blk * BLOCK_SIZE, 4 * BLOCK_SIZE)
        assert bytes(got) == data[blk * BLOCK_SIZE : (blk + 4) * BLOCK_SIZE]
        # served from the read-ahead buffers (unless this file system refuses O_DIRECT)
        assert isinstance(got, memoryview) or dev._ahead is None


def test_read_ahead_never_serves_data_older_than_a_write(dev):
    _fill(dev, 64)
    dev.advise_willneed(0, 32)
    dev.pwrite(2 * BLOCK_SIZE, b"P" * BLOCK_SIZE)
    dev.write_behind(5 * BLOCK_SIZE, b"Q" * BLOCK_SIZE)
    got = bytes(dev.read_data(0, 8 * BLOCK_SIZE))
    assert got[2 * BLOCK_SIZE : 3 * BLOCK_SIZE] == b"P" * BLOCK_SIZE
    assert got[5 * BLOCK_SIZE : 6 * BLOCK_SIZE] == b"Q" * BLOCK_SIZE


def test_read_ahead_after_a_queued_write_sees_it(dev):
    _fill(dev, 64)
    dev.write_behind(10 * BLOCK_SIZE, b"R" * (4 * BLOCK_SIZE))
    dev.advise_willneed(8, 16)                  # must not overtake the queued write
    got = bytes(dev.read_data(10 * BLOCK_SIZE, 4 * BLOCK_SIZE))
    assert got == b"R" * (4 * BLOCK_SIZE)


def _chunked_device(tmp_path, chunks: int) -> tuple[BlockDevice, int]:
    """A device of `chunks` read-ahead chunks of random bytes, with direct I/O (else
    the test is skipped), and the blocks in a chunk. The caller closes it."""
    path = tmp_path / "big.img"
    chunk = device.AHEAD_CHUNK // BLOCK_SIZE
    with open(path, "wb") as f:
        f.write(os.urandom(chunks * chunk * BLOCK_SIZE))
    dev = BlockDevice(str(path))
    try:
        _needs_direct(dev)
    except BaseException:
        dev.close()
        raise
    return dev, chunk


def test_read_ahead_neither_waits_for_nor_overtakes_queued_writes(tmp_path, monkeypatch):
    """Read-ahead is submitted and served on the event loop: it waited there for the
    whole write-behind queue (seconds of scattered writes on a busy disk). Now the
    chunks a queued write touches are left out and read plainly after it."""
    dev, chunk = _chunked_device(tmp_path, 3)
    try:
        data = dev.read(0, chunk)
        started, release = _stall_direct_writes(monkeypatch)
        s_at, t_at = 2 * chunk + 8, chunk + 3                  # in the 3rd and 2nd chunks
        dev.write_behind(s_at * BLOCK_SIZE, b"S" * (4 * BLOCK_SIZE))   # taken, stalled
        dev.write_behind(t_at * BLOCK_SIZE, b"T" * BLOCK_SIZE)         # queued behind it
        try:
            assert started.wait(30)
            dev.advise_willneed(0, 3 * chunk)
            got = dev.read_data(0, 8 * BLOCK_SIZE)             # the 1st: no queued write
            assert isinstance(got, memoryview)
            assert bytes(got) == data[: 8 * BLOCK_SIZE]
            assert dev.behind_pending == 5 * BLOCK_SIZE        # nothing waited
        finally:
            release.set()
        assert bytes(dev.read_data(t_at * BLOCK_SIZE, BLOCK_SIZE)) == b"T" * BLOCK_SIZE
        assert bytes(dev.read_data(s_at * BLOCK_SIZE, 4 * BLOCK_SIZE)) == \
            b"S" * (4 * BLOCK_SIZE)
    finally:
        dev.close()


def test_read_ahead_looks_at_the_write_queue_once_per_advice(tmp_path, monkeypatch):
    """Which chunks a queued write touches is taken from one look at the queue for the
    whole advice, not one walk of it per chunk (stress-ng's iomix, thousands of small
    writes queued, stalled a node's event loop 0.38 s in such walks, one per 4 MiB chunk)."""
    dev, chunk = _chunked_device(tmp_path, 4)
    try:
        started, release = _stall_direct_writes(monkeypatch)
        dev.write_behind(3 * chunk * BLOCK_SIZE, b"S" * BLOCK_SIZE)   # taken, stalled
        for i in range(500):                                          # queued behind it
            dev.write_behind((2 * chunk + i % 64) * BLOCK_SIZE, b"T" * BLOCK_SIZE)
        looks = []
        real = device._WriteBehind.owed_writes
        monkeypatch.setattr(device._WriteBehind, "owed_writes",
                            lambda self, o, n: looks.append(o) or real(self, o, n))
        try:
            assert started.wait(30)
            dev.advise_willneed(0, 4 * chunk)
            assert len(looks) == 1, looks
            got = dev.read_data(chunk * BLOCK_SIZE, 8 * BLOCK_SIZE)    # the 2nd: no write
            assert isinstance(got, memoryview)
        finally:
            release.set()
        assert bytes(dev.read_data(2 * chunk * BLOCK_SIZE, BLOCK_SIZE)) == b"T" * BLOCK_SIZE
    finally:
        dev.close()


def test_read_outside_the_read_ahead_falls_back(dev):
    data = _fill(dev, 64)
    dev.advise_willneed(0, 4)
    got = dev.read_data(30 * BLOCK_SIZE, 8 * BLOCK_SIZE)
    assert bytes(got) == data[30 * BLOCK_SIZE : 38 * BLOCK_SIZE]


def test_bypass_page_cache_reads_and_writes_go_around_it(tmp_path):
    """A cluster mount's metadata path: aligned and unaligned writes through O_DIRECT,
    read back through it and through a plain descriptor (the device sees them)."""
    with mountutil.loop_device(16 << 20, tmp_path) as loop:
        dev = BlockDevice(loop)
        try:
            assert dev.bypass_page_cache()
            dev.write(10, b"a" * 4096 * 3)
            dev.pwrite(10 * 4096 + 100, b"hello")            # unaligned: read-modify-write
            got = dev.read(10, 3)
            assert got[:100] == b"a" * 100 and got[100:105] == b"hello"
            assert got[105:] == b"a" * (3 * 4096 - 105)
            big = os.urandom(5 << 20)                         # more than the bounce buffer
            dev.write(100, big)
            assert dev.read(100, len(big) // 4096) == big
            dev.flush()
        finally:
            dev.close()
        fd = os.open(loop, os.O_RDONLY | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, 4096)
            os.preadv(fd, [buf], 10 * 4096)
            assert buf[100:105] == b"hello"
        finally:
            os.close(fd)
