"""clusterfs mount: open the device, claim a journal slot, replay, serve FUSE.

Without -f the command forks; the parent exits 0 only once the mount is live
(or 1 with the child's one-line error). Unmount with `fusermount3 -u MOUNTPOINT`;
SIGTERM / SIGINT unmount too. Either way the journal is committed and
checkpointed, the journal marked clean and the locks released before exit 0.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass

from clusterfs.errors import ChecksumError, ClusterFSError, NotClusterFS, StorageError

log = logging.getLogger("clusterfs.mount")
POOL_BUFFERS = 64
READAHEAD_KB = 1024


class MountError(Exception):
    """A one-line reason the mount cannot go ahead."""


@dataclass
class Options:
    debug: bool = False
    extra: tuple[str, ...] = ()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--foreground", action="store_true",
                        help="stay in the foreground and log to stderr")
    parser.add_argument("-o", dest="options", action="append", default=[],
                        help="comma-separated options: debug (verbose log), fuse_debug "
                             "(libfuse request trace)")
    parser.add_argument("--log", metavar="FILE", help="log file when daemonized "
                        "(default: /dev/null)")
    parser.add_argument("device")
    parser.add_argument("mountpoint")


def parse_options(values: list[str]) -> Options:
    opts = Options()
    extra = []
    for value in values:
        for item in filter(None, value.split(",")):
            if item == "debug":
                opts.debug = True
            elif item == "fuse_debug":
                extra.append("debug")
            else:
                raise MountError(f"unknown mount option {item!r}")
    opts.extra = tuple(extra)
    return opts


def open_device(path: str):
    """Open and validate the device; MountError with a one-line reason."""
    from clusterfs.format.block import BLOCK_SIZE
    from clusterfs.format.signatures import SIGNATURE_BYTES, detect_signature
    from clusterfs.format.superblock import SUPERBLOCK_BLKNO, decode_superblock
    from clusterfs.storage import open_block_device

    try:
        dev = open_block_device(path)
    except StorageError as exc:
        raise MountError(str(exc)) from None
    try:
        if dev.size < (SUPERBLOCK_BLKNO + 1) * BLOCK_SIZE:
            raise MountError(f"{path}: not a clusterfs filesystem (device too small)")
        try:
            sb = decode_superblock(dev.read(SUPERBLOCK_BLKNO))
        except NotClusterFS as exc:
            other = detect_signature(dev.pread(0, SIGNATURE_BYTES))
            why = f"; it holds {other}" if other else ""
            raise MountError(f"{path}: {exc}{why}") from None
        except ChecksumError:
            raise MountError(f"{path}: superblock checksum mismatch") from None
        except ClusterFSError as exc:
            raise MountError(f"{path}: {exc}") from None
        if dev.blocks < sb.total_blocks:
            raise MountError(f"{path}: device is smaller than the filesystem (truncated?): "
                             f"{dev.blocks} < {sb.total_blocks} blocks")
        try:
            if dev.fd is not None:      # an iSCSI LUN has no local descriptor to lock
                fcntl.flock(dev.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise MountError(f"{path}: already mounted by another process") from None
        return dev, sb
    except BaseException:
        dev.close()
        raise


def reserve_memory():
    """Lock memory and become an I/O flusher (warn if refused); make the buffer pool."""
    from clusterfs.format.block import BLOCK_SIZE
    from clusterfs.native import BufferPool, lock_memory, set_io_flusher

    for what, fn in (("mlockall", lock_memory), ("PR_SET_IO_FLUSHER", set_io_flusher)):
        try:
            fn()
        except OSError as exc:
            log.warning("memory reserve: %s refused (%s); continuing without it", what,
                        exc.strerror or exc)
    return BufferPool(POOL_BUFFERS, BLOCK_SIZE)


async def serve(dev, sb, mountpoint: str, opts: Options, ready: Callable[[], None]) -> None:
    import pyfuse3
    import trio

    from clusterfs.cache.glock import GlockManager
    from clusterfs.cache.transaction import TransactionManager
    from clusterfs.dlm.interface import Mode
    from clusterfs.dlm.local import LocalLockService
    from clusterfs.errors import WouldBlock
    from clusterfs.fs.filesystem import FileSystem
    from clusterfs.fuse.operations import Operations
    from clusterfs.journal.log import Journal, replay_journal

    pool = reserve_memory()
    locks = LocalLockService()
    slot, slot_lock = None, None
    for s in range(sb.journal_count):
        try:
            slot_lock = await locks.lock(("journal", s), Mode.EX, try_=True)
            slot = s
            break
        except WouldBlock:
            continue
    if slot is None:
        raise MountError(f"{dev.path}: all {sb.journal_count} journal slots are in use")
    # Alone on this device (flock): no other node can be using any journal, so
    # replay them all. In a cluster only recovery replays another slot's journal.
    for s in range(sb.journal_count):
        try:
            result = replay_journal(dev, sb, s)
        except ClusterFSError as exc:
            raise MountError(f"{dev.path}: journal {s}: {exc}") from None
        if result.transactions:
            log.info("journal %d: replayed %d transactions", s, result.transactions)
    journal = Journal(dev, sb, slot, pool)
    journal.open()
    txn = TransactionManager(journal)
    glocks = GlockManager(locks)
    fs = FileSystem(dev, sb, journal, glocks, txn)
    ops = Operations(fs)
    options = set(pyfuse3.default_options) | {
        "fsname=" + os.path.abspath(dev.path), "subtype=clusterfs", "allow_other",
        *opts.extra}
    try:
        pyfuse3.init(ops, mountpoint, options)
    except RuntimeError as exc:
        raise MountError(f"{mountpoint}: cannot mount: {exc}") from None
    log.info("mounted %s on %s (journal slot %d, uuid %s)", dev.path, mountpoint, slot,
             sb.uuid_str)
    ready()
    unmounted_by_us = False
    try:
        async with trio.open_nursery() as nursery:
            glocks.start(nursery)
            nursery.start_soon(txn.run_timer)

            async def on_signal() -> None:
                nonlocal unmounted_by_us
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        log.info("signal %d: unmounting", signum)
                        unmounted_by_us = True
                        pyfuse3.terminate()
                        return

            nursery.start_soon(on_signal)

            async def raise_readahead() -> None:
                # the kernel sets the mount's read-ahead when it handles our INIT reply,
                # so raise it right after that: a file keeps the read-ahead it was
                # opened with, and one opened under the old 0.5 s sleep read its whole
                # length in 128 KiB requests (about half the speed)
                await ops.initialized.wait()
                _raise_readahead(mountpoint)

            nursery.start_soon(raise_readahead)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        await fs.shutdown()
        await locks.unlock(slot_lock)
        pyfuse3.close(unmount=unmounted_by_us)
        pool.close()
        log.info("unmounted %s; journal clean: %s", mountpoint, not txn.withdrawn)


def _raise_readahead(mountpoint: str) -> None:
    """Let the kernel read ahead READAHEAD_KB on this mount (FUSE starts at 128 KiB), so
    sequential reads arrive as large requests. Best effort; found through mountinfo
    because this process must never stat its own mountpoint."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                if parts[4] == mountpoint:
                    with open(f"/sys/class/bdi/{parts[2]}/read_ahead_kb", "w") as bdi:
                        bdi.write(str(READAHEAD_KB))
                    log.debug("read-ahead of %s set to %d KiB", mountpoint, READAHEAD_KB)
                    return
    except OSError as exc:
        log.debug("read-ahead unchanged: %s", exc)


