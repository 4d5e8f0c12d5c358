"""Disk poison-pill fencing (issue 8, item 4): heartbeat slots on an image file.

    format    the slot layout round-trips; a fresh mkfs slot is unclaimed; a bad
              checksum or a block at the wrong address is refused
    claim     a node writes its node id and incarnation into its slot; the agent
              finds the slot by scanning for them
    fence     the agent writes the pill and returns only after msgwait; the victim's
              watcher has called on_pill by then, and its device refuses writes
    faults    a slot that cannot be read (garbage, a read that hangs) for longer than
              the timeout triggers on_pill too; a pill for another incarnation, or a
              node with no slot, does not touch anybody
    config    [fencing] poison-pill fields; bad values name the field

Real clock, short intervals (0.1 s / 0.5 s / 1 s): a few seconds in all.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest
import trio

from clusterfs.config import parse_config
from clusterfs.errors import ChecksumError, ConfigError, FenceError, FormatError, StorageError
from clusterfs.fence import factory
from clusterfs.fence.agent import NoopAgent, ProcessAgent
from clusterfs.fence.poison_pill import (
    PillWatcher,
    PoisonPillAgent,
    claim_slot,
    find_slots,
    read_slots,
)
from clusterfs.format.block import BLOCK_SIZE
from clusterfs.format.heartbeat import HeartbeatSlot, Pill, decode_slot, encode_slot, with_pill
from clusterfs.node.mkfs_cmd import make_filesystem
from clusterfs.storage.device import BlockDevice

INTERVAL, TIMEOUT, MSGWAIT = 0.1, 0.5, 1.0
INC2, INC2_OLD, INC3 = 0x2B, 0x2D, 0x3F


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(64 << 20)
    sb = make_filesystem(str(path), journals=3, journal_mib=1, cluster="lab")
    return str(path), sb


@pytest.fixture
def devs(image):
    """Open devices, closed at the end."""
    opened: list[BlockDevice] = []

    def open_(writable: bool = True) -> BlockDevice:
        dev = BlockDevice(image[0], writable)
        opened.append(dev)
        return dev

    yield open_
    for dev in opened:
        dev.close()


# -- format --------------------------------------------------------------------------

def test_slot_layout_round_trips():
    pill = Pill(2, INC2, 1, 7, 123)
    hs = HeartbeatSlot(2, INC2, 456, pill, 9)
    buf = encode_slot(hs, 17)
    assert len(buf) == BLOCK_SIZE
    assert decode_slot(buf, 17) == hs
    assert decode_slot(encode_slot(HeartbeatSlot(), 18), 18) == HeartbeatSlot()
    with pytest.raises(FormatError, match="claims to be block 17"):
        decode_slot(buf, 18)                    # a slot written to the wrong place
    bad = bytearray(buf)
    bad[40] ^= 1                                # the incarnation, one bit
    with pytest.raises(ChecksumError):
        decode_slot(bad, 17)
    assert pill.targets(2, INC2) and pill.targets(2, None)
    assert not pill.targets(2, INC2_OLD) and not pill.targets(3, INC2)
    assert Pill(2, 0, 1, 7).targets(2, INC2_OLD)           # 0: whoever owns the slot


def test_fresh_filesystem_slots_are_unclaimed(image, devs):
    _path, sb = image
    assert read_slots(devs(), sb) == [HeartbeatSlot()] * 3


# -- claim -----------------------------------------------------------------------------

def test_claim_and_find(image, devs):
    _path, sb = image
    dev = devs()
    claim_slot(dev, sb, 1, 2, INC2)
    claim_slot(dev, sb, 2, 3, INC3)
    assert find_slots(dev, sb, 2) == [1]
    assert find_slots(dev, sb, 2, INC2) == [1]
    assert find_slots(dev, sb, 2, INC2_OLD) == []
    assert find_slots(dev, sb, 3) == [2]
    assert find_slots(dev, sb, 4) == []
    slots = read_slots(dev, sb)
    assert slots[0] == HeartbeatSlot() and slots[1].owner == 2 and slots[1].claimed_ns > 0
    with pytest.raises(FenceError, match="out of range"):
        claim_slot(dev, sb, 3, 2, INC2)
    # a slot holding a pill for this very incarnation cannot be claimed by it
    blk = sb.hb_start + 1
    dev.write(blk, encode_slot(with_pill(slots[1], Pill(2, INC2, 1, 7)), blk))
    with pytest.raises(FenceError, match="was fenced by node 1"):
        claim_slot(dev, sb, 1, 2, INC2)
    claim_slot(dev, sb, 1, 2, INC2_OLD)         # a new life claims it, the pill dropped
    assert read_slots(dev, sb)[1].pill is None
    # a block that does not decode is simply overwritten by the claim
    dev.write(sb.hb_start, os.urandom(BLOCK_SIZE))
    assert read_slots(dev, sb)[0] is None
    claim_slot(dev, sb, 0, 4, 0x41)
    assert find_slots(dev, sb, 4) == [0]


# -- fence and watch --------------------------------------------------------------------

class Victim:
    """Node 2: claims slot 1, runs its watcher; on_pill refuses writes on its device."""

    def __init__(self, devs, sb, slot: int = 1, incarnation: int = INC2) -> None:
        self.io = devs()
        claim_slot(self.io, sb, slot, 2, incarnation)
        self.fired: list[tuple[float, str]] = []
        self.watcher = PillWatcher.for_slot(devs(writable=False), sb, slot, 2, incarnation,
                                            on_pill=self.on_pill, interval=INTERVAL,
                                            timeout=TIMEOUT)

    def on_pill(self, reason: str) -> None:
        self.fired.append((trio.current_time(), reason))
        self.io.refuse_writes(reason)


def test_pill_stops_the_victim_before_the_fence_returns(image, devs):
    _path, sb = image
    victim = Victim(devs, sb)
    agent = PoisonPillAgent(devs(), 1, msgwait=MSGWAIT)
    assert agent.sb.hb_start == sb.hb_start                 # read from the device

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(victim.watcher.run)
            await trio.sleep(5 * INTERVAL)
            assert victim.fired == []                       # all well: no false alarm
            victim.io.write(1000, b"v" * BLOCK_SIZE)
            t0 = trio.current_time()
            await agent.fence(2, 7, INC2)
            done = trio.current_time()
            nursery.cancel_scope.cancel()
        return t0, done

    t0, done = trio.run(main)
    assert done - t0 >= MSGWAIT                             # returned only after msgwait
    assert len(victim.fired) == 1
    at, reason = victim.fired[0]
    assert "poison pill from node 1 (generation 7)" in reason
    assert at < done                                        # before the fence returned
    assert at - t0 <= MSGWAIT
    with pytest.raises(StorageError, match="poison pill"):  # the victim writes no more
        victim.io.write(1001, b"v" * BLOCK_SIZE)
    with pytest.raises(StorageError, match="poison pill"):
        victim.io.write_behind(1002 * BLOCK_SIZE, b"v" * BLOCK_SIZE)
    hs = read_slots(agent.dev, sb)[1]
    assert hs.owner == 2 and hs.pill == Pill(2, INC2, 1, 7, hs.pill.written_ns)
    assert agent.statistics()["pills"] == 1
    assert victim.watcher.statistics()["fired"] == reason


def test_pill_for_an_old_incarnation_spares_the_new_one(image, devs, caplog):
    """Node 2 restarted (INC2) and claimed slot 1; the fence is of its old life
    (INC2_OLD), which holds no slot any more: no pill lands, the new life goes on."""
    _path, sb = image
    victim = Victim(devs, sb)
    agent = PoisonPillAgent(devs(), 1, msgwait=MSGWAIT)

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(victim.watcher.run)
            t0 = trio.current_time()
            await agent.fence(2, 8, INC2_OLD)
            took = trio.current_time() - t0
            await trio.sleep(3 * INTERVAL)
            nursery.cancel_scope.cancel()
        return took

    with caplog.at_level(logging.WARNING, logger="clusterfs.fence.poison_pill"):
        took = trio.run(main)
    assert took >= MSGWAIT                                  # it looked twice
    assert victim.fired == []
    assert "holds no heartbeat slot" in caplog.text
    assert read_slots(agent.dev, sb)[1].pill is None
    assert agent.pills == 0


def test_a_pill_for_someone_else_is_ignored(image, devs):
    _path, sb = image
    victim = Victim(devs, sb)
    w = victim.watcher
    mine = read_slots(victim.io, sb)[1]
    assert w.check(mine) is None
    assert w.check(with_pill(mine, Pill(3, INC3, 1, 7))) is None
    assert w.check(with_pill(mine, Pill(2, INC2_OLD, 1, 7))) is None
    assert "poison pill" in w.check(with_pill(mine, Pill(2, 0, 1, 7)))
    assert "claimed by node 3" in w.check(HeartbeatSlot(3, INC3, 1))
    assert "claimed by nobody" in w.check(HeartbeatSlot())


def _watch_until_fired(victim: Victim, bound: float) -> float:
    async def main():
        t0 = trio.current_time()
        with trio.move_on_after(bound):
            await victim.watcher.run()
        return trio.current_time() - t0

    return trio.run(main)


def test_unreadable_slot_for_too_long_triggers(image, devs):
    _path, sb = image
    victim = Victim(devs, sb)
    victim.io.write(sb.hb_start + 1, os.urandom(BLOCK_SIZE))   # garbage: bad checksum
    took = _watch_until_fired(victim, 5.0)
    assert len(victim.fired) == 1, "the watcher never fired"
    assert f"not read for {TIMEOUT:g} s" in victim.fired[0][1]
    assert "bad" in victim.fired[0][1] or "checksum" in victim.fired[0][1]
    assert TIMEOUT <= took < TIMEOUT + 1.0
    assert victim.watcher.bad_reads >= 2


class HangingDevice:
    """Reads hang until released (a path to the disk that stopped answering)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.release = threading.Event()

    def read(self, blkno: int, count: int = 1) -> bytes:
        self.release.wait(30)
        raise StorageError(f"{self.path}: read at block {blkno}: released")


