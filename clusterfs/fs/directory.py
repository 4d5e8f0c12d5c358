"""A directory in memory: a name index plus the on-disk shape (linear or hashed).

Lookups use the dict (O(1)). Inserts and removals also update the on-disk
structure incrementally: a linear directory rewrites its inode payload; a hashed
one dirties just the leaf it touches (a split or a table doubling dirties a few
more blocks, amortised O(1)). See docs/format.md for the layout.
"""

from __future__ import annotations

from collections.abc import Callable

from clusterfs.errors import FormatError
from clusterfs.format import directory as fmt
from clusterfs.format.inode import PAYLOAD_MAX

AllocBlock = Callable[[], int]
FreeBlock = Callable[[int], None]
ReadBlock = Callable[[int], bytes]


class Leaf:
    def __init__(self, blkno: int, depth: int, next_leaf: int = 0) -> None:
        self.blkno = blkno
        self.depth = depth
        self.next = next_leaf
        self.entries: dict[bytes, tuple[int, int]] = {}
        # each entry packed as the leaf stores it, hash included: a busy leaf is
        # encoded at every commit, and packing (and hashing) all its entries each time
        # was most of a commit's capture, on the event loop, in a big shared directory
        self.records: dict[bytes, bytes] = {}
        self.used = 0

    def fits(self, name: bytes) -> bool:
        return self.used + fmt.leaf_entry_size(name) <= fmt.LEAF_CAPACITY

    def add(self, name: bytes, ino: int, dtype: int, record: bytes | None = None) -> None:
        """record: the entry already packed (read from disk, or moved by a split)."""
        if record is None:
            record = fmt.leaf_record(name, ino, dtype)
        self.entries[name] = (ino, dtype)
        self.records[name] = record
        self.used += len(record)

    def replace(self, name: bytes, ino: int, dtype: int) -> None:
        """Point an existing name at another inode."""
        self.entries[name] = (ino, dtype)
        self.records[name] = fmt.leaf_record(name, ino, dtype,
                                             fmt.record_hash(self.records[name]))

    def remove(self, name: bytes) -> None:
        del self.entries[name]
        self.used -= len(self.records.pop(name))

    def encode(self) -> bytes:
        return bytes(fmt.encode_leaf_records(list(self.records.values()), self.depth,
                                             self.next, self.blkno))


