"""Prove, in numbers, that SyncBN on R replicas trains like one device on the whole batch.

Three copies of one model, with identical weights, train for a few steps on the same
seeded inputs:

- the **reference**: the model with plain BatchNorm on one device, the full batch B;
- the **candidate**: ``syncbn.convert_model`` of it in ``syncbn.DataParallel`` over R
  replicas, each replica getting a shard of B;
- the **unsynced baseline**: the plain-BN model in ``syncbn.DataParallel`` over R
  replicas, so every replica normalizes its shard with its own statistics — what
  ``nn.DataParallel`` does, and what SyncBN exists to fix.

Each step: forward, backward with a fixed random cotangent of the output's shape (standard
normal over B, like the gradient of a batch-mean loss), and a plain SGD step (lr 0.01) on
each model's own parameters. The candidate and the baseline are
compared with the reference on the output, the input gradient, every parameter gradient,
every BatchNorm buffer after the step, and every BatchNorm layer's output per call
(forward hooks), so that a failure names the first layer where the replicas diverge.

A tensor passes when ``max|actual - reference| <= max(atol, rtol * max|reference|)``
(normwise: an element that cancels to nearly zero cannot fail on rounding noise);
integer buffers (``num_batches_tracked``) must match exactly. Relative errors are
``max|actual - reference| / max(max|reference|, atol / rtol)``, so a relative error
passes exactly when it is at most ``rtol`` (see ``Tolerance``).
"""

from __future__ import annotations

import contextlib
import copy
import math
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from syncbn.convert import convert_model, revert_model
from syncbn.launch import ProcessGroupFailure, run_on_processes
from syncbn.parallel.data_parallel import DataParallel
from syncbn.parallel.parallel_apply import current_replica

# How the R replicas run: threads of this process, or local processes (torch.distributed).
BACKENDS = ("threads", "gloo", "nccl")

# Names accepted for ``dtype`` and ``reference_dtype``.
DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class Tolerance:
    """How far a tensor may be from the reference: ``max|err| <= max(atol, rtol * max|reference|)``.

    Relative errors are taken against ``norm(max|reference|)``, the tensor's largest
    magnitude but at least ``atol / rtol``, so that a tensor that is almost zero
    everywhere (the gradient of a bias followed by BatchNorm, say) is judged by ``atol``
    and a relative error passes exactly when it is at most ``rtol``.

    Example:
        >>> tolerance = Tolerance(rtol=1e-4, atol=1e-5)
        >>> tolerance.allowed(scale=2.0), tolerance.allowed(scale=1e-9)
        (0.0002, 1e-05)
        >>> tolerance.norm(scale=1e-9)
        0.1
    """

    rtol: float
    atol: float

    def allowed(self, scale: float) -> float:
        """The largest absolute error allowed for a tensor whose largest magnitude is ``scale``."""
        return max(self.atol, self.rtol * scale)

    def norm(self, scale: float) -> float:
        """What absolute errors are divided by to make relative errors."""
        return max(scale, self.atol / self.rtol) if self.rtol > 0 else scale


# By the less precise of the two dtypes compared. float32: SyncBN itself is ~1e-7 off,
# rounding grows through layers and steps to ~1e-5; atol covers gradients that are zero
# in exact arithmetic (a bias followed by BatchNorm), where float32 leaves noise of
# ~1e-5. Half precisions round every layer's output to 8 (bfloat16) or 11 (float16)
# bits: plain BatchNorm on one device is as far from a float64 reference as that, and
# gradients, made of differences of nearly equal numbers, are tens of percent off.
DEFAULT_TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(rtol=1e-7, atol=1e-7),
    torch.float32: Tolerance(rtol=1e-4, atol=1e-4),
    torch.float16: Tolerance(rtol=1e-2, atol=1e-3),
    torch.bfloat16: Tolerance(rtol=1e-1, atol=1e-2),
}
# Small steps: with large ones, rounding differences (a ReLU whose input is ~0 flipping
# on one model and not the other) grow from step to step until float32 runs part ways.
# Cotangents are scaled by 1/B, as the gradient of a batch-mean loss would be.
DEFAULT_LR = 0.01


