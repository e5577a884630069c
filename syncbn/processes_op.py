"""The processes way as custom ops, so that torch.compile traces through a SyncBN layer.

Why: at a graph break the layer's output enters the next compiled graph as a graph
input, and a compiled graph that mutates a grad-requiring input in place and returns it
(``F.silu(bn(x), inplace=True)``, torchvision's ``nn.Hardswish(inplace=True)``) fails in
backward (torch 2.13, cf. pytorch/pytorch#185497). As custom ops the layer stays in the
graph and its output is an intermediate, which in-place ops may change.

The ops run the eager code of ``syncbn._functions`` (``forward_across_processes``,
``backward_across_processes``), checked collectives, call counts and errors included;
torch.compile sees only their fake (shape-only) versions. What is not a tensor travels
as a constant: the process group by name, the layer by its key
(``syncbn.synchronized.layer_key``). ``syncbn::processes_forward`` is functional (torch
registers autograd only for those); the running statistics are updated by a second op
that mutates them. Double backward (``create_graph=True``) is not supported under
torch.compile (AOTAutograd), only eagerly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._library.effects import EffectType

from syncbn._functions import backward_across_processes, forward_across_processes
from syncbn.comm.distributed import layer_tag
from syncbn.stats import BatchStatistics, update_running_statistics
from syncbn.synchronized import layer_key, layer_with_key


def sync_batch_norm_across_processes(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float | Tensor,
    eps: float,
    group: dist.ProcessGroup,
    layer: nn.Module | None,
) -> Tensor:
    """The processes way's training-mode batch norm, as ops torch.compile traces without a graph break.

    Args:
        input, weight, bias, running_mean, running_var, eps: as ``sync_batch_norm``.
        momentum: a float, or a 0-dim tensor (``1 / num_batches_tracked`` under torch.compile).
        group: the process group; every rank must call.
        layer: the calling module, which names the collectives (None: ``sync_batch_norm``).

    Returns:
        The normalized tensor, as ``_SyncBatchNormFunction`` computes it.

    Example:
        >>> # in every process of an initialized group, usually inside a compiled model:
        >>> # y = sync_batch_norm_across_processes(x, w, b, rm, rv, 0.1, 1e-5, dist.group.WORLD, bn)
    """
    global _last_info
    output, mean, m2, _, info = torch.ops.syncbn.processes_forward(
        input, weight, bias, eps, group.group_name, layer_key(layer), _last_info
    )
    _last_info = info
    if running_mean is not None and running_var is not None:
        if not isinstance(momentum, Tensor):
            momentum = torch.tensor(momentum, dtype=torch.float64)
        torch.ops.syncbn.processes_update_running_statistics(running_mean, running_var, mean, m2, info, momentum)
    return output


# The last forward op's ``info``, which the next one takes as ``after``: a data dependency
# that keeps a compiled graph from reordering the layers' collectives (see the end). Always
# a tensor of info's shape and dtype, so that dynamo's guards on it never fail.
_last_info: Tensor = torch.zeros(2, dtype=torch.int64)


def _resolve(group: str) -> dist.ProcessGroup:
    # The group's name is what torch's own traceable collectives pass into their ops.
    return dist.distributed_c10d._resolve_process_group(group)


@torch.library.custom_op("syncbn::processes_forward", mutates_args=())
def _processes_forward(
    input: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, group: str, layer: int, after: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (output, global mean, global M2, invstd, [count, call index]); one checked collective.

    ``after`` is the previous op's ``[count, call index]``, unused: it only orders the ops.
    """
    resolved, module = _resolve(group), layer_with_key(layer)
    output, stats, invstd, tag = forward_across_processes(input, weight, bias, eps, resolved, module)
    # Op outputs may not alias each other (an empty batch's mean and M2 can be one tensor).
    info = torch.tensor([stats.count, tag.call], dtype=torch.int64)
    # Contiguous, as the fake says: inductor may hand the op an input in another layout than
    # the one it traced with (channels_last from a convolution), and checks the output's.
    return output.contiguous(), stats.mean.clone(), stats.m2.clone(), invstd, info


@_processes_forward.register_fake
def _(
    input: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, group: str, layer: int, after: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    channels = input.size(1)
    statistics = [input.new_empty(channels, dtype=torch.float64) for _ in range(3)]
    return input.new_empty(input.shape), *statistics, torch.empty(2, dtype=torch.int64)


@torch.library.custom_op("syncbn::processes_backward", mutates_args=())
def _processes_backward(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    info: Tensor,
    group: str,
    layer: int,
    input_needs_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> (input gradient, or an empty tensor when not needed; sum(dy); sum(dy * xhat)); one checked collective."""
    count, call = info.tolist()
    resolved = _resolve(group)
    tag = layer_tag(layer_with_key(layer), resolved)._replace(call=call)  # the forward call's index
    grad_input, sum_dy, sum_dy_xhat = backward_across_processes(
        grad_output, input, weight, mean, invstd, count, tag, resolved, input_needs_grad
    )
    return grad_input.contiguous() if grad_input is not None else input.new_empty(0), sum_dy, sum_dy_xhat


@_processes_backward.register_fake
def _(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    info: Tensor,
    group: str,
    layer: int,
    input_needs_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    grad_input = input.new_empty(input.shape) if input_needs_grad else input.new_empty(0)
    return grad_input, torch.empty_like(mean), torch.empty_like(mean)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    input, weight, bias, _, group, layer, _ = inputs
    _, mean, m2, invstd, info = output
    ctx.save_for_backward(input, weight, mean, invstd, info)
    ctx.group, ctx.layer = group, layer
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.mark_non_differentiable(mean, m2, invstd, info)


def _backward(
    ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor, *statistics_grads: Tensor
) -> tuple[Tensor | None, ...]:
    input, weight, mean, invstd, info = ctx.saved_tensors
    needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    grad_input, sum_dy, sum_dy_xhat = torch.ops.syncbn.processes_backward(
        grad_output, input, weight, mean, invstd, info, ctx.group, ctx.layer, needs_input
    )
    grad_weight = sum_dy_xhat.to(weight.dtype) if weight is not None and needs_weight else None
    grad_bias = sum_dy.to(ctx.bias_dtype) if needs_bias else None
    return grad_input if needs_input else None, grad_weight, grad_bias, None, None, None, None


_processes_forward.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("syncbn::processes_update_running_statistics", mutates_args=("running_mean", "running_var"))
def _processes_update_running_statistics(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, m2: Tensor, info: Tensor, momentum: Tensor
) -> None:
    """Fold the global statistics into the running ones in place, as the eager way does (not for an empty batch)."""
    count = int(info[0])
    if count > 0:
        update_running_statistics(running_mean, running_var, BatchStatistics(count, mean, m2), momentum)


@_processes_update_running_statistics.register_fake
def _(running_mean: Tensor, running_var: Tensor, mean: Tensor, m2: Tensor, info: Tensor, momentum: Tensor) -> None:
    return None


# Every rank must make its collectives in the same order, and a compiled graph is free
# to reorder ops that share no data (a ResNet block's two branches): ranks whose graphs
# differ (uneven shards, one rank recompiled for a new shape) then pair one layer's
# collective with another's. The forward ops are chained by data (``after``); ordered
# effects (which inductor alone did not honour for the forward in torch 2.13) are kept
# for the backward ops, which no data chains.
for _op in (_processes_forward, _processes_backward, _processes_update_running_statistics):
    _op.register_effect(EffectType.ORDERED)
