"""native/heap.c and node/memory.py: malloc's heap held with headroom, pymalloc's
arena reserve used only during a failover path, and the meter failover.py reads at
each path's start and end. Each case runs in a fresh interpreter: the allocator
settings are process-wide and cannot be undone."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def _run(body: str) -> dict:
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(body)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_the_held_heap_keeps_its_headroom_and_never_shrinks():
    out = _run("""
        import json
        from clusterfs.native import heap_stats, hold_heap
        hold_heap(48 << 20)
        held = heap_stats()
        blobs = [bytes(5000) for _ in range(6000)]        # ~30 MiB through malloc
        used = heap_stats()
        del blobs
        freed = heap_stats()
        print(json.dumps({"held": held, "used": used, "freed": freed}))
    """)
    assert out["held"]["top_free"] >= 48 << 20, out
    assert out["used"]["heap"] == out["held"]["heap"], "30 MiB fit in 48 MiB of headroom"
    assert out["freed"]["heap"] == out["held"]["heap"], "a held heap is never trimmed"
    assert out["freed"]["top_free"] >= 48 << 20, out


def test_arenas_come_from_the_reserve_only_during_a_failover_path():
    out = _run("""
        import json
        from clusterfs.native import arena_stats, arenas_for_failover, reserve_arenas
        from clusterfs.native import top_up_arenas
        reserve_arenas(16)
        outside = [(i, i) for i in range(200_000)]           # ~15 MiB of small objects
        before = arena_stats()
        arenas_for_failover(True)
        during = [(i, i) for i in range(100_000)]
        in_path = arena_stats()
        beyond = [(i, i) for i in range(400_000)]
        over = arena_stats()
        arenas_for_failover(False)
        del during, beyond
        after = arena_stats()
        top_up_arenas()
        topped = arena_stats()
        print(json.dumps({"before": before, "in_path": in_path, "over": over,
                          "after": after, "topped": topped}))
    """)
    before, in_path, over, after, topped = (out[k] for k in ("before", "in_path", "over",
                                                             "after", "topped"))
    assert before["slots_free"] == 16 and before["from_kernel"] > 0, out
    assert in_path["slots_taken"] > 0, out
    assert in_path["from_kernel"] == before["from_kernel"], "within the reserve"
    assert over["slots_free"] == 0 and over["from_kernel_in_failover"] > 0, out
    # freed arenas go back to the reserve; those objects still pin are replaced
    assert 12 <= after["slots_free"] <= 16, out
    assert topped["slots_free"] == 16, out


def test_a_failover_path_records_what_it_drew_from_the_kernel():
    """The mount's meter over two paths: one whose allocations fit the reserve (heap
    headroom, arena slots, idle workers) and one that outgrows it."""
    out = _run("""
        import json, threading
        from clusterfs import failover, workers
        from clusterfs.node import memory
        memory.WORKERS = 2
        memory.reserve_memory(64)                    # 32 MiB of heap, 32 arenas
        failover.enter("membership")
        failover.enter("journal recovery")
        small = [(i, str(i)) for i in range(100_000)] + [bytes(9000) for _ in range(1000)]
        failover.leave("membership")
        failover.leave("journal recovery")
        failover.enter("proxy re-target")
        big = [(i, str(i)) for i in range(600_000)] + [bytes(9000) for _ in range(9000)]
        threading.Thread(target=threading.Event().wait, daemon=True).start()
        failover.leave("proxy re-target")
        print(json.dumps(failover.path_history()))
    """)
    fits, outgrows = out
    assert fits["phases"] == ["membership", "journal recovery"], fits
    assert fits["drawn"]["heap_bytes"] == 0 and fits["drawn"]["arenas_from_kernel"] == 0, fits
    assert fits["drawn"]["reserve_arenas_taken"] > 0 and fits["drawn"]["threads"] == 0, fits
    assert outgrows["drawn"]["heap_bytes"] > 0, outgrows
    assert outgrows["drawn"]["arenas_from_kernel"] > 0, outgrows
    assert outgrows["drawn"]["threads"] == 1, outgrows
