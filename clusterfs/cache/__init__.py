"""The cache layer (see clusterfs/__init__.py for the layer rule).

    glock        GlockManager: cached locks, demote = flush + drop + release
    transaction  TransactionManager: the running transaction, batching, commit
    metadata     MetadataReader: reads metadata blocks (committed log first), withdraw
"""
