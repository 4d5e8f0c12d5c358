"""The logic of tools/stress: a seeded, reproducible filesystem workload (our fsstress).

It is an outside client of whatever filesystem holds the tree it runs on (ext4, tmpfs,
a clusterfs mount): real syscalls only, standard library only, and it never imports
clusterfs. Its commands (``tools/stress --help``):

``run``     a seeded mix of namespace, data and attribute operations under ``--dir``,
            in one or more processes. Each process works in two places:

            * its *private* directory (``<dir>/<private>/p<i>``), which nothing else
              touches. It keeps a model of that tree (names, kinds, modes, owners,
              xattrs, link counts and every byte of every file) and checks every
              outcome against it: an error the model cannot explain, a success it
              says was impossible, a read that differs from what was written, a stat
              that disagrees, are failures.
            * the *shared* directory (``<dir>/<shared>``), which every process (and
              every node) uses at once with the same names. There the outcomes of
              races (ENOENT, EEXIST, ENOTEMPTY, EINVAL for a directory moved under
              itself, ENODATA) are expected and counted; an ESTALE is repeated once
              (counted as S:ESTALE-repeated: a cluster node's kernel may fail to move
              a busy dentry of a directory another node moved); anything else (EIO,
              a second ESTALE, EDEADLK, EAGAIN, ENOTCONN, ...) is a failure.

            A watchdog thread fails the run when one operation takes longer than
            ``--op-timeout``. Process i uses seed S+i; the op sequence is a function
            of that seed alone (``plan`` prints it), never of outcomes.

``verify``  reads the durability log ``run --log`` wrote and checks that every private
            file whose last record says "fsync" holds exactly the size and sha256
            recorded then (e.g. after a remount or a crash).

``digest``  one hash over a whole tree (names, kinds, sizes, modes, owners, link
            targets, hard-link groups, contents, xattrs; not times or inode
            numbers), to compare the trees several nodes see. An entry it cannot
            read is an error in the hash and in the exit status, never skipped.
            (Contents are hashed as read, except ranges the filesystem reports as
            holes through SEEK_HOLE, which are hashed as the zeros they read as.)

``plan``    prints a process's op sequence without running it.

The durability log is JSON lines, appended with O_APPEND and fsync'd after every
line. ``{"t": "fsync", "path", "size", "sha256", "op", "proc"}`` is written after a
private file's fsync (or fdatasync) returned and its parent directories up to the
private root were fsync'd too, one line per name of the file. ``{"t": "dirty",
"path", "op", "proc"}`` is written, and made durable, *before* any operation that
could change what a clean path holds (a write, truncate, unlink, rename over it or
of a directory above it): from then on that path has no expectation until its next
fsync. The last line per path is the expectation. Shared files are not logged: no
single process knows their content.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import hashlib
import json
import os
import random
import shutil
import socket
import stat
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

KiB = 1 << 10
MiB = 1 << 20
CHUNK = 64 * KiB          # granularity of the content model
ZERO_CHUNK = bytes(CHUNK)
ZERO_MIB = bytes(MiB)

# ----------------------------------------------------------------------------
# the op sequence: a pure function of the seed

# Name pools. Every process (on every node) uses the same names, and a name's
# first letter fixes its kind for ever: dN is a directory, fN a regular file, sN a
# symlink. Renames and exchanges keep the kind. So a path component is always a
# directory or missing, never a symlink the kernel would follow.
DIRS = ("", "d0", "d1", "d0/d0", "d0/d1", "d1/d0")
DIR_WEIGHTS = (4, 3, 3, 1, 1, 1)
# directories no file or symlink is ever created in (but one may be renamed there), so
# that rmdir and rename over an empty directory succeed often enough
EMPTY_DIRS = ("e0", "d0/e0", "d1/e0", "d0/d0/e0")
FILE_NAMES = ("f0", "f1", "f2", "f3")
LINK_NAMES = ("s0", "s1")
XATTR_NAMES = ("user.a", "user.b")
XATTR_TARGETS = ("f0", "f1", "d0/f0", "d0", "d1")   # few, so that gets find what sets set
OWNERS = (0, 1000, 12345, 65534)

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2

OP_WEIGHTS = (
    ("create", 8), ("mkdir", 4), ("rmdir", 3), ("unlink", 5), ("rename", 7),
    ("link", 3), ("symlink", 3), ("write", 8), ("pwrite", 10), ("truncate", 5),
    ("fallocate", 3), ("punch", 3), ("chmod", 3), ("chown", 2), ("utime", 2),
    ("setxattr", 4), ("getxattr", 3), ("removexattr", 2), ("fsync", 4),
    ("fdatasync", 2), ("read", 10), ("readdir", 3), ("readlink", 1),
)
OP_KINDS = tuple(k for k, _ in OP_WEIGHTS)
_KIND_WEIGHTS = tuple(w for _, w in OP_WEIGHTS)

# errnos an op may end with without anything being wrong: in the shared directory
# they are races, in the private one the model must explain them (Worker._plausible)
_ENOENT = frozenset({errno.ENOENT})
EXPECTED = {
    "create": frozenset({errno.ENOENT, errno.EEXIST}),
    "mkdir": frozenset({errno.ENOENT, errno.EEXIST}),
    "rmdir": frozenset({errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST}),
    "rename": frozenset({errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.EINVAL}),
    "link": frozenset({errno.ENOENT, errno.EEXIST, errno.EMLINK}),
    "symlink": frozenset({errno.ENOENT, errno.EEXIST}),
    "setxattr": frozenset({errno.ENOENT, errno.EEXIST, errno.ENODATA}),
    "getxattr": frozenset({errno.ENOENT, errno.ENODATA}),
    "removexattr": frozenset({errno.ENOENT, errno.ENODATA}),
}
# an errno meaning "this filesystem does not do that": counted, not a failure
UNSUPPORTED = {
    "punch": frozenset({errno.EOPNOTSUPP}),
    "fallocate": frozenset({errno.EOPNOTSUPP}),
    "setxattr": frozenset({errno.EOPNOTSUPP}),
    "getxattr": frozenset({errno.EOPNOTSUPP}),
    "removexattr": frozenset({errno.EOPNOTSUPP}),
    "utime": frozenset({errno.EOPNOTSUPP}),
}
# ops that change a file's content or size (the durability log marks its names dirty)
CONTENT_OPS = frozenset({"write", "pwrite", "truncate", "fallocate", "punch"})


@dataclass(frozen=True)
class Op:
    """One operation. Paths are relative to the domain's directory ("P": the
    process's private directory, "S": the shared one)."""

    num: int
    kind: str
    dom: str
    path: str
    path2: str = ""
    off: int = 0
    length: int = 0
    mode: int = 0
    flags: int = 0
    target: str = ""
    xname: str = ""
    uid: int = 0
    gid: int = 0
    atime: int = 0
    mtime: int = 0

    def describe(self) -> str:
        k, where = self.kind, f"{self.dom}:{self.path or '.'}"
        if k == "create":
            return f"create {where} mode={self.mode:o} {'excl' if self.flags == 0 else 'trunc'}"
        if k == "mkdir":
            return f"mkdir {where} mode={self.mode:o}"
        if k == "rename":
            how = {0: "", RENAME_NOREPLACE: " noreplace", RENAME_EXCHANGE: " exchange"}
            return f"rename {where} -> {self.path2}{how[self.flags]}"
        if k == "link":
            return f"link {where} -> {self.path2}"
        if k == "symlink":
            return f"symlink {where} -> {self.target!r}"
        if k == "write":
            at = "append" if self.flags else f"at {self.off}"
            return f"write {where} {self.length} B {at}"
        if k in ("pwrite", "read", "fallocate", "punch"):
            return f"{k} {where} {self.length} B at {self.off}"
        if k == "truncate":
            return f"truncate {where} to {self.length} ({'ftruncate' if self.flags else 'path'})"
        if k == "chmod":
            return f"chmod {where} {self.mode:o}"
        if k == "chown":
            return f"chown {where} {self.uid}:{self.gid}"
        if k == "utime":
            return f"utime {where} atime={self.atime} mtime={self.mtime}"
        if k == "setxattr":
            how = {0: "", os.XATTR_CREATE: " create", os.XATTR_REPLACE: " replace"}
            return f"setxattr {where} {self.xname} {self.length} B{how[self.flags]}"
        if k in ("getxattr", "removexattr"):
            return f"{k} {where} {self.xname}"
        return f"{k} {where}"


def _pick_dir(rng: random.Random, root_ok: bool = True) -> str:
    """A directory to put things in (root_ok) or to create, remove or rename."""
    if root_ok:
        return rng.choices(DIRS, DIR_WEIGHTS)[0]
    if rng.random() < 0.4:
        return rng.choice(EMPTY_DIRS)
    return rng.choices(DIRS[1:], DIR_WEIGHTS[1:])[0]


def _pick_file(rng: random.Random) -> str:
    return _join(_pick_dir(rng), rng.choice(FILE_NAMES))


def _pick_symlink(rng: random.Random) -> str:
    return _join(_pick_dir(rng), rng.choice(LINK_NAMES))


