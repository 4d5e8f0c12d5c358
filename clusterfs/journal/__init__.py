"""The journal layer (see clusterfs/__init__.py for the layer rule).

    log    Journal (commit, checkpoint, close) and replay_journal / scan_journal
"""
