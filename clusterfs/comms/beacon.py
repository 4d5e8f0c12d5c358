"""Liveness beacons: a node's process says it runs, apart from its event loop.

Heartbeats and the answers to probes (membership/detection.py) are sent by the
node's event loop. A loop that stops for a second or two while its process runs -
a long garbage collection, a machine so loaded that the loop waits for a CPU -
looked exactly like a frozen or cut-off node to a peer that probed it, and a probed
node not heard within `probe_timeout` (1 s) is removed and fenced: a live node
shot for being slow. The beacon tells the two apart. A thread of its own, with a
UDP socket bound to the node's configured address (the same port number as its TCP
listener), sends every other configured node a small authenticated datagram
(wire/beacon.py) every half heartbeat interval, saying how long ago the event loop
last ran and when its last stall began and ended (a loop task ticks every TICK
seconds); it also receives the others' and keeps the newest of each node.
Membership asks (`ages`) before it takes a silence for death: a node whose beacons
still come and whose loop stopped about when it fell silent, for less than the
failure timeout, is only stalled, and is left alone (membership/detection.py,
`_only_stalled`). A frozen process (SIGSTOP), a dead one, a cut cable or a host gone
stop the beacons with everything else, so they are judged as before; a loop stuck
for the failure timeout is dead all the same. Without the datagrams (a firewall that
drops UDP, a port taken) membership simply judges as it did before beacons.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass

import trio

from clusterfs.config import ClusterConfig
from clusterfs.errors import WireError
from clusterfs.wire import beacon as wire

log = logging.getLogger("clusterfs.comms.beacon")

TICK = 0.1                # how often the event loop says it ran
STALL_MIN = 2 * TICK      # a gap between ticks this long is a stall the beacons report
WAKE_WAIT = 0.1           # at stop, how long the loop waits for the thread to close


@dataclass(frozen=True)
class Sighting:
    """The newest beacon accepted from one node, in this process's time.monotonic()."""
    incarnation: int
    received: float
    loop_ran: float       # when the sender's event loop last ran, by its own account
    stall_began: float | None    # its last stall that ended: from (None: none yet)
    stall_ended: float | None    # to


@dataclass(frozen=True)
class Ages:
    """What membership asks of a node's beacons, in seconds before now."""
    incarnation: int
    heard: float          # since its newest beacon came
    loop: float           # since its event loop last ran
    stall_began: float | None    # its last stall that ended (None: none yet)
    stall_ended: float | None


@dataclass
class BeaconStatistics:
    sent: int
    received: int
    rejected: int


class BeaconService:
    def __init__(self, config: ClusterConfig, node_id: int, incarnation: int,
                 interval: float) -> None:
        self.node_id = node_id
        self.incarnation = incarnation
        self.interval = interval
        self._config = config
        self._nodes = frozenset(config.node_ids)
        self._key = wire.beacon_key(config.key)
        self._loop_ran = time.monotonic()
        self._last_stall = (0.0, 0.0)      # (began, ended) of the last stall that ended
        self._seq = 0
        self._last_seq: dict[tuple[int, int], int] = {}   # (node, inc) -> newest seq
        self._sightings: dict[int, Sighting] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._peers: list[tuple[int, tuple]] = []
        self.sent = 0
        self.received = 0
        self.rejected = 0

    # -- what membership asks ---------------------------------------------------------
    def sighting(self, node: int) -> Sighting | None:
        return self._sightings.get(node)

    def ages(self, node: int) -> Ages | None:
        """The node's newest beacon, in seconds before now; None if never heard."""
        s = self._sightings.get(node)
        if s is None:
            return None
        now = time.monotonic()
        return Ages(s.incarnation, now - s.received, now - s.loop_ran,
                    None if s.stall_began is None else now - s.stall_began,
                    None if s.stall_ended is None else now - s.stall_ended)

    def statistics(self) -> BeaconStatistics:
        return BeaconStatistics(self.sent, self.received, self.rejected)

    # -- running --------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Bind, start the thread, tick while the loop runs; stop the thread on the way
        out. A bind that fails is said once and leaves the node without beacons."""
        if not self._open():
            task_status.started()
            await trio.sleep_forever()
        self._thread = threading.Thread(target=self._serve, name="clusterfs-beacon",
                                        daemon=True)
        self._thread.start()
        task_status.started()
        try:
            while True:
                now = time.monotonic()
                if now - self._loop_ran >= STALL_MIN:
                    self._last_stall = (self._loop_ran, now)
                self._loop_ran = now
                await trio.sleep(TICK)
        finally:
            self._stop_thread()

    def _stop_thread(self) -> None:
        """Wake the thread with an empty datagram to ourselves and wait a moment for it
        to close the socket, so that a node started again at once can bind it."""
        self._stop.set()
        assert self._sock is not None and self._thread is not None
        try:
            self._sock.sendto(b"", self._sock.getsockname())
        except OSError:
            pass               # closed already, or unreachable: it wakes within interval
        self._thread.join(timeout=WAKE_WAIT)

    def _open(self) -> bool:
        me = self._config.node(self.node_id)
        try:
            family, _, _, _, addr = socket.getaddrinfo(me.host, me.port,
                                                       type=socket.SOCK_DGRAM)[0]
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.bind(addr)
        except OSError as exc:
            log.info("node %d: no liveness beacons (cannot bind UDP %s: %s); a node whose "
                     "event loop stalls may be taken for dead", self.node_id, me.address,
                     exc)
            return False
        for n in self._config.nodes:
            if n.id == self.node_id:
                continue
            try:
                for fam, _, _, _, peer in socket.getaddrinfo(n.host, n.port,
                                                             type=socket.SOCK_DGRAM):
                    if fam == family:
                        self._peers.append((n.id, peer))
                        break
            except OSError as exc:
                log.info("node %d: no beacons to node %d (%s: %s)", self.node_id, n.id,
                         n.address, exc)
        self._sock = sock
        return True

    def _serve(self) -> None:
        assert self._sock is not None
        try:
            self._beat(self._sock)
        finally:
            self._sock.close()

    def _beat(self, sock: socket.socket) -> None:
        next_send = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_send:
                self._send_all(now)
                next_send = now + self.interval
            sock.settimeout(max(0.001, next_send - time.monotonic()))
            try:
                data = sock.recv(wire.SIZE + 1)
            except TimeoutError:
                continue
            except OSError:
                continue       # an ICMP error from a peer not listening yet
            if not self._stop.is_set():
                self._receive(data)

    def _send_all(self, now: float) -> None:
        assert self._sock is not None
        self._seq += 1
        began, ended = self._last_stall
        packet = wire.encode(self._key, wire.Beacon(
            self.node_id, self.incarnation, self._seq, now - self._loop_ran,
            now - began if began else 0.0, now - ended if ended else 0.0))
        for _, addr in self._peers:
            try:
                self._sock.sendto(packet, addr)
                self.sent += 1
            except OSError:
                pass           # unreachable now; the next interval tries again

    def _receive(self, data: bytes) -> None:
        try:
            b = wire.decode(self._key, data)
        except WireError:
            self.rejected += 1
            return
        key = (b.node, b.incarnation)
        if (b.node == self.node_id or b.node not in self._nodes
                or b.seq <= self._last_seq.get(key, 0)):
            self.rejected += 1
            return
        self._last_seq[key] = b.seq
        now = time.monotonic()
        stalled = b.stall_began > 0
        self._sightings[b.node] = Sighting(b.incarnation, now, now - b.loop_age,
                                           now - b.stall_began if stalled else None,
                                           now - b.stall_ended if stalled else None)
        self.received += 1
