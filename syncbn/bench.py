"""Benchmarks: SyncBN against ``torch.nn.BatchNorm`` on the same input, in the same run.

Per workload (one BatchNorm layer on one input shape, a model's training step, or the
synchronization overhead on 50 tiny layers), every implementation runs on the same input
with the same cotangent: ``nn.BatchNorm`` on the full batch (the reference), SyncBN on 1
replica, SyncBN and unsynced BN on R replicas (``syncbn.DataParallel``), and optionally on
R gloo processes. Forward and backward are timed apart; rounds interleave the
implementations (each round starting with another), so drifts of the machine hit all of
them alike. Reported: medians after warm-up, and each implementation's ``fwd + bwd`` over
the reference's in the same workload. Every argument is checked, and a run too large for
memory refused, before anything is measured.
"""

from __future__ import annotations

import copy
import datetime
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from syncbn.convert import convert_model
from syncbn.launch import run_on_processes
from syncbn.parallel import DataParallel
from syncbn.parallel.scatter_gather import shard_sizes as _shard_sizes
from syncbn.workload import (
    Shape,
    check_memory,
    default_replicas,
    dtype_name,
    format_shape,
    is_out_of_memory,
    tensor_bytes,
)
from syncbn.workload import parse_shape as _parse_shape
from syncbn.workload import parse_shapes as _parse_shapes

# progress(done, total, description): called before each round of measurements and once at the end.
Progress = Callable[[int, int, str], None]

# ResNet-like early and late stages, an MLP feature layer, and a video clip.
DEFAULT_SHAPES: tuple[Shape, ...] = ((32, 64, 56, 56), (32, 256, 14, 14), (256, 1024), (8, 64, 8, 28, 28))
DEFAULT_MODEL_BATCH = 32
# Interleaved rounds: enough for steady medians on a busy machine, a short default run.
DEFAULT_REPEATS = 10
DEFAULT_WARMUP = 2
REFERENCE = "nn.BatchNorm"
SYNCBN = "SyncBN"
UNSYNCED = "unsynced BN"
SYNCBN_GLOO = "SyncBN (gloo)"
UNSYNCED_GLOO = "unsynced BN (gloo)"
# The synchronization-overhead workload: many BatchNorm layers on a tiny input, where
# the cost of a layer is almost all rendezvous (threads) or collective (gloo).
OVERHEAD_LAYERS = 50
OVERHEAD_WORKLOAD = f"sync overhead ({OVERHEAD_LAYERS} x BatchNorm1d)"
OVERHEAD_FEATURES = 16
_BATCH_NORM_FOR_DIM: dict[int, type[nn.Module]] = {
    2: nn.BatchNorm1d,
    3: nn.BatchNorm1d,
    4: nn.BatchNorm2d,
    5: nn.BatchNorm3d,
}


@dataclass
class BenchRow:
    """One implementation on one workload.

    Attributes:
        workload: what ran, e.g. ``"BatchNorm2d"`` or ``"resnet_tiny train step"``.
        impl: ``"nn.BatchNorm"`` (the reference), ``"SyncBN"`` or ``"unsynced BN"``.
        shape: the full-batch input shape, as ``--shapes`` writes it (``"32x64x56x56"``).
        replicas: how many replicas the batch was split over.
        dtype, device: the input's dtype name and the device type.
        fwd_ms, bwd_ms: median forward and backward times in milliseconds.
        ratio: ``(fwd_ms + bwd_ms)`` over the reference's, in the same workload.
    """

    workload: str
    impl: str
    shape: str
    replicas: int
    dtype: str
    device: str
    fwd_ms: float
    bwd_ms: float
    ratio: float

    @property
    def total_ms(self) -> float:
        """Forward plus backward, in milliseconds."""
        return self.fwd_ms + self.bwd_ms

    def as_dict(self) -> dict[str, Any]:
        """The row as plain JSON/CSV values (the ``syncbn bench --json`` row contract)."""
        return asdict(self)


