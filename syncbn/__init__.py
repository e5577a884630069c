"""syncbn: synchronized BatchNorm for PyTorch, on CPUs and GPUs, in threads or processes.

Example:
    >>> import torch, syncbn
    >>> net = syncbn.convert_model(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)))
    >>> out = syncbn.DataParallel(net, replicas=2)(torch.randn(4, 3, 8, 8))
"""

from syncbn import compat
from syncbn.convert import convert_model, revert_model
from syncbn.errors import SyncBNError, SyncBNPeerError, SyncBNTimeoutError
from syncbn.functional import sync_batch_norm
from syncbn.modules import SyncBatchNorm, SyncBatchNorm1d, SyncBatchNorm2d, SyncBatchNorm3d
from syncbn.parallel import DataParallel, patch_replication_callback

__version__ = "0.1.0"

__all__ = [
    "DataParallel",
    "SyncBNError",
    "SyncBNPeerError",
    "SyncBNTimeoutError",
    "SyncBatchNorm",
    "SyncBatchNorm1d",
    "SyncBatchNorm2d",
    "SyncBatchNorm3d",
    "compat",
    "convert_model",
    "patch_replication_callback",
    "revert_model",
    "sync_batch_norm",
    "__version__",
]
