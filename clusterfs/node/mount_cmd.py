"""clusterfs mount: open the device, claim a journal slot, replay, serve FUSE.

One node, or one node of a cluster: with --config and --node-id the process
joins the cluster (membership, fencing, the DLM) and takes every lock from the
DLM; the process is the node, so its death is the node's death. Without them
the mount is a one-node mount over the in-process lock service.

The superblock says which way a device is used (mkfs --cluster NAME): a
one-node mount of a cluster device, a cluster mount of a one-node device, or a
mount with another cluster's config is refused with one line
(--no-cluster-check overrides, for recovery by hand).

Journals (GFS2's first-mounter rule): mounts are serialised by the ("mount",)
lock. The first node to mount a device no live node has mounted gets ("live",)
in EX: it replays every dirty journal, holding each one's ("journal", slot)
lock, then keeps "live" in PR like every later node. A later node replays only
the slot it claimed (preferring a clean one).

With CLUSTERFS_AUDIT_FAILOVER=1 in its environment the mount audits its failover
path (clusterfs.failover): from the start it records, in memory, every file it opens
and module it imports, and `clusterfs status --json` shows under "failover" those
that happened while it took over from a dead node or a silent server (none should).

Without -f the command forks; the parent exits 0 only once the mount is live
(or 1 with the child's one-line error); the daemon logs to syslog, or to the
--log file. Unmount with `clusterfs umount` or `fusermount3 -u MOUNTPOINT`;
SIGTERM / SIGINT unmount too. Either way the journal is committed and
checkpointed, the journal marked clean and the locks released before exit 0.
"""

from __future__ import annotations

import argparse
import fcntl
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from clusterfs import failover, workers
from clusterfs.errors import (
    ChecksumError,
    ClusterFSError,
    NotClusterFS,
    StorageError,
    first_in_group,
)
from clusterfs.node import mountrecord
from clusterfs.node.collector import CollectorWatch
from clusterfs.node.memory import keep_reserve_topped_up, reserve_memory
from clusterfs.node.memory import report as memory_report
from clusterfs.node.prepare import TracebackFormatter, preload
from clusterfs.node.stallwatch import StallWatch

if TYPE_CHECKING:
    from clusterfs.format.superblock import Superblock

log = logging.getLogger("clusterfs.mount")
READAHEAD_KB = 1024
SLOT_ATTEMPTS = 25          # looks for a free journal slot before giving up...
SLOT_RETRY_DELAY = 0.2      # ...this many seconds apart
AUDIT_ENV = "CLUSTERFS_AUDIT_FAILOVER"    # =1: audit the failover path (module doc)
MAX_GLOCKS_RANGE = (100, 100_000_000)     # -o max_glocks (default: cache/glock.py MAX_CACHED)
# A cluster node's CPU priority (-o nice=N). Its event loop answers heartbeats,
# probes and lock messages; on a loaded host it stops for want of a CPU: under
# stress-ng (three nodes, two instances each, on two cores) nodes logged stalls of
# up to 1.16 s, and one live node was fenced (beacons now keep a stalled node that
# runs from being fenced before the failure timeout, but the others wait on it
# meanwhile). So, as corosync runs real-time, a node runs ahead of ordinary
# processes (the work it does is theirs: their fs calls); with autogroups, its
# session's group too (_set_priority: until 2026-12-07 the nice counted only inside
# the node's own session, and stalls of 0.35-0.6 s went on in 4 of 7 stress runs, 0
# of 6 after).
CLUSTER_NICE = -10
NICE_RANGE = (-20, 19)                    # -o nice (setpriority's)
RESERVE_MIB_RANGE = (0, 65536)            # -o reserve_mib (default: node/memory.py)
GC_YOUNG = 10_000           # net allocations between young collections (_tune_collector)
GC_OLD = 1                  # middle collections between full ones (_tune_collector)
COLLECTOR = CollectorWatch()   # full collections' pauses, timed (status, the log)
STALLS = StallWatch()          # where the event loop was when it stopped (status, the log)


class MountError(Exception):
    """A one-line reason the mount cannot go ahead."""


class NoJournalSlot(MountError):
    """Every journal slot is taken: refused before this node wrote anything."""


@dataclass
class Options:
    debug: bool = False
    extra: tuple[str, ...] = ()
    min_hold: float | None = None     # glock minimum hold time, seconds
    max_hold: float | None = None     # the most a contended glock's hold time grows to
    max_glocks: int | None = None     # locks cached before the least recently used go
    nice: int | None = None           # the mount process's CPU priority (setpriority)
    reserve_mib: int | None = None    # memory held for the failover path (node/memory.py)