def default_tolerance(dtype: torch.dtype | str, reference_dtype: torch.dtype | str | None = None) -> Tolerance:
    """The default tolerance for comparing ``dtype`` results with a ``reference_dtype`` reference.

    The less precise dtype decides.

    Example:
        >>> default_tolerance("float32", "float64")
        Tolerance(rtol=0.0001, atol=0.0001)
    """
    dtypes = [as_dtype(dtype), as_dtype(reference_dtype if reference_dtype is not None else dtype)]
    return max((DEFAULT_TOLERANCES[d] for d in dtypes), key=lambda tolerance: tolerance.rtol)


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A floating dtype from its name (``"float32"``) or itself.

    Example:
        >>> as_dtype("bfloat16")
        torch.bfloat16
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in DEFAULT_TOLERANCES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (got {dtype})")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``.

    Example:
        >>> dtype_name(torch.float64)
        'float64'
    """
    return str(dtype).removeprefix("torch.")


def default_device() -> str:
    """Where replicas run by default: ``"cuda"`` when a GPU is visible, else ``"cpu"``.

    Example:
        >>> default_device() in ("cpu", "cuda")
        True
    """
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_replicas(device: str | torch.device = "cpu") -> int:
    """The default number of replicas: every CUDA device if there are at least 2, else 4 virtual ones.

    Example:
        >>> default_replicas("cpu")
        4
    """
    if torch.device(device).type == "cuda" and torch.cuda.device_count() >= 2:
        return torch.cuda.device_count()
    return 4


def default_batch_size(replicas: int) -> int:
    """Two samples per replica (the small per-replica batches SyncBN is for), at least 2 in all.

    Example:
        >>> default_batch_size(4), default_batch_size(1)
        (8, 2)
    """
    return max(2, 2 * replicas)


# ------------------------------------------------------------------------------- results


@dataclass
class Comparison:
    """The error of one compared quantity, worst over all steps.

    Attributes:
        name: ``output``, ``input_grad``, ``grad/<parameter>``, ``buffer/<buffer>``, or a
            BatchNorm layer's name (with the call, for layers called more than once).
        max_abs_err: ``max|actual - reference|``, worst over steps (``inf`` when a value is
            NaN, missing or of the wrong shape).
        max_rel_err: ``max_abs_err / max(max|reference|, atol / rtol)``, worst over steps.
        tolerance: the relative error allowed: ``rtol``, or 0 for an exact check.
        passed: within tolerance at every step.
        layer, call: for a BatchNorm layer's output: its name and the call index (0-based).
    """

    name: str
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0
    tolerance: float = math.inf
    passed: bool = True
    layer: str | None = None
    call: int | None = None
    _closeness: float = field(default=-1.0, init=False, repr=False, compare=False)

    def add(self, abs_err: float, scale: float, tolerance: Tolerance | None) -> None:
        """Fold in one step's error; ``tolerance=None`` means the values must be equal."""
        allowed = 0.0 if tolerance is None else tolerance.allowed(scale)
        norm = tolerance.norm(scale) if tolerance is not None else scale
        rel_err = _ratio(abs_err, norm)
        self.max_abs_err = _worse(self.max_abs_err, abs_err)
        self.max_rel_err = _worse(self.max_rel_err, rel_err)
        self.passed = self.passed and abs_err <= allowed
        closeness = _ratio(abs_err, allowed)
        if closeness > self._closeness or math.isnan(closeness):
            self._closeness, self.tolerance = closeness, _ratio(allowed, norm)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: non-finite errors become ``None``."""
        document: dict[str, Any] = {"name": self.name}
        if self.layer is not None:
            document.update(layer=self.layer, call=self.call)
        document.update(
            max_abs_err=_finite_or_none(self.max_abs_err),
            max_rel_err=_finite_or_none(self.max_rel_err),
            tolerance=_finite_or_none(self.tolerance),
            passed=self.passed,
        )
        return document


@dataclass
class ComparisonSet:
    """Every comparison of one model (SyncBN, or the unsynced baseline) with the reference.

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
        """The worst relative error of any check or layer (``inf`` if the model raised)."""
        if self.error is not None:
            return math.inf
        return max((c.max_rel_err for c in (*self.checks, *self.layers)), default=0.0, key=_sort_key)

    @property
    def first_diverging_layer(self) -> Comparison | None:
        """The first BatchNorm layer call, in forward order, out of tolerance."""
        return next((layer for layer in self.layers if not layer.passed), None)

    def as_dict(self) -> dict[str, Any]:
        first = self.first_diverging_layer
        return {
            "passed": self.passed,
            "max_rel_err": _finite_or_none(self.max_rel_err),
            "first_diverging_layer": first.layer if first is not None else None,
            "error": self.error,
            "checks": [c.as_dict() for c in self.checks],
            "layers": [c.as_dict() for c in self.layers],
        }


