"""The fs layer (see clusterfs/__init__.py for the layer rule).

    filesystem  FileSystem: namespace and file operations under glocks
    inode       CachedInode: an inode with its data map / directory in memory
    directory   Directory: linear and hashed (extendible hashing) directories
    extents     extent-list operations (map, insert, truncate)
    alloc       ResourceGroup, Allocator: allocation in resource groups
    kernelforget KernelForget: the kernel told to forget inodes, many per round
"""
