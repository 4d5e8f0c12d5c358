"""The storage layer (see clusterfs/__init__.py for the layer rule).

    device   BlockDevice: block reads/writes and flush over a local path
"""