@dataclass
class VerificationReport:
    """The outcome of ``verify_model``: SyncBN's errors and the unsynced baseline's.

    Attributes:
        passed: SyncBN matched the reference within tolerance everywhere.
        replicas, backend, device, dtype, reference_dtype, batch_size, input_shape,
            steps, seed, lr, rtol, atol: how the run was made.
        synced: SyncBN's comparisons (``checks``, ``layers``, ``error``).
        unsynced: the same comparisons for plain per-replica BatchNorm.
        warnings: things the run did that a user should know (empty shards, dropout off).
    """

    replicas: int
    backend: str
    device: str
    dtype: str
    reference_dtype: str
    batch_size: int
    input_shape: tuple[int, ...]
    steps: int
    seed: int
    lr: float
    rtol: float
    atol: float
    synced: ComparisonSet
    unsynced: ComparisonSet
    warnings: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.synced.passed

    @property
    def checks(self) -> list[Comparison]:
        return self.synced.checks

    @property
    def layers(self) -> list[Comparison]:
        return self.synced.layers

    @property
    def first_diverging_layer(self) -> Comparison | None:
        """SyncBN's first BatchNorm layer call out of tolerance, in forward order."""
        return self.synced.first_diverging_layer

    @property
    def first_failure(self) -> Comparison | None:
        """What to blame for a failure: the first diverging layer, else the worst failing check."""
        failing = [c for c in self.synced.checks if not c.passed]
        return self.first_diverging_layer or max(failing, key=lambda c: _sort_key(c.max_rel_err), default=None)

    @property
    def hint(self) -> str | None:
        """What a failure looks like, when its numbers say: no synchronization, or rounding.

        Unsynchronized statistics are off exactly as much as unsynced BN is. A SyncBN
        error a hundred times smaller than that is what rounding amplified through a
        deep or ill-conditioned model gives (plain BatchNorm on one device does as badly
        against a float64 reference); a float64 run tells the two apart. In half
        precision, gradients are dominated by rounding.
        """
        if self.passed or self.synced.error is not None:
            return None
        half = next((d for d in (self.dtype, self.reference_dtype) if d in ("bfloat16", "float16")), None)
        if half is not None and all(layer.passed for layer in self.layers):
            return (
                f"every layer's output matches to {half} precision; {half} gradients carry the rounding of "
                "every layer's backward (plain BatchNorm on one device is as far from a float64 reference): "
                "re-run in float32 or float64 for a verdict on gradients"
            )
        if self.unsynced.error is not None:
            return None
        synced, unsynced = self.synced.max_rel_err, self.unsynced.max_rel_err
        if math.isclose(synced, unsynced, rel_tol=1e-3):
            return (
                "SyncBN's errors are those of unsynced BN: the replicas' statistics were not combined "
                "(a layer left unconverted, or statistics computed outside the synchronized path)"
            )
        if (self.dtype == "float64" and self.reference_dtype == "float64") or not synced < 0.01 * unsynced:
            return None
        return (
            f"SyncBN is off by {self.synced.max_rel_err:.2g}, unsynced BN by {self.unsynced.max_rel_err:.2g}: "
            f"{self.dtype} rounding amplified through the model is more likely than a SyncBN bug; "
            "re-run in float64 to tell them apart"
        )

    def as_dict(self) -> dict[str, Any]:
        """One JSON-ready document: the DESIGN.md contract (``passed``, ``checks``, ``layers``, ...)."""
        synced = self.synced.as_dict()
        return {
            "passed": self.passed,
            "replicas": self.replicas,
            "backend": self.backend,
            "device": self.device,
            "dtype": self.dtype,
            "reference_dtype": self.reference_dtype,
            "batch_size": self.batch_size,
            "input_shape": list(self.input_shape),
            "steps": self.steps,
            "seed": self.seed,
            "lr": self.lr,
            "rtol": self.rtol,
            "atol": self.atol,
            "max_rel_err": synced["max_rel_err"],
            "first_diverging_layer": synced["first_diverging_layer"],
            "error": synced["error"],
            "checks": synced["checks"],
            "layers": synced["layers"],
            "unsynced": self.unsynced.as_dict(),
            "hint": self.hint,
            "warnings": list(self.warnings),
        }


# ------------------------------------------------------------------------------ verify


ProgressCallback = Callable[[int, int, str], None]


class ModelRunError(ValueError):
    """The model could not run on one device with the verification input: nothing to compare."""


