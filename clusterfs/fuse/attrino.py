"""An entry's inode number (st_ino) set apart from the node id the kernel knows it by.

The kernel keys its inodes by the node id of an entry (fuse_entry_param.ino) and shows
the attributes' inode number (attr.st_ino) as st_ino and as readdir's d_ino. pyfuse3's
EntryAttributes sets both from its one `st_ino` field, so a directory shown to the
kernel under a node id of its own (fuse/names.py: its inode number with an id
generation in the high bits) showed that large number as its st_ino as well. The
kernel does not need the two to match, so `set_attr_ino` writes the inode number into
the attributes alone.

pyfuse3 (3.x) keeps the attributes in the `struct stat` inside its fuse_entry_param
and a pointer to it as the object's last field (`EntryAttributes.attr`). At import a
probe object checks that layout: the pointer is where the object ends and points inside
the object, a value set through pyfuse3 is read back at both places, and a write
there leaves the node id as it was. Where any of that fails (another pyfuse3 or
platform), st_ino stays the node id, as before, and the log says so once.
"""

from __future__ import annotations

import ctypes
import logging

import pyfuse3

log = logging.getLogger(__name__)

_POINTER = ctypes.sizeof(ctypes.c_void_p)
_PARAM_AT = 2 * _POINTER           # after PyObject_HEAD (refcount, type)
_STAT_IN_PARAM = 16                # after fuse_entry_param's ino and generation
_INO_IN_STAT = 8                   # after struct stat's st_dev (x86_64, aarch64)


def _u64(address: int) -> ctypes.c_uint64:
    return ctypes.c_uint64.from_address(address)


def _stat_address(entry: pyfuse3.EntryAttributes) -> int:
    """Where the entry's struct stat is, read from its `attr` pointer."""
    return ctypes.c_void_p.from_address(id(entry) + type(entry).__basicsize__
                                        - _POINTER).value or 0


def _layout_checked() -> bool:
    try:
        probe = pyfuse3.EntryAttributes()
        probe.st_ino = 0x5A5A_1234_5678
        probe.generation = 0x0707_0707
        base = id(probe)
        stat_at = _stat_address(probe)
        if stat_at != base + _PARAM_AT + _STAT_IN_PARAM:
            return False
        if (_u64(base + _PARAM_AT).value, _u64(base + _PARAM_AT + 8).value,
                _u64(stat_at + _INO_IN_STAT).value) != (0x5A5A_1234_5678, 0x0707_0707,
                                                        0x5A5A_1234_5678):
            return False
        _u64(stat_at + _INO_IN_STAT).value = 42
        return probe.st_ino == 0x5A5A_1234_5678 and probe.generation == 0x0707_0707
    except (AttributeError, TypeError, ValueError):
        return False


AVAILABLE = _layout_checked()
if not AVAILABLE:
    log.info("pyfuse3 %s: its entry layout is not the one known here; a directory "
             "another node moved shows its kernel node id as st_ino",
             getattr(pyfuse3, "__version__", "?"))


def set_attr_ino(entry: pyfuse3.EntryAttributes, ino: int) -> bool:
    """Show `ino` as the entry's st_ino, its node id unchanged (set st_ino to the node
    id first). False, changing nothing, where pyfuse3's layout is not the known one."""
    if not AVAILABLE or type(entry) is not pyfuse3.EntryAttributes:
        return False
    _u64(_stat_address(entry) + _INO_IN_STAT).value = ino
    return True
