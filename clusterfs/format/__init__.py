"""The format layer (see clusterfs/__init__.py for the layer rule).

On-disk structures: encode, decode, check. Pure functions, no I/O. Every
structure is described in docs/format.md.

    block       the 32-byte metadata header (magic, type, own address, seq, crc32c)
    superblock  the superblock at byte 65536
    rgrp        resource-group headers and allocation bitmaps
    inode       inodes (inode number = block address), inline xattrs, xattr blocks
    extent      extent records and extent blocks
    directory   linear and hashed (extendible hashing) directories
    journal     journal header, descriptor and commit blocks
    heartbeat   heartbeat slots: a node's claim and the poison pill fencing writes there
    mkfs        geometry planning and the blocks a fresh filesystem starts with
    signatures  recognising other filesystems on a device
"""
