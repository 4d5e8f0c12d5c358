#!/usr/bin/env python3
"""Benchmark: clusterfs against ext4 and against a do-nothing pyfuse3 filesystem.

    python3 tools/bench.py [--size-mib 1024] [--files 10000] [--only clusterfs|ext4|null]
                           [--backing-dir DIR]

For each filesystem it measures
  * sequential write MiB/s: SIZE MiB in 1 MiB write() calls, then fsync, timed
    from open() to the end of fsync();
  * sequential read MiB/s: the same file read in 1 MiB read() calls after an
    unmount + remount (and `echo 3 > /proc/sys/vm/drop_caches` where allowed),
    so nothing comes from the kernel's cache of the mount;
  * empty-file creates/s: FILES files created (open O_CREAT|O_EXCL + close) in
    one fresh directory, then an fsync of the directory.

clusterfs and ext4 each get their own loop device of the same size over a sparse
file in the same backing directory: by default /dev/shm when that tmpfs has room for
both images (so the disk under the VM does not cap both figures and the ratios measure
the software), otherwise a temporary directory on disk; --backing-dir chooses one, and
the output says which was used. nullfs (tools/nullfs.py) discards writes and reads
back zeros, the ceiling Python FUSE (pyfuse3 + trio) allows with clusterfs's FUSE
settings. nullfs has no storage, so for its read figure the file is re-created at its size after the
remount (a metadata-only operation) and then read cold.

Then it prints the ratios clusterfs/ext4 and clusterfs/null. It needs root
(losetup, mount). Loop devices, mounts and servers are removed on exit, also on
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import mountutil  # noqa: E402

MiB = 1 << 20
KINDS = ("clusterfs", "ext4", "null")


def _drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def _seq_write(path: str, size_mib: int) -> float:
    buf = os.urandom(MiB)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(size_mib):
            view = memoryview(buf)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return size_mib / (time.perf_counter() - t0)


def _seq_read(path: str, size_mib: int) -> float:
    total = 0
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        while chunk := os.read(fd, MiB):
            total += len(chunk)
    finally:
        os.close(fd)
    dt = time.perf_counter() - t0
    if total != size_mib * MiB:
        raise RuntimeError(f"read back {total} bytes of {size_mib * MiB}")
    return size_mib / dt


def _creates(directory: str, n: int) -> float:
    os.mkdir(directory)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        t0 = time.perf_counter()
        for i in range(n):
            os.close(os.open(f"f{i:07d}", flags, 0o644, dir_fd=dfd))
        os.fsync(dfd)
        dt = time.perf_counter() - t0
    finally:
        os.close(dfd)
    if len(os.listdir(directory)) != n:
        raise RuntimeError(f"created {n} files, directory lists {len(os.listdir(directory))}")
    return n / dt


def run_one(kind: str, size_mib: int, files: int, workdir: str, device_bytes: int,
            log=print) -> dict[str, float]:
    """Measure one filesystem; returns {'write': MiB/s, 'read': MiB/s, 'creates': 1/s}."""
    why = mountutil.missing_prerequisites("ext4" if kind == "ext4" else "clusterfs")
    if why:
        raise RuntimeError(why)
    fs = "null" if kind == "null" else kind
    out: dict[str, float] = {}
    base = tempfile.mkdtemp(prefix=f"bench-{kind}-", dir=workdir)
    mnt_dir = os.path.join(base, "mnt")
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: os.path.isdir(base) and _rmtree(base))
        if kind == "null":
            dev = "none"
        else:
            dev = stack.enter_context(mountutil.loop_device(device_bytes, base))
            mountutil.mkfs(dev, fs=kind, force=True)

        def mount():
            m = mountutil.start_mount(dev, mnt_dir, fs)
            stack.callback(lambda: m.mountpoint in mountutil._REGISTRY.mounts
                           and m.force_unmount())
            return m

        m = mount()
        path = m.path("seqfile")
        out["write"] = _seq_write(path, size_mib)
        log(f"  {kind}: sequential write {out['write']:.1f} MiB/s")
        m.unmount()
        m = mount()
        dropped = _drop_caches()
        if kind == "null":
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)   # nullfs forgot it
            os.ftruncate(fd, size_mib * MiB)
            os.close(fd)
        out["read"] = _seq_read(path, size_mib)
        log(f"  {kind}: sequential read {out['read']:.1f} MiB/s (after remount"
            f"{', page cache dropped' if dropped else '; drop_caches not allowed here'})")
        out["creates"] = _creates(m.path("creates"), files)
        log(f"  {kind}: {files} empty-file creates: {out['creates']:.0f}/s")
        m.unmount()
    return out


SHM = "/dev/shm"


def _free_bytes(directory: str) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def choose_backing(requested: str | None, image_bytes: int, images: int) -> str:
    """Where the loop devices' sparse backing files go. Both images always go to the
    same place, so clusterfs and ext4 are measured on equal storage. Without a
    request: /dev/shm when it can hold every image fully written (a tmpfs: RAM, so
    the VM's disk does not cap the figures), else the temp dir on disk."""
    if requested:
        return requested
    if images and os.path.isdir(SHM) and _free_bytes(SHM) >= images * image_bytes:
        return SHM
    return os.environ.get("TMPDIR", "/var/tmp")


def _backing_kind(directory: str) -> str:
    """"tmpfs" or "disk" (by the filesystem the directory is on), for the output."""
    best, kind = "", "disk"
    real = os.path.realpath(directory)
    with open("/proc/self/mounts") as f:
        for line in f:
            _dev, mnt, fstype, *_ = line.split()
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, kind = mnt, ("tmpfs" if fstype == "tmpfs" else "disk")
    return kind


def _load() -> str:
    """The load average, to judge how noisy a run on a shared machine was."""
    one, five, _fifteen = os.getloadavg()
    return f"load average {one:.2f} (1 min) {five:.2f} (5 min)"


def _rmtree(path: str) -> None:
    import shutil  # noqa: PLC0415
    shutil.rmtree(path, ignore_errors=True)


def _fmt(v: float | None) -> str:
    return "-" if v is None else (f"{v:.0f}" if v >= 100 else f"{v:.1f}")


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def table(results: dict[str, dict[str, float]]) -> str:
    rows = [("sequential write MiB/s", "write"), ("sequential read MiB/s", "read"),
            ("empty-file creates/s", "creates")]
    head = ["figure", "clusterfs", "ext4", "null", "cfs/ext4", "cfs/null"]
    lines = [head]
    for label, key in rows:
        c, e, n = (results.get(k, {}).get(key) for k in KINDS)
        lines.append([label, _fmt(c), _fmt(e), _fmt(n), _ratio(c, e), _ratio(c, n)])
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(r, widths, strict=True)))
                     for r in lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=1024, help="sequential file size (MiB)")
    p.add_argument("--files", type=int, default=10_000, help="empty files to create")
    p.add_argument("--only", choices=KINDS, action="append",
                   help="run only this filesystem (repeatable)")
    p.add_argument("--backing-dir", "--workdir", dest="backing_dir", default=None,
                   help="where the loop devices' sparse backing files (and the mount "
                        "points) go; default /dev/shm when it has room for both images, "
                        "else $TMPDIR or /var/tmp")
    args = p.parse_args(argv)
    kinds = args.only or list(KINDS)
    # room for the file, the journals and the inodes of the creates, on both filesystems
    device_bytes = (args.size_mib * MiB * 3) // 2 + args.files * 8192 + (256 * MiB)
    images = sum(1 for k in kinds if k != "null")
    backing = choose_backing(args.backing_dir, device_bytes, images)

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    results: dict[str, dict[str, float]] = {}
    failed = []
    print(f"bench: {args.size_mib} MiB sequential, {args.files} creates, "
          f"loop devices of {device_bytes // MiB} MiB, {_load()}", flush=True)
    print(f"bench: backing files in {backing} ({_backing_kind(backing)})", flush=True)
    try:
        for kind in kinds:
            try:
                results[kind] = run_one(kind, args.size_mib, args.files, backing,
                                        device_bytes, log=lambda s: print(s, flush=True))
            except (Exception, AssertionError) as exc:  # noqa: B014
                failed.append(kind)
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                print(f"  {kind}: FAILED: {first}", flush=True)
    finally:
        leaked = mountutil.cleanup_all()
        if leaked:
            print(f"bench: cleaned up {', '.join(leaked)}", file=sys.stderr)
    print(f"bench: done, {_load()}")
    print()
    print(table(results))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
