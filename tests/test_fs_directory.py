"""Hashed directories in memory and through their on-disk encoding (no mount)."""

from clusterfs.errors import FormatError
from clusterfs.format import directory as fmt
from clusterfs.fs.directory import Directory


class Blocks:
    """A fake disk: allocation hands out numbers, encoded blocks are kept."""

    def __init__(self) -> None:
        self.next = 1000
        self.freed: list[int] = []
        self.store: dict[int, bytes] = {}

    def alloc(self) -> int:
        self.next += 1
        return self.next

    def free(self, blkno: int) -> None:
        self.freed.append(blkno)


def _fill(d: Directory, blocks: Blocks, n: int) -> dict[bytes, int]:
    names = {b"entry-%06d-%s" % (i, b"x" * (i % 40)): 5000 + i for i in range(n)}
    for name, ino in names.items():
        d.add(name, ino, 8, blocks.alloc, blocks.free)
    return names


def test_linear_directory_converts_to_hashed_and_splits():
    d, blocks = Directory(), Blocks()
    names = _fill(d, blocks, 20_000)
    assert d.hashed and d.depth > 5
    assert len(d) == 20_000
    assert all(d.get(n) == (ino, 8) for n, ino in names.items())
    for leaf in d.leaves.values():             # every entry sits where its hash says
        for name in leaf.entries:
            slot = fmt.table_slot(fmt.name_hash(name), d.depth)
            assert d.table[slot] == leaf.blkno or leaf.next


def test_hashed_directory_round_trips_through_blocks():
    d, blocks = Directory(), Blocks()
    names = _fill(d, blocks, 5000)
    for i, name in enumerate(list(names)):
        if i % 3 == 0:
            d.remove(name)
            del names[name]
    blocks.store.update(d.to_blocks())
    again = Directory.from_hashed(d.payload(), blocks.store.__getitem__,
                                  d.leaf_count + len(d.table_blocks))
    assert dict(again.items()) == dict(d.items()) == {n: (i, 8) for n, i in names.items()}
    assert again.depth == d.depth
    assert set(again.leaves) == set(d.leaves)


def test_inserts_dirty_few_blocks():
    d, blocks = Directory(), Blocks()
    _fill(d, blocks, 10_000)
    d.to_blocks()
    d.add(b"one-more", 1, 8, blocks.alloc, blocks.free)
    assert d.dirty_block_count() <= 3        # the leaf (and maybe a split partner)


def test_replace_points_name_at_new_inode():
    d, blocks = Directory(), Blocks()
    _fill(d, blocks, 500)
    d.replace(b"entry-000007-xxxxxxx", 42, 4)
    blocks.store.update(d.to_blocks())
    again = Directory.from_hashed(d.payload(), blocks.store.__getitem__,
                                  d.leaf_count + len(d.table_blocks))
    assert again.get(b"entry-000007-xxxxxxx") == (42, 4)


def test_a_lookup_reads_only_the_leaf_its_name_hashes_to():
    """After a reload (another node had the lock) a lookup or an insert reads the
    table and one leaf, not the whole directory."""
    d, blocks = Directory(), Blocks()
    names = _fill(d, blocks, 5000)
    blocks.store.update(d.to_blocks())
    reads: list[int] = []

    def read(blkno: int) -> bytes:
        reads.append(blkno)
        return blocks.store[blkno]

    again = Directory.from_hashed(d.payload(), read, d.leaf_count + len(d.table_blocks))
    table_reads = len(reads)
    name = b"entry-000123-" + b"x" * (123 % 40)
    assert again.get(name) == (names[name], 8)
    again.add(b"new-name", 77, 8, blocks.alloc, blocks.free)
    assert again.get(b"new-name") == (77, 8)
    assert len(reads) - table_reads <= 2 < d.leaf_count
    assert len(again) == 5001                   # counting needs every leaf
    assert len(set(reads)) == d.leaf_count + len(d.table_blocks)


def test_a_block_count_too_small_for_the_table_is_corruption():
    d, blocks = Directory(), Blocks()
    _fill(d, blocks, 2000)
    blocks.store.update(d.to_blocks())
    try:
        Directory.from_hashed(d.payload(), blocks.store.__getitem__, 1)
    except FormatError as exc:
        assert "cannot hold" in str(exc)
    else:
        raise AssertionError("a hashed directory counting 1 block loaded")


def test_inode_numbers_are_sorted_and_follow_every_change():
    d, blocks = Directory(), Blocks()
    names = _fill(d, blocks, 3000)                # hashed by now
    assert d.inode_numbers() == sorted(names.values())
    first = next(iter(names))
    d.remove(first)
    d.replace(b"entry-000001-x", 99, 8)
    d.add(b"late", 1, 8, blocks.alloc, blocks.free)
    want = sorted([1, 99] + [ino for n, ino in names.items()
                             if n not in (first, b"entry-000001-x")])
    assert d.inode_numbers() == want


def test_a_reloaded_directory_changes_and_encodes_as_a_fresh_one_would():
    """Leaves read back keep each entry as stored (hash included) and encode it as it
    was; splits, replaces and removes after a reload give the blocks a directory that
    never left memory would."""
    d, blocks = Directory(), Blocks()
    names = _fill(d, blocks, 3000)
    blocks.store.update(d.to_blocks())
    again = Directory.from_hashed(d.payload(), blocks.store.__getitem__,
                                  d.leaf_count + len(d.table_blocks))
    again._load_all()
    for blkno, leaf in again.leaves.items():      # unchanged: the same bytes
        assert leaf.encode() == blocks.store[blkno]
    for i, name in enumerate(list(names)[:600]):
        if i % 2:
            again.replace(name, 90_000 + i, 4)
            names[name] = 90_000 + i
        else:
            again.remove(name)
            del names[name]
    for i in range(4000):                         # enough to split many leaves
        name = b"later-%06d" % i
        again.add(name, 200_000 + i, 8, blocks.alloc, blocks.free)
        names[name] = 200_000 + i
    blocks.store.update(again.to_blocks())
    third = Directory.from_hashed(again.payload(), blocks.store.__getitem__,
                                  again.leaf_count + len(again.table_blocks))
    want = {n: (ino, 4 if 90_000 <= ino < 100_000 else 8) for n, ino in names.items()}
    assert dict(third.items()) == want
