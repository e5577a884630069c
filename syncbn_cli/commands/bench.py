"""`syncbn bench`: forward and backward times of SyncBN beside torch.nn.BatchNorm, in one run."""

from __future__ import annotations

from typing import Annotated

import typer

from syncbn.bench import (
    DEFAULT_MODEL_BATCH,
    DEFAULT_REPEATS,
    DEFAULT_SHAPES,
    DEFAULT_WARMUP,
    BenchReport,
    BenchRow,
    format_shape,
    parse_shapes,
    run_benchmark,
)
from syncbn.perf import PERF_DTYPE, run_perf_suite
from syncbn.workload import DEVICES, DTYPES
from syncbn_cli import render
from syncbn_cli.errors import BadInput, library_errors, require_positive
from syncbn_cli.factories import build_from_factory
from syncbn_cli.options import Devices, Json, Replicas, flag

DEFAULT_MODEL = "sample_models.resnet:resnet_tiny"

Shapes = Annotated[
    str | None,
    typer.Option(
        "--shapes",
        help="Comma-separated full-batch input shapes NxCx..., 2 to 5 dimensions (BN1d for 2-3, BN2d for 4, "
        f"BN3d for 5). Default: {','.join(format_shape(s) for s in DEFAULT_SHAPES)}.",
        show_default=False,
    ),
]
Dtype = Annotated[str, typer.Option("--dtype", help=f"Dtype of inputs and weights: {', '.join(DTYPES)}.")]
ChannelsLast = Annotated[bool, flag("--channels-last", help="Channels-last memory format for 4-D/5-D inputs.")]
Repeats = Annotated[int, typer.Option("--repeats", help="Measured repeats; medians are reported.")]
Warmup = Annotated[int, typer.Option("--warmup", help="Unmeasured repeats run first.")]
Csv = Annotated[bool, flag("--csv", help="Print the rows as CSV on stdout instead of tables.")]
Model = Annotated[
    str,
    typer.Option(
        "--model",
        help="MOD:FN of a model whose training step is measured too (its factory declares input_shape), or 'none'.",
    ),
]
ModelBatchSize = Annotated[int, typer.Option("--model-batch-size", help="Full batch size of the model's step.")]
Processes = Annotated[
    bool,
    flag("--processes/--no-processes", help="Also time SyncBN and unsynced BN on R local gloo processes (CPU only)."),
]
Overhead = Annotated[
    bool,
    flag(
        "--overhead/--no-overhead",
        help="Also measure the synchronization cost per BatchNorm layer call (50 tiny layers).",
    ),
]
Suite = Annotated[
    str,
    typer.Option(
        "--suite",
        help="default: the tables below. perf: the performance targets (1 replica <= 1.0x, R=4 <= 1.2x, "
        "sync overhead <= 100 µs per layer call, peak memory <= 1.1x), each measured against nn.BatchNorm in "
        "float32 on fixed shapes; it takes --repeats, --warmup and the output format only.",
    ),
]
# What --suite perf fixes itself: giving any of these with it is refused.
PERF_FIXED = ("shapes", "replicas", "devices", "dtype", "channels_last", "model", "model_batch_size", "processes",
              "overhead")  # fmt: skip


