"""`clusterfs lockd --config FILE --node-id N`: one node of the lock service alone.

Runs the cluster stack (TCP comms + membership) and the DLM with one lockspace
("default"), and serves a control socket (a unix stream socket, default
/run/clusterfs/lockd-<node>.sock, or --control PATH).

Fencing: with --fence-pid-dir DIR, lockd records itself in DIR/node<ID>.pid
(pid, start time and the incarnation it joins with) before it joins, leaves the
file when it stops, and fences a dead node by SIGKILL of the process that node's
file names, unless the file names a later incarnation (the node was restarted:
the dead one is gone) (clusterfs.fence.agent.ProcessAgent). Without it, fencing
is the agent the config's [fencing] table names (clusterfs.fence.factory.make_agent:
noop by default; "process" with fencing.pid_dir does what --fence-pid-dir does;
"scsi-pr" logs in to every configured LUN and registers this node's key there;
"poison-pill" opens fencing.device), built before the node joins; a failure stops
lockd at start with one line (exit 2).

Generations: lockd keeps the highest generation it has promised in
DIR/node<ID>.generation (--state-dir DIR, default /var/lib/clusterfs, created if
missing; a given DIR must exist), so that after a restart, even of the whole
cluster, every new view has a higher generation than any before
(clusterfs.membership.generation_record). A missing or unwritable DIR or a
corrupt record stops lockd at start with one line (exit 2).

The failover path (clusterfs.failover; docs/recovery.md): before it joins, lockd
takes the memory reserve a mount takes (node/memory.py: locked memory, a held heap,
arenas and worker threads for the path) and loads every module that path may import
(node/prepare.py `preload`, which also bounds the stacks of threads started later),
and it marks "lock recovery" from a
view that removed a node (not a clean leaver) until its lockspace runs again in
that view or a later one. The process agent holds each member's process from the
moment it joins (so a fence opens no pid file; CLUSTERFS_LOCKD_FENCE_BY_RECORD=1 turns
that off, for tests of a fence the record cannot prove). With CLUSTERFS_AUDIT_FAILOVER=1 in
its environment it audits that path as a mount does, from the moment its control
socket listens: `status` then has a "failover" entry (what was recorded during a
phase).

Control protocol: one JSON object per line each way. A request is
{"op": ..., ...}; the answer is {"ok": true, ...} or
{"ok": false, "error": "<exception class>", "errno": N, "message": "..."}.
Requests on one connection run one after another (a "lock" that waits blocks
that connection only); lock handles belong to their connection, and closing
the connection unlocks whatever it still holds.

  status                          node, generation, members, quorum, running, stats
  tasks                           every trio task and the frames it waits in
  wait_running   [timeout]        until locking runs (first recovery done)
  locks          name             the resource's grant/convert/wait queues (asked of its master)
  lock           name mode [range] [try] [timeout] [lvb_hex]
                                  -> handle, mode, lvb (hex), lvb_valid
  convert        handle mode [try] [timeout]
  unlock         handle [lvb]     lvb (hex) is stored if the lock is PW/EX
  bench          kind=local|remote n name   -> ops_per_s | p50_us, p99_us
  pingpong       name seconds     hold EX until someone waits, release, ask again
  quit                            stop the daemon

`name` is a list (["inode", 7]) or a string ("inode:7"); modes are NL..EX.
On start, one line {"event": "ready", "node": N, "pid": P, "control": PATH}
is printed on stdout once the control socket listens.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from clusterfs import failover
from clusterfs.dlm.interface import LVB_SIZE, Lock, Mode
from clusterfs.errors import (
    ClusterFSError,
    ConfigError,
    FenceError,
    ListenError,
    StateError,
    first_in_group,
)
from clusterfs.membership.generation_record import GenerationFile, GenerationRecord

if TYPE_CHECKING:
    # The lockspace (and the native lock table under it) loads only when lockd
    # serves, so `clusterfs status`/`locks`, which use ControlClient from here,
    # work even where the native module is broken.
    from clusterfs.dlm.lockspace import Lockspace

log = logging.getLogger("clusterfs.lockd")

DEFAULT_CONTROL_DIR = "/run/clusterfs"
DEFAULT_STATE_DIR = "/var/lib/clusterfs"
EXIT_EXPELLED = 3


def default_control_path(node_id: int) -> str:
    return os.path.join(DEFAULT_CONTROL_DIR, f"lockd-{node_id}.sock")


def parse_name(name: Any) -> tuple[Any, ...]:
    if isinstance(name, str):
        return tuple(int(p) if p.isdigit() else p for p in name.split(":"))
    return tuple(name)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="cluster configuration (TOML)")
    p.add_argument("--node-id", type=int, required=True)
    p.add_argument("--control", help="control socket path "
                   f"(default {DEFAULT_CONTROL_DIR}/lockd-<node>.sock)")
    p.add_argument("--fence-pid-dir", metavar="DIR",
                   help="dev clusters on one host: record this process in DIR/node<ID>.pid "
                   "and fence dead nodes by SIGKILL of the process their file names "
                   "(without it, fencing is a no-op that proves nothing)")
    p.add_argument("--state-dir", metavar="DIR",
                   help="where this node keeps the highest generation it promised, so "
                   "generations keep growing across restarts (default "
                   f"{DEFAULT_STATE_DIR}, created if missing; a given DIR must exist)")
    p.add_argument("-v", "--verbose", action="store_true")


AUDIT_ENV = "CLUSTERFS_AUDIT_FAILOVER"    # =1: audit the failover path (module doc)
LOCK_RECOVERY = "lock recovery"          # clusterfs.failover phase marked here
# =1: the process agent reads a dead node's pid record when it fences it, not when the
# node joins (so a record removed meanwhile leaves its fence unproven: tests of that)
FENCE_BY_RECORD_ENV = "CLUSTERFS_LOCKD_FENCE_BY_RECORD"


def run(args: argparse.Namespace) -> int:
    if os.environ.get(AUDIT_ENV) == "1":
        failover.install_audit()        # first: every later event is counted
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=f"%(asctime)s lockd{args.node_id} %(name)s: %(message)s")
    control = args.control or default_control_path(args.node_id)
    try:
        record = open_generation_record(args.state_dir, args.node_id)
    except StateError as exc:
        print(f"clusterfs lockd: {exc}", file=sys.stderr)
        return 2
    # Written before we join membership: from the moment the others may count
    # on us, they can also fence us. The record names the incarnation we join
    # with, so a fence of an earlier life of this node never kills this one.
    from clusterfs.membership.service import new_incarnation

    incarnation = new_incarnation()
    from clusterfs.config import load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"clusterfs lockd: config error: {exc}", file=sys.stderr)
        return 2
    pid_dir = args.fence_pid_dir
    if pid_dir is None and cfg.fencing.agent == "process":
        pid_dir = cfg.fencing.pid_dir
    try:
        claim_pid_file(pid_dir, args.node_id, incarnation)
    except FenceError as exc:         # another live lockd holds this node id
        print(f"clusterfs lockd: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"clusterfs lockd: --fence-pid-dir {pid_dir}: {exc.strerror}",
              file=sys.stderr)
        return 2
    # The file stays after we exit, clean or not: the others notice only that we went
    # silent, and fence us by this record (a pid that is gone counts as fenced at once).
    # Removing it would leave them no proof, and their recovery would wait.
    try:
        agent = _fence_agent(cfg, args.node_id, args.fence_pid_dir)
    except ClusterFSError as exc:
        print(f"clusterfs lockd: fencing: {exc}", file=sys.stderr)
        return 2
    from clusterfs.node.memory import reserve_memory

    reserve_memory()                # locked memory, heap, arenas, workers (node/memory.py)
    return _run_service(args, control, record, incarnation, cfg, agent)


def _fence_agent(cfg: Any, node_id: int, fence_pid_dir: str | None) -> Any:
    """The fencing agent, built (and its devices opened) at start-up: the process agent
    with --fence-pid-dir, else what [fencing] names."""
    from clusterfs.fence.agent import ProcessAgent
    from clusterfs.fence.factory import make_agent
    from clusterfs.storage import open_block_device

    if fence_pid_dir:
        return ProcessAgent(pid_dir=fence_pid_dir)
    return make_agent(cfg, node_id, open_device=open_block_device)


def open_generation_record(state_dir: str | None, node_id: int) -> GenerationFile:
    """The node's generation record; StateError (one line) if it cannot be used."""
    if state_dir is None:
        state_dir = DEFAULT_STATE_DIR
        try:
            os.makedirs(state_dir, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create state dir {state_dir}: {exc.strerror}") from exc
    return GenerationFile(state_dir, node_id)


def claim_pid_file(pid_dir: str | None, node_id: int, incarnation: int) -> None:
    if not pid_dir:
        return
    from clusterfs.fence.pidfile import write_pid_file

    write_pid_file(pid_dir, node_id, incarnation)


def _run_service(args: argparse.Namespace, control: str, record: GenerationFile,
                 incarnation: int, cfg: Any = None, agent: Any = None) -> int:
    """Run lockd; the exit status. Errors leaving trio's nurseries may come grouped
    (trio >= 0.25), hence except*."""
    code = 0
    expelled = False
    try:
        expelled = trio.run(serve, cfg if cfg is not None else args.config, args.node_id,
                            control, args.fence_pid_dir, record, incarnation, agent)
    except* ConfigError as group:
        print(f"clusterfs lockd: config error: {first_in_group(group, ConfigError)}",
              file=sys.stderr)
        code = 2
    except* ListenError as group:
        print(f"clusterfs lockd: {first_in_group(group, ListenError)}", file=sys.stderr)
        code = 1
    except* KeyboardInterrupt:
        code = 130
    if expelled:
        print("clusterfs lockd: expelled from the cluster; restart clean", file=sys.stderr)
        code = EXIT_EXPELLED
    return code


async def serve(config: Any, node_id: int, control: str, fence_pid_dir: str | None,
                generation_record: GenerationRecord | None = None,
                incarnation: int | None = None, agent: Any = None) -> bool:
    """Serve until told to quit (False) or expelled from the cluster (True). Expulsion is
    a return value, not an exception: it needs no unwrapping from trio's groups.
    `config`: a ClusterConfig or the path of one; `agent`: the fencing agent (default:
    the process agent with fence_pid_dir, else the noop agent)."""
    from clusterfs.dlm.lockspace import open_dlm
    from clusterfs.fence.agent import ProcessAgent
    from clusterfs.node.cluster import open_cluster_node
    from clusterfs.node.memory import keep_reserve_topped_up
    from clusterfs.node.prepare import preload

    if agent is None and fence_pid_dir:
        agent = ProcessAgent(pid_dir=fence_pid_dir)
    Path(control).parent.mkdir(parents=True, exist_ok=True)
    preload()                      # the failover path imports nothing (node/prepare.py)
    async with open_cluster_node(config, node_id, fence_agent=agent, incarnation=incarnation,
                                 generation_record=generation_record) as node:
        async with open_dlm(node.endpoint, node.membership,
                            answer_timeout=node.config.answer_timeout) as dlm:
            ls = await dlm.new_lockspace("default")
            server = ControlServer(ls, node, extra_status=_failover_status)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_mark_lock_recovery, node.membership, ls)
                nursery.start_soon(keep_reserve_topped_up)
                if (isinstance(agent, ProcessAgent)
                        and os.environ.get(FENCE_BY_RECORD_ENV) != "1"):
                    nursery.start_soon(_hold_members, node.membership, agent, node_id)
                failover.arm_audit()        # what starting lockd did is not failover
                await server.serve(control)
                nursery.cancel_scope.cancel()
        if not server.expelled:
            # told to quit: a clean leave, so the others drop us in a new view without
            # fencing (a lock daemon writes no shared disk; its locks go in their DLM
            # recovery). Without it our closing port reads as a death: they fence us
            # at once, a SIGKILL while we are still on our way out.
            await node.membership.leave(2 * node.config.failure_timeout)
    return server.expelled