def _pick_any(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.6:
        return _pick_file(rng)
    if r < 0.85:
        return _pick_dir(rng, root_ok=False)
    return _pick_symlink(rng)


def _join(d: str, name: str) -> str:
    return f"{d}/{name}" if d else name


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


def _is_under(path: str, top: str) -> bool:
    """True if ``path`` is ``top`` or inside it (both relative, "" is the root)."""
    return top == "" or path == top or path.startswith(top + "/")


def _size(rng: random.Random) -> int:
    """A write size, 0 B .. 1 MiB, mostly small."""
    r = rng.random()
    if r < 0.05:
        return 0
    if r < 0.45:
        return rng.randint(1, 4 * KiB)
    if r < 0.80:
        return rng.randint(1, 64 * KiB)
    return rng.randint(1, MiB)


def _offset(rng: random.Random, max_offset: int) -> int:
    """A file offset: mostly near the start, sometimes a sparse far one."""
    r = rng.random()
    if r < 0.6:
        return rng.randrange(256 * KiB)
    if r < 0.9:
        return rng.randrange(2 * MiB)
    return rng.randrange(max_offset)


def _make_op(rng: random.Random, num: int, dom: str, max_offset: int,
             weights: tuple[int, ...] = _KIND_WEIGHTS) -> Op:
    kind = rng.choices(OP_KINDS, weights)[0]
    if kind == "create":
        return Op(num, kind, dom, _pick_file(rng), mode=0o600 | rng.randrange(0o200),
                  flags=0 if rng.random() < 0.7 else 1)
    if kind == "mkdir":
        return Op(num, kind, dom, _pick_dir(rng, False), mode=0o700 | rng.randrange(0o100))
    if kind == "rmdir":
        return Op(num, kind, dom, _pick_dir(rng, False))
    if kind == "unlink":
        return Op(num, kind, dom, _pick_symlink(rng) if rng.random() < 0.2 else _pick_file(rng))
    if kind == "rename":
        flags = rng.choices((0, RENAME_NOREPLACE, RENAME_EXCHANGE), (70, 15, 15))[0]
        r = rng.random()
        if r < 0.6:
            a, b = _pick_file(rng), _pick_file(rng)
        elif r < 0.85:
            a, b = _pick_dir(rng, False), _pick_dir(rng, False)
        else:
            a, b = _pick_symlink(rng), _pick_symlink(rng)
        return Op(num, kind, dom, a, b, flags=flags)
    if kind == "link":
        return Op(num, kind, dom, _pick_file(rng), _pick_file(rng))
    if kind == "symlink":
        target = rng.choice((
            lambda: _pick_file(rng), lambda: "../" + _pick_file(rng),
            lambda: "/nonexistent/" + rng.choice(FILE_NAMES),
            lambda: "x" * rng.randint(1, 255)))()
        return Op(num, kind, dom, _pick_symlink(rng), target=target)
    if kind == "write":
        append = rng.random() < 0.3
        return Op(num, kind, dom, _pick_file(rng), off=0 if append else _offset(rng, max_offset),
                  length=_size(rng), mode=0o644, flags=int(append))
    if kind in ("pwrite", "read"):
        return Op(num, kind, dom, _pick_file(rng), off=_offset(rng, max_offset),
                  length=_size(rng))
    if kind == "truncate":
        return Op(num, kind, dom, _pick_file(rng), length=_offset(rng, max_offset),
                  flags=rng.randrange(2))
    if kind in ("fallocate", "punch"):
        return Op(num, kind, dom, _pick_file(rng), off=_offset(rng, max_offset),
                  length=max(1, _size(rng)))
    if kind == "chmod":
        if rng.random() < 0.7:
            return Op(num, kind, dom, _pick_file(rng), mode=0o600 | rng.randrange(0o200))
        return Op(num, kind, dom, _pick_dir(rng, False), mode=0o700 | rng.randrange(0o100))
    if kind == "chown":
        return Op(num, kind, dom, _pick_any(rng), uid=rng.choice(OWNERS),
                  gid=rng.choice(OWNERS))
    if kind == "utime":
        return Op(num, kind, dom, _pick_any(rng),
                  atime=rng.randrange(1 << 31) * 10**9 + rng.randrange(10**9),
                  mtime=rng.randrange(1 << 31) * 10**9 + rng.randrange(10**9))
    if kind == "setxattr":
        flags = rng.choices((0, os.XATTR_CREATE, os.XATTR_REPLACE), (60, 20, 20))[0]
        return Op(num, kind, dom, rng.choice(XATTR_TARGETS), xname=rng.choice(XATTR_NAMES),
                  length=rng.randint(0, 300), flags=flags)
    if kind in ("getxattr", "removexattr"):
        return Op(num, kind, dom, rng.choice(XATTR_TARGETS), xname=rng.choice(XATTR_NAMES))
    if kind in ("fsync", "fdatasync"):
        return Op(num, kind, dom, _pick_file(rng))
    if kind == "readdir":
        return Op(num, kind, dom, _pick_dir(rng))
    assert kind == "readlink", kind
    return Op(num, kind, dom, _pick_symlink(rng))


def generate(seed: int, domains: tuple[str, ...] = ("P", "S"), max_offset: int = 32 * MiB,
             skip: frozenset[str] = frozenset()) -> Iterator[Op]:
    """The endless op sequence of seed ``seed``: a function of its arguments only.
    ``skip`` leaves out some kinds of op (to narrow down a reproduction)."""
    rng = random.Random(seed)
    weights = tuple(0 if k in skip else w for k, w in OP_WEIGHTS)
    if not any(weights):
        raise ValueError("every kind of op skipped")
    num = 0
    while True:
        dom = domains[0] if len(domains) == 1 else rng.choice(domains)
        yield _make_op(rng, num, dom, max_offset, weights)
        num += 1


def plan(seed: int, n: int, domains: tuple[str, ...] = ("P", "S"),
         max_offset: int = 32 * MiB, skip: frozenset[str] = frozenset()) -> list[Op]:
    gen = generate(seed, domains, max_offset, skip)
    return [next(gen) for _ in range(n)]


# ----------------------------------------------------------------------------
# data: every 16 bytes say which op wrote them and for which file offset


def pattern(tag: int, off: int, n: int) -> bytes:
    """``n`` bytes as op ``tag`` writes them at file offset ``off``: each 16-byte
    aligned record holds the tag and its own offset, little-endian."""
    if n <= 0:
        return b""
    start = off & ~15
    t = tag.to_bytes(8, "little")
    data = b"".join([t + o.to_bytes(8, "little") for o in range(start, off + n, 16)])
    return data[off - start:off - start + n]


def make_tag(seed: int, num: int) -> int:
    return ((seed & 0xFFFF) << 48) | (num & 0xFFFFFFFFFFFF)


def explain_bytes(data: bytes, base: int, pos: int) -> str:
    """What the 16-byte record around file offset ``pos`` in ``data`` (which starts at
    file offset ``base``) holds, in words."""
    i = (pos & ~15) - base
    rec = data[max(i, 0):i + 16]
    if len(rec) < 16:
        return f"byte {data[pos - base]:#04x}"
    if rec == bytes(16):
        return "zeros"
    tag, off = struct.unpack("<QQ", rec)
    return f"data of op {tag & 0xFFFFFFFFFFFF} (seed {tag >> 48:#x} mod 2^16) for offset {off}"


def first_difference(a: bytes, b: bytes) -> int:
    """Index of the first byte where a and b differ (they do differ)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while hi - lo > 64:
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    return next(i for i in range(lo, hi) if a[i] != b[i])


# ----------------------------------------------------------------------------
# the private model


class Content:
    """A file's bytes: its size and the 64 KiB chunks ever written (the rest are
    zeros). Invariant: bytes at or beyond ``size`` in a chunk are zero."""

    __slots__ = ("chunks", "size")

    def __init__(self) -> None:
        self.size = 0
        self.chunks: dict[int, bytearray] = {}

    def write(self, off: int, data: bytes) -> None:
        pos, end = off, off + len(data)
        while pos < end:
            idx, within = divmod(pos, CHUNK)
            n = min(CHUNK - within, end - pos)
            chunk = self.chunks.get(idx)
            if chunk is None:
                chunk = self.chunks[idx] = bytearray(CHUNK)
            chunk[within:within + n] = data[pos - off:pos - off + n]
            pos += n
        if data:
            self.size = max(self.size, end)

    def _zero(self, start: int, end: int) -> None:
        pos = start
        while pos < end:
            idx, within = divmod(pos, CHUNK)
            n = min(CHUNK - within, end - pos)
            if n == CHUNK:
                self.chunks.pop(idx, None)
            elif idx in self.chunks:
                self.chunks[idx][within:within + n] = bytes(n)
            pos += n

    def truncate(self, n: int) -> None:
        if n < self.size:
            self._zero(n, self.size)
            for idx in [i for i in self.chunks if i * CHUNK >= n]:
                del self.chunks[idx]
        self.size = n

    def punch(self, off: int, n: int) -> None:
        self._zero(off, min(off + n, self.size))

    def read(self, off: int, n: int) -> bytes:
        end = min(off + n, self.size)
        out = bytearray()
        pos = off
        while pos < end:
            idx, within = divmod(pos, CHUNK)
            k = min(CHUNK - within, end - pos)
            chunk = self.chunks.get(idx)
            out += chunk[within:within + k] if chunk is not None else ZERO_CHUNK[:k]
            pos += k
        return bytes(out)

    def sha256(self) -> str:
        h = hashlib.sha256()
        for idx in range((self.size + CHUNK - 1) // CHUNK):
            k = min(CHUNK, self.size - idx * CHUNK)
            chunk = self.chunks.get(idx)
            h.update(memoryview(chunk)[:k] if chunk is not None else ZERO_CHUNK[:k])
        return h.hexdigest()


class FileNode:
    __slots__ = ("content", "gid", "links", "mode", "uid", "xattrs")

    def __init__(self, mode: int, uid: int, gid: int) -> None:
        self.content = Content()
        self.mode, self.uid, self.gid = mode, uid, gid
        self.links = 1
        self.xattrs: dict[str, bytes] = {}


class DirNode:
    __slots__ = ("children", "gid", "mode", "uid", "xattrs")

    def __init__(self, mode: int, uid: int, gid: int) -> None:
        self.children: dict[str, Node] = {}
        self.mode, self.uid, self.gid = mode, uid, gid
        self.xattrs: dict[str, bytes] = {}


class LinkNode:
    __slots__ = ("gid", "target", "uid")

    def __init__(self, target: str, uid: int, gid: int) -> None:
        self.target, self.uid, self.gid = target, uid, gid


Node = FileNode | DirNode | LinkNode


class Mismatch(Exception):
    """The filesystem did something the private model says it could not have."""


class Model:
    """What the private directory must hold."""

    def __init__(self, mode: int, uid: int, gid: int) -> None:
        self.root = DirNode(mode, uid, gid)

    def lookup(self, path: str) -> Node | None:
        node: Node | None = self.root
        if path:
            for comp in path.split("/"):
                if not isinstance(node, DirNode):
                    return None
                node = node.children.get(comp)
        return node

    def parent_dir(self, path: str) -> DirNode | None:
        node = self.lookup(_parent(path))
        return node if isinstance(node, DirNode) else None

    def walk(self, node: DirNode | None = None, prefix: str = "") -> Iterator[tuple[str, Node]]:
        for name, child in sorted((node or self.root).children.items()):
            path = _join(prefix, name)
            yield path, child
            if isinstance(child, DirNode):
                yield from self.walk(child, path)

    def paths_of(self, obj: Node) -> list[str]:
        return [p for p, n in self.walk() if n is obj]

    def add(self, path: str, node: Node) -> None:
        parent = self.parent_dir(path)
        name = path.rpartition("/")[2]
        if parent is None:
            raise Mismatch(f"{path}: created, but the model has no directory {_parent(path)!r}")
        if name in parent.children:
            raise Mismatch(f"{path}: created, but the model says it already exists")
        parent.children[name] = node

    def remove(self, path: str) -> Node:
        parent = self.parent_dir(path)
        name = path.rpartition("/")[2]
        if parent is None or name not in parent.children:
            raise Mismatch(f"{path}: removed, but the model says it does not exist")
        node = parent.children.pop(name)
        if isinstance(node, FileNode):
            node.links -= 1
        return node

    def file(self, path: str) -> FileNode:
        node = self.lookup(path)
        if not isinstance(node, FileNode):
            raise Mismatch(f"{path}: opened as a file, but the model has "
                           f"{'nothing' if node is None else type(node).__name__}")
        return node

    def rename(self, src: str, dst: str, flags: int) -> None:
        a, b = self.lookup(src), self.lookup(dst)
        if a is None:
            raise Mismatch(f"rename {src} -> {dst} succeeded, but the model has no {src}")
        if a is b and flags != RENAME_NOREPLACE:
            return                            # the same inode: nothing happens
        if flags == RENAME_EXCHANGE:
            if b is None:
                raise Mismatch(f"exchange {src} <-> {dst} succeeded, but the model has no {dst}")
            if _is_under(dst, src) or _is_under(src, dst):
                raise Mismatch(f"exchange {src} <-> {dst} succeeded with one inside the other")
            pa, pb = self.parent_dir(src), self.parent_dir(dst)
            pa.children[src.rpartition("/")[2]] = b
            pb.children[dst.rpartition("/")[2]] = a
            return
        if b is not None:
            if flags == RENAME_NOREPLACE:
                raise Mismatch(f"rename noreplace {src} -> {dst} succeeded over an existing {dst}")
            if isinstance(b, DirNode) and b.children:
                raise Mismatch(f"rename {src} -> {dst} succeeded over a non-empty directory")
            if isinstance(a, DirNode) and _is_under(dst, src):
                raise Mismatch(f"rename {src} -> {dst} moved a directory under itself")
            self.remove(dst)
        elif isinstance(a, DirNode) and _is_under(dst, src):
            raise Mismatch(f"rename {src} -> {dst} moved a directory under itself")
        node = self.remove(src)
        if isinstance(node, FileNode):
            node.links += 1
        self.add(dst, node)


def _kind_of(st_mode: int) -> str:
    if stat.S_ISREG(st_mode):
        return "file"
    if stat.S_ISDIR(st_mode):
        return "dir"
    if stat.S_ISLNK(st_mode):
        return "symlink"
    return "other"


_NODE_KIND = {FileNode: "file", DirNode: "dir", LinkNode: "symlink"}


# ----------------------------------------------------------------------------
# syscalls Python's os module does not have


_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100


def renameat2(src: str, dst: str, flags: int) -> None:
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 not in this libc")
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                   ctypes.c_uint)
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), src, None, dst)


def fallocate(fd: int, mode: int, off: int, length: int) -> None:
    fn = _libc.fallocate64
    fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    if fn(fd, mode, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _write_all(fd: int, data: bytes, off: int | None = None) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view) if off is None else os.pwrite(fd, view, off)
        if n <= 0:
            raise OSError(errno.EIO, f"write returned {n}")
        view = view[n:]
        if off is not None:
            off += n


def _pread_all(fd: int, n: int, off: int) -> bytes:
    parts = []
    while n > 0:
        b = os.pread(fd, n, off)
        if not b:
            break
        parts.append(b)
        n -= len(b)
        off += len(b)
    return b"".join(parts)


def iter_content(fd: int, size: int, block: int = MiB) -> Iterator[tuple[int, bytes | None, int]]:
    """(offset, data, length) pieces covering [0, size) of an open file; data is
    None for a hole the filesystem reports through SEEK_HOLE (it reads as zeros).
    Raises OSError(EIO) if the file ends before ``size``."""
    off = 0
    while off < size:
        try:
            data_at = min(os.lseek(fd, off, os.SEEK_DATA), size)
        except OSError as e:
            if e.errno == errno.ENXIO:
                data_at = size
            elif e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                data_at = off
            else:
                raise
        if data_at > off:
            yield off, None, data_at - off
            off = data_at
            continue
        try:
            end = min(os.lseek(fd, off, os.SEEK_HOLE), size)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENXIO):
                raise
            end = size
        end = max(end, off + 1)
        while off < end:
            data = os.pread(fd, min(block, end - off), off)
            if not data:
                raise OSError(errno.EIO, f"file ends at {off}, before its size {size}")
            yield off, data, len(data)
            off += len(data)


def file_sha256(fd: int, size: int) -> str:
    h = hashlib.sha256()
    for _, data, n in iter_content(fd, size):
        if data is not None:
            h.update(data)
        else:
            while n > 0:
                k = min(n, MiB)
                h.update(ZERO_MIB[:k])
                n -= k
    return h.hexdigest()


# ----------------------------------------------------------------------------
# one worker process


class DurabilityLog:
    """Appends JSON lines and makes each durable before returning."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.lines = 0

    def append(self, rec: dict) -> None:
        os.write(self.fd, (json.dumps(rec, sort_keys=True) + "\n").encode())
        os.fsync(self.fd)
        self.lines += 1

    def close(self) -> None:
        os.close(self.fd)


