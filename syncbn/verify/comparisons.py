"""How far a model's results are from the reference and from the float64 truth, and the verdict.

Every checked tensor (an output, the input gradient, a parameter gradient, a BatchNorm
buffer, a BatchNorm layer's output) is measured at every step against:

- the **reference**: the unconverted model on one device with the whole batch, in
  ``reference_dtype`` (``max_abs_err``, ``max_rel_err``);
- the **truth**: the same in float64 (``truth_err``), beside the error of **one device**,
  the unconverted model in the run's own dtype (``one_device_truth_err``).

The verdict (``Criterion``): float64 runs pass when ``max|err| <= max(atol, rtol * max|reference|)``;
other dtypes pass when SyncBN's error against the truth is at most ``max_ratio`` times one
device's (counted as at least the dtype's resolution, ``eps * max|truth|``) or at most
``atol``. Integer tensors (``num_batches_tracked``) must be equal. docs/design.md says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from syncbn.verify.tolerance import Tolerance
from syncbn.verify.trainer import Expected, StepResult


@dataclass(frozen=True)
class Criterion:
    """When a checked tensor passes.

    Attributes:
        tolerance: ``rtol`` and ``atol``.
        max_ratio: None: judged against the reference with ``tolerance`` (float64 runs).
            Else the truth judgement: pass when ``ratio <= max_ratio`` or ``truth_err <= atol``.
        eps: the run dtype's resolution (``torch.finfo(dtype).eps``).

    ``ratio`` is SyncBN's error against the truth over one device's, which counts as at
    least ``eps * scale``: no result stored in the dtype is expected closer, and a ratio of
    two errors below that is a ratio of rounding noises. ``scale`` is ``max|truth|`` of the
    tensor, or of every tensor of its module for parameter gradients and buffers: the
    gradient of a bias followed by BatchNorm is zero in exact arithmetic, a sum of terms as
    large as its layer's weight gradient, and rounds at that scale. A gradient that ranks
    sum counts the sum of their partial gradients' magnitudes. ``atol`` is the last resort.

    Example:
        >>> criterion = Criterion(Tolerance(rtol=1e-4, atol=1e-4), max_ratio=2.0, eps=2**-7)
        >>> criterion.ratio(truth_err=0.03, one_device_err=0.01, truth_scale=1.0)
        3.0
        >>> criterion.ratio(truth_err=0.03, one_device_err=0.0, truth_scale=1.0)  # the resolution counts
        3.84
    """

    tolerance: Tolerance
    max_ratio: float | None = None
    eps: float = 0.0

    @property
    def by_truth(self) -> bool:
        """Whether checks are judged by the ratio to one device's error against the truth."""
        return self.max_ratio is not None

    def ratio(self, truth_err: float, one_device_err: float, truth_scale: float) -> float:
        """SyncBN's error over one device's, counted as at least the dtype's resolution at the tensor's scale."""
        return ratio(truth_err, max(one_device_err, self.eps * truth_scale))


@dataclass(frozen=True)
class StepErrors:
    """One tensor at one step: its errors against the reference and the truth.

    Attributes:
        abs_err, scale: ``max|actual - reference|`` and ``max|reference|``.
        truth_err: ``max|actual - truth|``.
        truth_scale: ``max|truth|`` (``Comparer`` raises it to its module's; see ``Criterion``).
        one_device_err: ``max|one device - truth|``.
        exact: an integer tensor, which must be equal.
    """

    abs_err: float
    scale: float
    truth_err: float
    truth_scale: float
    one_device_err: float
    exact: bool = False

    @classmethod
    def measure(
        cls, actual: Tensor | None, reference: Tensor | None, truth: Tensor | None, one_device: Tensor | None
    ) -> StepErrors:
        """The errors of ``actual``; a missing or misshapen tensor is ``inf`` away."""
        abs_err, scale = max_error(actual, reference)
        truth_err, truth_scale = max_error(actual, truth)
        one_device_err, _ = max_error(one_device, truth)
        exact = reference is not None and not (reference.is_floating_point() or reference.is_complex())
        return cls(abs_err, scale, truth_err, truth_scale, one_device_err, exact)


