"""fsck: the offline checker (see clusterfs/__init__.py for the layer rule).

It sits beside the fs layer, not above it: it imports storage, journal and
format only, and reads the disk as the format defines it (docs/format.md),
never through the filesystem code it is meant to check. docs/fsck.md says
what it checks and repairs.

    report      problems found, progress lines, the exit code
    reader      block reads, with an overlay of committed-but-unreplayed journal blocks
    context     the state one run shares: reader, geometry, groups, block map
    blockmap    who owns each block (metadata, an inode), conflicts
    superblock  pass 1: the superblock
    journals    pass 1: journal headers, unreplayed transactions, replay
    rgrps       pass 2: resource-group headers and bitmaps
    directory   reading linear and hashed directories, checking their structure
    inodes      checking one inode: mode, data map, extents, sizes, block count
    walk        pass 3/4: the walk from the root, link counts
    bitmaps     pass 5: bitmaps against the blocks the walk reached
    repair      writing fixes (through a clean journal when there is one)
    mounted     is someone else using the device?
    checker     the passes in order: run_fsck()
"""