def test_a_read_that_hangs_triggers(image, devs):
    _path, sb = image
    victim = Victim(devs, sb)
    hang = HangingDevice("hang")
    victim.watcher.dev = hang
    try:
        took = _watch_until_fired(victim, 5.0)
    finally:
        hang.release.set()
    assert len(victim.fired) == 1, "the watcher never fired"
    assert "the read did not return" in victim.fired[0][1]
    assert TIMEOUT <= took < TIMEOUT + 1.0


def test_a_node_stopped_past_its_timeout_reads_the_pill_it_finds(image, devs):
    """SIGSTOP (here: the event loop blocked) past the timeout while a fencer writes a
    pill: once running again the watcher reads its slot and stops for the pill; it
    used to give up at once, unread, for "not read" (the cause it then named)."""
    _path, sb = image
    victim = Victim(devs, sb)
    fencer = devs()
    blk = sb.hb_start + 1

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(victim.watcher.run)
            await trio.sleep(3 * INTERVAL)
            mine = decode_slot(fencer.read(blk), blk)
            fencer.write(blk, encode_slot(with_pill(mine, Pill(2, INC2, 1, 9)), blk))
            time.sleep(2 * TIMEOUT)                 # the whole loop stopped
            await trio.sleep(3 * INTERVAL)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert len(victim.fired) == 1, "the watcher never fired"
    assert "poison pill from node 1 (generation 9)" in victim.fired[0][1]


