"""Train a model with SyncBN across processes (and machines) with torchrun, and check it.

Every rank builds the same model and the same global batch (same seed), trains on its
shard with DistributedDataParallel for a few steps, and rank 0 then replays the same
steps on one process with the whole batch and plain BatchNorm, and prints how far apart
the two are.

One machine, 2 processes on the CPU:

    torchrun --nproc-per-node 2 examples/torchrun_train.py

Two machines (run on each, with node-rank 0 and 1, HOST = the first machine):

    torchrun --nnodes 2 --nproc-per-node 4 --node-rank 0 --master-addr HOST --master-port 29500 \\
        examples/torchrun_train.py --backend nccl
"""

from __future__ import annotations

import argparse
import copy
import datetime

import torch
import torch.distributed as dist
from torch import nn

import syncbn
from sample_models.resnet import resnet_tiny


def train(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], scale: float) -> list[float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x), y, reduction="sum") * scale
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch, split over all ranks")
    args = parser.parse_args()

    dist.init_process_group(args.backend, timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if args.backend == "nccl" else torch.device("cpu")

    torch.manual_seed(0)
    model = resnet_tiny().double()
    reference = copy.deepcopy(model)
    batches = [
        (torch.randn(args.batch_size, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (args.batch_size,)))
        for _ in range(args.steps)
    ]
    shard = torch.tensor_split(torch.arange(args.batch_size), world)[rank]
    local_batches = [(x[shard].to(device), y[shard].to(device)) for x, y in batches]

    unsynced = copy.deepcopy(model)  # plain BatchNorm under DDP: per-rank statistics
    ddp = nn.parallel.DistributedDataParallel(syncbn.convert_model(model).to(device))
    # DDP averages gradients over ranks, so the reference's loss is scaled by 1 / world.
    train(ddp, local_batches, scale=1.0)
    train(nn.parallel.DistributedDataParallel(unsynced.to(device)), local_batches, scale=1.0)
    print(f"rank {rank}/{world}: {len(shard)} samples per step, trained {args.steps} steps", flush=True)
    dist.barrier()

    if rank == 0:
        train(reference, batches, scale=1.0 / world)
        for name, trained in (("SyncBN", model), ("plain BN", unsynced)):
            params = zip(trained.parameters(), reference.parameters(), strict=True)
            buffers = zip(trained.buffers(), reference.buffers(), strict=True)
            error = max((p.detach().cpu() - q.detach()).abs().max().item() for p, q in params)
            stats = max((b.cpu() - c).abs().max().item() for b, c in buffers)
            print(
                f"{name:>8} vs one device on the whole batch: max |param diff| {error:.2e}, running stats {stats:.2e}"
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
