"""The dlm layer (see clusterfs/__init__.py for the layer rule).

Start at lockspace.py: its docstring maps the modules a Lockspace is made of
(owner, master, directory, toss, members, recovery, barrier, lkb). interface.py
is the contract the layers above code against; local.py the one-node service.
Test harnesses (many nodes in one trio run, the torture) live in tests/.
"""
