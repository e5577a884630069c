"""Data parallelism in one process: R replicas in threads sharing SyncBN statistics."""

from syncbn.parallel.data_parallel import DataParallel, is_synchronized, patch_replication_callback

__all__ = ["DataParallel", "is_synchronized", "patch_replication_callback"]
