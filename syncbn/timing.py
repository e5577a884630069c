"""How one implementation's forward and backward are timed, for ``syncbn.bench``.

``time_step`` times one training step; ``measure`` runs interleaved rounds of several
implementations in this process (each round starting with another, so drifts of the
machine hit all alike); ``measure_on_processes`` times SyncBN or unsynced BN on R gloo
processes, every rank on its shard, a round lasting as long as its slowest rank.
"""

from __future__ import annotations

import copy
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from syncbn.convert import convert_model
from syncbn.launch import run_on_processes
from syncbn.parallel import DataParallel
from syncbn.parallel.scatter_gather import shard_sizes
from syncbn.workload import Shape

# progress(done, total, description): called before each round of measurements and once at the end.
Progress = Callable[[int, int, str], None]
REFERENCE = "nn.BatchNorm"
SYNCBN = "SyncBN"
UNSYNCED = "unsynced BN"
SYNCBN_GLOO = "SyncBN (gloo)"
UNSYNCED_GLOO = "unsynced BN (gloo)"


@dataclass
class Case:
    impl: str
    replicas: int
    module: nn.Module


def make_cases(
    module: nn.Module, replicas: int, devices: list[torch.device], dtype: torch.dtype, channels_last: bool
) -> list[Case]:
    """The reference and its rivals, each with its own copy of ``module`` (left unchanged)."""
    module = copy.deepcopy(module).to(devices[0], dtype).train()
    if channels_last:
        # Conv weights take the input's layout, or every conv would convert it back and forth;
        # module.to(memory_format=...) would skip the 5-D weights of Conv3d.
        for param in module.parameters():
            if param.dim() in (4, 5):
                param.data = param.data.contiguous(memory_format=_channels_last_format(param.dim()))

    def parallel(m: nn.Module) -> nn.Module:
        # One replica is the module itself: DataParallel would only add its own call.
        return DataParallel(m, device_ids=devices, replicas=replicas) if replicas > 1 else m

    cases = [Case(REFERENCE, 1, copy.deepcopy(module))]
    if replicas > 1:
        cases.append(Case(SYNCBN, 1, convert_model(copy.deepcopy(module))))
    cases.append(Case(SYNCBN, replicas, parallel(convert_model(copy.deepcopy(module)))))
    cases.append(Case(UNSYNCED, replicas, parallel(copy.deepcopy(module))))
    return cases


@dataclass
class Rounds:
    """How many rounds one workload runs, and how to report them to ``progress``."""

    warmup: int
    repeats: int
    label: str
    done_before: int
    total: int
    progress: Progress | None

    def report(self, round_: int) -> None:
        if self.progress is None:
            return
        if round_ < self.warmup:
            stage = f"warmup {round_ + 1}/{self.warmup}"
        else:
            stage = f"repeat {round_ - self.warmup + 1}/{self.repeats}"
        self.progress(self.done_before + round_, self.total, f"{self.label}: {stage}")


def measure(
    cases: list[Case], x: Tensor, cotangent: Tensor, device: torch.device, rounds: Rounds
) -> list[tuple[float, float]]:
    """Median (forward ms, backward ms) of each case; a round runs every case once, interleaved."""
    timings: list[list[tuple[float, float]]] = [[] for _ in cases]
    for round_ in range(rounds.warmup + rounds.repeats):
        rounds.report(round_)
        # Each round starts with a different case: whichever runs first, or right after
        # the thread-spawning DataParallel cases, is not always the same one.
        for i in range(len(cases)):
            index = (round_ + i) % len(cases)
            measured = time_step(cases[index].module, x, cotangent, device)
            if round_ >= rounds.warmup:
                timings[index].append(measured)
    return [
        (statistics.median(fwd for fwd, _ in times), statistics.median(bwd for _, bwd in times)) for times in timings
    ]


def measure_on_processes(
    module: nn.Module, x: Tensor, cotangent: Tensor, replicas: int, rounds: Rounds, convert: bool
) -> tuple[float, float]:
    """Median (forward ms, backward ms) on R gloo processes, each timing its own shard.

    A round lasts as long as its slowest rank, so per round the maximum over ranks counts.
    """
    if rounds.progress is not None:
        what = SYNCBN_GLOO if convert else UNSYNCED_GLOO
        rounds.progress(rounds.done_before, rounds.total, f"{rounds.label}: {what} on {replicas} processes")
    candidate = convert_model(copy.deepcopy(module)) if convert else copy.deepcopy(module)
    per_rank = run_on_processes(
        _time_rank,
        replicas,
        backend="gloo",
        timeout=120.0,
        args=(candidate, x, cotangent, rounds.warmup, rounds.repeats),
    )
    per_round = [(max(f for f, _ in step), max(b for _, b in step)) for step in zip(*per_rank, strict=True)]
    return statistics.median(f for f, _ in per_round), statistics.median(b for _, b in per_round)


