"""FlushRing (io_uring): a flush, and the small queued write before it, without a
worker thread. What must hold: the bytes and the flush land, a failed write is
reported and kept by the write-behind, a read or drain of bytes in flight on the event
loop's own thread finishes them instead of waiting for the reaper it blocks, a
cancelled waiter's write still settles, closing waits for what is in flight, and a
kernel that refuses io_uring leaves flushes to the worker thread (said once)."""

from __future__ import annotations

import logging
import os

import pytest
import trio
import trio.testing
from trioutil import trio_test

from clusterfs.errors import StorageError
from clusterfs.format.block import BLOCK_SIZE
from clusterfs.storage import ring as ringmod
from clusterfs.storage.device import BlockDevice
from clusterfs.storage.ring import WRITE_BUFFER, FlushRing

HANG = 10


def _image(tmp_path, blocks: int = 64) -> str:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(blocks * BLOCK_SIZE)
    return str(path)


def _on_disk(path: str, blkno: int, count: int = 1) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, count * BLOCK_SIZE, blkno * BLOCK_SIZE)
    finally:
        os.close(fd)


@pytest.fixture
def dev(tmp_path):
    d = BlockDevice(_image(tmp_path))
    d.start_write_behind()
    d.start_flush_ring()
    if d._ring is None:
        d.close()
        pytest.skip("io_uring refused by this kernel")
    yield d
    d.close()


@trio_test
async def test_small_queued_write_goes_out_with_the_flush(dev):
    data = os.urandom(2 * BLOCK_SIZE)
    dev.write_behind(3 * BLOCK_SIZE, data)
    assert dev.behind_pending == len(data)        # a short aligned run: held back
    with trio.fail_after(HANG):
        assert await dev.flush_without_thread()
    assert dev.behind_pending == 0
    assert _on_disk(dev.path, 3, 2) == data
    # the write-behind thread still works afterwards, behind what the ring wrote
    more = os.urandom(BLOCK_SIZE)
    dev.write_behind(3 * BLOCK_SIZE, more)
    dev.drain()
    assert _on_disk(dev.path, 3) == more


@trio_test
async def test_flush_alone_and_scattered_writes(dev):
    with trio.fail_after(HANG):
        assert await dev.flush_without_thread()   # nothing queued: the fsync alone
    pieces = {blk: os.urandom(BLOCK_SIZE) for blk in (1, 9, 4, 30)}
    for blk, data in pieces.items():
        dev.write_behind(blk * BLOCK_SIZE, data)
    with trio.fail_after(HANG):
        assert await dev.flush_without_thread()
    for blk, data in pieces.items():
        assert _on_disk(dev.path, blk) == data


@trio_test
async def test_more_than_the_ring_buffer_is_left_to_the_thread(dev):
    data = os.urandom(WRITE_BUFFER + BLOCK_SIZE)
    dev.write_behind(0, data)
    assert not await dev.flush_without_thread()   # nothing done
    assert dev.behind_pending == len(data)
    dev.flush()
    assert _on_disk(dev.path, 0, len(data) // BLOCK_SIZE) == data


@trio_test
async def test_a_wait_for_writes_in_flight_on_the_loop_thread_finishes_them(dev):
    """The reaper runs on the event loop: a synchronous wait there for the ring's write
    (a drain) would wait for ever if it waited for the reaper. A read of those bytes
    does not wait: it lays them over what the device holds."""
    data = os.urandom(BLOCK_SIZE)
    dev.write_behind(7 * BLOCK_SIZE, data)
    flushed = []
    # the reaper, started by the first request, waits on an eventfd nobody signals:
    # the completion stays unreaped until the read (not a race with a fast device)
    ring = dev._ring
    signalled, ring._eventfd = ring._eventfd, os.eventfd(0, os.EFD_NONBLOCK)

    async def flusher():
        flushed.append(await dev.flush_without_thread())

    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flusher)
            await trio.testing.wait_all_tasks_blocked()
            assert dev._behind.elsewhere            # in the ring, not yet reaped
            assert dev.pread(7 * BLOCK_SIZE, BLOCK_SIZE) == data   # laid over, no wait
            dev.drain()                             # a wait for it: finished here
            assert not dev._behind.elsewhere
    assert flushed == [True]
    assert dev.behind_pending == 0
    os.close(signalled)


