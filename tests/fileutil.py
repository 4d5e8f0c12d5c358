"""Small file operations the POSIX tests repeat: whole-file read and write,
and the errno a call fails with."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def errno_of(fn: Callable[..., Any], *args: Any, **kw: Any) -> int:
    """The errno of the OSError fn(*args, **kw) raises; AssertionError if it succeeds."""
    try:
        fn(*args, **kw)
    except OSError as e:
        return e.errno
    raise AssertionError(f"{getattr(fn, '__name__', fn)}{args} succeeded, expected an error")
