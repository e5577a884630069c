"""Issue 17's figures: SyncBN's sync cost per layer call on gloo processes, beside its collectives.

For each ResNet shape and each rank count, one run of ``syncbn.bench_processes.measure_sync_cost``
times, interleaved round by round: plain BN on the shard, SyncBN on the shard, SyncBN's
bare collectives, and a detectron2-style NaiveSyncBatchNorm (benchmarks/naive_syncbn.py).
Runs for the rank counts alternate (2, 4, 2, 4, ...), so drifts of a shared machine hit
both alike; every figure comes from one run, and the runs show the spread.

    PYTHONPATH=$PWD python benchmarks/processes_sync_cost.py --replicas 2,4 --runs 3
    PYTHONPATH=$PWD python benchmarks/processes_sync_cost.py --json > figures.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from naive_syncbn import naive_from  # noqa: E402

from syncbn.bench_processes import RESNET_SHAPES, measure_sync_cost  # noqa: E402

NAIVE = "naive SyncBN"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", default="2,4", help="comma-separated rank counts (default 2,4)")
    parser.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in RESNET_SHAPES))
    parser.add_argument("--runs", type=int, default=1, help="runs per rank count, alternating")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    shapes = [tuple(int(v) for v in text.split("x")) for text in args.shapes.split(",")]
    rows = []
    for run in range(args.runs):
        for replicas in (int(r) for r in args.replicas.split(",")):
            load = round(os.getloadavg()[0], 2)
            measured = measure_sync_cost(
                shapes, replicas, repeats=args.repeats, warmup=args.warmup, extra={NAIVE: naive_from}
            )
            for row in measured:
                rows.append({"run": run, "load_before": load, **row.as_dict()})
                if not args.json:
                    print(format_row(rows[-1]), flush=True)
    if args.json:
        print(json.dumps({"cores": os.cpu_count(), "rows": rows}, indent=1))


def format_row(row: dict) -> str:
    return (
        f"run {row['run']} load {row['load_before']:4.1f} | {row['shape']:>12} on {row['replicas']} ranks: "
        f"BN {row['bn_ms']:6.2f}  SyncBN {row['syncbn_ms']:6.2f}  naive {row['extra_ms'][NAIVE]:6.2f} ms | "
        f"sync cost {row['sync_cost_ms']:5.2f} ms, collectives {row['collectives_ms']:5.2f} ms, "
        f"ratio {row['ratio']:.2f} (IQR {row['ratio_q1']:.2f}-{row['ratio_q3']:.2f}) | "
        f"SyncBN / naive {row['vs_extra'][NAIVE]:.2f}"
    )


if __name__ == "__main__":
    main()
