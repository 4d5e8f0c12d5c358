"""clusterfs-only mount behaviour: bad input, withdraw, daemon mode, ENOSPC cycles, crash
replay. Real mounts driven from this process (the server is a separate process)."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import mountutil  # noqa: E402

from clusterfs.storage import holders  # noqa: E402

CLUSTERFS = [sys.executable, "-m", "clusterfs.cli"]


@pytest.fixture(autouse=True)
def _need_fuse():
    mountutil.require_mounts("clusterfs")


def _image(tmp_path, size=64 << 20, name="disk.img") -> str:
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _mkfs(dev: str, *extra: str) -> None:
    r = subprocess.run([*CLUSTERFS, "mkfs", "-q", "--force", *extra, dev],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def _assert_fsck_clean(dev: str) -> None:
    r = subprocess.run([*CLUSTERFS, "fsck", dev], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"fsck not clean ({r.returncode}):\n{r.stdout}{r.stderr}"


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _mount_fails(dev: str, mnt: str) -> str:
    os.makedirs(mnt, exist_ok=True)
    r = subprocess.run([*CLUSTERFS, "mount", "-f", dev, mnt], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0
    assert not mountutil._is_mounted(mnt)
    lines = [ln for ln in r.stderr.splitlines() if "WARNING" not in ln]
    assert len(lines) == 1, r.stderr
    return lines[0]


# ------------------------------------------------------------------ bad input


def test_zeroed_device_is_refused_unchanged(tmp_path):
    dev = _image(tmp_path)
    before = _sha(dev)
    msg = _mount_fails(dev, str(tmp_path / "mnt"))
    assert "not a clusterfs filesystem (bad superblock magic)" in msg
    assert _sha(dev) == before


def test_ext4_device_is_refused_unchanged(tmp_path):
    dev = _image(tmp_path)
    subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True, capture_output=True)
    before = _sha(dev)
    msg = _mount_fails(dev, str(tmp_path / "mnt"))
    assert "not a clusterfs filesystem" in msg and "ext2/ext3/ext4" in msg
    assert _sha(dev) == before


def test_flipped_superblock_bit_is_refused_unchanged(tmp_path):
    dev = _image(tmp_path)
    _mkfs(dev)
    with open(dev, "r+b") as f:
        f.seek(65536 + 300)
        byte = f.read(1)[0]
        f.seek(65536 + 300)
        f.write(bytes([byte ^ 0x10]))
    before = _sha(dev)
    assert "superblock checksum mismatch" in _mount_fails(dev, str(tmp_path / "mnt"))
    assert _sha(dev) == before


def test_truncated_image_is_refused_unchanged(tmp_path):
    dev = _image(tmp_path)
    _mkfs(dev)
    os.truncate(dev, 32 << 20)
    before = _sha(dev)
    assert "smaller than the filesystem (truncated?)" in _mount_fails(dev, str(tmp_path / "m"))
    assert _sha(dev) == before


def test_mkfs_refuses_existing_filesystem_without_force(tmp_path):
    dev = _image(tmp_path)
    subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True, capture_output=True)
    r = subprocess.run([*CLUSTERFS, "mkfs", dev], capture_output=True, text=True)
    assert r.returncode != 0 and "ext2/ext3/ext4" in r.stderr
    r = subprocess.run([*CLUSTERFS, "mkfs", str(tmp_path / "missing")], capture_output=True,
                       text=True)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------ withdraw


def test_bad_metadata_checksum_withdraws(tmp_path):
    dev = _image(tmp_path)
    _mkfs(dev)
    mnt = str(tmp_path / "mnt")
    with mountutil.mounted(dev, mnt) as m:
        with open(os.path.join(mnt, "victim"), "wb") as f:
            f.write(b"v" * 100)
        with open(os.path.join(mnt, "other"), "wb") as f:
            f.write(b"o" * 100)
        ino = os.stat(os.path.join(mnt, "victim")).st_ino
    with open(dev, "r+b") as f:
        f.seek(ino * 4096 + 400)
        f.write(b"\xde\xad")
    m = mountutil.start_mount(dev, mnt)
    try:
        with pytest.raises(OSError) as exc:
            os.stat(os.path.join(mnt, "victim"))
        assert exc.value.errno == errno.EIO
        with pytest.raises(OSError) as exc:
            with open(os.path.join(mnt, "new"), "wb") as f:
                f.write(b"x")
        assert exc.value.errno == errno.EIO
        assert m.alive()
        assert "withdrawing" in m.log_text()
    finally:
        m.unmount()


def _daemon_mount(dev: str, mnt: str, tmp_path) -> subprocess.CompletedProcess[str]:
    """`clusterfs mount` without -f: returns once the daemon's mount is live."""
    return subprocess.run([*CLUSTERFS, "mount", "--log", str(tmp_path / "log"), dev, mnt],
                          capture_output=True, text=True, timeout=60)


