"""BlockServer: a node with a direct path to the disk serves it to the rest of the
cluster (proxy I/O; the client side is storage/proxy.py, the protocol
storage/blockwire.py).

It runs in the node's mount process as a trio task, on the address the config
gives it (`[storage] servers`), with a device handle of its own (O_DIRECT, so its
reads and writes are the disk's, as the node's own are). Reads are served to any
node of the cluster that authenticates (a proxy node reads the superblock before
it joins). Writes and flushes are the dangerous part, and are refused:

- from a node that is not a member of this server's current view: a node removed
  from the view can no longer write through any server that has installed that
  view, which is how a node without a disk path of its own is fenced;
- with a generation older than the one in which that node (re)joined, as this
  server saw it: a request from a previous life of the node;
- when the request has waited longer than `lease` (half the proxy's io_timeout)
  between its arrival and the moment it would go to the disk: this server was
  stopped or starved meanwhile, and the proxy has given up on it and sent the
  write elsewhere; a late copy could overwrite something newer. (A server stopped
  for longer is removed from the view and fenced by the survivors.)
- when it reaches the disk after its `by` (storage/blockwire.py): the latest moment,
  on this server's clock, the proxy allows it to start, from the proxy's send time
  (so it counts the time the request sat in socket buffers, or unread behind a
  held event loop, which `lease` does not see) plus half the time the proxy waits
  for its reply. After that the proxy may have given up on this server and written
  the same bytes, and newer ones, through another;
- while this server is in quarantine: a thread of its own ticks every TICK
  seconds, and a gap longer than `lease` between two ticks means the whole
  process was stopped (SIGSTOP, a VM pause) or starved; requests sent to it
  before or during the stop may still sit in its socket buffers, and the proxy
  has re-sent them elsewhere since. So for io_timeout after such a gap every write
  and flush is refused (the proxy takes them elsewhere), and a write also checks
  the tick just before it goes to the disk;
- once this server was expelled;
- from a node this server was told to cut off (BLOCK_FENCE, `cut_off_node`), with a
  generation older than the view that removed it. A node without a path of its own
  has no SCSI registration to preempt: this is its fence. The member fencing it
  (storage/groupfence.py) tells every live server, and each answers only once no
  write or flush of that node is in flight here any more, so none lands after the
  fence is reported done. With `preempt`, the server also fences a node that has a
  path, through this node's own agent (`fence_disk_node`: a SCSI-3 PREEMPT), on
  behalf of a member that has no session on the LUN.

Requests are worked on side by side: a connection's reader reads each request as it
comes and hands it to a task of its own (at most CONN_WINDOW of a connection at once),
which answers when it is done, so replies may come in another order than their
requests (a proxy matches them by id, and never has two overlapping writes, or a
write and a read of the same bytes, in flight). Every device read, write and flush
runs on one of the server's own I/O threads (IO_THREADS, started with the server,
small stacks: none is started on the failover path, and a device that hangs
holds those threads, not the event loop nor the worker threads the rest of the
node uses); the event loop only reads, checks and answers frames. A write or
flush, once handed to an I/O thread, is waited for even if its connection goes:
a fence of its sender waits for it (`cut_off_node`).

A hung disk (docs/storage.md, "A server whose disk hangs"). A server alive whose disk hangs
would keep the proxies' newer writes held behind its stalled one (they may be sent
only once it answers, closes or is fenced) until their flushes give up. So the tick
thread also watches the device, as OCFS2's o2hb watches its own heartbeat write (a
write that has not completed within its timeout makes the node fence itself) and
SBD its slot reads (a watchdog it stops feeding): a device I/O under way longer
than `disk_timeout` (a read or write: a flush takes as long as what the device
has to write back; config `[storage] disk_timeout`, default half of
failure_timeout, at least io_timeout) means the disk hangs. The server then stops
serving (every request refused with the reason, so the proxies re-target) and
calls `on_disk_hung(why)`, which the mount wires to a self-fence
(node/storagegroup.py): the node stops, the survivors remove and fence it, and the
writes maybe in flight here settle by that fence. Not while it is the only live
server of the group (as o2hb does not fence a node whose region every node finds
hung): stopping would leave the proxies no path at all, and a disk that comes back
lets them go on. A stall of the whole process (the tick's gap) is not counted as
device time.

A promise the proxy counts on (storage/proxy.py, "Maybe in flight"): a connection
is closed here only once every request read from it is done with the device (its
requests' nursery waits for their shielded I/O before the stream is closed, for an
end of the requests, a broken frame and a stop alike). A proxy that gave up on a
write half-closes the connection and reads on: the reply, or else this close, tells
it the write can no longer land, so a newer write of the same bytes may go out.
Closing the connection does not stop a device write under way; nothing here does.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import outcome
import trio

from clusterfs import failover, workers
from clusterfs.config import ClusterConfig
from clusterfs.errors import ClusterFSError, FenceError, StorageError, WireError
from clusterfs.membership.view import ExpelledEvent, ViewChange
from clusterfs.storage import blockwire as bw
from clusterfs.wire import frame as wf
from clusterfs.wire.types import MsgType

log = logging.getLogger(__name__)

TICK = 0.05                  # seconds between the stall detector's ticks
IO_THREADS = 8               # device I/O threads: a proxy's whole window starts at once
CONN_WINDOW = 16             # requests of one connection worked on at once (the
                             # proxy sends at most proxy.WINDOW)

T = TypeVar("T")


class _Refused(ClusterFSError):
    """A request this server will not carry out (the reason goes back to the proxy)."""

    fenced = False


class _Fenced(_Refused):
    """The asker was fenced: every server refuses it for good (it must restart)."""

    fenced = True


class _Reader:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            data = await self.stream.receive_some(1 << 20)
            if not data:
                raise EOFError
            self.buf += data

    async def read(self) -> bytes:
        await self._fill(wf.LENGTH.size)
        (n,) = wf.LENGTH.unpack_from(self.buf)
        wf.check_length(n, bw.MAX_FRAME)
        await self._fill(wf.LENGTH.size + n)
        data = wf.take_frame(self.buf, bw.MAX_FRAME)
        assert data is not None                 # (all of it is in)
        return data


class _IOThreads:
    """The block server's own threads for device I/O (module doc)."""

    def __init__(self, count: int, name: str) -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # per thread: when its device call began, None when idle (the disk watch)
        self.started: list[float | None] = [None] * count
        self.threads = [failover.start_thread(lambda i=i: self._work(i), f"{name}-{i}")
                        for i in range(count)]

    def oldest(self) -> float | None:
        """When the longest device call still under way began (None: none is)."""
        return min((t for t in list(self.started) if t is not None), default=None)

    async def run(self, fn: Callable[..., T], *args: Any, watch: bool = True) -> T:
        """fn(*args) on one of the threads. Not cancellable: once handed over, the
        I/O is waited for (a fence counts on it). `watch`: its duration counts for
        the disk watch (`oldest`); a flush's does not (it grows with what the
        device has to write back, not with a hang)."""
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        result: list[outcome.Outcome] = []

        def deliver(out: outcome.Outcome) -> None:
            result.append(out)
            done.set()

        self._jobs.put((fn, args, token, deliver, watch))
        with trio.CancelScope(shield=True):
            await done.wait()
        return result[0].unwrap()

    def _work(self, i: int) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args, token, deliver, watch = job
            self.started[i] = time.monotonic() if watch else None
            try:
                out = outcome.capture(fn, *args)
            finally:
                self.started[i] = None
            try:
                token.run_sync_soon(deliver, out)
            except trio.RunFinishedError:
                pass                            # the server is gone: nobody waits

    def stop(self) -> None:
        for _ in self.threads:
            self._jobs.put(None)


