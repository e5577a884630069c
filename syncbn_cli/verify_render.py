"""The tables of `syncbn verify`: header, checks, BatchNorm layers and the verdict, on stdout.

Runs judged against the float64 truth show SyncBN's and one device's errors against it and
their ratio; float64 runs show the errors against the reference and the tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table
from rich.text import Text

from syncbn.verify import Comparison, VerificationReport
from syncbn_cli.render import console, format_cell

SHOWN_FAILURES = 5  # failing tensors listed under a group row
SHOWN_LAYERS = 24  # rows of the layer table before it is cut (JSON has every layer)


def render_report(report: VerificationReport, model: str) -> None:
    """Header, the checks table, the per-layer table and the verdict, on stdout."""
    # Header and verdict lines stay whole (a terminal wraps them; logs keep one line each).
    console.print(_header(report, model), soft_wrap=True)
    console.print()
    if report.checks:
        console.print(_checks_table(report))
        console.print()
    if report.layers:
        console.print(_layers_table(report))
        console.print()
    console.print(_verdict(report), soft_wrap=True)
    if report.hint is not None:
        console.print(f"hint: {report.hint}", style="dim", soft_wrap=True)


def _by_truth(report: VerificationReport) -> bool:
    return report.judged_by == "truth"


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
        f"(SGD, lr {report.lr:g}) · seed {report.seed}\n" + _criterion(report),
        style="dim",
    )
    return text


def _criterion(report: VerificationReport) -> str:
    if _by_truth(report):
        return (
            f"err = max|x - truth|, truth = float64 on one device; ratio = SyncBN err / one device err (at least "
            f"eps·max|truth|); a check passes when ratio ≤ {report.max_ratio:g} or SyncBN err ≤ atol {report.atol:g}"
        )
    if report.rtol == 0:
        return f"a tensor passes when max|err| ≤ atol {report.atol:g}; rel err = max|err| / max|reference|"
    return (
        f"a tensor passes when rel err ≤ rtol {report.rtol:g}; rel err = max|err| / max(max|reference|, atol/rtol), "
        f"atol {report.atol:g}"
    )


def _columns(report: VerificationReport) -> tuple[str, ...]:
    if _by_truth(report):
        return ("SyncBN err", "one device err", "ratio", "unsynced err")
    return ("abs err", "rel err", "tolerance", "unsynced BN")


def _cells(comparison: Comparison, unsynced: Sequence[Comparison], report: VerificationReport) -> tuple[str, ...]:
    """The error cells of one row: SyncBN's (one comparison) beside unsynced BN's (the worst of some)."""
    if _by_truth(report):
        ratio = "exact" if comparison.ratio is None else format_cell(comparison.ratio)
        shown = (format_cell(comparison.truth_err), format_cell(comparison.one_device_truth_err), ratio)
        worst_unsynced = max((c.truth_err for c in unsynced), default=None)
    else:
        tolerance = "exact" if comparison.tolerance == 0 else format_cell(comparison.tolerance)
        shown = (format_cell(comparison.max_abs_err), format_cell(comparison.max_rel_err), tolerance)
        worst_unsynced = max((c.max_rel_err for c in unsynced), default=None)
    if report.unsynced.error is not None or worst_unsynced is None:
        return (*shown, "-")
    return (*shown, format_cell(worst_unsynced))


def _checks_table(report: VerificationReport) -> Table:
    unsynced = {c.name: c for c in report.unsynced.checks}
    over = " (worst of all steps)" if report.steps > 1 else ""
    if _by_truth(report):
        title = f"Checks: SyncBN and one device ({report.dtype}) against the float64 truth{over}"
    else:
        title = f"Checks: SyncBN vs one device{over}"
    table = Table(title=title, title_justify="left")
    table.add_column("check", overflow="fold")
    for column in _columns(report):
        table.add_column(column, justify="right")
    table.add_column("status")
    for label, members in _check_groups(report.checks):
        worst = max(members, key=lambda c: c.severity)
        failing = [c for c in members if not c.passed]
        name = label if len(members) == 1 else f"{label} ({len(members)})"
        status = _status(worst, report, f"FAIL ({len(failing)} of {len(members)})" if len(members) > 1 else "FAIL")
        table.add_row(name, *_cells(worst, [unsynced[c.name] for c in members if c.name in unsynced], report), status)
        if len(members) > 1:
            for check in sorted(failing, key=lambda c: c.severity, reverse=True)[:SHOWN_FAILURES]:
                others = [unsynced[check.name]] if check.name in unsynced else []
                table.add_row(f"  {_short(check.name)}", *_cells(check, others, report), _status(check, report))
            if len(failing) > SHOWN_FAILURES:
                more = f"  … {len(failing) - SHOWN_FAILURES} more failing (--json lists all)"
                table.add_row(more, *[""] * (len(_columns(report)) + 1))
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
    columns = _columns(report) if _by_truth(report) else ("rel err", "unsynced BN")
    for column in columns:
        table.add_column(column, justify="right")
    table.add_column("status")
    blank = [""] * (len(columns) + 1)
    if start > 0:
        table.add_row("", f"… {start} earlier layer calls", *blank)
    for number, layer in enumerate(shown, start + 1):
        status = Text("FIRST DIVERGENCE", style="bold red") if layer is first else _status(layer, report)
        others = [unsynced[layer.layer, layer.call]] if (layer.layer, layer.call) in unsynced else []
        cells = _cells(layer, others, report)
        if not _by_truth(report):
            cells = (cells[1], cells[3])  # the relative errors
        table.add_row(str(number), layer.name, *cells, status, style="bold" if layer is first else None)
    rest = len(layers) - start - len(shown)
    if rest > 0:
        table.add_row("", f"… {rest} more layer calls (--json lists all)", *blank)
    return table


def _verdict(report: VerificationReport) -> Text:
    synced, unsynced = report.synced, report.unsynced
    by_truth = _by_truth(report)
    if unsynced.error is not None:
        baseline = f"unsynced BN could not run ({unsynced.error})"
    elif by_truth:
        baseline = f"unsynced BN's error is up to {format_cell(unsynced.worst_ratio)} times one device's"
    else:
        baseline = f"unsynced BN differs by up to {format_cell(unsynced.max_rel_err)}"
    text = Text()
    if report.passed:
        text.append("PASS", style="bold green")
        if by_truth:
            measure = (
                f"worst ratio {format_cell(synced.worst_ratio)} to one device's error against the float64 "
                f"truth, at most {report.max_ratio:g}"
            )
        else:
            measure = f"max rel err {format_cell(synced.max_rel_err)}, tolerance {report.rtol:g}"
        text.append(
            f": SyncBN on {report.replicas} replicas matches one device on the full batch ({measure}); {baseline}."
        )
        return text
    text.append("FAIL", style="bold red")
    if synced.error is not None:
        text.append(f": SyncBN on {report.replicas} replicas raised {synced.error}")
        return text
    culprit = report.first_failure
    where = f"first divergence at layer {culprit.name}" if culprit is report.first_diverging_layer else None
    where = where or f"{culprit.name} differs"
    if by_truth and culprit.ratio is not None:
        measure = (
            f"error {format_cell(culprit.truth_err)} against the float64 truth, {format_cell(culprit.ratio)} times "
            f"one device's, at most {report.max_ratio:g} or atol {report.atol:g}"
        )
    else:
        measure = f"rel err {format_cell(culprit.max_rel_err)}, tolerance {format_cell(culprit.tolerance)}"
    text.append(f": SyncBN on {report.replicas} replicas does not match one device: {where} ({measure}); {baseline}.")
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


def _status(comparison: Comparison, report: VerificationReport, failure: str = "FAIL") -> Text:
    if not comparison.passed:
        return Text(failure, style="bold red")
    if comparison.by_atol:
        return Text("ok (≤ atol)", style="green")  # a tensor that is noise everywhere: the ratio means nothing
    return Text("ok", style="green")


def _short(name: str) -> str:
    return name.split("/", 1)[-1]