@dataclass
class ClusterArgs:
    """How this mount joins its cluster (from --config / --node-id and friends)."""
    config: str
    node_id: int
    fence_pid_dir: str | None = None
    state_dir: str | None = None
    control: str | None = None
    cfg: Any = None                  # the loaded ClusterConfig
    device: str | None = None        # the device as the user named it
    incarnation: int | None = None
    record: Any = None               # the GenerationFile

    def prepare(self) -> None:
        """Load the config, open the generation record, write the fence record:
        MountError (one line) if any of them cannot be done. The fence record is
        written before joining: whoever may count on us can also fence us."""
        from clusterfs.config import load_config
        from clusterfs.errors import ConfigError, FenceError, StateError
        from clusterfs.membership.service import new_incarnation
        from clusterfs.node.lockd_cmd import claim_pid_file, open_generation_record

        try:
            self.cfg = load_config(self.config)
            self.cfg.node(self.node_id)
        except ConfigError as exc:
            raise MountError(f"{self.config}: {exc}") from None
        try:
            self.record = open_generation_record(self.state_dir, self.node_id)
        except StateError as exc:
            raise MountError(f"--state-dir: {exc}") from None
        self.incarnation = new_incarnation()
        try:
            claim_pid_file(self.fence_pid_dir, self.node_id, self.incarnation)
        except (FenceError, OSError) as exc:
            raise MountError(f"--fence-pid-dir: {exc}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--foreground", action="store_true",
                        help="stay in the foreground and log to stderr")
    parser.add_argument("-o", dest="options", action="append", default=[],
                        help="comma-separated options: debug (verbose log), fuse_debug "
                             "(libfuse request trace), min_hold_ms=N (glock minimum hold "
                             "time, default 20), max_hold_ms=N (the most it grows to "
                             "while two nodes both use a lock, default 200), "
                             "max_glocks=N (locks, with the inodes they cover, kept "
                             "cached before the least recently used go; default 50000), "
                             "reserve_mib=N (memory held for the failover path: half "
                             "malloc heap, half Python object arenas; default 64)")
    parser.add_argument("--log", metavar="FILE", help="log file when daemonized "
                        "(default: syslog, or /var/log/clusterfs/mount.log without one)")
    parser.add_argument("--config", metavar="FILE",
                        help="cluster configuration: join that cluster as --node-id")
    parser.add_argument("--node-id", type=int, metavar="N", help="this node's id in --config")
    parser.add_argument("--fence-pid-dir", metavar="DIR",
                        help="dev clusters on one host: record this process in "
                             "DIR/node<ID>.pid and fence dead nodes by SIGKILL of theirs")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="where this node keeps its highest promised generation "
                             "(default /var/lib/clusterfs)")
    parser.add_argument("--control", metavar="PATH",
                        help="control socket for `clusterfs status` (default "
                             "/run/clusterfs/lockd-<node>.sock)")
    parser.add_argument("--no-cluster-check", action="store_true",
                        help="mount even if the superblock names another cluster, or one "
                             "when mounting alone (recovery by hand: no other node may "
                             "have it mounted)")
    parser.add_argument("device")
    parser.add_argument("mountpoint")


def parse_options(values: list[str]) -> Options:
    opts = Options()
    extra = []
    for value in values:
        for item in filter(None, value.split(",")):
            key, _, value = item.partition("=")
            if item == "debug":
                opts.debug = True
            elif item == "fuse_debug":
                extra.append("debug")
            elif key == "min_hold_ms":
                opts.min_hold = _milliseconds(key, value)
            elif key == "max_hold_ms":
                opts.max_hold = _milliseconds(key, value)
            elif key == "max_glocks":
                opts.max_glocks = _whole_number(key, value, *MAX_GLOCKS_RANGE)
            elif key == "nice":
                opts.nice = _whole_number(key, value, *NICE_RANGE)
            elif key == "reserve_mib":
                opts.reserve_mib = _whole_number(key, value, *RESERVE_MIB_RANGE)
            else:
                raise MountError(f"unknown mount option {item!r}")
    opts.extra = tuple(extra)
    return opts