MAX_FAILURES_PRINTED = 20    # per process, as they happen
MAX_FAILURES_KEPT = 100      # per process, for the summary


@dataclass
class Config:
    root: str                     # the directory under test (absolute)
    index: int = 0                # process index
    seed: int = 0                 # this process's seed (S + index)
    ops: int | None = 1000        # stop after this many ops (None: --duration decides)
    duration: float | None = None
    shared: str | None = "shared"    # relative to root; None: no shared ops
    private: str | None = "private"  # relative to root (p<index> below it); None: none
    log: str | None = None
    op_timeout: float = 60.0
    progress: float = 5.0
    verbose: int = 0
    check_every: int = 250
    max_offset: int = 32 * MiB
    fsync_at_end: bool = False    # fsync (and log) every private file after the last op
    skip: frozenset[str] = frozenset()    # kinds of op left out
    stop_file: str | None = None  # stop before the next op once this path exists


class Worker:
    """Runs one process's op sequence and keeps its counts and failures."""

    def __init__(self, cfg: Config, out=None,
                 on_hang: Callable[[Worker, str], None] | None = None,
                 after_op: Callable[[Worker, Op], None] | None = None) -> None:
        self.cfg = cfg
        self.out = out or sys.stderr
        self.on_hang = on_hang or _exit_on_hang
        self.after_op = after_op
        self.pdir = (os.path.normpath(os.path.join(cfg.root, cfg.private, f"p{cfg.index}"))
                     if cfg.private is not None else None)
        self.sdir = (os.path.normpath(os.path.join(cfg.root, cfg.shared))
                     if cfg.shared is not None else None)
        self.domains = tuple(d for d, where in (("P", self.pdir), ("S", self.sdir)) if where)
        if not self.domains:
            raise ValueError("neither a private nor a shared directory")
        self.uid, self.gid = os.geteuid(), os.getegid()
        self.model = Model(0o755, self.uid, self.gid)
        self.model_ok = True
        self.expect: dict[str, str] = {}     # private path -> "fsync" | "dirty" (as logged)
        self.log = DurabilityLog(cfg.log) if cfg.log and self.pdir else None
        self.renameat2_ok = True
        self.counts: dict[str, Counter] = {k: Counter() for k in OP_KINDS}
        self.expected: Counter = Counter()      # "S:ENOENT" -> n
        self.failures: list[str] = []
        self.nfailures = 0
        self.done = 0
        self.fsync_logged = 0
        self.started = 0.0
        self.elapsed = 0.0
        self._lock = threading.Lock()
        self._op: Op | None = None
        self._op_started: float | None = None
        self._what = ""
        self._stop = threading.Event()
        self.result_fd: int | None = None     # where _exit_on_hang sends the result

    # -- bookkeeping

    def fail(self, op: Op | None, what: str, model_suspect: bool = True) -> None:
        """Record a failure. Unless ``model_suspect`` is False (a hang says nothing
        about the tree), one in the private tree ends the model checks."""
        where = f"op {op.num} ({op.describe()})" if op is not None else "check"
        msg = f"p{self.cfg.index} seed {self.cfg.seed}: {where}: {what}"
        with self._lock:
            self.nfailures += 1
            n = self.nfailures
            if n <= MAX_FAILURES_KEPT:
                self.failures.append(msg)
        if n <= MAX_FAILURES_PRINTED:
            say(self.out, f"stress[p{self.cfg.index}] FAILURE: {msg}")
        elif n == MAX_FAILURES_PRINTED + 1:
            say(self.out, f"stress[p{self.cfg.index}]: more failures; only counted from here")
        if model_suspect and (op is None or op.dom == "P"):
            self._give_up_model()

    def _give_up_model(self) -> None:
        """After a failure in the private tree the model can no longer be trusted:
        stop checking against it, and drop every durability expectation (they would
        no longer be kept up to date)."""
        if not self.model_ok:
            return
        self.model_ok = False
        say(self.out, f"stress[p{self.cfg.index}]: private model checks stop after this failure")
        for path, state in list(self.expect.items()):
            if state == "fsync":
                self._log_dirty(path, self._op.num if self._op else -1)

    def result(self) -> dict:
        return {
            "proc": self.cfg.index, "seed": self.cfg.seed, "ops": self.done,
            "elapsed": self.elapsed or (time.monotonic() - self.started),
            "counts": {k: dict(c) for k, c in self.counts.items() if c},
            "expected": dict(self.expected), "failures": list(self.failures),
            "nfailures": self.nfailures, "fsync_logged": self.fsync_logged,
            "renameat2": self.renameat2_ok,
        }

    # -- set-up

    def setup(self) -> None:
        if self.sdir:
            os.makedirs(self.sdir, exist_ok=True)
        if self.pdir:
            os.makedirs(self.pdir, exist_ok=True)
            if os.listdir(self.pdir):
                raise RuntimeError(f"{self.pdir} is not empty (run with --reset to clear it)")
            os.chmod(self.pdir, 0o755)
            for d in _ancestors(self.pdir, self.cfg.root):
                _fsync_dir(d)
            self._probe_renameat2(self.pdir)
        if self.log:
            self.log.append({"t": "start", "proc": self.cfg.index, "seed": self.cfg.seed,
                             "root": self.cfg.root,
                             "private": os.path.relpath(self.pdir, self.cfg.root)})

    def _probe_renameat2(self, d: str) -> None:
        a, b, c = (os.path.join(d, f".probe-{x}") for x in "abc")
        try:
            for p in (a, b):
                os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            renameat2(a, c, RENAME_NOREPLACE)
            renameat2(c, b, RENAME_EXCHANGE)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            self.renameat2_ok = False
        finally:
            for p in (a, b, c):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)

    # -- the loop

    def run(self) -> dict:
        cfg = self.cfg
        os.umask(0)
        self.setup()
        watchdog = threading.Thread(target=self._watch, name="stress-watchdog", daemon=True)
        watchdog.start()
        self.started = time.monotonic()
        deadline = self.started + cfg.duration if cfg.duration else None
        next_progress = self.started + cfg.progress
        try:
            for op in generate(cfg.seed, self.domains, cfg.max_offset, cfg.skip):
                if cfg.ops is not None and op.num >= cfg.ops:
                    break
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                if cfg.stop_file is not None and os.path.exists(cfg.stop_file):
                    break
                if cfg.verbose >= 2 or (cfg.verbose and op.num < 20):
                    say(self.out, f"stress[p{cfg.index}] op {op.num}: {op.describe()}")
                self._do(op)
                self.done += 1
                if cfg.check_every and self.done % cfg.check_every == 0:
                    self._timed(None, "tree check", lambda: self.check_tree(contents=False))
                if now >= next_progress:
                    say(self.out, self.progress_line(now))
                    next_progress = now + cfg.progress
            if cfg.fsync_at_end:
                self._fsync_all()
            self._timed(None, "final tree check", lambda: self.check_tree(contents=True))
        finally:
            self._stop.set()
            self.elapsed = time.monotonic() - self.started
            if self.log:
                self.log.close()
        return self.result()

    def _fsync_all(self) -> None:
        """fsync every private file once, as ops numbered on from the last one, so the
        durability log ends with an expectation for every file."""
        if not self.pdir or not self.model_ok:
            return
        seen: set[int] = set()
        files = [(p, n) for p, n in self.model.walk() if isinstance(n, FileNode)]
        for path, node in files:
            if id(node) not in seen:
                seen.add(id(node))
                self._do(Op(self.done, "fsync", "P", path))
                self.done += 1

    def progress_line(self, now: float) -> str:
        el = max(now - self.started, 1e-9)
        exp = " ".join(f"{k}={v}" for k, v in sorted(self.expected.items())) or "-"
        uns = " ".join(f"{k}={c['unsupported']}" for k, c in self.counts.items()
                       if c["unsupported"]) or "-"
        total = f"/{self.cfg.ops}" if self.cfg.ops is not None else ""
        return (f"stress[p{self.cfg.index}] {self.done}{total} ops, {self.done / el:.0f} ops/s, "
                f"expected: {exp}; unsupported: {uns}; failures: {self.nfailures}")

    def _timed(self, op: Op | None, what: str, fn: Callable[[], object]) -> object:
        with self._lock:
            self._op, self._op_started, self._what = op, time.monotonic(), what
        try:
            return fn()
        finally:
            with self._lock:
                self._op_started = None

    def _tick(self, what: str) -> None:
        """A long check makes progress: restart the watchdog's clock for its next step."""
        with self._lock:
            if self._op_started is not None:
                self._op_started, self._what = time.monotonic(), what

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            with self._lock:
                started, op, what = self._op_started, self._op, self._what
            if started is None:
                continue
            el = time.monotonic() - started
            if el > self.cfg.op_timeout:
                desc = f"op {op.num} ({op.describe()})" if op is not None else what
                msg = (f"hang: {desc} has been running for {el:.1f}s "
                       f"(--op-timeout {self.cfg.op_timeout:g})")
                self.fail(op, msg, model_suspect=False)
                self.on_hang(self, msg)
                with self._lock:
                    if self._op_started == started:
                        self._op_started = None     # report each hang once

    # -- one op

    def _path(self, op: Op, rel: str) -> str:
        base = self.pdir if op.dom == "P" else self.sdir
        return os.path.join(base, rel) if rel else base

    def _syscalls_retrying_estale(self, op: Op):
        """The op's syscalls; in the shared directory an ESTALE is repeated once, as an
        application would: a cluster node's kernel cannot always move the dentry of a
        directory another node moved while it is busy here (README, "Failure
        behaviour"). Counted as S:ESTALE-repeated; a second ESTALE is a failure."""
        try:
            return self._syscalls(op)
        except OSError as e:
            if op.dom != "S" or e.errno != errno.ESTALE:
                raise
        self.expected["S:ESTALE-repeated"] += 1
        time.sleep(0.05)
        return self._syscalls(op)

    def _do(self, op: Op) -> None:
        c = self.counts[op.kind]
        c["done"] += 1
        private = op.dom == "P" and self.model_ok
        if private and self.log:
            self._mark_dirty(op)
        if op.kind == "rename" and op.flags and not self.renameat2_ok:
            c["unsupported"] += 1
            return
        try:
            got = self._timed(op, op.kind, lambda: self._syscalls_retrying_estale(op))
            if self.after_op is not None:
                self._timed(op, "after_op", lambda: self.after_op(self, op))
        except OSError as e:
            self._error(op, e, private)
            return
        c["ok"] += 1
        if private and self.model_ok:
            try:
                self._apply(op, got)
                self._check_paths(op)
            except Mismatch as m:
                self.fail(op, str(m))

    def _error(self, op: Op, e: OSError, private: bool) -> None:
        c = self.counts[op.kind]
        code = e.errno or 0
        name = errno.errorcode.get(code, str(code))
        if code in UNSUPPORTED.get(op.kind, ()) or (
                op.kind == "chown" and code == errno.EPERM and self.uid != 0):
            c["unsupported"] += 1
        elif code in EXPECTED.get(op.kind, _ENOENT):
            if private:
                why = self._implausible(op, code)
                if why is not None:
                    c["failed"] += 1
                    self.fail(op, f"{name} but {why}")
                    return
            c["expected"] += 1
            self.expected[f"{op.dom}:{name}"] += 1
        else:
            c["failed"] += 1
            self.fail(op, f"{name}: {e}")
            return
        if private and self.model_ok:
            try:
                self._check_paths(op)
            except Mismatch as m:
                self.fail(op, str(m))

    def _syscalls(self, op: Op) -> object:
        """Do the op. Returns what was read, for the model to check."""
        k, p = op.kind, self._path(op, op.path)
        nf = os.O_NOFOLLOW | os.O_CLOEXEC
        if k == "create":
            fl = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if op.flags == 0 else os.O_TRUNC)
            os.close(os.open(p, fl | nf, op.mode))
        elif k == "mkdir":
            os.mkdir(p, op.mode)
        elif k == "rmdir":
            os.rmdir(p)
        elif k == "unlink":
            os.unlink(p)
        elif k == "rename":
            if op.flags:
                renameat2(p, self._path(op, op.path2), op.flags)
            else:
                os.rename(p, self._path(op, op.path2))
        elif k == "link":
            os.link(p, self._path(op, op.path2), follow_symlinks=False)
        elif k == "symlink":
            os.symlink(op.target, p)
        elif k in ("write", "pwrite", "truncate", "fallocate", "punch", "fsync", "fdatasync"):
            return self._file_op(op, p, nf)
        elif k == "read":
            fd = os.open(p, os.O_RDONLY | nf)
            try:
                return _pread_all(fd, op.length, op.off)
            finally:
                os.close(fd)
        elif k == "chmod":
            os.chmod(p, op.mode)
        elif k == "chown":
            os.chown(p, op.uid, op.gid, follow_symlinks=False)
        elif k == "utime":
            os.utime(p, ns=(op.atime, op.mtime), follow_symlinks=False)
        elif k == "setxattr":
            value = pattern(make_tag(self.cfg.seed, op.num), 0, op.length)
            os.setxattr(p, op.xname, value, op.flags, follow_symlinks=False)
        elif k == "getxattr":
            return os.getxattr(p, op.xname, follow_symlinks=False)
        elif k == "removexattr":
            os.removexattr(p, op.xname, follow_symlinks=False)
        elif k == "readdir":
            return os.listdir(p)
        elif k == "readlink":
            return os.readlink(p)
        else:
            raise AssertionError(k)
        return None

    def _file_op(self, op: Op, p: str, nf: int) -> object:
        k = op.kind
        if k == "truncate" and op.flags == 0:
            os.truncate(p, op.length)
            return None
        if k == "write":
            fl = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if op.flags else 0)
            fd = os.open(p, fl | nf, op.mode)
        else:
            # O_RDWR, not O_WRONLY: glibc's posix_fallocate emulation (for filesystems
            # without fallocate) preads the file first
            fd = os.open(p, (os.O_RDONLY if k in ("fsync", "fdatasync") else os.O_RDWR) | nf)
        try:
            if k == "write":
                data = pattern(make_tag(self.cfg.seed, op.num),
                               self._append_at(op) if op.flags else op.off, op.length)
                if not op.flags:
                    os.lseek(fd, op.off, os.SEEK_SET)
                _write_all(fd, data)
                return os.lseek(fd, 0, os.SEEK_CUR) - len(data)   # where it landed
            if k == "pwrite":
                _write_all(fd, pattern(make_tag(self.cfg.seed, op.num), op.off, op.length),
                           op.off)
            elif k == "truncate":
                os.ftruncate(fd, op.length)
            elif k == "fallocate":
                os.posix_fallocate(fd, op.off, op.length)
            elif k == "punch":
                fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, op.off, op.length)
            elif k == "fsync":
                os.fsync(fd)
            else:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        if k in ("fsync", "fdatasync") and op.dom == "P" and self.model_ok and self.log:
            self._log_fsync(op)
        return None

    def _append_at(self, op: Op) -> int:
        """Where an O_APPEND write will land, for the data pattern: the model's size
        in the private tree, the current size in the shared one (racy, harmless)."""
        if op.dom == "P" and self.model_ok:
            node = self.model.lookup(op.path)
            return node.content.size if isinstance(node, FileNode) else 0
        try:
            return os.stat(self._path(op, op.path)).st_size
        except OSError:
            return 0

    # -- the model: successes

    def _apply(self, op: Op, got: object) -> None:
        m, k, p = self.model, op.kind, op.path
        if k == "create":
            node = m.lookup(p)
            if op.flags == 0 or node is None:
                m.add(p, FileNode(op.mode, self.uid, self.gid))
            else:
                m.file(p).content.truncate(0)
        elif k == "mkdir":
            m.add(p, DirNode(op.mode, self.uid, self.gid))
        elif k == "rmdir":
            node = m.lookup(p)
            if not isinstance(node, DirNode) or node.children:
                raise Mismatch(f"rmdir {p} succeeded, but the model has "
                               f"{'a non-empty directory' if node else 'nothing'} there")
            m.remove(p)
        elif k == "unlink":
            if isinstance(m.lookup(p), DirNode):
                raise Mismatch(f"unlink {p} succeeded on a directory")
            m.remove(p)
        elif k == "rename":
            m.rename(p, op.path2, op.flags)
        elif k == "link":
            node = m.file(p)
            m.add(op.path2, node)
            node.links += 1
        elif k == "symlink":
            m.add(p, LinkNode(op.target, self.uid, self.gid))
        elif k == "write":
            if m.lookup(p) is None:
                m.add(p, FileNode(op.mode, self.uid, self.gid))
            f = m.file(p)
            at = f.content.size if op.flags else op.off
            if op.length and got != at:
                raise Mismatch(f"{p}: the write landed at offset {got}, not {at}")
            f.content.write(at, pattern(make_tag(self.cfg.seed, op.num), at, op.length))
        elif k == "pwrite":
            m.file(p).content.write(op.off, pattern(make_tag(self.cfg.seed, op.num),
                                                    op.off, op.length))
        elif k == "truncate":
            m.file(p).content.truncate(op.length)
        elif k == "fallocate":
            c = m.file(p).content
            c.size = max(c.size, op.off + op.length)
        elif k == "punch":
            m.file(p).content.punch(op.off, op.length)
        elif k in ("fsync", "fdatasync"):
            m.file(p)
        elif k == "read":
            want = m.file(p).content.read(op.off, op.length)
            if got != want:
                raise Mismatch(self._data_diff(p, op.off, want, got))
        elif k == "chmod":
            self._need(p).mode = op.mode
        elif k == "chown":
            node = self._need(p)
            node.uid, node.gid = op.uid, op.gid
        elif k == "utime":
            self._need(p)
        elif k == "setxattr":
            node = self._need(p)
            if op.flags == os.XATTR_CREATE and op.xname in node.xattrs:
                raise Mismatch(f"setxattr create {op.xname} succeeded over an existing value")
            if op.flags == os.XATTR_REPLACE and op.xname not in node.xattrs:
                raise Mismatch(f"setxattr replace {op.xname} succeeded with no value there")
            node.xattrs[op.xname] = pattern(make_tag(self.cfg.seed, op.num), 0, op.length)
        elif k == "getxattr":
            want = self._need(p).xattrs.get(op.xname)
            if got != want:
                raise Mismatch(f"{p}: getxattr {op.xname} gave {len(got)} B "
                               f"{'that differ from' if want else 'but the model has no'} "
                               f"the value set")
        elif k == "removexattr":
            node = self._need(p)
            if node.xattrs.pop(op.xname, None) is None:
                raise Mismatch(f"removexattr {op.xname} succeeded with no value there")
        elif k == "readdir":
            node = m.lookup(p)
            if not isinstance(node, DirNode):
                raise Mismatch(f"readdir {p} succeeded, but the model has no directory there")
            if sorted(got) != sorted(node.children):
                raise Mismatch(f"readdir {p}: {sorted(got)}, the model has {sorted(node.children)}")
        elif k == "readlink":
            node = m.lookup(p)
            if not isinstance(node, LinkNode) or got != node.target:
                raise Mismatch(f"readlink {p}: {got!r}, the model has "
                               f"{node.target if isinstance(node, LinkNode) else node!r}")

    def _need(self, path: str) -> Node:
        node = self.model.lookup(path)
        if node is None:
            raise Mismatch(f"{path}: succeeded, but the model says it does not exist")
        return node

    @staticmethod
    def _data_diff(path: str, off: int, want: bytes, got: bytes) -> str:
        if len(got) != len(want):
            head = f"{path}: read {len(got)} B at {off}, the model has {len(want)} B"
            if want[:len(got)] == got or got[:len(want)] == want:
                return head + " (the common part is equal)"
        else:
            head = f"{path}: read {len(got)} B at {off} differ from the model"
        i = first_difference(want, got)
        return (f"{head}; first difference at file offset {off + i}: expected "
                f"{explain_bytes(want, off, off + i) if i < len(want) else 'EOF'}, found "
                f"{explain_bytes(got, off, off + i) if i < len(got) else 'EOF'}")

    # -- the model: errors

    def _implausible(self, op: Op, code: int) -> str | None:
        """Why the model says ``op`` could not have failed with ``code`` (None: it could)."""
        m, k, p, p2 = self.model, op.kind, op.path, op.path2
        node = m.lookup(p)
        other = m.lookup(p2) if p2 else None
        if code == errno.ENOENT:
            if k in ("create", "mkdir", "symlink", "write"):
                ok = m.parent_dir(p) is None
                return None if ok else f"the model has the directory of {p}"
            if k in ("rename", "link") and node is not None:
                if k == "rename" and op.flags == RENAME_EXCHANGE:
                    return None if other is None else f"the model has {p} and {p2}"
                ok = m.parent_dir(p2) is None
                return None if ok else f"the model has {p} and the directory of {p2}"
            return None if node is None else f"the model has {p}"
        if code == errno.EEXIST:
            if k in ("create", "mkdir", "symlink"):
                return None if node is not None else f"the model has no {p}"
            if k == "link":
                return None if other is not None else f"the model has no {p2}"
            if k == "rename":
                if other is not None and (op.flags == RENAME_NOREPLACE or
                                          isinstance(other, DirNode) and other.children):
                    return None
                return f"the model has {'no ' + p2 if other is None else p2 + ' replaceable'}"
            if k == "rmdir":
                return None if isinstance(node, DirNode) and node.children else \
                    f"the model has {p} empty"
            if k == "setxattr":
                ok = op.flags == os.XATTR_CREATE and isinstance(node, FileNode | DirNode) \
                    and op.xname in node.xattrs
                return None if ok else f"the model has no {op.xname} or no XATTR_CREATE"
        if code == errno.ENOTEMPTY:
            if k == "rmdir":
                target = node
            elif k == "rename" and op.flags != RENAME_EXCHANGE:
                target = other
            else:
                return "ENOTEMPTY is not an outcome of this op"
            ok = isinstance(target, DirNode) and target.children
            return None if ok else "the model has no non-empty directory there"
        if code == errno.EINVAL and k == "rename":
            ok = (isinstance(node, DirNode) and p != p2 and _is_under(p2, p)) or (
                op.flags == RENAME_EXCHANGE and isinstance(other, DirNode) and p != p2
                and _is_under(p, p2))
            return None if ok else "neither directory is inside the other"
        if code == errno.ENODATA:
            ok = node is not None and not isinstance(node, LinkNode) and \
                op.xname not in node.xattrs
            return None if ok else f"the model has {op.xname} set on {p}"
        if code == errno.EMLINK:
            return None
        return "the model cannot explain it"

    # -- the model: checks against the real tree

    def _check_paths(self, op: Op) -> None:
        for rel in (op.path, op.path2) if op.path2 else (op.path,):
            self._check_one(rel, self.model.lookup(rel), op)

    def _check_one(self, rel: str, node: Node | None, op: Op | None = None) -> None:
        try:
            st = os.lstat(os.path.join(self.pdir, rel))
        except FileNotFoundError:
            if node is not None:
                raise Mismatch(f"{rel}: missing, the model has a {_NODE_KIND[type(node)]}") \
                    from None
            return
        kind = _kind_of(st.st_mode)
        if node is None:
            raise Mismatch(f"{rel}: there is a {kind}, the model has nothing")
        want = _NODE_KIND[type(node)]
        if kind != want:
            raise Mismatch(f"{rel}: a {kind}, the model has a {want}")
        bad = []
        if (st.st_uid, st.st_gid) != (node.uid, node.gid):
            bad.append(f"owner {st.st_uid}:{st.st_gid} not {node.uid}:{node.gid}")
        if not isinstance(node, LinkNode) and stat.S_IMODE(st.st_mode) != node.mode:
            bad.append(f"mode {stat.S_IMODE(st.st_mode):o} not {node.mode:o}")
        if isinstance(node, FileNode):
            if st.st_size != node.content.size:
                bad.append(f"size {st.st_size} not {node.content.size}")
            if st.st_nlink != node.links:
                bad.append(f"{st.st_nlink} links not {node.links}")
        if op is not None and op.kind == "utime" and rel == op.path and \
                (st.st_atime_ns, st.st_mtime_ns) != (op.atime, op.mtime):
            bad.append(f"times {st.st_atime_ns},{st.st_mtime_ns} not {op.atime},{op.mtime}")
        if bad:
            raise Mismatch(f"{rel}: " + ", ".join(bad))

    def check_tree(self, contents: bool) -> None:
        """The whole private tree against the model (names, kinds, attributes,
        xattrs; with ``contents`` every byte of every file too)."""
        if not self.pdir or not self.model_ok:
            return
        try:
            self._check_dir("", self.model.root, contents)
        except Mismatch as m:
            self.fail(None, f"tree check: {m}")
        except OSError as e:
            self.fail(None, f"tree check: {errno.errorcode.get(e.errno, e.errno)}: {e}")

    def _check_dir(self, rel: str, node: DirNode, contents: bool) -> None:
        real = sorted(os.listdir(os.path.join(self.pdir, rel)))
        if real != sorted(node.children):
            raise Mismatch(f"directory {rel or '.'}: {real}, the model has "
                           f"{sorted(node.children)}")
        for name, child in sorted(node.children.items()):
            path = _join(rel, name)
            self._tick(f"tree check at {path}")
            self._check_one(path, child)
            full = os.path.join(self.pdir, path)
            if isinstance(child, LinkNode):
                if os.readlink(full) != child.target:
                    raise Mismatch(f"{path}: symlink to {os.readlink(full)!r}, not "
                                   f"{child.target!r}")
                continue
            try:
                names = {x for x in os.listxattr(full, follow_symlinks=False)
                         if x.startswith("user.")}
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    raise
                names = set()
            if names != set(child.xattrs):
                raise Mismatch(f"{path}: xattrs {sorted(names)}, the model has "
                               f"{sorted(child.xattrs)}")
            for x in names:
                if os.getxattr(full, x, follow_symlinks=False) != child.xattrs[x]:
                    raise Mismatch(f"{path}: xattr {x} differs from the model")
            if isinstance(child, DirNode):
                self._check_dir(path, child, contents)
            elif contents:
                self._check_content(path, full, child.content)

    def _check_content(self, rel: str, full: str, content: Content) -> None:
        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            for off, data, n in iter_content(fd, content.size):
                self._tick(f"tree check at {rel}, offset {off}")
                want = content.read(off, n)
                got = data if data is not None else bytes(n)
                if got != want:
                    raise Mismatch(self._data_diff(rel, off, want, got))
        finally:
            os.close(fd)

    # -- durability log

    def _private_rel(self, path: str) -> str:
        return os.path.relpath(os.path.join(self.pdir, path), self.cfg.root)

    def _log_dirty(self, path: str, num: int) -> None:
        self.log.append({"t": "dirty", "path": self._private_rel(path), "op": num,
                         "proc": self.cfg.index})
        self.expect[path] = "dirty"

    def _mark_dirty(self, op: Op) -> None:
        """Before ``op`` runs: make dirty every clean logged path it might change."""
        clean = [q for q, s in self.expect.items() if s == "fsync"]
        if not clean:
            return
        hit: set[str] = set()
        if op.kind in CONTENT_OPS or (op.kind == "create" and op.flags):
            node = self.model.lookup(op.path)
            if isinstance(node, FileNode):
                hit.update(self.model.paths_of(node))
            hit.add(op.path)
        elif op.kind in ("unlink", "rmdir", "rename"):
            tops = [op.path, op.path2] if op.kind == "rename" else [op.path]
            hit.update(q for q in clean if any(_is_under(q, t) for t in tops))
        for q in sorted(hit):
            if self.expect.get(q) == "fsync":
                self._log_dirty(q, op.num)

    def _log_fsync(self, op: Op) -> None:
        """After a private file's fsync returned: make its names durable (fsync the
        directories up to the private root) and record what it holds."""
        node = self.model.lookup(op.path)
        if not isinstance(node, FileNode):
            return       # the model disagrees: _apply reports it
        size, digest = node.content.size, node.content.sha256()
        for path in self.model.paths_of(node):
            for d in _ancestors(os.path.join(self.pdir, path), self.pdir):
                _fsync_dir(d)
            self.log.append({"t": "fsync", "path": self._private_rel(path), "size": size,
                             "sha256": digest, "op": op.num, "proc": self.cfg.index})
            self.expect[path] = "fsync"
            self.fsync_logged += 1


