"""POSIX data path through a real mount: read/write/append, truncate, sparse files,
large offsets, fsync/fdatasync, persistence across unmount/remount."""

from __future__ import annotations

import hashlib
import os

import pytest
from fileutil import read_file

GiB = 1 << 30


def test_write_read_roundtrip(fsys):
    p = fsys.path("a")
    data = os.urandom(300_000)
    with open(p, "wb") as f:
        f.write(data)
    assert read_file(p) == data
    assert os.stat(p).st_size == len(data)


def test_overwrite_middle(fsys):
    p = fsys.path("a")
    with open(p, "wb") as f:
        f.write(b"x" * 10000)
    fd = os.open(p, os.O_WRONLY)
    try:
        assert os.pwrite(fd, b"HELLO", 4094) == 5
    finally:
        os.close(fd)
    got = read_file(p)
    assert got == b"x" * 4094 + b"HELLO" + b"x" * (10000 - 4099)


def test_append(fsys):
    p = fsys.path("log")
    expected = b""
    for i in range(50):
        chunk = f"line {i}\n".encode() * (i + 1)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.pwrite(fd, b"", 0)
            os.write(fd, chunk)
        finally:
            os.close(fd)
        expected += chunk
    assert read_file(p) == expected
    # O_APPEND ignores the file offset: write after lseek(0) still lands at the end
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"END")
    finally:
        os.close(fd)
    assert read_file(p) == expected + b"END"


def test_read_past_eof_and_partial(fsys):
    p = fsys.path("f")
    with open(p, "wb") as f:
        f.write(b"0123456789")
    fd = os.open(p, os.O_RDONLY)
    try:
        assert os.pread(fd, 100, 5) == b"56789"
        assert os.pread(fd, 100, 10) == b""
        assert os.pread(fd, 100, 1 << 20) == b""
    finally:
        os.close(fd)


def test_truncate_down_then_up_reads_zeros(fsys):
    p = fsys.path("t")
    data = os.urandom(3 * 4096 + 123)
    with open(p, "wb") as f:
        f.write(data)
    os.truncate(p, 5000)
    assert os.stat(p).st_size == 5000
    assert read_file(p) == data[:5000]
    os.truncate(p, 20000)
    assert os.stat(p).st_size == 20000
    assert read_file(p) == data[:5000] + bytes(15000)
    # ftruncate on an open fd, and to zero
    fd = os.open(p, os.O_RDWR)
    try:
        os.ftruncate(fd, 0)
        assert os.fstat(fd).st_size == 0
        os.ftruncate(fd, 4096)
        assert os.pread(fd, 8192, 0) == bytes(4096)
    finally:
        os.close(fd)


def test_truncate_via_open_trunc(fsys):
    p = fsys.path("t")
    with open(p, "wb") as f:
        f.write(b"y" * 50000)
    with open(p, "wb") as f:
        f.write(b"z")
    assert read_file(p) == b"z"


def test_sparse_file_holes_read_zero(fsys):
    p = fsys.path("sparse")
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"A" * 4096, 0)
        os.pwrite(fd, b"B" * 4096, 64 << 20)
        os.fsync(fd)
        assert os.fstat(fd).st_size == (64 << 20) + 4096
        assert os.pread(fd, 4096, 32 << 20) == bytes(4096)
        assert os.pread(fd, 8192, (64 << 20) - 4096) == bytes(4096) + b"B" * 4096
        assert os.pread(fd, 4096, 0) == b"A" * 4096
    finally:
        os.close(fd)
    st = os.stat(p)
    # allocated blocks (512-byte units) far below the apparent size: it really is sparse
    assert st.st_blocks * 512 < (4 << 20), st.st_blocks
    # and holes still read as zeros after a remount
    fsys.remount()
    with open(p, "rb") as f:
        f.seek(1 << 20)
        assert f.read(1 << 20) == bytes(1 << 20)


def test_write_past_4gib(fsys):
    p = fsys.path("big")
    offsets = [4 * GiB - 1, 4 * GiB + 7, 5 * GiB + 12345, 17 * GiB - 1]
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for i, off in enumerate(offsets):
            assert os.pwrite(fd, f"<{i}>".encode(), off) == 3
        os.fsync(fd)
        assert os.fstat(fd).st_size == offsets[-1] + 3
    finally:
        os.close(fd)
    fsys.remount()
    fd = os.open(p, os.O_RDONLY)
    try:
        for i, off in enumerate(offsets):
            assert os.pread(fd, 3, off) == f"<{i}>".encode()
        assert os.pread(fd, 16, 3 * GiB) == bytes(16)
    finally:
        os.close(fd)
    assert os.stat(p).st_size == offsets[-1] + 3
    assert os.stat(p).st_blocks * 512 < (64 << 20)


