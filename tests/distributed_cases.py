"""Cases for the processes way, run by each rank of a gloo job (see test_distributed.py).

Run as ``python tests/distributed_cases.py OUT_DIR [CASE ...]`` with the torchrun
environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Each case builds the same
model and full batch on every rank (same seed), runs this rank's shard, and saves what
it saw to ``OUT_DIR/rank{RANK}.pt``; the test recomputes the reference on one process.
"""

from __future__ import annotations

import copy
import datetime
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

CASES: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]] = {}


def case(function: Callable[[], tuple[nn.Module, torch.Tensor]]) -> Callable[[], tuple[nn.Module, torch.Tensor]]:
    CASES[function.__name__] = function
    return function


def seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)


@case
def bn1d_2d() -> tuple[nn.Module, torch.Tensor]:
    seeded()
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)).double(), torch.randn(8, 5, dtype=torch.float64)


@case
def bn1d_3d() -> tuple[nn.Module, torch.Tensor]:
    seeded()
    return nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4)).double(), torch.randn(8, 3, 7, dtype=torch.float64)


@case
def bn2d() -> tuple[nn.Module, torch.Tensor]:
    seeded()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    return model.double(), torch.randn(8, 3, 6, 6, dtype=torch.float64)


@case
def bn3d() -> tuple[nn.Module, torch.Tensor]:
    seeded()
    return nn.Sequential(nn.Conv3d(2, 3, 3), nn.BatchNorm3d(3)).double(), torch.randn(
        8, 2, 4, 5, 5, dtype=torch.float64
    )


@case
def uneven() -> tuple[nn.Module, torch.Tensor]:
    seeded()
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).double(), torch.randn(7, 3, 5, 5, dtype=torch.float64)


@case
def empty_shards() -> tuple[nn.Module, torch.Tensor]:
    seeded()  # 3 samples over 4 ranks: one rank has none and must still join every collective
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).double(), torch.randn(3, 3, 5, 5, dtype=torch.float64)


@case
def variants() -> tuple[nn.Module, torch.Tensor]:
    seeded()
    model = nn.Sequential(
        nn.BatchNorm2d(3, momentum=None),
        nn.BatchNorm2d(3, affine=False),
        nn.BatchNorm2d(3, bias=False),
        nn.BatchNorm2d(3, track_running_stats=False),
    )
    return model.double(), torch.randn(8, 3, 4, 4, dtype=torch.float64)


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.bn(x)))


@case
def called_twice() -> tuple[nn.Module, torch.Tensor]:
    seeded()
    return CalledTwice().double(), torch.randn(8, 3, 4, 4, dtype=torch.float64)


class Checkpointed(nn.Module):
    """conv -> BN inside torch.utils.checkpoint: backward recomputes the BN, which reduces again."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(lambda t: self.bn(self.conv(t)).relu(), x, use_reentrant=False)


@case
def checkpointed() -> tuple[nn.Module, torch.Tensor]:
    # The one-process reference checkpoints too: its running statistics are updated twice, as here.
    seeded()
    return Checkpointed().double(), torch.randn(8, 3, 6, 6, dtype=torch.float64)


@case
def offset_float32() -> tuple[nn.Module, torch.Tensor]:
    seeded()
    return nn.Sequential(nn.BatchNorm2d(4)), 1e4 + torch.randn(16, 4, 6, 6)


@case
def offset_large() -> tuple[nn.Module, torch.Tensor]:
    seeded()  # every rank's shard above kernels.SMALL: the fused passes, not the float64 ones
    return nn.Sequential(nn.BatchNorm2d(8)), 1e4 + torch.randn(64, 8, 20, 20)


@case
def plain_large() -> tuple[nn.Module, torch.Tensor]:
    seeded()
    return nn.Sequential(nn.BatchNorm2d(8)), 1.0 + 3 * torch.randn(64, 8, 20, 20)


@case
def plain_float32() -> tuple[nn.Module, torch.Tensor]:
    seeded()
    return nn.Sequential(nn.BatchNorm2d(4)), 1.0 + 3 * torch.randn(16, 4, 6, 6)


@case
def bfloat16() -> tuple[nn.Module, torch.Tensor]:
    seeded()
    return nn.Sequential(nn.BatchNorm2d(4)), torch.randn(8, 4, 5, 5).bfloat16()


@case
def channels_last() -> tuple[nn.Module, torch.Tensor]:
    seeded()
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).double()
    return model, torch.randn(8, 3, 5, 5, dtype=torch.float64).to(memory_format=torch.channels_last)


@case
def training() -> tuple[nn.Module, torch.Tensor]:
    from sample_models.resnet import resnet_tiny

    seeded()
    return resnet_tiny().double(), torch.randn(8, 3, 16, 16, dtype=torch.float64)


@case
def efficientnet() -> tuple[nn.Module, torch.Tensor]:
    """timm's habits: BatchNormAct2d with an in-place SiLU, SE gating with ``mul_``."""
    from sample_models import zoo

    seeded()
    return zoo.efficientnet().double(), torch.randn(8, *zoo.efficientnet.input_shape, dtype=torch.float64)


