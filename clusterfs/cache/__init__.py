"""The cache layer (see clusterfs/__init__.py for the layer rule).

    glock        GlockManager: cached locks; demote = commit + drop + release
    transaction  TransactionManager: the running transaction, batching, commit, withdraw
"""
