"""Views and membership events: the contract between membership and the layers above.

Every member sees the same events in the same order. A view's generation only
grows and is the same on all members of that view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import trio


@dataclass(frozen=True)
class View:
    generation: int
    members: frozenset[int]
    quorate: bool
    cluster_size: int = 0          # configured nodes
    # the voters: quorum is a majority of these. All configured nodes, less those
    # that left cleanly since (corosync's allow_downscale, but only on a clean leave);
    # empty in views made by hand (tests): then every configured node votes
    expected: frozenset[int] = frozenset()

    @property
    def coordinator(self) -> int:
        """The member that drives fencing and recovery for this view (lowest id)."""
        return min(self.members)


@dataclass(frozen=True)
class ViewChange:
    view: View
    joined: frozenset[int]
    left: frozenset[int]
    # those of `left` that left cleanly (unmounted: journal clean, no lock held): they
    # are not fenced, their journals need no replay, and they no longer vote
    clean: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Fenced:
    """Fencing of `nodes` (removed in view `generation` or earlier) is done."""

    generation: int
    nodes: frozenset[int]


@dataclass(frozen=True)
class ExpelledEvent:
    """This node was removed from the cluster; it must withdraw and restart clean."""

    generation: int


Event = ViewChange | Fenced | ExpelledEvent


class Membership(Protocol):
    node_id: int
    view: View

    def subscribe(self) -> trio.MemoryReceiveChannel[Event]:
        """A channel carrying every event from now on, in order (starts with the current view)."""

    async def wait_quorum(self) -> View:
        """Return the current view once it is quorate."""

    def suspect(self, node: int, why: str = "", *, quiet: float | None = None) -> None:
        """`node` did not answer us (`why`: what it did not answer): look at it now, not
        after the failure timeout (with `quiet`: once it has not been heard from for
        that long either). Never waits; a node that answers stays."""

    def silent_for(self, node: int) -> float:
        """Seconds since this node last heard `node` (inf: not since it started)."""
