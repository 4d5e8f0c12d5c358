"""The owner's lock block: what a node knows of one lock its tasks hold or want.

Its own module because every part of the lockspace reads it: the owner side
fills it, the master side's replies complete it, recovery re-sends it.

Lock ids are unique in the cluster: (owner node id << LKID_SHIFT) | counter, so
a master needs no id translation, recovery re-sends locks as they are, and a
master finds a lock's owner from its id alone (`lkid_owner`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import trio

from clusterfs.dlm.interface import Lock, Mode
from clusterfs.errors import LockError

LKID_SHIFT = 32


def lkid_owner(lkid: int) -> int:
    """The node id of the owner of the lock lkid."""
    return lkid >> LKID_SHIFT


class Status(Enum):
    WAITING = "waiting"        # a new request, not granted yet
    CONVERTING = "converting"  # granted at lkb_grmode, wants lkb_rqmode
    GRANTED = "granted"


class NotMaster(LockError):
    """The node we sent to is not (yet) the master: look up again and resend."""


@dataclass(eq=False)
class Lkb:
    """The owner's record of one lock (the Linux DLM's struct dlm_lkb)."""

    lkb_id: int
    lkb_key: bytes
    lkb_lock: Lock
    lkb_status: Status
    lkb_grmode: Mode | None = None
    lkb_rqmode: Mode | None = None
    lkb_try: bool = False
    lkb_sent: bool = False          # the master has (or will get) the request
    lkb_abandoned: bool = False     # the asking task is gone: undo a late grant
    lkb_cancelling: bool = False    # a cancel is on its way to the master
    lkb_queued: bool = False        # the master answered "queued" (watch.py's logs)
    lkb_lvbseq: int = 0
    lkb_done: trio.Event = field(default_factory=trio.Event)
    lkb_error: BaseException | None = None

    def take_error(self) -> BaseException:
        """The error the request or conversion ended with, no longer kept here: raised
        by its waiter, the error's traceback holds the waiter's frame, which holds this
        record; kept, it would make a cycle only a garbage collection frees."""
        error, self.lkb_error = self.lkb_error, None
        assert error is not None
        return error
