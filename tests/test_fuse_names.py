"""KernelNames (clusterfs/fuse/names.py): where this mount last showed each directory to
the kernel, so that a lookup finding it elsewhere takes back the right old name."""

from __future__ import annotations

from clusterfs.fuse.names import KernelNames

SHARED, E0 = 10, 20        # FUSE numbers of two parent directories
D0, OTHER = 30, 40         # two directories moved around in them


def _names() -> KernelNames:
    return KernelNames(lambda parent, name: None)    # no worker: nothing is sent


def test_a_directory_renamed_here_is_recorded_at_its_new_place() -> None:
    """The interleaving behind a rename's ESTALE: D0 shown as shared/d0, renamed here
    to e0/e0, then another directory shown as shared/d0. A later lookup finding D0 at
    e0/e0 must not take back shared/d0, which now names the other directory."""
    names = _names()
    names.remember(SHARED, b"d0", D0)
    names.renamed((SHARED, b"d0"), (E0, b"e0"), exchange=False)
    names.remember(SHARED, b"d0", OTHER)
    assert names.moved_from(D0, E0, b"e0") is None          # where the kernel has it
    assert names.moved_from(OTHER, SHARED, b"d0") is None
    assert names.moved_from(D0, SHARED, b"x") == (E0, b"e0")


def test_an_exchange_swaps_the_two_places() -> None:
    names = _names()
    names.remember(SHARED, b"a", D0)
    names.remember(E0, b"b", OTHER)
    names.renamed((SHARED, b"a"), (E0, b"b"), exchange=True)
    assert names.moved_from(D0, E0, b"b") is None
    assert names.moved_from(OTHER, SHARED, b"a") is None


def test_a_directory_replaced_by_a_rename_is_forgotten() -> None:
    names = _names()
    names.remember(SHARED, b"a", D0)
    names.remember(SHARED, b"b", OTHER)
    names.renamed((SHARED, b"a"), (SHARED, b"b"), exchange=False)   # a over empty b
    assert names.moved_from(D0, SHARED, b"b") is None
    assert names.moved_from(OTHER, E0, b"z") is None     # OTHER is gone: no old place
