"""Running trio code from plain pytest tests (there is no pytest-trio here).

``trio_test``   decorator: run an async test function in a fresh trio run.
``wait_until``  poll a condition inside a trio run, failing after a timeout.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

import trio

P = ParamSpec("P")
T = TypeVar("T")


def trio_test(fn: Callable[P, Awaitable[T]]) -> Callable[P, T]:
    """Run an async test function under trio.run; pytest sees a plain function
    with the same signature (so fixtures still reach it)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        return trio.run(functools.partial(fn, *args, **kwargs))

    return wrapper


async def wait_until(pred: Callable[[], object], timeout: float = 5.0,
                     step: float = 0.01) -> None:
    """Return once pred() is true; trio.TooSlowError after timeout seconds."""
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(step)