@trio_test
async def test_cancelled_waiter_write_still_settles(dev):
    data = os.urandom(BLOCK_SIZE)
    dev.write_behind(5 * BLOCK_SIZE, data)
    with trio.move_on_after(0) as scope:
        scope.cancel()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dev.flush_without_thread)
            await trio.sleep(0)
    with trio.fail_after(HANG):
        while dev.behind_pending:
            await trio.sleep(0.01)
    assert _on_disk(dev.path, 5) == data
    dev.drain()                                   # no error left behind


@trio_test
async def test_failed_write_is_reported_and_kept(dev):
    """A write the device refuses (here: a read-only descriptor under the ring) fails
    the flush, cancels the linked fsync, and every later drain reports it, as a failed
    write of the thread does."""
    behind = dev._behind
    readonly = os.open(dev.path, os.O_RDONLY | os.O_DIRECT)
    real = behind.direct.fd
    behind.direct.fd = readonly
    try:
        dev.write_behind(0, os.urandom(BLOCK_SIZE))
        with pytest.raises(StorageError, match="write at 0"), trio.fail_after(HANG):
            await dev.flush_without_thread()
    finally:
        behind.direct.fd = real
        os.close(readonly)
    assert dev.behind_pending == 0
    with pytest.raises(StorageError, match="write at 0"):
        dev.drain()


@trio_test
async def test_close_waits_for_requests_in_flight(dev):
    data = os.urandom(BLOCK_SIZE)
    dev.write_behind(2 * BLOCK_SIZE, data)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dev.flush_without_thread)
        await trio.testing.wait_all_tasks_blocked()
        behind = dev._behind
        dev._ring.close()                          # the device closing under it
        assert not behind.elsewhere and behind.pending == 0
    assert _on_disk(dev.path, 2) == data


def test_no_trio_run_no_ring(dev):
    """Outside a trio run (fsck, mkfs) there is no reaper: flush_without_thread must
    be awaited in one, and a plain flush() works as before."""
    dev.write_behind(0, b"x" * BLOCK_SIZE)
    dev.flush()
    assert _on_disk(dev.path, 0)[:1] == b"x"


