"""StallWatch: a mount's event loop stopped for REPORT_AFTER or more is counted, and
the loop thread's stack at that moment is logged (what it was doing is what to fix:
a live node whose loop stopped for a second was fenced)."""

from __future__ import annotations

import logging
import time

import pytest
import trio
from trioutil import trio_test

from clusterfs import failover
from clusterfs.node.stallwatch import StallWatch, format_stack


def a_step_that_blocks_the_loop(seconds: float) -> None:
    time.sleep(seconds)


def a_step_that_keeps_the_loop_busy(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


async def _watched(watch: StallWatch, blocks: list[float], caplog,
                   step=a_step_that_blocks_the_loop) -> None:
    """Run the watch while the loop runs, then stops for each of `blocks` seconds
    (running 0.2 s between them)."""
    with caplog.at_level(logging.INFO, logger="clusterfs.node.stallwatch"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch.run)
            await trio.sleep(0.3)                       # running: nothing to say
            assert watch.stalls == 0
            for seconds in blocks:
                step(seconds)
                await trio.sleep(0.2)
            nursery.cancel_scope.cancel()


@pytest.fixture
def no_failover_path(monkeypatch) -> None:
    """No failover path under way (in-process tests before this one may have left a
    phase marked in clusterfs.failover's module state: a membership left silent)."""
    monkeypatch.setattr(failover, "_under_way", {})


@trio_test
async def test_a_stall_is_counted_and_its_stack_logged(caplog, no_failover_path) -> None:
    watch = StallWatch(report_after=0.2)
    await _watched(watch, [0.6], caplog)
    assert watch.stalls == 1
    assert 0.4 <= watch.longest < 5
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2, said
    assert "a_step_that_blocks_the_loop (test_stallwatch.py:" in said[0]
    assert "_watched (test_stallwatch.py:" in said[0]
    # asleep in the kernel (time.sleep: clock_nanosleep, 230 on x86_64), as /proc says
    assert "thread state S, wchan " in said[0] and ", system call " in said[0], said[0]
    assert watch.statistics()["last_stack"] in said[0]
    # then when it ended and what CPU went where: asleep, the loop's thread used none
    assert said[1].startswith("the event loop ran again after 0.")
    loop_cpu = float(said[1].split("its thread used ")[1].split(" s")[0])
    assert loop_cpu < 0.1, said[1]
    assert watch.statistics()["last_cpu"].startswith("stall 0.")


@trio_test
async def test_a_stall_the_loop_spent_computing_says_so(caplog) -> None:
    """A loop busy for the whole stall: its thread's CPU is near the stall's length
    (against a stall in which the process waited for a CPU: near nothing)."""
    watch = StallWatch(report_after=0.2)
    await _watched(watch, [0.6], caplog, step=a_step_that_keeps_the_loop_busy)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2, said
    assert "a_step_that_keeps_the_loop_busy (test_stallwatch.py:" in said[0]
    loop_cpu = float(said[1].split("its thread used ")[1].split(" s")[0])
    process_cpu = float(said[1].split("whole process ")[1].split(" s")[0])
    assert 0.4 <= loop_cpu <= process_cpu + 0.01, said[1]


@trio_test
async def test_during_a_failover_path_the_kernel_state_is_not_read(caplog,
                                                                   monkeypatch) -> None:
    """Reading it opens files under /proc, which the failover path must not."""
    monkeypatch.setattr(failover, "_under_way", {"membership": time.monotonic()})
    watch = StallWatch(report_after=0.2)
    await _watched(watch, [0.6], caplog)
    said = [r.getMessage() for r in caplog.records]
    assert "state not read: a failover path is under way" in said[0], said[0]
    assert "thread state" not in said[0]


@trio_test
async def test_stacks_are_logged_at_most_once_per_quiet_period(caplog) -> None:
    watch = StallWatch(report_after=0.1)
    await _watched(watch, [0.35, 0.35, 0.35], caplog)
    assert watch.stalls == 3
    assert len(caplog.records) == 2      # the first stall's stack, and its CPU when it ended


def test_a_stack_names_functions_and_lines_innermost_first() -> None:
    import sys

    def inner():
        return format_stack(sys._getframe())

    text = inner()
    assert text.startswith("inner (test_stallwatch.py:")
    assert "test_a_stack_names_functions_and_lines_innermost_first" in text.split(" < ")[1]