def _failover_status() -> dict[str, Any]:
    return {"failover": failover.report()}


async def _hold_members(membership: Any, agent: Any, node_id: int) -> None:
    """As nodes come into our view, have the process agent hold each one's process
    (its pid record read, a pidfd opened) now, so that fencing it later opens no
    file (the failover audit found that read at fence time; a mount does the same:
    node/fencing.py, MountFencing.hold_members)."""
    from clusterfs.membership.view import ViewChange

    async for ev in membership.subscribe():
        if isinstance(ev, ViewChange):
            members = membership.installed_incarnations.get(ev.view.generation, {})
            for member, incarnation in sorted(members.items()):
                if member != node_id:
                    agent.expect(member, incarnation)


async def _mark_lock_recovery(membership: Any, ls: Lockspace) -> None:
    """The "lock recovery" phase: from a view that removed a node that did not leave
    cleanly until the lockspace runs in that view or a later one (its DLM recovery
    done: the removed node fenced first, membership's own phase before that)."""
    from clusterfs.membership.view import ViewChange

    async for ev in membership.subscribe():
        if not isinstance(ev, ViewChange) or not ev.left - ev.clean:
            continue
        failover.enter(LOCK_RECOVERY)
        try:
            while not (ls.ls_running and ls.statistics().generation >= ev.view.generation):
                await trio.sleep(0.01)
        finally:
            failover.leave(LOCK_RECOVERY)    # (also when the lockd stops meanwhile)


