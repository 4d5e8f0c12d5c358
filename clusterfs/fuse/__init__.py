"""The fuse layer (see clusterfs/__init__.py for the layer rule).

    operations   Operations: the pyfuse3 adapter; only FUSEError leaves it
    names        KernelNames: the names and directory node ids handed to the kernel
                 (a cluster: taken back on demotes; a moved directory's new node id)
"""
