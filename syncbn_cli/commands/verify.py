"""`syncbn verify`: show that SyncBN on R replicas trains like one device on the whole batch.

Parses the options, makes one call to ``syncbn.verify.verify_model`` and renders its
report: tables for people, one JSON document with ``--json``. All the numbers come from
the library; this module only chooses what to show.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from sample_models import DEFAULT_SAMPLE
from syncbn.verify import (
    DTYPES,
    Comparison,
    ModelRunError,
    VerificationReport,
    default_device,
    verify_model,
)
from syncbn_cli.errors import EXIT_MISMATCH, BadInput, require_positive
from syncbn_cli.io import LoadedModel, load_model
from syncbn_cli.options import (
    Atol,
    Backend,
    BatchSize,
    Devices,
    Dtype,
    Factory,
    InputShape,
    Json,
    Key,
    OptionalSource,
    ReferenceDtype,
    Replicas,
    Rtol,
    Seed,
    Steps,
    TrustPickle,
)
from syncbn_cli.render import console, err_console, format_cell, note, print_json

BACKENDS = ("threads", "gloo", "nccl")
DEVICES = ("cpu", "cuda")
SHOWN_FAILURES = 5  # failing tensors listed under a group row
SHOWN_LAYERS = 24  # rows of the layer table before it is cut (JSON has every layer)


def verify(
    source: OptionalSource = None,
    factory: Factory = None,
    trust_pickle: TrustPickle = False,
    key: Key = None,
    replicas: Replicas = None,
    backend: Backend = "threads",
    devices: Devices = None,  # type: ignore[assignment]
    batch_size: BatchSize = None,
    input_shape: InputShape = None,
    steps: Steps = 1,
    seed: Seed = 0,
    dtype: Dtype = "float32",
    reference_dtype: ReferenceDtype = None,
    rtol: Rtol = None,
    atol: Atol = None,
    json_output: Json = False,
) -> None:
    """Prove that SyncBN on R replicas trains exactly like one device on the whole batch.

    Three copies of the model train on the same seeded data: plain BatchNorm on
    one device with the whole batch (the reference); the SyncBN-converted model
    on R replicas, the batch split between them; and plain BatchNorm on R
    replicas (unsynced: each replica normalizes with its own shard's statistics,
    which is what SyncBN fixes). Outputs, the input gradient, every parameter
    gradient, every BatchNorm buffer and every BatchNorm layer's output are
    compared with the reference, and the first layer that diverges is named.

    Exit code 0: SyncBN matches; 1: it does not; 2: bad input.

    Examples:

        syncbn verify                   # the bundled sample model

        syncbn verify --replicas 3 --steps 3 --dtype float64

        syncbn verify model.pt --factory sample_models.resnet:resnet_tiny --json

        syncbn verify --backend gloo --replicas 2   # R processes, torch.distributed
    """
    require_positive(replicas=replicas, batch_size=batch_size, steps=steps)
    device = _check_options(backend, devices, dtype, reference_dtype, rtol, atol)
    shape = parse_input_shape(input_shape) if input_shape is not None else None
    # Seeded before the factory runs, so that its random initialization is reproducible.
    torch.manual_seed(seed)
    loaded = load_model(
        source, factory or (None if source is not None else DEFAULT_SAMPLE), trust_pickle=trust_pickle, key=key
    )
    shape = shape or loaded.input_shape
    if shape is None:
        raise BadInput(
            "the model does not declare its input shape: pass --input-shape, e.g. 3x32x32 "
            "(one sample, without the batch dimension)"
        )
    with _progress(enabled=err_console.is_terminal) as progress:
        try:
            report = verify_model(
                loaded.model,
                shape,
                replicas=replicas,
                batch_size=batch_size,
                steps=steps,
                seed=seed,
                dtype=dtype,
                reference_dtype=reference_dtype,
                rtol=rtol,
                atol=atol,
                device=device,
                backend=backend,
                progress=progress,
            )
        except ModelRunError as error:
            raise BadInput(f"{error}; check --input-shape and --batch-size") from None
        except (ValueError, TypeError) as error:
            raise BadInput(str(error)) from None
    for warning in report.warnings:
        note(f"warning: {warning}")
    if json_output:
        document = report.as_dict()
        print_json({"passed": document.pop("passed"), **_model_description(loaded), **document})
    else:
        render_report(report, _model_label(loaded, source is None and factory is None))
    if not report.passed:
        raise typer.Exit(EXIT_MISMATCH)


# --------------------------------------------------------------------------- parsing


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"3x32x32"`` -> ``(3, 32, 32)``; commas work too.

    Example:
        >>> parse_input_shape("3x32x32"), parse_input_shape("64")
        ((3, 32, 32), (64,))
    """
    parts = text.strip().lower().replace(",", "x").replace("×", "x").split("x")
    try:
        sizes = tuple(int(part) for part in parts)
    except ValueError:
        sizes = ()
    if not sizes or any(size < 1 for size in sizes):
        raise BadInput(
            f"--input-shape expects positive sizes joined by x, one sample without the batch dimension, "
            f"e.g. 3x32x32 (got {text!r})"
        )
    return sizes