def verify_model(
    model: nn.Module,
    input_shape: tuple[int, ...] | list[int],
    *,
    replicas: int | None = None,
    batch_size: int | None = None,
    steps: int = 1,
    seed: int = 0,
    dtype: torch.dtype | str = torch.float32,
    reference_dtype: torch.dtype | str | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    device: str | torch.device | None = None,
    lr: float = DEFAULT_LR,
    backend: str = "threads",
    timeout: float = 60.0,
    progress: ProgressCallback | None = None,
) -> VerificationReport:
    """Train ``model`` with SyncBN on R replicas and with plain BN on one device; compare.

    ``model`` itself is not changed: the reference, the SyncBN candidate and the
    unsynced baseline are deep copies. All three train (dropout layers are put in eval
    mode, since their random masks would differ).

    Args:
        model: a model with BatchNorm layers (plain, SyncBN or BN subclasses).
        input_shape: one sample's shape, without the batch dimension, e.g. ``(3, 32, 32)``.
        replicas: R. Default: every CUDA device if there are at least 2, else 4.
        batch_size: B, the whole batch, split over the replicas. Default: ``2 * R``.
        steps: training steps (forward, backward, SGD). Default: 1.
        seed: seeds the inputs and cotangents.
        dtype: dtype of the SyncBN and baseline models (a ``torch.dtype`` or its name).
        reference_dtype: dtype of the reference. Default: ``dtype``; ``float64`` compares
            with an (almost) exact reference.
        rtol, atol: tolerance. Default: by dtype (see ``DEFAULT_TOLERANCES``).
        device: ``"cpu"`` (R virtual replicas) or ``"cuda"`` (replicas round-robin over
            every CUDA device; the reference on the first). Default: ``"cuda"`` if available.
        lr: SGD learning rate.
        backend: how the R replicas run: ``threads`` (``syncbn.DataParallel`` in this
            process), or ``gloo``/``nccl`` (R local processes in a torch.distributed group
            on 127.0.0.1, each training its shard; gradients are summed over the ranks).
        timeout: seconds a replica (thread or process) waits for its peers before failing.
        progress: called as ``progress(done, total, description)`` after each model's step.

    Returns:
        A ``VerificationReport``; ``report.passed`` says whether SyncBN matched.

    Raises:
        ValueError: a bad argument, a model without BatchNorm layers, or (as
            ``ModelRunError``) a model that fails on one device with this input.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        >>> report = verify_model(net, (3, 6, 6), replicas=2, device="cpu")
        >>> report.passed, report.batch_size, [c.name for c in report.layers]
        (True, 4, ['1'])
        >>> report.unsynced.max_rel_err > 100 * report.synced.max_rel_err
        True
    """
    settings = _Settings.resolve(
        model,
        input_shape,
        replicas,
        batch_size,
        steps,
        seed,
        dtype,
        reference_dtype,
        rtol,
        atol,
        device,
        lr,
        backend,
        timeout,
    )
    warnings = _warnings(model, settings)
    reference = _Trainer(revert_model(copy.deepcopy(_unwrapped(model))), settings, settings.reference_dtype)
    synced = _Trainer(convert_model(copy.deepcopy(_unwrapped(model))), settings, settings.dtype, parallel=True)
    unsynced = _Trainer(revert_model(copy.deepcopy(_unwrapped(model))), settings, settings.dtype, parallel=True)
    results = {"synced": _Results(settings.tolerance), "unsynced": _Results(settings.tolerance)}
    generator = torch.Generator().manual_seed(settings.seed)
    total, done = 3 * settings.steps, 0
    if settings.backend != "threads":
        with _full_float32_precision():
            _verify_on_processes(model, reference, settings, results, generator, progress)
        return _report(settings, results, warnings)
    with _full_float32_precision():
        for step in range(settings.steps):
            x = torch.randn((settings.batch_size, *settings.input_shape), generator=generator, dtype=torch.float64)
            try:
                expected = reference.step(x, generator=generator)
            except Exception as error:  # noqa: BLE001 - the model's own failure, reported as bad input
                raise ModelRunError(
                    f"the model failed on one device with input of shape {tuple(x.shape)} "
                    f"(step {step + 1}): {_describe(error)}"
                ) from error
            _check_outputs(expected.outputs)
            done += 1
            _report_progress(progress, done, total, f"step {step + 1}/{settings.steps}: reference")
            for key, trainer in (("synced", synced), ("unsynced", unsynced)):
                if results[key].error is None:
                    try:
                        actual = trainer.step(x, cotangents=expected.cotangents)
                    except Exception as error:  # noqa: BLE001 - a failure of the model under test is a finding
                        results[key].error = _describe(error)
                    else:
                        results[key].compare(actual, expected)
                done += 1
                label = "SyncBN" if key == "synced" else "unsynced BN"
                _report_progress(progress, done, total, f"step {step + 1}/{settings.steps}: {label}")
    return _report(settings, results, warnings)


def _report(settings: _Settings, results: dict[str, _Results], warnings: list[str]) -> VerificationReport:
    return VerificationReport(
        replicas=settings.replicas,
        backend=settings.backend,
        device=str(settings.device),
        dtype=dtype_name(settings.dtype),
        reference_dtype=dtype_name(settings.reference_dtype),
        batch_size=settings.batch_size,
        input_shape=settings.input_shape,
        steps=settings.steps,
        seed=settings.seed,
        lr=settings.lr,
        rtol=settings.tolerance.rtol,
        atol=settings.tolerance.atol,
        synced=results["synced"].finish(),
        unsynced=results["unsynced"].finish(),
        warnings=warnings,
    )


