"""One frame on the wire: a fixed versioned header, a msgpack body, a keyed MAC.

Layout (all integers big-endian)::

    u32  length            bytes that follow (header + body + mac); on TCP only
    ---- header (28 bytes) ----------------------------------------------------
    u8   version           WIRE_VERSION (1)
    u8   flags             0 (reserved)
    u16  type              a clusterfs.wire.types.MsgType
    u32  sender            node id of the sender
    u64  generation        the sender's view generation when it sent
    u64  seq               per-connection, per-direction sequence number (1, 2, ...)
    u32  body_len          length of the msgpack body
    ---- body_len bytes: msgpack (arrays decode as tuples, str as str) ---------
    ---- 16 bytes: MAC(K, header + body) --------------------------------------

K is the cluster key for the HELLO handshake frames and a per-connection session
key (see `session_key`) for everything after it; together with `seq` that makes a
frame recorded on one connection worthless on any other, and a frame replayed,
dropped or reordered within a connection fails the sequence check.

Any frame that is too short, too long, of another version, of an unknown type,
with a bad MAC, a bad length or an undecodable body raises WireError.

MAC: keyed BLAKE2b (digest_size 16) over fewer than HMAC_FROM signed bytes, else
HMAC-SHA-256 truncated to 16 bytes (as RFC 2104 allows); both sides know which from
the frame's length. Why two (version 2; version 1 was BLAKE2b throughout): block
frames carry up to a MiB of data, MAC'd by the sender and again by the receiver, and
with the CPU's SHA extensions OpenSSL's SHA-256 runs about 1.7 GB/s against 0.5 GB/s
for hashlib's BLAKE2b, which made the MAC the largest cost of a proxied write; but
HMAC over the small frames of lock traffic made lockbench's remote round trip about a
fifth slower, so small frames keep BLAKE2b (docs/cluster.md).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from clusterfs.errors import WireError
from clusterfs.wire.types import MsgType

WIRE_VERSION = 2                   # 2: HMAC-SHA-256 for large frames (1: BLAKE2b for all)
HEADER = struct.Struct(">BBHIQQI")
HEADER_SIZE = HEADER.size          # 28
MAC_SIZE = 16
HMAC_FROM = 2048                   # signed bytes from which the MAC is HMAC-SHA-256
LENGTH = struct.Struct(">I")
MIN_FRAME = HEADER_SIZE + MAC_SIZE
_KNOWN_TYPES = frozenset(int(t) for t in MsgType)


@dataclass(frozen=True)
class Frame:
    type: int
    sender: int
    generation: int
    seq: int
    body: Any
    version: int = WIRE_VERSION


def mac(key: bytes, data: bytes | memoryview) -> bytes:
    """The MAC of a frame's signed bytes (module doc: which one by their length)."""
    if len(data) < HMAC_FROM:
        return hashlib.blake2b(data, key=key, digest_size=MAC_SIZE).digest()
    return hmac.digest(key, data, "sha256")[:MAC_SIZE]


def session_key(cluster_key: bytes, client: int, server: int,
                client_nonce: bytes, server_nonce: bytes) -> bytes:
    """The MAC key of one connection, derived from both sides' fresh nonces."""
    h = hashlib.blake2b(key=cluster_key, digest_size=32, person=b"clusterfs-sess1")
    h.update(LENGTH.pack(client) + LENGTH.pack(server) + client_nonce + server_nonce)
    return h.digest()


def encode_body(body: Any) -> bytes:
    try:
        return msgpack.packb(body, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireError(f"body not encodable: {exc}") from exc


def decode_body(packed: bytes | memoryview) -> Any:
    """msgpack -> Python, as receivers see it (arrays become tuples)."""
    try:
        return msgpack.unpackb(packed, raw=False, use_list=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises many kinds; all mean a bad body
        raise WireError(f"undecodable body: {type(exc).__name__}: {exc}") from exc


def encode(key: bytes, mtype: int, sender: int, generation: int, seq: int, body: Any,
           *, version: int = WIRE_VERSION, packed_body: bytes | None = None) -> bytes:
    """One frame without the TCP length prefix."""
    signed = _signed(mtype, sender, generation, seq, body, version, packed_body)
    return signed + mac(key, signed)


def encode_prefixed(key: bytes, mtype: int, sender: int, generation: int, seq: int,
                    body: Any, *, packed_body: bytes | None = None) -> bytes:
    signed = _signed(mtype, sender, generation, seq, body, WIRE_VERSION, packed_body)
    # one copy of a block frame's payload here, not one per piece added
    return b"".join((LENGTH.pack(len(signed) + MAC_SIZE), signed, mac(key, signed)))


def _signed(mtype: int, sender: int, generation: int, seq: int, body: Any, version: int,
            packed_body: bytes | None) -> bytes:
    """Header and body: what the MAC covers."""
    b = encode_body(body) if packed_body is None else packed_body
    return HEADER.pack(version, 0, int(mtype), sender, generation, seq, len(b)) + b


def check_length(n: int, max_frame: int) -> None:
    """Validate a TCP length prefix before reading that many bytes."""
    if n < MIN_FRAME:
        raise WireError(f"frame length {n} shorter than {MIN_FRAME}")
    if n > max_frame:
        raise WireError(f"frame length {n} over maximum {max_frame}")


def take_frame(buf: bytearray, max_frame: int) -> bytes | None:
    """The first whole frame in `buf` (bytes received on TCP), without its length
    prefix, taken out of it; None while it is not all there. WireError for a length
    out of bounds (check_length), before the rest of the frame is waited for."""
    if len(buf) < LENGTH.size:
        return None
    (n,) = LENGTH.unpack_from(buf)
    check_length(n, max_frame)
    end = LENGTH.size + n
    if len(buf) < end:
        return None
    with memoryview(buf) as view:           # one copy of a block frame's MiB, not two
        data = bytes(view[LENGTH.size : end])
    del buf[:end]
    return data


def decode(key: bytes, data: bytes, *, max_frame: int = 1 << 20) -> Frame:
    """Check and decode one frame (without length prefix). WireError on anything wrong."""
    check_length(len(data), max_frame)
    try:
        version, _flags, mtype, sender, gen, seq, body_len = HEADER.unpack_from(data)
    except struct.error as exc:  # pragma: no cover - length checked above
        raise WireError(f"bad header: {exc}") from exc
    if version != WIRE_VERSION:
        raise WireError(f"unknown wire version {version}")
    if HEADER_SIZE + body_len + MAC_SIZE != len(data):
        raise WireError(f"body length {body_len} does not match frame length {len(data)}")
    # views, not copies of a block frame's payload (of immutable bytes: a view kept
    # alive by an exception's traceback then pins nobody's buffer)
    view = memoryview(data if isinstance(data, bytes) else bytes(data))
    if not hmac.compare_digest(mac(key, view[:-MAC_SIZE]), view[-MAC_SIZE:]):
        raise WireError(f"bad MAC (type {mtype}, claimed sender {sender})")
    if mtype not in _KNOWN_TYPES:
        raise WireError(f"unknown message type {mtype}")
    body = decode_body(view[HEADER_SIZE:-MAC_SIZE])
    return Frame(mtype, sender, gen, seq, body, version)