def _setup_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                        format="clusterfs[%(process)d] %(levelname)s %(name)s: %(message)s")


def _mount(args: argparse.Namespace, ready: Callable[[], None]) -> int:
    import trio

    opts = parse_options(args.options)
    _setup_logging(opts.debug)
    if not os.path.isdir(args.mountpoint):
        raise MountError(f"{args.mountpoint}: mountpoint is not a directory")
    dev, sb = open_device(args.device)
    try:
        trio.run(serve, dev, sb, os.path.abspath(args.mountpoint), opts, ready)
    finally:
        dev.close()
    return 0


def run(args: argparse.Namespace) -> int:
    if args.foreground:
        try:
            return _mount(args, lambda: None)
        except MountError as exc:
            print(f"clusterfs: {exc}", file=sys.stderr)
            return 1
    return _daemonize(args)


def _daemonize(args: argparse.Namespace) -> int:
    """Fork; the parent waits for the child to report the mount live (or an error)."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(wfd)
        with os.fdopen(rfd, "rb") as pipe:
            message = pipe.read().decode(errors="replace").strip()
        if message == "ok":
            return 0
        os.waitpid(pid, 0)
        print(message or "clusterfs: mount failed", file=sys.stderr)
        return 1
    os.close(rfd)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)

    def ready() -> None:
        os.write(wfd, b"ok")
        os.close(wfd)
        logfd = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) \
            if args.log else devnull
        os.dup2(logfd, 1)
        os.dup2(logfd, 2)

    try:
        code = _mount(args, ready)
    except MountError as exc:
        os.write(wfd, f"clusterfs: {exc}".encode())
        code = 1
    except BaseException as exc:  # noqa: BLE001 - report anything to the waiting parent
        try:
            os.write(wfd, f"clusterfs: {exc}".encode())
        except OSError:
            pass
        code = 1
    os._exit(code)