def _whole_number(key: str, value: str, lowest: int, highest: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise MountError(f"mount option {key}: {value!r} is not a whole number") from None
    if not lowest <= number <= highest:
        raise MountError(f"mount option {key}: {number} out of range {lowest}..{highest}")
    return number


def _set_priority(nice: int) -> None:
    """Run the mount (and every thread it starts later: they inherit it) at `nice`.
    Refused without CAP_SYS_NICE: said once, at info, and the mount goes on.

    With the scheduler's autogroups (Linux's default on desktops and in many VMs:
    /proc/sys/kernel/sched_autogroup_enabled), a nice value ranks threads only
    within their session's group, and the groups share the CPUs by the group's own
    nice; a daemonized mount leads a session of its own, so its nice -10 ranked it
    only against itself: under stress-ng its event loop sat runnable for 0.45-0.6 s
    without a CPU (thread state R, no CPU used: node/stallwatch.py's report), and a
    3 s stall had a live node fenced. So a mount that leads its session gives the
    session's group the same nice (sched(7), /proc/self/autogroup); one started
    inside someone else's session (a shell, a test harness) leaves that alone."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError as exc:
        log.info("CPU priority: nice %d refused (%s); continuing at %d", nice,
                 exc.strerror or exc, os.getpriority(os.PRIO_PROCESS, 0))
        return
    if os.getsid(0) != os.getpid():
        return
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))
    except FileNotFoundError:
        pass                             # no autogroups: the nice above is all there is
    except OSError as exc:
        log.info("CPU priority: nice %d for this session's scheduling group refused "
                 "(%s)", nice, exc.strerror or exc)


def _milliseconds(key: str, value: str) -> float:
    try:
        ms = float(value)
    except ValueError:
        raise MountError(f"mount option {key}: {value!r} is not a number") from None
    if not 0 <= ms <= 60_000:
        raise MountError(f"mount option {key}: {value} out of range 0..60000")
    return ms / 1000


def cluster_args(args: argparse.Namespace) -> ClusterArgs | None:
    """The cluster to join, or None for a one-node mount; MountError if half given."""
    if args.config is None and args.node_id is None:
        for flag in ("fence_pid_dir", "state_dir", "control"):
            if getattr(args, flag):
                raise MountError(f"--{flag.replace('_', '-')} needs --config and --node-id")
        return None
    if args.config is None or args.node_id is None:
        raise MountError("--config and --node-id go together")
    return ClusterArgs(args.config, args.node_id, args.fence_pid_dir, args.state_dir,
                       args.control)


def check_cluster_name(path: str, sb, cluster: str | None, override: bool) -> None:
    """Refuse a device used the other way (one line), unless overridden."""
    owner = sb.cluster_name
    if owner == cluster:
        return
    if override:
        log.warning("%s: cluster check overridden (superblock: %s, mount: %s)", path,
                    owner or "one node", cluster or "one node")
        return
    if cluster is None:
        raise MountError(f"{path}: belongs to cluster {owner!r}: mount it with --config and "
                         "--node-id (or --no-cluster-check, with every node down)")
    if owner is None:
        raise MountError(f"{path}: a one-node filesystem (made without mkfs --cluster); "
                         "mount it without --config")
    raise MountError(f"{path}: belongs to cluster {owner!r}, not {cluster!r} (the config's "
                     "name)")


def open_device(path: str, clustered: bool = False,
                opener: Callable[[str], Any] | None = None):
    """Open (through `opener`, default open_block_device) and validate the device;
    MountError with a one-line reason."""
    from clusterfs.format.block import BLOCK_SIZE
    from clusterfs.format.signatures import SIGNATURE_BYTES, detect_signature
    from clusterfs.format.superblock import SUPERBLOCK_BLKNO, decode_superblock
    from clusterfs.storage import open_block_device

    try:
        dev = (opener or open_block_device)(path)
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
        # On this host: a one-node mount excludes every other user of the device; the
        # nodes of a cluster share it (and still keep mkfs and a one-node mount out).
        try:
            if dev.fd is not None:      # an iSCSI LUN has no local descriptor to lock
                fcntl.flock(dev.fd, (fcntl.LOCK_SH if clustered else fcntl.LOCK_EX)
                            | fcntl.LOCK_NB)
        except OSError:
            raise MountError(f"{path}: already mounted by another process") from None
        return dev, sb
    except BaseException:
        dev.close()
        raise


async def serve(dev, sb, mountpoint: str, opts: Options, ready: Callable[[], None],
                cluster: ClusterArgs | None = None) -> None:
    pool = reserve_memory(opts.reserve_mib)
    dev.start_write_behind()       # its descriptor, buffer and thread: now, not at write-back
    dev.start_flush_ring()         # io_uring for flushes (or the one line why not)
    dev.start_read_ahead()         # its threads and buffers: ready for the first reader
    try:
        if cluster is None:
            from clusterfs.dlm.local import LocalLockService

            await _serve_fs(LocalLockService(), dev, sb, mountpoint, opts, ready, pool)
        else:
            await _serve_clustered(cluster, dev, sb, mountpoint, opts, ready, pool)
    finally:
        pool.close()


async def _serve_clustered(cluster: ClusterArgs, dev, sb, mountpoint: str, opts: Options,
                           ready: Callable[[], None], pool) -> None:
    """Join the cluster, open the filesystem's lockspace, serve through it."""
    from clusterfs.comms.tcp import TcpEndpoint

    preload()                      # the failover path imports nothing (node/prepare.py)
    endpoint = TcpEndpoint(cluster.cfg, cluster.node_id)
    # first: a second copy of a running node is refused before fencing or the disk
    # heartbeat writes anything to the shared disk
    await endpoint.listen()
    try:
        fencing = _mount_fencing(cluster, dev, sb)
        try:
            await _serve_fenced(cluster, fencing, dev, sb, mountpoint, opts, ready, pool,
                                endpoint)
        finally:
            fencing.close()
    finally:
        endpoint.close_listeners()


def _mount_fencing(cluster: ClusterArgs, dev, sb):
    """This mount's part in fencing (clusterfs.node.fencing): the key registered on
    the LUN (scsi-pr) and the agent built, before the node joins; MountError if not."""
    from clusterfs.errors import ConfigError, FenceError
    from clusterfs.node.fencing import MountFencing

    fencing = MountFencing(cluster.cfg, cluster.node_id, cluster.incarnation, dev, sb,
                           cluster.device or dev.path, _second_opener(cluster),
                           pid_dir=cluster.fence_pid_dir)
    try:
        fencing.prepare_device()
        fencing.agent()
    except (ConfigError, FenceError, StorageError) as exc:
        fencing.close()
        raise MountError(f"fencing: {exc}") from None
    return fencing


def _second_opener(cluster: ClusterArgs) -> Callable[[str, str], Any]:
    """How the node opens more handles on the shared disk (fencing sessions, the
    pill watcher's): an iSCSI session under this node's initiator name and `role`;
    a local device bypassing the page cache (another host writes the pills)."""
    from clusterfs.storage import open_block_device
    from clusterfs.storage.iscsi import node_initiator

    def opener(path: str, role: str):
        if not cluster.cfg.reaches_disk(cluster.node_id):
            from clusterfs.storage.proxy import ProxyDevice

            return ProxyDevice(cluster.cfg, cluster.node_id)
        dev = open_block_device(path, writable=role != "watch",
                                initiator=node_initiator(cluster.node_id, role))
        dev.bypass_page_cache()
        return dev

    return opener


def cluster_opener(cluster: ClusterArgs) -> Callable[[str], Any]:
    """How a cluster mount opens its device: through the storage group's block
    servers when the config's [storage] group leaves this node out (proxy I/O);
    else itself, an iSCSI LUN under this node's own initiator name (its
    persistent-reservation registrations are its own)."""
    from clusterfs.storage import open_block_device
    from clusterfs.storage.iscsi import node_initiator

    def opener(path: str):
        if cluster.cfg.reaches_disk(cluster.node_id):
            return open_block_device(path, initiator=node_initiator(cluster.node_id))
        from clusterfs.storage.proxy import ProxyDevice

        log.info("node %d has no path to %s: reaching it through the storage group %s",
                 cluster.node_id, path, list(cluster.cfg.storage_group))
        return ProxyDevice(cluster.cfg, cluster.node_id)

    return opener


def _open_disk_heartbeat(cluster: ClusterArgs, fencing, dev):
    """Membership's second path (node/diskbeat.py) on a handle of its own, registered
    and guarded like every handle this node writes through; none for a node that
    reaches the disk only through the storage group."""
    from clusterfs.node.diskbeat import DiskHeartbeat

    cfg = cluster.cfg
    if not cfg.reaches_disk(cluster.node_id):
        return None
    try:
        handle = _second_opener(cluster)(cluster.device or dev.path, "beat")
    except ClusterFSError as exc:
        raise MountError(f"{dev.path}: disk heartbeat: {exc}") from None
    fencing.own(handle)
    try:
        fencing.add_device(handle)
    except ClusterFSError as exc:
        raise MountError(f"{dev.path}: disk heartbeat: {exc}") from None
    return DiskHeartbeat(handle, frozenset(cfg.node_ids), cluster.node_id,
                         cfg.heartbeat_interval, cfg.failure_timeout)


async def _start_storage(cluster: ClusterArgs, fencing, dev, node) -> Any:
    """Proxy I/O, once the node has joined: a proxy device learns the view (its
    requests carry the generation and go to live servers); a storage-group node
    serves the disk to the others through a handle of its own. The server or None."""
    from clusterfs.node.storagegroup import fence_self, follow_fences
    from clusterfs.storage.blockserver import BlockServer

    membership = node.membership
    if getattr(dev, "proxied", False):
        dev.attach(lambda: (membership.view.generation, membership.view.members))
        node.nursery.start_soon(follow_fences(dev, membership))
        fencing.attach_storage(membership)
        return None
    if not cluster.cfg.block_servers or cluster.node_id not in cluster.cfg.storage_group:
        return None
    try:
        handle = _second_opener(cluster)(cluster.device or dev.path, "serve")
    except ClusterFSError as exc:
        raise MountError(f"block server: {exc}") from None
    try:
        fencing.add_device(handle)
    except ClusterFSError as exc:
        handle.close()
        raise MountError(f"block server: {exc}") from None
    server = BlockServer(cluster.cfg, cluster.node_id, handle, membership)
    server.on_disk_hung = lambda why: fence_self(cluster.node_id, why)
    try:
        await node.nursery.start(server.serve)
    except OSError as exc:
        handle.close()
        raise MountError(f"block server: {exc.strerror or exc}") from None
    fencing.own(handle)
    fencing.attach_storage(membership, server)
    return server


async def _serve_fenced(cluster: ClusterArgs, fencing, dev, sb, mountpoint: str,
                        opts: Options, ready: Callable[[], None], pool, endpoint) -> None:
    import trio

    from clusterfs.cache.recovery import JournalRecovery
    from clusterfs.dlm.lockspace import open_dlm, wait_running
    from clusterfs.node.cluster import open_cluster_node
    from clusterfs.node.lockd_cmd import ControlServer, default_control_path
    from clusterfs.node.placement import Placement
    from clusterfs.node.storagegroup import wire_proxy

    disk = _open_disk_heartbeat(cluster, fencing, dev)
    async with open_cluster_node(cluster.cfg, cluster.node_id, fence_agent=fencing.agent(),
                                 incarnation=cluster.incarnation,
                                 generation_record=cluster.record, disk=disk,
                                 endpoint=endpoint) as node:
        node.nursery.start_soon(fencing.hold_members, node.membership)
        server = await _start_storage(cluster, fencing, dev, node)
        servers = cluster.cfg.storage_group if cluster.cfg.block_servers else ()
        async with open_dlm(node.endpoint, node.membership, servers,
                            answer_timeout=cluster.cfg.answer_timeout) as dlm:
            placement = Placement(sb, cluster.cfg.node_ids)
            ls = await dlm.new_lockspace("fs:" + sb.uuid_str, dir_hint=placement.dir_hint)
            wire_proxy(dev, sb, ls, node.membership)
            log.info("node %d: joining cluster %s; waiting for quorum", cluster.node_id,
                     cluster.cfg.name)
            await wait_running(ls)
            log.info("node %d: in the cluster (generation %d, members %s)", cluster.node_id,
                     ls.statistics().generation, list(ls.statistics().members))
            shown: dict = {}        # what `clusterfs status` adds, once the fs is up
            control = ControlServer(ls, node, extra_status=lambda: {
                "mount": _mount_status(mountpoint, dev.path, **shown),
                "fencing": fencing.statistics(),
                "device": dev.statistics(),
                "collector": COLLECTOR.statistics(),
                "stalls": STALLS.statistics(),
                "block_server": server.statistics() if server else None,
                "failover": failover.report(),
                "memory": memory_report()} if shown else {},
                asked_status=lambda: _slot_holders(ls, sb))
            path = cluster.control or default_control_path(cluster.node_id)
            os.makedirs(os.path.dirname(path), exist_ok=True)

            def side_tasks(nursery: trio.Nursery, fs, slot: int) -> None:
                recovery = JournalRecovery(ls, dev, sb, slot)
                recovery.on_recovered = fs.kick_orphans
                fs.glocks.gate = recovery
                shown.update(fs=fs, slot=slot, recovery=recovery)
                fencing.attach(fs)
                nursery.start_soon(recovery.run, node.membership)
                nursery.start_soon(control.serve, path)
                nursery.start_soon(_watch_expelled, ls, fs)
                nursery.start_soon(_leave_when_withdrawn, ls, fs, slot,
                                   lambda: fencing.fired is not None)

            async def on_slot(slot: int) -> None:
                await fencing.claim_slot(slot, node.nursery)

            try:
                await _serve_fs(ls, dev, sb, mountpoint, opts, ready, pool, side_tasks,
                                on_slot, home_group=placement.home_group(cluster.node_id),
                                on_mounted=fencing.record_mount)
            except NoJournalSlot:
                # it wrote nothing and holds no lock: the others need not fence it
                from clusterfs.node.leave import leave_unmounted

                await leave_unmounted(node.membership, ls, 2 * cluster.cfg.failure_timeout,
                                      disk)
                raise
            if shown:     # it served, wrote back and gave its locks up: say goodbye
                from clusterfs.node.leave import leave_cleanly

                await leave_cleanly(node.membership, ls, dev, sb, shown["slot"],
                                    shown["fs"].txn.withdrawn, 2 * cluster.cfg.failure_timeout,
                                    disk)


def _mount_status(mountpoint: str, device: str, fs, slot: int, recovery) -> dict:
    return {"mountpoint": mountpoint, "device": device, "slot": slot,
            "withdrawn": fs.txn.withdrawn, "glock_stats": fs.glocks.statistics(),
            "journal_stats": fs.txn.journal_stats(),
            "min_hold": fs.glocks.min_hold,
            "glocks": fs.glocks.dump(), "locks_usable": recovery.is_open(),
            "last_recovery": recovery.last}


SLOT_QUERY_TIMEOUT = 1.0     # seconds `clusterfs status` waits for the slots' answers


async def _slot_holders(ls, sb: Superblock) -> dict:
    """Who holds each journal slot's lock in EX (a mounted node, or a survivor replaying
    a dead node's journal), asked of the masters, all at once: `clusterfs status`
    shows every node's slot, not only this one's. While locking is stopped (a view
    change, a recovery) or a master does not answer within SLOT_QUERY_TIMEOUT, the
    slot is shown as unknown: status must answer at once then too."""
    import trio

    holders: dict[int, int | str | None] = dict.fromkeys(range(sb.journal_count), "unknown")

    async def ask(slot: int) -> None:
        try:
            queues = await ls.dump_resource(("journal", slot))
        except ClusterFSError:
            return
        holders[slot] = next((lk["node"] for lk in queues["locks"]
                              if lk["queue"] == "granted" and lk["grmode"] == "EX"), None)

    if ls.statistics().running:
        with trio.move_on_after(SLOT_QUERY_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for slot in holders:
                    nursery.start_soon(ask, slot)
    return {"slots": [{"slot": s, "holder": h} for s, h in holders.items()]}


async def _watch_expelled(ls, fs) -> None:
    """Told we were expelled (cut off, then seen again): stop writing at once."""
    import trio

    while not ls.ls_expelled:
        await trio.sleep(0.2)
    fs.txn.withdraw("expelled from the cluster; unmount and mount again")


async def _leave_when_withdrawn(ls, fs, slot: int, counted_out: Callable[[], bool]) -> None:
    """Withdrawn here (a write failed, corruption found) while the cluster still counts
    on us: our journal may hold committed changes that never reached home, under locks
    other nodes wait for. Giving those locks back would hand them stale blocks; keeping
    them would hang the cluster. So leave as a failed node does: end the mount without
    giving any lock back, and the others fence us and replay our journal. (Not when the
    cluster has counted us out already: expelled, or fenced; then the mount stays and
    answers EIO until unmounted.)"""
    import pyfuse3
    import trio

    while fs.txn.withdrawn is None or ls.ls_expelled or counted_out():
        await trio.sleep(0.2)
    log.error("withdrawn while in the cluster: unmounting without giving locks back, so "
              "the other nodes replay journal %d (restart this node once it is fenced)",
              slot)
    pyfuse3.terminate()


async def claim_journal(locks, dev, sb, clustered: bool,
                        on_slot: Callable[[int], Awaitable[None]] | None = None
                        ) -> tuple[int, list]:
    """Claim a journal slot and replay what must be replayed (see the module doc);
    the slot and the locks to keep until unmount. on_slot(slot) runs right after the
    slot is ours and before any replay writes (fencing claims its pill slot there)."""
    import trio

    from clusterfs.dlm.interface import Mode
    from clusterfs.errors import WouldBlock

    if not clustered:
        slot, slot_lock = await _claim_slot(locks, dev, sb)
        # Alone on this device (flock): no other node can be using any journal.
        for s in range(sb.journal_count):
            await _replay(dev, sb, s)
        return slot, [slot_lock]
    gate = await locks.lock(("mount",), Mode.EX)
    try:
        try:
            live = await locks.lock(("live",), Mode.EX, try_=True)
            first = True
        except WouldBlock:
            live = await locks.lock(("live",), Mode.PR)
            first = False
        try:
            slot, slot_lock = await _claim_slot(locks, dev, sb)
        except NoJournalSlot:
            # hold nothing: a node refused here leaves as cleanly as an unmount does
            with trio.CancelScope(shield=True):
                await locks.unlock(live)
            raise
        if on_slot is not None:
            await on_slot(slot)
        if first:
            log.info("first node to mount %s: replaying every dirty journal", dev.path)
            for s in range(sb.journal_count):
                if s == slot:
                    await _replay(dev, sb, s)
                    continue
                other = await locks.lock(("journal", s), Mode.EX)   # nobody else is live
                try:
                    await _replay(dev, sb, s)
                finally:
                    await locks.unlock(other)
            await locks.convert(live, Mode.PR)
        else:
            await _replay(dev, sb, slot)
        return slot, [slot_lock, live]
    finally:
        await locks.unlock(gate)


async def _claim_slot(locks, dev, sb):
    """The first free journal slot, a clean one if any is free (its lock held EX)."""
    import trio

    from clusterfs.dlm.interface import Mode
    from clusterfs.errors import WouldBlock
    from clusterfs.format.journal import JF_CLEAN, decode_jhead

    free = []
    for _attempt in range(SLOT_ATTEMPTS):
        for s in range(sb.journal_count):
            try:
                free.append((s, await locks.lock(("journal", s), Mode.EX, try_=True)))
            except WouldBlock:
                continue
        if free:
            break
        # a survivor may hold a free slot's lock for a moment (journal recovery, or
        # taking over its orphan list): look again before calling the device full
        await trio.sleep(SLOT_RETRY_DELAY)
    if not free:
        raise NoJournalSlot(f"{dev.path}: all {sb.journal_count} journal slots are in use "
                         "(one per mounted node; `mkfs.clusterfs -j N` formats room for N)")

    def clean(item) -> bool:
        start = sb.journal_location(item[0])
        return bool(decode_jhead(dev.read(start), start).flags & JF_CLEAN)

    chosen = await workers.run(
        lambda: next((item for item in free if clean(item)), free[0]))
    for item in free:
        if item is not chosen:
            await locks.unlock(item[1])
    return chosen


async def _replay(dev, sb, slot: int) -> None:
    """Replay journal `slot` in a worker thread: the event loop runs membership and the
    DLM meanwhile, and a full journal on a slow disk takes seconds (not abandoned when
    cancelled: a replay runs to its end)."""
    from clusterfs.journal.log import replay_journal

    started = time.monotonic()
    try:
        result = await workers.run(replay_journal, dev, sb, slot)
    except ClusterFSError as exc:
        raise MountError(f"{dev.path}: journal {slot}: {exc}") from None
    if result.transactions:
        log.info("journal %d: replayed %d transactions in %.2f s", slot,
                 result.transactions, time.monotonic() - started)


async def _serve_fs(locks, dev, sb, mountpoint: str, opts: Options, ready: Callable[[], None],
                    pool, side_tasks: Callable | None = None,
                    on_slot: Callable[[int], Awaitable[None]] | None = None,
                    home_group: int | None = None,
                    on_mounted: Callable[[str], None] | None = None) -> None:
    import pyfuse3
    import trio

    from clusterfs.cache.blocks import Blocks
    from clusterfs.cache.glock import MAX_CACHED, MIN_HOLD, GlockManager
    from clusterfs.cache.transaction import TransactionManager
    from clusterfs.fs.filesystem import FileSystem
    from clusterfs.fuse.operations import Operations
    from clusterfs.journal.log import Journal

    clustered = side_tasks is not None
    if clustered and not dev.bypass_page_cache():
        log.info("%s refuses O_DIRECT: metadata goes through this host's page cache, "
                 "which is coherent only between nodes on this host", dev.path)
    slot, held = await claim_journal(locks, dev, sb, clustered, on_slot)

    def open_journal() -> Journal:
        journal = Journal(dev, sb, slot, pool)
        journal.open()               # its head read, written dirty and flushed
        return journal

    journal = await workers.run(open_journal)
    txn = TransactionManager(journal)
    glocks = GlockManager(locks, min_hold=MIN_HOLD if opts.min_hold is None else opts.min_hold,
                          max_hold=opts.max_hold,
                          max_cached=MAX_CACHED if opts.max_glocks is None else opts.max_glocks)
    fs = FileSystem(Blocks(dev, journal, sb), sb, glocks, txn, clustered=clustered,
                    home_group=home_group)
    await fs.load()
    ops = Operations(fs)
    fsname = dev.path if "://" in dev.path else os.path.abspath(dev.path)
    options = set(pyfuse3.default_options) | {
        # libfuse splits its options at commas: a multi-portal iSCSI URL has some
        "fsname=" + fsname.replace("\\", "\\\\").replace(",", "\\,"),
        "subtype=clusterfs", "allow_other",
        *opts.extra}
    try:
        pyfuse3.init(ops, mountpoint, options)
    except RuntimeError as exc:
        raise MountError(f"{mountpoint}: cannot mount: {exc}") from None
    log.info("mounted %s on %s (journal slot %d, uuid %s)", dev.path, mountpoint, slot,
             sb.uuid_str)
    mountrecord.write(mountpoint)
    if on_mounted is not None:
        on_mounted(mountpoint)          # (fencing: the process agent's mount record)
    ready()
    unmounted_by_us = False
    shut = False
    try:
        async with trio.open_nursery() as nursery:
            glocks.start(nursery)
            if clustered:
                txn.idle_writeback = True
                glocks.share_when_idle.add("inode")
                nursery.start_soon(glocks.run_idle_sharing, txn.quiet)
            nursery.start_soon(txn.run_timer)
            nursery.start_soon(keep_reserve_topped_up)
            nursery.start_soon(STALLS.run)
            nursery.start_soon(glocks.run_shrinker)
            nursery.start_soon(fs.run_orphan_sweeper)
            nursery.start_soon(fs.run_list_ahead)
            if side_tasks is not None:
                side_tasks(nursery, fs, slot)

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
            # shut down while the side tasks still run: freeing unlinked inodes takes
            # locks, which another node's departure can hold behind journal recovery,
            # and other nodes may ask for our locks meanwhile
            await _shutdown(fs)
            shut = True
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if not shut:
                await _shutdown(fs)
            if not (clustered and txn.withdrawn):   # else: leave as failed (above)
                for lock in held:
                    await locks.unlock(lock)
        ops.close()
        # a withdrawn cluster node ended its own mount (_leave_when_withdrawn)
        pyfuse3.close(unmount=unmounted_by_us or bool(clustered and txn.withdrawn))
        mountrecord.remove(mountpoint)
        log.info("unmounted %s; journal clean: %s", mountpoint, not txn.withdrawn)


async def _shutdown(fs) -> None:
    """Write back and give the journal and locks up (shielded: an unmount must finish)."""
    import trio

    with trio.CancelScope(shield=True):
        try:
            await fs.shutdown()
        except ClusterFSError as exc:   # a withdrawn fs (a dead disk): said already
            log.error("unmount: could not write back: %s", exc)


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
    """Log to stderr (a foreground mount; a daemon's stderr is its log by then)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TracebackFormatter(
        "clusterfs[%(process)d] %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, handlers=[handler])


def _setup_daemon_logging(path: str | None, debug: bool) -> int | None:
    """A daemonized mount logs to its log from its first line, not to the terminal
    that ran `clusterfs mount` (which printed its start-up lines after the prompt):
    syslog, or the --log file (or FALLBACK_LOG), which then also takes stderr. What
    the user must see of a failed start comes through the pipe, one line. Returns the
    log file's fd (None: syslog), for stdout and stderr once the mount is live."""
    logfd = _daemon_log(path)
    if logfd is not None:
        os.dup2(logfd, 2)
        _setup_logging(debug)
    else:
        logging.getLogger().setLevel(logging.DEBUG if debug else logging.INFO)
    return logfd


SYSLOG_SOCKET = "/dev/log"
FALLBACK_LOG = "/var/log/clusterfs/mount.log"


def _daemon_log(path: str | None) -> int | None:
    """Where a daemonized mount logs: the --log file, else syslog (ident clusterfs),
    else FALLBACK_LOG when the host runs no syslog. Returns the fd for stdout and
    stderr when logging goes to a file (None: syslog)."""
    import logging.handlers

    if path is None and os.path.exists(SYSLOG_SOCKET):
        try:
            handler: logging.Handler = logging.handlers.SysLogHandler(
                SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        except OSError:
            handler = None  # type: ignore[assignment]
        if handler is not None:
            handler.setFormatter(TracebackFormatter(
                "clusterfs[%(process)d]: %(levelname)s %(name)s: %(message)s"))
            root = logging.getLogger()
            for old in list(root.handlers):
                root.removeHandler(old)
            root.addHandler(handler)
            return None
    if path is None:
        path = FALLBACK_LOG
        os.makedirs(os.path.dirname(path), exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


def _tune_collector() -> None:
    """What start-up made (modules, config, the preloaded failover path) lives as long
    as the mount: frozen out of the collector's way, so a full collection (a pause of
    the whole event loop) walks only what the mount made since. And a young collection
    every GC_YOUNG net allocations, not Python's 700: a mount caches tens of thousands
    of long-lived objects (locks, inodes), and each young collection found almost
    nothing to free (in-process creates, three runs each: 4663-6070 creates/s with
    700, 5214-6594 with 10 000)."""
    gc.freeze()
    _, middle, _old = gc.get_threshold()
    # a full collection every `middle` middle ones (not 10): each walks only what
    # survived since the last, which the watch then freezes (node/collector.py)
    gc.set_threshold(GC_YOUNG, middle, GC_OLD)
    COLLECTOR.install()


def _mount(args: argparse.Namespace, ready: Callable[[], None],
           setup_logging: Callable[[bool], object] = _setup_logging) -> int:
    if os.environ.get(AUDIT_ENV) == "1":
        failover.install_audit()        # first: every later event is counted
    import trio

    def live() -> None:
        ready()
        failover.arm_audit()            # what starting the mount did is not failover
        _tune_collector()

    opts = parse_options(args.options)
    setup_logging(opts.debug)
    cluster = cluster_args(args)
    nice = opts.nice if opts.nice is not None else (CLUSTER_NICE if cluster else None)
    if nice is not None:
        _set_priority(nice)              # first: the threads started later inherit it
    if not os.path.isdir(args.mountpoint):
        raise MountError(f"{args.mountpoint}: mountpoint is not a directory")
    opener = None
    if cluster is not None:
        cluster.prepare()
        cluster.device = args.device
        opener = cluster_opener(cluster)
    dev, sb = open_device(args.device, clustered=cluster is not None, opener=opener)
    try:
        check_cluster_name(args.device, sb, cluster.cfg.name if cluster else None,
                           args.no_cluster_check)
        # resolved now: once mounted, this process may not look at its mountpoint
        try:
            trio.run(serve, dev, sb, os.path.realpath(args.mountpoint), opts, live, cluster)
        except BaseExceptionGroup as group:
            reason = _one_reason(group)
            if reason is None:
                raise
            raise reason from None
        except ClusterFSError as exc:
            raise MountError(str(exc)) from None
    finally:
        dev.close()
    return 0


def _one_reason(group: BaseExceptionGroup) -> MountError | None:
    """The one line a mount that failed says: its first MountError or clusterfs error,
    out of the groups trio's nurseries wrapped it in (else None: the group as it is)."""
    found = first_in_group(group, MountError) or first_in_group(group, ClusterFSError)
    if found is None or isinstance(found, MountError):
        return found
    return MountError(str(found))


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

    logfds: list[int | None] = []

    def setup_logging(debug: bool) -> None:
        logfds.append(_setup_daemon_logging(args.log, debug))

    def ready() -> None:
        os.write(wfd, b"ok")
        os.close(wfd)
        logfd = logfds[0] if logfds else None
        os.dup2(logfd if logfd is not None else devnull, 1)
        os.dup2(logfd if logfd is not None else devnull, 2)

    try:
        code = _mount(args, ready, setup_logging)
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
