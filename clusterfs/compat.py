"""Differences between the library versions we support (shared by every layer).

trio 0.23 renamed `to_thread.run_sync`'s `cancellable` to `abandon_on_cancel`, and later
releases dropped the old name: a fresh install gets a trio that refuses `cancellable`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")

_ABANDON = ("abandon_on_cancel" if "abandon_on_cancel"
            in inspect.signature(trio.to_thread.run_sync).parameters else "cancellable")


async def run_sync_abandoning(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in a worker thread; if the caller is cancelled the thread is left to
    finish on its own (abandoned) rather than waited for."""
    return await trio.to_thread.run_sync(fn, *args, **{_ABANDON: True})