def test_slot_taken_by_another_node_triggers(image, devs):
    _path, sb = image
    victim = Victim(devs, sb)
    claim_slot(devs(), sb, 1, 3, INC3)
    _watch_until_fired(victim, 5.0)
    assert len(victim.fired) == 1 and "claimed by node 3" in victim.fired[0][1]


def test_agent_refuses_itself_and_reports_write_failures(image, devs):
    _path, sb = image
    Victim(devs, sb)
    agent = PoisonPillAgent(devs(), 1, msgwait=MSGWAIT)
    with pytest.raises(FenceError, match="itself"):
        trio.run(agent.fence, 1, 7, None)
    agent.dev.refuse_writes("read-only for the test")
    with pytest.raises(FenceError, match=r"cannot write its pill: .*read-only for the test"):
        trio.run(agent.fence, 2, 7, INC2)


# -- config and make_agent -----------------------------------------------------------

def _config(fencing, base="/etc/clusterfs"):
    return parse_config({"name": "lab", "key": "ab" * 32, "fencing": fencing,
                         "node": [{"id": 1, "address": "127.0.0.1:7001"},
                                  {"id": 2, "address": "127.0.0.1:7002"}]}, base_dir=base)


def test_fencing_config_defaults_and_fields(tmp_path):
    f = _config({}).fencing
    assert (f.agent, f.interval, f.timeout, f.msgwait) == ("noop", 1.0, 2.0, 4.0)
    f = _config({"agent": "poison-pill", "device": "disk.img", "interval": 0.5}).fencing
    assert f.device == "/etc/clusterfs/disk.img"           # relative to the config file
    assert (f.interval, f.timeout, f.msgwait) == (0.5, 1.0, 2.0)
    f = _config({"agent": "scsi-pr", "devices": ["iscsi://127.0.0.1/iqn.x:y/1"]}).fencing
    assert f.devices == ("iscsi://127.0.0.1/iqn.x:y/1",)
    assert _config({"agent": "process", "pid_dir": "/run/f"}).fencing.pid_dir == "/run/f"