@dataclass
class BenchReport:
    """What ``run_benchmark`` measured, and where.

    Attributes:
        rows: one per implementation and workload, the reference first in each workload.
        machine: platform, CPU, core count, torch version, thread count, date, device name.
        settings: the arguments that shaped the run (replicas, dtype, repeats, ...).
    """

    rows: list[BenchRow]
    machine: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def overhead(self) -> list[dict[str, Any]]:
        """Synchronization cost per BatchNorm layer call, per backend, in microseconds.

        From the overhead workload: (SyncBN - unsynced BN) / layers, forward and backward.
        """
        rows = {row.impl: row for row in self.rows if row.workload == OVERHEAD_WORKLOAD}
        found = []
        for backend, synced, unsynced in (("threads", SYNCBN, UNSYNCED), ("gloo", SYNCBN_GLOO, UNSYNCED_GLOO)):
            if synced in rows and unsynced in rows:
                a, b = rows[synced], rows[unsynced]
                found.append(
                    {
                        "backend": backend,
                        "replicas": a.replicas,
                        "layers": OVERHEAD_LAYERS,
                        "fwd_us_per_layer": (a.fwd_ms - b.fwd_ms) * 1e3 / OVERHEAD_LAYERS,
                        "bwd_us_per_layer": (a.bwd_ms - b.bwd_ms) * 1e3 / OVERHEAD_LAYERS,
                        "total_us_per_layer": (a.total_ms - b.total_ms) * 1e3 / OVERHEAD_LAYERS,
                    }
                )
        return found

    def as_dict(self) -> dict[str, Any]:
        """The report as one JSON-ready document: ``machine``, ``settings``, ``rows``, ``overhead``."""
        return {
            "machine": self.machine,
            "settings": self.settings,
            "rows": [row.as_dict() for row in self.rows],
            "overhead": self.overhead,
        }


# A shape of ``--shapes``: the full batch N, channels C and up to three spatial sizes.
SHAPE_DIMS = (2, 5)
SHAPE_EXAMPLE = "32x64x56x56"


def parse_shape(text: str) -> Shape:
    """Parse one input shape written ``NxCx...`` (2 to 5 positive sizes; see ``syncbn.workload.parse_shape``).

    Two or three dimensions are measured with BatchNorm1d, four with BatchNorm2d, five
    with BatchNorm3d.

    Example:
        >>> parse_shape("32x64x56x56")
        (32, 64, 56, 56)
        >>> parse_shape("32x0")
        Traceback (most recent call last):
        ...
        ValueError: malformed shape '32x0': sizes must be positive integers, like 32x64x56x56
    """
    return _parse_shape(text, dims=SHAPE_DIMS, example=SHAPE_EXAMPLE)