class _Replies:
    """The sending half of one connection: replies, one at a time, numbered."""

    def __init__(self, stream: trio.SocketStream, skey: bytes, me: int) -> None:
        self.stream = stream
        self.skey = skey
        self.me = me
        self.out = bw.Sequencer()
        self.lock = trio.Lock()
        self.error: BaseException | None = None     # what ended the connection

    async def send(self, generation: int, body: dict[str, Any]) -> None:
        async with self.lock:
            await self.stream.send_all(wf.encode_prefixed(
                self.skey, MsgType.BLOCK_REPLY, self.me, generation, self.out.take(),
                {**body, "t": time.monotonic()}))


class BlockServer:
    """Serve `dev` (this node's own handle on the disk) to the cluster's proxies.

    `membership`: this node's (its `subscribe()` events tell who may write)."""

    def __init__(self, config: ClusterConfig, node_id: int, dev: Any, membership: Any, *,
                 lease: float | None = None) -> None:
        self.cfg = config
        self.node_id = node_id
        self.dev = dev
        self.membership = membership
        self.lease = lease if lease is not None else config.io_timeout / 2
        self.generation = 0
        self.joined_at: dict[int, int] = {}      # member -> generation it (re)joined in
        self.expelled = False
        self.stats = {"connections": 0, "reads": 0, "writes": 0, "flushes": 0,
                      "refused": 0, "errors": 0, "wire_errors": 0, "late": 0}
        self.last_refusal: str | None = None
        self.per_node: dict[int, int] = {}       # requests received, by the asking node
        self.cut_off: dict[int, int] = {}        # node -> generation of its fence here
        self._inflight: dict[int, int] = {}      # writes and flushes under way, by node
        self._io_done = trio.Event()             # set (and renewed) as each one ends
        # fences a node with a disk path on a member's behalf (its scsi-pr agent)
        self.fence_disk_node: Callable[[int, int], Awaitable[None]] | None = None
        self.quarantine = config.io_timeout
        self.ticked_at = time.monotonic()
        self.quiet_until = 0.0                   # writes refused until then (a stall)
        self.stalls = 0
        self._stop = threading.Event()
        self._io_threads: _IOThreads | None = None
        self.most_in_flight = 0                  # requests of one connection at once
        self.members: frozenset[int] = frozenset()   # this server's view (tick thread)
        self.disk_timeout = config.disk_hung_after
        self.disk_hung: str | None = None        # why this server stopped serving
        self.resumed_at = 0.0                    # end of the last stall of the process
        # what to do once the disk hangs (the mount: fence this node); any thread
        self.on_disk_hung: Callable[[str], None] | None = None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        host, port = self.cfg.block_server(self.node_id)
        listeners = await trio.open_tcp_listeners(port, host=host)
        log.info("node %d: block server on %s:%d for the storage group", self.node_id,
                 host, port)
        failover.start_thread(self._tick, "block-server-tick")
        self._io_threads = _IOThreads(IO_THREADS, "block-server-io")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._follow_views)
                task_status.started()
                await trio.serve_listeners(self._serve_conn, listeners,
                                           handler_nursery=nursery)
        finally:
            self._stop.set()
            self._io_threads.stop()

    # -- stall detection -------------------------------------------------------------
    def _tick(self) -> None:
        while not self._stop.wait(TICK):
            now = time.monotonic()
            gap = now - self.ticked_at
            if gap > self.lease:
                self.quiet_until = now + self.quarantine
                self.stalls += 1
                log.warning("node %d: block server was stopped or starved for %.2f s: "
                            "refusing writes for %.2f s", self.node_id, gap, self.quarantine)
                self.resumed_at = now            # the stop is not the disk's time
            self.ticked_at = now
            self._watch_disk(now)

    def _watch_disk(self, now: float) -> None:
        """Stop serving once a device call has been under way for disk_timeout of
        this process's running time (module doc, "A hung disk")."""
        if self.disk_hung is not None or self._io_threads is None:
            return
        began = self._io_threads.oldest()
        if began is None or now - max(began, self.resumed_at) <= self.disk_timeout:
            return
        others = set(self.cfg.storage_group) & self.members - {self.node_id}
        if not others:
            return                    # the last server: nowhere to route around to
        self.disk_hung = (f"block server stops serving: a device I/O has been under way "
                          f"for {now - began:.1f} s (disk_timeout {self.disk_timeout:g} "
                          f"s): its disk hangs; servers {sorted(others)} serve on")
        if self.on_disk_hung is None:
            log.error("node %d: %s", self.node_id, self.disk_hung)
            return
        self.on_disk_hung(self.disk_hung)

    def stalled(self) -> str | None:
        """Why this server may not write now (it was, or is being, stopped), or None."""
        now = time.monotonic()
        if now - self.ticked_at > self.lease:
            return f"block server {self.node_id} has not ticked for {now - self.ticked_at:.2f} s"
        if now < self.quiet_until:
            return (f"block server {self.node_id} was stopped: refusing writes for "
                    f"{self.quiet_until - now:.2f} s more")
        return None

    # -- who may write ---------------------------------------------------------------
    async def _follow_views(self) -> None:
        first = True
        async for ev in self.membership.subscribe():
            if isinstance(ev, ExpelledEvent):
                self.expelled = True
            elif isinstance(ev, ViewChange):
                self._install(ev.view.generation, ev.view.members, first)
                first = False

    def _install(self, generation: int, members: frozenset[int], first: bool) -> None:
        """Members seen in our first view count from 0 (we cannot know when they
        joined); later joiners from the generation that added them."""
        self.generation = generation
        self.members = members
        for n in list(self.joined_at):
            if n not in members:
                del self.joined_at[n]
        for n in members:
            self.joined_at.setdefault(n, 0 if first else generation)

    def fenced(self, sender: int, generation: int) -> str | None:
        """Why `sender` at `generation` was cut off here for good, or None."""
        cut = self.cut_off.get(sender)
        if cut is not None and generation < cut:
            return (f"node {sender} was fenced in generation {cut} (block server "
                    f"{self.node_id})")
        return None

    def refusal(self, sender: int, generation: int) -> str | None:
        """Why a write or flush from `sender` at `generation` is refused, or None."""
        if self.expelled:
            return f"block server {self.node_id} was expelled from the cluster"
        fenced = self.fenced(sender, generation)
        if fenced is not None:
            return fenced
        since = self.joined_at.get(sender)
        if since is None:
            return (f"node {sender} is not a member of generation {self.generation} "
                    f"(block server {self.node_id})")
        if generation < since:
            return (f"request of generation {generation} from node {sender}, which "
                    f"joined again in generation {since}")
        return None

    # -- connections -------------------------------------------------------------------
    async def _serve_conn(self, stream: trio.SocketStream) -> None:
        self.stats["connections"] += 1
        client = -1
        try:
            reader = _Reader(stream)
            with trio.fail_after(self.cfg.connect_timeout):
                client, skey = await self._handshake(stream, reader)
            replies = _Replies(stream, skey, self.node_id)
            # the stream is closed (finally) only after this nursery, which waits for
            # every request's device I/O: a proxy reads the close as "all done" (doc)
            async with trio.open_nursery() as requests:
                await self._read_requests(reader, client, replies, requests)
            if replies.error is not None:
                raise replies.error
        # except*: what the requests' nursery raises comes in an ExceptionGroup (always
        # so since trio 0.25's strict exception groups); a bare exception is matched too
        except* WireError as group:
            self.stats["wire_errors"] += 1
            log.warning("node %d: block server: dropped connection from node %d: %s",
                        self.node_id, client, group.exceptions[0])
        except* (EOFError, OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                 trio.TooSlowError) as group:
            log.debug("node %d: block connection from %d ended: %r", self.node_id, client,
                      group.exceptions[0])
        finally:
            await trio.aclose_forcefully(stream)

    async def _read_requests(self, reader: _Reader, client: int, replies: _Replies,
                             requests: trio.Nursery) -> None:
        """Read requests as they come, each answered by a task of its own."""
        inbound = bw.Sequencer()
        slots = trio.Semaphore(CONN_WINDOW)
        while True:
            f = wf.decode(replies.skey, await reader.read(), max_frame=bw.MAX_FRAME)
            inbound.check(f, client)
            received = time.monotonic()        # a wait for a slot counts in the lease
            await slots.acquire()
            self.most_in_flight = max(self.most_in_flight, CONN_WINDOW - slots.value)
            requests.start_soon(self._answer, f, received, replies, slots, requests)

    async def _answer(self, f: wf.Frame, received: float, replies: _Replies,
                      slots: trio.Semaphore, requests: trio.Nursery) -> None:
        """Carry out one request and send its reply. What breaks the connection (a
        malformed request, a failed send) ends it once, for all its requests."""
        try:
            await replies.send(self.generation, await self._handle(f, received))
        except (WireError, OSError, trio.BrokenResourceError,
                trio.ClosedResourceError) as exc:
            if replies.error is None:
                replies.error = exc
            requests.cancel_scope.cancel()
        finally:
            slots.release()

    async def _handshake(self, stream: trio.SocketStream, reader: _Reader
                         ) -> tuple[int, bytes]:
        key = self.cfg.key
        f = wf.decode(key, await reader.read(), max_frame=bw.MAX_FRAME)
        if f.sender not in self.cfg.node_ids or f.sender == self.node_id:
            raise WireError(f"block HELLO from unknown node id {f.sender}")
        nc = bw.check_hello(f, self.cfg.name, self.node_id)
        ns = bw.new_nonce()
        await stream.send_all(wf.encode_prefixed(
            key, MsgType.HELLO, self.node_id, self.generation, 0,
            bw.hello(self.cfg.name, f.sender, ns, echo=nc, now=time.monotonic())))
        return f.sender, wf.session_key(key, f.sender, self.node_id, nc, ns)

    async def _handle(self, f: wf.Frame, received: float) -> dict[str, Any]:
        body = f.body
        if f.type not in bw.REQUESTS or not isinstance(body, dict):
            raise WireError(f"not a block request: type {f.type}")
        rid = body.get("id")
        self.per_node[f.sender] = self.per_node.get(f.sender, 0) + 1
        try:
            if self.disk_hung is not None and f.type != MsgType.BLOCK_FENCE:
                raise _Refused(f"block server {self.node_id}: {self.disk_hung}")
            if f.type == MsgType.BLOCK_FENCE:
                out = await self._fence_request(f.sender, f.generation, body)
            elif f.type in (MsgType.BLOCK_WRITE, MsgType.BLOCK_FLUSH):
                out = await self._write_request(f, body, received)
            else:
                out = await self._run_io(f.type, body, received)
        except _Refused as exc:
            self.stats["refused"] += 1
            self.last_refusal = str(exc)
            log.warning("node %d: block server refused a request of node %d: %s",
                        self.node_id, f.sender, exc)
            return {"id": rid, "ok": False, "error": str(exc), "fenced": exc.fenced}
        except (StorageError, FenceError) as exc:
            self.stats["errors"] += 1
            return {"id": rid, "ok": False, "error": str(exc)}
        return {"id": rid, "ok": True, **out}

    async def _write_request(self, f: wf.Frame, body: dict[str, Any], received: float
                             ) -> dict[str, Any]:
        """A write or flush: refused (see the module doc), or counted in flight while
        it runs, so that a fence of its sender can wait for it to end."""
        fenced = self.fenced(f.sender, f.generation)
        if fenced is not None:
            raise _Fenced(fenced)             # the proxy stops: no other server is tried
        why = self.refusal(f.sender, f.generation)
        if why is not None:
            raise _Refused(why)
        self._inflight[f.sender] = self._inflight.get(f.sender, 0) + 1
        try:
            return await self._run_io(f.type, body, received)
        finally:
            self._inflight[f.sender] -= 1
            if not self._inflight[f.sender]:
                del self._inflight[f.sender]
            self._io_done.set()
            self._io_done = trio.Event()

    # -- fencing through the storage group --------------------------------------------
    async def _fence_request(self, sender: int, generation: int, body: dict[str, Any]
                             ) -> dict[str, Any]:
        why = self.refusal(sender, generation)          # a member, in its current life
        if why is not None:
            raise _Refused(why)
        victim, gen = _int(body, "node"), _int(body, "gen")
        if victim == sender:
            raise _Refused(f"node {sender} asked to fence itself")
        await self.cut_off_node(victim, gen, preempt=bool(body.get("preempt")))
        return {}

    async def cut_off_node(self, victim: int, generation: int, *, preempt: bool = False
                           ) -> None:
        """Fence `victim` here: refuse its writes and flushes of every generation before
        `generation` (the view that removed it), and return once none of them is in
        flight. With `preempt`, then also fence it on the disk through this node's
        agent. _Refused / FenceError if that cannot be done."""
        if victim == self.node_id:
            raise _Refused(f"block server {self.node_id} was asked to fence itself")
        rejoined = self.joined_at.get(victim)
        if preempt and rejoined is not None and rejoined >= generation:
            raise _Refused(f"node {victim} joined again in generation {rejoined}, after "
                           f"the view {generation} that removed it")
        self.cut_off[victim] = max(self.cut_off.get(victim, 0), generation)
        log.warning("node %d: block server cuts node %d off (writes of generations before "
                    "%d refused)", self.node_id, victim, generation)
        while self._inflight.get(victim):
            await self._io_done.wait()
        if preempt:
            if self.fence_disk_node is None:
                raise _Refused(f"block server {self.node_id} has no agent to fence node "
                               f"{victim} on the disk")
            await self.fence_disk_node(victim, generation)

    async def _run_io(self, mtype: int, body: dict[str, Any], received: float
                      ) -> dict[str, Any]:
        if self._io_threads is None:             # not serving (a test's bare server)
            return await workers.run(self._io, mtype, body, received)
        return await self._io_threads.run(self._io, mtype, body, received,
                                          watch=mtype != MsgType.BLOCK_FLUSH)

    def _io(self, mtype: int, body: dict[str, Any], received: float) -> dict[str, Any]:
        """The request's I/O, on an I/O thread."""
        if mtype == MsgType.BLOCK_INFO:
            return {"size": self.dev.size}
        if mtype == MsgType.BLOCK_READ:
            off, length = _int(body, "off"), _int(body, "len")
            if length > bw.MAX_IO:
                raise WireError(f"read of {length} bytes (at most {bw.MAX_IO})")
            self.stats["reads"] += 1
            return {"data": self.dev.pread(off, length)}
        waited = time.monotonic() - received
        stalled = self.stalled()
        if stalled is not None:
            raise _Refused(stalled)
        if waited > self.lease:
            raise _Refused(f"request waited {waited:.2f} s on block server {self.node_id} "
                           f"(lease {self.lease:g} s): it may have been sent elsewhere")
        if mtype == MsgType.BLOCK_FLUSH:
            self.stats["flushes"] += 1
            self.dev.flush()
            return {}
        data = body.get("data")
        if not isinstance(data, bytes) or len(data) > bw.MAX_IO:
            raise WireError("write without data, or too large")
        by = body.get("by")
        if by is not None:
            if not isinstance(by, (int, float)) or isinstance(by, bool):
                raise WireError("block request field 'by': not a number")
            late = time.monotonic() - by
            if late > 0:
                self.stats["late"] += 1
                raise _Refused(f"write reached block server {self.node_id} {late:.2f} s "
                               "after the proxy's start deadline: it may have been sent "
                               "elsewhere")
        self.stats["writes"] += 1
        self.dev.pwrite(_int(body, "off"), data)
        return {}

    def statistics(self) -> dict[str, Any]:
        return {**self.stats, "generation": self.generation, "stalls": self.stalls,
                "most_in_flight": self.most_in_flight,
                "members": sorted(self.joined_at), "last_refusal": self.last_refusal,
                "disk_hung": self.disk_hung,
                "per_node": dict(self.per_node), "cut_off": dict(self.cut_off)}


def _int(body: dict[str, Any], k: str) -> int:
    v = body.get(k)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise WireError(f"block request field {k!r}: not a non-negative integer")
    return v