class ControlServer:
    """The control socket of a lockd, or of a cluster mount (which adds what its
    `extra_status` returns, e.g. its glocks, and what `asked_status` finds out by
    asking the cluster, e.g. who holds each journal slot, to every status answer)."""

    def __init__(self, ls: Lockspace, node: Any,
                 extra_status: Callable[[], dict[str, Any]] | None = None,
                 asked_status: Callable[[], Awaitable[dict[str, Any]]] | None = None
                 ) -> None:
        self.ls = ls
        self.node = node
        self.extra_status = extra_status
        self.asked_status = asked_status
        self.stop = trio.Event()
        self.expelled = False

    async def serve(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(path)
        sock.listen(64)
        listener = trio.SocketListener(sock)
        print(json.dumps({"event": "ready", "node": self.ls.ls_node, "pid": os.getpid(),
                          "control": path}), flush=True)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.serve_listeners, self._client, [listener])
                nursery.start_soon(self._watch_expelled)
                await self.stop.wait()
                nursery.cancel_scope.cancel()
        finally:
            try:
                os.unlink(path)
            except OSError:
                pass

    async def _watch_expelled(self) -> None:
        """An expelled node must restart clean: stop serving (exit status 3)."""
        while not self.ls.ls_expelled:
            await trio.sleep(0.2)
        log.error("lockd %d: expelled from the cluster; exiting", self.ls.ls_node)
        self.expelled = True
        self.stop.set()

    async def _client(self, stream: trio.SocketStream) -> None:
        session = _Session(self)
        buf = b""
        try:
            async with stream:
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        if not line.strip():
                            continue
                        reply = await session.handle(line)
                        await stream.send_all(json.dumps(reply).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await session.release_all()


class _Session:
    """One control connection: its lock handles."""

    def __init__(self, server: ControlServer) -> None:
        self.server = server
        self.ls = server.ls
        self.locks: dict[int, Lock] = {}
        self.next_handle = 1

    async def release_all(self) -> None:
        with trio.CancelScope(shield=True):
            for lk in list(self.locks.values()):
                try:
                    await self.ls.unlock(lk)
                except ClusterFSError:
                    pass
            self.locks.clear()

    async def handle(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
            op = req.get("op")
            fn: Callable[[dict[str, Any]], Any] | None = getattr(self, f"op_{op}", None)
            if fn is None:
                return {"ok": False, "error": "BadRequest", "errno": 22,
                        "message": f"unknown op {op!r}"}
            result = await fn(req)
            return {"ok": True, **(result or {})}
        except trio.TooSlowError:
            return {"ok": False, "error": "Timeout", "errno": 110, "message": "timed out"}
        except ClusterFSError as exc:
            return {"ok": False, "error": type(exc).__name__, "errno": exc.errno,
                    "message": str(exc)}
        except (ValueError, KeyError, TypeError) as exc:
            return {"ok": False, "error": "BadRequest", "errno": 22, "message": repr(exc)}

    def _lock_reply(self, handle: int, lk: Lock) -> dict[str, Any]:
        lkb = lk.extra.get("lkb")
        return {"handle": handle, "mode": lk.mode.name, "lvb": lk.lvb.hex(),
                "lvb_valid": lk.lvb_valid, "lkid": lkb.lkb_id if lkb is not None else None}

    # -- ops ---------------------------------------------------------------------
    async def op_status(self, req: dict[str, Any]) -> dict[str, Any]:
        st = self.ls.statistics()
        out: dict[str, Any] = {"node": st.node, "generation": st.generation,
                               "members": list(st.members), "quorate": st.quorate,
                               "running": st.running, "lockspace": st.as_dict(),
                               "dropped_sends": self.ls.ls_dlm.dropped_sends,
                               "membership_generation":
                                   self.server.node.membership.view.generation,
                               "detection": self.server.node.detection()}
        if self.ls.ls_servers:           # proxy I/O: what each held lock's grant named
            out["preferred_servers"] = self.ls.preferred_servers()
        if self.server.extra_status is not None:
            out.update(self.server.extra_status())
        if self.server.asked_status is not None:
            out.update(await self.server.asked_status())
        return out

    async def op_tasks(self, req: dict[str, Any]) -> dict[str, Any]:
        from clusterfs.node.taskdump import describe_tasks

        return {"tasks": describe_tasks()}

    async def op_wait_running(self, req: dict[str, Any]) -> dict[str, Any]:
        with trio.fail_after(float(req.get("timeout", 30))):
            while not self.ls.ls_running:
                await trio.sleep(0.01)
        return {"generation": self.ls.statistics().generation}

    async def op_locks(self, req: dict[str, Any]) -> dict[str, Any]:
        with trio.fail_after(float(req.get("timeout", 10))):
            return await self.ls.dump_resource(parse_name(req["name"]))

    async def op_lock(self, req: dict[str, Any]) -> dict[str, Any]:
        name = parse_name(req["name"])
        mode = Mode[req["mode"]]
        rng = tuple(req.get("range", (0, 2**64 - 1)))
        timeout = req.get("timeout")
        with trio.fail_after(float(timeout) if timeout is not None else float("inf")):
            lk = await self.ls.lock(name, mode, range=(int(rng[0]), int(rng[1])),
                                    try_=bool(req.get("try", False)))
        handle = self.next_handle
        self.next_handle += 1
        self.locks[handle] = lk
        return self._lock_reply(handle, lk)

    async def op_convert(self, req: dict[str, Any]) -> dict[str, Any]:
        handle = int(req["handle"])
        lk = self.locks[handle]
        if "lvb" in req:
            lk.lvb = bytes.fromhex(req["lvb"])[:LVB_SIZE]
        timeout = req.get("timeout")
        with trio.fail_after(float(timeout) if timeout is not None else float("inf")):
            await self.ls.convert(lk, Mode[req["mode"]], try_=bool(req.get("try", False)))
        return self._lock_reply(handle, lk)

    async def op_unlock(self, req: dict[str, Any]) -> dict[str, Any]:
        lk = self.locks.pop(int(req["handle"]))
        if "lvb" in req:
            lk.lvb = bytes.fromhex(req["lvb"])[:LVB_SIZE]
        await self.ls.unlock(lk)
        return {}

    async def op_bench(self, req: dict[str, Any]) -> dict[str, Any]:
        name = parse_name(req.get("name", ["bench", self.ls.ls_node]))
        n = int(req.get("n", 10000))
        if req.get("kind", "local") == "local":
            t0 = time.perf_counter()
            for _ in range(n):
                lk = await self.ls.lock(name, Mode.EX)
                await self.ls.unlock(lk)
            dt = time.perf_counter() - t0
            return {"n": n, "seconds": dt, "ops_per_s": n / dt}
        lat = []
        for _ in range(n):
            t0 = time.perf_counter()
            lk = await self.ls.lock(name, Mode.EX)
            lat.append(time.perf_counter() - t0)
            await self.ls.unlock(lk)
        lat.sort()
        return {"n": n, "p50_us": lat[len(lat) // 2] * 1e6,
                "p99_us": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e6}

    async def op_pingpong(self, req: dict[str, Any]) -> dict[str, Any]:
        name = parse_name(req.get("name", ["pingpong"]))
        deadline = trio.current_time() + float(req.get("seconds", 3))
        count = 0
        while trio.current_time() < deadline:
            wanted = trio.Event()
            lk = await self.ls.lock(name, Mode.EX, on_blocking=lambda _m, e=wanted: e.set())
            count += 1
            with trio.move_on_at(deadline):
                await wanted.wait()
            await self.ls.unlock(lk)
        return {"acquisitions": count}

    async def op_quit(self, req: dict[str, Any]) -> dict[str, Any]:
        self.server.stop.set()
        return {}


# -- clients -------------------------------------------------------------------------


class ControlClient:
    """A blocking client of the lockd control socket (tests, status, locks, bench)."""

    def __init__(self, path: str, timeout: float | None = 30) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self._buf = b""

    def call(self, op: str, **kw: Any) -> dict[str, Any]:
        self.sock.sendall(json.dumps({"op": op, **kw}).encode() + b"\n")
        while b"\n" not in self._buf:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("lockd closed the control connection")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncControlClient:
    """The same over trio (many concurrent clients in one test process)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buf = b""

    @classmethod
    async def connect(cls, path: str) -> AsyncControlClient:
        return cls(await trio.open_unix_socket(path))

    async def call(self, op: str, **kw: Any) -> dict[str, Any]:
        await self.stream.send_all(json.dumps({"op": op, **kw}).encode() + b"\n")
        while b"\n" not in self._buf:
            data = await self.stream.receive_some(65536)
            if not data:
                raise ConnectionError("lockd closed the control connection")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    async def aclose(self) -> None:
        await self.stream.aclose()
