"""The node layer (see clusterfs/__init__.py for the layer rule).

    mkfs_cmd    mkfs.clusterfs / clusterfs mkfs
    mount_cmd   clusterfs mount: device checks, memory reserve, slot, replay, FUSE serve
    memory      the mount's memory reserve: locked memory, held heap, arenas, workers
"""
