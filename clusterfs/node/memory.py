"""The mount's memory reserve: what it takes from the host once, at start, so that
write-back and the failover path (fencing, recovery, replay, re-target) need not ask
the kernel for memory while it may be trying to free memory by writing back through
this very mount (../shared/ARCHITECTURE.md, "Memory discipline"; seeds 002, 003).

- `mlockall` and `PR_SET_IO_FLUSHER` (each refused without privilege: said once, at
  info, and the mount goes on);
- the buffer pool (native/reserve.c) the journal stages its blocks in;
- malloc's heap held (native/heap.c): one arena, requests up to 32 MiB from the heap,
  never trimmed, and half of RESERVE_MIB (`-o reserve_mib`) free in it;
- a reserve of pymalloc arenas (the other half, in slots of 1 MiB) handed to Python's small-object
  allocator only while a failover path is under way, so ordinary growth never
  eats it;
- both topped up every TOP_UP_INTERVAL seconds while no failover path is under way
  (`keep_reserve_topped_up`: objects made during a path may live on in its slots);
- the worker threads (clusterfs/workers.py): WORKERS started now, never stopped.

`meter()` reads what the process has drawn so far (heap bytes, mmapped bytes, arenas
from the kernel, threads); failover.py reads it when a path starts and ends, so each
failover says what it needed from the kernel (`clusterfs status --json`, "failover").
"""

from __future__ import annotations

import logging
import threading

import trio

from clusterfs import failover, workers
from clusterfs.format.block import BLOCK_SIZE
from clusterfs.native import (
    BufferPool,
    arena_stats,
    arenas_for_failover,
    heap_stats,
    hold_heap,
    lock_memory,
    reserve_arenas,
    set_io_flusher,
    top_up_arenas,
    top_up_heap,
)
from clusterfs.node.prepare import WORKER_STACK

log = logging.getLogger("clusterfs.mount")

POOL_BUFFERS = 64
RESERVE_MIB = 64              # -o reserve_mib: half heap headroom, half arena slots
ARENA_SLOT = 1 << 20          # pymalloc's arena on 64-bit CPython 3.10+ (smaller fit too)
WORKERS = 16
TOP_UP_INTERVAL = 1.0

_taken = False
_headroom = 0                 # the heap's, as taken
_topping = threading.Lock()   # held while the reserve is topped up


def reserve_memory(reserve_mib: int | None = None) -> BufferPool:
    """Take the reserve (module doc), `reserve_mib` (RESERVE_MIB) of it for the heap
    and the arenas; the buffer pool. A part the host refuses is logged once at info,
    and the mount goes on without it."""
    global _taken, _headroom
    mib = RESERVE_MIB if reserve_mib is None else reserve_mib
    _headroom = (mib - mib // 2) << 20
    slots = (mib // 2 << 20) // ARENA_SLOT
    for what, take in (("mlockall", lock_memory), ("PR_SET_IO_FLUSHER", set_io_flusher),
                       ("malloc heap hold", lambda: hold_heap(_headroom)),
                       ("pymalloc arena reserve", lambda: reserve_arenas(slots, ARENA_SLOT))):
        try:
            take()
        except OSError as exc:
            # expected without CAP_SYS_RESOURCE / a memlock limit: say it once, calmly
            log.info("memory reserve: %s refused (%s); continuing without it", what,
                     exc.strerror or exc)
    workers.start(WORKERS, WORKER_STACK)
    failover.set_meter(meter, _path_edge)
    _taken = True
    return BufferPool(POOL_BUFFERS, BLOCK_SIZE)


def meter() -> dict[str, int]:
    """What the process has drawn from the kernel so far (failover.set_meter)."""
    heap, arenas = heap_stats(), arena_stats()
    return {"heap_bytes": heap["heap"], "mmapped_bytes": heap["mmapped"],
            "arenas_from_kernel": arenas["from_kernel"],
            "reserve_arenas_taken": arenas["slots_taken"],
            "threads": threading.active_count()}


async def keep_reserve_topped_up() -> None:
    """Restore the heap's headroom after whatever used it, and the arena slots objects
    still pin after a path, outside the failover path (growing the reserve is the very
    request to the kernel the path must not make), in a worker thread (it may touch
    tens of MiB). A refusal is said once. Without the reserve (an in-process lockd of
    the tests) there is nothing to top up."""
    if not _taken:
        return
    refused: set[str] = set()
    while True:
        await trio.sleep(TOP_UP_INTERVAL)
        if not failover.under_way():
            for what in await workers.run(_top_up):
                if what not in refused:
                    refused.add(what)
                    log.warning("memory reserve: %s top-up refused; the reserve stays "
                                "smaller", what)


def _top_up() -> list[str]:
    """Top the reserve up unless a path is under way; what was refused. A path that
    starts meanwhile waits for this to end before it reads the meter (_path_edge), so
    what the top-up took is not counted as the path's."""
    refused = []
    with _topping:
        if failover.under_way():
            return refused
        for what, top_up in (("heap", lambda: top_up_heap(_headroom)),
                             ("arenas", top_up_arenas)):
            try:
                top_up()
            except OSError:
                refused.append(what)
    return refused


def _path_edge(starts: bool) -> None:
    """failover's listener: the arenas go to the reserve while a path is under way;
    a path starts only once a top-up in progress has ended."""
    if starts:
        with _topping:
            pass
    arenas_for_failover(starts)


def report() -> dict[str, object]:
    """The reserve now, for `clusterfs status`."""
    return {"heap": heap_stats(), "arenas": arena_stats(), "workers": workers.stats()}