def _check_options(
    backend: str, devices: str | None, dtype: str, reference_dtype: str | None, rtol: float | None, atol: float | None
) -> str:
    """Refuse what the library cannot do, with the option's name; return the device to use."""
    if backend not in BACKENDS:
        raise BadInput(f"--backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
    device = devices if devices is not None else default_device()
    if device not in DEVICES:
        raise BadInput(f"--devices must be cpu or cuda (got {device!r})")
    if device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--devices cuda: CUDA is not available on this machine; use --devices cpu")
    for option, value in (("--dtype", dtype), ("--reference-dtype", reference_dtype)):
        if value is not None and value not in DTYPES:
            raise BadInput(f"{option} must be one of {', '.join(DTYPES)} (got {value!r})")
    for option, value in (("--rtol", rtol), ("--atol", atol)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise BadInput(f"{option} must be a number >= 0 (got {value})")
    return device


def _model_label(loaded: LoadedModel, bundled: bool) -> str:
    if loaded.source is not None:
        return f"{loaded.source} ({loaded.factory})" if loaded.factory else str(loaded.source)
    return f"{loaded.factory} (the bundled sample model)" if bundled else str(loaded.factory)


def _model_description(loaded: LoadedModel) -> dict[str, str | None]:
    return {"source": str(loaded.source) if loaded.source is not None else None, "factory": loaded.factory}


@contextmanager
def _progress(*, enabled: bool) -> Iterator[Callable[[int, int, str], None] | None]:
    """A progress bar on stderr (only on a terminal), and the callback that moves it."""
    if not enabled:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task("verifying", total=None)

        def advance(done: int, total: int, description: str) -> None:
            bar.update(task, completed=done, total=total, description=description)

        yield advance


# --------------------------------------------------------------------------- rendering


def render_report(report: VerificationReport, model: str) -> None:
    """Header, the checks table, the per-layer table and the verdict, on stdout."""
    console.print(_header(report, model))
    console.print()
    if report.checks:
        console.print(_checks_table(report))
        console.print()
    if report.layers:
        console.print(_layers_table(report))
        console.print()
    console.print(_verdict(report))
    if report.hint is not None:
        console.print(f"hint: {report.hint}", style="dim")


def _header(report: VerificationReport, model: str) -> Text:
    per_replica = report.batch_size / report.replicas
    share = f"{per_replica:g} per replica" if per_replica == int(per_replica) else f"{per_replica:.2g} per replica"
    if report.backend == "threads":
        where = "virtual replicas on the CPU" if report.device == "cpu" else f"CUDA, reference on {report.device}"
    else:
        where = f"{report.replicas} local processes on 127.0.0.1, {'CPU' if report.device == 'cpu' else 'CUDA'}"
    reference = "" if report.reference_dtype == report.dtype else f", reference in {report.reference_dtype}"
    text = Text()
    text.append("syncbn verify", style="bold")
    text.append(f"  {model}\n")
    text.append(
        f"SyncBN on {report.replicas} replicas ({report.backend}, {where}) vs one device on the full batch\n"
        f"batch {report.batch_size} ({share}) · input {'x'.join(map(str, report.input_shape))} · "
        f"{report.dtype}{reference} · {report.steps} step{'s' if report.steps != 1 else ''} "
        f"(SGD, lr {report.lr:g}) · seed {report.seed}\n" + _criterion(report.rtol, report.atol),
        style="dim",
    )
    return text


def _criterion(rtol: float, atol: float) -> str:
    if rtol == 0:
        return f"a tensor passes when max|err| ≤ atol {atol:g}; rel err = max|err| / max|reference|"
    return (
        f"a tensor passes when rel err ≤ rtol {rtol:g}; rel err = max|err| / max(max|reference|, atol/rtol), "
        f"atol {atol:g}"
    )


def _checks_table(report: VerificationReport) -> Table:
    unsynced = {c.name: c for c in report.unsynced.checks}
    over = " (worst of all steps)" if report.steps > 1 else ""
    table = Table(title=f"Checks: SyncBN vs one device{over}", title_justify="left")
    table.add_column("check", overflow="fold")
    table.add_column("abs err", justify="right")
    table.add_column("rel err", justify="right")
    table.add_column("tolerance", justify="right")
    table.add_column("unsynced BN", justify="right")
    table.add_column("status")
    for label, members in _check_groups(report.checks):
        worst = max(members, key=_severity)
        failing = [c for c in members if not c.passed]
        unsynced_err = _worst_rel_err([unsynced[c.name] for c in members if c.name in unsynced], report)
        name = label if len(members) == 1 else f"{label} ({len(members)})"
        status = _status(not failing, f"FAIL ({len(failing)} of {len(members)})" if len(members) > 1 else "FAIL")
        table.add_row(name, *_error_cells(worst), unsynced_err, status)
        if len(members) > 1:
            for check in sorted(failing, key=_severity, reverse=True)[:SHOWN_FAILURES]:
                unsynced_cell = _unsynced_cell(unsynced.get(check.name), report)
                table.add_row(f"  {_short(check.name)}", *_error_cells(check), unsynced_cell, _status(False, "FAIL"))
            if len(failing) > SHOWN_FAILURES:
                table.add_row(
                    f"  … {len(failing) - SHOWN_FAILURES} more failing (--json lists all)", "", "", "", "", ""
                )
    return table


def _layers_table(report: VerificationReport) -> Table:
    layers = report.layers
    unsynced = {(c.layer, c.call): c for c in report.unsynced.layers}
    first = report.first_diverging_layer
    index = layers.index(first) if first is not None else 0
    start = max(0, min(index - 3, len(layers) - SHOWN_LAYERS))
    shown = layers[start : start + SHOWN_LAYERS]
    table = Table(title="BatchNorm layers, in forward order (output per call)", title_justify="left")
    table.add_column("#", justify="right", style="dim")
    table.add_column("layer", overflow="fold")
    table.add_column("rel err", justify="right")
    table.add_column("unsynced BN", justify="right")
    table.add_column("status")
    if start > 0:
        table.add_row("", f"… {start} earlier layer calls", "", "", "")
    for number, layer in enumerate(shown, start + 1):
        if layer is first:
            status = Text("FIRST DIVERGENCE", style="bold red")
        else:
            status = _status(layer.passed, "FAIL")
        style = "bold" if layer is first else None
        table.add_row(
            str(number),
            layer.name,
            format_cell(layer.max_rel_err),
            _unsynced_cell(unsynced.get((layer.layer, layer.call)), report),
            status,
            style=style,
        )
    rest = len(layers) - start - len(shown)
    if rest > 0:
        table.add_row("", f"… {rest} more layer calls (--json lists all)", "", "", "")
    return table


def _verdict(report: VerificationReport) -> Text:
    synced, unsynced = report.synced, report.unsynced
    if unsynced.error is not None:
        baseline = f"unsynced BN could not run ({unsynced.error})"
    else:
        baseline = f"unsynced BN differs by up to {format_cell(unsynced.max_rel_err)}"
    text = Text()
    if report.passed:
        text.append("PASS", style="bold green")
        text.append(
            f": SyncBN on {report.replicas} replicas matches one device on the full batch "
            f"(max rel err {format_cell(synced.max_rel_err)}, tolerance {report.rtol:g}); {baseline}."
        )
        return text
    text.append("FAIL", style="bold red")
    if synced.error is not None:
        text.append(f": SyncBN on {report.replicas} replicas raised {synced.error}")
        return text
    culprit = report.first_failure
    if culprit is report.first_diverging_layer:
        where = f"first divergence at layer {culprit.name}"
    else:
        where = f"{culprit.name} differs"
    text.append(
        f": SyncBN on {report.replicas} replicas does not match one device: {where} "
        f"(rel err {format_cell(culprit.max_rel_err)}, tolerance {format_cell(culprit.tolerance)}); {baseline}."
    )
    return text


def _check_groups(checks: Sequence[Comparison]) -> list[tuple[str, list[Comparison]]]:
    """Rows of the checks table: outputs and the input grad alone; grads and each buffer kind grouped."""
    groups: dict[str, list[Comparison]] = {}
    for check in checks:
        if check.name.startswith("grad/"):
            label = "parameter grads"
        elif check.name.startswith("buffer/"):
            label = "buffer " + check.name.rsplit(".", 1)[-1]
        else:
            label = check.name
        groups.setdefault(label, []).append(check)
    return list(groups.items())


def _severity(comparison: Comparison) -> float:
    """How close to failing: error over tolerance (above 1 fails)."""
    if comparison.tolerance > 0:
        return comparison.max_rel_err / comparison.tolerance
    return 0.0 if comparison.max_rel_err == 0 else math.inf


def _error_cells(comparison: Comparison) -> tuple[str, str, str]:
    tolerance = "exact" if comparison.tolerance == 0 else format_cell(comparison.tolerance)
    return format_cell(comparison.max_abs_err), format_cell(comparison.max_rel_err), tolerance


def _worst_rel_err(comparisons: Sequence[Comparison], report: VerificationReport) -> str:
    if report.unsynced.error is not None or not comparisons:
        return "-"
    return format_cell(max(c.max_rel_err for c in comparisons))


def _unsynced_cell(comparison: Comparison | None, report: VerificationReport) -> str:
    return _worst_rel_err([comparison] if comparison is not None else [], report)


def _status(passed: bool, failure: str) -> Text:
    return Text("ok", style="green") if passed else Text(failure, style="bold red")


def _short(name: str) -> str:
    return name.split("/", 1)[-1]
