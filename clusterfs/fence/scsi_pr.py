"""SCSI-3 persistent-reservation fencing, as fence_scsi does it.

Every node registers its own reservation key on every LUN (every path to it) with
each session that writes there, and the LUN carries one reservation of type
Write Exclusive - Registrants Only (WERO): the first registrant takes it and it is
kept (it passes to whoever preempts its holder). With WERO, any registered session
may write, and a session that is not registered may read but not write: the target
answers RESERVATION CONFLICT. To fence node N, a registered node sends PREEMPT AND
ABORT with each of N's keys (one per session of N, below): every registration of N
is removed and N's queued commands are aborted. N's next write is refused by the target itself,
so nothing N does any more, hung or not, reaches the disk.

Keys (8 bytes): the high 24 bits are the first 3 bytes of
blake2b(cluster name, digest_size=4, person=b"clusterfs-pr"), as an unsigned
big-endian integer (1 if that is 0); the next 8 bits are a session tag; the low 32
bits are the node id. So every cluster has its own keys, a key names its node, and
no key is 0 (which SPC reserves for "unregister"). Tag 0 is the node's name (what
pr_key returns, what logs show); every session registers a key of its own, tag 1 to
255 (`claim_session_key`): a device reached through several portals cuts off the
session it leaves by preempting that session's key alone, from the new one
(clusterfs.storage.iscsi, "re-targeting"), which a key shared by all of a node's
sessions would not allow (PREEMPT works by key). So fencing node N preempts every
key whose node part is N, on every path, until none is left (a victim that was
re-targeting may have registered one more meanwhile; it checks, after registering,
that its old session's key is still there, so it never writes through a key
registered after the fence was proved). Before per-session keys, every session of a
node registered the same key (32 bits of prefix, no tag): a cluster runs one
version of this scheme on all its nodes.

A key names the node, not its incarnation: a fence of a removed
incarnation also cuts off a restart of that node that registered before the fence
came (its writes then fail with ReservationConflict, it withdraws and must start
again); membership skips the fence when the restarted node rejoined first.

The devices here are objects with IscsiDevice's pr_* methods (clusterfs.storage.iscsi:
the fence layer sits below storage and never imports it; the node layer opens the
sessions and hands them over). Blocking SCSI calls run in a worker thread.

A target that does not implement PREEMPT AND ABORT (tgtd, for one, answers ILLEGAL
REQUEST) gets a plain PREEMPT: the registrations go all the same, but a command of
the victim already queued at the target may still complete; the agent logs that.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from clusterfs import workers
from clusterfs.errors import FenceError, ReservationConflict, StorageError

log = logging.getLogger(__name__)

WERO = 5                       # SPC: type Write Exclusive - Registrants Only
TAG_SHIFT = 32                 # a key's session tag: bits 32..39
TAG_MASK = 0xFF << TAG_SHIFT
MAX_TAG = 0xFF
PREFIX_SHIFT = 40              # a key's cluster prefix: bits 40..63
FENCE_ROUNDS = 4               # read-and-preempt rounds before a fence gives up
TYPE_NAMES = {1: "Write Exclusive", 3: "Exclusive Access", 5: "Write Exclusive - "
              "Registrants Only", 6: "Exclusive Access - Registrants Only",
              7: "Write Exclusive - All Registrants", 8: "Exclusive Access - All Registrants"}


class PrDevice(Protocol):
    path: str
    pr_key: int | None        # the key this session registered (None: none)

    def pr_read_keys(self) -> list[int]: ...
    def pr_read_reservation(self) -> tuple[int, int] | None: ...
    def pr_register(self, key: int) -> None: ...
    def pr_reserve(self, key: int, pr_type: int) -> None: ...
    def pr_preempt(self, key: int, victim: int, pr_type: int,
                   abort: bool = True) -> bool: ...
    def close(self) -> None: ...


def cluster_prefix(cluster_name: str) -> int:
    """The 24-bit prefix of every key of cluster `cluster_name` (never 0)."""
    digest = hashlib.blake2b(cluster_name.encode(), digest_size=4,
                             person=b"clusterfs-pr").digest()
    return int.from_bytes(digest[:3], "big") or 1


def pr_key(cluster_name: str, node_id: int, tag: int = 0) -> int:
    """Node `node_id`'s reservation key in cluster `cluster_name` with session tag
    `tag` (0: the node's name; see the module doc)."""
    if not 0 <= node_id < 1 << 32:
        raise ValueError(f"node id {node_id} out of range")
    return cluster_prefix(cluster_name) << PREFIX_SHIFT | with_tag(node_id, tag)


def with_tag(key: int, tag: int) -> int:
    """`key` with its session tag replaced by `tag`."""
    if not 0 <= tag <= MAX_TAG:
        raise ValueError(f"session tag {tag} out of range")
    return key & ~TAG_MASK | tag << TAG_SHIFT


def node_of_key(cluster_name: str, key: int) -> int | None:
    """The node id a key of this cluster names (any session tag), or None for another
    cluster's key."""
    return key & 0xFFFFFFFF if key >> PREFIX_SHIFT == cluster_prefix(cluster_name) else None


def same_node(key: int, other: int) -> bool:
    """Do the two keys name one node of one cluster (whatever their session tags)?"""
    return with_tag(key, 0) == with_tag(other, 0)


_claimed: set[int] = set()       # session keys this process registered (or is about to)
_claimed_lock = threading.Lock()


def claim_session_key(node_key: int, registered: list[int]) -> int:
    """A key of `node_key`'s node for a new session: the lowest tag (1 to 255) that
    is neither registered on the LUN (`registered`, as READ KEYS answered) nor taken
    by another session of this process. Released with release_session_key.
    StorageError if every tag is taken."""
    with _claimed_lock:
        for tag in range(1, MAX_TAG + 1):
            key = with_tag(node_key, tag)
            if key not in registered and key not in _claimed:
                _claimed.add(key)
                return key
    raise StorageError(f"no free session tag for key {node_key:#x}: 255 sessions of "
                       "this node are registered")


def release_session_key(key: int | None) -> None:
    """The session that held `key` is gone (closed, or cut off)."""
    with _claimed_lock:
        _claimed.discard(key)


def _type_name(pr_type: int) -> str:
    return TYPE_NAMES.get(pr_type, f"type {pr_type}")


def ensure_reservation(dev: PrDevice, key: int) -> tuple[int, int]:
    """Make sure the LUN holds a WERO reservation (taking it with `key`, which must be
    registered through `dev`, if there is none); the (holder key, type) it holds.
    FenceError if it holds a reservation of another type (someone else's)."""
    res = dev.pr_read_reservation()
    if res is None:
        try:
            dev.pr_reserve(key, WERO)
        except ReservationConflict:
            pass                        # another node reserved meanwhile: see below
        res = dev.pr_read_reservation()
    if res is None:
        raise FenceError(f"{dev.path}: cannot establish a persistent reservation")
    if res[1] != WERO:
        raise FenceError(f"{dev.path}: the LUN holds a reservation of type "
                         f"{_type_name(res[1])} (key {res[0]:#x}), not "
                         f"{_type_name(WERO)}: it is not ours to use")
    return res


def register(dev: PrDevice, key: int) -> int:
    """Register a session key of `key`'s node through this session (REGISTER AND
    IGNORE EXISTING KEY, so a restarted node "unfences" itself) and make sure the
    LUN is reserved WERO; the session key (also `dev.pr_key` from then on).

    The mount calls this at start on the device it writes through, before its first
    write: registrations are per session (I_T nexus), and only a registered session
    may write. StorageError if the target fails, FenceError if the LUN holds a
    reservation of another type."""
    session_key = claim_session_key(key, dev.pr_read_keys())
    try:
        dev.pr_register(session_key)
        ensure_reservation(dev, session_key)
        keys = dev.pr_read_keys()
        if session_key not in keys:
            raise FenceError(f"{dev.path}: key {session_key:#x} not registered after "
                             "REGISTER")
        _cut_off_earlier_lives(dev, session_key, keys)
    except BaseException:
        release_session_key(session_key)
        raise
    return session_key


def _cut_off_earlier_lives(dev: PrDevice, session_key: int, keys: list[int]) -> None:
    """Preempt the keys of this node that no session of this process holds: an
    earlier life's (a mount that ended, or was killed and restarted before anyone
    fenced it; one process runs a node, its address refuses a second). Left there,
    they would let a session of that life still write, and each life would use up
    session tags until none of the 255 is left."""
    with _claimed_lock:
        ours = set(_claimed)
    for stale in sorted({k for k in keys if same_node(k, session_key) and k not in ours}):
        try:
            dev.pr_preempt(session_key, stale, WERO)
        except ReservationConflict:
            continue              # gone meanwhile
        log.info("%s: key %#x of an earlier life of this node preempted", dev.path, stale)


class ScsiPrAgent:
    """Fence by PREEMPT AND ABORT of every key of the victim node on every configured
    LUN (one per session of it: the module doc).

    `devices`: one session per path/LUN, opened at start-up (no login on the failover
    path); each is registered here with this node's key, so that this node may
    preempt through it. `reopen(i)` (optional) opens path i again when its session
    failed (the target restarted): the new session is registered and used at once.
    """

    def __init__(self, devices: Sequence[PrDevice], cluster_name: str, node_id: int, *,
                 reopen: Callable[[int], PrDevice] | None = None) -> None:
        if not devices:
            raise FenceError("scsi-pr fencing: no device configured")
        self.cluster_name = cluster_name
        self.node_id = node_id
        self.key = pr_key(cluster_name, node_id)
        self.devices = list(devices)
        self.reopen = reopen
        self.calls: list[tuple[int, int]] = []
        self.preempts = 0
        self.without_abort = 0
        for dev in self.devices:
            register(dev, self.key)
        log.info("scsi-pr fencing: node %d registered key %#x on %s", node_id, self.key,
                 ", ".join(d.path for d in self.devices))

    async def fence(self, node_id: int, generation: int,
                    incarnation: int | None = None) -> None:
        self.calls.append((node_id, generation))
        if node_id == self.node_id:
            raise FenceError(f"node {node_id}: refusing to fence this node itself")
        victim = pr_key(self.cluster_name, node_id)
        for i in range(len(self.devices)):
            await workers.run(self._fence_path, i, node_id, victim, generation)
        log.warning("gen %d: node %d fenced: key %#x preempted on %d path(s)", generation,
                    node_id, victim, len(self.devices))

    def _fence_path(self, i: int, node_id: int, victim: int, generation: int) -> None:
        try:
            self._fence_on(self.devices[i], node_id, victim, generation)
            return
        except FenceError:
            raise
        except StorageError as exc:
            if self.reopen is None:
                raise FenceError(f"node {node_id}: {exc}") from exc
            log.warning("gen %d: fencing node %d: %s; logging in again", generation,
                        node_id, exc)
        try:
            fresh = self.reopen(i)
            register(fresh, self.key)
        except StorageError as exc:
            raise FenceError(f"node {node_id}: {exc}") from exc
        old, self.devices[i] = self.devices[i], fresh
        try:
            old.close()
        except StorageError:
            pass
        try:
            self._fence_on(fresh, node_id, victim, generation)
        except StorageError as exc:
            raise FenceError(f"node {node_id}: {exc}") from exc

    def _fence_on(self, dev: PrDevice, node_id: int, victim: int, generation: int) -> None:
        """Preempt every key of node `node_id` on one LUN and prove it: none of its
        keys left, ours still there, a WERO reservation in place. A victim that was
        re-targeting may register one more key meanwhile: read again and preempt
        that too, FENCE_ROUNDS times at most. FenceError if that cannot be shown."""
        keys = dev.pr_read_keys()
        self._check_ours(dev, keys, node_id)
        victims = self._victim_keys(keys, victim)
        if not victims:
            log.info("gen %d: node %d: no key of it (%#x) is registered on %s (fenced "
                     "already, or it never registered there)", generation, node_id,
                     victim, dev.path)
        for _ in range(FENCE_ROUNDS):
            if not victims:
                break
            for key in victims:
                self._preempt(dev, key, node_id, generation)
            keys = dev.pr_read_keys()
            self._check_ours(dev, keys, node_id)
            victims = self._victim_keys(keys, victim)
        if victims:
            raise FenceError(f"node {node_id}: {dev.path}: key(s) "
                             f"{', '.join(f'{k:#x}' for k in victims)} still registered "
                             f"after {FENCE_ROUNDS} rounds of PREEMPT")
        ensure_reservation(dev, self._own_key(dev))

    @staticmethod
    def _victim_keys(keys: list[int], victim: int) -> list[int]:
        """The victim node's keys among `keys`: any session tag (sorted, once each)."""
        return sorted({k for k in keys if same_node(k, victim)})

    def _preempt(self, dev: PrDevice, key: int, node_id: int, generation: int) -> None:
        try:
            aborted = dev.pr_preempt(self._own_key(dev), key, WERO)
        except ReservationConflict:
            return              # the key went meanwhile (another fencer), or ours: below
        self.preempts += 1
        if not aborted:
            self.without_abort += 1
            log.warning("gen %d: %s does not implement PREEMPT AND ABORT: node %d "
                        "(key %#x) preempted without aborting its queued commands",
                        generation, dev.path, node_id, key)

    def _own_key(self, dev: PrDevice) -> int:
        """The key our session on `dev` registered (its tag is its own)."""
        return dev.pr_key if dev.pr_key is not None else self.key

    def _check_ours(self, dev: PrDevice, keys: list[int], node_id: int) -> None:
        if self._own_key(dev) not in keys:
            raise FenceError(f"node {node_id}: {dev.path}: our key "
                             f"{self._own_key(dev):#x} is not registered (this node was "
                             "fenced itself): cannot fence")

    def close(self) -> None:
        for dev in self.devices:
            try:
                dev.close()
            except StorageError:
                pass

    def statistics(self) -> dict[str, object]:
        return {"agent": "scsi-pr", "key": f"{self.key:#x}", "fenced": len(self.calls),
                "preempts": self.preempts, "without_abort": self.without_abort,
                "paths": [d.path for d in self.devices]}
