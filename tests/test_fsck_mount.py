"""fsck.clusterfs on loop devices filled through a real clusterfs mount.

These check fsck and the filesystem against each other: whatever the fs
writes through FUSE must be clean to fsck, a repaired image must mount and
show the repaired values, and the state a kill -9 leaves (dirty journal,
unlinked-but-open inodes) is what --repair exists for.
"""

from __future__ import annotations

import contextlib
import os
import stat

import mountutil
import pytest
from test_fsck_builder import FsImage


def _fill(root: str) -> None:
    """A bit of everything, directories kept small enough to stay linear."""
    os.makedirs(os.path.join(root, "a/b/c"))
    for i in range(60):
        with open(os.path.join(root, f"a/b/f{i}"), "w") as f:
            f.write("x" * i * 50)
    with open(os.path.join(root, "a/large"), "wb") as f:
        f.write(os.urandom(3 << 20))
    os.truncate(os.path.join(root, "a/large"), (2 << 20) + 100)
    with open(os.path.join(root, "frag"), "wb") as f:
        for k in range(200):                     # many extents: extent blocks
            f.seek(k * 8192)
            f.write(b"z" * 4096)
    os.link(os.path.join(root, "a/b/f45"), os.path.join(root, "a/hard"))
    os.symlink("a/b/f7", os.path.join(root, "sym"))
    os.symlink("L" * 3500, os.path.join(root, "longsym"))
    os.mkfifo(os.path.join(root, "fifo"))
    os.setxattr(os.path.join(root, "a/b/f1"), "user.one", b"v" * 2000)
    os.setxattr(os.path.join(root, "a/b/f1"), "user.two", b"v" * 1500)
    os.rename(os.path.join(root, "a/b/c"), os.path.join(root, "c2"))
    for i in range(20):
        os.unlink(os.path.join(root, f"a/b/f{i}"))


def test_fresh_loop_device_is_clean(loop):
    dev = loop(256 << 20)
    mountutil.mkfs(dev, journals=2)
    r = mountutil.fsck(dev)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "clean" in r.stdout


def test_content_written_through_a_mount_is_clean(cfs):
    _fill(cfs.root)
    hard_ino = os.stat(cfs.path("a/hard")).st_ino
    cfs.unmount()
    r = cfs.fsck()
    assert r.returncode == 0, r.stdout + r.stderr
    # a planted link-count error in that image: repaired, and the mount agrees
    img = FsImage(cfs.device, format=False)
    img.poke_inode(hard_ino, nlink=5)
    r = cfs.fsck()
    assert r.returncode == 4 and f"inode {hard_ino}: link count 5, 2 directory entries" \
        in r.stdout, r.stdout + r.stderr
    r = cfs.fsck(repair=True)
    assert r.returncode == 1, r.stdout + r.stderr
    assert cfs.fsck().returncode == 0
    cfs.mount()
    assert os.stat(cfs.path("a/hard")).st_nlink == 2
    assert os.readlink(cfs.path("longsym")) == "L" * 3500


def test_hashed_directory_written_through_a_mount_is_clean(cfs):
    os.makedirs(cfs.path("big"))
    for i in range(1500):
        with open(cfs.path(f"big/file-{i:05d}"), "w"):
            pass
    for i in range(0, 1500, 3):
        os.unlink(cfs.path(f"big/file-{i:05d}"))
    cfs.unmount()
    r = cfs.fsck()
    assert r.returncode == 0, r.stdout + r.stderr


def test_kill9_state_is_repaired(cfs):
    """After kill -9: the journal is dirty, and an unlinked file that was still
    open is an orphan whose blocks nothing reaches. --repair replays and frees
    them; the second run is clean; the fsync'd file survives."""
    os.makedirs(cfs.path("d"))
    for i in range(30):
        with open(cfs.path(f"d/f{i}"), "wb") as f:
            f.write(os.urandom(5000 + i))
    orphan = open(cfs.path("d/orphan"), "wb")  # noqa: SIM115 - held open across the crash
    orphan.write(os.urandom(64 << 10))
    orphan.flush()
    os.fsync(orphan.fileno())
    os.unlink(cfs.path("d/orphan"))
    data = os.urandom(20000)
    with open(cfs.path("d/durable"), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    dfd = os.open(cfs.path("d"), os.O_RDONLY)
    os.fsync(dfd)
    os.close(dfd)
    cfs.mnt.clean_after_crash()
    cfs.mnt = None
    with contextlib.suppress(OSError):
        orphan.close()                      # its connection is gone
    r = mountutil.fsck(cfs.device)
    assert r.returncode == 4, r.stdout + r.stderr
    assert "journal 0 is not marked clean" in r.stderr
    assert "leaked" in r.stdout
    r = cfs.fsck(repair=True)
    assert r.returncode == 1, r.stdout + r.stderr
    assert ", 0 left;" in r.stdout
    r = cfs.fsck()
    assert r.returncode == 0, r.stdout + r.stderr
    cfs.mount()
    with open(cfs.path("d/durable"), "rb") as f:
        assert f.read() == data
    assert not os.path.exists(cfs.path("d/orphan"))
    assert stat.S_ISDIR(os.stat(cfs.path("d")).st_mode)


@pytest.mark.slow
@pytest.mark.device_size(1 << 30)
def test_ten_thousand_files_through_a_mount_check_clean(cfs):
    for k in range(10):
        os.makedirs(cfs.path(f"d{k}"))
        for i in range(1000):
            with open(cfs.path(f"d{k}/file-{i:05d}"), "w") as f:
                if i % 3 == 0:
                    f.write("x" * 5000)
    cfs.unmount()
    r = cfs.fsck()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "10011 inodes" in r.stdout
