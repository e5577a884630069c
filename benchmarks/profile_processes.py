"""Where a SyncBN layer call's time goes on the processes way: a profile by section.

Runs one BatchNorm2d layer on R local gloo processes (one intra-op thread each) and
times, in each round (every rank starting at one instant): plain BN on the shard,
SyncBN on the shard with its steps wrapped in timers (statistics, collective, merge,
normalize; gradient sums, collective, input gradient), and the bare collectives of the
same sizes. Works on any syncbn tree that
has ``syncbn/_functions.py`` (run it with that tree first on PYTHONPATH), so the same
script profiles the code before and after a change.

    PYTHONPATH=$PWD python benchmarks/profile_processes.py --replicas 2 --repeats 20
"""

from __future__ import annotations

import argparse
import collections
import copy
import functools
import gc
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

import syncbn
from syncbn.bench_processes import start_together
from syncbn.launch import run_on_processes

SECTIONS = collections.defaultdict(float)
# (module path, attribute, label): whichever of these the profiled tree has gets a timer.
STEPS = [
    ("syncbn.kernels", "batch_statistics", "fwd: local statistics"),
    ("syncbn.kernels", "centered_statistics", "fwd: local statistics"),
    ("syncbn._functions", "all_gather_statistics", "fwd: collective + merge"),
    ("syncbn._functions", "update_running_statistics", "fwd: running statistics"),
    ("syncbn.kernels", "normalize", "fwd: normalize"),
    ("syncbn.kernels", "normalize_centered", "fwd: normalize"),
    ("syncbn.kernels", "gradient_sums", "bwd: gradient sums"),
    ("syncbn._functions", "all_reduce_sum", "bwd: collective"),
    ("syncbn.kernels", "input_gradient", "bwd: input gradient"),
    ("syncbn.kernels", "prepare_input_gradient", "bwd: input gradient, before the sums arrive"),
    ("syncbn.kernels", "finish_input_gradient", "bwd: input gradient, after"),
]


def timed(function, label):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            SECTIONS[label] += time.perf_counter() - start

    return wrapper


def instrument() -> None:
    import importlib

    for path, name, label in STEPS:
        module = importlib.import_module(path)
        if hasattr(module, name):
            setattr(module, name, timed(getattr(module, name), label))
    functions = importlib.import_module("syncbn._functions")
    if hasattr(functions, "PendingGather"):
        pending = functions.PendingGather
        pending.wait = timed(pending.wait, "fwd+bwd: waiting for collectives")
    function = functions._SyncBatchNormFunction
    function.forward = staticmethod(timed(function.forward, "fwd: Function total"))
    function.backward = staticmethod(timed(function.backward, "bwd: Function total"))


def step(module, x, cotangent):
    leaf = x.detach().requires_grad_()
    start = time.perf_counter()
    out = module(leaf)
    middle = time.perf_counter()
    out.backward(cotangent)
    return (middle - start) * 1e3, (time.perf_counter() - middle) * 1e3


def wait(work, device) -> None:
    """Wait for a collective as the profiled tree's SyncBN does (polling first, where it does)."""
    try:
        from syncbn.comm.distributed import wait_for
    except ImportError:
        work.wait()
    else:
        wait_for(work, device)


def frames(channels: int) -> list[int]:
    try:
        from syncbn.comm.distributed import frame_sizes
    except ImportError:  # before frames: forward [count, mean, m2], backward two sums
        return [1 + 2 * channels, 2 * channels]
    return frame_sizes(2 * channels) * 2


def rank_rounds(rank, world, shape, warmup, repeats):
    torch.manual_seed(0)
    x, cotangent = torch.randn(shape), torch.randn(shape)
    rows = torch.tensor_split(torch.arange(shape[0]), world)[rank]
    x, cotangent = x[rows].contiguous(), cotangent[rows].contiguous()
    bn = nn.BatchNorm2d(shape[1])
    plain, synced, profiled = bn, syncbn.convert_model(copy.deepcopy(bn)), syncbn.convert_model(copy.deepcopy(bn))
    sends = [torch.zeros(n, dtype=torch.float64) for n in frames(shape[1])]
    receives = [torch.empty(world * n, dtype=torch.float64) for n in frames(shape[1])]
    out = []
    names = ["bn", "syncbn", "collectives", "profiled"]
    for round_ in range(warmup + repeats):
        times = {}
        for name in names[round_ % 4 :] + names[: round_ % 4]:
            start_together()
            gc.disable()
            if name == "collectives":
                start = time.perf_counter()
                for send, receive in zip(sends, receives, strict=True):
                    wait(dist.all_gather_into_tensor(receive, send, async_op=True), send.device)
                times[name] = ((time.perf_counter() - start) * 1e3, 0.0)
            elif name == "profiled":
                if round_ == 0:
                    instrument()
                SECTIONS.clear()
                total = step(profiled, x, cotangent)
                times[name] = (total, {k: v * 1e3 for k, v in SECTIONS.items()})
            else:
                times[name] = step(plain if name == "bn" else synced, x, cotangent)
            gc.enable()
        if round_ >= warmup:
            out.append(times)
    return out


def summarize(text: str, replicas: int, per_rank: list) -> dict:
    med = statistics.median
    rounds = range(len(per_rank[0]))

    def worst(name: str, i: int) -> list[float]:  # a round lasts as long as its slowest rank
        return [max(r[k][name][i] for r in per_rank) for k in rounds]

    bn = [f + b for f, b in zip(worst("bn", 0), worst("bn", 1), strict=True)]
    sync = [f + b for f, b in zip(worst("syncbn", 0), worst("syncbn", 1), strict=True)]
    coll = worst("collectives", 0)
    cost = [s - b for s, b in zip(sync, bn, strict=True)]
    ratio = med(c / t for c, t in zip(cost, coll, strict=True))
    print(f"\n{text} on {replicas} ranks, {len(rounds)} rounds (medians; per round the slowest rank)")
    print(f"  nn.BatchNorm fwd {med(worst('bn', 0)):.2f}  bwd {med(worst('bn', 1)):.2f}  total {med(bn):.2f} ms")
    print(f"  SyncBN fwd {med(worst('syncbn', 0)):.2f}  bwd {med(worst('syncbn', 1)):.2f}  total {med(sync):.2f} ms")
    print(f"  bare collectives {med(coll):.2f} ms; sync cost {med(cost):.2f} ms; ratio {ratio:.2f}")
    sections = collections.defaultdict(list)
    for r in per_rank:
        for k in rounds:
            for label, value in r[k]["profiled"][1].items():
                sections[label].append(value)
    print("  profiled SyncBN call, median over ranks and rounds (ms):")
    for label in sorted(sections):
        print(f"    {label:44s} {med(sections[label]):7.3f}")
    return {
        "shape": text,
        "replicas": replicas,
        "bn_ms": med(bn),
        "syncbn_ms": med(sync),
        "collectives_ms": med(coll),
        "sync_cost_ms": med(cost),
        "ratio": ratio,
        "sections_ms": {label: med(values) for label, values in sections.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--shapes", default="32x64x56x56,32x256x14x14")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    figures = []
    for text in args.shapes.split(","):
        shape = tuple(int(v) for v in text.split("x"))
        per_rank = run_on_processes(rank_rounds, args.replicas, timeout=600, args=(shape, args.warmup, args.repeats))
        figures.append(summarize(text, args.replicas, per_rank))
    if args.json:
        import json
        import os

        with open(args.json, "w") as file:
            json.dump({"load": os.getloadavg()[0], "figures": figures}, file, indent=1)


if __name__ == "__main__":
    main()
