"""fsck.clusterfs against real images, one structure corrupted on purpose per test.

Each image is made by the real mkfs and filled by FsImage (test_fsck_builder.py)
with files, directories (linear and hashed), hard links, symlinks, extents and
extent blocks; `test_populated_image_is_clean` there proves the starting point
is clean, so every problem found here is the one the test planted.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import stat
import struct
import subprocess
import sys

import pytest
from test_fsck_builder import FsImage, fsck, mkfs, populated

from clusterfs.format import directory as fdir
from clusterfs.format.block import BlockType, block_type
from clusterfs.format.extent import Extent, encode_records
from clusterfs.format.inode import decode_inode
from clusterfs.format.journal import JF_CLEAN, decode_jhead, encode_descriptor
from clusterfs.format.rgrp import decode_rgrp
from clusterfs.format.superblock import SUPERBLOCK_BLKNO
from clusterfs.fsck.checker import run_fsck
from clusterfs.fsck.report import Report


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """One populated image per module; each test corrupts its own sparse copy."""
    path = str(tmp_path_factory.mktemp("fsck-template") / "img")
    _img, ino = populated(path)
    return path, ino


@pytest.fixture
def image(template, tmp_path):
    src, ino = template
    dst = str(tmp_path / "img")
    subprocess.run(["cp", "--sparse=always", src, dst], check=True)
    return FsImage(dst, format=False), ino


def check(img: FsImage, *flags: str, want: int) -> str:
    r = fsck(img.path, *flags)
    assert r.returncode == want, f"exit {r.returncode}, wanted {want}:\n{r.stdout}{r.stderr}"
    return r.stdout


def repaired_and_clean(img: FsImage) -> str:
    """--repair fixes everything (exit 1); a second run is clean (exit 0)."""
    out = check(img, "--repair", want=1)
    assert "[fixed]" in out
    check(img, want=0)
    return out


def sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def first_extent(img: FsImage, ino: int) -> Extent:
    payload = decode_inode(img.read(ino), ino).payload
    lb, pb, n, _ = struct.unpack_from("<QQII", payload, 0)
    return Extent(lb, pb, n)


def free_block(img: FsImage) -> int:
    blk = img.sb.total_blocks - 10
    assert not img.is_used(blk)
    return blk


# -- clean and unusable devices -----------------------------------------------------------


def test_fresh_1gib_filesystem_is_clean(tmp_path):
    path = str(tmp_path / "img")
    mkfs(path, 1 << 30)
    r = subprocess.run([sys.executable, "-m", "clusterfs.cli", "fsck", path],
                       capture_output=True, text=True, timeout=60)   # `clusterfs fsck`
    assert r.returncode == 0, r.stdout + r.stderr
    assert "clean" in r.stdout
    assert "pass 5/5" in r.stderr             # progress, one line per pass


def test_zeroed_device_is_an_operational_error(tmp_path):
    path = tmp_path / "zeros"
    path.write_bytes(bytes(1 << 20))
    r = fsck(str(path))
    assert r.returncode == 8
    assert r.stderr.count("\n") == 1 and "not a clusterfs filesystem" in r.stderr
    assert r.stdout == ""


def test_missing_device_is_an_operational_error(tmp_path):
    r = fsck(str(tmp_path / "nope"))
    assert r.returncode == 8
    assert r.stderr.count("\n") == 1 and "No such file" in r.stderr


def test_flipped_superblock_magic_is_not_clusterfs(image):
    img, _ = image
    img.flip_bits(SUPERBLOCK_BLKNO, 0, 0x01)
    r = fsck(img.path)
    assert r.returncode == 8 and "not a clusterfs" in r.stderr


def test_check_without_repair_never_writes(image):
    img, ino = image
    img.poke_inode(ino["small"], nlink=7)
    img.flip_bitmap_bit(free_block(img))
    before = sha(img.path)
    out = check(img, want=4)
    assert "link count 7" in out and "leaked" in out
    assert sha(img.path) == before


# -- superblock, resource groups, bitmaps --------------------------------------------------


def test_superblock_bit_flip(image):
    img, _ = image
    # inside the label: the fields stay sane, the checksum does not
    img.flip_bits(SUPERBLOCK_BLKNO, 130, 0x04)
    out = check(img, want=4)
    assert f"superblock: block {SUPERBLOCK_BLKNO}: bad checksum" in out
    out = check(img, "--repair", want=4)     # never repaired against a doubtful superblock
    assert "[fixed]" not in out


def test_rgrp_header_checksum(image):
    img, _ = image
    first, _ = img.sb.rgrp_location(1)
    img.flip_bits(first, 40, 0x10)
    out = check(img, want=4)
    assert f"rgrp 1: header block {first}: bad checksum in rgrp block {first}" in out


def test_bitmap_checksum(image):
    img, _ = image
    first, _ = img.sb.rgrp_location(2)
    img.flip_bits(first + 1, 1000, 0x01)
    out = check(img, want=4)
    assert f"rgrp 2: bitmap block {first + 1}: bad checksum" in out


def test_used_block_cleared_in_bitmap(image):
    img, ino = image
    e = first_extent(img, ino["big"])
    img.flip_bitmap_bit(e.pblk + 1)
    out = check(img, want=4)
    assert (f"block {e.pblk + 1} (inode {ino['big']} (data)) in use but free in the bitmap"
            in out)
    repaired_and_clean(img)
    assert _bit_on_disk(img, e.pblk + 1)


def _bit_on_disk(img: FsImage, blkno: int) -> bool:
    gi = img.sb.rgrp_of(blkno)
    first, _ = img.sb.rgrp_location(gi)
    rel = blkno - first
    return bool(img.read(first + 1)[32 + rel // 8] & (1 << (rel % 8)))


def test_leaked_block_is_freed_by_repair(image):
    img, _ = image
    blk = free_block(img)
    gi = img.sb.rgrp_of(blk)
    img.flip_bitmap_bit(blk)
    first, _ = img.sb.rgrp_location(gi)
    free_before = decode_rgrp(img.read(first), first).free
    out = check(img, want=4)
    assert f"rgrp {gi}: block {blk} marked used but unreachable (leaked)" in out
    assert f"header free count {free_before}" in out
    repaired_and_clean(img)
    assert not _bit_on_disk(img, blk)
    assert decode_rgrp(img.read(first), first).free == free_before


def test_leaked_run_is_one_line(image):
    img, _ = image
    blk = free_block(img) - 5
    for b in range(blk, blk + 4):
        img.flip_bitmap_bit(b)
    out = check(img, want=4)
    assert f"blocks {blk}..{blk + 3} marked used but unreachable (leaked)" in out
    repaired_and_clean(img)


def test_wrong_rgrp_free_count(image):
    img, _ = image
    first, _ = img.sb.rgrp_location(0)
    free = decode_rgrp(img.read(first), first).free
    img.set_free_count(0, free + 7)
    out = check(img, want=4)
    assert f"rgrp 0: header free count {free + 7}, bitmap has {free} free blocks" in out
    repaired_and_clean(img)
    assert decode_rgrp(img.read(first), first).free == free


# -- inodes and link counts ------------------------------------------------------------------


def test_wrong_file_link_count(image):
    img, ino = image
    img.poke_inode(ino["small"], nlink=3)
    out = check(img, want=4)
    assert f"inode {ino['small']}: link count 3, 2 directory entries" in out
    repaired_and_clean(img)
    assert decode_inode(img.read(ino["small"]), ino["small"]).nlink == 2


def test_wrong_directory_link_count(image):
    img, ino = image
    img.poke_inode(ino["docs"], nlink=5)
    out = check(img, want=4)
    assert f"inode {ino['docs']}: link count 5, expected 3 (2 + 1 subdirectories)" in out
    repaired_and_clean(img)


def test_wrong_inode_block_count(image):
    img, ino = image
    img.poke_inode(ino["big"], blocks=3)
    out = check(img, want=4)
    assert f"inode {ino['big']}: block count 3, owns 42 blocks" in out
    repaired_and_clean(img)
    assert decode_inode(img.read(ino["big"]), ino["big"]).blocks == 42


def test_several_problems_repaired_in_one_run(image):
    img, ino = image
    img.poke_inode(ino["small"], nlink=9)
    img.poke_inode(ino["ext"], blocks=1)
    img.flip_bitmap_bit(free_block(img))
    img.set_free_count(1, 5)
    out = repaired_and_clean(img)
    assert out.count("[fixed]") >= 4


def test_stuffed_file_size_mismatch(image):
    img, ino = image
    img.poke_inode(ino["sym"], size=99)
    out = check(img, want=4)
    assert f"inode {ino['sym']}: symlink of size 99 holds 14 stuffed bytes" in out


def test_bad_mode(image):
    img, ino = image
    img.poke_inode(ino["fifo"], mode=0o170644)
    out = check(img, want=4)
    assert f"inode {ino['fifo']}: bad file type in mode 0o170644" in out


def test_inode_checksum(image):
    img, ino = image
    img.flip_bits(ino["other"], 100, 0x01)
    out = check(img, want=4)
    assert f"entry b'other.bin' -> {ino['other']}: not a valid inode (bad checksum" in out
    # its data blocks can no longer be accounted for: reported, not freed
    out = check(img, "--repair", want=4)
    assert "leaked" in out and "not repaired" in out


# -- directories ---------------------------------------------------------------------------


def _set_entries(img: FsImage, d: int, entries: list[fdir.DirEntry]) -> None:
    payload = fdir.encode_linear(entries)
    img.poke_inode(d, payload=payload, size=len(payload))


def _entries(img: FsImage, d: int) -> list[fdir.DirEntry]:
    return fdir.decode_linear(decode_inode(img.read(d), d).payload)


def test_entry_pointing_to_a_free_block(image):
    img, ino = image
    blk = free_block(img)
    _set_entries(img, ino["docs"], _entries(img, ino["docs"]) +
                 [fdir.DirEntry(b"ghost", blk, stat.S_IFREG >> 12)])
    out = check(img, want=4)
    assert (f"directory {ino['docs']}: entry b'ghost' -> {blk}: not a valid inode "
            f"(inode block {blk}: bad magic 0x0; free in bitmap)") in out


def test_entry_pointing_outside_the_data_area(image):
    img, ino = image
    first, _ = img.sb.rgrp_location(1)
    _set_entries(img, ino["docs"], _entries(img, ino["docs"]) +
                 [fdir.DirEntry(b"hdr", first, stat.S_IFREG >> 12),
                  fdir.DirEntry(b"far", img.sb.total_blocks + 5, stat.S_IFREG >> 12)])
    out = check(img, want=4)
    assert f"entry b'hdr' -> {first}: block {first} is rgrp 1's header/bitmap" in out
    assert f"entry b'far' -> {img.sb.total_blocks + 5}: blocks" in out


def test_directory_reachable_twice(image):
    img, ino = image
    root = img.sb.root_ino
    _set_entries(img, root, _entries(img, root) +
                 [fdir.DirEntry(b"sub-again", ino["sub"], stat.S_IFDIR >> 12)])
    out = check(img, want=4)
    assert (f"directory {ino['sub']}: reachable twice: entries in directories "
            f"{root}, {ino['docs']} (parent field says {ino['docs']})") in out
    assert "parent field is" not in out


def test_wrong_parent_field_is_repaired(image):
    img, ino = image
    img.poke_inode(ino["sub"], parent=img.sb.root_ino)
    out = check(img, want=4)
    assert (f"inode {ino['sub']}: directory's parent field is {img.sb.root_ino}, but its "
            f"entry is in directory {ino['docs']}") in out
    repaired_and_clean(img)


def test_entry_type_mismatch(image):
    img, ino = image
    ents = [e._replace(dtype=stat.S_IFDIR >> 12) if e.name == b"small.txt" else e
            for e in _entries(img, ino["docs"])]
    _set_entries(img, ino["docs"], ents)
    out = check(img, want=4)
    assert f"entry b'small.txt' has type 4, inode {ino['small']} is type 8" in out


def _hashed_table(img: FsImage, d: int) -> tuple[int, list[int]]:
    depth, tables = fdir.decode_hashed_payload(decode_inode(img.read(d), d).payload)
    table = fdir.decode_table_block(img.read(tables[0]), tables[0], 1 << depth)
    return depth, table


def test_hashed_leaf_entry_in_the_wrong_leaf(image):
    img, ino = image
    depth, table = _hashed_table(img, ino["hashed"])
    a, b = table[0], table[-1]
    da, na, ea = fdir.decode_leaf(img.read(a), a)
    db, nb, eb = fdir.decode_leaf(img.read(b), b)
    moved = eb[0]
    img.put_block(a, fdir.encode_leaf(ea + [moved], da, na, a))
    img.put_block(b, fdir.encode_leaf(eb[1:], db, nb, b))
    out = check(img, want=4)
    slot = fdir.table_slot(fdir.name_hash(moved.name), depth)
    assert (f"directory {ino['hashed']}: leaf {a}: entry {moved.name!r} hashes to slot "
            f"{slot}, not slots 0..0: lookups cannot find it") in out


def test_hashed_leaf_depth_inconsistent_with_table(image):
    img, ino = image
    depth, table = _hashed_table(img, ino["hashed"])
    a = table[1]
    da, na, ea = fdir.decode_leaf(img.read(a), a)
    img.put_block(a, fdir.encode_leaf(ea, da - 1, na, a))
    out = check(img, want=4)
    assert (f"leaf {a}: local depth {da - 1}, but slots 1..1 point to it "
            f"(table depth {depth})") in out


def test_hashed_leaf_bad_checksum(image):
    img, ino = image
    _, table = _hashed_table(img, ino["hashed"])
    img.flip_bits(table[2], 60, 0x01)
    out = check(img, want=4)
    assert f"directory {ino['hashed']}: leaf for slots 2..2: bad checksum" in out


# -- extents -------------------------------------------------------------------------------


def test_extent_over_rgrp_header(image):
    img, ino = image
    first, _ = img.sb.rgrp_location(3)
    img.poke_inode(ino["other"], payload=encode_records([Extent(0, first, 4)]))
    out = check(img, want=4)
    assert (f"inode {ino['other']}: extent 0+4 -> {first}: block {first} is rgrp 3's "
            "header/bitmap") in out


def test_extent_past_the_end(image):
    img, ino = image
    end = img.sb.total_blocks
    img.poke_inode(ino["other"], payload=encode_records([Extent(0, end - 2, 4)]))
    out = check(img, want=4)
    assert f"extent 0+4 -> {end - 2}: blocks {end - 2}..{end + 1} run past the end" in out


def test_two_files_share_an_extent(image):
    img, ino = image
    e = first_extent(img, ino["big"])
    img.poke_inode(ino["other"], payload=encode_records([Extent(0, e.pblk, 4)]))
    out = check(img, want=4)
    # big.bin comes first in the root directory, so it is the first owner met
    assert (f"inode {ino['other']}: extent 0+4 -> {e.pblk}: data blocks "
            f"{e.pblk}..{e.pblk + 3} already used by inode {ino['big']} (data)") in out
    # other.bin's own blocks are no longer reachable: leaked, and reported as such
    assert "leaked" in out


def test_overlapping_extents_within_a_file(image):
    img, ino = image
    e = first_extent(img, ino["big"])
    img.poke_inode(ino["big"], payload=encode_records([Extent(0, e.pblk, 4),
                                                       Extent(2, e.pblk + 4, 2)]))
    out = check(img, want=4)
    assert f"extent 2+2 -> {e.pblk + 4}: overlaps the previous extent (ends at 4)" in out


def test_extent_block_checksum(image):
    img, ino = image
    (blk,) = struct.unpack_from("<Q", decode_inode(img.read(ino["ext"]), ino["ext"]).payload)
    img.flip_bits(blk, 50, 0x01)
    out = check(img, want=4)
    assert f"inode {ino['ext']}: extent block {blk}: bad checksum" in out


# -- journals ------------------------------------------------------------------------------


def test_corrupt_journal_header(image):
    img, _ = image
    jblk = img.sb.journal_location(0)
    img.flip_bits(jblk, 36, 0x02)
    out = check(img, want=4)
    assert f"journal 0: header block {jblk}: bad checksum" in out


def test_corrupt_orphan_block_is_rewritten_empty(image):
    img, _ = image
    oblk = img.sb.orphan_locations(0)[0]
    img.flip_bits(oblk, 40, 0x04)
    out = check(img, want=4)
    assert f"journal 0: orphan block {oblk}: bad checksum" in out
    check(img, "--repair", want=1)
    check(img, want=0)


def test_committed_and_torn_transactions(image):
    """A committed but unreplayed transaction is reported and replayed by --repair;
    a torn one after it (descriptor and copy, no commit) is not committed: it is
    neither applied nor called corruption."""
    from clusterfs.journal import log
    img, ino = image
    small = ino["small"]
    home = bytearray(img.read(small))
    chmod = decode_inode(home, small)
    chmod.mode = stat.S_IFREG | 0o600
    from clusterfs.format.inode import encode_inode
    from clusterfs.storage.device import BlockDevice
    dev = BlockDevice(img.path)
    try:
        journal = log.Journal(dev, img.sb, 0)
        journal.open()
        journal.commit({small: bytes(encode_inode(chmod, b""))})      # committed
        torn = decode_inode(home, small)
        torn.nlink = 77                                               # would be an error
        pos = journal.jstart + journal.head_off
        dev.write(pos, encode_descriptor([small], pos, journal.seq))
        dev.write(pos + 1, encode_inode(torn, b""))
        dev.flush()
    finally:
        dev.close()
    out = check(img, want=4)
    assert "journal 0: 1 committed transactions (1 blocks) not replayed" in out
    findings = out.replace(str(img.path), "IMAGE")    # the tmp path may contain "77"
    assert "link count" not in findings and "77" not in findings
    assert ": 1 problems," in findings
    assert decode_inode(img.read(small), small).mode == stat.S_IFREG | 0o644   # not written
    out = repaired_and_clean(img)
    assert "journal 0: 1 committed transactions (1 blocks) not replayed [fixed]" in out
    after = decode_inode(img.read(small), small)
    assert after.mode == stat.S_IFREG | 0o600 and after.nlink == 2
    jblk = img.sb.journal_location(0)
    assert decode_jhead(img.read(jblk), jblk).flags & JF_CLEAN


def test_repairs_go_through_the_journal_and_leave_it_clean(image):
    img, ino = image
    img.poke_inode(ino["small"], nlink=4)
    out = repaired_and_clean(img)
    assert "through journal 0" in out
    jblk = img.sb.journal_location(0)
    head = decode_jhead(img.read(jblk), jblk)
    assert head.flags & JF_CLEAN


def test_dirty_journal_without_transactions_is_a_warning(image):
    img, _ = image
    jblk = img.sb.journal_location(0)
    buf = bytearray(img.read(jblk))
    struct.pack_into("<I", buf, 36, 0)         # flags: not clean
    img.reseal(jblk, buf, BlockType.JHEAD)
    r = fsck(img.path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "journal 0 is not marked clean" in r.stderr


def test_repair_refuses_a_device_in_use(image):
    img, ino = image
    img.poke_inode(ino["small"], nlink=4)
    with open(img.path, "rb"):          # this process holds it, as a mount daemon would
        r = fsck(img.path, "--repair")
        assert r.returncode == 8 and "in use" in r.stderr
        r = fsck(img.path)
        assert r.returncode == 4 and f"pid {os.getpid()}" in r.stderr


def test_hashed_table_slot_without_leaf(image):
    img, ino = image
    inode = decode_inode(img.read(ino["hashed"]), ino["hashed"])
    depth, tables = fdir.decode_hashed_payload(inode.payload)
    table = fdir.decode_table_block(img.read(tables[0]), tables[0], 1 << depth)
    table[3] = 0
    img.put_block(tables[0], fdir.encode_table_block(table, tables[0]))
    out = check(img, want=4)
    assert f"directory {ino['hashed']}: slots 3..3 point to no leaf" in out
    # the orphaned leaf's entries are unreachable: reported, nothing freed
    out = check(img, "--repair", want=4)
    assert "not repaired" in out


def test_ten_thousand_files_check_clean(tmp_path):
    img = FsImage(str(tmp_path / "img"), size=256 << 20)
    root = img.sb.root_ino
    for k in range(10):
        d = img.mkdir(root, f"d{k}", hashed=True)
        for i in range(1000):
            img.create(d, f"file-{i:05d}", b"data %d" % i if i % 2 else b"")
    img.flush()
    r = fsck(img.path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "10011 inodes (11 directories)" in r.stdout


def test_random_damage_is_reported_never_a_crash(image):
    """Random bytes in random metadata blocks, resealed so checksums pass: fsck
    reports (exit 0 or 4), never crashes; a repair that claims success is followed
    by a clean run."""
    img, _ = image
    pristine = str(img.path) + ".pristine"
    subprocess.run(["cp", "--sparse=always", img.path, pristine], check=True)
    meta = [(b, t) for b in range(img.sb.rgrp_start, img.sb.total_blocks)
            if (t := block_type(img.read(b))) is not None]
    rng = random.Random(20261121)
    for _ in range(25):
        subprocess.run(["cp", "--sparse=always", pristine, img.path], check=True)
        for _ in range(rng.choice([1, 2, 3])):
            blk, btype = rng.choice(meta)
            buf = bytearray(img.read(blk))
            for _ in range(rng.choice([1, 4, 32])):
                buf[rng.randrange(32, rng.choice([200, 4096]))] = rng.randrange(256)
            img.reseal(blk, buf, BlockType(btype))
        rc = _in_process(img.path)
        assert rc in (0, 4)
        if rc == 4 and _in_process(img.path, repair=True) == 1:
            assert _in_process(img.path) == 0


def _in_process(path: str, repair: bool = False) -> int:
    out, err = io.StringIO(), io.StringIO()
    rc = run_fsck(path, Report(out, err, quiet=True), repair=repair)
    assert "Traceback" not in err.getvalue(), err.getvalue()
    return rc


def test_repair_interrupted_midway_is_finished_by_the_next_run(image, monkeypatch):
    """A crash after the first repair transaction committed: the journal is left
    dirty with it; the next fsck replays it, repairs the rest, and ends clean."""
    from clusterfs.fsck import repair
    from clusterfs.journal import log

    img, ino = image
    img.poke_inode(ino["small"], nlink=6)
    img.poke_inode(ino["big"], blocks=2)
    img.flip_bitmap_bit(free_block(img))

    class Crashing(log.Journal):
        def commit(self, blocks):
            if self.stats["commits"] == 1:
                raise KeyboardInterrupt("power cut")   # not an Exception: nothing cleans up
            super().commit(blocks)

    monkeypatch.setattr(repair, "Journal", Crashing)
    with pytest.raises(KeyboardInterrupt):
        _in_process(img.path, repair=True)
    monkeypatch.undo()
    out = check(img, want=4)
    assert "journal 0: 1 committed transactions (1 blocks) not replayed" in out
    out = repaired_and_clean(img)
    assert decode_inode(img.read(ino["big"]), ino["big"]).blocks == 42
    assert decode_inode(img.read(ino["small"]), ino["small"]).nlink == 2


def test_orphan_inode_is_named_and_reclaimed(tmp_path):
    """An inode unlinked while open when its node died: nlink 0, in no directory,
    its blocks still allocated. Reported by name, reclaimed by --repair."""
    img = FsImage(str(tmp_path / "img"))
    keep = img.create(img.sb.root_ino, "keep", b"k" * 10)
    orphan = img.create(img.sb.root_ino, "gone", os.urandom(3 * 4096))
    img.entries[img.sb.root_ino] = [e for e in img.entries[img.sb.root_ino] if e.ino != orphan]
    img.inodes[orphan].nlink = 0
    img.flush()
    out = check(img, want=4)
    assert (f"blocks {orphan}..{orphan + 3} marked used but unreachable (leaked); orphan "
            f"inode {orphan}, unlinked while open") in out
    repaired_and_clean(img)
    assert not _bit_on_disk(img, orphan)
    assert _bit_on_disk(img, keep)


def test_repair_without_a_usable_journal_writes_in_place(image):
    img, ino = image
    jblk = img.sb.journal_location(0)
    img.flip_bits(jblk, 40, 0x01)
    img.poke_inode(ino["small"], nlink=8)
    out = check(img, "--repair", want=4)                 # the journal header stays bad
    assert "written in place" in out
    assert f"inode {ino['small']}: link count 8, 2 directory entries [fixed]" in out
    out = check(img, want=4)
    assert "link count" not in out and f"journal 0: header block {jblk}" in out


def test_second_journal_checked_and_repairs_use_a_clean_one(tmp_path):
    img, ino = populated(str(tmp_path / "img"), journals=2)
    j1 = img.sb.journal_location(1)
    buf = bytearray(img.read(j1))
    struct.pack_into("<I", buf, 32, 0)          # header of slot 1 claims slot 0
    img.reseal(j1, buf, BlockType.JHEAD)
    img.poke_inode(ino["docs"], nlink=9)
    out = check(img, "--repair", want=4)
    assert f"journal 1: header block {j1} names slot 0" in out
    assert "through journal 0" in out and "[fixed]" in out


def test_committed_transaction_aimed_outside_the_groups(image):
    from clusterfs.journal import log
    from clusterfs.storage.device import BlockDevice

    img, _ = image
    target = img.sb.hb_start           # a heartbeat slot: no transaction may write there
    before = img.read(target)
    dev = BlockDevice(img.path)
    try:
        journal = log.Journal(dev, img.sb, 0)
        journal.open()
        journal.commit({target: bytes(4096)})
    finally:
        dev.close()
    out = check(img, want=4)
    assert "journal 0: committed transaction" in out and (f"targets block {target}, "
                                                          "outside the resource groups") in out
    check(img, "--repair", want=4)
    assert img.read(target) == before          # never replayed
