"""FsImage: builds clusterfs images with real content for the fsck tests, and
the tests that prove a built image is clean (so corruption tests start clean).

It runs the real mkfs on a sparse image file, then lays out files, directories
(linear and hashed), hard links, symlinks, xattr blocks and multi-extent files
directly with the format encoders -- the way docs/format.md says the fs must,
independent of the fs layer fsck is meant to check. Corruption helpers then
change one structure on purpose: `poke_inode` patches inode fields and reseals,
`put_block` writes a raw block.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

from clusterfs.format import directory as fdir
from clusterfs.format.block import BLOCK_SIZE, BlockType, header_of, seal
from clusterfs.format.extent import Extent, encode_block_list, encode_extent_block, encode_records
from clusterfs.format.inode import (
    F_DIR_HASHED,
    F_EXTBLOCKS,
    F_EXTENTS,
    PAYLOAD_MAX,
    Inode,
    decode_inode,
    encode_inode,
    encode_xattr_block,
)
from clusterfs.format.rgrp import (
    RgrpHeader,
    count_used,
    decode_bitmap,
    decode_rgrp,
    encode_bitmap,
    encode_rgrp,
    set_range,
    split_bitmap,
)
from clusterfs.format.rgrp import (
    test_bit as bit_is_set,
)
from clusterfs.format.superblock import SUPERBLOCK_BLKNO, Superblock, decode_superblock

# fsck.clusterfs and mkfs.clusterfs exactly as installed (clusterfs.cli's entry points),
# without a pyenv shim or the `clusterfs` dispatcher importing every subcommand
FSCK = [sys.executable, "-c", "import sys; from clusterfs.cli import fsck_main; "
                              "sys.exit(fsck_main())"]
MKFS = [sys.executable, "-c", "import sys; from clusterfs.cli import mkfs_main; "
                              "sys.exit(mkfs_main())"]


def fsck(path: str, *flags: str, quiet: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([*FSCK, *(["-q"] if quiet else []), *flags, path],
                          capture_output=True, text=True, timeout=120)


def mkfs(path: str, size: int, journals: int = 1) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run([*MKFS, "-q", "-j", str(journals), path], check=True, capture_output=True,
                   timeout=60)


class FsImage:
    """A formatted image file and an in-memory model of what we add to it."""

    def __init__(self, path: str, size: int = 64 << 20, journals: int = 1,
                 format: bool = True) -> None:
        self.path = path
        if format:
            mkfs(path, size, journals)
        self.sb: Superblock = decode_superblock(self.read(SUPERBLOCK_BLKNO))
        self.groups: list[tuple[RgrpHeader, bytearray]] = []
        for i in range(self.sb.rgrp_count):
            first, _ = self.sb.rgrp_location(i)
            h = decode_rgrp(self.read(first), first)
            bits = bytearray()
            for k in range(h.bitmap_blocks):
                bits += decode_bitmap(self.read(first + 1 + k), first + 1 + k)
            self.groups.append((h, bits))
        self.hints = [0] * len(self.groups)     # no free block before this in the group
        root = self.sb.root_ino
        self.inodes: dict[int, Inode] = {root: decode_inode(self.read(root), root)}
        self.entries: dict[int, list[fdir.DirEntry]] = {root: []}
        self.hashed: dict[int, int] = {}          # dir ino -> table depth wanted (0: auto)
        self.extent_blocks: dict[int, list[Extent]] = {}   # ino -> extents in ext blocks

    # -- raw block I/O ------------------------------------------------------------------
    # The image is opened per call: fsck refuses to repair a device another
    # process holds open, and the tests run it between our reads and writes.
    def read(self, blkno: int) -> bytes:
        with open(self.path, "rb") as f:
            return os.pread(f.fileno(), BLOCK_SIZE, blkno * BLOCK_SIZE)

    def put_block(self, blkno: int, data: bytes | bytearray) -> None:
        self.pwrite(blkno * BLOCK_SIZE, bytes(data))

    def flip_bits(self, blkno: int, offset: int, mask: int) -> None:
        """XOR one byte of a block in place (no reseal: its checksum goes bad)."""
        buf = bytearray(self.read(blkno))
        buf[offset] ^= mask
        self.put_block(blkno, buf)

    def pwrite(self, offset: int, data: bytes) -> None:
        with open(self.path, "r+b") as f:
            os.pwrite(f.fileno(), data, offset)

    def close(self) -> None:
        """Nothing stays open; kept so callers can say they are done."""

    # -- allocation ------------------------------------------------------------------------
    def alloc(self, count: int = 1, group: int | None = None) -> int:
        """First fit run of `count` free blocks (in `group` if given)."""
        order = range(len(self.groups)) if group is None else [group]
        for gi in order:
            h, bits = self.groups[gi]
            run, first_free = 0, None
            for rel in range(self.hints[gi], h.length):
                run = 0 if bit_is_set(bits, rel) else run + 1
                if run == 1 and first_free is None:
                    first_free = rel
                if run == count:
                    start = rel - count + 1
                    set_range(bits, start, count)
                    h.free -= count
                    self.hints[gi] = rel + 1 if first_free == start else first_free
                    return h.first + start
        raise AssertionError("image full")

    def free(self, blkno: int) -> None:
        h, bits = self.groups[self.sb.rgrp_of(blkno)]
        set_range(bits, blkno - h.first, 1, False)
        h.free += 1
        gi = self.sb.rgrp_of(blkno)
        self.hints[gi] = min(self.hints[gi], blkno - h.first)

    def is_used(self, blkno: int) -> bool:
        h, bits = self.groups[self.sb.rgrp_of(blkno)]
        return bit_is_set(bits, blkno - h.first)

    # -- namespace -----------------------------------------------------------------------
    def _new_inode(self, in_dir: int, name: bytes, mode: int, **kw) -> int:
        ino = self.alloc()
        now = int(time.time())
        inode = Inode(ino=ino, mode=mode, nlink=1, atime=now, mtime=now, ctime=now,
                      generation=ino, **kw)
        self.inodes[ino] = inode
        self._add_entry(in_dir, name, ino)
        return ino

    def _add_entry(self, parent: int, name: bytes, ino: int) -> None:
        mode = self.inodes[ino].mode
        self.entries[parent].append(fdir.DirEntry(name, ino, stat.S_IFMT(mode) >> 12))

    def mkdir(self, parent: int, name: str, hashed: bool = False, depth: int = 0) -> int:
        ino = self._new_inode(parent, name.encode(), stat.S_IFDIR | 0o755, parent=parent)
        self.inodes[ino].nlink = 2
        self.inodes[parent].nlink += 1
        self.entries[ino] = []
        if hashed:
            self.hashed[ino] = depth
        return ino

    def create(self, parent: int, name: str, data: bytes = b"", extent_blocks: bool = False,
               pieces: int = 1) -> int:
        """A regular file: stuffed if it fits, else mapped by `pieces` extents (in
        extent blocks when asked)."""
        ino = self._new_inode(parent, name.encode(), stat.S_IFREG | 0o644, size=len(data))
        inode = self.inodes[ino]
        if len(data) <= PAYLOAD_MAX and not extent_blocks:
            inode.payload = data
            return ino
        nblocks = max(1, -(-len(data) // BLOCK_SIZE))
        extents, gaps, lblk = [], [], 0
        for k in range(pieces):
            n = nblocks // pieces + (1 if k < nblocks % pieces else 0)
            pblk = self.alloc(n)
            gaps.append(self.alloc(1))   # a gap, so the pieces stay separate extents
            chunk = data[lblk * BLOCK_SIZE : (lblk + n) * BLOCK_SIZE]
            self.pwrite(pblk * BLOCK_SIZE, chunk.ljust(n * BLOCK_SIZE, b"\0"))
            extents.append(Extent(lblk, pblk, n))
            lblk += n
        for gap in gaps:
            self.free(gap)
        inode.blocks = 1 + nblocks
        if extent_blocks:
            blk = self.alloc()
            inode.flags = F_EXTBLOCKS
            inode.payload = encode_block_list([blk])
            inode.blocks += 1
            self.put_block(blk, encode_extent_block(extents, blk))
        else:
            inode.flags = F_EXTENTS
            inode.payload = encode_records(extents)
        return ino

    def symlink(self, parent: int, name: str, target: str) -> int:
        t = target.encode()
        return self._new_inode(parent, name.encode(), stat.S_IFLNK | 0o777, size=len(t),
                               payload=t)

    def fifo(self, parent: int, name: str) -> int:
        return self._new_inode(parent, name.encode(), stat.S_IFIFO | 0o644)

    def link(self, parent: int, name: str, ino: int) -> None:
        self._add_entry(parent, name.encode(), ino)
        self.inodes[ino].nlink += 1

    def xattr_block(self, ino: int, xattrs: dict[bytes, bytes]) -> int:
        blk = self.alloc()
        self.put_block(blk, encode_xattr_block(xattrs, blk))
        self.inodes[ino].xattr_blk = blk
        self.inodes[ino].blocks += 1
        return blk

    # -- writing it all out --------------------------------------------------------------
    def flush(self) -> None:
        for ino, entries in self.entries.items():
            if ino in self.hashed:
                self._write_hashed(ino, entries, self.hashed[ino])
            else:
                payload = fdir.encode_linear(entries)
                assert len(payload) <= PAYLOAD_MAX, "use hashed=True for big directories"
                self.inodes[ino].payload = payload
                self.inodes[ino].size = len(payload)
        for ino, inode in self.inodes.items():
            self.put_block(ino, encode_inode(inode, b"" if inode.xattr_blk else None))
        for h, bits in self.groups:
            h.free = h.length - count_used(bits, h.length)
            self.put_block(h.first, encode_rgrp(h))
            for k, piece in enumerate(split_bitmap(bits, h.bitmap_blocks)):
                self.put_block(h.first + 1 + k, encode_bitmap(piece, h.first + 1 + k))

    def _write_hashed(self, ino: int, entries: list[fdir.DirEntry], depth: int) -> None:
        """Every leaf at full table depth; the smallest depth where every slot fits
        (or `depth` if given)."""
        depth = depth or 1
        while True:
            slots: list[list[fdir.DirEntry]] = [[] for _ in range(1 << depth)]
            for e in entries:
                slots[fdir.table_slot(fdir.name_hash(e.name), depth)].append(e)
            if all(sum(fdir.leaf_entry_size(e.name) for e in s) <= fdir.LEAF_CAPACITY
                   for s in slots):
                break
            depth += 1
        leaves = [self.alloc() for _ in slots]
        tables = [self.alloc() for _ in range(fdir.table_blocks_for(depth))]
        for blk, s in zip(leaves, slots, strict=True):
            self.put_block(blk, fdir.encode_leaf(s, depth, 0, blk))
        for k, blk in enumerate(tables):
            ptrs = leaves[k * fdir.TABLE_PER_BLOCK : (k + 1) * fdir.TABLE_PER_BLOCK]
            self.put_block(blk, fdir.encode_table_block(ptrs, blk))
        inode = self.inodes[ino]
        inode.flags = F_DIR_HASHED
        inode.payload = fdir.encode_hashed_payload(depth, tables)
        inode.size = BLOCK_SIZE * (1 + len(leaves) + len(tables))
        inode.blocks = 1 + len(leaves) + len(tables)

    # -- corrupting ------------------------------------------------------------------------
    def poke_inode(self, ino: int, **fields) -> None:
        """Change fields of an inode on disk and reseal it (a consistent-looking lie)."""
        inode = decode_inode(self.read(ino), ino)
        for k, v in fields.items():
            setattr(inode, k, v)
        self.put_block(ino, encode_inode(inode, b"" if inode.xattr_blk else None))

    def reseal(self, blkno: int, buf: bytearray, btype: BlockType) -> None:
        self.put_block(blkno, seal(buf, btype, blkno, header_of(buf)[4]))

    def flip_bitmap_bit(self, blkno: int) -> None:
        """Toggle one block's bit on disk without touching the free count."""
        gi = self.sb.rgrp_of(blkno)
        h, _ = self.groups[gi]
        rel = blkno - h.first
        bm = h.first + 1 + rel // (8 * (BLOCK_SIZE - 32))
        rel %= 8 * (BLOCK_SIZE - 32)
        buf = bytearray(self.read(bm))
        buf[32 + rel // 8] ^= 1 << (rel % 8)
        self.reseal(bm, buf, BlockType.BITMAP)

    def set_free_count(self, group: int, free: int) -> None:
        first, _ = self.sb.rgrp_location(group)
        h = decode_rgrp(self.read(first), first)
        h.free = free
        self.put_block(first, encode_rgrp(h))


def populated(path: str, size: int = 64 << 20, journals: int = 1) -> tuple[FsImage, dict]:
    """An image with one of everything; returns it (flushed) and the names' inodes."""
    img = FsImage(path, size, journals)
    root = img.sb.root_ino
    ino: dict[str, int] = {}
    ino["docs"] = img.mkdir(root, "docs")
    ino["sub"] = img.mkdir(ino["docs"], "sub")
    ino["small"] = img.create(ino["docs"], "small.txt", b"hello\n")
    ino["big"] = img.create(root, "big.bin", os.urandom(40 * BLOCK_SIZE + 5), pieces=3)
    ino["ext"] = img.create(ino["sub"], "extblocks.bin", os.urandom(9 * BLOCK_SIZE),
                            extent_blocks=True, pieces=2)
    ino["other"] = img.create(root, "other.bin", os.urandom(4 * BLOCK_SIZE))
    img.link(ino["sub"], "hardlink.txt", ino["small"])
    ino["sym"] = img.symlink(root, "sym", "docs/small.txt")
    ino["fifo"] = img.fifo(root, "fifo")
    img.xattr_block(ino["small"], {b"user.k" + bytes([65 + i]): b"v" * 300 for i in range(5)})
    ino["hashed"] = img.mkdir(root, "hashed", hashed=True)
    for i in range(400):
        img.create(ino["hashed"], f"entry-{i:04d}-with-a-longish-name", b"x" * (i % 7))
    img.flush()
    return img, ino


# -- the builder's own tests: what it makes is clean ------------------------------------


def test_populated_image_is_clean(tmp_path):
    img, _ = populated(str(tmp_path / "img"))
    img.close()
    r = fsck(img.path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "clean" in r.stdout
    assert "inodes" in r.stdout


def test_hashed_directory_with_many_leaves_is_clean(tmp_path):
    img = FsImage(str(tmp_path / "img"))
    d = img.mkdir(img.sb.root_ino, "many", hashed=True)
    for i in range(2000):
        img.create(d, f"f{i}")
    img.flush()
    img.close()
    assert img.hashed[d] == 0
    r = fsck(img.path, "-v")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2002 inodes" in r.stdout
