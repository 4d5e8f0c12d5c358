#!/usr/bin/env python3
"""IscsiDevice against BlockDevice on equal backing files: 1 MiB sequential and 4 KiB
random I/O, each measured `--runs` times (issue 8, item 7).

Both files are sparse files of the same size in one new /tmp/iscsi-bench-* directory:
one opened directly as a BlockDevice, the other exported as a LUN by a private tgtd
on 127.0.0.1 (tests/iscsiutil.py) and opened as iscsi://... So both go through the
same filesystem and page cache; the difference is tgtd plus the iSCSI session (one
synchronous command at a time, as IscsiDevice issues them).

    seq write   SIZE in 1 MiB writes, then flush (fsync / SYNCHRONIZE CACHE)
    seq read    SIZE in 1 MiB reads (the data just written: warm page cache on both)
    rand write  COUNT 4 KiB writes at random block addresses, then flush
    rand read   COUNT 4 KiB reads at random block addresses

Run as root: python3 tools/iscsibench.py [--size-mib 256] [--count 4000] [--runs 2]
Everything it starts (tgtd) and makes (the directory) is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import iscsiutil  # noqa: E402

from clusterfs.storage.device import BlockDevice  # noqa: E402
from clusterfs.storage.iscsi import IscsiDevice  # noqa: E402

MIB = 1 << 20
BLOCK = 4096


def measure(dev, size: int, count: int, seed: int) -> dict[str, float]:
    out = {}
    chunk = os.urandom(MIB)
    t = time.perf_counter()
    for off in range(0, size, MIB):
        dev.pwrite(off, chunk)
    dev.flush()
    out["seq write MiB/s"] = size / MIB / (time.perf_counter() - t)

    t = time.perf_counter()
    for off in range(0, size, MIB):
        if len(dev.pread(off, MIB)) != MIB:
            raise SystemExit("short read")
    out["seq read MiB/s"] = size / MIB / (time.perf_counter() - t)

    rng = random.Random(seed)
    blocks = [rng.randrange(size // BLOCK) for _ in range(count)]
    block = os.urandom(BLOCK)
    t = time.perf_counter()
    for b in blocks:
        dev.pwrite(b * BLOCK, block)
    dev.flush()
    out["4k rand write IOPS"] = count / (time.perf_counter() - t)

    rng.shuffle(blocks)
    t = time.perf_counter()
    for b in blocks:
        dev.pread(b * BLOCK, BLOCK)
    out["4k rand read IOPS"] = count / (time.perf_counter() - t)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--count", type=int, default=4000, help="random 4 KiB operations")
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    why = iscsiutil.missing_prerequisites()
    if why:
        print(f"iscsibench: {why}", file=sys.stderr)
        return 1
    size = args.size_mib * MIB
    work = Path(tempfile.mkdtemp(prefix="iscsi-bench-", dir="/tmp"))
    try:
        plain = work / "plain.img"
        with open(plain, "wb") as f:
            f.truncate(size)
        with iscsiutil.target([size], workdir=work) as target:
            print(f"backing files: {size // MIB} MiB each in {work}; LUN {target.url()}")
            rows: dict[str, list[str]] = {}
            for run in range(1, args.runs + 1):
                for name, opener in (("BlockDevice", lambda: BlockDevice(str(plain))),
                                     ("IscsiDevice", lambda: IscsiDevice(target.url()))):
                    dev = opener()
                    try:
                        result = measure(dev, size, args.count, seed=run)
                    finally:
                        dev.close()
                    for what, value in result.items():
                        rows.setdefault(what, []).append(f"{name[:5]} #{run}: {value:8.0f}")
            for what, cells in rows.items():
                print(f"{what:20s} " + "   ".join(cells))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