@dataclass
class Comparison:
    """The errors of one compared quantity, worst over all steps, and whether it passed.

    Attributes:
        name: ``output``, ``input_grad``, ``grad/<parameter>``, ``buffer/<buffer>``, or a
            BatchNorm layer's name (with the call, for layers called more than once).
        max_abs_err: ``max|actual - reference|`` (``inf`` when a value is NaN, missing or
            of the wrong shape).
        max_rel_err: ``max_abs_err / max(max|reference|, atol / rtol)``.
        tolerance: the relative error allowed against the reference: ``rtol``, or 0 for an
            exact check (the verdict of float64 runs).
        truth_err: ``max|actual - truth|``, the truth being float64 on one device.
        one_device_truth_err: ``max|one device - truth|``, one device in the run's dtype.
        ratio: ``truth_err`` over one device's error (counted as at least ``eps * max|truth|``):
            the verdict of runs in other dtypes, which pass when it is at most ``max_ratio`` or
            ``truth_err`` is at most ``atol``; None in float64 runs and for exact checks.
        passed: within the criterion at every step.
        severity: the judged error over the error allowed, worst over steps (above 1 fails).
        by_atol: some step passed only by ``atol``, its ratio being above ``max_ratio``.
        layer, call: for a BatchNorm layer's output: its name and the call index (0-based).
    """

    name: str
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0
    tolerance: float = math.inf
    truth_err: float = 0.0
    one_device_truth_err: float = 0.0
    ratio: float | None = None
    passed: bool = True
    severity: float = field(default=0.0, repr=False, compare=False)
    by_atol: bool = field(default=False, repr=False, compare=False)
    layer: str | None = None
    call: int | None = None
    _closeness: float = field(default=-1.0, init=False, repr=False, compare=False)

    def add(self, errors: StepErrors, criterion: Criterion) -> None:
        """Fold in one step's errors.

        Example:
            >>> check = Comparison("output")
            >>> check.add(StepErrors(0.0, 1.0, 3e-2, 1.0, 1e-2), Criterion(Tolerance(0.1, 0.01), 2.0, 2**-7))
            >>> check.passed, check.ratio
            (False, 3.0)
        """
        tolerance = criterion.tolerance
        allowed = 0.0 if errors.exact else tolerance.allowed(errors.scale)
        norm = tolerance.norm(errors.scale) if not errors.exact else errors.scale
        self.max_abs_err = worse(self.max_abs_err, errors.abs_err)
        self.max_rel_err = worse(self.max_rel_err, ratio(errors.abs_err, norm))
        self.truth_err = worse(self.truth_err, errors.truth_err)
        self.one_device_truth_err = worse(self.one_device_truth_err, errors.one_device_err)
        closeness = ratio(errors.abs_err, allowed)
        if closeness > self._closeness or math.isnan(closeness):
            self._closeness, self.tolerance = closeness, ratio(allowed, norm)
        if errors.exact:
            severity = ratio(errors.abs_err, 0.0)
        elif criterion.by_truth and math.isfinite(errors.one_device_err):
            step_ratio = criterion.ratio(errors.truth_err, errors.one_device_err, errors.truth_scale)
            self.ratio = worse(self.ratio or 0.0, step_ratio)
            # Passing takes either bound: the ratio, or atol (errors that are all noise).
            severity = min(step_ratio / criterion.max_ratio, ratio(errors.truth_err, tolerance.atol))
            self.by_atol = self.by_atol or (step_ratio > criterion.max_ratio and severity <= 1.0)
        else:  # float64 runs; or one device diverged too, and only the reference is left to compare with
            severity = closeness
        self.severity = worse(self.severity, severity)
        self.passed = self.passed and severity <= 1.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: non-finite errors become ``None``."""
        document: dict[str, Any] = {"name": self.name}
        if self.layer is not None:
            document.update(layer=self.layer, call=self.call)
        document.update(
            max_abs_err=finite_or_none(self.max_abs_err),
            max_rel_err=finite_or_none(self.max_rel_err),
            tolerance=finite_or_none(self.tolerance),
            truth_err=finite_or_none(self.truth_err),
            one_device_truth_err=finite_or_none(self.one_device_truth_err),
            ratio=finite_or_none(self.ratio) if self.ratio is not None else None,
            passed=self.passed,
        )
        return document


@dataclass
class ComparisonSet:
    """Every comparison of one model (SyncBN, or the unsynced baseline).

    Attributes:
        checks: outputs, input gradient, parameter gradients and BatchNorm buffers.
        layers: each BatchNorm layer's output per call, in forward order.
        error: what the model raised, if it could not complete the run.
    """

    checks: list[Comparison] = field(default_factory=list)
    layers: list[Comparison] = field(default_factory=list)
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and all(c.passed for c in (*self.checks, *self.layers))

    @property
    def max_rel_err(self) -> float:
        """The worst relative error against the reference (``inf`` if the model raised)."""
        return self._worst(lambda c: c.max_rel_err)

    @property
    def worst_ratio(self) -> float | None:
        """The worst ratio to one device's error against the truth (None in float64 runs).

        Of the tensors the ratio judged: not those that passed by ``atol``, all noise.
        """
        ratios = [c.ratio for c in (*self.checks, *self.layers) if c.ratio is not None and not (c.by_atol and c.passed)]
        if not ratios:
            return None
        return math.inf if self.error is not None else max(ratios, key=sort_key)

    @property
    def first_diverging_layer(self) -> Comparison | None:
        """The first BatchNorm layer call, in forward order, that failed."""
        return next((layer for layer in self.layers if not layer.passed), None)

    def _worst(self, value: Any) -> float:
        if self.error is not None:
            return math.inf
        return max((value(c) for c in (*self.checks, *self.layers)), default=0.0, key=sort_key)

    def as_dict(self) -> dict[str, Any]:
        first = self.first_diverging_layer
        worst_ratio = self.worst_ratio
        return {
            "passed": self.passed,
            "max_rel_err": finite_or_none(self.max_rel_err),
            "worst_ratio": finite_or_none(worst_ratio) if worst_ratio is not None else None,
            "first_diverging_layer": first.layer if first is not None else None,
            "error": self.error,
            "checks": [c.as_dict() for c in self.checks],
            "layers": [c.as_dict() for c in self.layers],
        }


Key = tuple[str, Any]  # ("check", name) or ("layer", (layer, call))


class Comparer:
    """Compares one model's steps with the one-device results; ``finish`` gives the ``ComparisonSet``.

    ``recheck``: measure one device again, rounded another way that is just as right
    (``OneDevice.step_otherwise``), when a tensor fails the ratio (off for the unsynced
    baseline, which is expected to fail).
    """

    def __init__(self, criterion: Criterion, *, recheck: bool = True) -> None:
        self.criterion = criterion
        self.recheck = recheck
        self.checks: dict[str, Comparison] = {}
        self.layers: dict[tuple[str, int], Comparison] = {}
        self.layer_calls: dict[str, int] = {}
        self.error: str | None = None

    def compare(self, actual: StepResult, expected: Expected) -> None:
        """Fold in one step: every output, the input gradient, gradients, buffers and layer outputs.

        When a tensor fails the ratio, one device's error is measured again, rounded in
        other ways that are just as right (``expected.reordered``: the batch in reverse
        order; BatchNorm in float64), and the largest counts: one device has no preferred
        rounding either.
        """
        errors = measure_step(actual, expected)
        failing = any(self._fails_by_ratio(error) for error in errors.values())
        if failing and self.recheck and expected.reordered is not None:
            for other in expected.reordered():
                again = measure_step(other, expected)
                errors = {
                    key: replace(error, one_device_err=max(error.one_device_err, again[key].truth_err, key=sort_key))
                    for key, error in errors.items()
                }
        for (kind, key), error in errors.items():
            if kind == "check":
                self.checks.setdefault(key, Comparison(key)).add(error, self.criterion)
                continue
            if key not in self.layers:
                self.layers[key] = Comparison(key[0], layer=key[0], call=key[1])
                self.layer_calls[key[0]] = max(self.layer_calls.get(key[0], 0), key[1] + 1)
            self.layers[key].add(error, self.criterion)

    def _fails_by_ratio(self, error: StepErrors) -> bool:
        probe = Comparison("probe")
        probe.add(error, self.criterion)
        return not probe.passed and probe.ratio is not None

    def finish(self) -> ComparisonSet:
        for layer in self.layers.values():
            if self.layer_calls[layer.layer] > 1:
                layer.name = f"{layer.layer} (call {layer.call + 1})"
        return ComparisonSet(checks=list(self.checks.values()), layers=list(self.layers.values()), error=self.error)


def measure_step(actual: StepResult, expected: Expected) -> dict[Key, StepErrors]:
    """The errors of every compared tensor of one step, in report order."""
    reference, truth, one = expected.reference, expected.truth, expected.one_device
    errors: dict[Key, StepErrors] = {}

    def check(name: str, got: Tensor | None, wanted: Tensor | None, true: Tensor | None, alone: Tensor | None) -> None:
        errors["check", name] = StepErrors.measure(got, wanted, true, alone)

    for name, value in reference.outputs.items():
        check(name, actual.outputs.get(name), value, truth.outputs.get(name), one.outputs.get(name))
    for name in actual.outputs.keys() - reference.outputs.keys():
        check(name, actual.outputs[name], None, None, None)
    if reference.input_grad is not None or actual.input_grad is not None:
        check("input_grad", actual.input_grad, reference.input_grad, truth.input_grad, one.input_grad)
    for kind, got, wanted, true, alone in (
        ("grad", actual.grads, reference.grads, truth.grads, one.grads),
        ("buffer", actual.buffers, reference.buffers, truth.buffers, one.buffers),
    ):
        measured = {
            name: StepErrors.measure(got.get(name), value, true.get(name), alone.get(name))
            for name, value in wanted.items()
            if value is not None or got.get(name) is not None
        }
        for name, scale in actual.grad_scales.items() if kind == "grad" else ():
            if name in measured:  # ranks' partial gradients: rounding them costs up to eps times this
                measured[name] = replace(measured[name], truth_scale=max(measured[name].truth_scale, scale))
        for name, error in _at_module_scale(measured).items():
            errors["check", f"{kind}/{name}"] = error
    for key in reference.layer_order:
        got_layer, true_layer, alone_layer = actual.layers.get(key), truth.layers.get(key), one.layers.get(key)
        errors["layer", key] = StepErrors.measure(got_layer, reference.layers[key], true_layer, alone_layer)
    return errors


def _at_module_scale(errors: dict[str, StepErrors]) -> dict[str, StepErrors]:
    """Each tensor's errors with ``truth_scale`` raised to the largest of its module's tensors (``layer.weight``).

    Example:
        >>> weight, bias = StepErrors(0, 0, 0, truth_scale=3.0, one_device_err=0), StepErrors(0, 0, 0, 1e-9, 0)
        >>> _at_module_scale({"fc.weight": weight, "fc.bias": bias})["fc.bias"].truth_scale
        3.0
    """
    module_scale: dict[str, float] = {}
    for name, error in errors.items():
        module = name.rpartition(".")[0]
        module_scale[module] = max(module_scale.get(module, 0.0), error.truth_scale, key=sort_key)
    return {name: replace(error, truth_scale=module_scale[name.rpartition(".")[0]]) for name, error in errors.items()}


def max_error(actual: Tensor | None, expected: Tensor | None) -> tuple[float, float]:
    """``(max|actual - expected|, max|expected|)``, in float64; ``inf`` error if they cannot be compared.

    Example:
        >>> max_error(torch.tensor([1.0, 2.5]), torch.tensor([1.0, -2.0]))
        (4.5, 2.0)
    """
    if expected is None or actual is None:
        return math.inf, 0.0
    b = expected.detach().to(torch.float64)
    if not b.numel():
        return (0.0 if actual.shape == expected.shape else math.inf), 0.0
    if actual.shape != expected.shape:
        finite = b[b.isfinite()].abs()
        return math.inf, finite.max().item() if finite.numel() else 0.0
    a = actual.detach().to(b.device, torch.float64)
    error, scale = torch.stack([(a - b).abs().max(), b.abs().max()]).tolist()
    if math.isfinite(error) and math.isfinite(scale):
        return error, scale
    # Infinities or NaN somewhere: equal infinities and NaN where NaN is expected are no error.
    finite = b[b.isfinite()].abs()
    diff = torch.where((a == b) | (a.isnan() & b.isnan()), 0.0, (a - b).abs())
    return diff.nan_to_num(nan=math.inf).max().item(), finite.max().item() if finite.numel() else 0.0


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, with ``0 / 0 = 0`` and ``x / 0 = inf``.

    Example:
        >>> ratio(1.0, 4.0), ratio(0.0, 0.0), ratio(1.0, 0.0)
        (0.25, 0.0, inf)
    """
    if denominator > 0:
        return numerator / denominator
    return 0.0 if numerator == 0 else math.inf


def worse(a: float, b: float) -> float:
    """The larger of two errors, NaN counting as the largest."""
    return max(a, b, key=sort_key)


def sort_key(value: float) -> float:
    return math.inf if math.isnan(value) else value


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
