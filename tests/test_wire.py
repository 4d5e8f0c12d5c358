"""Tier 1: frame encoding, MAC, and rejection of everything malformed."""

from __future__ import annotations

import hashlib
import hmac
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterfs.errors import WireError
from clusterfs.wire import frame as wf
from clusterfs.wire.types import MsgType

KEY = bytes(range(32))


def test_round_trip():
    body = {"a": 1, "b": [1, 2, (3, b"x")], "c": "é", 5: None}
    data = wf.encode(KEY, MsgType.HEARTBEAT, 7, 42, 3, body)
    f = wf.decode(KEY, data)
    assert (f.type, f.sender, f.generation, f.seq, f.version) == (MsgType.HEARTBEAT, 7, 42, 3,
                                                                  wf.WIRE_VERSION)
    assert f.body == {"a": 1, "b": (1, 2, (3, b"x")), "c": "é", 5: None}


def test_prefixed_and_length_check():
    data = wf.encode_prefixed(KEY, MsgType.HELLO, 1, 0, 0, None)
    (n,) = wf.LENGTH.unpack(data[:4])
    assert n == len(data) - 4
    wf.check_length(n, 1 << 20)
    assert wf.decode(KEY, data[4:]).body is None


def test_bad_mac():
    data = bytearray(wf.encode(KEY, MsgType.HEARTBEAT, 1, 1, 1, {"x": 1}))
    data[-1] ^= 1
    with pytest.raises(WireError, match="bad MAC"):
        wf.decode(KEY, bytes(data))


def test_wrong_key():
    data = wf.encode(bytes(32), MsgType.HEARTBEAT, 1, 1, 1, {"x": 1})
    with pytest.raises(WireError, match="bad MAC"):
        wf.decode(KEY, data)


def test_every_flipped_bit_is_rejected():
    data = wf.encode(KEY, MsgType.VIEW_COMMIT, 3, 9, 4, {"members": (1, 2, 3)})
    for i in range(len(data) * 8):
        bad = bytearray(data)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(WireError):
            wf.decode(KEY, bytes(bad))


def test_unknown_version():
    for version in (1, wf.WIRE_VERSION + 1):   # 1: BLAKE2b for large frames too
        data = wf.encode(KEY, MsgType.HEARTBEAT, 1, 1, 1, {}, version=version)
        with pytest.raises(WireError, match=f"unknown wire version {version}"):
            wf.decode(KEY, data)


def test_the_mac_is_blake2b_below_hmac_from_and_hmac_sha256_from_there():
    """Pinned to the libraries' own functions: another node's frames must check here."""
    pattern = bytes(range(256)) * 8
    for length in (0, 100, wf.HMAC_FROM - 1):
        signed = pattern[:length]
        assert wf.mac(KEY, signed) == hashlib.blake2b(signed, key=KEY, digest_size=16).digest()
    for length in (wf.HMAC_FROM, 1 << 20):
        signed = bytes(length)
        assert wf.mac(KEY, signed) == hmac.digest(KEY, signed, "sha256")[:16]
    for body in ({"x": 1}, {"data": bytes(4096)}):
        data = wf.encode(KEY, MsgType.BLOCK_WRITE, 1, 1, 1, body)
        assert data[-16:] == wf.mac(KEY, data[:-16])


def test_decode_of_a_large_frame_takes_a_bytearray_and_leaves_it_resizable():
    body = {"data": bytes(range(256)) * 4096}
    data = bytearray(wf.encode(KEY, MsgType.BLOCK_WRITE, 1, 1, 1, body))
    assert wf.decode(KEY, data, max_frame=2 << 20).body == body
    data[-1] ^= 1
    with pytest.raises(WireError, match="bad MAC"):
        wf.decode(KEY, data, max_frame=2 << 20)
    data.extend(b"more")                             # no view of it is left behind


def test_unknown_type():
    data = wf.encode(KEY, 31, 1, 1, 1, {})  # validly signed, but type 31 is not registered
    with pytest.raises(WireError, match="unknown message type 31"):
        wf.decode(KEY, data)


def test_oversized():
    with pytest.raises(WireError, match="over maximum"):
        wf.check_length(2**32 - 1, 1 << 20)
    data = wf.encode(KEY, MsgType.HEARTBEAT, 1, 1, 1, b"x" * 5000)
    with pytest.raises(WireError, match="over maximum"):
        wf.decode(KEY, data, max_frame=2048)


def test_truncated_and_extended():
    data = wf.encode(KEY, MsgType.HEARTBEAT, 1, 1, 1, {"k": "v" * 20})
    for cut in (0, 1, 10, wf.HEADER_SIZE, len(data) - 1):
        with pytest.raises(WireError):
            wf.decode(KEY, data[:cut])
    with pytest.raises(WireError):
        wf.decode(KEY, data + b"\0")


def test_garbage():
    rng = random.Random(1)
    for _ in range(2000):
        blob = rng.randbytes(rng.randrange(0, 200))
        with pytest.raises(WireError):
            wf.decode(KEY, blob)


def test_signed_but_undecodable_body():
    # a frame signed with the right key but whose body is not msgpack
    data = wf.encode(KEY, MsgType.HEARTBEAT, 1, 1, 1, None, packed_body=b"\xc1\xc1")
    with pytest.raises(WireError, match="undecodable body"):
        wf.decode(KEY, data)


def test_unencodable_body():
    with pytest.raises(WireError, match="not encodable"):
        wf.encode(KEY, MsgType.HEARTBEAT, 1, 1, 1, {1, 2})


def test_session_keys_differ_per_nonce():
    a = wf.session_key(KEY, 1, 2, b"a" * 16, b"b" * 16)
    b = wf.session_key(KEY, 1, 2, b"a" * 16, b"c" * 16)
    c = wf.session_key(KEY, 2, 1, b"a" * 16, b"b" * 16)
    assert len({a, b, c}) == 3


# -- property-based ----------------------------------------------------------------

_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
            | st.text(max_size=20) | st.binary(max_size=20)
            | st.floats(allow_nan=False))
_bodies = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=5).map(tuple)
    | st.dictionaries(st.text(max_size=8) | st.integers(0, 1000), inner, max_size=5),
    max_leaves=20)


@settings(max_examples=120, deadline=None)
@given(body=_bodies, mtype=st.sampled_from(list(MsgType)), sender=st.integers(0, 2**32 - 1),
       gen=st.integers(0, 2**64 - 1), seq=st.integers(0, 2**64 - 1))
def test_property_round_trip(body, mtype, sender, gen, seq):
    f = wf.decode(KEY, wf.encode(KEY, mtype, sender, gen, seq, body))
    assert (f.type, f.sender, f.generation, f.seq, f.body) == (mtype, sender, gen, seq, body)


@settings(max_examples=200, deadline=None)
@given(blob=st.binary(max_size=300))
def test_property_random_bytes_never_decode(blob):
    with pytest.raises(WireError):
        wf.decode(KEY, blob)


@settings(max_examples=120, deadline=None)
@given(body=_bodies, pos=st.integers(0, 10**6), bit=st.integers(0, 7))
def test_property_any_flipped_bit_is_caught(body, pos, bit):
    data = bytearray(wf.encode(KEY, MsgType.DLM_REQUEST, 1, 2, 3, body))
    data[pos % len(data)] ^= 1 << bit
    with pytest.raises(WireError):
        wf.decode(KEY, bytes(data))