@trio_test
async def test_refused_io_uring_leaves_flushes_to_the_thread(tmp_path, monkeypatch, caplog):
    def refuse(entries, eventfd):
        raise OSError(1, "io_uring: Operation not permitted")

    monkeypatch.setattr(ringmod, "Uring", refuse)
    monkeypatch.setattr(ringmod, "_refusal_logged", False)
    caplog.set_level(logging.INFO, logger="clusterfs.storage.ring")
    devices = [BlockDevice(_image(tmp_path / str(i))) if (tmp_path / str(i)).mkdir() is None
               else None for i in range(2)]
    try:
        for d in devices:
            d.start_write_behind()
            d.write_behind(0, b"y" * BLOCK_SIZE)
            assert not await d.flush_without_thread()
            assert d.behind_pending == BLOCK_SIZE    # untouched: the thread path's
            d.flush()
            assert _on_disk(d.path, 0)[:1] == b"y"
    finally:
        for d in devices:
            d.close()
    said = [r for r in caplog.records if "io_uring unavailable" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO


def test_ring_open_and_plain_fsync(tmp_path):
    ring = FlushRing.open()
    if ring is None:
        pytest.skip("io_uring refused by this kernel")
    fd = os.open(_image(tmp_path), os.O_RDWR)

    async def main():
        with trio.fail_after(HANG):
            assert await ring.fsync(fd)
            with pytest.raises(OSError):
                await ring.fsync(10_000)           # a descriptor that is not open

    try:
        trio.run(main)
    finally:
        ring.close()
        os.close(fd)


def test_a_chain_step_waits_for_the_flush_before_it(tmp_path):
    """A commit with new data is [data and log writes, flush, commit block, flush]: the
    commit block must not start before the flush before it is done. A flush that fails
    (here: a descriptor that is not open) cancels the write after it."""
    ring = FlushRing.open()
    if ring is None:
        pytest.skip("io_uring refused by this kernel")
    path = _image(tmp_path)
    fd = os.open(path, os.O_RDWR)
    block = memoryview(b"c" * BLOCK_SIZE)

    async def main():
        with trio.fail_after(HANG):
            with pytest.raises(OSError, match="flush"):
                await ring.chain([("fsync", 10_000), ("write", fd, 0, [block])])
            assert await ring.chain([("fsync", fd), ("write", fd, BLOCK_SIZE, [block]),
                                     ("fsync", fd)])

    try:
        trio.run(main)
    finally:
        ring.close()
        os.close(fd)
    assert _on_disk(path, 0) == bytes(BLOCK_SIZE)        # cancelled: never written
    assert _on_disk(path, 1) == b"c" * BLOCK_SIZE


# -- reads ------------------------------------------------------------------------------


@pytest.mark.parametrize("direct", [False, True], ids=["page-cache", "o-direct"])
@trio_test
async def test_a_read_through_the_ring_returns_the_device_bytes(dev, direct):
    if direct and not dev.bypass_page_cache():
        pytest.skip("O_DIRECT refused here")
    data = os.urandom(8 * BLOCK_SIZE)
    fd = os.open(dev.path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 4 * BLOCK_SIZE)
    finally:
        os.close(fd)
    with trio.fail_after(HANG):
        assert await dev.read_async(4 * BLOCK_SIZE, len(data)) == data
        assert await dev.read_async(5 * BLOCK_SIZE + 100, 50) == data[BLOCK_SIZE + 100:][:50]
        # at the device's end: the bytes there are (as pread)
        end = 64 * BLOCK_SIZE
        assert await dev.read_async(end - BLOCK_SIZE, 2 * BLOCK_SIZE) == bytes(BLOCK_SIZE)
    assert dev.ring_reads == 3


@trio_test
async def test_a_read_lays_queued_writes_over_the_device_bytes(dev):
    """A write still in the write-behind queue is part of what a read returns."""
    first, second = os.urandom(BLOCK_SIZE), os.urandom(100)
    dev.write_behind(7 * BLOCK_SIZE, first)
    dev.write_behind(7 * BLOCK_SIZE, second + first[100:])
    with trio.fail_after(HANG):
        got = await dev.read_async(6 * BLOCK_SIZE, 3 * BLOCK_SIZE)
    assert got == bytes(BLOCK_SIZE) + second + first[100:] + bytes(BLOCK_SIZE)


@trio_test
async def test_many_reads_at_once_beyond_the_ring_buffers(dev):
    """More reads than read buffers: those the ring cannot take read the plain way;
    every one gets its own bytes."""
    blocks = [os.urandom(BLOCK_SIZE) for _ in range(16)]
    fd = os.open(dev.path, os.O_WRONLY)
    try:
        for i, block in enumerate(blocks):
            os.pwrite(fd, block, (16 + i) * BLOCK_SIZE)
    finally:
        os.close(fd)
    got: dict[int, bytes] = {}

    async def read(i: int) -> None:
        got[i] = await dev.read_async((16 + i) * BLOCK_SIZE, BLOCK_SIZE)

    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            for i in range(16):
                nursery.start_soon(read, i)
    assert [got[i] for i in range(16)] == blocks
    assert 0 < dev.ring_reads <= 16


@trio_test
async def test_a_cancelled_read_frees_its_buffer_once_done(dev):
    with trio.move_on_after(0) as scope:
        scope.cancel()
        await dev.read_async(0, BLOCK_SIZE)
    with trio.fail_after(HANG):
        while len(dev._ring._read_buffers) < ringmod.READ_BUFFERS:
            await trio.sleep(0.01)
        assert await dev.read_async(0, BLOCK_SIZE) == bytes(BLOCK_SIZE)


@trio_test
async def test_a_failed_ring_read_is_a_storage_error(dev):
    """A read the device refuses (here: a write-only descriptor under the ring)."""
    writeonly = os.open(dev.path, os.O_WRONLY)
    real = dev.fd
    dev.fd = writeonly
    try:
        with pytest.raises(StorageError, match="read at 0"), trio.fail_after(HANG):
            await dev.read_async(0, 10)
    finally:
        dev.fd = real
        os.close(writeonly)
