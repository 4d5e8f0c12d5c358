"""An inode in memory: the decoded block plus its data map and (for directories) entries.

It is the unit the running transaction logs: `to_blocks()` encodes the inode
block and whatever map, xattr and directory blocks changed.
"""

from __future__ import annotations

import stat
import struct
import time

from clusterfs.errors import FormatError
from clusterfs.format import directory as dirfmt
from clusterfs.format import extent as fext
from clusterfs.format.inode import (
    F_DIR_HASHED,
    F_EXTBLOCKS,
    F_EXTENTS,
    F_STUFFED,
    MAP_FLAGS,
    XATTR_INLINE_MAX,
    Inode,
    decode_xattr_block,
    encode_inode,
    encode_xattr_block,
    encode_xattrs,
)
from clusterfs.fs import extents as ext
from clusterfs.fs.directory import Directory, ReadBlock


class CachedInode:
    def __init__(self, disk: Inode, read: ReadBlock) -> None:
        self.d = disk
        self.extents: list[fext.Extent] = []
        self.ext_blocks: list[int] = []
        self.data = bytearray()          # stuffed contents (file bytes / symlink target)
        self.dir: Directory | None = None
        self.nlookup = 0                 # kernel references (lookup count)
        self.open_count = 0
        self.freed = False
        self.read_ahead_done = 0         # logical block up to which read-ahead was asked
        # fdatasync: bumped by every change a datasync must make durable (size, block
        # map, stuffed data); `synced` is the newest version a commit has covered
        self.meta_version = 1
        self.synced = 0
        # bumped by every write of the file's data blocks and every truncate: a block
        # read ahead of an operation's body (FileSystem.read_edges_ahead) is its
        # newest copy only while this has not moved since the read began
        self.data_version = 0
        self._load_map(read)
        # the data blocks the extents map, kept as they change (map_extent,
        # unmap_from): st_blocks is asked at every getattr and inode encode, and a
        # sum over a fragmented file's thousands of extents held the event loop
        self.data_blocks = ext.mapped_blocks(self.extents)
        if disk.xattr_blk:
            self.d.xattrs = decode_xattr_block(read(disk.xattr_blk), disk.xattr_blk)

    @staticmethod
    def blocks_read_at_load(disk: Inode) -> list[int]:
        """The blocks besides the inode's own that loading it reads (_load_map and the
        xattr block), so that they can be read beforehand with the event loop free."""
        out = [disk.xattr_blk] if disk.xattr_blk else []
        kind = disk.flags & MAP_FLAGS
        try:
            if stat.S_ISDIR(disk.mode) and kind == F_DIR_HASHED:
                out += dirfmt.decode_hashed_payload(disk.payload)[1]
            elif not stat.S_ISDIR(disk.mode) and kind == F_EXTBLOCKS:
                out += fext.decode_block_list(disk.payload)
        except (FormatError, struct.error):
            pass                   # the load itself reports it
        return out

    def _load_map(self, read: ReadBlock) -> None:
        d = self.d
        kind = d.flags & MAP_FLAGS
        if stat.S_ISDIR(d.mode):
            if kind == F_DIR_HASHED:
                # the table and leaf blocks: all the inode owns but itself and xattrs
                dir_blocks = d.blocks - 1 - (1 if d.xattr_blk else 0)
                self.dir = Directory.from_hashed(d.payload, read, dir_blocks)
            elif kind == F_STUFFED:
                self.dir = Directory.from_linear(d.payload)
            else:
                raise FormatError(f"directory inode {d.ino} with flags {d.flags:#x}")
        elif kind == F_STUFFED:
            self.data = bytearray(d.payload)
        elif kind == F_EXTENTS:
            self.extents = fext.decode_records(d.payload, len(d.payload) // fext.RECORD.size)
        elif kind == F_EXTBLOCKS:
            self.ext_blocks = fext.decode_block_list(d.payload)
            for blk in self.ext_blocks:
                self.extents += fext.decode_extent_block(read(blk), blk)
            fext.check_extents(self.extents)
        else:
            raise FormatError(f"inode {d.ino}: flags {d.flags:#x}")

    @property
    def ino(self) -> int:
        return self.d.ino

    @property
    def stuffed(self) -> bool:
        return bool(self.d.flags & F_STUFFED)

    def set_map_kind(self, kind: int) -> None:
        self.d.flags = (self.d.flags & ~MAP_FLAGS) | kind

    def map_extent(self, new: fext.Extent) -> None:
        """Map a hole (merged with contiguous neighbours)."""
        ext.insert(self.extents, new)
        self.data_blocks += new.count

    def unmap_from(self, keep_blocks: int) -> list[tuple[int, int]]:
        """Drop the mappings at or past logical block keep_blocks; the freed runs."""
        freed = ext.truncate(self.extents, keep_blocks)
        self.data_blocks -= sum(n for _, n in freed)
        return freed

    def extent_blocks_needed(self) -> int:
        """Extent blocks the current extent list needs (0 when it fits inline)."""
        if len(self.extents) <= fext.INLINE_EXTENTS:
            return 0
        return -(-len(self.extents) // fext.EXTENTS_PER_BLOCK)

    def touch(self, m: bool = True, c: bool = True, a: bool = False) -> None:
        now = time.time_ns()
        s, ns = divmod(now, 1_000_000_000)
        if m:
            self.d.mtime, self.d.mtime_ns = s, ns
        if c:
            self.d.ctime, self.d.ctime_ns = s, ns
        if a:
            self.d.atime, self.d.atime_ns = s, ns

    # -- the transaction interface ---------------------------------------------------
    def block_estimate(self) -> int:
        n = 1 + len(self.ext_blocks) + (1 if self.d.xattr_blk else 0)
        if self.dir is not None:
            n += self.dir.dirty_block_count()
        return n

    def to_blocks(self) -> dict[int, bytes]:
        d = self.d
        out: dict[int, bytes] = {}
        if self.dir is not None:
            out.update(self.dir.to_blocks())
            d.payload = self.dir.payload()
            self.set_map_kind(F_DIR_HASHED if self.dir.hashed else F_STUFFED)
        elif self.stuffed:
            d.payload = bytes(self.data)
        elif self.ext_blocks:
            self.set_map_kind(F_EXTBLOCKS)
            d.payload = fext.encode_block_list(self.ext_blocks)
            per = fext.EXTENTS_PER_BLOCK
            for i, blk in enumerate(self.ext_blocks):
                chunk = self.extents[i * per : (i + 1) * per]
                out[blk] = bytes(fext.encode_extent_block(chunk, blk))
        else:
            self.set_map_kind(F_EXTENTS)
            d.payload = fext.encode_records(self.extents)
        d.blocks = self.owned_block_count()
        xattr_inline = None
        if d.xattr_blk:
            out[d.xattr_blk] = bytes(encode_xattr_block(d.xattrs, d.xattr_blk))
            xattr_inline = b""
        out[d.ino] = bytes(encode_inode(d, xattr_inline))
        return out

    def meta_blocks(self) -> list[int]:
        """Every metadata block of this inode this copy knows: its own, its extent and
        xattr blocks, a directory's table and the leaves read so far (one not read was
        not changed here)."""
        out = [self.d.ino, *self.ext_blocks]
        if self.d.xattr_blk:
            out.append(self.d.xattr_blk)
        if self.dir is not None:
            out += self.dir.table_blocks
            out += self.dir.leaves
        return out

    def owned_block_count(self) -> int:
        """The inode block plus every data, map, directory and xattr block it owns."""
        n = 1 + (1 if self.d.xattr_blk else 0)
        if self.dir is not None:
            return n + self.dir.leaf_count + len(self.dir.table_blocks)
        return n + len(self.ext_blocks) + self.data_blocks

    def xattrs_fit_inline(self) -> bool:
        return len(encode_xattrs(self.d.xattrs)) <= XATTR_INLINE_MAX