def _fresh_daemon_mount(tmp_path, mnt_name: str = "mnt", size: int = 64 << 20
                        ) -> tuple[str, str, subprocess.CompletedProcess[str]]:
    """A new image, formatted, daemon-mounted on tmp_path/mnt_name: (dev, mnt, result)."""
    dev = _image(tmp_path, size)
    _mkfs(dev)
    mnt = str(tmp_path / mnt_name)
    os.makedirs(mnt)
    return dev, mnt, _daemon_mount(dev, mnt, tmp_path)


def _umount(mnt: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLUSTERFS, "umount", mnt], capture_output=True, text=True,
                          timeout=180)


# ------------------------------------------------------------------ daemon mode, signals


def test_daemon_mode_and_sigterm(tmp_path):
    dev, mnt, r = _fresh_daemon_mount(tmp_path)
    try:
        assert r.returncode == 0, r.stderr
        assert mountutil._is_mounted(mnt)     # live as soon as the parent returned
        # its start-up lines went to its log, not to the terminal that ran the command
        # (they used to come out there, after the shell's prompt)
        assert r.stderr == "" and r.stdout == ""
        assert "mounted " in (tmp_path / "log").read_text()
        with open(os.path.join(mnt, "f"), "wb") as f:
            f.write(b"daemon")
    finally:
        u = _umount(mnt)
    assert u.returncode == 0, u.stderr
    assert not mountutil._is_mounted(mnt)
    # remount in the foreground and stop it with SIGTERM
    m = mountutil.start_mount(dev, mnt)
    with open(os.path.join(mnt, "f"), "rb") as f:
        assert f.read() == b"daemon"
    m.proc.send_signal(signal.SIGTERM)
    assert m.proc.wait(30) == 0
    assert not mountutil._is_mounted(mnt)
    m._forget()


def test_umount_returns_after_the_daemon_is_done(tmp_path):
    """`clusterfs umount` returns only when nothing holds the device any more: an
    immediate fsck finds it clean and not in use, and an immediate mount succeeds."""
    dev, mnt, r = _fresh_daemon_mount(tmp_path, size=256 << 20)
    assert r.returncode == 0, r.stderr
    try:
        for i in range(300):                   # dirty metadata for the daemon to write back
            with open(os.path.join(mnt, f"f{i}"), "wb") as f:
                f.write(b"x" * 5000)
        with open(os.path.join(mnt, "big"), "wb") as f:
            f.write(os.urandom(32 << 20))
    finally:
        u = _umount(mnt)
    assert u.returncode == 0, u.stderr
    assert not mountutil._is_mounted(mnt)
    assert holders.users(dev) == []
    _assert_fsck_clean(dev)
    with mountutil.mounted(dev, mnt):
        assert len(os.listdir(mnt)) == 301


def test_umount_finds_a_mountpoint_with_space_and_utf8_in_its_name(tmp_path):
    """/proc/self/mountinfo escapes a space as \\040 but writes UTF-8 as it is."""
    dev, mnt, r = _fresh_daemon_mount(tmp_path, "my mnt café")
    assert r.returncode == 0, r.stderr
    try:
        u = _umount(mnt)
    finally:
        if mountutil._is_mounted(mnt):          # umount failed: do not leave it behind
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
    assert u.returncode == 0, u.stderr
    assert holders.users(dev) == []


def test_umount_of_a_busy_mount_says_who_uses_it_and_changes_nothing(tmp_path):
    """A process working in the mount keeps it busy: `clusterfs umount` fails with one
    line naming it (as `fuser -m` would), the mount goes on serving, and once that
    process is gone the unmount works."""
    dev, mnt, r = _fresh_daemon_mount(tmp_path)
    assert r.returncode == 0, r.stderr
    os.mkdir(os.path.join(mnt, "d"))
    sleeper = subprocess.Popen(["sleep", "60"], cwd=os.path.join(mnt, "d"))
    try:
        u = _umount(mnt)
        assert u.returncode == 1
        assert f"in use by pid {sleeper.pid} (sleep): cwd" in u.stderr, u.stderr
        assert len(u.stderr.strip().splitlines()) == 1, u.stderr
        assert os.listdir(mnt) == ["d"]                  # still mounted and serving
    finally:
        sleeper.kill()
        sleeper.wait()
        u = _umount(mnt)
        if mountutil._is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
    assert u.returncode == 0, u.stderr
    assert holders.users(dev) == []


