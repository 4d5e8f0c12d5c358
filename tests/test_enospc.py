"""Fill the filesystem to ENOSPC, delete, fill again: the space is reused and
nothing is corrupted (issue 2, item 4's last point)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os

import pytest

SMALL = 32 << 10
CHUNK = 1 << 20


def _write_file(path: str, data: bytes) -> None:
    """Write + fsync + close; any ENOSPC surfaces here (also a delayed one)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fill_with_big(path: str, seed: bytes) -> int:
    """Append 1 MiB chunks until ENOSPC; returns the bytes written before it."""
    written = 0
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    except OSError as e:    # not even room for the inode: fine, it is full
        assert e.errno == errno.ENOSPC, f"expected ENOSPC, got {e!r}"
        return 0
    try:
        with pytest.raises(OSError) as ei:
            for i in range(100_000):
                chunk = hashlib.sha256(seed + i.to_bytes(4, "little")).digest() * (CHUNK // 32)
                n = os.write(fd, chunk)
                written += n
                if n < len(chunk):   # short write: the next one must fail with ENOSPC
                    continue
            os.fsync(fd)
        assert ei.value.errno == errno.ENOSPC, f"expected ENOSPC, got {ei.value!r}"
    finally:
        try:
            os.close(fd)
        except OSError as e:
            assert e.errno == errno.ENOSPC, f"close failed with {e!r}"
    return written


def _avail(root: str) -> int:
    """Free bytes, reserved blocks included (the tests run as root, who may use them)."""
    s = os.statvfs(root)
    return s.f_bfree * s.f_frsize


@pytest.mark.device_size(96 << 20)
def test_fill_delete_refill_fsck_remount(fsys):
    os.mkdir(fsys.path("small"))
    sums: dict[str, str] = {}
    # 1. many small files until the disk is full
    hit = None
    for i in range(100_000):
        name = os.path.join("small", f"f{i:05d}")
        data = hashlib.sha256(b"%d" % i).digest() * (SMALL // 32 - i % 7)
        try:
            _write_file(fsys.path(name), data)
        except OSError as e:
            hit = e
            try:
                os.unlink(fsys.path(name))
            except FileNotFoundError:
                pass
            break
        sums[name] = hashlib.sha256(data).hexdigest()
    assert hit is not None and hit.errno == errno.ENOSPC, f"expected ENOSPC, got {hit!r}"
    assert len(sums) > 500, f"full after only {len(sums)} files of 32 KiB"
    # 2. one big file takes whatever is left (may be nothing)
    _fill_with_big(fsys.path("big"), b"big")
    s = os.statvfs(fsys.root)
    assert s.f_bfree * s.f_frsize < 4 << 20, "ENOSPC but statfs still shows free space"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(fsys.path("big"))
    # a full filesystem still answers reads and metadata calls
    for name in list(sums)[:20]:
        with open(fsys.path(name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == sums[name]
    assert sorted(os.listdir(fsys.path("small")))[:1] == ["f00000"]

    # 3. delete every other small file; the freed space must be reusable
    avail_full = _avail(fsys.root)
    freed = 0
    for name in list(sums)[::2]:
        freed += os.stat(fsys.path(name)).st_size
        os.unlink(fsys.path(name))
        del sums[name]
    os.sync()
    avail_after_delete = _avail(fsys.root)
    assert avail_after_delete - avail_full >= freed * 0.9, (avail_full, avail_after_delete, freed)
    refill = _fill_with_big(fsys.path("refill"), b"refill")
    assert refill >= freed * 0.8, f"freed {freed} bytes but could write only {refill} again"
    # keep the refill file, but only its first MiB, and remember its content
    os.truncate(fsys.path("refill"), CHUNK)
    with open(fsys.path("refill"), "rb") as f:
        refill_sum = hashlib.sha256(f.read()).hexdigest()
    assert refill_sum == hashlib.sha256(
        hashlib.sha256(b"refill" + (0).to_bytes(4, "little")).digest() * (CHUNK // 32)
    ).hexdigest()
    _write_file(fsys.path("after"), b"A" * SMALL)       # space from the truncate is usable
    sums["after"] = hashlib.sha256(b"A" * SMALL).hexdigest()
    sums["refill"] = refill_sum
    avail_before_unmount = _avail(fsys.root)

    # 4. unmount, fsck clean, remount, everything that survived is intact
    fsys.unmount()
    r = fsys.fsck()
    assert r.returncode == 0, f"fsck after ENOSPC not clean ({r.returncode}):\n{r.stdout}{r.stderr}"
    fsys.mount()
    for name, digest in sums.items():
        with open(fsys.path(name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, name
    assert len(os.listdir(fsys.path("small"))) == len(sums) - 2
    assert abs(_avail(fsys.root) - avail_before_unmount) <= 1 << 20
