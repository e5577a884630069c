"""Drop-in names of the original ``sync_batchnorm`` package (Synchronized-BatchNorm-PyTorch).

Code written for it keeps working after changing the import::

    from syncbn.compat import SynchronizedBatchNorm2d, DataParallelWithCallback

Example:
    >>> import torch
    >>> from syncbn.compat import SynchronizedBatchNorm2d, DataParallelWithCallback
    >>> net = DataParallelWithCallback(torch.nn.Sequential(SynchronizedBatchNorm2d(3)), replicas=2)
    >>> net(torch.randn(4, 3, 2, 2)).shape
    torch.Size([4, 3, 2, 2])
"""

from __future__ import annotations

from syncbn.convert import convert_model
from syncbn.modules import SyncBatchNorm1d, SyncBatchNorm2d, SyncBatchNorm3d
from syncbn.parallel.data_parallel import DataParallel, patch_replication_callback

SynchronizedBatchNorm1d = SyncBatchNorm1d
SynchronizedBatchNorm2d = SyncBatchNorm2d
SynchronizedBatchNorm3d = SyncBatchNorm3d
# The original subclassed nn.DataParallel to add a replication callback; ours
# synchronizes by itself and also runs on the CPU.
DataParallelWithCallback = DataParallel

__all__ = [
    "DataParallelWithCallback",
    "SynchronizedBatchNorm1d",
    "SynchronizedBatchNorm2d",
    "SynchronizedBatchNorm3d",
    "convert_model",
    "patch_replication_callback",
]
