"""Every message type on the wire, in one enum.

Ranges are owned by layers so they can grow without colliding:
  1-31   comms and membership
  32-79  dlm (requests, replies, callbacks, recovery)
  80-95  storage (proxy block I/O)
A frame whose type is not in this enum is rejected by the wire layer.
"""

from enum import IntEnum


class MsgType(IntEnum):
    # comms / membership (1-31)
    HELLO = 1
    HEARTBEAT = 2
    VIEW_PROPOSE = 3
    VIEW_ACK = 4
    VIEW_COMMIT = 5
    EXPELLED = 6
    FENCE_DONE = 7
    LEAVE = 8
    JOIN_REQUEST = 9
    BARRIER = 10
    VIEW_ACTIVATE = 11
    SUSPECT = 12          # "node N did not answer my I/O": every member probes it
    PROBE = 13            # "answer me now" (with a heartbeat)

    # dlm (32-79)
    DLM_REQUEST = 32
    DLM_CONVERT = 33
    DLM_UNLOCK = 34
    DLM_CANCEL = 35
    DLM_REPLY = 36
    DLM_GRANT = 37
    DLM_BAST = 38
    DLM_LOOKUP = 39
    DLM_LOOKUP_REPLY = 40
    DLM_REMOVE = 41
    DLM_QUERY = 42
    DLM_QUERY_REPLY = 43
    DLM_PREFER_ASK = 44       # an owner asks a master to name its locks' servers again
    DLM_PREFER = 45           # a master names the preferred server of owned locks
    DLM_BATCH = 46            # several DLM messages of one lockspace, in their order
    DLM_RECOVER_STATUS = 48
    DLM_RECOVER_NAMES = 49
    DLM_RECOVER_LOCKS = 50
    DLM_RECOVER_LOCKS_REPLY = 51
    DLM_RECOVER_DONE = 52

    # storage (80-95)
    BLOCK_READ = 80
    BLOCK_WRITE = 81
    BLOCK_REPLY = 82
    BLOCK_FLUSH = 83
    BLOCK_INFO = 84
    BLOCK_FENCE = 85      # a member has a server cut a removed node off (groupfence.py)
