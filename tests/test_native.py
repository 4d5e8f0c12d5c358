"""Unit tests of the native (cffi) module: checksums and the memory reserve."""

import zlib

import pytest

from clusterfs import native
from clusterfs.errors import NativeError


def test_crc32c_known_vector():
    # The CRC32C check value from the Castagnoli/iSCSI specification.
    assert native.crc32c(b"123456789") == 0xE3069283


def test_crc32c_is_not_crc32_and_continues():
    data = bytes(range(256)) * 17
    assert native.crc32c(data) != zlib.crc32(data)
    split = native.crc32c(data[100:], native.crc32c(data[:100]))
    assert split == native.crc32c(data)


def test_crc32c_detects_single_bit_flip():
    block = bytearray(4096)
    good = native.crc32c(block)
    block[1234] ^= 0x10
    assert native.crc32c(block) != good


def test_pool_hands_out_aligned_buffers_until_empty():
    pool = native.BufferPool(3, 4096)
    bufs = [pool.get() for _ in range(3)]
    assert all(b is not None and len(b) == 4096 for b in bufs)
    assert pool.get() is None  # the reserve never grows
    addrs = {native.ffi.cast("uintptr_t", native.ffi.from_buffer(b)) for b in bufs}
    assert all(int(a) % 4096 == 0 for a in addrs)
    for b in bufs:
        pool.put(b)
    assert pool.free == 3


def test_pool_rejects_foreign_buffer():
    pool = native.BufferPool(1, 4096)
    with pytest.raises(NativeError):
        pool.put(memoryview(bytearray(4096)))


def test_pool_rejects_bad_geometry():
    with pytest.raises(NativeError):
        native.BufferPool(2, 1000)
