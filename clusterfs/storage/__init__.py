"""The storage layer (see clusterfs/__init__.py for the layer rule).

    device   BlockDevice: block reads/writes and flush over a local path
    iscsi    IscsiDevice: the same interface over an iSCSI LUN (libiscsi, no kernel
             initiator), named iscsi://HOST[:PORT][,HOST[:PORT]...]/TARGET-IQN/LUN
    holders  who else uses a local device (mounts, open descriptors)

open_block_device() is how commands open a device a user named.
"""


def open_block_device(path: str, writable: bool = True, initiator: str | None = None):
    """An IscsiDevice for an iscsi:// URL, else a BlockDevice; StorageError if it cannot
    be opened. Both offer the same methods (BlockDevice's). `initiator`: the iSCSI
    initiator name of the session (a cluster node logs in under its own, so that its
    persistent-reservation registrations are its own; ignored for a local path)."""
    from clusterfs.storage.iscsi import IscsiDevice, is_iscsi_url  # noqa: PLC0415

    if is_iscsi_url(path):
        return IscsiDevice(path, writable, initiator=initiator)
    from clusterfs.storage.device import BlockDevice  # noqa: PLC0415

    return BlockDevice(path, writable)
