"""The `clusterfs` command: one subcommand per job, each in its own module.

Each subcommand module exposes `add_arguments(parser)` and `run(args) -> int`.
They are imported lazily so `clusterfs --help` stays fast and a broken
subsystem cannot take the others down.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "mkfs": ("clusterfs.node.mkfs_cmd", "format a device or image file"),
    "mount": ("clusterfs.node.mount_cmd", "mount a clusterfs device through FUSE"),
    "umount": ("clusterfs.node.umount_cmd", "unmount and wait until the daemon has finished"),
    "fsck": ("clusterfs.node.fsck_cmd", "check (and repair) a clusterfs device"),
    "keygen": ("clusterfs.node.keygen_cmd", "make a cluster key"),
    "lockd": ("clusterfs.node.lockd_cmd", "run one node of the lock service alone"),
    "lockbench": ("clusterfs.node.lockbench_cmd", "benchmark the lock service"),
    "status": ("clusterfs.node.status_cmd", "members, generation, quorum, lock counts"),
    "locks": ("clusterfs.node.locks_cmd", "show a resource's grant/convert/wait queues"),
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clusterfs", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(_module=module)
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            p.set_defaults(_missing=True)
    return parser


def _run_module(module: str, argv: list[str], prog: str) -> int:
    mod = importlib.import_module(module)
    parser = argparse.ArgumentParser(prog=prog)
    mod.add_arguments(parser)
    return int(mod.run(parser.parse_args(argv)) or 0)


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if getattr(args, "_missing", False):
        print(f"clusterfs {args.command}: not built yet", file=sys.stderr)
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


def mkfs_main(argv: list[str] | None = None) -> int:
    return _run_module(COMMANDS["mkfs"][0], sys.argv[1:] if argv is None else argv,
                       "mkfs.clusterfs")


def fsck_main(argv: list[str] | None = None) -> int:
    return _run_module(COMMANDS["fsck"][0], sys.argv[1:] if argv is None else argv,
                       "fsck.clusterfs")


if __name__ == "__main__":
    sys.exit(main())
