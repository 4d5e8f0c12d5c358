"""iSCSI multipath: one LUN through several portals, re-targeted on a timeout or a
lost connection, losing nothing and letting nothing stale land.

Every test runs its own tgtd on 127.0.0.1 (tests/iscsiutil.py) listening on two
portals, with a TCP relay process of its own (tests/tcprelay.py) in front of the
first: the device's URL names the relay first, the second portal next. SIGSTOP of
the relay is a path that stops answering with writes in flight (they wait in the
relay, and go on at SIGCONT); SIGKILL is a lost connection. The backing file is the
ground truth.

    a   writes + flushes from a thread go on without an error across a stop or a
        kill of the relay; every byte verifies (with reservations the relay stays
        stopped; without, a flush waits for the stopped path's write to settle, so
        the relay goes on after a while, and a path that never settles fails)
    b   a write held in the stopped relay, re-sent through the other portal and then
        overwritten there, does not land over the newer copy when the relay goes on
        (the cut-off: PREEMPT of the old session's key; without reservations the
        newer write waits until the old connection is closed); a node fenced
        meanwhile does not register again on its new path
    c   a real mount on a two-portal LUN (one node of a cluster with scsi-pr
        fencing), a writer process fsyncing while the relay is stopped: no error,
        every byte back, fsck clean; the same without reservations and a brief stop
    d   a malformed portal list: one line, nothing changed (also in test_iscsi.py's
        bad-input matrix, through every command)
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import iscsiutil
import mountutil
import pytest
import trio

from clusterfs.errors import ReservationConflict, StorageError
from clusterfs.fence.scsi_pr import ScsiPrAgent, node_of_key, pr_key, register, same_node
from clusterfs.storage.iscsi import PATH_TIMEOUT, IscsiDevice, parse_url

MIB = 1 << 20
BLOCK = 4096
CLUSTER = "lab"
BOUND = 60.0                 # seconds a test waits for a thread before failing it


@pytest.fixture(autouse=True)
def _prereq():
    mountutil.require(iscsiutil.missing_prerequisites())


class Paths:
    """A target on two portals, a relay in front of the first; `url` names both."""

    def __init__(self, target: iscsiutil.Target, relay: iscsiutil.Relay, second: int,
                 query: str = "") -> None:
        self.target, self.relay, self.second = target, relay, second
        self.url = target.multi_url([relay.port, second], query=query)

    def block_on_disk(self, blkno: int, lun: int = 1) -> bytes:
        with open(self.target.backing[lun], "rb") as f:
            f.seek(blkno * BLOCK)
            return f.read(BLOCK)


@pytest.fixture
def paths():
    with iscsiutil.target([64 * MIB]) as t:
        second = t.add_portal()
        with iscsiutil.relay(t.portal_port) as r:
            yield Paths(t, r, second)


def _device(p: Paths, who: str = "n1", key: int | None = None) -> IscsiDevice:
    dev = IscsiDevice(p.url, initiator=f"iqn.2025-01.io.clusterfs.test:{who}")
    if key is not None:
        register(dev, key)
    return dev


def _run(fn, *args):
    """fn(*args), failing the test after BOUND seconds (iscsiutil.bounded)."""
    return iscsiutil.bounded(fn, *args, bound=BOUND)


# -- parsing -------------------------------------------------------------------------------

def test_parse_url_portals_and_timeout():
    u = parse_url("iscsi://alice%pw@10.0.0.1:3260,[fe80::1]:3261,host-b/iqn.x:y/2?timeout=3")
    assert u.portals == ("10.0.0.1:3260", "[fe80::1]:3261", "host-b")
    assert u.for_portal(1) == "iscsi://alice%pw@[fe80::1]:3261/iqn.x:y/2"
    assert u.timeout == 3
    one = parse_url("iscsi://127.0.0.1/iqn.x:y/1")
    assert one.portals == ("127.0.0.1",) and one.timeout is None
    assert one.for_portal(0) == "iscsi://127.0.0.1/iqn.x:y/1"
    for bad, why in [("iscsi://a:1,,b:2/i/1", "empty portal"),
                     ("iscsi://a:1,b:0/i/1", "bad port"),
                     ("iscsi://a:1,b:x/i/1", "bad port"),
                     ("iscsi://a:1,b c/i/1", "bad host"),
                     ("iscsi://a:1,[::1/i/1", "bad host"),
                     ("iscsi://a:1,a:1/i/1", "listed twice"),
                     ("iscsi://a:1,b:2/i/1?timeout=0", "timeout=0"),
                     ("iscsi://a/i/1?timeout=soon", "timeout=soon")]:
        with pytest.raises(StorageError, match=why):
            parse_url(bad)


def test_device_defaults_and_one_portal_as_before(paths):
    dev = _device(paths)
    try:
        assert dev.portals == [f"127.0.0.1:{paths.relay.port}", f"127.0.0.1:{paths.second}"]
        assert dev.timeout == PATH_TIMEOUT and dev.statistics()["retargets"] == 0
    finally:
        dev.close()
    one = IscsiDevice(paths.target.url() + "?timeout=7")
    try:
        assert one.portals == [f"127.0.0.1:{paths.target.portal_port}"] and one.timeout == 7
    finally:
        one.close()


def test_malformed_portal_list_is_one_line_and_reaches_no_target(paths):
    before = open(paths.target.backing[1], "rb").read()
    url = f"iscsi://127.0.0.1:{paths.relay.port},,127.0.0.1:{paths.second}/{paths.target.iqn}/1"
    with pytest.raises(StorageError) as caught:
        IscsiDevice(url)
    msg = str(caught.value)
    assert "not an iSCSI URL (empty portal in the portal list)" in msg and "\n" not in msg
    assert open(paths.target.backing[1], "rb").read() == before
    assert paths.relay.closed == 0 and not _relay_had_connections(paths.relay)


def _relay_had_connections(relay: iscsiutil.Relay) -> bool:
    """Whether anything connected to the relay (its `closed` lines, without waiting)."""
    try:
        relay.wait_closed(1, timeout=0.3)
    except AssertionError:
        return False
    return True


# -- a: writes go on across a stopped or broken path -----------------------------------------

def _writer(dev: IscsiDevice, stop: threading.Event, written: dict, progress: list,
            error: list) -> None:
    """Write 64 KiB pieces round a 16 MiB window, flushing every fourth, until told."""
    n = 0
    try:
        while not stop.is_set():
            data = os.urandom(64 * 1024)
            offset = (n % 256) * len(data)
            dev.pwrite(offset, data)
            written[offset] = data
            if n % 4 == 3:
                dev.flush()
            n += 1
            progress.append(time.monotonic())
        dev.flush()
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        error.append(exc)


def _wait_writes(progress: list, count: int, error: list) -> None:
    deadline = time.monotonic() + BOUND
    target = len(progress) + count
    while len(progress) < target and not error:
        if time.monotonic() > deadline:
            pytest.fail(f"the writer made {len(progress)} of {target} writes in {BOUND} s")
        time.sleep(0.02)


def _wait_retarget(dev: IscsiDevice, error: list) -> None:
    deadline = time.monotonic() + BOUND
    while dev.retargets == 0 and not error:
        if time.monotonic() > deadline:
            pytest.fail(f"no re-target within {BOUND} s")
        time.sleep(0.02)


@pytest.mark.parametrize("fault", ["stop", "kill"])
@pytest.mark.parametrize("reserved", [False, True], ids=["plain", "scsi-pr"])
def test_writes_and_flushes_go_on_across_a_failed_path(paths, fault, reserved):
    dev = _device(paths, key=pr_key(CLUSTER, 1) if reserved else None)
    stop, written, progress, error = threading.Event(), {}, [], []
    writer = threading.Thread(target=_writer, args=(dev, stop, written, progress, error),
                              daemon=True)
    try:
        writer.start()
        _wait_writes(progress, 20, error)
        paths.relay.stop() if fault == "stop" else paths.relay.kill()
        if fault == "stop" and not reserved:
            # the next flush waits for the write left in the relay (settle); a relay
            # that goes on within settle_timeout settles it, and the writer goes on
            _wait_retarget(dev, error)
            time.sleep(0.5)
            paths.relay.resume()
        _wait_writes(progress, 40, error)         # well past the re-target
        stop.set()
        writer.join(BOUND)
        assert not writer.is_alive(), "the writer hangs"
        assert not error, error
        stats = dev.statistics()
        assert stats["retargets"] >= 1, stats
        for offset, data in written.items():
            assert dev.pread(offset, len(data)) == data, offset
        with open(paths.target.backing[1], "rb") as f:
            for offset, data in written.items():
                f.seek(offset)
                assert f.read(len(data)) == data, offset
        if fault == "stop" and not reserved:
            # the relay went on: a later timeout on the second portal (a loaded
            # machine, a 1 s path timeout) may rightly have taken the device back to it
            assert stats["portal"] in (f"127.0.0.1:{paths.relay.port}",
                                       f"127.0.0.1:{paths.second}"), stats
        else:   # the first path never came back: every re-target ends on the second
            assert stats["portal"] == f"127.0.0.1:{paths.second}", stats
        if reserved:    # the old session's key was preempted; the new one is ours
            keys = dev.pr_read_keys()
            assert keys == [dev.pr_key] and same_node(dev.pr_key, pr_key(CLUSTER, 1))
    finally:
        stop.set()
        paths.relay.kill()
        if not writer.is_alive():
            dev.close()


def test_every_path_failing_is_an_error_and_the_device_stays_failed(paths):
    dev = _device(paths)
    try:
        dev.write(1, b"x" * BLOCK)
        paths.relay.kill()
        paths.target.kill()
        with pytest.raises(StorageError, match="no path took it again") as caught:
            _run(dev.write, 2, b"y" * BLOCK)
        msg = str(caught.value)
        assert "connection to the target lost" in msg and "\n" not in msg
        assert f"127.0.0.1:{paths.second}" in msg
        with pytest.raises(StorageError, match="session lost earlier"):
            _run(dev.pread, 0, BLOCK)
    finally:
        _run(dev.close)


# -- b: nothing held on the old path lands over newer data ------------------------------------

def test_a_write_held_on_a_stopped_path_is_cut_off_by_preempt(paths):
    """Write block 5 (OLD) through the relay; stop the relay; write MID: it waits in
    the relay, times out, and is re-sent through the second portal; write NEW there.
    Let the relay go: MID reaches tgtd on the old session, whose key the new session
    preempted: RESERVATION CONFLICT, nothing lands. Without the cut-off MID lands over
    NEW."""
    old, mid, new = (bytes([c]) * BLOCK for c in b"OMN")
    dev = _device(paths, key=pr_key(CLUSTER, 1))
    try:
        dev.write(5, old)
        dev.flush()
        paths.relay.stop()
        _run(dev.write, 5, mid)                   # held in the relay, then re-sent
        assert dev.statistics()["retargets"] >= 1
        assert paths.block_on_disk(5) == mid
        dev.write(5, new)
        dev.flush()
        paths.relay.resume()
        paths.relay.wait_closed(1)                # MID delivered (and refused) by now
        assert paths.block_on_disk(5) == new
        assert dev.read(5) == new
    finally:
        paths.relay.kill()
        dev.close()


def test_without_reservations_a_newer_write_waits_for_the_old_path_to_settle(paths):
    """The same without a reservation: nothing can cut the old session off, so NEW
    (and the flush) waits until the old connection is closed from the far end: the
    relay, let go, delivers MID (tgtd writes it), then our FIN, tgtd closes; only
    then NEW goes out, and lands last. Without the wait MID lands over NEW."""
    old, mid, new = (bytes([c]) * BLOCK for c in b"OMN")
    dev = _device(paths)
    try:
        dev.write(5, old)
        dev.flush()
        paths.relay.stop()
        _run(dev.write, 5, mid)
        assert dev.statistics()["maybe_in_flight"] == 1
        dev.write(6, b"x" * BLOCK)                # other bytes go out at once
        assert paths.block_on_disk(6) == b"x" * BLOCK
        done = threading.Event()
        newer = threading.Thread(target=lambda: (dev.write(5, new), dev.flush(),
                                                 done.set()), daemon=True)
        newer.start()
        newer.join(1.0)
        assert not done.is_set() and paths.block_on_disk(5) == mid   # held
        assert _run(dev.read, 6) == b"x" * BLOCK  # reads go on meanwhile
        assert not done.is_set()
        paths.relay.resume()
        newer.join(BOUND)
        assert done.is_set(), "the newer write never went out"
        paths.relay.wait_closed(1)
        assert paths.block_on_disk(5) == new
        stats = dev.statistics()
        assert stats["settle_waits"] >= 1 and stats["maybe_in_flight"] == 0
    finally:
        paths.relay.kill()
        dev.close()


def test_without_reservations_a_path_that_never_settles_fails_the_newer_write(tmp_path):
    with iscsiutil.target([16 * MIB]) as t:
        second = t.add_portal()
        with iscsiutil.relay(t.portal_port) as r:
            p = Paths(t, r, second, query="settle=2")
            dev = _device(p)
            try:
                r.stop()
                _run(dev.write, 5, b"m" * BLOCK)
                with pytest.raises(StorageError, match="may still land there") as caught:
                    _run(dev.write, 5, b"n" * BLOCK)
                assert "\n" not in str(caught.value)
                assert p.block_on_disk(5) == b"m" * BLOCK
                with pytest.raises(StorageError, match="may still land there"):
                    _run(dev.flush)               # the device stays failed
            finally:
                r.kill()
                dev.close()


def test_a_node_fenced_while_its_path_is_stuck_does_not_register_again(paths):
    """Node 2 writes through the relay; its path sticks; node 1 fences it meanwhile
    (every key of node 2 preempted). Node 2's re-target finds its old key gone: it
    does not register on its new path, the write fails as fenced, the mount's hook
    hears of it, and no key of node 2 is left on the LUN."""
    victim = _device(paths, "n2", key=pr_key(CLUSTER, 2))
    heard: list[str] = []
    victim.on_fenced = heard.append
    agent_dev = IscsiDevice(paths.target.url(), initiator="iqn.2025-01.io.clusterfs.test:n1f")
    agent = ScsiPrAgent([agent_dev], CLUSTER, 1)
    try:
        victim.write(7, b"v" * BLOCK)
        paths.relay.stop()
        trio.run(agent.fence, 2, 9, None)
        with pytest.raises(ReservationConflict, match="this node was fenced"):
            _run(victim.write, 8, b"w" * BLOCK)
        assert heard and "fenced" in heard[0]
        keys = agent_dev.pr_read_keys()
        assert [node_of_key(CLUSTER, k) for k in keys] == [1], [hex(k) for k in keys]
        assert paths.block_on_disk(8) == bytes(BLOCK)
        assert victim.pr_key is None
    finally:
        paths.relay.kill()
        victim.close()
        agent.close()


def test_a_fence_preempts_every_key_of_a_node_and_a_retargeted_fencer_fences(paths):
    """Keys are per session: a node with two sessions has two; the fencer preempts
    both. A fencer whose own session moved to another portal fences with its new key."""
    a1 = IscsiDevice(paths.target.url(), initiator="iqn.2025-01.io.clusterfs.test:b1")
    a2 = IscsiDevice(paths.target.url(), initiator="iqn.2025-01.io.clusterfs.test:b2")
    fencer = _device(paths, "f1")
    agent = ScsiPrAgent([fencer], CLUSTER, 1)
    try:
        k1, k2 = register(a1, pr_key(CLUSTER, 2)), register(a2, pr_key(CLUSTER, 2))
        assert k1 != k2 and same_node(k1, k2)
        first_key = fencer.pr_key
        paths.relay.kill()                      # the fencer's session breaks
        trio.run(agent.fence, 2, 9, None)
        assert fencer.pr_key != first_key and fencer.statistics()["retargets"] >= 1
        assert sorted(fencer.pr_read_keys()) == [fencer.pr_key]
        for dev in (a1, a2):
            with pytest.raises(ReservationConflict):
                dev.write(1, b"b" * BLOCK)
        assert agent.preempts == 2
    finally:
        for dev in (a1, a2):
            dev.close()
        agent.close()


# -- c: a real mount on a two-portal LUN -------------------------------------------------------

_WRITER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
n = 0
try:
    while True:
        data = bytes([n % 251]) * (256 << 10)
        os.pwrite(fd, data, (n % 16) * len(data))
        os.fsync(fd)
        n += 1
        print(n, flush=True)
        if sys.stdin.readline().strip() != "more":
            break
except OSError as exc:
    print(f"error {exc.errno} {exc.strerror}", flush=True)
    sys.exit(3)
"""


