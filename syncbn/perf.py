"""The performance targets SyncBN is held to, measured against ``torch.nn.BatchNorm`` in one run.

Every figure is a ratio to ``nn.BatchNorm`` measured in the same process a moment
before (forward + backward medians, float32, see ``syncbn.bench``), or an absolute cost
where the target is one:

- one replica (no synchronization): SyncBatchNorm2d on (32,64,56,56) and (32,256,14,14),
  NCHW and channels_last, and SyncBatchNorm1d on (256,1024): at most 1.0x;
- R = 4 virtual CPU replicas (``syncbn.DataParallel``) against ``nn.BatchNorm2d`` on the
  full batch, on the same 2-D shapes: at most 1.2x;
- synchronization overhead per BatchNorm layer call on tiny tensors (50 layers), R = 4
  threads: at most 100 µs; and the same for 2 gloo processes (reported);
- peak memory of forward + backward: at most 1.1x ``nn.BatchNorm``'s (one replica; with
  R replicas, reported).

Reported next to the R = 4 ratios: the floor, ``syncbn.DataParallel(nn.Identity())`` on
the same batch (scatter, replicas taking turns, gather and their backward with no layer at
all), as a ratio to the same ``nn.BatchNorm`` time: what any layer pays on R replicas.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from syncbn.bench import REFERENCE, SYNCBN, BenchReport, machine_info, run_benchmark
from syncbn.convert import convert_model
from syncbn.parallel import DataParallel
from syncbn.timing import time_step
from syncbn.workload import DTYPES

PERF_DTYPE = "float32"  # every target is measured in it
RATIO_SHAPES = ((32, 64, 56, 56), (32, 256, 14, 14))
BN1D_SHAPE = (256, 1024)
MEMORY_SHAPE = (32, 64, 56, 56)
REPLICAS = 4


@dataclass
class PerfTarget:
    """One measured figure next to its target.

    Attributes:
        name: what was measured, e.g. ``"1 replica, BatchNorm2d 32x64x56x56 NCHW"``.
        measured: the figure (a ratio, or microseconds).
        target: the bound it must not exceed (None: reported only).
        unit: ``"x"`` for ratios to nn.BatchNorm, ``"µs"`` for times.
    """

    name: str
    measured: float
    target: float | None
    unit: str

    @property
    def passed(self) -> bool | None:
        return None if self.target is None else self.measured <= self.target

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


@dataclass
class PerfReport:
    """The targets, the runs they came from, and the machine."""

    targets: list[PerfTarget]
    runs: list[BenchReport]
    machine: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "targets": [target.as_dict() for target in self.targets],
            "rows": [row.as_dict() for run in self.runs for row in run.rows],
        }


def run_perf_suite(
    *, repeats: int = 10, warmup: int = 2, progress: Callable[[int, int, str], None] | None = None
) -> PerfReport:
    """Measure every target of this module's docstring on the CPU (takes a minute or two).

    Example:
        >>> # run_perf_suite().targets[0].name -> '1 replica, BatchNorm2d 32x64x56x56 NCHW'
    """
    steps = 5
    runs, targets = [], []

    def step(done: int, label: str) -> None:
        if progress is not None:
            progress(done, steps, label)

    # One-replica runs measure no R-replica case: R replicas' Python and ops flush the
    # caches the ops after them would find warm, which one replica never pays.
    for done, channels_last in enumerate((False, True)):
        layout = "channels_last" if channels_last else "NCHW"
        step(done, f"BatchNorm2d, {layout}")
        for replicas, bound in ((1, 1.0), (REPLICAS, 1.2)):
            run = run_benchmark(
                RATIO_SHAPES, replicas=replicas, channels_last=channels_last, repeats=repeats, warmup=warmup,
                processes=False, overhead=False, dtype=DTYPES[PERF_DTYPE],
            )  # fmt: skip
            runs.append(run)
            for shape in RATIO_SHAPES:
                text = "x".join(map(str, shape))
                row = next(r for r in run.rows if r.shape == text and r.impl == SYNCBN and r.replicas == replicas)
                name = "1 replica" if replicas == 1 else f"R={replicas} threads"
                targets.append(PerfTarget(f"{name}, BatchNorm2d {text} {layout}", row.ratio, bound, "x"))
                if replicas > 1:
                    reference = next(r for r in run.rows if r.shape == text and r.impl == REFERENCE)
                    floor = data_parallel_floor_ms(shape, replicas, channels_last, repeats, warmup)
                    name = f"R={replicas} floor, DataParallel(nn.Identity) {text} {layout}"
                    targets.append(PerfTarget(name, floor / reference.total_ms, None, "x"))
    step(2, "BatchNorm1d")
    dtype = DTYPES[PERF_DTYPE]
    run = run_benchmark(
        [BN1D_SHAPE], replicas=1, repeats=repeats, warmup=warmup, processes=False, overhead=False, dtype=dtype
    )
    runs.append(run)
    row = next(r for r in run.rows if r.impl == SYNCBN)
    targets.append(PerfTarget("1 replica, BatchNorm1d 256x1024", row.ratio, 1.0, "x"))
    step(3, "synchronization overhead")
    threads = run_benchmark([], replicas=REPLICAS, repeats=repeats, warmup=warmup, processes=False, dtype=dtype)
    gloo = run_benchmark([], replicas=2, repeats=repeats, warmup=warmup, processes=True, dtype=dtype)
    runs += [threads, gloo]
    by_backend = {(e["backend"], e["replicas"]): e for e in threads.overhead + gloo.overhead}
    targets.append(
        PerfTarget(
            f"sync overhead per layer call, threads R={REPLICAS}",
            by_backend["threads", REPLICAS]["total_us_per_layer"],
            100.0,
            "µs",
        )
    )
    targets.append(
        PerfTarget(
            "sync overhead per layer call, gloo 2 processes", by_backend["gloo", 2]["total_us_per_layer"], None, "µs"
        )
    )
    step(4, "peak memory")
    if not os.path.exists("/proc/self/clear_refs"):  # the measurement needs Linux's /proc
        step(steps, "done")
        return PerfReport(targets=targets, runs=runs, machine=machine_info("cpu"))
    reference = peak_memory_mb(MEMORY_SHAPE, synchronized=False, replicas=1)
    text = "x".join(map(str, MEMORY_SHAPE))
    for replicas, bound in ((1, 1.1), (REPLICAS, None)):
        measured = peak_memory_mb(MEMORY_SHAPE, synchronized=True, replicas=replicas)
        # With R replicas DataParallel itself gathers the output and joins the input
        # gradient (one full-batch copy each), as nn.DataParallel does: reported only.
        targets.append(PerfTarget(f"peak memory, R={replicas}, BatchNorm2d {text}", measured / reference, bound, "x"))
    step(steps, "done")
    return PerfReport(targets=targets, runs=runs, machine=machine_info("cpu"))


def data_parallel_floor_ms(
    shape: tuple[int, ...], replicas: int, channels_last: bool, repeats: int, warmup: int
) -> float:
    """Median forward + backward ms of ``syncbn.DataParallel(nn.Identity(), replicas=R)`` on ``shape``.

    Example:
        >>> floor_ms = data_parallel_floor_ms((8, 4, 2, 2), 2, False, repeats=1, warmup=0)
    """
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape).contiguous(memory_format=memory_format)
    cotangent = torch.randn(shape).contiguous(memory_format=memory_format)
    model = DataParallel(nn.Identity(), replicas=replicas)
    times = [sum(time_step(model, x, cotangent, x.device)) for _ in range(warmup + repeats)]
    return statistics.median(times[warmup:])


def peak_memory_mb(shape: tuple[int, ...], *, synchronized: bool, replicas: int) -> float:
    """Peak extra memory (MiB) of one forward + backward, measured in a fresh process (Linux).

    The process's peak resident size after the step minus before it: everything the step
    allocated and held at once (saved tensors, output, gradients). A fresh interpreter
    (spawn, not fork) with a fixed malloc mmap threshold: otherwise glibc's dynamic
    threshold and per-thread arenas keep freed tensors resident and the figure measures
    the allocator's history instead of the step.
    """
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_measure_peak, args=(shape, synchronized, replicas, queue), daemon=True)
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    try:
        child.start()
    finally:
        if saved is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    try:
        return queue.get(timeout=300)
    except Exception as error:  # noqa: BLE001 - a stuck or crashed child
        raise RuntimeError(f"measuring peak memory failed: the child process gave no result ({error!r})") from None
    finally:
        child.join(timeout=5)
        if child.is_alive():
            child.kill()


def _measure_peak(shape: tuple[int, ...], synchronized: bool, replicas: int, queue: Any) -> None:
    torch.manual_seed(0)
    layer: nn.Module = nn.BatchNorm2d(shape[1])
    if synchronized:
        layer = DataParallel(convert_model(layer), replicas=replicas) if replicas > 1 else convert_model(layer)
    x = torch.randn(shape).requires_grad_()
    cotangent = torch.randn(shape)
    # Reset the peak resident size to the current one (Linux), so the peak after the step
    # is the step's own, not an earlier high-water mark such as importing torch.
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = _status_kib("VmRSS")
    layer(x).backward(cotangent)
    queue.put((_status_kib("VmHWM") - before) / 1024.0)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")