def parse_shapes(text: str) -> list[Shape]:
    """Parse a comma-separated list of shapes, e.g. ``"32x64x56x56,256x1024"``.

    Example:
        >>> parse_shapes("4x3x5x5, 8x16")
        [(4, 3, 5, 5), (8, 16)]
    """
    return _parse_shapes(text, dims=SHAPE_DIMS, example=SHAPE_EXAMPLE)


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Facts about where a benchmark runs, for its header (``load``: 1-minute load average).

    Example:
        >>> sorted(machine_info())
        ['cores', 'cpu', 'date', 'device_name', 'load', 'platform', 'threads', 'torch']
    """
    if device == "cuda" and torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        device_name = f"{len(names)} x {names[0]}" if len(set(names)) == 1 else ", ".join(names)
    else:
        device_name = "cpu"
    return {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_name": device_name,
        # Other processes distort timings (on few cores, a lot): the report says how busy it was.
        "load": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def run_benchmark(
    shapes: Sequence[Shape] = DEFAULT_SHAPES,
    *,
    replicas: int | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    repeats: int = DEFAULT_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    model: nn.Module | None = None,
    model_input_shape: Sequence[int] | None = None,
    model_name: str | None = None,
    model_batch_size: int = DEFAULT_MODEL_BATCH,
    progress: Progress | None = None,
    seed: int = 0,
    processes: bool = True,
    overhead: bool = True,
) -> BenchReport:
    """Time nn.BatchNorm, SyncBN and unsynced BN, forward and backward, on each shape.

    Args:
        shapes: full-batch input shapes ``(N, C, *)``, 2 to 5 dimensions each.
        replicas: R, the replicas a batch is split over (default: ``default_replicas``).
        device: ``"cpu"`` (R virtual replicas) or ``"cuda"`` (R replicas round-robin over
            the visible GPUs).
        dtype: of inputs, parameters and buffers.
        channels_last: use the channels-last memory format for 4-D and 5-D inputs.
        repeats: measured rounds; medians are reported.
        warmup: rounds run first and not measured.
        model: a model with BatchNorm layers whose training step (forward and backward)
            is measured as one more workload; it is copied, never changed. None: no model.
        model_input_shape: one sample's shape for ``model`` (without the batch dimension).
        model_name: how the model's rows are labelled (default: its class name).
        model_batch_size: the model's full batch size.
        progress: called as ``progress(done, total, description)`` before each round and
            once when done.
        seed: of the random inputs and cotangents.
        processes: also time SyncBN and unsynced BN on R local gloo processes (the
            processes way; CPU only), each rank with one thread.
        overhead: add the synchronization-overhead workload (``OVERHEAD_LAYERS`` layers
            on a tiny input); ``BenchReport.overhead`` turns it into microseconds per layer.

    Returns:
        A ``BenchReport``; per workload the rows are nn.BatchNorm (ratio 1.0), SyncBN on
        1 replica (omitted when R is 1), SyncBN on R replicas and unsynced BN on R replicas.

    Raises:
        ValueError: a bad argument (malformed shape, R below 1, CUDA missing, a shape too
            small to split over R replicas, ...); raised before anything is measured.

    Example:
        >>> report = run_benchmark([(4, 3, 5, 5)], replicas=2, repeats=1, warmup=0, processes=False, overhead=False)
        >>> [(row.impl, row.replicas) for row in report.rows]
        [('nn.BatchNorm', 1), ('SyncBN', 1), ('SyncBN', 2), ('unsynced BN', 2)]
        >>> report.rows[0].ratio
        1.0
    """
    shapes = [tuple(shape) for shape in shapes]
    _check_arguments(
        shapes, replicas, device, dtype, repeats, warmup, model, model_input_shape, model_batch_size, overhead
    )
    replicas = replicas if replicas is not None else default_replicas(device)
    for shape in shapes:
        _check_splittable(shape, replicas)
    _check_memory(shapes, dtype, device, model_input_shape if model is not None else None, model_batch_size)
    machine = machine_info(device)  # before measuring: the load average is then others' load
    devices = _replica_devices(device)
    _start_torch(devices[0])
    generator = torch.Generator().manual_seed(seed)

    # (name, full-batch shape, module); the module is copied for each implementation.
    workloads: list[tuple[str, Shape, nn.Module]] = [
        (_BATCH_NORM_FOR_DIM[len(shape)].__name__, shape, _BATCH_NORM_FOR_DIM[len(shape)](shape[1])) for shape in shapes
    ]
    if model is not None and model_input_shape is not None:
        name = model_name or type(model).__name__
        workloads.append((f"{name} train step", (model_batch_size, *model_input_shape), model))
    if overhead:
        stack = nn.Sequential(*(nn.BatchNorm1d(OVERHEAD_FEATURES) for _ in range(OVERHEAD_LAYERS)))
        workloads.append((OVERHEAD_WORKLOAD, (2 * replicas, OVERHEAD_FEATURES), stack))
    processes = processes and device == "cpu"

    total = (warmup + repeats) * len(workloads)
    rows: list[BenchRow] = []
    for index, (workload, shape, module) in enumerate(workloads):
        label = f"{workload} {format_shape(shape)}"
        try:
            cases = _cases(module, replicas, devices, dtype, channels_last and len(shape) in (4, 5))
            x = _random(shape, dtype, devices[0], channels_last, generator)
            cotangent = _cotangent_for(cases[0].module, x, generator)
            rounds = _Rounds(warmup, repeats, label, index * (warmup + repeats), total, progress)
            medians = _measure(cases, x, cotangent, devices[0], rounds)
            if processes:
                for impl, convert in ((SYNCBN_GLOO, True), (UNSYNCED_GLOO, False)):
                    cases.append(_Case(impl, replicas, cases[0].module))
                    medians.append(_measure_on_processes(cases[0].module, x, cotangent, replicas, rounds, convert))
        except Exception as error:
            if is_out_of_memory(error):
                raise
            # A model that cannot run this input (or its shards) is bad input, not a crash.
            raise ValueError(f"{label} failed: {type(error).__name__}: {' '.join(str(error).split())}") from error
        reference_total = sum(medians[0])
        for case, (fwd, bwd) in zip(cases, medians, strict=True):
            rows.append(
                BenchRow(
                    workload=workload,
                    impl=case.impl,
                    shape=format_shape(shape),
                    replicas=case.replicas,
                    dtype=dtype_name(dtype),
                    device=device,
                    fwd_ms=fwd,
                    bwd_ms=bwd,
                    ratio=1.0 if case.impl == REFERENCE else (fwd + bwd) / reference_total,
                )
            )
    if progress is not None:
        progress(total, total, "done")
    settings = {
        "replicas": replicas,
        "device": device,
        "dtype": dtype_name(dtype),
        "channels_last": channels_last,
        "repeats": repeats,
        "warmup": warmup,
        "processes": processes,
    }
    return BenchReport(rows=rows, machine=machine, settings=settings)


@dataclass
class _Case:
    impl: str
    replicas: int
    module: nn.Module


def _cases(
    module: nn.Module, replicas: int, devices: list[torch.device], dtype: torch.dtype, channels_last: bool
) -> list[_Case]:
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

    cases = [_Case(REFERENCE, 1, copy.deepcopy(module))]
    if replicas > 1:
        cases.append(_Case(SYNCBN, 1, convert_model(copy.deepcopy(module))))
    cases.append(_Case(SYNCBN, replicas, parallel(convert_model(copy.deepcopy(module)))))
    cases.append(_Case(UNSYNCED, replicas, parallel(copy.deepcopy(module))))
    return cases


@dataclass
class _Rounds:
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


def _measure(
    cases: list[_Case], x: Tensor, cotangent: Tensor, device: torch.device, rounds: _Rounds
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


def _measure_on_processes(
    module: nn.Module, x: Tensor, cotangent: Tensor, replicas: int, rounds: _Rounds, convert: bool
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

    rows = torch.split(torch.arange(x.shape[0]), _shard_sizes(x.shape[0], world))[rank]
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


def _start_torch(device: torch.device) -> None:
    """One tiny BatchNorm step, so that a process's one-off start-up costs (autograd, thread
    pools, lazy imports; see docs/design.md) never land on a measured step, even with no warm-up."""
    x = torch.randn(4, 2, device=device, requires_grad=True)
    out = torch.nn.functional.batch_norm(x, None, None, training=True)
    # With an explicit gradient, as every timed step passes one: the first such backward
    # imports more of torch than the first forward does.
    out.backward(torch.ones_like(out))


def _cotangent_for(module: nn.Module, x: Tensor, generator: torch.Generator) -> Tensor:
    """A fixed random cotangent of the output's shape, dtype and layout (one forward to learn them)."""
    with torch.no_grad():
        out = copy.deepcopy(module)(x)  # a copy: the running statistics stay as they are
    cotangent = torch.randn(out.shape, generator=generator, dtype=torch.float32).to(out.device, out.dtype)
    return cotangent.contiguous(memory_format=_memory_format_of(out))


