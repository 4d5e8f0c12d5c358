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
        self.used = 0

    def fits(self, name: bytes) -> bool:
        return self.used + fmt.leaf_entry_size(name) <= fmt.LEAF_CAPACITY

    def add(self, name: bytes, ino: int, dtype: int) -> None:
        self.entries[name] = (ino, dtype)
        self.used += fmt.leaf_entry_size(name)

    def remove(self, name: bytes) -> None:
        del self.entries[name]
        self.used -= fmt.leaf_entry_size(name)

    def encode(self) -> bytes:
        ents = [fmt.DirEntry(n, i, t) for n, (i, t) in self.entries.items()]
        return bytes(fmt.encode_leaf(ents, self.depth, self.next, self.blkno))


class Directory:
    def __init__(self) -> None:
        self.entries: dict[bytes, tuple[int, int]] = {}
        self.hashed = False
        self.linear_bytes = 0
        self.depth = 0
        self.table: list[int] = []              # leaf address per slot
        self.table_blocks: list[int] = []
        self.leaves: dict[int, Leaf] = {}
        self.dirty_leaves: set[int] = set()
        self.table_dirty = False

    # -- loading -------------------------------------------------------------------
    @classmethod
    def from_linear(cls, payload: bytes) -> Directory:
        d = cls()
        for e in fmt.decode_linear(payload):
            d.entries[e.name] = (e.ino, e.dtype)
        d.linear_bytes = len(payload)
        return d

    @classmethod
    def from_hashed(cls, payload: bytes, read: ReadBlock) -> Directory:
        d = cls()
        d.hashed = True
        d.depth, d.table_blocks = fmt.decode_hashed_payload(payload)
        size = 1 << d.depth
        for i, blk in enumerate(d.table_blocks):
            n = min(fmt.TABLE_PER_BLOCK, size - i * fmt.TABLE_PER_BLOCK)
            d.table += fmt.decode_table_block(read(blk), blk, n)
        for blk in dict.fromkeys(d.table):
            while blk:
                if blk in d.leaves:
                    raise FormatError(f"directory leaf {blk} linked twice")
                depth, nxt, ents = fmt.decode_leaf(read(blk), blk)
                leaf = Leaf(blk, depth, nxt)
                for e in ents:
                    leaf.add(e.name, e.ino, e.dtype)
                    d.entries[e.name] = (e.ino, e.dtype)
                d.leaves[blk] = leaf
                blk = nxt
        return d

    # -- queries ------------------------------------------------------------------
    def get(self, name: bytes) -> tuple[int, int] | None:
        return self.entries.get(name)

    def __len__(self) -> int:
        return len(self.entries)

    def blocks_owned(self) -> list[int]:
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
        if not self.hashed:
            size = fmt.linear_size(self.linear_bytes, name)
            if size <= PAYLOAD_MAX:
                self.entries[name] = (ino, dtype)
                self.linear_bytes = size
                return
            self._convert_to_hashed(alloc, free)
        self.entries[name] = (ino, dtype)
        self._hashed_add(name, ino, dtype, alloc, free)

    def remove(self, name: bytes) -> None:
        del self.entries[name]
        if not self.hashed:
            self.linear_bytes -= fmt.LINEAR_ENTRY.size + len(name)
            return
        leaf = self._leaf_holding(name)
        leaf.remove(name)
        self.dirty_leaves.add(leaf.blkno)

    def replace(self, name: bytes, ino: int, dtype: int) -> None:
        """Point an existing name at another inode (rename over a target)."""
        self.entries[name] = (ino, dtype)
        if self.hashed:
            leaf = self._leaf_holding(name)
            leaf.entries[name] = (ino, dtype)
            self.dirty_leaves.add(leaf.blkno)

    # -- hashed internals ------------------------------------------------------------
    def _slot_leaf(self, name: bytes) -> Leaf:
        return self.leaves[self.table[fmt.table_slot(fmt.name_hash(name), self.depth)]]

    def _leaf_holding(self, name: bytes) -> Leaf:
        leaf = self._slot_leaf(name)
        while name not in leaf.entries:
            leaf = self.leaves[leaf.next]
        return leaf

    def _convert_to_hashed(self, alloc: AllocBlock, free: FreeBlock) -> None:
        self.hashed = True
        self.depth = 1
        a, b = Leaf(alloc(), 1), Leaf(alloc(), 1)
        self.leaves = {a.blkno: a, b.blkno: b}
        self.table = [a.blkno, b.blkno]
        self.table_blocks = [alloc()]
        self.table_dirty = True
        self.dirty_leaves.update((a.blkno, b.blkno))
        for name, (ino, dtype) in list(self.entries.items()):
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
                    leaf.next = extra.blkno
                    self.dirty_leaves.update((leaf.blkno, extra.blkno))
                leaf = self.leaves[leaf.next]
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
        for slot in range(half, first + span):
            self.table[slot] = new.blkno
        for name, (ino, dtype) in list(leaf.entries.items()):
            if fmt.table_slot(fmt.name_hash(name), self.depth) >= half:
                leaf.remove(name)
                new.add(name, ino, dtype)
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
