"""A slot's orphan blocks in memory (fs/orphans.py) and on disk (format/orphan.py,
sb.orphan_blocks): several blocks per slot, each change rewriting only the blocks it
touched, and a superblock without the setting read as the old one block."""

from __future__ import annotations

import pytest

from clusterfs.errors import FormatError
from clusterfs.format.mkfs import initial_blocks, plan_geometry
from clusterfs.format.orphan import ORPHANS_PER_BLOCK, decode_orphans
from clusterfs.format.superblock import decode_superblock, encode_superblock
from clusterfs.fs.orphans import OrphanList


def _on_disk(blocks: dict[int, bytes], blknos: list[int]) -> OrphanList:
    return OrphanList.decode([blocks[b] for b in blknos], blknos)


def test_more_orphans_than_one_block_holds_are_listed_and_read_back() -> None:
    blknos = [100, 101, 102]
    orphans = OrphanList.rewritten(blknos, [])
    disk = orphans.to_blocks()
    inos = list(range(5000, 5000 + 2 * ORPHANS_PER_BLOCK + 10))
    assert all(orphans.add(i) for i in inos)
    disk.update(orphans.to_blocks())
    assert _on_disk(disk, blknos).inodes == set(inos)
    assert sum(len(decode_orphans(disk[b], b)) for b in blknos) == len(inos)


def test_a_change_rewrites_only_the_block_it_touched() -> None:
    blknos = [100, 101, 102, 103]
    orphans = OrphanList.rewritten(blknos, list(range(1000, 1100)))
    assert len(orphans.to_blocks()) == 4              # (rewritten: every block)
    assert orphans.to_blocks() == {}                  # nothing changed since
    orphans.add(2001)
    assert list(orphans.to_blocks()) == [blknos[2001 % 4]]
    orphans.discard(1003)
    assert list(orphans.to_blocks()) == [blknos[1003 % 4]]


def test_a_full_block_sends_entries_to_another_and_a_full_list_refuses() -> None:
    blknos = [100, 101]
    orphans = OrphanList.rewritten(blknos, [])
    evens = [2 * i for i in range(ORPHANS_PER_BLOCK + 5)]   # all hash to block 0
    assert all(orphans.add(i) for i in evens)
    disk = orphans.to_blocks()
    assert len(decode_orphans(disk[101], 101)) == 5
    odds = [2 * i + 1 for i in range(ORPHANS_PER_BLOCK - 5)]
    assert all(orphans.add(i) for i in odds)
    assert len(orphans) == orphans.capacity == 2 * ORPHANS_PER_BLOCK
    assert not orphans.add(10**9)                     # full: left to fsck
    left = orphans.update([10**9, 10**9 + 1, evens[0]])
    assert left == [10**9, 10**9 + 1]
    orphans.discard(evens[0])
    assert orphans.add(10**9)


def test_the_superblock_says_how_many_orphan_blocks_a_slot_has() -> None:
    sb = plan_geometry(256 << 20, journals=3)
    assert sb.orphan_blocks == 16
    again = decode_superblock(encode_superblock(sb))
    assert again.orphan_blocks == 16
    assert again.journal_log_blocks == sb.journal_blocks - 17
    locations = sb.orphan_locations(1)
    assert locations[-1] == sb.journal_location(2) - 1
    assert all(sb.orphan_slot(b) == 1 for b in locations)
    assert sb.orphan_slot(locations[0] - 1) is None
    written = {b for b, _data in initial_blocks(sb)}
    assert set(locations) <= written


def test_an_image_made_before_the_setting_has_one_orphan_block_per_slot() -> None:
    sb = plan_geometry(256 << 20, journals=2)
    sb.config = b"cluster=lab\n"                      # (what such an image holds)
    again = decode_superblock(encode_superblock(sb))
    assert again.orphan_blocks == 1 and again.cluster_name == "lab"
    assert again.journal_log_blocks == sb.journal_blocks - 2
    assert again.orphan_locations(0) == [sb.journal_location(1) - 1]


def test_the_cluster_name_and_the_orphan_blocks_keep_each_other() -> None:
    sb = plan_geometry(256 << 20, journals=2, orphans=1000)
    sb.set_cluster_name("lab")
    sb.set_cluster_name(None)
    sb.set_cluster_name("lab2")
    again = decode_superblock(encode_superblock(sb))
    assert (again.orphan_blocks, again.cluster_name) == (2, "lab2")


@pytest.mark.parametrize(("journal_blocks", "orphans", "match"), [
    (128, 0, "out of range"),
    (128, 1025 * ORPHANS_PER_BLOCK, "out of range"),
    (16, 2 * ORPHANS_PER_BLOCK, "fewer than 14"),
])
def test_impossible_orphan_room_is_refused(journal_blocks, orphans, match) -> None:
    with pytest.raises(FormatError, match=match):
        plan_geometry(256 << 20, journal_blocks=journal_blocks, orphans=orphans)


def test_a_small_journal_gets_fewer_orphan_blocks() -> None:
    assert plan_geometry(256 << 20, journal_blocks=16).orphan_blocks == 1
    assert plan_geometry(256 << 20, journal_blocks=64).orphan_blocks == 8


def test_a_bad_orphan_setting_is_refused_at_decode() -> None:
    sb = plan_geometry(256 << 20)
    sb.config = b"orphan_blocks=lots\n"
    with pytest.raises(FormatError, match="orphan blocks per slot 'lots'"):
        decode_superblock(encode_superblock(sb))


def test_an_adoption_that_does_not_fit_warns_of_nothing_left_unlisted(caplog) -> None:
    """What an adoption leaves out stays listed in the departed slot: no "orphan list
    full ... fsck --repair frees it" warning, which an unlink past the room gives."""
    orphans = OrphanList.rewritten([100], list(range(ORPHANS_PER_BLOCK - 1)))
    with caplog.at_level("WARNING"):
        assert orphans.update([10**6, 10**6 + 1]) == [10**6 + 1]
        assert "orphan list full" not in caplog.text
        assert not orphans.add(10**7)
        assert "orphan list full" in caplog.text