def _random(shape: Shape, dtype: torch.dtype, device: torch.device, channels_last: bool, generator) -> Tensor:
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


def _replica_devices(device: str) -> list[torch.device]:
    if device == "cuda":
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    # Explicit, so that a machine with CUDA still runs CPU replicas on the CPU.
    return [torch.device("cpu")]


def _check_arguments(
    shapes: list[Shape],
    replicas: int | None,
    device: str,
    dtype: torch.dtype,
    repeats: int,
    warmup: int,
    model: nn.Module | None,
    model_input_shape: Sequence[int] | None,
    model_batch_size: int,
    overhead: bool = False,
) -> None:
    if not shapes and model is None and not overhead:
        raise ValueError("nothing to measure: give at least one shape, a model, or the overhead workload")
    for shape in shapes:
        if not (2 <= len(shape) <= 5 and all(isinstance(d, int) and d >= 1 for d in shape)):
            raise ValueError(f"expected shapes of 2 to 5 positive integers (N, C, *) (got {shape!r})")
    if replicas is not None and (isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1):
        raise ValueError(f"replicas must be a positive integer (got {replicas!r})")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda' (got {device!r})")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available here: use device 'cpu'")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype (got {dtype!r})")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be at least 1 (got {repeats!r})")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be at least 0 (got {warmup!r})")
    if model is not None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module (got {type(model).__name__})")
        if model_input_shape is None or not all(isinstance(d, int) and d >= 1 for d in model_input_shape):
            raise ValueError(
                f"model_input_shape must give one sample's shape as positive integers (got {model_input_shape!r})"
            )
        if model_batch_size < 2:
            raise ValueError(f"model_batch_size must be at least 2 (got {model_batch_size})")


# Tensors of a workload's input size held at once: the input and cotangent, and per
# implementation (up to four in one process) an input gradient, output and saved copy.
_INPUT_COPIES = 14


def _check_memory(
    shapes: list[Shape],
    dtype: torch.dtype,
    device: str,
    model_input_shape: Sequence[int] | None,
    model_batch_size: int,
) -> None:
    """Refuse a workload whose input-sized tensors alone exceed the memory available."""
    workloads = list(shapes)
    if model_input_shape is not None:
        workloads.append((model_batch_size, *model_input_shape))
    for shape in workloads:
        check_memory(
            f"shape {format_shape(shape)} in {dtype_name(dtype)}", _INPUT_COPIES * tensor_bytes(shape, dtype), device
        )


def _check_splittable(shape: Shape, replicas: int) -> None:
    """Every non-empty shard must have more than one value per channel, or BN cannot train on it."""
    per_sample = 1
    for d in shape[2:]:
        per_sample *= d
    smallest = shape[0] // replicas if shape[0] >= replicas else 1
    if smallest * per_sample < 2:
        raise ValueError(
            f"shape {format_shape(shape)} split over {replicas} replicas leaves a replica with "
            f"{smallest * per_sample} value per channel, too few for BatchNorm in training: "
            f"use a batch of at least {2 * replicas} or fewer replicas"
        )


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
