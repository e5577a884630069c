"""``verify_model``: train a model with SyncBN on R replicas and with plain BatchNorm on one device; compare.

The one-device models run here; the SyncBN candidate and the unsynced baseline run in
this process (``syncbn.DataParallel``, the threads backend) or on R local processes
(``syncbn.verify.processes``). Both report through the same ``Comparer``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from syncbn.convert import convert_model, revert_model
from syncbn.verify.comparisons import Comparer, Criterion
from syncbn.verify.processes import verify_on_processes
from syncbn.verify.report import VerificationReport
from syncbn.verify.settings import DEFAULT_LR, Settings, collect_warnings, unwrapped
from syncbn.verify.trainer import OneDevice, Trainer, describe, full_float32_precision
from syncbn.workload import dtype_name, is_out_of_memory

ProgressCallback = Callable[[int, int, str], None]
CANDIDATES = {"synced": "SyncBN", "unsynced": "unsynced BN"}


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
    max_ratio: float | None = None,
    device: str | torch.device | None = None,
    lr: float = DEFAULT_LR,
    backend: str = "threads",
    timeout: float = 60.0,
    progress: ProgressCallback | None = None,
) -> VerificationReport:
    """Train ``model`` with SyncBN on R replicas and with plain BN on one device; compare.

    ``model`` itself is not changed: every model of the run is a deep copy. Besides the
    SyncBN candidate and the unsynced baseline (plain BN on R replicas), three one-device
    models train on the whole batch: the reference (in ``reference_dtype``), one device
    in ``dtype``, and the float64 truth. Dropout layers run in eval mode (their random
    masks would differ). Every step starts every model from the truth's state, rounded
    to ``dtype``.

    A check passes, in a float64 run, when ``max|err| <= max(atol, rtol * max|reference|)``;
    in other dtypes, when SyncBN's error against the truth is at most ``max_ratio`` times
    one device's (one device's counted as at least ``eps(dtype) * max|truth|``) or at most
    ``atol``: rounding then fails no run, and unsynchronized statistics fail every one.

    Args:
        model: a model with BatchNorm layers (plain, SyncBN or BN subclasses).
        input_shape: one sample's shape, without the batch dimension, e.g. ``(3, 32, 32)``.
        replicas: R. Default: every CUDA device if there are at least 2, else 4.
        batch_size: B, the whole batch, split over the replicas. Default: ``2 * R``.
        steps: training steps (forward, backward, SGD). Default: 1.
        seed: seeds the inputs and cotangents.
        dtype: dtype of the SyncBN, baseline and one-device models (a ``torch.dtype`` or its name).
        reference_dtype: dtype of the reference. Default: ``dtype``.
        rtol, atol: tolerance. Default: by dtype (see ``DEFAULT_TOLERANCES``).
        max_ratio: how many times one device's error against the truth SyncBN's may be.
            Default: 2.
        device: ``"cpu"`` (R virtual replicas) or ``"cuda"`` (replicas round-robin over
            every CUDA device; the one-device models on the first). Default: ``"cuda"`` if available.
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
        syncbn.workload.NotEnoughMemoryError: the inputs alone would not fit in memory.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        >>> report = verify_model(net, (3, 6, 6), replicas=2, device="cpu")
        >>> report.passed, report.batch_size, [c.name for c in report.layers]
        (True, 4, ['1'])
        >>> report.unsynced.worst_ratio > 100 * report.synced.worst_ratio
        True
    """
    # Every argument by name, checked in one place.
    settings = Settings.resolve(model, {name: value for name, value in locals().items() if name != "progress"})
    warnings = collect_warnings(model, settings)
    original = unwrapped(model)
    one_device = OneDevice(revert_model(copy.deepcopy(original)), settings)
    eps = torch.finfo(settings.dtype).eps
    criterion = Criterion(settings.tolerance, settings.max_ratio if settings.judged_by_truth else None, eps)
    comparers = {key: Comparer(criterion, recheck=key == "synced") for key in CANDIDATES}
    generator = torch.Generator().manual_seed(settings.seed)
    report_progress = progress if progress is not None else _no_progress
    with full_float32_precision():
        if settings.backend == "threads":
            _verify_on_threads(original, one_device, settings, comparers, generator, report_progress)
        else:
            verify_on_processes(original, one_device, settings, comparers, generator, report_progress)
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
        max_ratio=settings.max_ratio,
        judged_by="truth" if settings.judged_by_truth else "reference",
        synced=comparers["synced"].finish(),
        unsynced=comparers["unsynced"].finish(),
        warnings=warnings,
    )


def _verify_on_threads(
    model: nn.Module,
    one_device: OneDevice,
    settings: Settings,
    comparers: dict[str, Comparer],
    generator: torch.Generator,
    progress: ProgressCallback,
) -> None:
    """Step by step: the one-device models, then SyncBN and unsynced BN in ``syncbn.DataParallel``."""
    candidates = {
        "synced": Trainer(convert_model(copy.deepcopy(model)), settings, settings.dtype, parallel=True),
        "unsynced": Trainer(revert_model(copy.deepcopy(model)), settings, settings.dtype, parallel=True),
    }
    total, done = 3 * settings.steps, 0
    for step in range(settings.steps):
        state = one_device.state()
        one_device.load_state(state)
        x = one_device.draw_input(generator)
        expected = one_device.step(x, generator, step)
        done += 1
        progress(done, total, f"step {step + 1}/{settings.steps}: one device")
        for key, trainer in candidates.items():
            if comparers[key].error is None:
                try:
                    trainer.load_state(state)
                    actual = trainer.step(x, expected.truth.cotangents)
                except Exception as error:  # noqa: BLE001 - a failure of the model under test is a finding
                    if is_out_of_memory(error):  # not a finding: the run does not fit here
                        raise
                    comparers[key].error = describe(error)
                else:
                    comparers[key].compare(actual, expected)
            done += 1
            progress(done, total, f"step {step + 1}/{settings.steps}: {CANDIDATES[key]}")


def _no_progress(done: int, total: int, description: str) -> None:
    pass
