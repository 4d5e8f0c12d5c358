"""The fs layer (see clusterfs/__init__.py for the layer rule).

    filesystem  FileSystem: state, plumbing, attributes and lookups, orphans, whole fs
    namespace   Namespace: create, link, unlink, rmdir, rename, readdir (a FileSystem mixin)
    openfiles   OpenFiles: open counts and the iopen lock (a FileSystem mixin)
    filedata    FileData: read, write, truncate, fsync (a FileSystem mixin)
    xattrs      Xattrs: extended attributes (a FileSystem mixin)
    demotion    Demotion: what a lock going down does (a FileSystem mixin)
    inode       CachedInode: an inode with its data map / directory in memory
    directory   Directory: linear and hashed (extendible hashing) directories
    extents     extent-list operations (map, insert, truncate)
    alloc       ResourceGroup, Allocator: allocation in resource groups
    kernelforget KernelForget: the kernel told to forget inodes, many per round
    orphans     OrphanList: a slot's on-disk list of inodes unlinked while open
"""
