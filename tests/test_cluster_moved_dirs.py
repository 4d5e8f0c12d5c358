"""A directory another node moved while this node's kernel still holds it at its old
place (tier 3: two `clusterfs mount --config` processes on one loop device, syscalls
from this process, which serves neither mount).

The kernel keeps one dentry per directory inode. When node A moves a directory, node
B's kernel still has that dentry at the old place; if something holds it there (an
open directory, a working directory) no invalidation can take it away. A lookup on B
that finds the directory at its new place then has to move the held dentry
(d_splice_alias -> __d_unalias), which takes the rename mutex and the old parent's
lock by trylock; inside a cross-directory rename (which holds the rename mutex
itself) that always fails, and the rename's one LOOKUP_REVAL retry fails the same
way: ESTALE to the application (issue 6, the soak's "repeated ESTALE on a directory
rename"). The FUSE layer now hands such a directory to the kernel under a new node
id (fuse/names.py), so there is no alias to move.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import mountutil
import pytest
from clusterutil import cluster

pytestmark = pytest.mark.skipif(mountutil.missing_prerequisites() is not None,
                                reason=str(mountutil.missing_prerequisites()))

# a process whose working directory is the given one, until its stdin closes
_SIT_IN = "import os,sys; os.chdir(sys.argv[1]); print('in', flush=True); sys.stdin.read()"


def _held(how: str, path: str):
    """Something on the node holding the directory's dentry: an open fd (this
    process) or a working directory (a child process)."""
    if how == "fd":
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        return fd, lambda: os.close(fd)
    child = subprocess.Popen([sys.executable, "-c", _SIT_IN, path], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline() == "in\n"

    def release() -> None:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(30)
    return None, release


@pytest.mark.parametrize("how", ["fd", "cwd"])
def test_a_cross_directory_rename_of_a_directory_moved_elsewhere_while_held(tmp_path, how):
    with cluster(tmp_path, nodes=2) as c:
        a, b = (lambda *p: c.path(1, "S", *p)), (lambda *p: c.path(2, "S", *p))
        os.makedirs(a("x", "e"))
        os.mkdir(a("y"))
        with open(a("x", "e", "f"), "wb") as f:
            f.write(b"in e")
        fd, release = _held(how, b("x", "e"))     # B's kernel has e's dentry at S/x/e
        try:
            os.rename(a("x", "e"), a("y", "e"))     # A moves it: B's dentry is stale
            # B: a rename across directories whose source lookup finds e at S/y/e;
            # on main: ESTALE, twice (the kernel's retry), so the call fails
            os.rename(b("y", "e"), b("e2"))
            assert sorted(os.listdir(a())) == ["e2", "x", "y"]
            # B's kernel knows e under a node id of its own now; its st_ino (and
            # readdir's d_ino) is still the inode number, as on A and through the
            # old handle (it was the node id, an id generation in its high bits)
            ino = os.stat(a("e2")).st_ino
            assert os.stat(b("e2")).st_ino == ino
            assert {e.name: e.inode() for e in os.scandir(b())}["e2"] == ino
            if fd is not None:
                assert os.fstat(fd).st_ino == ino
            with open(a("e2", "f"), "rb") as f:
                assert f.read() == b"in e"
            # and back across directories into another one, on B again
            os.rename(b("e2"), b("x", "e3"))
            assert os.listdir(a("x")) == ["e3"]
            if fd is not None:       # the old handle still reaches the directory
                assert os.listdir(fd) == ["f"]
                g = os.open("g", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)
                os.close(g)
                assert sorted(os.listdir(a("x", "e3"))) == ["f", "g"]
        finally:
            release()
        # the stale place is gone on B too, and both nodes agree
        assert not os.path.exists(b("x", "e"))
        for node in (1, 2):
            assert sorted(os.listdir(c.path(node, "S", "x"))) == ["e3"]


def test_directories_moved_back_and_forth_by_both_nodes_while_held(tmp_path):
    """Three directories moved around three parents, each move by a random node
    (across parents, or where it is), while node 2 holds each of them open from where
    it first saw it: no ESTALE, and both nodes agree."""
    rng = random.Random(20261206)
    with cluster(tmp_path, nodes=2) as c:
        parents = ["p0", "p1", "p2"]
        for p in parents:
            os.makedirs(c.path(1, "S", p))
        where = {}                                   # directory -> its parent now
        for i, p in enumerate(parents):
            os.mkdir(c.path(1, "S", p, f"d{i}"))
            where[f"d{i}"] = p
        held = [os.open(c.path(2, "S", p, d), os.O_RDONLY | os.O_DIRECTORY)
                for d, p in where.items()]
        try:
            for step in range(60):
                d = rng.choice(sorted(where))
                to = rng.choice(parents)
                node = rng.choice((1, 2))
                os.rename(c.path(node, "S", where[d], d), c.path(node, "S", to, d))
                where[d] = to
                for p in parents:    # (a listing on node 2 would move its dentries)
                    want = sorted(x for x, q in where.items() if q == p)
                    assert sorted(os.listdir(c.path(1, "S", p))) == want, \
                        f"step {step}: {d} -> {to} on node {node}"
            for fd in held:                          # still the directories they were
                name = f"from-fd{fd}"
                os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
            for n in (1, 2):
                found = sorted(f for d, p in where.items()
                               for f in os.listdir(c.path(n, "S", p, d)))
                assert found == sorted(f"from-fd{fd}" for fd in held)
        finally:
            for fd in held:
                os.close(fd)