@dataclass(frozen=True)
class _Settings:
    """``verify_model``'s arguments, checked and with defaults filled in."""

    input_shape: tuple[int, ...]
    replicas: int
    batch_size: int
    steps: int
    seed: int
    dtype: torch.dtype
    reference_dtype: torch.dtype
    tolerance: Tolerance
    device: torch.device
    device_pool: list[torch.device]
    lr: float
    backend: str = "threads"
    timeout: float = 60.0

    @classmethod
    def resolve(
        cls,
        model: nn.Module,
        input_shape: Any,
        replicas: int | None,
        batch_size: int | None,
        steps: int,
        seed: int,
        dtype: torch.dtype | str,
        reference_dtype: torch.dtype | str | None,
        rtol: float | None,
        atol: float | None,
        device: str | torch.device | None,
        lr: float,
        backend: str = "threads",
        timeout: float = 60.0,
    ) -> _Settings:
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected an nn.Module (got {type(model).__name__})")
        if not any(isinstance(m, _BatchNorm) for m in _unwrapped(model).modules()):
            raise ValueError("the model has no BatchNorm layers: there is nothing to verify")
        shape = tuple(input_shape)
        if not shape or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
            raise ValueError(f"input_shape must be one or more positive integers, e.g. (3, 32, 32) (got {shape})")
        device = torch.device(device if device is not None else default_device())
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("device 'cuda' requested but CUDA is not available on this machine")
            replica_pool = (
                [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
                if device.index is None
                else [device]
            )
        elif device.type == "cpu":
            replica_pool = [device]
        else:
            raise ValueError(f"device must be 'cpu' or 'cuda' (got {str(device)!r})")
        replicas = default_replicas(device) if replicas is None else replicas
        _check_positive_int("replicas", replicas)
        batch_size = default_batch_size(replicas) if batch_size is None else batch_size
        _check_positive_int("batch_size", batch_size)
        _check_positive_int("steps", steps)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer (got {seed!r})")
        dtype = as_dtype(dtype)
        reference_dtype = as_dtype(reference_dtype) if reference_dtype is not None else dtype
        default = default_tolerance(dtype, reference_dtype)
        tolerance = Tolerance(rtol=default.rtol if rtol is None else rtol, atol=default.atol if atol is None else atol)
        for name, value in (("rtol", tolerance.rtol), ("atol", tolerance.atol)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0 (got {value!r})")
        if not (isinstance(lr, (int, float)) and math.isfinite(lr)):
            raise ValueError(f"lr must be a finite number (got {lr!r})")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
        if backend == "nccl" and (device.type != "cuda" or torch.cuda.device_count() < replicas):
            raise ValueError(
                f"backend nccl needs one CUDA device per replica ({replicas}); this machine has "
                f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}: use --backend gloo"
            )
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds (got {timeout!r})")
        return cls(
            shape,
            replicas,
            batch_size,
            steps,
            seed,
            dtype,
            reference_dtype,
            tolerance,
            replica_pool[0],
            replica_pool,
            float(lr),
            backend,
            float(timeout),
        )


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer (got {value!r})")


def _warnings(model: nn.Module, settings: _Settings) -> list[str]:
    warnings = []
    if settings.batch_size < settings.replicas:
        empty = list(range(settings.batch_size, settings.replicas))
        warnings.append(
            f"batch size {settings.batch_size} is smaller than {settings.replicas} replicas: replica(s) "
            f"{', '.join(map(str, empty))} get empty shards (they still join every SyncBN call, with a count of 0)"
        )
    half = [dtype_name(d) for d in (settings.dtype, settings.reference_dtype) if d in (torch.bfloat16, torch.float16)]
    if half:
        warnings.append(
            f"{half[0]} keeps {8 if half[0] == 'bfloat16' else 11} significant bits: its rounding, not SyncBN, "
            "dominates these errors (plain BatchNorm on one device is as far off); use float32 or float64 "
            "for a precise verdict"
        )
    dropout = sum(isinstance(m, _DropoutNd) for m in model.modules())
    if dropout:
        warnings.append(
            f"{dropout} dropout layer(s) run in eval mode: their random masks would differ between the models"
        )
    return warnings


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, (nn.DataParallel, DataParallel)) else model


def _report_progress(progress: ProgressCallback | None, done: int, total: int, description: str) -> None:
    if progress is not None:
        progress(done, total, description)


@contextlib.contextmanager
def _full_float32_precision() -> Iterator[None]:
    # TF32 (on by default for cuDNN convolutions) rounds float32 matmuls to 10 bits, and
    # differently for a full batch and for shards: float32 must mean float32 here.
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


# ------------------------------------------------------------------------------ training


