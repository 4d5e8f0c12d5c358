"""Bad input changes nothing and explains itself (issue 2, item 7).

Mounting a zeroed device, an ext4 device, a truncated image or one with a
flipped superblock bit: a one-line error, a nonzero exit, no mount left and the
device bytes unchanged. mkfs refuses a device holding a filesystem unless
--force. A metadata block corrupted on disk makes the call that reads it fail
with EIO while mounted, the filesystem withdraws (no more writes), and the
server stays up and unmounts cleanly.

Black-box, with two facts from the on-disk format documented in
ARCHITECTURE.md / clusterfs/format: the superblock sits at byte 64 KiB and an
inode number is its block address (4 KiB blocks).
"""

from __future__ import annotations

import errno
import os
import subprocess

import mountutil
import pytest
from mountutil import CLUSTERFS, attach_loop, device_hash, loop_device, mkfs

SUPERBLOCK_OFFSET = 64 << 10
BLOCK = 4096
SIZE = 64 << 20


@pytest.fixture(autouse=True)
def _prereq():
    mountutil.require_mounts("clusterfs")


def _try_mount(device: str, mountpoint: str, foreground: bool) -> subprocess.CompletedProcess:
    """Run ``clusterfs mount`` expecting failure; if it mounts after all, unmount
    (so the test fails cleanly) and return what happened."""
    os.makedirs(mountpoint, exist_ok=True)
    cmd = [*CLUSTERFS, "mount", *(["-f"] if foreground else []), device, mountpoint]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        # -f and still running: it mounted (or hangs). Tear it down.
        subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True)
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            out, err = proc.communicate()
        err += "\n[test: the mount command kept running: it mounted]"
    if mountutil._is_mounted(mountpoint):   # daemonized mount that succeeded
        subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True)
        err += "\n[test: the device was mounted]"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _assert_refused(r: subprocess.CompletedProcess, what: str) -> None:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0, f"mount of {what} succeeded: {r.stderr}"
    assert len(lines) == 1, f"mount of {what}: want one error line, got:\n{r.stderr}"
    assert "Traceback" not in r.stderr
    assert len(lines[0]) < 300


@pytest.fixture(params=[True, False], ids=["foreground", "daemon"])
def foreground(request):
    return request.param


def test_mount_zeroed_device(tmp_path, foreground):
    with loop_device(SIZE, tmp_path) as dev:
        before = device_hash(dev)
        r = _try_mount(dev, str(tmp_path / "mnt"), foreground)
        _assert_refused(r, "a zeroed device")
        assert device_hash(dev) == before


def test_mount_ext4_device(tmp_path, foreground):
    with loop_device(SIZE, tmp_path) as dev:
        mkfs(dev, fs="ext4")
        before = device_hash(dev)
        r = _try_mount(dev, str(tmp_path / "mnt"), foreground)
        _assert_refused(r, "an ext4 device")
        assert device_hash(dev) == before
        assert mountutil.fsck(dev, fs="ext4").returncode == 0


