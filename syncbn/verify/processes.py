"""The processes way of ``verify_model``: SyncBN and unsynced BN each on R local ranks (gloo or nccl).

The one-device models run first, every step, in this process; then each candidate trains on
R processes (``syncbn.launch.run_on_processes``), every rank on its shard of each step's
batch, starting each step from the same state as the one-device models. The ranks' shards
are joined back into whole-batch results and compared. nccl ranks are started with
``spawn``: CUDA forbids forking a process that has initialized it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from syncbn.convert import convert_model, revert_model
from syncbn.launch import ProcessGroupFailure, run_on_processes
from syncbn.verify.comparisons import Comparer
from syncbn.verify.settings import Settings
from syncbn.verify.trainer import Expected, OneDevice, State, StepResult, Trainer, join_shards


def verify_on_processes(
    model: nn.Module,
    one_device: OneDevice,
    settings: Settings,
    comparers: dict[str, Comparer],
    generator: torch.Generator,
    progress: Callable[[int, int, str], None],
) -> None:
    """One-device models here, all steps; then SyncBN and unsynced BN each on R processes, all steps."""
    inputs: list[Tensor] = []
    states: list[State] = []
    expected: list[Expected] = []
    for step in range(settings.steps):
        states.append(one_device.state())
        one_device.load_state(states[-1])
        inputs.append(one_device.draw_input(generator))
        expected.append(one_device.step(inputs[-1], generator, step))
    progress(1, 3, f"{settings.steps} step(s): one device")
    cotangents = [result.truth.cotangents for result in expected]
    candidates = (
        ("synced", convert_model(copy.deepcopy(model)), "SyncBN"),
        ("unsynced", revert_model(copy.deepcopy(model)), "unsynced BN"),
    )
    for done, (key, candidate, label) in enumerate(candidates, start=2):
        try:
            ranks = run_on_processes(
                train_shards,
                settings.replicas,
                backend=settings.backend,
                timeout=settings.timeout,
                start_method=rank_start_method(settings.backend),
                args=(candidate, settings, inputs, cotangents, states),
            )
        except ProcessGroupFailure as error:
            comparers[key].error = str(error)
        else:
            for actual, wanted in zip(merge_ranks(ranks), expected, strict=True):
                comparers[key].compare(actual, wanted)
        progress(done, 3, f"{settings.steps} step(s): {label} on {settings.replicas} processes")


def rank_start_method(backend: str) -> str:
    """``spawn`` for nccl or once this process has initialized CUDA (a forked child cannot use it), else ``fork``.

    Example:
        >>> rank_start_method("nccl")
        'spawn'
    """
    return "spawn" if backend == "nccl" or torch.cuda.is_initialized() else "fork"


def train_shards(
    rank: int,
    world: int,
    model: nn.Module,
    settings: Settings,
    inputs: list[Tensor],
    cotangents: list[dict[str, Tensor]],
    states: list[State],
) -> list[dict[str, Any]]:
    """One rank: train on its shard of every step's batch; gradients summed over the ranks."""
    import torch.distributed as dist

    def sum_over_ranks(parameters: list[Tensor]) -> list[float]:
        # Summed in float64: rounding the sum of the ranks' gradients is DDP's business, not SyncBN's.
        scales = []
        for p in parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            total = p.grad.double()
            scale = total.abs().max() if total.numel() else torch.zeros((), dtype=torch.float64, device=total.device)
            dist.all_reduce(total)
            dist.all_reduce(scale)  # sum of the partials' magnitudes: what rounding them can cost
            p.grad.copy_(total)
            scales.append(scale.item())
        return scales

    device = settings.device_pool[rank % len(settings.device_pool)]
    trainer = Trainer(model, settings, settings.dtype, device=device, reduce_grads=sum_over_ranks)
    steps = []
    for x, cotangent, state in zip(inputs, cotangents, states, strict=True):
        trainer.load_state(state)
        shard = torch.tensor_split(torch.arange(x.shape[0]), world)[rank]
        result = trainer.step(x[shard], {name: value[shard] for name, value in cotangent.items()})
        steps.append(
            {
                "outputs": {k: v.cpu() for k, v in result.outputs.items()},
                "input_grad": result.input_grad.cpu() if result.input_grad is not None else None,
                "grads": {k: v.cpu() if v is not None else None for k, v in result.grads.items()},
                "grad_scales": result.grad_scales,
                "buffers": {k: v.cpu() for k, v in result.buffers.items()},
                "layers": [[name, call, value.cpu()] for (name, call), value in result.layers.items()],
                "layer_order": [list(key) for key in result.layer_order],
            }
        )
    return steps


def merge_ranks(ranks: list[list[dict[str, Any]]]) -> list[StepResult]:
    """Join the ranks' shards back into whole-batch step results (rank 0 for what they share)."""
    merged = []
    for step in zip(*ranks, strict=True):
        first = step[0]
        layers = {}
        for name, call, _ in first["layers"]:
            parts = [value for rank in step for n, c, value in rank["layers"] if (n, c) == (name, call)]
            layers[(name, call)] = join_shards(parts)
        merged.append(
            StepResult(
                outputs={name: join_shards([rank["outputs"][name] for rank in step]) for name in first["outputs"]},
                cotangents={},
                input_grad=join_shards([rank["input_grad"] for rank in step]),
                grads=first["grads"],  # summed over the ranks already: every rank holds the same
                buffers=first["buffers"],
                layers=layers,
                layer_order=[tuple(key) for key in first["layer_order"]],
                grad_scales=first["grad_scales"],
            )
        )
    return merged
