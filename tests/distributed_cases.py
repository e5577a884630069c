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


def cotangent_for(output: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(output.shape, generator=generator, dtype=torch.float64).to(output.dtype)


def run_case(name: str, rank: int, world: int, steps: int = 1) -> dict[str, object]:
    """This rank's shard through DDP(convert_model(model)): output, input grad, DDP grads, buffers."""
    import syncbn

    model, x = CASES[name]()
    reference_output = copy.deepcopy(model)(x)  # only for the cotangent's shape
    cotangent = cotangent_for(reference_output)
    shard = torch.tensor_split(torch.arange(x.shape[0]), world)[rank]
    net = syncbn.convert_model(model)
    ddp = nn.parallel.DistributedDataParallel(net) if any(p.requires_grad for p in net.parameters()) else net
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1) if list(net.parameters()) else None
    if os.environ.get("SYNCBN_TEST_RAISE_ON_RANK") == str(rank):
        raise RuntimeError(f"rank {rank} raised on purpose before its first SyncBN layer")
    if os.environ.get("SYNCBN_TEST_STALL_ON_RANK") == str(rank):
        time.sleep(float(os.environ.get("SYNCBN_TEST_STALL_SECONDS", 15)))
    outputs, input_grads = [], []
    for _ in range(steps):
        local_x = x[shard].clone().requires_grad_()
        out = ddp(local_x)
        out.backward(cotangent[shard])
        outputs.append(out.detach())
        input_grads.append(local_x.grad)
        if optimizer is not None and steps > 1:
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
    return {
        "shard": shard,
        "output": outputs,
        "input_grad": input_grads,
        "channels_last": outputs[-1].is_contiguous(memory_format=torch.channels_last) and outputs[-1].dim() == 4,
        "grads": {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None},
        "params": {n: p.detach().clone() for n, p in net.named_parameters()},
        "buffers": {n: b.clone() for n, b in net.named_buffers()},
    }


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


def main() -> None:
    out_dir, names = sys.argv[1], sys.argv[2:]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(
        "gloo", timeout=datetime.timedelta(seconds=float(os.environ.get("SYNCBN_TEST_TIMEOUT", 60)))
    )
    try:
        results = {
            name: run_subgroups(rank, world)
            if name == "subgroups"
            else run_case(name, rank, world, 3 * (name == "training") or 1)
            for name in names
        }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
