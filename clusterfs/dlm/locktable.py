"""LockTable: a typed wrapper over the C lock table (native/locktable.c).

One LockTable holds the resources a node masters in one lockspace. Every call
returns at once; grants and blocking notifications it causes are queued as
events, drained with `events()` right after the call. C error codes become
our exceptions here (WouldBlock, ConversionDeadlock, LockError).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from enum import IntEnum

from clusterfs.dlm.interface import LVB_SIZE, ConversionDeadlock, Mode
from clusterfs.errors import LockError, NativeError, WouldBlock
from clusterfs.native import ffi, lib

FLAG_TRY = 1


class Queue(IntEnum):
    NONE = 0
    GRANTED = 1
    CONVERTING = 2
    WAITING = 3


class EventType(IntEnum):
    GRANT = 1
    BAST = 2
    DEADLOCK = 3    # a queued conversion refused after recovery rebuilt its queue


@dataclass(frozen=True)
class TableEvent:
    type: EventType
    lkid: int
    mode: Mode


@dataclass(frozen=True)
class LockInfo:
    lkid: int
    nodeid: int
    grmode: Mode | None
    rqmode: Mode | None
    queue: Queue
    range: tuple[int, int]

    def as_dict(self) -> dict[str, object]:
        return {
            "lkid": self.lkid,
            "node": self.nodeid,
            "grmode": self.grmode.name if self.grmode is not None else None,
            "rqmode": self.rqmode.name if self.rqmode is not None else None,
            "queue": self.queue.name.lower(),
            "range": list(self.range),
        }


@dataclass(frozen=True)
class TableStats:
    resources: int
    locks: int
    idle: int = 0      # resources without locks, on the toss list


def _mode_or_none(m: int) -> Mode | None:
    return None if m < 0 else Mode(m)


def _check(rc: int, what: str) -> int:
    if rc >= 0:
        return rc
    err = -rc
    if err == errno.EAGAIN:
        raise WouldBlock(f"{what}: would block")
    if err == errno.EDEADLK:
        raise ConversionDeadlock(f"{what}: conversion deadlock")
    if err == errno.ENOMEM:
        raise NativeError(f"{what}: out of memory")
    exc = LockError(f"{what}: {errno.errorcode.get(err, err)}")
    exc.errno = err
    raise exc


class LockTable:
    def __init__(self) -> None:
        self._t = lib.cfs_lt_create()
        if self._t == ffi.NULL:
            raise NativeError("cannot create lock table")
        self._ev = ffi.new("struct cfs_lt_event *")
        # The LVB out-buffer: char[] so that ffi.unpack copies it to bytes fast,
        # passed to C through a uint8_t pointer cast once (lock_lvb is hot).
        self._lvb_chars = ffi.new("char[]", LVB_SIZE)
        self._lvb = ffi.cast("uint8_t *", self._lvb_chars)
        self._seq = ffi.new("uint64_t *")
        self._name = ffi.new("uint8_t[]", 256)

    def close(self) -> None:
        if self._t != ffi.NULL:
            lib.cfs_lt_destroy(self._t)
            self._t = ffi.NULL

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    # -- the lock operations -----------------------------------------------------
    def request(self, name: bytes, lkid: int, nodeid: int, mode: Mode,
                range: tuple[int, int], *, try_: bool = False) -> bool:
        """True if granted at once, False if queued; WouldBlock if try_ and busy."""
        rc = lib.cfs_lt_request(self._t, name, len(name), lkid, nodeid, int(mode),
                                range[0], range[1], FLAG_TRY if try_ else 0)
        if rc < 0:   # (the message is only formatted on the error path: hot call)
            _check(rc, f"request {name!r}")
        return rc == 1

    def convert(self, lkid: int, mode: Mode, *, try_: bool = False,
                lvb: bytes | None = None) -> bool:
        """True if converted at once, False if queued. The LVB is stored when a
        PW/EX holder goes below PW. ConversionDeadlock if it would close a cycle."""
        buf = ffi.NULL if lvb is None else _lvb_bytes(lvb)
        rc = lib.cfs_lt_convert(self._t, lkid, int(mode), FLAG_TRY if try_ else 0, buf)
        if rc < 0:
            _check(rc, f"convert {lkid:#x}")
        return rc == 1

    def unlock(self, lkid: int, lvb: bytes | None = None) -> None:
        buf = ffi.NULL if lvb is None else _lvb_bytes(lvb)
        rc = lib.cfs_lt_unlock(self._t, lkid, buf)
        if rc < 0:
            _check(rc, f"unlock {lkid:#x}")

    def cancel(self, lkid: int) -> bool:
        """True if a queued request/conversion was cancelled, False if already granted."""
        rc = lib.cfs_lt_cancel(self._t, lkid)
        if rc < 0:
            _check(rc, f"cancel {lkid:#x}")
        return rc == 1

    def events(self) -> list[TableEvent]:
        out = []
        ev = self._ev
        while lib.cfs_lt_next_event(self._t, ev):
            out.append(TableEvent(EventType(ev.type), ev.lkid, Mode(ev.mode)))
        return out

    # -- value blocks ------------------------------------------------------------
    def lock_lvb(self, lkid: int) -> tuple[bytes, int, bool]:
        """(lvb, sequence, valid) of the resource lkid is on."""
        valid = lib.cfs_lt_lock_lvb(self._t, lkid, self._lvb, self._seq)
        if valid < 0:
            _check(valid, f"lvb {lkid:#x}")
        return ffi.unpack(self._lvb_chars, LVB_SIZE), int(self._seq[0]), bool(valid)

    def resource_lvb(self, name: bytes) -> tuple[bytes, int, bool]:
        valid = _check(lib.cfs_lt_res_lvb(self._t, name, len(name), self._lvb, self._seq),
                       f"lvb {name!r}")
        return ffi.unpack(self._lvb_chars, LVB_SIZE), int(self._seq[0]), bool(valid)

    def set_resource_lvb(self, name: bytes, lvb: bytes, seq: int, valid: bool) -> None:
        _check(lib.cfs_lt_set_res_lvb(self._t, name, len(name), _lvb_bytes(lvb), seq,
                                      int(valid)), f"set lvb {name!r}")

    # -- recovery ----------------------------------------------------------------
    def recover_lock(self, name: bytes, lkid: int, nodeid: int, grmode: Mode | None,
                     rqmode: Mode | None, range: tuple[int, int]) -> None:
        gr = -1 if grmode is None else int(grmode)
        rq = -1 if rqmode is None else int(rqmode)
        _check(lib.cfs_lt_recover_lock(self._t, name, len(name), lkid, nodeid, gr, rq,
                                       range[0], range[1]), f"recover {lkid:#x}")

    def regrant(self, name: bytes) -> int:
        """Grant what can be granted on one resource (0 if it does not exist)."""
        rc = lib.cfs_lt_regrant(self._t, name, len(name))
        return 0 if rc == -errno.ENOENT else _check(rc, f"regrant {name!r}")

    def purge_node(self, nodeid: int) -> int:
        return lib.cfs_lt_purge_node(self._t, nodeid)

    def drop_resource(self, name: bytes) -> bool:
        return lib.cfs_lt_drop_resource(self._t, name, len(name)) == 0

    # -- idle resources (the toss list) -------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Resources that go idle from now on are stamped with `epoch`."""
        lib.cfs_lt_set_epoch(self._t, epoch)

    def idle_resource(self, before: int) -> bytes | None:
        """The name of the resource idle longest (no locks) if it went idle in an
        epoch before `before`, else None. It stays until drop_resource()."""
        n = lib.cfs_lt_idle_resource(self._t, before, self._name, len(self._name))
        if n > len(self._name):
            self._name = ffi.new("uint8_t[]", n)
            n = lib.cfs_lt_idle_resource(self._t, before, self._name, n)
        return bytes(ffi.buffer(self._name, n)) if n > 0 else None

    def drop_idle(self, before: int, limit: int | None = None) -> list[bytes]:
        """Free every resource idle since an epoch before `before` (at most `limit`,
        the longest idle first); their names."""
        dropped: list[bytes] = []
        while (limit is None or len(dropped) < limit) \
                and (name := self.idle_resource(before)) is not None:
            self.drop_resource(name)
            dropped.append(name)
        return dropped

    # -- inspection --------------------------------------------------------------
    def dump(self, name: bytes) -> list[LockInfo]:
        """Every lock on the resource: granted, then converting, then waiting."""
        n = lib.cfs_lt_dump(self._t, name, len(name), ffi.NULL, 0)
        if n < 0:
            return []
        buf = ffi.new("struct cfs_lt_info[]", n)
        n = lib.cfs_lt_dump(self._t, name, len(name), buf, n)
        return [_info(buf[i]) for i in range(n)]

    def lock_info(self, lkid: int) -> LockInfo | None:
        buf = ffi.new("struct cfs_lt_info *")
        if lib.cfs_lt_lock_info(self._t, lkid, buf) < 0:
            return None
        return _info(buf[0])

    def statistics(self) -> TableStats:
        return TableStats(int(lib.cfs_lt_nres(self._t)), int(lib.cfs_lt_nlocks(self._t)),
                          int(lib.cfs_lt_nidle(self._t)))


def _lvb_bytes(lvb: bytes) -> bytes:
    return bytes(lvb[:LVB_SIZE]).ljust(LVB_SIZE, b"\0")


def _info(c: object) -> LockInfo:
    return LockInfo(c.lkid, c.nodeid, _mode_or_none(c.grmode),  # type: ignore[attr-defined]
                    _mode_or_none(c.rqmode), Queue(c.queue),  # type: ignore[attr-defined]
                    (int(c.start), int(c.end)))  # type: ignore[attr-defined]
