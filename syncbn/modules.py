"""``SyncBatchNorm`` modules: drop-in ``nn.BatchNormNd`` whose batch statistics span replicas.

The module holds state and decides which statistics to use, exactly as
``torch.nn.modules.batchnorm._BatchNorm`` does; the math lives in
``syncbn.functional.sync_batch_norm``. Parameters, buffers and ``state_dict`` keys are
those of ``nn.BatchNormNd`` (we subclass torch's ``_BatchNorm``), so checkpoints move
freely between the two.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from syncbn.comm.distributed import process_group_of
from syncbn.comm.replica_context import replica_context
from syncbn.functional import sync_batch_norm
from syncbn.synchronized import Synchronized, assign_layer_key, check_bound, scripted_as, traced_call


class SyncBatchNorm(Synchronized, _BatchNorm):
    r"""Batch normalization over ``(N, C, *)`` input with statistics synchronized across replicas.

    Inside ``syncbn.DataParallel`` with R replicas, or in a torch.distributed job of R
    ranks, training-mode statistics are those of the whole batch (all replicas), so R
    replicas compute what one device computes on the full batch. Anywhere else it
    behaves exactly like ``nn.BatchNormNd``.

    Args:
        num_features: number of channels ``C``.
        eps: added to the variance for numerical stability. Default: 1e-5.
        momentum: factor of the running-statistics update; ``None`` for a cumulative
            average. Default: 0.1.
        affine: learn a per-channel ``weight`` (and ``bias``). Default: True.
        track_running_stats: keep ``running_mean``/``running_var``; if False, batch
            statistics are used in eval mode too. Default: True.
        device, dtype: where and in which dtype to create parameters and buffers.
        bias: learn ``bias`` (only with ``affine``). Default: True.
        process_group: the torch.distributed group to synchronize over. Default: the
            default group, when one is initialized.

    Shape:
        - Input: ``(N, C, *)``; output: the same shape, dtype and memory format.

    Example:
        >>> import torch, syncbn
        >>> bn = syncbn.SyncBatchNorm(3)
        >>> bn(torch.randn(4, 3, 8, 8)).shape
        torch.Size([4, 3, 8, 8])
    """

    # Only replica 0 ever writes its buffers (forward below, syncbn.functional).
    replicas_read_buffers_only = True
    # Class-level default: converted modules are made without calling __init__. Not an
    # annotation: TorchScript would try to type it, and its forward never reads it.
    process_group = None
    __jit_ignored_attributes__ = ["process_group"]

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.process_group = process_group
        assign_layer_key(self)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles nn.BatchNorm's forward: nothing to synchronize with there
            return self._plain_forward(input)
        return self._synchronized_forward(input)

    _plain_forward = scripted_as(_BatchNorm.forward)

    @torch.jit.unused
    def _synchronized_forward(self, input: Tensor) -> Tensor:
        traced = traced_call(self, input)
        if traced is not None:
            return traced
        self._check_input_dim(input)
        replica = replica_context(self)
        # Batch statistics in training, and in eval when there are no running ones.
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        if bn_training:
            check_bound(self, replica is not None)
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            # Replica 0's buffers are the master's; the other replicas' are discarded (or
            # are the master's, read only), so only replica 0 counts.
            if replica is None or replica.rank == 0:
                self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                exponential_average_factor = _cumulative_factor(self.num_batches_tracked)
        # Running statistics are updated only when tracked and training.
        use_buffers = not self.training or self.track_running_stats
        return sync_batch_norm(
            input,
            self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
            replica=replica,
            process_group=process_group_of(self, replica) if bn_training else None,
            layer=self,
        )


def _cumulative_factor(num_batches_tracked: Tensor) -> float | Tensor:
    """``1 / num_batches_tracked``: a float, or under torch.compile a 0-dim tensor (``float()`` breaks the graph)."""
    if torch.compiler.is_compiling():
        return 1.0 / num_batches_tracked.clamp(min=1).double()
    return 1.0 / max(float(num_batches_tracked), 1.0)


class SyncBatchNorm1d(SyncBatchNorm):
    r"""``SyncBatchNorm`` over ``(N, C)`` or ``(N, C, L)`` input, like ``nn.BatchNorm1d``.

    Example:
        >>> import torch, syncbn
        >>> syncbn.SyncBatchNorm1d(16)(torch.randn(8, 16)).shape
        torch.Size([8, 16])
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class SyncBatchNorm2d(SyncBatchNorm):
    r"""``SyncBatchNorm`` over ``(N, C, H, W)`` input, like ``nn.BatchNorm2d``.

    Example:
        >>> import torch, syncbn
        >>> syncbn.SyncBatchNorm2d(3)(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 3, 8, 8])
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class SyncBatchNorm3d(SyncBatchNorm):
    r"""``SyncBatchNorm`` over ``(N, C, D, H, W)`` input, like ``nn.BatchNorm3d``.

    Example:
        >>> import torch, syncbn
        >>> syncbn.SyncBatchNorm3d(3)(torch.randn(2, 3, 4, 8, 8)).shape
        torch.Size([2, 3, 4, 8, 8])
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")