@case
def mobilenet_v3() -> tuple[nn.Module, torch.Tensor]:
    """torchvision's habits: Conv-BN-activation blocks with in-place Hardswish, SE."""
    from sample_models import zoo

    seeded()
    return zoo.mobilenet_v3().double(), torch.randn(8, *zoo.mobilenet_v3.input_shape, dtype=torch.float64)


class SiluBlock(nn.Module):
    """conv -> BN -> ``F.silu(..., inplace=True)``, returned: the in-place op mutates the BN output."""

    def __init__(self, channels_in: int, channels_out: int, **bn: object) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels_in, channels_out, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels_out, **bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.silu(self.bn(self.conv(x)), inplace=True)


@case
def silu_returned() -> tuple[nn.Module, torch.Tensor]:
    seeded()
    return nn.Sequential(SiluBlock(3, 4), SiluBlock(4, 4)).double(), torch.randn(8, 3, 6, 6, dtype=torch.float64)


@case
def conv_bn_activation() -> tuple[nn.Module, torch.Tensor]:
    """torchvision's Conv2dNormActivation: Sequential(conv, bn, SiLU/Hardswish(inplace=True)), then a conv."""
    seeded()
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.SiLU(inplace=True)),
        nn.Sequential(nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5), nn.Hardswish(inplace=True)),
        nn.Conv2d(5, 3, 1),
    )
    return model.double(), torch.randn(8, 3, 6, 6, dtype=torch.float64)


@case
def silu_cumulative() -> tuple[nn.Module, torch.Tensor]:
    """momentum=None (a cumulative average of the running statistics)."""
    seeded()
    return SiluBlock(3, 4, momentum=None).double(), torch.randn(8, 3, 6, 6, dtype=torch.float64)


@case
def silu_no_running_stats() -> tuple[nn.Module, torch.Tensor]:
    seeded()
    return SiluBlock(3, 4, track_running_stats=False).double(), torch.randn(8, 3, 6, 6, dtype=torch.float64)


class FusedThenSilu(nn.Module):
    """conv -> timm's BatchNormAct2d (its own in-place Hardswish) -> ``F.silu(..., inplace=True)``."""

    def __init__(self) -> None:
        super().__init__()
        from sample_models.zoo.layers import BatchNormAct2d

        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = BatchNormAct2d(4, act_layer=nn.Hardswish)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.silu(self.bn(self.conv(x)), inplace=True)


@case
def subclass_then_silu() -> tuple[nn.Module, torch.Tensor]:
    """An in-place op right after a converted BN subclass: its forward must trace into the graph too."""
    seeded()
    return nn.Sequential(FusedThenSilu(), nn.Conv2d(4, 3, 1)).double(), torch.randn(8, 3, 6, 6, dtype=torch.float64)


