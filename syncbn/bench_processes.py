"""What synchronizing costs on the processes way, beside what its collectives cost.

For one BatchNorm layer on one input shape split over R local gloo processes (one
intra-op thread each), every rank times, round after round and in a rotating order:

- ``nn.BatchNorm`` on its shard (no synchronization): the local work alone;
- SyncBN on its shard: the local work plus its two collectives;
- the bare collectives: the ``all_gather`` calls one SyncBN layer call makes (its
  forward frame and its backward frame, the same sizes, waited for the same way),
  without any compute;
- optionally other implementations (``extra``), e.g. a naive SyncBN to compare with.

Every measurement starts on all ranks at the same instant: rank 0 names a moment a few
milliseconds ahead on the machine's monotonic clock, which every local process shares,
and each rank waits for it (a barrier alone releases ranks up to 2 ms apart on a busy
2-core machine, and the early rank's wait would count as SyncBN's). A round lasts as
long as its slowest rank, so each round takes the maximum over ranks; reported figures
are medians over rounds. The **sync cost** of a layer call is SyncBN's
forward plus backward minus plain BN's on the same shard, and its **ratio** is that
cost over the bare collectives' latency, measured in the same run: 1 means SyncBN costs
exactly its communication; above 1, local work or waiting the collectives do not explain.
"""

from __future__ import annotations

import copy
import gc
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from syncbn.comm.distributed import frame_sizes, wait_for
from syncbn.convert import convert_model
from syncbn.launch import run_on_processes

Shape = tuple[int, ...]
# The ResNet shapes of issue 17: an early and a late stage at batch 32.
RESNET_SHAPES: tuple[Shape, ...] = ((32, 64, 56, 56), (32, 256, 14, 14))
REFERENCE = "nn.BatchNorm"
SYNCBN = "SyncBN"
COLLECTIVES = "collectives"
_BATCH_NORM = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