@dataclass
class _StepResult:
    """What one model produced in one step (everything detached)."""

    outputs: dict[str, Tensor]
    cotangents: dict[str, Tensor]
    input_grad: Tensor | None
    grads: dict[str, Tensor | None]
    buffers: dict[str, Tensor]
    layers: dict[tuple[str, int], Tensor]
    layer_order: list[tuple[str, int]]


class _Trainer:
    """One model, its optimizer and its layer recorder; ``step`` runs one training step."""

    def __init__(
        self,
        model: nn.Module,
        settings: _Settings,
        dtype: torch.dtype,
        *,
        parallel: bool = False,
        device: torch.device | None = None,
        reduce_grads: Callable[[list[Tensor]], None] | None = None,
    ) -> None:
        model.train()
        for module in model.modules():
            if isinstance(module, _DropoutNd):
                module.eval()
        self.device = device if device is not None else settings.device
        self.model = model.to(self.device, dtype)
        self.dtype = dtype
        self.reduce_grads = reduce_grads
        self.run: nn.Module = (
            DataParallel(self.model, settings.device_pool, replicas=settings.replicas) if parallel else self.model
        )
        self.parameters = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD([p for _, p in self.parameters], lr=settings.lr) if self.parameters else None
        self.recorder = _LayerRecorder(self.model)

    def step(
        self, x: Tensor, *, cotangents: Mapping[str, Tensor] | None = None, generator: torch.Generator | None = None
    ) -> _StepResult:
        """Forward ``x``, backward, SGD step; return what to compare.

        The backward uses ``cotangents`` (by output name), or draws them from
        ``generator``: standard normal over the batch size, as a batch-mean loss gives.
        """
        for _, p in self.parameters:
            p.grad = None
        x = x.detach().to(self.device, self.dtype, copy=True).requires_grad_()
        outputs = _flatten_outputs(self.run(x))
        layer_order, layers = self.recorder.take()
        if cotangents is None:
            cotangents = {
                name: torch.randn(out.shape, generator=generator, dtype=torch.float64) / max(len(x), 1)
                for name, out in outputs.items()
                if out.requires_grad
            }
        cotangents = {name: value for name, value in cotangents.items() if name in outputs}
        if cotangents:
            torch.autograd.backward(
                [outputs[name] for name in cotangents],
                [value.to(outputs[name].device, outputs[name].dtype) for name, value in cotangents.items()],
            )
        if self.reduce_grads is not None:
            self.reduce_grads([p for _, p in self.parameters])
        grads = {name: (p.grad.detach().clone() if p.grad is not None else None) for name, p in self.parameters}
        if self.optimizer is not None:
            self.optimizer.step()
        return _StepResult(
            outputs={name: out.detach() for name, out in outputs.items()},
            cotangents=cotangents,
            input_grad=x.grad.detach() if x.grad is not None else None,
            grads=grads,
            buffers={name: buffer.detach().clone() for name, buffer in _batch_norm_buffers(self.model)},
            layers=layers,
            layer_order=layer_order,
        )


# ------------------------------------------------------------------- the processes way


def _verify_on_processes(
    model: nn.Module,
    reference: _Trainer,
    settings: _Settings,
    results: dict[str, _Results],
    generator: torch.Generator,
    progress: ProgressCallback | None,
) -> None:
    """Reference here, step by step; then SyncBN and unsynced BN each on R processes, all steps."""
    inputs, expected = [], []
    for step in range(settings.steps):
        x = torch.randn((settings.batch_size, *settings.input_shape), generator=generator, dtype=torch.float64)
        try:
            expected.append(reference.step(x, generator=generator))
        except Exception as error:  # noqa: BLE001 - the model's own failure, reported as bad input
            raise ModelRunError(
                f"the model failed on one device with input of shape {tuple(x.shape)} (step {step + 1}): "
                f"{_describe(error)}"
            ) from error
        _check_outputs(expected[-1].outputs)
        inputs.append(x)
    _report_progress(progress, 1, 3, f"{settings.steps} step(s): reference")
    cotangents = [step.cotangents for step in expected]
    candidates = (
        ("synced", convert_model(copy.deepcopy(_unwrapped(model))), "SyncBN"),
        ("unsynced", revert_model(copy.deepcopy(_unwrapped(model))), "unsynced BN"),
    )
    for done, (key, candidate, label) in enumerate(candidates, start=2):
        try:
            ranks = run_on_processes(
                _train_shards,
                settings.replicas,
                backend=settings.backend,
                timeout=settings.timeout,
                args=(candidate, settings, inputs, cotangents),
            )
        except ProcessGroupFailure as error:
            results[key].error = str(error)
        else:
            for actual, wanted in zip(_merge_ranks(ranks), expected, strict=True):
                results[key].compare(actual, wanted)
        _report_progress(progress, done, 3, f"{settings.steps} step(s): {label} on {settings.replicas} processes")