def bench(
    ctx: typer.Context,
    shapes: Shapes = None,
    replicas: Replicas = None,
    devices: Devices = "cpu",
    dtype: Dtype = "float32",
    channels_last: ChannelsLast = False,
    repeats: Repeats = DEFAULT_REPEATS,
    warmup: Warmup = DEFAULT_WARMUP,
    model: Model = DEFAULT_MODEL,
    model_batch_size: ModelBatchSize = DEFAULT_MODEL_BATCH,
    processes: Processes = True,
    overhead: Overhead = True,
    suite: Suite = "default",
    json: Json = False,
    csv: Csv = False,
) -> None:
    """Time SyncBN against torch.nn.BatchNorm, forward and backward, on the same inputs.

    Per shape: nn.BatchNorm on the full batch (the reference),
    SyncBN on 1 replica, SyncBN on R replicas (syncbn.DataParallel),
    and unsynced per-replica BN on R replicas; then SyncBN and unsynced BN on
    R gloo processes (--no-processes to skip).
    Then the same for a whole model's training step (--model), and the
    synchronization overhead per layer call on 50 tiny layers (--no-overhead).
    Times are medians in ms after warm-up;
    ratio = (fwd + bwd) / nn.BatchNorm's (fwd + bwd), in the same run.

    Example:

        syncbn bench --shapes 32x64x56x56,256x1024 --replicas 4 --repeats 10 --csv

        syncbn bench --suite perf
    """
    if json and csv:
        raise BadInput("--json and --csv exclude each other: pick one output format")
    if suite not in ("default", "perf"):
        raise BadInput(f"--suite must be default or perf (got {suite!r})")
    if repeats < 1 or warmup < 0:
        raise BadInput(f"--repeats must be at least 1 and --warmup at least 0 (got {repeats} and {warmup})")
    if suite == "perf":
        # By the source's name: typer may bring its own copy of click's ParameterSource.
        given = [name for name in PERF_FIXED if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"]
        if given:
            options = ", ".join("--" + name.replace("_", "-") for name in given)
            raise BadInput(
                f"--suite perf measures fixed shapes, replicas and dtype ({PERF_DTYPE}) and ignores {options}: "
                f"drop {'it' if len(given) == 1 else 'them'}, or leave out --suite perf"
            )
        _perf_suite(repeats, warmup, json, csv)
        return
    require_positive(replicas=replicas)
    if model_batch_size < 2:
        raise BadInput(f"--model-batch-size must be at least 2 (got {model_batch_size})")
    if devices not in DEVICES:
        raise BadInput(f"--devices must be {' or '.join(DEVICES)} (got {devices!r})")
    if dtype not in DTYPES:
        raise BadInput(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    try:
        shape_list = parse_shapes(shapes) if shapes is not None else list(DEFAULT_SHAPES)
    except ValueError as error:
        raise BadInput(f"--shapes: {error}") from None
    built, input_shape = (None, None) if model.lower() == "none" else build_from_factory(model)
    if built is not None and input_shape is None:
        raise BadInput(f"--model {model}: the factory declares no input_shape; give it one (see sample_models)")

    too_large = "use smaller --shapes or --model-batch-size"
    # A ValueError is a bad argument, or the model failing on its input.
    with render.progress_bar("measuring") as report_progress, library_errors(too_large=too_large):
        report = run_benchmark(
            shape_list,
            replicas=replicas,
            device=devices,
            dtype=DTYPES[dtype],
            channels_last=channels_last,
            repeats=repeats,
            warmup=warmup,
            model=built,
            model_input_shape=input_shape,
            model_name=model.rsplit(":", 1)[-1],
            model_batch_size=model_batch_size,
            progress=report_progress,
            processes=processes,
            overhead=overhead,
        )

    if json:
        render.print_json(report.as_dict())
    elif csv:
        render.print_csv([row.as_dict() for row in report.rows])
    else:
        _print_tables(report)
        _print_overhead(report)


def _print_tables(report: BenchReport) -> None:
    """The header (machine, torch, settings), then one table per workload."""
    machine, settings = report.machine, report.settings
    device = settings["device"] if machine["device_name"] == settings["device"] else machine["device_name"]
    layout = "channels_last" if settings["channels_last"] else "contiguous"
    header = [
        f"machine: {machine['platform']}",
        f"cpu: {machine['cpu']}, {machine['cores']} cores · torch {machine['torch']}, {machine['threads']} threads",
        f"date: {machine['date']} · load average: {machine['load']} · device: {device}",
        f"{settings['dtype']} · {layout} · R = {settings['replicas']} replicas · "
        f"median of {settings['repeats']} after {settings['warmup']} warm-up",
    ]
    for line in header:
        render.console.print(line, markup=False)
    workloads: dict[tuple[str, str], list[BenchRow]] = {}
    for row in report.rows:
        workloads.setdefault((row.workload, row.shape), []).append(row)
    for (workload, shape), rows in workloads.items():
        cells = [
            (row.impl, row.replicas, _ms(row.fwd_ms), _ms(row.bwd_ms), _ms(row.total_ms), f"{row.ratio:.2f}x")
            for row in rows
        ]
        render.console.print()
        render.console.print(
            render.make_table(
                f"{workload} {shape}", ["impl", "replicas", "fwd ms", "bwd ms", "total ms", "ratio"], cells
            )
        )


def _print_overhead(report: BenchReport) -> None:
    """Synchronization cost per layer call, one line per backend; the processes way's beside its collectives."""
    if not report.overhead and not report.sync_cost:
        return
    render.console.print()
    for row in report.sync_cost:
        render.console.print(
            f"processes way (gloo, R = {row.replicas}), {row.shape}: sync cost {_ms(row.sync_cost_ms)} ms per "
            f"layer call (SyncBN {_ms(row.syncbn_ms)} ms - nn.BatchNorm {_ms(row.bn_ms)} ms on a shard), "
            f"its two collectives alone {_ms(row.collectives_ms)} ms: ratio {row.ratio:.2f} "
            f"(quartiles {row.ratio_q1:.2f}-{row.ratio_q3:.2f})",
            markup=False,
        )
    for entry in report.overhead:
        render.console.print(
            f"synchronization overhead per BatchNorm layer call ({entry['backend']}, R = {entry['replicas']}): "
            f"{entry['total_us_per_layer']:.0f} µs (forward {entry['fwd_us_per_layer']:.0f} µs, "
            f"backward {entry['bwd_us_per_layer']:.0f} µs)",
            markup=False,
        )


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.1f}"


def _perf_suite(repeats: int, warmup: int, json: bool, csv: bool) -> None:
    """``--suite perf``: every target with its measured figure and verdict."""
    with render.progress_bar("measuring") as report_progress:
        report = run_perf_suite(repeats=repeats, warmup=warmup, progress=report_progress)
    if json:
        render.print_json(report.as_dict())
        return
    if csv:
        render.print_csv([target.as_dict() for target in report.targets])
        return
    machine = report.machine
    render.console.print(
        f"machine: {machine['platform']}\ncpu: {machine['cpu']}, {machine['cores']} cores · torch {machine['torch']}, "
        f"{machine['threads']} threads\ndate: {machine['date']} · load average: {machine['load']} · {PERF_DTYPE}, "
        f"forward + backward, ratios to nn.BatchNorm in the same run",
        markup=False,
    )
    cells = []
    for target in report.targets:
        measured = f"{target.measured:.2f}x" if target.unit == "x" else f"{target.measured:.0f} µs"
        bound = (
            "-"
            if target.target is None
            else (f"<= {target.target:g}x" if target.unit == "x" else f"<= {target.target:g} µs")
        )
        status = "reported" if target.passed is None else ("ok" if target.passed else "MISSED")
        cells.append((target.name, measured, bound, status))
    render.console.print()
    render.console.print(render.make_table("Performance targets", ["measure", "measured", "target", "status"], cells))
