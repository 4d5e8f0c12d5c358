"""POSIX namespace through a real mount: rename, hard links, symlinks, FIFOs,
large directories, and the errno of every failing call."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import random
import stat
import subprocess
import sys

import pytest
from fileutil import errno_of, read_file, write_file

libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def renameat2(old: str, new: str, flags: int) -> None:
    rc = libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new),
                        ctypes.c_uint(flags))
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), old, None, new)


# ---------------------------------------------------------------------------- rename


def test_rename_file_same_dir_and_across_dirs(fsys):
    a, b = fsys.path("a"), fsys.path("b")
    os.mkdir(fsys.path("d1"))
    os.mkdir(fsys.path("d2"))
    write_file(a, b"AAA")
    ino = os.stat(a).st_ino
    os.rename(a, b)
    assert not os.path.exists(a)
    assert read_file(b) == b"AAA" and os.stat(b).st_ino == ino
    os.rename(b, fsys.path("d1", "x"))
    os.rename(fsys.path("d1", "x"), fsys.path("d2", "y"))
    assert os.listdir(fsys.path("d1")) == []
    assert os.listdir(fsys.path("d2")) == ["y"]
    assert read_file(fsys.path("d2", "y")) == b"AAA"
    assert os.stat(fsys.path("d2", "y")).st_ino == ino
    # rename onto itself is a no-op
    os.rename(fsys.path("d2", "y"), fsys.path("d2", "y"))
    assert read_file(fsys.path("d2", "y")) == b"AAA"


def test_rename_file_over_existing_file(fsys):
    os.mkdir(fsys.path("d"))
    write_file(fsys.path("src"), b"new")
    write_file(fsys.path("d", "dst"), b"old contents")
    src_ino = os.stat(fsys.path("src")).st_ino
    fd = os.open(fsys.path("d", "dst"), os.O_RDONLY)   # replaced file stays readable
    try:
        os.rename(fsys.path("src"), fsys.path("d", "dst"))
        assert read_file(fsys.path("d", "dst")) == b"new"
        assert os.stat(fsys.path("d", "dst")).st_ino == src_ino
        assert os.pread(fd, 100, 0) == b"old contents"
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)
    assert sorted(os.listdir(fsys.path("d"))) == ["dst"]
    assert not os.path.exists(fsys.path("src"))


def test_rename_dir_over_empty_dir_and_across(fsys):
    os.makedirs(fsys.path("p1", "src"))
    os.makedirs(fsys.path("p2", "dst"))
    write_file(fsys.path("p1", "src", "f"), b"f")
    os.rename(fsys.path("p1", "src"), fsys.path("p2", "dst"))
    assert os.listdir(fsys.path("p1")) == []
    assert os.listdir(fsys.path("p2")) == ["dst"]
    assert read_file(fsys.path("p2", "dst", "f")) == b"f"
    # parent link counts follow the moved subdirectory
    assert os.stat(fsys.path("p1")).st_nlink == 2
    assert os.stat(fsys.path("p2")).st_nlink == 3
    # '..' of the moved dir now points at the new parent
    assert os.stat(fsys.path("p2", "dst", "..")).st_ino == os.stat(fsys.path("p2")).st_ino


def test_rename_dir_over_nonempty_dir_is_enotempty(fsys):
    os.mkdir(fsys.path("a"))
    os.makedirs(fsys.path("b", "child"))
    e = errno_of(os.rename, fsys.path("a"), fsys.path("b"))
    assert e in (errno.ENOTEMPTY, errno.EEXIST)   # POSIX allows both; Linux fs use ENOTEMPTY
    assert e == errno.ENOTEMPTY
    assert os.path.isdir(fsys.path("a")) and os.path.isdir(fsys.path("b", "child"))


def test_rename_type_mismatch_errnos(fsys):
    os.mkdir(fsys.path("dir"))
    write_file(fsys.path("file"), b"x")
    assert errno_of(os.rename, fsys.path("dir"), fsys.path("file")) == errno.ENOTDIR
    assert errno_of(os.rename, fsys.path("file"), fsys.path("dir")) == errno.EISDIR
    # a directory cannot move into its own subtree
    os.mkdir(fsys.path("dir", "sub"))
    assert errno_of(os.rename, fsys.path("dir"), fsys.path("dir", "sub", "x")) == errno.EINVAL
    assert errno_of(os.rename, fsys.path("nope"), fsys.path("x")) == errno.ENOENT


def test_rename_noreplace(fsys):
    write_file(fsys.path("a"), b"a")
    write_file(fsys.path("b"), b"b")
    assert errno_of(renameat2, fsys.path("a"), fsys.path("b"), RENAME_NOREPLACE) == errno.EEXIST
    assert read_file(fsys.path("a")) == b"a" and read_file(fsys.path("b")) == b"b"
    renameat2(fsys.path("a"), fsys.path("c"), RENAME_NOREPLACE)
    assert not os.path.exists(fsys.path("a")) and read_file(fsys.path("c")) == b"a"


def test_rename_exchange(fsys):
    os.mkdir(fsys.path("d"))
    write_file(fsys.path("f"), b"file")
    write_file(fsys.path("d", "inner"), b"inner")
    ino_f, ino_d = os.stat(fsys.path("f")).st_ino, os.stat(fsys.path("d")).st_ino
    renameat2(fsys.path("f"), fsys.path("d"), RENAME_EXCHANGE)
    assert os.stat(fsys.path("d")).st_ino == ino_f
    assert os.stat(fsys.path("f")).st_ino == ino_d
    assert read_file(fsys.path("d")) == b"file"
    assert read_file(fsys.path("f", "inner")) == b"inner"
    assert errno_of(renameat2, fsys.path("f"), fsys.path("missing"),
                  RENAME_EXCHANGE) == errno.ENOENT
    fsys.remount()
    assert read_file(fsys.path("d")) == b"file"
    assert read_file(fsys.path("f", "inner")) == b"inner"


# ---------------------------------------------------------------------------- links


def test_hard_links_and_nlink(fsys):
    a = fsys.path("a")
    write_file(a, b"shared")
    os.mkdir(fsys.path("sub"))
    assert os.stat(a).st_nlink == 1
    os.link(a, fsys.path("b"))
    os.link(a, fsys.path("sub", "c"))
    for p in (a, fsys.path("b"), fsys.path("sub", "c")):
        st = os.stat(p)
        assert st.st_nlink == 3 and st.st_ino == os.stat(a).st_ino
    with open(fsys.path("b"), "ab") as f:
        f.write(b"+more")
    assert read_file(fsys.path("sub", "c")) == b"shared+more"
    os.unlink(a)
    assert os.stat(fsys.path("b")).st_nlink == 2
    os.rename(fsys.path("sub", "c"), fsys.path("b"))   # rename onto another link of itself
    assert os.path.exists(fsys.path("b"))
    fsys.remount()
    nl = os.stat(fsys.path("b")).st_nlink
    assert nl == (1 if not os.path.exists(fsys.path("sub", "c")) else 2)
    assert errno_of(os.link, fsys.path("b"), fsys.path("b")) == errno.EEXIST
    assert errno_of(os.link, fsys.path("sub"), fsys.path("dirlink")) == errno.EPERM
    assert errno_of(os.link, fsys.path("missing"), fsys.path("x")) == errno.ENOENT


def test_directory_link_counts(fsys):
    d = fsys.path("d")
    os.mkdir(d)
    assert os.stat(d).st_nlink == 2
    root_before = os.stat(fsys.root).st_nlink
    for i in range(5):
        os.mkdir(os.path.join(d, f"s{i}"))
    write_file(os.path.join(d, "file"), b"")   # files do not count
    assert os.stat(d).st_nlink == 7
    assert os.stat(fsys.root).st_nlink == root_before
    os.rmdir(os.path.join(d, "s0"))
    assert os.stat(d).st_nlink == 6
    fsys.remount()
    assert os.stat(d).st_nlink == 6
    assert os.stat(os.path.join(d, "s1")).st_nlink == 2


def test_unlinked_open_file_stays_readable(fsys):
    p = fsys.path("tmp")
    write_file(p, b"still here")
    fd = os.open(p, os.O_RDWR)
    try:
        os.unlink(p)
        assert not os.path.exists(p)
        assert os.pread(fd, 100, 0) == b"still here"
        os.pwrite(fd, b"STILL", 0)
        assert os.pread(fd, 100, 0) == b"STILL here"
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)
    assert os.listdir(fsys.root) in ([], ["lost+found"])


def test_symlinks(fsys):
    write_file(fsys.path("target"), b"T" * 100)
    os.symlink("target", fsys.path("rel"))
    os.symlink(fsys.path("target"), fsys.path("abs"))
    long_target = "x/" * 1500 + "end"    # 3 KiB target: more than a stuffed inode holds
    os.symlink(long_target, fsys.path("long"))
    os.symlink("nowhere", fsys.path("dangling"))
    assert os.readlink(fsys.path("rel")) == "target"
    assert os.readlink(fsys.path("abs")) == fsys.path("target")
    assert os.readlink(fsys.path("long")) == long_target
    lst, st = os.lstat(fsys.path("rel")), os.stat(fsys.path("rel"))
    assert stat.S_ISLNK(lst.st_mode) and lst.st_size == len("target")
    assert stat.S_ISREG(st.st_mode) and st.st_size == 100
    assert st.st_ino == os.stat(fsys.path("target")).st_ino != lst.st_ino
    assert read_file(fsys.path("rel")) == b"T" * 100
    assert errno_of(os.stat, fsys.path("dangling")) == errno.ENOENT
    assert stat.S_ISLNK(os.lstat(fsys.path("dangling")).st_mode)
    assert errno_of(os.readlink, fsys.path("target")) == errno.EINVAL
    assert errno_of(os.symlink, "x", fsys.path("rel")) == errno.EEXIST
    fsys.remount()
    assert os.readlink(fsys.path("long")) == long_target
    assert os.readlink(fsys.path("rel")) == "target"


def test_fifo_between_two_processes(fsys):
    p = fsys.path("fifo")
    os.mkfifo(p, 0o640)
    st = os.stat(p)
    assert stat.S_ISFIFO(st.st_mode) and st.st_mode & 0o777 == 0o640
    payload = b"through the pipe\n" * 1000
    writer = subprocess.Popen(
        [sys.executable, "-c",
         "import sys\nwith open(sys.argv[1], 'wb') as f: f.write(sys.stdin.buffer.read())",
         p], stdin=subprocess.PIPE)
    try:
        writer.stdin.write(payload)
        writer.stdin.close()
        with open(p, "rb") as f:
            got = f.read()
        assert writer.wait(30) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert got == payload
    fsys.remount()
    assert stat.S_ISFIFO(os.stat(p).st_mode)


# ---------------------------------------------------------------------------- big dir


@pytest.mark.device_size(1 << 30)
def test_directory_with_100000_entries(fsys):
    d = fsys.path("big")
    os.mkdir(d)
    n = 100_000
    names = [f"entry-{i:06d}-{(i * 2654435761) & 0xffffffff:08x}" for i in range(n)]
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
        for i, name in enumerate(names):
            if i % 10 == 0:
                os.close(os.open(name, flags, 0o644, dir_fd=dfd))
            else:   # mknod: one FUSE request instead of create+flush+release
                os.mknod(name, stat.S_IFREG | 0o644, dir_fd=dfd)
        rng = random.Random(1234)
        for name in rng.sample(names, 3000):
            st = os.stat(name, dir_fd=dfd)
            assert stat.S_ISREG(st.st_mode)
        for i in rng.sample(range(n), 200):
            assert errno_of(os.stat, f"entry-{i:06d}-missing", dir_fd=dfd) == errno.ENOENT
        assert errno_of(os.open, names[777], flags, 0o644, dir_fd=dfd) == errno.EEXIST
        listed = os.listdir(d)
        assert len(listed) == n and set(listed) == set(names)
        for name in rng.sample(names, 1000):      # unlink some, they vanish, others stay
            os.unlink(name, dir_fd=dfd)
    finally:
        os.close(dfd)
    fsys.remount()
    assert len(os.listdir(d)) == n - 1000
    for name in random.Random(99).sample(names, 500):
        try:
            os.stat(os.path.join(d, name))
        except FileNotFoundError:
            pass


def _directory_of_empty_files(d: str, names: set[str]) -> None:
    os.mkdir(d)
    for n in names:
        os.mknod(os.path.join(d, n), stat.S_IFREG | 0o644)


def test_readdir_while_unlinking(fsys):
    """rm -rf's pattern: read the directory in batches while deleting what was
    read. Every entry must come back exactly once; none is skipped."""
    d = fsys.path("d")
    names = {f"n{i:05d}-{'x' * (i % 40)}" for i in range(3000)}
    _directory_of_empty_files(d, names)
    seen = []
    while True:
        batch = []
        with os.scandir(d) as it:
            for entry in it:
                seen.append(entry.name)
                batch.append(entry.name)
                os.unlink(os.path.join(d, entry.name))     # delete while iterating
                if len(batch) >= 700:
                    break
        if not batch:
            break
    assert len(seen) == len(set(seen)) == len(names), (len(seen), len(set(seen)))
    assert set(seen) == names
    assert os.listdir(d) == []
    os.rmdir(d)


def test_readdir_offsets_are_stable(fsys):
    """Entries not touched during a listing are returned exactly once even while
    others are created and removed (seekdir/telldir contract of readdir)."""
    d = fsys.path("d")
    stable = {f"s{i:04d}" for i in range(1500)}
    _directory_of_empty_files(d, stable)
    seen = []
    k = 0
    with os.scandir(d) as it:
        for entry in it:
            seen.append(entry.name)
            k += 1
            os.mknod(os.path.join(d, f"new{k:05d}"), stat.S_IFREG | 0o644)
            if k % 3 == 0:
                os.unlink(os.path.join(d, f"new{k - 1:05d}"))
    got = [n for n in seen if n.startswith("s")]
    assert len(got) == len(set(got)), "an untouched entry was returned twice"
    assert set(got) == stable, f"{len(stable - set(got))} untouched entries never returned"


# ---------------------------------------------------------------------------- errnos


def test_errno_enoent(fsys):
    assert errno_of(os.stat, fsys.path("missing")) == errno.ENOENT
    assert errno_of(open, fsys.path("missing"), "rb") == errno.ENOENT
    assert errno_of(os.unlink, fsys.path("missing")) == errno.ENOENT
    assert errno_of(os.rmdir, fsys.path("missing")) == errno.ENOENT
    assert errno_of(os.mkdir, fsys.path("missing", "sub")) == errno.ENOENT
    assert errno_of(os.listdir, fsys.path("missing")) == errno.ENOENT


def test_errno_eexist(fsys):
    os.mkdir(fsys.path("d"))
    write_file(fsys.path("f"), b"")
    assert errno_of(os.mkdir, fsys.path("d")) == errno.EEXIST
    assert errno_of(os.mkdir, fsys.path("f")) == errno.EEXIST
    assert errno_of(os.open, fsys.path("f"), os.O_CREAT | os.O_EXCL | os.O_WRONLY) == errno.EEXIST
    assert errno_of(os.mkfifo, fsys.path("f")) == errno.EEXIST


def test_errno_enotempty_and_rmdir(fsys):
    os.makedirs(fsys.path("d", "e"))
    assert errno_of(os.rmdir, fsys.path("d")) == errno.ENOTEMPTY
    os.rmdir(fsys.path("d", "e"))
    write_file(fsys.path("d", "f"), b"")
    assert errno_of(os.rmdir, fsys.path("d")) == errno.ENOTEMPTY
    os.unlink(fsys.path("d", "f"))
    os.rmdir(fsys.path("d"))
    assert not os.path.exists(fsys.path("d"))


def test_errno_enotdir_eisdir(fsys):
    write_file(fsys.path("f"), b"")
    os.mkdir(fsys.path("d"))
    assert errno_of(os.stat, fsys.path("f", "x")) == errno.ENOTDIR
    assert errno_of(os.mkdir, fsys.path("f", "x")) == errno.ENOTDIR
    assert errno_of(os.rmdir, fsys.path("f")) == errno.ENOTDIR
    assert errno_of(os.listdir, fsys.path("f")) == errno.ENOTDIR
    assert errno_of(open, fsys.path("d"), "wb") == errno.EISDIR
    assert errno_of(os.unlink, fsys.path("d")) == errno.EISDIR
    fd = os.open(fsys.path("d"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert errno_of(os.read, fd, 10) == errno.EISDIR
    finally:
        os.close(fd)


def test_errno_enametoolong(fsys):
    ok = "n" * 255
    write_file(fsys.path(ok), b"ok")
    assert read_file(fsys.path(ok)) == b"ok"
    long = "n" * 256
    assert errno_of(open, fsys.path(long), "wb") == errno.ENAMETOOLONG
    assert errno_of(os.mkdir, fsys.path(long)) == errno.ENAMETOOLONG
    assert errno_of(os.stat, fsys.path(long)) == errno.ENAMETOOLONG
    assert errno_of(os.rename, fsys.path(ok), fsys.path(long)) == errno.ENAMETOOLONG
    assert errno_of(os.symlink, "x", fsys.path(long)) == errno.ENAMETOOLONG


def test_errno_exdev(fsys, tmp_path):
    write_file(fsys.path("f"), b"data")
    outside = tmp_path / "outside"
    assert errno_of(os.rename, fsys.path("f"), str(outside)) == errno.EXDEV
    assert errno_of(os.link, fsys.path("f"), str(outside)) == errno.EXDEV
    (tmp_path / "in").write_bytes(b"x")
    assert errno_of(os.rename, str(tmp_path / "in"), fsys.path("g")) == errno.EXDEV
    assert read_file(fsys.path("f")) == b"data"


@pytest.mark.device_size(64 << 20)
def test_errno_enospc(fsys):
    p = fsys.path("fill")
    chunk = b"\xa5" * (1 << 20)
    written = 0
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with pytest.raises(OSError) as ei:
            for _ in range(1000):    # 1 GiB on a 64 MiB device: must run out
                written += os.write(fd, chunk)
            os.fsync(fd)
        assert ei.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert 16 << 20 <= written <= 64 << 20
    assert errno_of(lambda: write_file(fsys.path("more"), chunk * 4)) == errno.ENOSPC
    os.unlink(p)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(fsys.path("more"))
    write_file(fsys.path("after"), chunk * 8)     # space came back
    assert read_file(fsys.path("after")) == chunk * 8