class Smooth(nn.Module):
    """Two BN layers (one without affine parameters) with tanh between: second derivatives everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 1)
        self.bn2 = nn.BatchNorm2d(5, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(torch.tanh(self.bn1(self.conv1(x))))).tanh()


@case
def smooth() -> tuple[nn.Module, torch.Tensor]:
    seeded()
    return Smooth().double(), torch.randn(8, 3, 6, 6, dtype=torch.float64)


# The gradient penalty's weight: large enough that its second-order part dominates.
PENALTY_WEIGHT = 2.0


def penalty_step(net: nn.Module, x: torch.Tensor, cotangent: torch.Tensor) -> dict[str, object]:
    """loss = <net(x), cotangent> + w * |d loss / dx|^2: first- and second-order gradients.

    On R ranks each one's loss is its shard's part; the full-batch loss is their sum, so
    parameter gradients are summed over ranks by the caller (autograd.grad, not DDP).
    """
    leaf = x.clone().requires_grad_()
    out = net(leaf)
    loss = (out * cotangent).sum()
    params = [p for p in net.parameters() if p.requires_grad]
    (first,) = torch.autograd.grad(loss, leaf, create_graph=True)
    first_params = torch.autograd.grad(loss, params, retain_graph=True)
    total = loss + PENALTY_WEIGHT * first.square().sum()
    second, *second_params = torch.autograd.grad(total, [leaf, *params])
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    return {
        "output": [out.detach()],
        "first_grad": [first.detach()],
        "input_grad": [second],
        "first_param_grads": dict(zip(names, first_params, strict=True)),
        "grads": dict(zip(names, second_params, strict=True)),
    }


def run_penalty(name: str, rank: int, world: int) -> dict[str, object]:
    """A gradient penalty on this rank's shard; parameter gradients summed over ranks.

    ``penalty``: SyncBN; the negative controls: ``penalty_unconverted`` (plain BN per
    rank) and ``penalty_detached`` (SyncBN whose global sums do not carry gradients, the
    processes way before it was made differentiable twice).
    """
    import syncbn
    import syncbn._functions as functions

    model, x = CASES["smooth"]()
    cotangent = cotangent_for(copy.deepcopy(model)(x))
    shard = torch.tensor_split(torch.arange(x.shape[0]), world)[rank]
    net = model if name == "penalty_unconverted" else syncbn.convert_model(model)
    exact = functions._GlobalSumFunction.apply
    if name == "penalty_detached":
        functions._GlobalSumFunction.apply = lambda local, *rest: exact(local, *rest).detach()
    try:
        result = penalty_step(net, x[shard], cotangent[shard])
    finally:
        functions._GlobalSumFunction.apply = exact
    for key in ("first_param_grads", "grads"):
        for grad in result[key].values():
            dist.all_reduce(grad)  # the full-batch loss is the sum of the ranks' losses
    return {"shard": shard, **result}


class TwoLayers(nn.Module):
    """Two SyncBN layers whose calls a rank can get wrong, on purpose (``fault``)."""

    def __init__(self, first: int = 4, second: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, first, 1)
        self.bn_a = nn.BatchNorm2d(first)
        self.expand = nn.Conv2d(first, second, 1)
        self.bn_b = nn.BatchNorm2d(second)
        self.fault = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if self.fault == "swap" and h.size(1) == self.expand.out_channels:
            return self.bn_a(self.bn_b(h))
        if self.fault == "skip":
            return self.bn_b(self.expand(h))
        h = self.bn_b(self.expand(self.bn_a(h)))
        return self.bn_b(h) if self.fault == "extra_call" else h

    def branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv(x)
        return self.bn_a(h), self.bn_b(self.expand(h))


MISMATCHES = {
    # name: (channels of bn_a and bn_b, the fault of the faulty rank)
    "mismatch_skip": ((4, 6), "skip"),
    "mismatch_order": ((5, 5), "swap"),
    "mismatch_extra_call": ((4, 6), "extra_call"),
    "mismatch_wide": ((4, 2100), "skip"),  # bn_b's statistics need a second collective
    "mismatch_backward": ((4, 6), "backward"),
    "mismatch_unchecked": ((5, 5), "swap"),  # negative control: identical tags, no check can tell
    # torch.compile(model): the collectives run in the custom ops of syncbn.processes_op
    "compiled_mismatch_skip": ((4, 6), "skip"),
    "compiled_mismatch_extra_call": ((4, 6), "extra_call"),
}


def run_mismatch(name: str, rank: int, world: int) -> dict[str, object]:
    """The last rank makes a fault; every rank records the SyncBNError it got, then all take a healthy step."""
    import syncbn
    import syncbn._functions as functions
    from syncbn.comm.distributed import CollectiveTag

    (first, second), fault = MISMATCHES[name]
    seeded()
    model = syncbn.convert_model(TwoLayers(first, second).double())
    x = torch.randn(4 * world, 3, 5, 5, dtype=torch.float64)
    shard = x[torch.tensor_split(torch.arange(x.shape[0]), world)[rank]]
    exact_tag = functions.layer_tag
    if name == "mismatch_unchecked":  # every layer looks the same: the checks cannot see the swap
        functions.layer_tag = lambda layer, group: CollectiveTag("same", 1, 0)
    try:
        return mismatched_step(model, shard, rank == world - 1, fault, compiled=name.startswith("compiled_"))
    finally:
        functions.layer_tag = exact_tag


def mismatched_step(
    model: nn.Module, shard: torch.Tensor, faulty: bool, fault: str, compiled: bool = False
) -> dict[str, object]:
    import syncbn

    net = torch.compile(model) if compiled else model
    model.fault = fault if faulty else ""
    error, output = None, None
    started = time.monotonic()
    try:
        if fault == "backward":
            a, b = model.branches(shard)
            # The faulty rank's loss ignores bn_a: its backward skips bn_a's collective,
            # and its next step's forward meets the other ranks' backward of bn_a.
            (b.sum() if faulty else a.sum() + b.sum()).backward()
            sum(out.sum() for out in model.branches(shard)).backward()
        else:
            out = net(shard)
            out.sum().backward()
            output = out.detach()
    except syncbn.SyncBNError as raised:
        error = f"{type(raised).__name__}: {raised}"
    elapsed = time.monotonic() - started
    model.fault = ""
    healthy = net(shard)  # ranks that raised together are still in step
    healthy.sum().backward()
    return {"error": error, "seconds": elapsed, "healthy": healthy.detach(), "output": output}


def cotangent_for(output: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(output.shape, generator=generator, dtype=torch.float64).to(output.dtype)


def run_case(name: str, rank: int, world: int, steps: int = 1, compiled: bool = False) -> dict[str, object]:
    """This rank's shard through DDP(convert_model(model)): output, input grad, DDP grads, buffers.

    ``compiled``: DDP around ``torch.compile(convert_model(model))``.
    """
    import syncbn

    model, x = CASES[name]()
    reference_output = copy.deepcopy(model)(x)  # only for the cotangent's shape
    cotangent = cotangent_for(reference_output)
    shard = torch.tensor_split(torch.arange(x.shape[0]), world)[rank]
    net = syncbn.convert_model(model)
    module = torch.compile(net) if compiled else net
    ddp = nn.parallel.DistributedDataParallel(module) if any(p.requires_grad for p in net.parameters()) else net
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1) if list(net.parameters()) else None
    if os.environ.get("SYNCBN_TEST_RAISE_ON_RANK") == str(rank):
        raise RuntimeError(f"rank {rank} raised on purpose before its first SyncBN layer")
    if os.environ.get("SYNCBN_TEST_STALL_ON_RANK") == str(rank):
        time.sleep(float(os.environ.get("SYNCBN_TEST_STALL_SECONDS", 15)))
    outputs, input_grads, step_grads = [], [], []
    for _ in range(steps):
        local_x = x[shard].clone().requires_grad_()
        out = ddp(local_x)
        out.backward(cotangent[shard])
        outputs.append(out.detach())
        input_grads.append(local_x.grad)
        step_grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
        if optimizer is not None and steps > 1:
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
    return {
        "shard": shard,
        "output": outputs,
        "input_grad": input_grads,
        "channels_last": outputs[-1].is_contiguous(memory_format=torch.channels_last) and outputs[-1].dim() == 4,
        "grads": {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None},
        "step_grads": step_grads,
        "params": {n: p.detach().clone() for n, p in net.named_parameters()},
        "buffers": {n: b.clone() for n, b in net.named_buffers()},
    }


# Batch sizes whose shards differ between ranks and from step to step: each rank's
# torch.compile recompiles (static, then dynamic shapes) at its own step.
UNEVEN_BATCHES = (8, 7, 5, 3, 8)


def uneven_batches() -> tuple[nn.Module, list[torch.Tensor], list[torch.Tensor]]:
    """The zoo's ResNet (two branches per downsampling block) and UNEVEN_BATCHES inputs and cotangents."""
    from sample_models import zoo

    seeded()
    model = zoo.resnet_basic().double()
    inputs = [torch.randn(n, *zoo.resnet_basic.input_shape, dtype=torch.float64) for n in UNEVEN_BATCHES]
    cotangents = [torch.randn(n, 10, dtype=torch.float64) for n in UNEVEN_BATCHES]
    return model, inputs, cotangents


