"""The fence layer (see clusterfs/__init__.py for the layer rule).

    agent        the FenceAgent protocol; NoopAgent, ProcessAgent (dev clusters)
    pidfile      the process agent's node<ID>.pid records
    scsi_pr      SCSI-3 persistent reservations (register; PREEMPT AND ABORT)
    poison_pill  a pill in the victim's heartbeat slot; the watcher a node runs
    factory      make_agent(config, node_id, ...): the agent [fencing] names

Storage sits above this layer: agents get their devices from the caller.
"""
