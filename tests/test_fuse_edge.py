"""The FUSE edge (clusterfs/fuse/operations.py, _edge): our errors become their errno,
and an EIO answer is said in the log (at most a line every EIO_LOG_EVERY seconds)."""

from __future__ import annotations

import errno
import logging

import pyfuse3
import pytest
import trio

from clusterfs.errors import FSError, LockError
from clusterfs.fuse import operations as ops


@ops._edge
async def _fails(self, exc: Exception) -> None:
    raise exc


def _answer(exc: Exception) -> int:
    async def call() -> int:
        try:
            await _fails(None, exc)
        except pyfuse3.FUSEError as err:
            return err.errno
        raise AssertionError("no FUSEError")
    return trio.run(call)


@pytest.fixture
def eio_log(monkeypatch: pytest.MonkeyPatch):
    fresh = ops._EioLog()
    monkeypatch.setattr(ops, "_eio_log", fresh)
    return fresh


def test_an_eio_answer_is_said_once_in_a_while_with_the_count_left_unsaid(
        eio_log, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.WARNING, logger=ops.log.name)
    assert _answer(LockError("lock on x is not held")) == errno.EIO
    assert _answer(FSError(errno.EIO, "freeing block 9 in group 2")) == errno.EIO
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["_fails: EIO: LockError: lock on x is not held"]
    monkeypatch.setattr(ops, "EIO_LOG_EVERY", 0.0)
    assert _answer(FSError(errno.EIO, "filesystem withdrawn: x")) == errno.EIO
    assert caplog.records[-1].getMessage() == (
        "_fails: EIO: FSError: filesystem withdrawn: x (1 more EIO answers since the "
        "last line)")


def test_other_errnos_are_answered_without_a_word(
        eio_log, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=ops.log.name)
    assert _answer(FSError(errno.ENOENT)) == errno.ENOENT
    assert _answer(FSError(errno.EEXIST)) == errno.EEXIST
    assert not caplog.records
