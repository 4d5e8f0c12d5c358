"""The fuse layer (see clusterfs/__init__.py for the layer rule).

    operations   Operations: the pyfuse3 adapter; only FUSEError leaves it
"""
