"""clusterfs/workers.py: the fixed pool of worker threads a mount starts, and
`run`'s semantics with and without it (those of trio.to_thread.run_sync)."""

from __future__ import annotations

import threading

import pytest
import trio

from clusterfs import workers


@pytest.fixture
def pool():
    p = workers.start(4, 256 << 10, most=6)
    try:
        yield p
    finally:
        workers.stop()


def test_a_call_runs_in_a_pool_thread_and_returns_its_value_or_raises(pool):
    async def main():
        name = await workers.run(lambda: threading.current_thread().name)
        assert name.startswith("clusterfs-worker-")
        with pytest.raises(ZeroDivisionError):
            await workers.run(lambda: 1 / 0)
        assert await workers.run(pow, 2, 10) == 1024

    trio.run(main)


def test_calls_up_to_the_pool_size_start_no_thread_and_more_grow_it_to_most(pool):
    """Four calls blocked at once run on the four threads started with the pool; six
    need two more, which stay; an eighth waits for a thread instead of a seventh."""
    release = threading.Event()

    async def blocked(n: int) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(workers.run, release.wait)
            await trio.sleep(0.3)
            busy = workers.stats()
            release.set()
        return busy

    busy = trio.run(blocked, 4)
    assert busy["threads"] == 4 and busy["started_after_start"] == 0, busy
    release.clear()
    busy = trio.run(blocked, 8)
    assert busy["threads"] == 6 and busy["busy"] == 6, busy
    assert all(t.is_alive() for t in pool.threads)


def test_a_cancelled_caller_waits_for_its_call_unless_it_abandons_it(pool):
    release = threading.Event()
    finished: list[str] = []

    def work(tag: str) -> None:
        release.wait(5)
        finished.append(tag)

    async def cancelled_after(delay: float, tag: str, abandon: bool) -> float:
        started = trio.current_time()
        with trio.move_on_after(delay):
            await workers.run(work, tag, abandon=abandon)
        return trio.current_time() - started

    async def main():
        elapsed = await cancelled_after(0.1, "abandoned", True)
        assert elapsed < 1 and finished == [], (elapsed, finished)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, lambda: (threading.Event().wait(0.5),
                                                                  release.set()))
            elapsed = await cancelled_after(0.1, "waited", False)
        assert elapsed >= 0.4 and "waited" in finished, (elapsed, finished)

    trio.run(main)


def test_without_a_pool_a_call_goes_to_trio_threads():
    assert workers.stats() is None

    async def main():
        return await workers.run(lambda: threading.current_thread().name)

    assert not trio.run(main).startswith("clusterfs-worker-")
