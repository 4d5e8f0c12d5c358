"""The lock interface every layer above the DLM codes against.

The filesystem takes all its locks through a `LockService`. On one node that
is `clusterfs.dlm.local.LocalLockService`; in a cluster it is the distributed
lock manager. Both keep the same semantics, so the fs never knows which.

Semantics (as the VMS / Linux DLM):
- six modes, NL < CR < CW < PR < PW < EX, with the standard compatibility matrix;
- a lock has a byte range (inclusive start, inclusive end); two locks on one
  resource conflict only when their ranges overlap AND their modes clash;
- requests queue FIFO: a new request is not granted ahead of an older waiter
  (no starvation); conversions are served before new requests;
- `try_=True` raises WouldBlock instead of queueing;
- a waiting request is cancelled by cancelling the awaiting trio task;
- when a request waits on a holder, the holder's `on_blocking(mode)` callback
  runs (the mode wanted), so it can flush and release or down-convert;
- a lock value block (LVB_SIZE bytes) travels with the resource: a holder in
  PW or EX may set `lock.lvb`, and it is stored when that holder
  down-converts below PW or unlocks; every grant returns the current value.
  `lock.lvb_valid` is False after a PW/EX holder died without releasing.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Protocol

from clusterfs.errors import LockError

LVB_SIZE = 32
RANGE_MAX = 2**64 - 1
FULL_RANGE = (0, RANGE_MAX)

ResourceName = tuple[Any, ...]   # e.g. ("inode", 17), ("rgrp", 3), ("journal", 0)


class Mode(IntEnum):
    NL = 0  # null: holds a place, conflicts with nothing
    CR = 1  # concurrent read
    CW = 2  # concurrent write
    PR = 3  # protected read
    PW = 4  # protected write
    EX = 5  # exclusive


_COMPAT = (
    # NL CR CW PR PW EX
    (1, 1, 1, 1, 1, 1),  # NL
    (1, 1, 1, 1, 1, 0),  # CR
    (1, 1, 1, 0, 0, 0),  # CW
    (1, 1, 0, 1, 0, 0),  # PR
    (1, 1, 0, 0, 0, 0),  # PW
    (1, 0, 0, 0, 0, 0),  # EX
)


def compatible(a: Mode, b: Mode) -> bool:
    return bool(_COMPAT[a][b])


def ranges_overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def conflicts(
    mode_a: Mode, range_a: tuple[int, int], mode_b: Mode, range_b: tuple[int, int]
) -> bool:
    return ranges_overlap(range_a, range_b) and not compatible(mode_a, mode_b)


def resource_key(name: ResourceName) -> bytes:
    """A stable byte name for a resource (hashing, the wire, the C table)."""
    return ":".join(map(str, name)).encode()


BlockingCallback = Callable[[Mode], None]


@dataclass(eq=False)
class Lock:
    """A handle on one granted (or waiting) lock. Identity is the object."""

    name: ResourceName
    mode: Mode
    range: tuple[int, int] = FULL_RANGE
    lvb: bytes = bytes(LVB_SIZE)
    lvb_valid: bool = True
    on_blocking: BlockingCallback | None = None
    granted: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # implementation's own state
    # the block server its grant named for the resource (proxy I/O: dlm/preferred.py);
    # None without a storage group of block servers
    server: int | None = None


class LockService(Protocol):
    async def lock(
        self,
        name: ResourceName,
        mode: Mode,
        *,
        range: tuple[int, int] = FULL_RANGE,
        try_: bool = False,
        on_blocking: BlockingCallback | None = None,
    ) -> Lock: ...

    async def convert(self, lock: Lock, mode: Mode, *, try_: bool = False) -> None: ...

    async def unlock(self, lock: Lock) -> None: ...

    def batched(self) -> AbstractContextManager[None]:
        """While the body runs, lock requests started together may travel to their
        master as one message (Lockspace.batched); a service with no messages to
        gather (LocalLockService) does nothing."""
        ...


# -- additions for the distributed lock manager (compatible extensions) ----------
class ConversionDeadlock(LockError):
    """A conversion would close a cycle of conversions waiting on each other.

    The conversion that closes the cycle fails; the lock keeps its granted mode
    (the Linux DLM's default answer, EDEADLK)."""

    errno = _errno.EDEADLK


def is_down_conversion(old: Mode, new: Mode) -> bool:
    """True when `new` conflicts with nothing `old` did not conflict with.

    Such a conversion can always be granted at once (PR->CW is NOT one)."""
    return all(compatible(new, m) for m in Mode if compatible(old, m))