def run_compiled_uneven(rank: int, world: int) -> dict[str, object]:
    """DDP(torch.compile(convert_model(model))) over UNEVEN_BATCHES: outputs per step and the final state."""
    import syncbn

    model, inputs, cotangents = uneven_batches()
    net = syncbn.convert_model(model)
    ddp = nn.parallel.DistributedDataParallel(torch.compile(net))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    outputs = []
    for x, cotangent in zip(inputs, cotangents, strict=True):
        shard = torch.tensor_split(torch.arange(x.shape[0]), world)[rank]
        out = ddp(x[shard])
        out.backward(cotangent[shard])
        outputs.append(out.detach())
        optimizer.step()
        optimizer.zero_grad()
    return {"output": outputs, "state": {k: v.clone() for k, v in net.state_dict().items()}}


def run_subgroups(rank: int, world: int) -> dict[str, object]:
    """Ranks {0, 1} and {2, 3} synchronize only within their pair (process_group=)."""
    import syncbn

    pairs = [list(range(start, min(start + 2, world))) for start in range(0, world, 2)]
    groups = [dist.new_group(pair) for pair in pairs]  # every rank creates every group
    model, x = CASES["bn2d"]()
    cotangent = cotangent_for(copy.deepcopy(model)(x))
    shard = torch.tensor_split(torch.arange(x.shape[0]), world)[rank]
    net = syncbn.convert_model(model, process_group=groups[rank // 2])
    local_x = x[shard].clone().requires_grad_()
    out = net(local_x)
    out.backward(cotangent[shard])
    return {"shard": shard, "output": [out.detach()], "input_grad": [local_x.grad], "pairs": pairs}


def run_call_indices(rank: int, world: int) -> dict[str, object]:
    """What the call index counts: forward collectives in training mode, recomputations included."""
    import syncbn
    from syncbn.comm.distributed import layer_tag

    model, x = CASES["checkpointed"]()
    net = syncbn.convert_model(model)
    shard = x[torch.tensor_split(torch.arange(x.shape[0]), world)[rank]]
    group = dist.group.WORLD
    seen = []
    with torch.no_grad():
        net(shard)  # training mode without grad: a collective, counted
    seen.append(layer_tag(net.bn, group).call)
    net.eval()
    net(shard)  # running statistics: no collective, not counted
    seen.append(layer_tag(net.bn, group).call)
    net.train()
    net(shard.clone().requires_grad_()).sum().backward()  # forward, then its recomputation
    seen.append(layer_tag(net.bn, group).call)
    return {"calls": seen, "tag": tuple(layer_tag(net.bn, group))}


HYBRID = {
    # name: (case, replicas per process, the way local replicas meet, across processes)
    "hybrid_whole": ("bn2d", 2, "whole-batch", True),
    "hybrid_statistics": ("bn2d", 2, "statistics", True),
    "hybrid_uneven": ("uneven", 3, "whole-batch", True),
    "hybrid_uneven_statistics": ("uneven", 3, "statistics", True),
    "hybrid_local_only": ("bn2d", 2, "whole-batch", False),
    "hybrid_penalty": ("smooth", 2, "whole-batch", True),
    "hybrid_penalty_statistics": ("smooth", 2, "statistics", True),
}


def run_hybrid(name: str, rank: int, world: int) -> dict[str, object]:
    """syncbn.DataParallel with virtual replicas inside every process of the job.

    The full-batch loss is the sum of the ranks' losses, so parameter gradients are
    summed over ranks here (all_reduce), not averaged as DDP would.
    """
    import syncbn
    from syncbn.comm.rendezvous import Rendezvous
    from syncbn.parallel import data_parallel, parallel_apply

    case_name, replicas, way, across = HYBRID[name]
    if way == "statistics":  # what replicas on separate devices do, forced on the CPU
        data_parallel.Rendezvous = lambda size, timeout, *, one_device, **kw: Rendezvous(size, timeout, **kw)
        parallel_apply.runs_in_threads = lambda devices: True
    model, x = CASES[case_name]()
    cotangent = cotangent_for(copy.deepcopy(model)(x))
    shard = torch.tensor_split(torch.arange(x.shape[0]), world)[rank]
    net = syncbn.convert_model(model)
    parallel = syncbn.DataParallel(net, replicas=replicas, across_processes=across)
    if "penalty" in name:
        result = penalty_step(parallel, x[shard], cotangent[shard])
        for key in ("first_param_grads", "grads"):
            result[key] = {n.removeprefix("module."): grad for n, grad in result[key].items()}
            for grad in result[key].values():
                dist.all_reduce(grad)
        return {"shard": shard, **result}
    local_x = x[shard].clone().requires_grad_()
    out = parallel(local_x)
    out.backward(cotangent[shard])
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    for grad in grads.values():
        dist.all_reduce(grad)
    return {
        "shard": shard,
        "output": [out.detach()],
        "input_grad": [local_x.grad],
        "grads": grads,
        "buffers": {n: b.clone() for n, b in net.named_buffers()},
    }


def run_named(name: str, rank: int, world: int) -> dict[str, object]:
    if name == "subgroups":
        return run_subgroups(rank, world)
    if name == "call_indices":
        return run_call_indices(rank, world)
    if name.startswith("penalty"):
        return run_penalty(name, rank, world)
    if name.removeprefix("compiled_").startswith("mismatch"):
        return run_mismatch(name, rank, world)
    if name.startswith("hybrid"):
        return run_hybrid(name, rank, world)
    if name == "compiled_uneven":
        return run_compiled_uneven(rank, world)
    if name.startswith("compiled_"):
        return run_case(name.removeprefix("compiled_"), rank, world, 3, compiled=True)
    return run_case(name, rank, world, 3 if name == "training" else 1)


def main() -> None:
    out_dir, names = sys.argv[1], sys.argv[2:]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(
        "gloo", timeout=datetime.timedelta(seconds=float(os.environ.get("SYNCBN_TEST_TIMEOUT", 60)))
    )
    try:
        results = {name: run_named(name, rank, world) for name in names}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