def _time_rank(
    rank: int, world: int, module: nn.Module, x: Tensor, cotangent: Tensor, warmup: int, repeats: int
) -> list[tuple[float, float]]:
    """One rank of ``_measure_on_processes``: its shard's (fwd ms, bwd ms) for each measured round."""
    import torch.distributed as dist

    rows = torch.split(torch.arange(x.shape[0]), shard_sizes(x.shape[0], world))[rank]
    shard, shard_cotangent = x[rows].contiguous(memory_format=_memory_format_of(x)), cotangent[rows]
    timings = []
    for round_ in range(warmup + repeats):
        dist.barrier()  # every rank starts the round together
        measured = time_step(module, shard, shard_cotangent, x.device)
        if round_ >= warmup:
            timings.append(measured)
    return timings


def time_step(module: nn.Module, x: Tensor, cotangent: Tensor, device: torch.device) -> tuple[float, float]:
    """Milliseconds of one forward (building the graph) and of the backward of its output.

    Example:
        >>> fwd_ms, bwd_ms = time_step(nn.BatchNorm1d(3), torch.randn(4, 3), torch.ones(4, 3), torch.device("cpu"))
    """
    module.zero_grad(set_to_none=True)
    leaf = x.detach().requires_grad_()  # a fresh leaf: no gradient accumulates into an old .grad
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection in the middle of a step is noise, not the step's cost
    try:
        _synchronize(device)
        start = time.perf_counter()
        out = module(leaf)
        _synchronize(device)
        middle = time.perf_counter()
        out.backward(cotangent)
        _synchronize(device)
        end = time.perf_counter()
    finally:
        if gc_was_enabled:
            gc.enable()
    return (middle - start) * 1e3, (end - middle) * 1e3


def start_torch(device: torch.device) -> None:
    """One tiny BatchNorm step, so that a process's one-off start-up costs (autograd, thread
    pools, lazy imports; see docs/design.md) never land on a measured step, even with no warm-up."""
    x = torch.randn(4, 2, device=device, requires_grad=True)
    out = torch.nn.functional.batch_norm(x, None, None, training=True)
    # With an explicit gradient, as every timed step passes one: the first such backward
    # imports more of torch than the first forward does.
    out.backward(torch.ones_like(out))


def cotangent_for(module: nn.Module, x: Tensor, generator: torch.Generator) -> Tensor:
    """A fixed random cotangent of the output's shape, dtype and layout (one forward to learn them)."""
    with torch.no_grad():
        out = copy.deepcopy(module)(x)  # a copy: the running statistics stay as they are
    cotangent = torch.randn(out.shape, generator=generator, dtype=torch.float32).to(out.device, out.dtype)
    return cotangent.contiguous(memory_format=_memory_format_of(out))


def random_input(shape: Shape, dtype: torch.dtype, device: torch.device, channels_last: bool, generator) -> Tensor:
    x = torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype)
    if channels_last and len(shape) in (4, 5):
        x = x.contiguous(memory_format=_channels_last_format(len(shape)))
    return x


def _channels_last_format(dim: int) -> torch.memory_format:
    return torch.channels_last if dim == 4 else torch.channels_last_3d


def _memory_format_of(t: Tensor) -> torch.memory_format:
    if t.dim() in (4, 5) and not t.is_contiguous():
        fmt = _channels_last_format(t.dim())
        if t.is_contiguous(memory_format=fmt):
            return fmt
    return torch.contiguous_format


def _synchronize(device: torch.device) -> None:
    # CUDA kernels run asynchronously: without this we would time the launches only.
    if device.type == "cuda":
        torch.cuda.synchronize()


def replica_devices(device: str) -> list[torch.device]:
    if device == "cuda":
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    # Explicit, so that a machine with CUDA still runs CPU replicas on the CPU.
    return [torch.device("cpu")]
