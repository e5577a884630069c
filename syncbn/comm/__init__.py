"""How replicas exchange BatchNorm statistics.

``threads``: R replicas of one process, run in threads (the DataParallel way).
"""

from syncbn.comm.threads import ReplicaContext, ReplicaGroup, bind_replica, replica_context

__all__ = ["ReplicaContext", "ReplicaGroup", "bind_replica", "replica_context"]