def test_mount_truncated_image(tmp_path, foreground):
    img = tmp_path / "img"
    with open(img, "wb") as f:
        f.truncate(SIZE)
    mkfs(str(img))
    os.truncate(img, SIZE // 2)
    with attach_loop(str(img)) as dev:
        before = device_hash(dev)
        r = _try_mount(dev, str(tmp_path / "mnt"), foreground)
        _assert_refused(r, "a truncated image")
        assert device_hash(dev) == before


def _flip(device: str, offset: int, bit: int) -> None:
    fd = os.open(device, os.O_RDWR)
    try:
        b = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([b[0] ^ (1 << bit)]), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


# byte offsets inside the superblock block: magic, header fields, body fields, the tail
@pytest.mark.parametrize("where", [0, 5, 17, 40, 60, 100, 2000, BLOCK - 1])
def test_mount_superblock_bit_flip(tmp_path, where):
    with loop_device(SIZE, tmp_path) as dev:
        mkfs(dev)
        _flip(dev, SUPERBLOCK_OFFSET + where, where % 8)
        before = device_hash(dev)
        r = _try_mount(dev, str(tmp_path / "mnt"), foreground=True)
        _assert_refused(r, f"a superblock with byte {where} flipped")
        assert device_hash(dev) == before
        # flipping it back makes it mountable again: the flip is what was refused
        _flip(dev, SUPERBLOCK_OFFSET + where, where % 8)
        with mountutil.mounted(dev, str(tmp_path / "mnt2")) as m:
            assert os.listdir(m.mountpoint) == []


def test_mount_missing_device_and_mountpoint(tmp_path):
    r = _try_mount(str(tmp_path / "no-such-device"), str(tmp_path / "mnt"), True)
    _assert_refused(r, "a missing device")
    with loop_device(SIZE, tmp_path) as dev:
        mkfs(dev)
        cmd = [*CLUSTERFS, "mount", "-f", dev, str(tmp_path / "no-such-dir")]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        _assert_refused(r, "onto a missing mountpoint")


def test_mkfs_refuses_ext4_without_force(tmp_path):
    with loop_device(SIZE, tmp_path) as dev:
        mkfs(dev, fs="ext4")
        before = device_hash(dev)
        r = mkfs(dev, check=False)
        assert r.returncode != 0, f"mkfs formatted an ext4 device without --force:\n{r.stdout}"
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert device_hash(dev) == before
        assert mountutil.fsck(dev, fs="ext4").returncode == 0
        # with --force it formats, and the result mounts
        r = mkfs(dev, force=True)
        assert device_hash(dev) != before
        with mountutil.mounted(dev, str(tmp_path / "mnt")) as m:
            with open(m.path("f"), "wb") as f:
                f.write(b"ok")
        assert mountutil.fsck(dev).returncode == 0


def test_mkfs_refuses_clusterfs_without_force(tmp_path):
    with loop_device(SIZE, tmp_path) as dev:
        mkfs(dev)
        with mountutil.mounted(dev, str(tmp_path / "mnt")) as m:
            _write_keep(m)
        before = device_hash(dev)
        r = mkfs(dev, check=False)
        assert r.returncode != 0
        assert device_hash(dev) == before
        with mountutil.mounted(dev, str(tmp_path / "mnt")) as m:
            _assert_kept(m)


def _write_keep(m: mountutil.Mount) -> None:
    with open(m.path("keep"), "wb") as f:
        f.write(b"keep me")
        f.flush()
        os.fsync(f.fileno())


def _assert_kept(m: mountutil.Mount) -> None:
    with open(m.path("keep"), "rb") as f:
        assert f.read() == b"keep me"


@pytest.mark.parametrize("args", [["-J", "0"], ["-J", "-1"], ["-J", "2000"], ["-j", "0"],
                                  ["-j", "300"], ["-J", "x"]])
def test_mkfs_bad_geometry_changes_nothing(tmp_path, args):
    with loop_device(SIZE, tmp_path) as dev:
        mkfs(dev)
        before = device_hash(dev)
        r = subprocess.run([*CLUSTERFS, "mkfs", "--force", *args, dev], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode != 0, f"mkfs {args} was accepted:\n{r.stdout}"
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        # argparse's usage lines may come first; the last line names the problem
        assert "Traceback" not in r.stderr and "mkfs" in lines[-1], r.stderr
        assert any(word in lines[-1] for word in ("range", "at least", "whole number")), r.stderr
        assert device_hash(dev) == before


def test_mkfs_refuses_a_mounted_device_even_with_force(tmp_path):
    with loop_device(SIZE, tmp_path) as dev:
        mkfs(dev)
        with mountutil.mounted(dev, str(tmp_path / "mnt")) as m:
            _write_keep(m)
            before = device_hash(dev)
            r = mkfs(dev, force=True, check=False)
            assert r.returncode != 0 and "in use" in r.stderr, r.stderr
            assert device_hash(dev) == before
            _assert_kept(m)


def test_corrupt_inode_block_gives_eio_and_withdraws(tmp_path):
    with loop_device(SIZE, tmp_path) as dev:
        mkfs(dev)
        mnt = str(tmp_path / "mnt")
        with mountutil.mounted(dev, mnt) as m:
            with open(m.path("victim"), "wb") as f:
                f.write(b"v" * 100)
            with open(m.path("bystander"), "wb") as f:
                f.write(b"b" * 100)
            ino = os.stat(m.path("victim")).st_ino
        assert ino * BLOCK < SIZE
        bad = mountutil.flip_bits(mountutil.swap_block(dev, ino))

        m = mountutil.start_mount(dev, mnt)
        try:
            with pytest.raises(OSError) as ei:
                os.stat(m.path("victim"))
            assert ei.value.errno == errno.EIO
            # the filesystem has withdrawn: writes fail, nothing crashes
            with pytest.raises(OSError) as ei:
                with open(m.path("new-file"), "wb") as f:
                    f.write(b"x")
                    f.flush()
                    os.fsync(f.fileno())
            assert ei.value.errno in (errno.EIO, errno.EROFS), ei.value
            assert m.alive(), "mount process died on a corrupt block:\n" + m.log_text()
            os.listdir(m.mountpoint)        # still answering
            # unmount cleanly: the server exits by itself (withdrawn may mean rc != 0)
            r = subprocess.run(["fusermount3", "-u", mnt], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            m.proc.wait(30)
            m._forget()
        except BaseException:
            m.force_unmount()
            raise
        log = m.log_text()
        assert "Traceback" not in log, log
        assert "withdraw" in log.lower(), "withdraw not logged:\n" + log
        # it stopped writing: the bad block is as we left it
        fd = os.open(dev, os.O_RDONLY)
        try:
            assert os.pread(fd, BLOCK, ino * BLOCK) == bad
        finally:
            os.close(fd)
        r = mountutil.fsck(dev)
        assert "usage:" not in r.stderr and "not built" not in r.stderr, r.stderr
        assert r.returncode != 0, "fsck missed the corrupt inode block:\n" + r.stdout


def test_a_second_copy_of_a_running_node_is_refused_and_changes_nothing(tmp_path):
    """Node 1's address is taken (node 1 already runs; here the test holds it): its
    mount is refused with one line naming the address (it was a trio traceback), before
    fencing (a poison-pill slot claim) or the disk heartbeat wrote to the shared disk;
    `clusterfs lockd` as node 1 is refused the same way."""
    import socket

    from clusterutil import CLUSTER_NAME, write_config
    from mountutil import run_cli

    from clusterfs.config import load_config

    with loop_device(SIZE, tmp_path) as dev:
        r = run_cli("mkfs", "-q", "-j", "2", "--cluster", CLUSTER_NAME, dev)
        assert r.returncode == 0, r.stderr
        config = write_config(tmp_path, 2)
        plain = tmp_path / "plain.toml"                 # lockd's: no device to fence on
        plain.write_text(config.read_text())
        config.write_text(config.read_text() + '\n[fencing]\nagent = "poison-pill"\n')
        me = load_config(str(config)).node(1)
        state = tmp_path / "state"
        state.mkdir()
        mountpoint = tmp_path / "mnt"
        mountpoint.mkdir()
        with socket.socket() as held:
            held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            held.bind((me.host, me.port))
            held.listen()
            before = device_hash(dev)
            r = run_cli("mount", "--config", str(config), "--node-id", "1", "--state-dir",
                        str(state), "--control", str(tmp_path / "n1.sock"), dev,
                        str(mountpoint), timeout=60)
            if mountutil._is_mounted(str(mountpoint)):
                subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True)
            _assert_refused(r, "a node whose address is taken")
            assert f"cannot listen on {me.address}" in r.stderr, r.stderr
            assert "already running" in r.stderr
            assert device_hash(dev) == before
            r = run_cli("lockd", "--config", str(plain), "--node-id", "1", "--state-dir",
                        str(state), "--control", str(tmp_path / "l1.sock"), timeout=60)
            assert r.returncode == 1, r.stderr
            assert f"cannot listen on {me.address}" in r.stderr and "Traceback" not in r.stderr
