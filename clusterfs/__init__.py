"""clusterfs: a shared-disk cluster filesystem in userspace.

One block device is mounted read-write by several nodes at once through FUSE;
a distributed lock manager keeps them coherent; each node journals its own
metadata; when a node dies the others fence it, replay its journal and go on.

Layers (one subpackage each). Imports point DOWN this table only: a module may
import from its own layer and from layers below it, never above.

    node      wires it all: config, memory reserve, join, journal slot, serve
    fuse      the pyfuse3 Operations adapter; the only place FUSEError is raised
    fs        namespace and file operations, allocation in resource groups
    cache     cached inodes and blocks, each under a lock; write-back
    journal   per-node write-ahead log of metadata blocks; replay
    storage   the block device: local path, later iSCSI and proxy
    dlm       lockspaces, modes, LVBs, ranges, directory, recovery
    fence     fencing agents behind one interface
    membership heartbeats, views with generation numbers, quorum, events
    comms     TCP streams between nodes, framing, in-memory transport
    wire      the message schema: versioned header, types, MAC
    format    on-disk structures: encode, decode, check (pure, no I/O; of ours it
              imports only errors and native, so every layer may use its constants)

fsck (clusterfs.fsck) sits beside node: it reads through storage, journal and
format and never through fs or fuse, so it judges the disk, not the code.

Shared by all: `clusterfs.errors` (our exceptions), `clusterfs.native` (the
cffi module: checksums, memory reserve, lock table), `clusterfs.config`,
`clusterfs.workers` (the worker threads blocking calls run in: a fixed set in a
mount),
`clusterfs.failover` (the phases of the failover path each layer marks, and the
mount's opt-in audit of what the process asks of the host meanwhile).
"""

__version__ = "0.1.0"
