"""The liveness beacon's datagram: "node N's process, incarnation I, is running, its
event loop last ran A ms ago, and its last stall ran from B to C ms ago"
(comms/beacon.py sends and receives them; why, in docs/cluster.md "Beacons").

Layout (little-endian), 52 bytes:

    0   4  magic b"CFB1"
    4   4  node id
    8   8  incarnation
    16  8  sequence number (grows by one per datagram within an incarnation)
    24  4  loop age in ms (how long ago the sender's event loop last ran; capped)
    28  4  the loop's last stall that ended: began this many ms ago (0: none yet)
    32  4  ... and ended this many ms ago
    36 16  blake2b(bytes 0-35, key=beacon key, digest_size=16)

The beacon key is derived from the cluster key for this use alone, so a beacon can
never pass for a frame of the TCP wire or the reverse. A receiver accepts a
datagram only with a valid MAC, from a configured node, with a sequence number
above the last it accepted from that incarnation: a recorded beacon replayed later
says nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

from clusterfs.errors import WireError

MAGIC = b"CFB1"
BODY = struct.Struct("<4sIQQIII")
MAC_SIZE = 16
SIZE = BODY.size + MAC_SIZE               # 52
MS_MAX = 2**32 - 1


@dataclass(frozen=True)
class Beacon:
    node: int
    incarnation: int
    seq: int
    loop_age: float                       # seconds
    stall_began: float = 0.0              # seconds ago (0: no stall yet)
    stall_ended: float = 0.0              # seconds ago


def _ms(seconds: float) -> int:
    return min(MS_MAX, max(0, int(seconds * 1000)))


def beacon_key(cluster_key: bytes) -> bytes:
    h = hashlib.blake2b(key=cluster_key, digest_size=32, person=b"clusterfs-beac1")
    return h.digest()


def _mac(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2b(data, key=key, digest_size=MAC_SIZE).digest()


def encode(key: bytes, beacon: Beacon) -> bytes:
    body = BODY.pack(MAGIC, beacon.node, beacon.incarnation, beacon.seq,
                     _ms(beacon.loop_age), _ms(beacon.stall_began), _ms(beacon.stall_ended))
    return body + _mac(key, body)


def decode(key: bytes, data: bytes) -> Beacon:
    """WireError for anything but a well-formed, authentic beacon."""
    if len(data) != SIZE:
        raise WireError(f"beacon of {len(data)} bytes, want {SIZE}")
    body = data[:BODY.size]
    if not hmac.compare_digest(_mac(key, body), data[BODY.size:]):
        raise WireError("beacon MAC mismatch")
    magic, node, inc, seq, age_ms, began_ms, ended_ms = BODY.unpack(body)
    if magic != MAGIC:
        raise WireError(f"beacon magic {magic!r}")
    return Beacon(node, inc, seq, age_ms / 1000, began_ms / 1000, ended_ms / 1000)
