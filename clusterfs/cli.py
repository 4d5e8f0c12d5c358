"""The `clusterfs` command: one subcommand per job, each in its own module.

Each subcommand module exposes `add_arguments(parser)` and `run(args) -> int`.
The names and one-line helps below are all `clusterfs --help` needs, so it
imports no subcommand. A subcommand's module (and whatever subsystem it pulls
in) is imported only when that subcommand is asked for, for its own `--help`
included: a broken subsystem (say, an unbuilt native module) fails only the
commands that need it, with one line, and the others work.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from types import ModuleType

from clusterfs.errors import ClusterFSError


@dataclass(frozen=True)
class Command:
    module: str
    help: str
    unusable_exit: int = 2     # exit status when the module cannot be loaded


COMMANDS: dict[str, Command] = {
    "mkfs": Command("clusterfs.node.mkfs_cmd", "format a device or image file"),
    "mount": Command("clusterfs.node.mount_cmd", "mount a clusterfs device through FUSE"),
    "umount": Command("clusterfs.node.umount_cmd",
                      "unmount and wait until the daemon has finished"),
    # fsck's documented status for "could not check" (docs/fsck.md)
    "fsck": Command("clusterfs.node.fsck_cmd", "check (and repair) a clusterfs device",
                    unusable_exit=8),
    "keygen": Command("clusterfs.node.keygen_cmd", "make a cluster key"),
    "lockd": Command("clusterfs.node.lockd_cmd", "run one node of the lock service alone"),
    "lockbench": Command("clusterfs.node.lockbench_cmd", "benchmark the lock service"),
    "status": Command("clusterfs.node.status_cmd", "members, generation, quorum, lock counts"),
    "locks": Command("clusterfs.node.locks_cmd",
                     "show a resource's grant/convert/wait queues"),
}


def _top_parser() -> argparse.ArgumentParser:
    """The command list only; each command parses its own arguments once loaded."""
    parser = argparse.ArgumentParser(prog="clusterfs", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in COMMANDS.items():
        sub.add_parser(name, help=cmd.help, add_help=False)
    return parser


def _load(name: str, prog: str) -> ModuleType | None:
    """The command's module, or None after one line saying why it cannot load."""
    module = COMMANDS[name].module
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        why = "not built yet" if exc.name == module else f"cannot load {module}: {exc}"
    except (ImportError, OSError, ClusterFSError) as exc:
        # an import-time failure of the subsystem below: a broken or missing
        # extension (ImportError, or OSError from its loader) or our NativeError
        why = f"cannot load {module}: {exc}"
    print(f"{prog}: {why}", file=sys.stderr)
    return None


def _run(name: str, argv: list[str], prog: str) -> int:
    """Import the command's module, parse its arguments and run it."""
    mod = _load(name, prog)
    if mod is None:
        return COMMANDS[name].unusable_exit
    parser = argparse.ArgumentParser(prog=prog, description=COMMANDS[name].help)
    mod.add_arguments(parser)
    return int(mod.run(parser.parse_args(argv)) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Only the command name is parsed here (and --help / errors about it);
    # the command's own arguments are parsed once its module is loaded.
    args = _top_parser().parse_args(argv[:1])
    return _run(args.command, argv[1:], f"clusterfs {args.command}")


def mkfs_main(argv: list[str] | None = None) -> int:
    return _run("mkfs", sys.argv[1:] if argv is None else argv, "mkfs.clusterfs")


def fsck_main(argv: list[str] | None = None) -> int:
    return _run("fsck", sys.argv[1:] if argv is None else argv, "fsck.clusterfs")


if __name__ == "__main__":
    sys.exit(main())