def say(out, line: str) -> None:
    """Write one line to ``out`` in a single write(2) where it has a file descriptor, so
    lines of processes sharing a pipe do not interleave."""
    try:
        fd = out.fileno()
    except (AttributeError, OSError, ValueError):
        out.write(line + "\n")
        return
    out.flush()
    os.write(fd, (line + "\n").encode(errors="backslashreplace"))


def _ancestors(path: str, top: str) -> list[str]:
    """The directories from ``path``'s parent up to and including ``top`` (``path``
    is ``top`` joined with a relative path, both normalized)."""
    out = []
    d = os.path.dirname(path)
    while True:
        out.append(d)
        if d == top or d == os.path.dirname(d):
            return out
        d = os.path.dirname(d)


def _fsync_dir(d: str) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exit_on_hang(worker: Worker, msg: str) -> None:
    """The default when an op hangs: report, hand the result to the parent, exit 3."""
    say(worker.out, f"stress[p{worker.cfg.index}] {msg}; giving up")
    if worker.result_fd is not None:
        with contextlib.suppress(OSError):
            os.write(worker.result_fd, json.dumps(worker.result()).encode())
    os._exit(3)


# ----------------------------------------------------------------------------
# several processes, and the summary


def run_procs(cfgs: list[Config], out=None) -> list[dict]:
    """Run one Worker per config, each in a forked child; their results in order.

    A child that dies without a result (killed, crashed) counts as a failure."""
    out = out or sys.stderr
    children = []
    for cfg in cfgs:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:          # the child
            status = 1
            try:
                os.close(r)
                worker = Worker(cfg, out=out)
                worker.result_fd = w
                res = worker.run()
                os.write(w, json.dumps(res).encode())
                status = 0
            except BaseException as e:  # noqa: BLE001 - the child must exit, not return
                say(out, f"stress[p{cfg.index}]: {type(e).__name__}: {e}")
                with contextlib.suppress(OSError):
                    os.write(w, json.dumps({"proc": cfg.index, "seed": cfg.seed,
                                            "error": f"{type(e).__name__}: {e}"}).encode())
            finally:
                out.flush()
                os._exit(status)
        os.close(w)
        children.append((cfg, pid, r))
    results = []
    try:
        for cfg, pid, r in children:
            with os.fdopen(r, "rb") as f:
                data = f.read()
            _, status = os.waitpid(pid, 0)
            try:
                res = json.loads(data)
            except ValueError:
                res = {"proc": cfg.index, "seed": cfg.seed,
                       "error": f"exited ({_status_text(status)}) without a result"}
            if "error" in res:
                res.setdefault("failures", []).append(f"p{cfg.index}: {res['error']}")
                res["nfailures"] = res.get("nfailures", 0) + 1
            results.append(res)
    except BaseException:
        for _, pid, _ in children:
            with contextlib.suppress(ChildProcessError, ProcessLookupError):
                os.kill(pid, 15)
                os.waitpid(pid, 0)
        raise
    return results


