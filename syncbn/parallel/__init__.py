"""Data parallelism in one process: R replicas in threads sharing SyncBN statistics."""

from syncbn.parallel.data_parallel import DataParallel, patch_replication_callback
from syncbn.parallel.parallel_apply import current_replica

__all__ = ["DataParallel", "current_replica", "patch_replication_callback"]