def _step(writer: subprocess.Popen, more: bool = True) -> str:
    writer.stdin.write("more\n" if more else "stop\n")
    writer.stdin.flush()
    return writer.stdout.readline().strip()


def _scsi_pr_node(tmp_path, p: Paths):
    """Node 1 of a one-node cluster with scsi-pr fencing (its agent on the second
    portal), mounting the two-portal URL: (Cluster, mountpoint)."""
    from clusterutil import CLUSTER_NAME, write_config
    from test_fence_mount import FencedCluster

    r = mountutil.run_cli("mkfs", "-q", "-j", "1", "--cluster", CLUSTER_NAME, p.url)
    assert r.returncode == 0, r.stderr
    config = write_config(tmp_path, 1)
    agent_url = p.target.multi_url([p.second])
    config.write_text(config.read_text() + f'\n[fencing]\nagent = "scsi-pr"\n'
                      f'devices = ["{agent_url}"]\n')
    c = FencedCluster(tmp_path, p.url, config, 1)
    c.start(1)
    return c, c.mountpoint(1)


@pytest.mark.parametrize("reserved", [True, False], ids=["scsi-pr", "plain-brief-stop"])
def test_mount_on_a_two_portal_lun_writer_fsyncs_through_a_stopped_path(tmp_path, paths,
                                                                         reserved):
    """A writer process rewrites a 4 MiB file in 256 KiB pieces, fsync after each, 30
    times; the relay (the mount's first portal) is stopped after the sixth. With
    scsi-pr the relay stays stopped: every fsync returns, none fails. Without a
    reservation an fsync waits for the write left in the relay to settle, so the relay
    goes on after a while (a brief stop) and nothing fails either."""
    mountutil.require_mounts("clusterfs")
    url = paths.url
    c = None
    if reserved:
        c, mp = _scsi_pr_node(tmp_path, paths)
        m = c.mounts[1]
    else:
        mountutil.mkfs(url)
        mp = str(tmp_path / "mnt")
        m = mountutil.start_mount(url, mp)
    writer = resume = None
    try:
        writer = subprocess.Popen([sys.executable, "-c", _WRITER, f"{mp}/stream"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline().strip() == "1", m.log_text()
        for _ in range(5):
            assert _step(writer).isdigit(), m.log_text()
        paths.relay.stop()
        if not reserved:                        # a brief stop (2 s): it settles
            resume = threading.Timer(2.0, paths.relay.resume)
            resume.start()
        for _ in range(24):                     # 16 pieces: the whole file rewritten
            line = _step(writer)
            assert line.isdigit(), f"{line}\n{m.log_text()}"
        assert _step(writer, more=False) == ""
        writer.wait(BOUND)
        assert writer.returncode == 0
        with open(f"{mp}/stream", "rb") as f:
            got = f.read()
        piece = 256 << 10
        want = bytearray(16 * piece)
        for n in range(int(line)):              # every write the writer made, in order
            want[(n % 16) * piece : (n % 16 + 1) * piece] = bytes([n % 251]) * piece
        assert got == want
        assert "re-targeted to portal" in m.log_text(), m.log_text()
        if c is not None:
            c.unmount(1)
        else:
            m.unmount()
    finally:
        if resume is not None:
            resume.cancel()
            resume.join()
        if writer is not None and writer.poll() is None:
            writer.kill()
        m.force_unmount()
        paths.relay.kill()
    r = mountutil.fsck(url)
    assert r.returncode == 0 and "clean" in r.stdout, r.stdout + r.stderr
    r = mountutil.fsck(str(paths.target.backing[1]))
    assert r.returncode == 0 and "clean" in r.stdout, r.stdout + r.stderr
