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

import datetime
import os
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from syncbn.bench_processes import SyncCostRow, measure_sync_cost
from syncbn.timing import (
    REFERENCE,
    SYNCBN,
    SYNCBN_GLOO,
    UNSYNCED,
    UNSYNCED_GLOO,
    Case,
    Progress,
    Rounds,
    cotangent_for,
    make_cases,
    measure,
    measure_on_processes,
    random_input,
    replica_devices,
    start_torch,
)
from syncbn.timing import time_step as time_step  # re-exported: callers time steps through syncbn.bench
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

# ResNet-like early and late stages, an MLP feature layer, and a video clip.
DEFAULT_SHAPES: tuple[Shape, ...] = ((32, 64, 56, 56), (32, 256, 14, 14), (256, 1024), (8, 64, 8, 28, 28))
DEFAULT_MODEL_BATCH = 32
# Interleaved rounds: enough for steady medians on a busy machine, a short default run.
DEFAULT_REPEATS = 10
DEFAULT_WARMUP = 2
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
    sync_cost: list[SyncCostRow] = field(default_factory=list)

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
        """The report as one JSON-ready document: ``machine``, ``settings``, ``rows``, ``overhead``, ``sync_cost``."""
        return {
            "machine": self.machine,
            "settings": self.settings,
            "rows": [row.as_dict() for row in self.rows],
            "overhead": self.overhead,
            "sync_cost": [row.as_dict() for row in self.sync_cost],
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
            processes way; CPU only), each rank with one thread, and, per BatchNorm
            shape, the processes way's sync cost per layer call beside the latency of
            its two bare collectives (``BenchReport.sync_cost``, see
            ``syncbn.bench_processes``).
        overhead: add the synchronization-overhead workload (``OVERHEAD_LAYERS`` layers
            on a tiny input); ``BenchReport.overhead`` turns it into microseconds per layer.

    Returns:
        A ``BenchReport``; per workload the rows are nn.BatchNorm (ratio 1.0), SyncBN on
        1 replica (omitted when R is 1), SyncBN on R replicas and unsynced BN on R replicas.

    Raises:
        ValueError: a bad argument (malformed shape, R below 1, CUDA missing, a shape too
            small to split over R replicas, ...), raised before anything is measured; or a
            workload that fails to run (a model that cannot take its input or its shards).
        syncbn.workload.NotEnoughMemoryError: a workload's inputs alone would not fit in memory.

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
    devices = replica_devices(device)
    start_torch(devices[0])
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
            cases = make_cases(module, replicas, devices, dtype, channels_last and len(shape) in (4, 5))
            x = random_input(shape, dtype, devices[0], channels_last, generator)
            cotangent = cotangent_for(cases[0].module, x, generator)
            rounds = Rounds(warmup, repeats, label, index * (warmup + repeats), total, progress)
            medians = measure(cases, x, cotangent, devices[0], rounds)
            if processes:
                for impl, convert in ((SYNCBN_GLOO, True), (UNSYNCED_GLOO, False)):
                    cases.append(Case(impl, replicas, cases[0].module))
                    medians.append(measure_on_processes(cases[0].module, x, cotangent, replicas, rounds, convert))
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
    sync_cost = []
    if processes and shapes and replicas > 1:
        if progress is not None:
            progress(total, total, "sync cost of the processes way")
        sync_cost = measure_sync_cost(shapes, replicas, repeats=repeats, warmup=warmup, dtype=dtype)
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
    return BenchReport(rows=rows, machine=machine, settings=settings, sync_cost=sync_cost)


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