def test_umount_of_something_else_is_refused(tmp_path):
    r = subprocess.run([*CLUSTERFS, "umount", str(tmp_path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0
    assert "not a clusterfs mount" in r.stderr and "Traceback" not in r.stderr, r.stderr


# ------------------------------------------------------------------ ENOSPC, reuse


def test_fill_delete_refill_no_corruption(tmp_path):
    dev = _image(tmp_path, 48 << 20)
    _mkfs(dev)
    mnt = str(tmp_path / "mnt")
    chunk = os.urandom(1 << 20)
    for cycle in range(2):
        with mountutil.mounted(dev, mnt):
            written = []
            for i in range(1000):
                p = os.path.join(mnt, f"fill{i}")
                try:
                    with open(p, "wb") as f:
                        f.write(chunk)
                        f.flush()
                        os.fsync(f.fileno())
                    written.append(p)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
            else:
                pytest.fail("never hit ENOSPC")
            assert len(written) > 20
            keep = written[::3]
            for p in written:
                if p not in keep:
                    os.unlink(p)
                    if os.path.exists(p):
                        pytest.fail(f"{p} still there")
            for p in keep:
                with open(p, "rb") as f:
                    assert f.read() == chunk, f"cycle {cycle}: {p} corrupted"
            st = os.statvfs(mnt)
            assert st.f_bfree > (len(written) - len(keep) - 2) * 256
            for p in keep:
                os.unlink(p)
        _assert_fsck_clean(dev)


def _bdi_read_ahead_kb(mountpoint: str) -> int:
    """The mount's read-ahead, from its backing device info (found through mountinfo)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if parts[4] == os.path.realpath(mountpoint):
                with open(f"/sys/class/bdi/{parts[2]}/read_ahead_kb") as bdi:
                    return int(bdi.read())
    raise AssertionError(f"{mountpoint} not in mountinfo")


def test_read_ahead_is_raised_before_the_first_request(tmp_path):
    """A file keeps the read-ahead it was opened with: the raise must not lag behind
    the mount (it once came 0.5 s later, and a file opened at once read in 128 KiB
    requests for good)."""
    from clusterfs.node.mount_cmd import READAHEAD_KB
    dev = _image(tmp_path)
    _mkfs(dev)
    mnt = str(tmp_path / "mnt")
    with mountutil.mounted(dev, mnt):
        os.stat(mnt)                    # answered only after the INIT reply
        assert _bdi_read_ahead_kb(mnt) == READAHEAD_KB


# ------------------------------------------------------------------ crash + replay


def test_kill9_after_fsync_keeps_sequential_data(tmp_path):
    """Data writes are queued and held back until a batch is full; fsync must still
    put every byte on the device: full batches and a held-back tail, then a crash."""
    dev = _image(tmp_path)
    _mkfs(dev)
    mnt = str(tmp_path / "mnt")
    data = os.urandom(6 << 20) + os.urandom(12345)
    m = mountutil.start_mount(dev, mnt)
    try:
        fd = os.open(os.path.join(mnt, "seq"), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            for at in range(0, len(data), 1 << 20):
                os.pwrite(fd, data[at : at + (1 << 20)], at)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        m.clean_after_crash()                 # kill -9, right after the fsync
    with mountutil.mounted(dev, mnt):
        with open(os.path.join(mnt, "seq"), "rb") as f:
            assert f.read() == data
    _assert_fsck_clean(dev)


def test_kill9_after_fsync_replays(tmp_path):
    dev = _image(tmp_path)
    _mkfs(dev)
    mnt = str(tmp_path / "mnt")
    m = mountutil.start_mount(dev, mnt)
    try:
        os.mkdir(os.path.join(mnt, "d"))
        data = {}
        for i in range(200):
            p = os.path.join(mnt, "d", f"f{i}")
            data[p] = os.urandom(i * 37)
            with open(p, "wb") as f:
                f.write(data[p])
        with open(os.path.join(mnt, "d", "f0"), "rb+") as f:
            os.fsync(f.fileno())          # commits every earlier operation too
    finally:
        m.clean_after_crash()
    with mountutil.mounted(dev, mnt) as m2:
        assert "replayed" in m2.log_text()
        for p, content in data.items():
            with open(p, "rb") as f:
                assert f.read() == content
    _assert_fsck_clean(dev)