class Directory:
    """Linear: every entry in `entries`. Hashed: the table is read at load, and each
    leaf only when a name hashing to it is looked up (or everything is listed): a
    node that gets the directory's lock back after another node changed it rereads
    one leaf per name it needs, not the whole directory."""

    def __init__(self, read: ReadBlock | None = None) -> None:
        self.entries: dict[bytes, tuple[int, int]] = {}   # a linear directory's
        self.hashed = False
        self.linear_bytes = 0
        self.depth = 0
        self.table: list[int] = []              # leaf address per slot
        self.table_blocks: list[int] = []
        self.leaves: dict[int, Leaf] = {}       # the leaves read (or made) so far
        self.leaf_count = 0                     # every leaf, chained ones included
        self.dirty_leaves: set[int] = set()
        self.table_dirty = False
        self._read = read
        self._by_number: list[int] | None = None   # children's numbers, sorted (kept
                                                    # until the next change)

    # -- loading -------------------------------------------------------------------
    @classmethod
    def from_linear(cls, payload: bytes) -> Directory:
        d = cls()
        for e in fmt.decode_linear(payload):
            d.entries[e.name] = (e.ino, e.dtype)
        d.linear_bytes = len(payload)
        return d

    @classmethod
    def from_hashed(cls, payload: bytes, read: ReadBlock, dir_blocks: int) -> Directory:
        """dir_blocks: the table and leaf blocks the directory owns (from its inode's
        block count), so the leaves need not be read to count them."""
        d = cls(read)
        d.hashed = True
        d.depth, d.table_blocks = fmt.decode_hashed_payload(payload)
        size = 1 << d.depth
        for i, blk in enumerate(d.table_blocks):
            n = min(fmt.TABLE_PER_BLOCK, size - i * fmt.TABLE_PER_BLOCK)
            d.table += fmt.decode_table_block(read(blk), blk, n)
        d.leaf_count = dir_blocks - len(d.table_blocks)
        if d.leaf_count < len(set(d.table)) or 0 in d.table:
            raise FormatError(f"hashed directory: {dir_blocks} blocks cannot hold "
                              f"{len(set(d.table))} leaves and {len(d.table_blocks)} "
                              "table blocks")
        return d

    def _leaf(self, blkno: int) -> Leaf:
        leaf = self.leaves.get(blkno)
        if leaf is None:
            assert self._read is not None
            leaf = self._install(blkno, self._read(blkno))
        return leaf

    def _install(self, blkno: int, raw: bytes) -> Leaf:
        depth, nxt, records = fmt.decode_leaf_records(raw, blkno)
        leaf = Leaf(blkno, depth, nxt)
        for e, record in records:
            leaf.add(e.name, e.ino, e.dtype, record)
        self.leaves[blkno] = leaf
        return leaf

    def unread_leaves(self, name: bytes | None) -> list[int]:
        """The leaf blocks a look for `name` (None: a listing) may read next and that
        are not read yet: in each chain it may walk, the first leaf not read (a
        chained leaf is found only by reading the one before it); none for a linear
        directory."""
        if not self.hashed:
            return []
        if name is None:
            starts = list(dict.fromkeys(self.table))
        else:
            starts = [self.table[fmt.table_slot(fmt.name_hash(name), self.depth)]]
        unread: dict[int, None] = {}
        for blk in starts:
            for _ in range(self.leaf_count + 1):   # (a looped chain is the body's to report)
                leaf = self.leaves.get(blk)
                if leaf is None:
                    unread[blk] = None
                    break
                if not leaf.next:
                    break
                blk = leaf.next
        return list(unread)

    def adopt_leaf(self, blkno: int, raw: bytes) -> None:
        """A leaf read ahead of its use, with the event loop free. One read or made
        meanwhile is as new or newer and stays; one that does not decode is left for
        its use to read again and report."""
        if blkno in self.leaves:
            return
        try:
            self._install(blkno, raw)
        except FormatError:
            return                 # (nothing installed: _install adds a leaf decoded)

    def _load_all(self) -> None:
        """Every leaf, each chain followed; a leaf reached twice is corruption."""
        seen: set[int] = set()
        for blk in dict.fromkeys(self.table):
            while blk:
                if blk in seen:
                    raise FormatError(f"directory leaf {blk} linked twice")
                seen.add(blk)
                blk = self._leaf(blk).next
        if len(seen) != self.leaf_count:
            raise FormatError(f"hashed directory has {len(seen)} leaves, its inode "
                              f"counts {self.leaf_count}")

    # -- queries ------------------------------------------------------------------
    def get(self, name: bytes) -> tuple[int, int] | None:
        if not self.hashed:
            return self.entries.get(name)
        leaf = self._slot_leaf(name)
        while True:
            found = leaf.entries.get(name)
            if found is not None or not leaf.next:
                return found
            leaf = self._leaf(leaf.next)

    def items(self) -> list[tuple[bytes, tuple[int, int]]]:
        """Every (name, (ino, dtype)); reads every leaf of a hashed directory."""
        if not self.hashed:
            return list(self.entries.items())
        self._load_all()
        return [item for leaf in self.leaves.values() for item in leaf.entries.items()]

    def inode_numbers(self) -> list[int]:
        """Every entry's inode number, sorted; kept until the next change, so a scan
        of a big directory does not sort it again for each batch it brings in."""
        if self._by_number is None:
            self._by_number = sorted(ino for _name, (ino, _t) in self.items())
        return self._by_number

    def __len__(self) -> int:
        if not self.hashed:
            return len(self.entries)
        self._load_all()
        return sum(len(leaf.entries) for leaf in self.leaves.values())

    def blocks_owned(self) -> list[int]:
        if self.hashed:
            self._load_all()
        return list(self.leaves) + list(self.table_blocks)

    def payload(self) -> bytes:
        if self.hashed:
            return fmt.encode_hashed_payload(self.depth, self.table_blocks)
        return fmt.encode_linear([fmt.DirEntry(n, i, t) for n, (i, t) in self.entries.items()])

    def blocks_needed_for_insert(self) -> int:
        """Worst case blocks one insert may allocate (split + table growth)."""
        if not self.hashed:
            return 4
        return 2 + fmt.table_blocks_for(min(self.depth + 1, fmt.MAX_DEPTH))

    # -- changes -----------------------------------------------------------------
    def add(self, name: bytes, ino: int, dtype: int, alloc: AllocBlock, free: FreeBlock) -> None:
        self._by_number = None
        if not self.hashed:
            size = fmt.linear_size(self.linear_bytes, name)
            if size <= PAYLOAD_MAX:
                self.entries[name] = (ino, dtype)
                self.linear_bytes = size
                return
            self._convert_to_hashed(alloc, free)
        self._hashed_add(name, ino, dtype, alloc, free)

    def remove(self, name: bytes) -> None:
        self._by_number = None
        if not self.hashed:
            del self.entries[name]
            self.linear_bytes -= fmt.LINEAR_ENTRY.size + len(name)
            return
        leaf = self._leaf_holding(name)
        leaf.remove(name)
        self.dirty_leaves.add(leaf.blkno)

    def replace(self, name: bytes, ino: int, dtype: int) -> None:
        """Point an existing name at another inode (rename over a target)."""
        self._by_number = None
        if not self.hashed:
            self.entries[name] = (ino, dtype)
            return
        leaf = self._leaf_holding(name)
        leaf.replace(name, ino, dtype)
        self.dirty_leaves.add(leaf.blkno)

    # -- hashed internals ------------------------------------------------------------
    def _slot_leaf(self, name: bytes) -> Leaf:
        return self._leaf(self.table[fmt.table_slot(fmt.name_hash(name), self.depth)])

    def _leaf_holding(self, name: bytes) -> Leaf:
        leaf = self._slot_leaf(name)
        while name not in leaf.entries:
            if not leaf.next:
                raise KeyError(name)
            leaf = self._leaf(leaf.next)
        return leaf

    def _convert_to_hashed(self, alloc: AllocBlock, free: FreeBlock) -> None:
        self.hashed = True
        self.depth = 1
        a, b = Leaf(alloc(), 1), Leaf(alloc(), 1)
        self.leaves = {a.blkno: a, b.blkno: b}
        self.leaf_count = 2
        self.table = [a.blkno, b.blkno]
        self.table_blocks = [alloc()]
        self.table_dirty = True
        self.dirty_leaves.update((a.blkno, b.blkno))
        linear, self.entries, self.linear_bytes = self.entries, {}, 0
        for name, (ino, dtype) in linear.items():
            self._hashed_add(name, ino, dtype, alloc, free)

    def _hashed_add(self, name: bytes, ino: int, dtype: int, alloc: AllocBlock,
                    free: FreeBlock) -> None:
        while True:
            leaf = self._slot_leaf(name)
            if leaf.depth < self.depth or self.depth < fmt.MAX_DEPTH:
                if leaf.fits(name):
                    break
                if leaf.depth == self.depth:
                    self._double_table(alloc)
                self._split(leaf, alloc)
                continue
            while not leaf.fits(name):      # at max depth: chain
                if not leaf.next:
                    extra = Leaf(alloc(), leaf.depth)
                    self.leaves[extra.blkno] = extra
                    self.leaf_count += 1
                    leaf.next = extra.blkno
                    self.dirty_leaves.update((leaf.blkno, extra.blkno))
                leaf = self._leaf(leaf.next)
            break
        leaf.add(name, ino, dtype)
        self.dirty_leaves.add(leaf.blkno)

    def _double_table(self, alloc: AllocBlock) -> None:
        self.depth += 1
        self.table = [p for p in self.table for _ in (0, 1)]
        while len(self.table_blocks) < fmt.table_blocks_for(self.depth):
            self.table_blocks.append(alloc())
        self.table_dirty = True

    def _split(self, leaf: Leaf, alloc: AllocBlock) -> None:
        span = 1 << (self.depth - leaf.depth)
        first = self.table.index(leaf.blkno)
        half = first + span // 2
        new = Leaf(alloc(), leaf.depth + 1)
        leaf.depth += 1
        self.leaves[new.blkno] = new
        self.leaf_count += 1
        for slot in range(half, first + span):
            self.table[slot] = new.blkno
        for name, (ino, dtype) in list(leaf.entries.items()):
            record = leaf.records[name]
            if fmt.table_slot(fmt.record_hash(record), self.depth) >= half:
                leaf.remove(name)
                new.add(name, ino, dtype, record)
        self.table_dirty = True
        self.dirty_leaves.update((leaf.blkno, new.blkno))

    # -- encoding ------------------------------------------------------------------------
    def dirty_block_count(self) -> int:
        return len(self.dirty_leaves) + (len(self.table_blocks) if self.table_dirty else 0)

    def to_blocks(self) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        for blk in self.dirty_leaves:
            if blk in self.leaves:
                out[blk] = self.leaves[blk].encode()
        self.dirty_leaves.clear()
        if self.table_dirty:
            for i, blk in enumerate(self.table_blocks):
                ptrs = self.table[i * fmt.TABLE_PER_BLOCK : (i + 1) * fmt.TABLE_PER_BLOCK]
                out[blk] = bytes(fmt.encode_table_block(ptrs, blk))
            self.table_dirty = False
        return out
