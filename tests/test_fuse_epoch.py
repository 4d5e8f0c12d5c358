"""KernelEpoch (clusterfs/fuse/epoch.py) and the rules of the kernel's name cache in the
FUSE adapter: which answers may be cached, and that a demote of a directory whose names
were handed out for caching raises the epoch before its lock goes."""

from __future__ import annotations

import os
import stat
import struct
from types import SimpleNamespace

import pyfuse3
import pytest
import trio

from clusterfs.format.inode import Inode
from clusterfs.fs.inode import CachedInode
from clusterfs.fuse import operations
from clusterfs.fuse.epoch import FUSE_NOTIFY_INC_EPOCH, KernelEpoch, find_fuse_fd
from clusterfs.fuse.operations import CLUSTER_CACHED_ENTRY_TIMEOUT, Operations

ROOT, D, E, F = 100, 200, 300, 201     # inode numbers: root, two directories, a file in D
INC_EPOCH = struct.pack("<IiQ", 16, FUSE_NOTIFY_INC_EPOCH, 0)


@pytest.fixture
def pipe():
    r, w = os.pipe()
    os.set_blocking(r, False)
    yield r, w
    os.close(r)
    os.close(w)


def _sent(r: int) -> int:
    """How many epoch notifications were written to the pipe."""
    try:
        data = os.read(r, 4096)
    except BlockingIOError:
        return 0
    assert data == INC_EPOCH * (len(data) // 16)
    return len(data) // 16


def test_the_notification_is_one_fuse_out_header(pipe) -> None:
    r, w = pipe
    epoch = KernelEpoch()
    assert epoch.start(fd=w) and epoch.available
    epoch.bump()
    assert _sent(r) == 2                   # the probe at start, and the bump


def test_a_kernel_that_refuses_it_leaves_names_uncached() -> None:
    refusing = os.eventfd(0)               # (a 16-byte write to an eventfd: EINVAL)
    try:
        epoch = KernelEpoch()
        assert not epoch.start(fd=refusing)
        assert not epoch.available
        epoch.bump()                       # nothing to do, nothing raised
    finally:
        os.close(refusing)


def test_the_fuse_descriptor_is_found_only_when_it_is_the_only_one(tmp_path) -> None:
    (tmp_path / "3").symlink_to("/dev/null")
    (tmp_path / "7").symlink_to("/dev/fuse")
    assert find_fuse_fd(str(tmp_path)) == 7
    (tmp_path / "9").symlink_to("/dev/fuse")
    assert find_fuse_fd(str(tmp_path)) is None
    assert find_fuse_fd(str(tmp_path / "missing")) is None


class _FakeFs:
    """What Operations needs of a clustered FileSystem for lookups and demotes."""

    def __init__(self) -> None:
        self.root = ROOT
        self.clustered = True
        self.sb = SimpleNamespace(total_blocks=1 << 20)
        self.kernel_forget = SimpleNamespace(hook=None)
        self.names_hook = None
        self.withdraw_hooks: list = []
        self.nodes = {(D, b"f"): _node(F, stat.S_IFREG | 0o644),
                      (ROOT, b"d"): _node(D, stat.S_IFDIR | 0o755)}

    def when_withdrawn(self, hook) -> None:
        self.withdraw_hooks.append(hook)

    async def lookup(self, parent: int, name: bytes) -> CachedInode | None:
        return self.nodes.get((parent, name))


def _node(ino: int, mode: int) -> CachedInode:
    return CachedInode(Inode(ino=ino, mode=mode, generation=5), lambda blkno: b"")


def _ops(fd: int | None) -> tuple[Operations, _FakeFs]:
    fs = _FakeFs()
    ops = Operations(fs)                   # type: ignore[arg-type]
    if fd is not None:
        ops.epoch.start(fd=fd)
    return ops, fs


def test_looked_up_names_are_cached_and_their_directorys_demote_raises_the_epoch(pipe):
    r, w = pipe
    ops, fs = _ops(w)
    _sent(r)
    entry = trio.run(ops.lookup, pyfuse3.ROOT_INODE, b"d")
    assert entry.entry_timeout == CLUSTER_CACHED_ENTRY_TIMEOUT > 0
    entry = trio.run(ops.lookup, D, b"f")
    assert entry.entry_timeout == CLUSTER_CACHED_ENTRY_TIMEOUT
    assert trio.run(ops.lookup, D, b"missing").entry_timeout == 0   # negatives: never
    fs.names_hook(E)                       # (no name of E was handed out)
    assert _sent(r) == 0
    fs.names_hook(D)                       # D's lock goes: every cached name invalid
    assert _sent(r) == 1
    fs.names_hook(ROOT)                    # (the one raise covered the root's names too)
    assert _sent(r) == 0
    trio.run(ops.lookup, D, b"f")
    fs.names_hook(D)
    assert _sent(r) == 1


def test_without_the_epoch_names_are_not_cached() -> None:
    ops, fs = _ops(None)
    assert trio.run(ops.lookup, D, b"f").entry_timeout == 0
    fs.names_hook(D)                       # nothing to raise, nothing raised


def test_a_withdrawn_node_drops_its_cached_names_and_caches_no_more(pipe):
    r, w = pipe
    ops, fs = _ops(w)
    _sent(r)
    trio.run(ops.lookup, D, b"f")
    for hook in fs.withdraw_hooks:
        hook("test")
    assert _sent(r) == 1
    assert trio.run(ops.lookup, D, b"f").entry_timeout == 0


def test_the_directories_remembered_are_bounded(pipe, monkeypatch):
    """A tree walked with no directory lock going would remember every directory it
    looked names up in: past the bound the epoch is raised and the set starts anew."""
    r, w = pipe
    monkeypatch.setattr(operations, "NAMES_CACHED_DIRS_MAX", 2)
    ops, fs = _ops(w)
    _sent(r)
    fs.nodes[(E, b"g")] = _node(301, stat.S_IFREG | 0o644)
    trio.run(ops.lookup, pyfuse3.ROOT_INODE, b"d")
    trio.run(ops.lookup, D, b"f")
    assert _sent(r) == 0
    trio.run(ops.lookup, E, b"g")          # a third directory: over the bound
    assert _sent(r) == 1
    fs.names_hook(D)                       # (forgotten with the raise: nothing to do)
    assert _sent(r) == 0
    fs.names_hook(E)
    assert _sent(r) == 1