def _train_shards(
    rank: int, world: int, model: nn.Module, settings: _Settings, inputs: list[Tensor], cotangents: list[dict]
) -> list[dict[str, Any]]:
    """One rank: train on its shard of every step's batch; gradients summed over the ranks."""
    import torch.distributed as dist

    def sum_over_ranks(parameters: list[Tensor]) -> None:
        for p in parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)

    device = settings.device_pool[rank % len(settings.device_pool)]
    trainer = _Trainer(model, settings, settings.dtype, device=device, reduce_grads=sum_over_ranks)
    steps = []
    for x, cotangent in zip(inputs, cotangents, strict=True):
        shard = torch.tensor_split(torch.arange(x.shape[0]), world)[rank]
        result = trainer.step(x[shard], cotangents={name: value[shard] for name, value in cotangent.items()})
        steps.append(
            {
                "outputs": {k: v.cpu() for k, v in result.outputs.items()},
                "input_grad": result.input_grad.cpu() if result.input_grad is not None else None,
                "grads": {k: v.cpu() if v is not None else None for k, v in result.grads.items()},
                "buffers": {k: v.cpu() for k, v in result.buffers.items()},
                "layers": [[name, call, value.cpu()] for (name, call), value in result.layers.items()],
                "layer_order": [list(key) for key in result.layer_order],
            }
        )
    return steps


def _merge_ranks(ranks: list[list[dict[str, Any]]]) -> list[_StepResult]:
    """Join the ranks' shards back into whole-batch step results (rank 0 for what they share)."""
    merged = []
    for step in zip(*ranks, strict=True):
        first = step[0]

        def joined(parts: list[Tensor | None]) -> Tensor | None:
            present = [p for p in parts if p is not None]
            return torch.cat([p for p in present if p.numel() > 0] or present) if present else None

        layers = {}
        for name, call, _ in first["layers"]:
            parts = [value for rank in step for n, c, value in rank["layers"] if (n, c) == (name, call)]
            layers[(name, call)] = joined(parts)
        merged.append(
            _StepResult(
                outputs={name: joined([rank["outputs"][name] for rank in step]) for name in first["outputs"]},
                cotangents={},
                input_grad=joined([rank["input_grad"] for rank in step]),
                grads=first["grads"],  # summed over the ranks already: every rank holds the same
                buffers=first["buffers"],
                layers=layers,
                layer_order=[tuple(key) for key in first["layer_order"]],
            )
        )
    return merged


def _check_outputs(outputs: Mapping[str, Tensor]) -> None:
    if not outputs:
        raise ModelRunError("the model returned no tensors: verify compares tensor outputs (tuples and dicts work)")
    scalars = [name for name, out in outputs.items() if out.dim() == 0]
    if scalars:
        raise ModelRunError(
            f"the model returned a scalar ({scalars[0]}), which replicas cannot split: "
            "verify needs outputs with a batch dimension (return the logits, not the loss)"
        )


def _flatten_outputs(output: Any, name: str = "output") -> dict[str, Tensor]:
    """Every tensor in a (nested) tuple, list, dict or namedtuple, by a path-like name.

    Example:
        >>> sorted(_flatten_outputs({"logits": torch.zeros(1), "aux": (torch.ones(1), None)}))
        ['output[aux][0]', 'output[logits]']
    """
    if isinstance(output, Tensor):
        return {name: output}
    if isinstance(output, Mapping):
        items = output.items()
    elif isinstance(output, (tuple, list)):
        items = enumerate(output)
    else:
        return {}
    flat: dict[str, Tensor] = {}
    for key, value in items:
        flat.update(_flatten_outputs(value, f"{name}[{key}]"))
    return flat


def _batch_norm_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            yield name or "<root>", module


