"""The format layer (see clusterfs/__init__.py for the layer rule)."""