@pytest.mark.parametrize("fencing, message", [
    ({"agent": "x"}, "fencing.agent: unknown agent 'x'"),
    ({"agent": 3}, "fencing.agent: must be a string"),
    ({"agent": "noop", "colour": 1}, "fencing.colour: unknown field"),
    ({"agent": "noop", "devices": []}, "fencing.devices: not an option of agent 'noop'"),
    ({"agent": "scsi-pr"}, "fencing.devices: missing"),
    ({"agent": "scsi-pr", "devices": []}, "fencing.devices: must be a non-empty list"),
    ({"agent": "scsi-pr", "devices": ["/dev/sdb"]},
     "fencing.devices: '/dev/sdb' is not an iscsi:// URL"),
    ({"agent": "scsi-pr", "devices": ["iscsi://h/i/1", "iscsi://h/i/1"]},
     "fencing.devices: a path is listed twice"),
    ({"agent": "poison-pill", "device": 7}, "fencing.device: must be a device path"),
    ({"agent": "poison-pill", "interval": "1"}, "fencing.interval: must be a number"),
    ({"agent": "poison-pill", "interval": 0}, "fencing.interval: 0 out of range"),
    ({"agent": "poison-pill", "interval": 1, "timeout": 1},
     "fencing.timeout: 1 s must be longer than interval (1 s)"),
    ({"agent": "poison-pill", "timeout": 2, "msgwait": 2},
     "fencing.msgwait: 2 s must be longer than timeout (2 s)"),
    ({"agent": "process", "pid_dir": ""}, "fencing.pid_dir: must be a path"),
    ("scsi-pr", "fencing: must be a table"),
])
def test_bad_fencing_field_is_named(fencing, message):
    with pytest.raises(ConfigError) as caught:
        _config(fencing)
    assert str(caught.value).startswith(message), str(caught.value)
    assert "\n" not in str(caught.value)


def test_make_agent_builds_each_agent(image, devs, tmp_path):
    path, sb = image
    assert isinstance(factory.make_agent(_config({}), 1), NoopAgent)
    agent = factory.make_agent(_config({"agent": "process", "pid_dir": str(tmp_path)}), 1)
    assert isinstance(agent, ProcessAgent) and agent.pid_dir == tmp_path
    with pytest.raises(ConfigError, match=r"fencing\.pid_dir: missing"):
        factory.make_agent(_config({"agent": "process"}), 1)
    given = devs()
    pill = factory.make_agent(_config({"agent": "poison-pill", "msgwait": 9}), 1,
                              device=given)
    assert isinstance(pill, PoisonPillAgent) and pill.dev is given and pill.msgwait == 9
    assert pill.sb.hb_start == sb.hb_start
    opened = factory.make_agent(_config({"agent": "poison-pill", "device": path}), 1,
                                open_device=lambda p: devs())
    assert isinstance(opened, PoisonPillAgent) and opened.msgwait == 4.0
    with pytest.raises(ConfigError, match=r"fencing\.device: missing"):
        factory.make_agent(_config({"agent": "poison-pill"}), 1)
    with pytest.raises(FenceError, match="no way to open"):
        factory.make_agent(_config({"agent": "poison-pill", "device": path}), 1)
    # a device without a clusterfs on it cannot be used: the start fails in one line
    blank = tmp_path / "blank.img"
    blank.write_bytes(bytes(1 << 20))
    with pytest.raises(FormatError):
        factory.make_agent(_config({"agent": "poison-pill", "device": str(blank)}), 1,
                           open_device=lambda p: BlockDevice(p))


def test_refused_device_fails_writes_still_queued(image, devs):
    """A write queued behind (not yet on the device) when the pill comes never lands."""
    path, _sb = image
    dev = devs()
    at = 2000 * BLOCK_SIZE
    dev.write_behind(at, b"q" * BLOCK_SIZE)      # one aligned write: held back for a batch
    dev.refuse_writes("poison pill: stop")
    with pytest.raises(StorageError, match="poison pill: stop"):
        dev.drain()
    with open(path, "rb") as f:
        f.seek(at)
        assert f.read(BLOCK_SIZE) == bytes(BLOCK_SIZE)
    with pytest.raises(StorageError, match="poison pill: stop"):
        dev.flush()
    # as for any failed write-behind, the failure sticks: later reads report it too
    with pytest.raises(StorageError, match="poison pill: stop"):
        dev.read(2000)