def test_st_blocks_follows_scattered_writes_and_truncates(fsys):
    """st_blocks is kept as extents are mapped and truncated (fs/inode.py data_blocks,
    not summed over every extent at each getattr): after 300 scattered writes and
    truncates it is at least the blocks written and still there, and a remount, which
    counts them afresh from the extents, shows the same figure."""
    import random

    rng = random.Random(5)
    p = fsys.path("frag")
    held: set[int] = set()           # 4 KiB blocks written and not truncated away
    size = 0
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for _ in range(300):
            if rng.random() < 0.1:
                size = rng.randrange(0, 8 << 20)
                os.ftruncate(fd, size)
                held = {b for b in held if b * 4096 < size}
            else:
                off = rng.randrange(0, 8 << 20)
                n = rng.randrange(1, 20_000)
                os.pwrite(fd, b"d" * n, off)
                held |= set(range(off // 4096, (off + n - 1) // 4096 + 1))
                size = max(size, off + n)
        os.fsync(fd)
        blocks = os.fstat(fd).st_blocks
    finally:
        os.close(fd)
    assert blocks * 512 >= (len(held) + 1) * 4096, (blocks, len(held))
    fsys.remount()
    assert os.stat(p).st_blocks == blocks
    assert os.stat(p).st_size == size


def test_fsync_and_fdatasync(fsys):
    p = fsys.path("s")
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"abc" * 1000)
        os.fsync(fd)
        os.write(fd, b"def" * 1000)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    dfd = os.open(fsys.root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)    # fsync on a directory is allowed too
    finally:
        os.close(dfd)
    assert read_file(p) == b"abc" * 1000 + b"def" * 1000


def test_persistence_across_remount(fsys):
    rng_data = {f"d{i}/f{j}": os.urandom(1000 * (i + 1) + j)
                for i in range(3) for j in range(5)}
    for i in range(3):
        os.mkdir(fsys.path(f"d{i}"), 0o750)
    for name, data in rng_data.items():
        with open(fsys.path(name), "wb") as f:
            f.write(data)
    os.symlink("d0/f0", fsys.path("link"))
    os.link(fsys.path("d1/f1"), fsys.path("hard"))
    os.chmod(fsys.path("d2/f2"), 0o600)
    with open(fsys.path("times"), "wb") as f:
        f.write(b"t")
    os.utime(fsys.path("times"), ns=(1_000_000_001, 2_000_000_002))
    os.setxattr(fsys.path("d0/f1"), "user.k", b"v1")
    before = {n: hashlib.sha256(d).hexdigest() for n, d in rng_data.items()}

    fsys.remount()

    for name, digest in before.items():
        assert hashlib.sha256(read_file(fsys.path(name))).hexdigest() == digest, name
    assert sorted(os.listdir(fsys.root)) == sorted(
        ["d0", "d1", "d2", "link", "hard", "times"] + (["lost+found"] if fsys.fs == "ext4" else []))
    assert os.readlink(fsys.path("link")) == "d0/f0"
    assert os.stat(fsys.path("hard")).st_nlink == 2
    assert os.stat(fsys.path("hard")).st_ino == os.stat(fsys.path("d1/f1")).st_ino
    assert os.stat(fsys.path("d2/f2")).st_mode & 0o7777 == 0o600
    assert os.stat(fsys.path("d0")).st_mode & 0o7777 == 0o750
    st = os.stat(fsys.path("times"))   # never read, so atime must not move
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_001, 2_000_000_002)
    assert os.getxattr(fsys.path("d0/f1"), "user.k") == b"v1"


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 1 << 20])
def test_sizes_roundtrip(fsys, size):
    p = fsys.path("f")
    data = os.urandom(size)
    with open(p, "wb") as f:
        f.write(data)
    fsys.remount()
    assert read_file(p) == data


def test_mmap_shared_write_and_read(fsys):
    import mmap

    p = fsys.path("m")
    size = 3 * 4096 + 100
    with open(p, "wb") as f:
        f.write(b"\0" * size)
    fd = os.open(p, os.O_RDWR)
    try:
        with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
            mm[0:5] = b"hello"
            mm[4096 * 2: 4096 * 2 + 5] = b"world"
            mm[size - 3:size] = b"end"
            mm.flush()
        os.fsync(fd)
    finally:
        os.close(fd)
    expect = bytearray(size)
    expect[0:5] = b"hello"
    expect[8192:8197] = b"world"
    expect[size - 3:] = b"end"
    assert read_file(p) == bytes(expect)
    fsys.remount()
    assert read_file(p) == bytes(expect)
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        assert mm[:] == bytes(expect)


@pytest.mark.parametrize("seed", [1, 2])
def test_random_writes_against_a_model(fsys, seed):
    """Random pwrite/truncate/read on one file, checked against a bytearray model,
    across block and extent boundaries, then again after a remount."""
    import random

    rng = random.Random(seed)
    p = fsys.path("model")
    model = bytearray()
    limit = 6 << 20
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for step in range(400):
            op = rng.random()
            if op < 0.6:
                off = rng.choice([rng.randrange(limit), rng.randrange(0, limit, 4096),
                                  len(model), max(0, len(model) - rng.randrange(1, 5000))])
                n = rng.choice([1, 7, 512, 4095, 4096, 4097, 20_000, 100_000, 300_000])
                data = rng.randbytes(n)
                assert os.pwrite(fd, data, off) == n
                if off > len(model):
                    model.extend(bytes(off - len(model)))
                model[off:off + n] = data
            elif op < 0.75:
                size = rng.choice([0, rng.randrange(limit), len(model) // 2,
                                   len(model) + rng.randrange(100_000)])
                os.ftruncate(fd, size)
                if size < len(model):
                    del model[size:]
                else:
                    model.extend(bytes(size - len(model)))
            else:
                off = rng.randrange(len(model) + 10)
                n = rng.randrange(1, 200_000)
                assert os.pread(fd, n, off) == bytes(model[off:off + n]), f"step {step}"
            if step % 100 == 99:
                assert os.fstat(fd).st_size == len(model)
                os.fsync(fd)
    finally:
        os.close(fd)
    assert read_file(p) == bytes(model)
    fsys.remount()
    assert os.stat(p).st_size == len(model)
    assert read_file(p) == bytes(model)
