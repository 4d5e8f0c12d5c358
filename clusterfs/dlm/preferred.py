"""The preferred block server of a resource (proxy I/O, ../shared/seeds/000).

A node without a path to the disk reaches it through the storage group's block
servers (clusterfs.storage.proxy). Every lock grant names, for its resource, the
server that node sends the I/O under that lock to. The resource's master chooses
it from the live servers (the storage group's members of the master's current
view), by rendezvous hashing: each server scores hash(resource, server) and the
highest score wins. So

- the resources spread evenly over the servers;
- every node that knows the same live servers computes the same order (a proxy
  routes a region it holds no grant for by the same function);
- the choice changes only when servers come or go, and then only for the
  resources that lose or gain a server: a server that leaves moves only its own
  resources, to the next server of each one's order.

Pure functions; the DLM's master calls them (master.py), the owner hands the
answer to whoever asked to hear it (`Lockspace.on_preferred`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

_PERSON = b"clusterfs-pref"


def _score(key: bytes, server: int) -> int:
    # node ids are 32-bit unsigned (config)
    digest = hashlib.blake2b(server.to_bytes(4, "little") + key, digest_size=8,
                             person=_PERSON).digest()
    return int.from_bytes(digest, "little")


def server_order(key: bytes, servers: Iterable[int]) -> list[int]:
    """The servers in the order `key` prefers them: the first is its preferred server,
    the next the one it moves to if the first goes away, and so on."""
    return sorted(set(servers), key=lambda s: (_score(key, s), -s), reverse=True)


def preferred_server(key: bytes, servers: Iterable[int],
                     avoid: Iterable[int] = ()) -> int | None:
    """The preferred server of resource `key` among `servers`, leaving out those in
    `avoid` (silent to whoever asks) while any other is left; None without servers."""
    order = server_order(key, servers)
    if not order:
        return None
    shunned = set(avoid)
    return next((s for s in order if s not in shunned), order[0])
