"""An iSCSI LUN as a clusterfs device, with no kernel initiator (issue 8, item 1).

Every test runs its own tgtd on 127.0.0.1 (tests/iscsiutil.py), with a sparse file
behind each LUN, and reaches it only as iscsi://127.0.0.1:PORT/IQN/LUN. The backing
file is the ground truth: what the device wrote must be there byte for byte, and
fsck of the backing file as a plain image must agree with fsck through iSCSI.

    unit        IscsiDevice: read/write/flush round trips on 512- and 4096-byte LUNs,
                partial blocks, read-only, the end of the LUN
    commands    mkfs.clusterfs then fsck.clusterfs on the URL
    mount       clusterfs mount -f URL; files written from this process; unmount,
                remount, every byte back; fsck clean
    faults      tgtd SIGKILLed (and SIGSTOPped) mid-write: an error within a bound
    bad input   malformed URL, wrong iqn, wrong LUN, nothing listening: one line,
                nonzero exit, the LUN unchanged, nothing mounted
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import threading
import time

import iscsiutil
import mountutil
import pytest
from mountutil import CLUSTERFS

from clusterfs.errors import StorageError
from clusterfs.storage import holders, open_block_device
from clusterfs.storage.device import BlockDevice
from clusterfs.storage.iscsi import IscsiDevice

MIB = 1 << 20
FAULT_BOUND = 15.0           # seconds from the target's death to the error


@pytest.fixture(autouse=True)
def _prereq():
    mountutil.require(iscsiutil.missing_prerequisites())


@pytest.fixture
def target():
    with iscsiutil.target([64 * MIB]) as t:
        yield t


def _file_bytes(path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# -- unit: IscsiDevice ------------------------------------------------------------------

@pytest.mark.parametrize("sector", [512, 4096])
def test_device_round_trip(sector):
    with iscsiutil.target([32 * MIB], blocksize=sector) as t:
        dev = open_block_device(t.url())
        try:
            assert isinstance(dev, IscsiDevice)
            assert dev.sector == sector
            assert dev.size == 32 * MIB and dev.blocks == 32 * MIB // 4096
            assert dev.fd is None
            big = os.urandom(3 * MIB + 8192)           # more than one command's worth
            dev.write(10, big)
            dev.flush()
            assert dev.read(10, len(big) // 4096) == big
            assert _file_bytes(t.backing[1], 10 * 4096, len(big)) == big
            # partial logical blocks: read-modify-write keeps the bytes around them
            dev.pwrite(10 * 4096 + 100, b"hello")
            dev.write_behind(10 * 4096 + sector - 3, b"across")
            dev.flush()
            want = bytearray(big[:2 * sector])
            want[100:105] = b"hello"
            want[sector - 3 : sector + 3] = b"across"
            assert dev.pread(10 * 4096, 2 * sector) == want
            assert _file_bytes(t.backing[1], 10 * 4096, 2 * sector) == want
            assert dev.read_data(10 * 4096 + 101, 3) == b"ell"
            # the end of the LUN behaves as the end of a file
            assert dev.pread(dev.size - 10, 100) == bytes(10)
            assert dev.pread(dev.size, 100) == b""
            with pytest.raises(StorageError, match="beyond the end"):
                dev.pwrite(dev.size - 2, b"xyz")
            # the no-ops of the write-behind / read-ahead interface
            dev.advise_willneed(0, 64)
            dev.forget_read_ahead()
            dev.drain()
            assert dev.behind_pending == 0 and dev.behind_has_room(MIB)
            assert dev.statistics()["blocks"] == dev.blocks
        finally:
            dev.close()
        dev.close()                                    # twice is fine
        with pytest.raises(StorageError, match="closed"):
            dev.pread(0, 4096)


def test_read_only_device_refuses_writes(target):
    before = _sha(target.backing[1])
    dev = open_block_device(target.url(), writable=False)
    try:
        assert dev.pread(0, 4096) == bytes(4096)
        with pytest.raises(StorageError, match="read-only"):
            dev.pwrite(0, b"x" * 4096)
    finally:
        dev.close()
    assert _sha(target.backing[1]) == before


def test_factory_and_holders(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 * MIB))
    dev = open_block_device(str(image))
    try:
        assert isinstance(dev, BlockDevice)
    finally:
        dev.close()
    assert holders.users("iscsi://127.0.0.1:3260/iqn.2025-01.example:x/1") == []


def test_chap_password_is_not_shown():
    port = iscsiutil._free_tcp_port()                # nothing listens there
    url = f"iscsi://alice%s3cret@127.0.0.1:{port}/iqn.2025-01.example:x/1"
    with pytest.raises(StorageError) as caught:
        IscsiDevice(url)
    assert "s3cret" not in str(caught.value) and "alice%***@" in str(caught.value)
    assert "refused" in str(caught.value)


# -- commands: mkfs, fsck --------------------------------------------------------------

def test_mkfs_then_fsck_clean(target):
    url = target.url()
    r = mountutil.mkfs(url, journals=2)
    assert f"{url}: clusterfs" in r.stdout
    r = mountutil.fsck(url)
    assert r.returncode == 0 and "clean" in r.stdout, r.stdout + r.stderr
    # the bytes on the target are a real clusterfs: the backing file checks clean too
    r = mountutil.fsck(str(target.backing[1]))
    assert r.returncode == 0 and "clean" in r.stdout, r.stdout + r.stderr
    # and mkfs refuses it now without --force, as for any device
    r = mountutil.mkfs(url, check=False)
    assert r.returncode == 1 and "already holds a clusterfs" in r.stderr, r.stderr


# -- a real mount ----------------------------------------------------------------------

def test_mount_write_remount_verify(tmp_path, target):
    mountutil.require_mounts("clusterfs")
    url = target.url()
    mountutil.mkfs(url)
    mp = str(tmp_path / "mnt")
    big = os.urandom(24 * MIB + 12345)
    files = {f"d/file{i}": os.urandom(i * 3001) for i in range(20)}
    with mountutil.mounted(url, mp):
        os.mkdir(f"{mp}/d")
        with open(f"{mp}/big", "wb") as f:
            f.writelines(big[at : at + MIB] for at in range(0, len(big), MIB))
            f.flush()
            os.fsync(f.fileno())
        for name, data in files.items():
            with open(f"{mp}/{name}", "wb") as f:
                f.write(data)
        os.rename(f"{mp}/d/file3", f"{mp}/d/renamed")
        os.link(f"{mp}/d/file4", f"{mp}/hardlink")
        os.symlink("d/file5", f"{mp}/symlink")
    files["d/renamed"] = files.pop("d/file3")
    with mountutil.mounted(url, mp):
        assert open(f"{mp}/big", "rb").read() == big
        for name, data in files.items():
            assert open(f"{mp}/{name}", "rb").read() == data, name
        assert os.stat(f"{mp}/hardlink").st_nlink == 2
        assert open(f"{mp}/symlink", "rb").read() == files["d/file5"]
        assert sorted(os.listdir(f"{mp}/d")) == sorted(n[2:] for n in files)
    r = mountutil.fsck(url)
    assert r.returncode == 0 and "clean" in r.stdout, r.stdout + r.stderr
    r = mountutil.fsck(str(target.backing[1]))
    assert r.returncode == 0 and "clean" in r.stdout, r.stdout + r.stderr


# -- faults: the target dies or stops answering ------------------------------------------

def _bounded(fn, *args, bound: float = FAULT_BOUND):
    return iscsiutil.bounded(fn, *args, bound=bound)


def _write_until_error(dev: IscsiDevice, started: threading.Event, result: dict) -> None:
    data = os.urandom(MIB)
    n = 0
    try:
        while True:
            dev.pwrite((n % 32) * MIB, data)
            n += 1
            if n == 4:
                started.set()
    except StorageError as exc:
        result["error"] = exc
        result["at"] = time.monotonic()
    finally:
        started.set()


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_device_target_lost_mid_write_is_an_error(target, fault):
    # SIGKILL closes the connection (an error at once); SIGSTOP leaves it open and
    # silent (an error when the command timeout runs out: 3 s here)
    dev = IscsiDevice(target.url(), timeout=3)
    started, result = threading.Event(), {}
    writer = threading.Thread(target=_write_until_error, args=(dev, started, result),
                              daemon=True)
    try:
        writer.start()
        assert started.wait(30), "the writer never got going"
        assert "error" not in result, result.get("error")
        t0 = time.monotonic()
        target.kill() if fault == "kill" else target.stop()
        writer.join(FAULT_BOUND)
        assert not writer.is_alive(), f"a write still hangs {FAULT_BOUND} s after {fault}"
        assert result["at"] - t0 < FAULT_BOUND
        msg = str(result["error"])
        assert msg.startswith(target.url()) and "\n" not in msg
        assert ("lost" if fault == "kill" else "no answer") in msg, msg
        # the device stays failed, at once (no second wait)
        with pytest.raises(StorageError, match="session lost earlier"):
            _bounded(dev.pread, 0, 4096, bound=1.0)
    finally:
        target.kill()
        if not writer.is_alive():          # else close() would wait for it forever
            dev.close()


def test_flush_reaches_the_target(target):
    """flush is a SCSI command, not a no-op: with the target gone it fails, at once."""
    dev = IscsiDevice(target.url(), timeout=3)
    try:
        dev.write(0, b"x" * 4096)
        dev.flush()
        target.kill()
        with pytest.raises(StorageError, match="flush: connection to the target lost"):
            _bounded(dev.flush)
    finally:
        _bounded(dev.close)


_WRITER = r"""
import os, sys
data = os.urandom(1 << 20)
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
n = 0
try:
    while True:
        os.pwrite(fd, data, (n % 16) << 20)
        os.fsync(fd)
        n += 1
        if n == 3:
            print("going", flush=True)
