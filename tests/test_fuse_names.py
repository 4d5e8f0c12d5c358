"""KernelNames (clusterfs/fuse/names.py): which node id a directory is shown under, so
that the kernel never has to move a directory's dentry from another parent (which fails
with ESTALE inside a cross-directory rename), and where this mount last showed each id."""

from __future__ import annotations

import pytest

from clusterfs.fuse.names import GEN_SHIFT, KernelNames, ino_of, node_id

SHARED, E0 = 10, 20        # node ids of two parent directories
D0, OTHER = 30, 40         # inode numbers of two directories moved around in them
GEN = 7                    # their generation on disk


def _names(sent: list | None = None) -> KernelNames:
    """Without a worker nothing is sent; with `sent`, invalidations are collected
    there (call stop() to wait for them)."""
    names = KernelNames(lambda parent, name: sent.append((parent, name))
                        if sent is not None else None)
    if sent is not None:
        names.start()
    return names


def _show(names: KernelNames, ino: int, parent: int, name: bytes, gen: int = GEN) -> int:
    """A lookup of directory `ino` as `name` in `parent`, replied: its node id."""
    nid = names.directory_id(ino, gen, (parent, name))
    names.remember(parent, name, nid)
    return nid


def test_a_directory_keeps_its_inode_number_where_the_kernel_has_it() -> None:
    names = _names()
    assert _show(names, D0, SHARED, b"d0") == D0
    assert _show(names, D0, SHARED, b"d0") == D0          # looked up there again
    assert _show(names, D0, SHARED, b"d1") == D0          # moved in the same parent:
    assert names.ids(D0) == (D0,)                         # the kernel moves it lock-free


def test_a_directory_moved_to_another_parent_while_held_gets_a_new_id() -> None:
    sent: list = []
    names = _names(sent)
    assert _show(names, D0, SHARED, b"d0") == D0
    moved = _show(names, D0, E0, b"e0")                   # another node moved it
    assert moved == node_id(D0, 1) and ino_of(moved) == D0 and moved >> GEN_SHIFT == 1
    assert names.ids(D0) == (D0, moved)                   # both reach the directory
    assert _show(names, D0, E0, b"e0") == moved           # stays, where the kernel has it
    assert _show(names, D0, SHARED, b"d0") == D0          # back where the old one is
    names.stop()
    assert sent == [(SHARED, b"d0")]                      # its old dentry: let go


def test_an_id_the_kernel_forgot_is_used_again_wherever() -> None:
    names = _names()
    _show(names, D0, SHARED, b"d0")
    _show(names, D0, SHARED, b"d0")
    names.forgotten(D0, 1)
    assert names.directory_id(D0, GEN, (E0, b"e0")) != D0  # one lookup still held
    names.forgotten(D0, 1)
    assert names.ids(D0) == ()
    assert _show(names, D0, E0, b"e0") == D0              # no inode, so no alias


def test_once_every_id_is_forgotten_the_inode_number_is_used_again() -> None:
    names = _names()
    _show(names, D0, SHARED, b"d0")
    moved = _show(names, D0, E0, b"e0")
    names.forgotten(moved, 1)
    assert _show(names, D0, SHARED, b"x") == moved        # the current one, not held
    names.forgotten(D0, 1)
    names.forgotten(moved, 1)
    assert names.ids(D0) == ()
    assert _show(names, D0, E0, b"e0") == D0


def test_a_deleted_directorys_ids_are_stale_once_its_block_is_reused() -> None:
    names = _names()
    _show(names, D0, SHARED, b"d0")
    moved = _show(names, D0, E0, b"e0")
    # a new directory in the same block (another generation on disk): the inode number
    # passes to it with its count (the kernel marks its old inode bad), the rest is stale
    assert _show(names, D0, E0, b"new", gen=GEN + 1) == D0
    assert names.is_stale(moved) and not names.is_stale(D0)
    assert names.ids(D0) == (D0,)
    names.forgotten(D0, 1)                                # the old inode's lookup
    names.forgotten(moved, 1)
    assert not names.is_stale(moved)
    assert _show(names, D0, SHARED, b"elsewhere", gen=GEN + 1) != D0   # still held


def test_a_block_reused_by_a_file_retires_the_directorys_ids() -> None:
    names = _names()
    _show(names, D0, SHARED, b"d0")
    moved = _show(names, D0, E0, b"e0")
    assert names.file_id(D0) == D0
    assert names.is_stale(moved) and names.ids(D0) == ()


def test_a_directory_renamed_here_is_recorded_at_its_new_place() -> None:
    """D0 shown as shared/d0, renamed here to e0/e0, then another directory shown as
    shared/d0: D0 found at e0/e0 keeps its id (the kernel moved that dentry there)."""
    names = _names()
    _show(names, D0, SHARED, b"d0")
    names.renamed((SHARED, b"d0"), (E0, b"e0"), exchange=False)
    assert _show(names, OTHER, SHARED, b"d0") == OTHER
    assert _show(names, D0, E0, b"e0") == D0
    assert _show(names, OTHER, SHARED, b"d0") == OTHER


def test_an_exchange_swaps_the_two_places() -> None:
    names = _names()
    _show(names, D0, SHARED, b"a")
    _show(names, OTHER, E0, b"b")
    names.renamed((SHARED, b"a"), (E0, b"b"), exchange=True)
    assert _show(names, D0, E0, b"b") == D0
    assert _show(names, OTHER, SHARED, b"a") == OTHER


@pytest.mark.parametrize("exchange", [False, True])
def test_a_directory_replaced_by_a_rename_has_no_place(exchange: bool) -> None:
    names = _names()
    _show(names, D0, SHARED, b"a")
    _show(names, OTHER, E0, b"b")
    names.renamed((SHARED, b"a"), (E0, b"b"), exchange=exchange)
    # OTHER (replaced, or now at shared/a) is held but not where it is looked up now
    expected = OTHER if exchange else node_id(OTHER, 1)
    assert names.directory_id(OTHER, GEN, (SHARED, b"a")) == expected


def test_an_entry_shows_its_inode_number_apart_from_its_node_id():
    """fuse/attrino.py: the layout of the installed pyfuse3 is the known one (a newer
    pyfuse3 that changed it fails here, not silently on a mount), and st_ino set apart
    leaves the node id as it was; anything but pyfuse3's entry is left alone."""
    import ctypes

    import pyfuse3

    from clusterfs.fuse import attrino

    assert attrino.AVAILABLE
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = node_id(D0, 3)
    assert attrino.set_attr_ino(entry, D0)
    assert entry.st_ino == node_id(D0, 3)            # the node id (fuse_entry_param.ino)
    stat_at = attrino._stat_address(entry)
    assert ctypes.c_uint64.from_address(stat_at + 8).value == D0     # attr.st_ino
    assert not attrino.set_attr_ino(object(), D0)    # type: ignore[arg-type]