def _status_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"status {os.WEXITSTATUS(status)}"


def summary(results: list[dict]) -> tuple[str, int]:
    """The final report of a run and its failure count."""
    counts: dict[str, Counter] = {k: Counter() for k in OP_KINDS}
    expected: Counter = Counter()
    failures: list[str] = []
    nfail = ops = logged = 0
    elapsed = 0.0
    for r in results:
        for k, c in r.get("counts", {}).items():
            counts[k].update(c)
        expected.update(r.get("expected", {}))
        failures += r.get("failures", [])
        nfail += r.get("nfailures", 0)
        ops += r.get("ops", 0)
        logged += r.get("fsync_logged", 0)
        elapsed = max(elapsed, r.get("elapsed", 0.0))
    seeds = ",".join(str(r.get("seed")) for r in results)
    lines = [f"stress: {len(results)} process(es), seeds {seeds}: {ops} ops in {elapsed:.1f} s "
             f"({ops / max(elapsed, 1e-9):.0f} ops/s), {logged} fsync records logged",
             f"  {'op':<12}{'done':>7}{'ok':>7}{'expected':>9}{'unsupp':>7}{'failed':>7}"]
    for k in OP_KINDS:
        c = counts[k]
        if c["done"]:
            lines.append(f"  {k:<12}{c['done']:>7}{c['ok']:>7}{c['expected']:>9}"
                         f"{c['unsupported']:>7}{c['failed']:>7}")
    lines.append("  expected outcomes (P: private, S: shared/races): "
                 + (" ".join(f"{k}={v}" for k, v in sorted(expected.items())) or "none"))
    lines += [f"  p{r['proc']}: renameat2 flags unsupported here; those renames counted "
              "as unsupported" for r in results if r.get("renameat2") is False]
    lines += [f"  FAILURE {f}" for f in failures]
    if nfail > len(failures):
        lines.append(f"  ... and {nfail - len(failures)} more failures")
    lines.append(f"stress: {nfail} failure(s)")
    return "\n".join(lines), nfail