except OSError as exc:
    print(f"error {exc.errno} {exc.strerror}", flush=True)
    sys.exit(3)
"""


def test_mount_target_killed_mid_write_is_an_error(tmp_path, target):
    """A writer on the mount gets EIO within the bound; unmounting then ends the daemon
    (withdrawn, exit nonzero) instead of leaving it stuck on the dead LUN."""
    mountutil.require_mounts("clusterfs")
    url = target.url()
    mountutil.mkfs(url)
    mp = str(tmp_path / "mnt")
    m = mountutil.start_mount(url, mp)
    writer = None
    try:
        writer = subprocess.Popen([sys.executable, "-c", _WRITER, f"{mp}/stream"],
                                  stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline().strip() == "going"
        t0 = time.monotonic()
        target.kill()
        try:
            out, _ = writer.communicate(timeout=FAULT_BOUND)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the writer still hangs {FAULT_BOUND} s after tgtd was killed; "
                        f"log:\n{m.log_text()}")
        assert writer.returncode == 3 and out.startswith("error 5 "), out   # EIO
        assert time.monotonic() - t0 < FAULT_BOUND
        subprocess.run(["fusermount3", "-u", mp], capture_output=True, timeout=30)
        try:
            m.proc.wait(FAULT_BOUND)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the daemon still runs {FAULT_BOUND} s after the unmount; "
                        f"log:\n{m.log_text()}")
        assert "withdrawing" in m.log_text() and "connection to the target lost" in \
            m.log_text(), m.log_text()
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
        m.force_unmount()
    assert not mountutil._is_mounted(mp)


# -- bad input ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def formatted():
    """One target for all the bad-input cases, with a formatted LUN 1."""
    if iscsiutil.missing_prerequisites() is not None:
        pytest.skip("checked by _prereq")
    with iscsiutil.target([64 * MIB]) as t:
        mountutil.mkfs(t.url())
        yield t


def _bad_url(t: iscsiutil.Target, kind: str) -> tuple[str, str]:
    """A URL that must be refused, and a word the one-line error must contain."""
    base = f"iscsi://127.0.0.1:{t.portal_port}"
    if kind == "malformed":
        return f"{base}/{t.iqn}", "not an iSCSI URL"
    if kind == "wrong-iqn":
        return f"{base}/{t.iqn}-nope/1", "Target not found"
    if kind == "wrong-lun":
        return f"{base}/{t.iqn}/7", "LOGICAL_UNIT_NOT_SUPPORTED"
    if kind == "unreachable":
        return f"iscsi://127.0.0.1:{iscsiutil._free_tcp_port()}/{t.iqn}/1", "refused"
    if kind == "empty-portal":          # a multi-portal URL (test_iscsi_multipath.py)
        return f"{base},,127.0.0.1:{t.portal_port + 1}/{t.iqn}/1", "empty portal"
    if kind == "bad-portal-port":
        return f"{base},127.0.0.1:99999/{t.iqn}/1", "bad port in portal"
    raise ValueError(kind)


COMMANDS = {
    "mkfs": ["mkfs", "--force"],
    "fsck": ["fsck"],
    "fsck-repair": ["fsck", "--repair"],
    "mount-f": ["mount", "-f"],
    "mount": ["mount"],
}


@pytest.mark.parametrize("kind", ["malformed", "wrong-iqn", "wrong-lun", "unreachable",
                                  "empty-portal", "bad-portal-port"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_bad_url_is_one_line_and_changes_nothing(tmp_path, formatted, command, kind):
    url, word = _bad_url(formatted, kind)
    before = _sha(formatted.backing[1])
    mp = tmp_path / "mnt"
    mp.mkdir()
    cmd = [*CLUSTERFS, *COMMANDS[command], url]
    if command.startswith("mount"):
        cmd.append(str(mp))
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                           start_new_session=True)
    finally:
        if mountutil._is_mounted(str(mp)):
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)
            pytest.fail(f"{command} of {url} mounted it")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0, f"{command} of a {kind} URL exited 0: {r.stdout}{r.stderr}"
    if command.startswith("fsck"):
        assert r.returncode == 8
    assert len(lines) == 1, f"want one error line, got:\n{r.stderr}"
    assert word in lines[0] and "Traceback" not in lines[0], lines[0]
    assert len(lines[0]) < 300
    assert _sha(formatted.backing[1]) == before
    assert formatted.alive()


def test_bad_input_targets_are_cleaned_up():
    """The fixture's tgtd is SIGKILLed and its socket files removed at the end."""
    with iscsiutil.target([MIB]) as t:
        pid, control = t.proc.pid, t.control_port
        assert os.path.exists(f"{iscsiutil.TGTD_DIR}/socket.{control}")
    assert not os.path.exists(f"/proc/{pid}") or _zombie_or_gone(pid)
    assert not os.path.exists(f"{iscsiutil.TGTD_DIR}/socket.{control}")
    assert not t.workdir.exists()


def _zombie_or_gone(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    return True
