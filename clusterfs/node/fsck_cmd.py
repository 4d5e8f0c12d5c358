"""fsck.clusterfs / clusterfs fsck: check (and with --repair, fix) a device.

Exit codes as e2fsck: 0 clean, 1 errors corrected, 4 errors left uncorrected,
8 operational error (cannot open, not clusterfs). docs/fsck.md has the details.
"""

from __future__ import annotations

import argparse
import sys

from clusterfs.fsck.checker import run_fsck
from clusterfs.fsck.report import Report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-r", "--repair", action="store_true",
                        help="fix what can be fixed (without it nothing is written)")
    parser.add_argument("-f", "--force", action="store_true",
                        help="repair even though the device seems in use")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print every problem and more detail")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    parser.add_argument("device")


def run(args: argparse.Namespace) -> int:
    report = Report(sys.stdout, sys.stderr, verbose=args.verbose, quiet=args.quiet)
    return run_fsck(args.device, report, repair=args.repair, force=args.force)