@dataclass
class SyncCostRow:
    """One shape on R processes: SyncBN's sync cost per layer call beside its collectives' latency.

    Attributes:
        shape: the full-batch input shape (``"32x64x56x56"``), split over the ranks.
        replicas: the number of gloo processes.
        dtype: the input's dtype name.
        bn_ms, syncbn_ms: median forward + backward of one layer call, plain BN and SyncBN.
        collectives_ms: median latency of the bare collectives of one SyncBN layer call.
        sync_cost_ms: ``syncbn_ms - bn_ms`` (median of the per-round differences).
        ratio: ``sync_cost_ms / collectives_ms`` (median of the per-round ratios).
        ratio_q1, ratio_q3: the quartiles of the per-round ratios: the spread.
        fwd_ms, bwd_ms: medians of forward and backward alone, per implementation.
        extra_ms: median forward + backward of each ``extra`` implementation.
        vs_extra: SyncBN's forward + backward over each extra one's (median of the per-round ratios).
        rounds: how many measured rounds the medians are over.
    """

    shape: str
    replicas: int
    dtype: str
    bn_ms: float
    syncbn_ms: float
    collectives_ms: float
    sync_cost_ms: float
    ratio: float
    ratio_q1: float
    ratio_q3: float
    fwd_ms: dict[str, float] = field(default_factory=dict)
    bwd_ms: dict[str, float] = field(default_factory=dict)
    extra_ms: dict[str, float] = field(default_factory=dict)
    vs_extra: dict[str, float] = field(default_factory=dict)
    rounds: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The row as plain JSON values."""
        return asdict(self)


def measure_sync_cost(
    shapes: Sequence[Shape] = RESNET_SHAPES,
    replicas: int = 2,
    *,
    repeats: int = 20,
    warmup: int = 3,
    dtype: torch.dtype = torch.float32,
    extra: Mapping[str, Callable[[nn.Module], nn.Module]] | None = None,
    timeout: float = 600.0,
) -> list[SyncCostRow]:
    """Time SyncBN, plain BN and SyncBN's bare collectives on ``replicas`` gloo processes, interleaved.

    Args:
        shapes: full-batch input shapes (2-D to 5-D), each split over the ranks along the batch.
        replicas: the number of local gloo processes (ranks), one intra-op thread each.
        repeats: measured rounds per shape; each round runs every implementation once.
        warmup: rounds run first and not measured.
        dtype: the input's dtype (float32, bfloat16 or float64).
        extra: more implementations to time beside SyncBN: name -> a function that makes
            one from the plain ``nn.BatchNorm`` layer (e.g. a naive synchronized BN).
        timeout: the process group's timeout in seconds.

    Returns:
        One row per shape.

    Example:
        >>> rows = measure_sync_cost([(8, 4, 5, 5)], 2, repeats=2, warmup=1)
        >>> rows[0].shape, rows[0].replicas, rows[0].rounds
        ('8x4x5x5', 2, 2)
    """
    if replicas < 2:
        raise ValueError(f"replicas must be at least 2 to synchronize anything (got {replicas})")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be at least 1 and warmup at least 0 (got {repeats} and {warmup})")
    rows = []
    for shape in shapes:
        if len(shape) not in _BATCH_NORM or shape[0] < replicas:
            raise ValueError(f"shape {shape} must have 2 to 5 dimensions and at least {replicas} samples")
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=generator).to(dtype)
        cotangent = torch.randn(shape, generator=generator).to(dtype)
        bn = _BATCH_NORM[len(shape)](shape[1])
        impls = {REFERENCE: bn, SYNCBN: convert_model(copy.deepcopy(bn))}
        for name, make in (extra or {}).items():
            impls[name] = make(copy.deepcopy(bn))
        per_rank = run_on_processes(
            _time_rounds,
            replicas,
            timeout=timeout,
            args=(impls, x, cotangent, frame_sizes(2 * shape[1]), warmup, repeats),
        )
        rows.append(_row(shape, replicas, dtype, per_rank, list(impls)))
    return rows


def _row(shape: Shape, replicas: int, dtype: torch.dtype, per_rank: list[Any], names: list[str]) -> SyncCostRow:
    # Each round lasts as long as its slowest rank.
    rounds = [
        {name: tuple(max(rank[i][name][k] for rank in per_rank) for k in range(2)) for name in [*names, COLLECTIVES]}
        for i in range(len(per_rank[0]))
    ]
    total = {name: [sum(r[name]) for r in rounds] for name in [*names, COLLECTIVES]}
    costs = [s - b for s, b in zip(total[SYNCBN], total[REFERENCE], strict=True)]
    ratios = [c / max(t, 1e-9) for c, t in zip(costs, total[COLLECTIVES], strict=True)]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    extras = [name for name in names if name not in (REFERENCE, SYNCBN)]
    return SyncCostRow(
        shape="x".join(map(str, shape)),
        replicas=replicas,
        dtype=str(dtype).removeprefix("torch."),
        bn_ms=statistics.median(total[REFERENCE]),
        syncbn_ms=statistics.median(total[SYNCBN]),
        collectives_ms=statistics.median(total[COLLECTIVES]),
        sync_cost_ms=statistics.median(costs),
        ratio=statistics.median(ratios),
        ratio_q1=quartiles[0],
        ratio_q3=quartiles[2],
        fwd_ms={name: statistics.median(r[name][0] for r in rounds) for name in names},
        bwd_ms={name: statistics.median(r[name][1] for r in rounds) for name in names},
        extra_ms={name: statistics.median(total[name]) for name in extras},
        vs_extra={
            name: statistics.median(s / t for s, t in zip(total[SYNCBN], total[name], strict=True)) for name in extras
        },
        rounds=len(rounds),
    )


def _time_rounds(
    rank: int,
    world: int,
    impls: dict[str, nn.Module],
    x: Tensor,
    cotangent: Tensor,
    frames: list[int],
    warmup: int,
    repeats: int,
) -> list[dict[str, tuple[float, float]]]:
    """One rank: per measured round, (forward ms, backward ms) of each implementation and of the collectives."""

    rows = torch.tensor_split(torch.arange(x.shape[0]), world)[rank]
    shard, shard_cotangent = x[rows].contiguous(), cotangent[rows].contiguous()
    sends = [torch.zeros(n, dtype=torch.float64) for n in frames]
    receives = [torch.empty(world * n, dtype=torch.float64) for n in frames]
    names = [*impls, COLLECTIVES]
    measured = []
    for round_ in range(warmup + repeats):
        # A different implementation goes first each round: drifts and after-effects hit all alike.
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        times = {}
        for name in order:
            start_together()
            if name == COLLECTIVES:
                # the forward's frames, then the backward's (the same sizes)
                times[name] = (_time_collectives(sends, receives), _time_collectives(sends, receives))
            else:
                times[name] = _time_step(impls[name], shard, shard_cotangent)
        if round_ >= warmup:
            measured.append(times)
    return measured


def start_together(margin: float = 0.02) -> None:
    """Return on every rank at one instant of the shared monotonic clock, ``margin`` seconds from rank 0's now."""
    import torch.distributed as dist

    moment = torch.tensor([time.perf_counter() + margin], dtype=torch.float64)
    dist.broadcast(moment, src=0)
    deadline = moment.item()
    # Sleep most of the way (spinning long makes the scheduler hand the core to others), spin the rest.
    time.sleep(max(deadline - time.perf_counter() - 0.002, 0.0))
    while time.perf_counter() < deadline:
        pass


def _time_collectives(sends: list[Tensor], receives: list[Tensor]) -> float:
    """Milliseconds of the all_gathers of one pass (its frames), as SyncBN makes them."""
    import torch.distributed as dist

    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    start = time.perf_counter()
    for send, receive in zip(sends, receives, strict=True):
        wait_for(all_gather(receive, send, async_op=True), send.device)  # waited for as SyncBN waits
    return (time.perf_counter() - start) * 1e3


def _time_step(module: nn.Module, x: Tensor, cotangent: Tensor) -> tuple[float, float]:
    """Milliseconds of one forward (building the graph) and of its backward."""
    module.zero_grad(set_to_none=True)
    leaf = x.detach().requires_grad_()
    gc.disable()  # a collection in the middle of a step is noise, not the step's cost
    try:
        start = time.perf_counter()
        out = module(leaf)
        middle = time.perf_counter()
        out.backward(cotangent)
        end = time.perf_counter()
    finally:
        gc.enable()
    return (middle - start) * 1e3, (end - middle) * 1e3