def _batch_norm_buffers(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    for name, module in _batch_norm_modules(model):
        for buffer_name, buffer in module._buffers.items():
            if buffer is not None:
                yield (f"{name}.{buffer_name}" if name != "<root>" else buffer_name), buffer


class _LayerRecorder:
    """Forward hooks on every BatchNorm layer that keep each call's output, per replica.

    The hooks are registered on the master model; replicas made by ``DataParallel``
    share its hook dicts, so they fire on every replica, and ``current_replica()`` says
    which shard an output belongs to.
    """

    def __init__(self, model: nn.Module) -> None:
        self._lock = threading.Lock()
        self._calls: dict[int, list[tuple[str, Tensor]]] = {}
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in _batch_norm_modules(model)]

    def _hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            if not isinstance(output, Tensor):
                return
            rank = current_replica() or 0
            # A clone: an in-place op after the layer (ReLU(inplace=True)) would change it.
            value = output.detach().clone()
            with self._lock:
                self._calls.setdefault(rank, []).append((name, value))

        return record

    def take(self) -> tuple[list[tuple[str, int]], dict[tuple[str, int], Tensor]]:
        """The calls since the last ``take``: their order (replica 0's) and whole-batch outputs."""
        with self._lock:
            calls, self._calls = self._calls, {}
        shards: dict[tuple[str, int], list[Tensor]] = {}
        order: list[tuple[str, int]] = []
        for rank in sorted(calls):
            seen: dict[str, int] = {}
            for name, value in calls[rank]:
                key = (name, seen.get(name, 0))
                seen[name] = key[1] + 1
                if key not in shards:
                    shards[key] = []
                    order.append(key)
                shards[key].append(value)
        merged = {}
        for key, parts in shards.items():
            nonempty = [part for part in parts if part.numel() > 0] or parts
            try:
                merged[key] = torch.cat([part.to(parts[0].device) for part in nonempty])
            except RuntimeError:  # replicas disagree on shapes: an error the comparison shows
                merged[key] = torch.full((0,), math.nan)
        return order, merged


# ----------------------------------------------------------------------------- comparing


class _Results:
    """Comparisons of one model with the reference, accumulated step by step."""

    def __init__(self, tolerance: Tolerance) -> None:
        self.tolerance = tolerance
        self.checks: dict[str, Comparison] = {}
        self.layers: dict[tuple[str, int], Comparison] = {}
        self.layer_calls: dict[str, int] = {}
        self.error: str | None = None

    def compare(self, actual: _StepResult, expected: _StepResult) -> None:
        for name, value in expected.outputs.items():
            self._check(name, actual.outputs.get(name), value)
        for name in actual.outputs.keys() - expected.outputs.keys():
            self._check(name, actual.outputs[name], None)
        if expected.input_grad is not None or actual.input_grad is not None:
            self._check("input_grad", actual.input_grad, expected.input_grad)
        for name, grad in expected.grads.items():
            if grad is not None or actual.grads.get(name) is not None:
                self._check(f"grad/{name}", actual.grads.get(name), grad)
        for name, buffer in expected.buffers.items():
            self._check(f"buffer/{name}", actual.buffers.get(name), buffer)
        for key in expected.layer_order:
            comparison = self.layers.get(key)
            if comparison is None:
                comparison = self.layers[key] = Comparison(key[0], layer=key[0], call=key[1])
                self.layer_calls[key[0]] = max(self.layer_calls.get(key[0], 0), key[1] + 1)
            comparison.add(*_errors(actual.layers.get(key), expected.layers[key]), self.tolerance)

    def _check(self, name: str, actual: Tensor | None, expected: Tensor | None) -> None:
        comparison = self.checks.setdefault(name, Comparison(name))
        exact = expected is not None and not (expected.is_floating_point() or expected.is_complex())
        comparison.add(*_errors(actual, expected), None if exact else self.tolerance)

    def finish(self) -> ComparisonSet:
        for layer in self.layers.values():
            if self.layer_calls[layer.layer] > 1:
                layer.name = f"{layer.layer} (call {layer.call + 1})"
        return ComparisonSet(checks=list(self.checks.values()), layers=list(self.layers.values()), error=self.error)


def _errors(actual: Tensor | None, expected: Tensor | None) -> tuple[float, float]:
    """``(max|actual - expected|, max|expected|)``, in float64; ``inf`` error if they cannot be compared.

    Example:
        >>> _errors(torch.tensor([1.0, 2.5]), torch.tensor([1.0, -2.0]))
        (4.5, 2.0)
    """
    if expected is None or actual is None:
        return math.inf, 0.0
    b = expected.detach().to(torch.float64)
    finite = b[b.isfinite()].abs()
    scale = finite.max().item() if finite.numel() else 0.0
    if actual.shape != expected.shape:
        return math.inf, scale
    a = actual.detach().to(b.device, torch.float64)
    if not b.numel():
        return 0.0, scale
    diff = (a - b).abs()
    diff = torch.where((a == b) | (a.isnan() & b.isnan()), 0.0, diff)  # equal infinities, NaN where expected
    return diff.nan_to_num(nan=math.inf).max().item(), scale


def _describe(error: BaseException) -> str:
    """``"ValueError: message"`` on one line (torch's messages may span several)."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _ratio(numerator: float, denominator: float) -> float:
    if denominator > 0:
        return numerator / denominator
    return 0.0 if numerator == 0 else math.inf


def _worse(a: float, b: float) -> float:
    return max(a, b, key=_sort_key)


def _sort_key(value: float) -> float:
    return math.inf if math.isnan(value) else value


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
