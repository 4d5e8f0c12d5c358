"""Liveness beacons (clusterfs/comms/beacon.py, wire/beacon.py): real UDP sockets on
127.0.0.1, real threads. A beacon says how long ago its sender's event loop ran, goes
on while that loop stalls, stops with its service, and nothing but an authentic,
fresh beacon from a configured node is believed."""

from __future__ import annotations

import socket
import time

import pytest
import trio
from trioutil import trio_test, wait_until

from clusterfs.comms.beacon import BeaconService
from clusterfs.comms.localcluster import local_config
from clusterfs.errors import WireError
from clusterfs.wire import beacon as wire

INTERVAL = 0.05


def services(cfg, *ids: int) -> dict[int, BeaconService]:
    return {n: BeaconService(cfg, n, 1000 + n, INTERVAL) for n in ids}


def send_raw(cfg, to: int, data: bytes) -> None:
    node = cfg.node(to)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(data, (node.host, node.port))


def test_the_datagram_round_trips_and_refuses_anything_else() -> None:
    key = wire.beacon_key(b"k" * 32)
    b = wire.Beacon(7, 2**63 - 1, 42, 1.234, 3.5, 2.25)
    data = wire.encode(key, b)
    assert len(data) == wire.SIZE
    assert wire.decode(key, data) == b
    for bad in (data[:-1], data + b"x", bytes(wire.SIZE),
                data[:8] + bytes([data[8] ^ 1]) + data[9:],          # a changed byte
                wire.encode(wire.beacon_key(b"j" * 32), b)):          # another key
        with pytest.raises(WireError):
            wire.decode(key, bad)
    # the beacon key is not the cluster key: a beacon is no TCP frame MAC and back
    assert key != b"k" * 32 and len(key) == 32


@trio_test
async def test_beacons_go_on_while_the_loop_stalls_and_stop_with_the_service() -> None:
    cfg = local_config([1, 2])
    s = services(cfg, 1, 2)
    async with trio.open_nursery() as nursery:
        scope1 = trio.CancelScope()

        async def run1(task_status=trio.TASK_STATUS_IGNORED) -> None:
            with scope1:
                await s[1].run(task_status=task_status)

        await nursery.start(run1)
        await nursery.start(s[2].run)
        await wait_until(lambda: s[2].ages(1) is not None and s[1].ages(2) is not None)
        seen = s[2].ages(1)
        assert seen.incarnation == 1001 and seen.heard < 0.5 and seen.loop < 0.5
        assert seen.stall_began is None
        time.sleep(0.6)         # this loop (both services') stalls; the threads do not
        seen = s[2].ages(1)
        assert seen.heard < 0.3, seen                 # beacons kept coming
        assert 0.45 < seen.loop < 1.5, seen           # saying the loop has not run
        await trio.sleep(0.3)
        seen = s[2].ages(1)
        assert seen.loop < 0.3, seen                  # ran again, after a stall of
        assert 0.5 < seen.stall_began - seen.stall_ended < 1.0, seen    # about 0.6 s
        assert seen.stall_ended < 0.5, seen
        scope1.cancel()                               # node 1's service stops
        await trio.sleep(0.5)
        assert s[2].ages(1).heard > 0.4               # nothing heard since
        assert s[1].sent > 0 and s[2].received > 0 and s[2].rejected == 0
        nursery.cancel_scope.cancel()


@trio_test
async def test_garbage_forgeries_replays_and_strangers_are_refused() -> None:
    cfg = local_config([1, 2, 3])
    s = services(cfg, 2)[2]
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        key = wire.beacon_key(cfg.key)
        good = wire.encode(key, wire.Beacon(3, 77, 5, 0.01))
        sent = [b"garbage", bytes(wire.SIZE),
                wire.encode(wire.beacon_key(b"x" * 32), wire.Beacon(3, 77, 6, 0.0)),
                wire.encode(key, wire.Beacon(9, 77, 1, 0.0)),         # not configured
                wire.encode(key, wire.Beacon(2, 77, 1, 0.0)),         # itself
                good]
        for d in sent:
            send_raw(cfg, 2, d)
        await wait_until(lambda: s.received + s.rejected >= len(sent))
        assert (s.received, s.rejected) == (1, 5)
        assert s.ages(3).incarnation == 77 and s.ages(9) is None
        first = s.sighting(3)
        await trio.sleep(0.05)
        send_raw(cfg, 2, good)                        # the same beacon again: a replay
        send_raw(cfg, 2, wire.encode(key, wire.Beacon(3, 77, 4, 0.0)))   # an older one
        await wait_until(lambda: s.rejected >= 7)
        assert s.sighting(3) == first and s.received == 1
        send_raw(cfg, 2, wire.encode(key, wire.Beacon(3, 77, 6, 0.0)))   # the next one
        await wait_until(lambda: s.received == 2)
        assert s.sighting(3).received > first.received
        nursery.cancel_scope.cancel()


@trio_test
async def test_a_port_taken_leaves_the_node_without_beacons_and_says_so(caplog) -> None:
    cfg = local_config([1, 2])
    node = cfg.node(1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((node.host, node.port))
        s = services(cfg, 1)[1]
        async with trio.open_nursery() as nursery:
            with caplog.at_level("INFO", logger="clusterfs.comms.beacon"):
                await nursery.start(s.run)
            await trio.sleep(0.1)
            assert s.sent == 0
            nursery.cancel_scope.cancel()
    assert "no liveness beacons" in caplog.text


@trio_test
async def test_a_stopped_service_frees_its_port_at_once() -> None:
    """A node stopped and started again at once (a restart in place) binds its beacon
    socket again: the thread closes it when told to stop, not up to an interval later."""
    cfg = local_config([1, 2])
    for _ in range(3):
        s = BeaconService(cfg, 1, 1001, 1.0)       # a long interval: the wake must work
        async with trio.open_nursery() as nursery:
            await nursery.start(s.run)
            await trio.sleep(0.05)
            assert s._thread is not None and s._thread.is_alive()
            nursery.cancel_scope.cancel()
        assert not s._thread.is_alive()
        node = cfg.node(1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((node.host, node.port))     # free again