# ----------------------------------------------------------------------------
# verify


def verify(log_path: str, root: str | None = None, out=None) -> tuple[int, str]:
    """Check a durability log against the tree. Returns (exit status, summary line);
    each failing path is printed to ``out`` first."""
    out = out or sys.stdout
    last: dict[str, dict] = {}
    log_root = None
    with open(log_path) as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    for i, (lineno, line) in enumerate(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            # a torn last line from a crash mid-append was never fsync'd, so nothing
            # depended on it; anywhere else it is a broken log
            if i != len(lines) - 1:
                raise ValueError(f"{log_path}:{lineno}: not JSON") from None
            print(f"verify: ignoring a torn last line {lineno}", file=out)
            break
        if rec.get("t") in ("run", "start"):
            log_root = log_root or rec["root"]
        elif rec.get("t") in ("fsync", "dirty"):
            last[rec["path"]] = rec
    base = root or log_root
    if base is None:
        return 2, "verify: the log names no root and --root was not given"
    ok = dirty = failed = 0
    for rel, rec in sorted(last.items()):
        if rec["t"] == "dirty":
            dirty += 1
            continue
        why = _check_logged(os.path.join(base, rel), rec)
        if why is None:
            ok += 1
        else:
            failed += 1
            print(f"verify: FAILED {rel}: {why} (fsync'd at op {rec['op']} of p{rec['proc']})",
                  file=out)
    line = (f"verify: {len(last)} paths: {ok} ok, {dirty} dirty (changed after their last "
            f"fsync, not checked), {failed} failed")
    return (1 if failed else 0), line


def _check_logged(path: str, rec: dict) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        return f"cannot open: {errno.errorcode.get(e.errno, e.errno)}"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return f"not a regular file ({_kind_of(st.st_mode)})"
        if st.st_size != rec["size"]:
            return f"size {st.st_size}, fsync'd with {rec['size']}"
        digest = file_sha256(fd, st.st_size)
        if digest != rec["sha256"]:
            return f"content differs (sha256 {digest[:16]}..., fsync'd {rec['sha256'][:16]}...)"
    except OSError as e:
        return f"read error: {errno.errorcode.get(e.errno, e.errno)}: {e}"
    finally:
        os.close(fd)
    return None


# ----------------------------------------------------------------------------
# digest


@dataclass
class Digest:
    hexdigest: str
    counts: Counter
    errors: list[str]
    records: list[str]

    def line(self) -> str:
        c = self.counts
        return (f"{self.hexdigest} entries={c['entries']} dirs={c['dir']} files={c['file']} "
                f"symlinks={c['symlink']} other={c['other']} bytes={c['bytes']} "
                f"xattrs={c['xattrs']} errors={len(self.errors)}")


def digest_tree(root: str) -> Digest:
    """Hash the tree under ``root``: one canonical JSON record per entry (the root
    included), in sorted byte order of the names, fed to sha256. An entry that cannot
    be read is recorded as an error (in the hash too) and never skipped silently."""
    h = hashlib.sha256()
    counts: Counter = Counter()
    errors: list[str] = []
    records: list[str] = []
    first_name: dict[tuple[int, int], str] = {}

    def emit(rec: dict) -> None:
        line = json.dumps(rec, sort_keys=True)
        records.append(line)
        h.update(line.encode() + b"\n")

    def visit(rel: str) -> None:
        full = os.path.join(root, rel) if rel else root
        rec: dict = {"path": rel or "."}
        try:
            st = os.lstat(full)
            kind = _kind_of(st.st_mode)
            rec.update(kind=kind, mode=f"{stat.S_IMODE(st.st_mode):o}",
                       owner=f"{st.st_uid}:{st.st_gid}")
            counts["entries"] += 1
            counts[kind] += 1
            if kind == "file":
                rec["size"] = st.st_size
                rec["nlink"] = st.st_nlink
                if st.st_nlink > 1:
                    key = (st.st_dev, st.st_ino)
                    if key in first_name:
                        rec["same_as"] = first_name[key]
                    else:
                        first_name[key] = rec["path"]
                fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    rec["sha256"] = file_sha256(fd, st.st_size)
                finally:
                    os.close(fd)
                counts["bytes"] += st.st_size
            elif kind == "symlink":
                rec["target"] = os.readlink(full)
            elif kind == "other":
                rec["type"] = stat.S_IFMT(st.st_mode)
                if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                    rec["rdev"] = st.st_rdev
            rec["xattrs"] = _xattrs(full, counts)
            names = sorted(os.listdir(full), key=os.fsencode) if kind == "dir" else []
        except OSError as e:
            msg = f"{rec['path']}: {errno.errorcode.get(e.errno, e.errno)}: {e.strerror}"
            errors.append(msg)
            emit({"path": rec["path"], "error": errno.errorcode.get(e.errno, str(e.errno))})
            return
        emit(rec)
        for name in names:
            visit(_join(rel, name))

    visit("")
    return Digest(h.hexdigest(), counts, errors, records)


def _xattrs(full: str, counts: Counter) -> dict | str:
    try:
        names = sorted(os.listxattr(full, follow_symlinks=False))
    except OSError as e:
        if e.errno == errno.EOPNOTSUPP:
            counts["xattrs_unsupported"] += 1
            return "unsupported"
        raise
    counts["xattrs"] += len(names)
    return {n: os.getxattr(full, n, follow_symlinks=False).hex() for n in names}


# ----------------------------------------------------------------------------
# the command line


def _size_arg(s: str) -> int:
    units = {"k": KiB, "m": MiB, "g": 1 << 30}
    s = s.strip().lower().removesuffix("ib").removesuffix("b")
    if s and s[-1] in units:
        return int(float(s[:-1]) * units[s[-1]])
    return int(s)


def _kinds_arg(s: str) -> frozenset[str]:
    kinds = frozenset(k.strip() for k in s.split(",") if k.strip())
    if bad := kinds - set(OP_KINDS):
        raise argparse.ArgumentTypeError(f"unknown op kind(s) {sorted(bad)}; "
                                         f"the kinds are {', '.join(OP_KINDS)}")
    return kinds


def _add_mix_args(ap: argparse.ArgumentParser) -> None:
    mix = ap.add_mutually_exclusive_group()
    mix.add_argument("--skip", type=_kinds_arg, default=frozenset(), metavar="KIND,...",
                     help="leave these kinds of op out (changes the sequence; for narrowing "
                          "down a reproduction)")
    mix.add_argument("--only", type=_kinds_arg, metavar="KIND,...",
                     help="only these kinds of op (the same as --skip of all the others)")


def _skipped(args) -> frozenset[str]:
    return frozenset(OP_KINDS) - args.only if args.only else args.skip


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="stress", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run a seeded workload on a directory tree")
    r.add_argument("--dir", required=True, help="the directory to work in (must exist)")
    r.add_argument("--seed", type=int, required=True, help="process i uses seed SEED+i")
    r.add_argument("--ops", type=int, help="ops per process (default 1000, or unlimited "
                   "with --duration or --stop-file)")
    r.add_argument("--duration", type=float, help="stop after this many seconds")
    r.add_argument("--procs", type=int, default=1, help="worker processes (default 1)")
    r.add_argument("--shared", default="shared",
                   help="shared subdirectory of --dir, used by every process and node "
                        "('' for none; default 'shared')")
    r.add_argument("--private", default=None,
                   help="private subdirectory of --dir, one p<i> below it per process "
                        "('' for none; default priv-<hostname>-<seed>)")
    r.add_argument("--reset", action="store_true",
                   help="empty this run's private directories first")
    r.add_argument("--log", help="durability log (JSON lines; must be outside --dir)")
    r.add_argument("--fsync-at-end", action="store_true",
                   help="after the last op, fsync every private file (so verify checks all)")
    r.add_argument("--stop-file", metavar="PATH",
                   help="end the run (as --duration would) once PATH exists; it must "
                        "live outside --dir")
    r.add_argument("--op-timeout", type=float, default=60.0,
                   help="seconds one op may take before it counts as a hang (default 60)")
    r.add_argument("--progress", type=float, default=5.0,
                   help="seconds between progress lines (default 5)")
    r.add_argument("--check-every", type=int, default=250,
                   help="compare the whole private tree with the model every N ops")
    r.add_argument("--max-offset", type=_size_arg, default=32 * MiB,
                   help="furthest sparse offset (default 32MiB)")
    _add_mix_args(r)
    r.add_argument("-v", "--verbose", action="count", default=0,
                   help="print the first 20 ops of each process (-vv: all ops)")

    p = sub.add_parser("plan", help="print a process's op sequence without running it")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--ops", type=int, default=20)
    p.add_argument("--proc", type=int, default=0, help="process index (seed SEED+PROC)")
    p.add_argument("--no-shared", action="store_true", help="as run --shared ''")
    p.add_argument("--no-private", action="store_true", help="as run --private ''")
    p.add_argument("--max-offset", type=_size_arg, default=32 * MiB)
    _add_mix_args(p)

    v = sub.add_parser("verify", help="check the fsync'd files of a durability log")
    v.add_argument("--log", required=True)
    v.add_argument("--root", help="the tree to check (default: the --dir of the run)")

    d = sub.add_parser("digest", help="one hash over a whole tree")
    d.add_argument("--dir", required=True)
    d.add_argument("--list", action="store_true", help="print every entry's record first")
    return ap


def _domains(shared: bool, private: bool) -> tuple[str, ...]:
    return tuple(d for d, on in (("P", private), ("S", shared)) if on)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd in ("run", "plan") and _skipped(args) >= set(OP_KINDS):
        print(f"stress {args.cmd}: --skip leaves no kind of op", file=sys.stderr)
        return 2
    if args.cmd == "plan":
        doms = _domains(not args.no_shared, not args.no_private)
        if not doms:
            print("stress plan: --no-shared and --no-private leave nothing", file=sys.stderr)
            return 2
        for op in plan(args.seed + args.proc, args.ops, doms, args.max_offset, _skipped(args)):
            print(f"op {op.num}: {op.describe()}")
        return 0
    if args.cmd == "verify":
        try:
            status, line = verify(args.log, args.root)
        except (OSError, ValueError) as e:
            print(f"verify: cannot read the log: {e}", file=sys.stderr)
            return 2
        print(line)
        return status
    if args.cmd == "digest":
        dg = digest_tree(args.dir)
        if args.list:
            for rec in dg.records:
                print(rec)
        for e in dg.errors:
            print(f"digest: ERROR {e}", file=sys.stderr)
        print(dg.line())
        return 1 if dg.errors else 0
    return _run_cmd(args)


def _run_cmd(args) -> int:
    root = os.path.abspath(args.dir)
    if not os.path.isdir(root):
        print(f"stress: --dir {root}: not a directory", file=sys.stderr)
        return 2
    private = args.private
    if private is None:
        private = f"priv-{socket.gethostname()}-{args.seed}"
    shared = args.shared or None
    private = private or None
    if shared is None and private is None:
        print("stress: --shared '' and --private '' leave nothing to do", file=sys.stderr)
        return 2
    if args.log:
        log = os.path.realpath(args.log)
        if _is_under(log, os.path.realpath(root)):
            print(f"stress: --log {args.log} is inside --dir; it must live outside the "
                  "tested tree", file=sys.stderr)
            return 2
        with open(log, "w") as f:        # a fresh log per run
            f.write(json.dumps({"t": "run", "root": root, "seed": args.seed,
                                "procs": args.procs}) + "\n")
            f.flush()
            os.fsync(f.fileno())
    stop_file = os.path.realpath(args.stop_file) if args.stop_file else None
    if stop_file and _is_under(stop_file, os.path.realpath(root)):
        print(f"stress: --stop-file {args.stop_file} is inside --dir; it must live outside "
              "the tested tree", file=sys.stderr)
        return 2
    unbounded = args.duration or stop_file
    ops = args.ops if args.ops is not None else (None if unbounded else 1000)
    cfgs = []
    for i in range(args.procs):
        cfg = Config(root=root, index=i, seed=args.seed + i, ops=ops, duration=args.duration,
                     shared=shared, private=private, log=args.log,
                     op_timeout=args.op_timeout, progress=args.progress,
                     verbose=args.verbose, check_every=args.check_every,
                     max_offset=args.max_offset, fsync_at_end=args.fsync_at_end,
                     skip=_skipped(args), stop_file=stop_file)
        if private and args.reset:
            shutil.rmtree(os.path.join(root, private, f"p{i}"), ignore_errors=True)
        cfgs.append(cfg)
    text, nfail = summary(run_procs(cfgs))
    print(text, file=sys.stderr)
    return 1 if nfail else 0
