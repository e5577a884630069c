"""``verify_model``'s arguments, checked once, with their defaults filled in (``Settings.resolve``).

Every bad argument is a ``ValueError`` or ``TypeError`` naming the argument, what it got and
what it accepts, raised before any model runs; a run that cannot fit in memory is refused
(``syncbn.workload.NotEnoughMemoryError``) before anything is allocated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from syncbn.launch import PROCESS_BACKENDS
from syncbn.parallel.data_parallel import DataParallel
from syncbn.verify.tolerance import DEFAULT_MAX_RATIO, Tolerance, default_tolerance
from syncbn.workload import DEVICES, as_dtype, check_memory, default_device, default_replicas, format_shape

# How the R replicas run: threads of this process, or local processes (torch.distributed).
BACKENDS = ("threads", *PROCESS_BACKENDS)
# Small steps: with large ones, rounding differences (a ReLU whose input is ~0 flipping
# on one model and not the other) grow from step to step.
DEFAULT_LR = 0.01
# Copies of the input a run holds at once, counted in float64 (the drawn batch, the
# truth's input and its gradient) and in the run's dtype (four models' inputs and
# gradients): a floor under what a run needs, before any activation.
_FLOAT64_INPUT_COPIES = 3
_RUN_DTYPE_INPUT_COPIES = 8


def default_batch_size(replicas: int) -> int:
    """Two samples per replica (the small per-replica batches SyncBN is for), at least 2 in all.

    Example:
        >>> default_batch_size(4), default_batch_size(1)
        (8, 2)
    """
    return max(2, 2 * replicas)


@dataclass(frozen=True)
class Settings:
    """``verify_model``'s arguments, checked and with defaults filled in (see ``verify_model``)."""

    input_shape: tuple[int, ...]
    replicas: int
    batch_size: int
    steps: int
    seed: int
    dtype: torch.dtype
    reference_dtype: torch.dtype
    tolerance: Tolerance
    max_ratio: float
    device: torch.device
    device_pool: list[torch.device]
    lr: float
    backend: str
    timeout: float

    @classmethod
    def resolve(cls, model: nn.Module, arguments: Mapping[str, Any]) -> Settings:
        """Check ``verify_model``'s keyword ``arguments`` (by name) and fill in the defaults.

        Raises:
            ValueError, TypeError: a bad argument, named, with what it got and what it accepts.
        """
        input_shape, device, replicas, batch_size = (
            arguments[k] for k in ("input_shape", "device", "replicas", "batch_size")
        )
        steps, seed, dtype, reference_dtype = (arguments[k] for k in ("steps", "seed", "dtype", "reference_dtype"))
        rtol, atol, max_ratio, lr = (arguments[k] for k in ("rtol", "atol", "max_ratio", "lr"))
        backend, timeout = arguments["backend"], arguments["timeout"]
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected an nn.Module (got {type(model).__name__})")
        if not any(isinstance(m, _BatchNorm) for m in unwrapped(model).modules()):
            raise ValueError("the model has no BatchNorm layers: there is nothing to verify")
        shape = tuple(input_shape)
        if not shape or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
            raise ValueError(f"input_shape must be one or more positive integers, e.g. (3, 32, 32) (got {shape})")
        device, device_pool = _devices(device)
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
        max_ratio = DEFAULT_MAX_RATIO if max_ratio is None else max_ratio
        for name, value in (("rtol", tolerance.rtol), ("atol", tolerance.atol)):
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0 (got {value!r})")
        if isinstance(max_ratio, bool) or not (
            isinstance(max_ratio, (int, float)) and math.isfinite(max_ratio) and max_ratio > 0
        ):
            raise ValueError(f"max_ratio must be a finite number > 0 (got {max_ratio!r})")
        if not (isinstance(lr, (int, float)) and math.isfinite(lr)):
            raise ValueError(f"lr must be a finite number (got {lr!r})")
        _check_backend(backend, device, replicas)
        if isinstance(timeout, bool) or not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds (got {timeout!r})")
        _check_memory(shape, batch_size, dtype, device)
        return cls(
            input_shape=shape,
            replicas=replicas,
            batch_size=batch_size,
            steps=steps,
            seed=seed,
            dtype=dtype,
            reference_dtype=reference_dtype,
            tolerance=tolerance,
            max_ratio=float(max_ratio),
            device=device_pool[0],
            device_pool=device_pool,
            lr=float(lr),
            backend=backend,
            timeout=float(timeout),
        )

    @property
    def judged_by_truth(self) -> bool:
        """float64 runs keep the tolerance against the reference; other dtypes the truth judgement."""
        return self.dtype != torch.float64


def _devices(device: str | torch.device | None) -> tuple[torch.device, list[torch.device]]:
    """The device asked for and the devices replicas go round-robin on."""
    try:
        device = torch.device(device if device is not None else default_device())
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be {' or '.join(map(repr, DEVICES))} (got {device!r})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available on this machine")
        if device.index is not None:
            return device, [device]
        return device, [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    if device.type == "cpu":
        return device, [device]
    raise ValueError(f"device must be {' or '.join(map(repr, DEVICES))} (got {str(device)!r})")


def _check_backend(backend: str, device: torch.device, replicas: int) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
    if backend == "nccl" and (device.type != "cuda" or torch.cuda.device_count() < replicas):
        raise ValueError(
            f"backend nccl needs one CUDA device per replica ({replicas}); this machine has "
            f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}: use --backend gloo"
        )


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer (got {value!r})")


def _check_memory(shape: tuple[int, ...], batch_size: int, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse inputs whose copies alone exceed the memory available (before activations)."""
    samples = batch_size * math.prod(shape)
    needed = samples * (_FLOAT64_INPUT_COPIES * 8 + _RUN_DTYPE_INPUT_COPIES * dtype.itemsize)
    what = f"input {format_shape(shape)} with batch {batch_size}"
    check_memory(what, needed, "cpu")
    if device.type == "cuda":
        check_memory(what, samples * _RUN_DTYPE_INPUT_COPIES * dtype.itemsize, device)


def collect_warnings(model: nn.Module, settings: Settings) -> list[str]:
    """What the run does that a user should know: empty shards, dropout switched off."""
    warnings = []
    if settings.batch_size < settings.replicas:
        empty = list(range(settings.batch_size, settings.replicas))
        warnings.append(
            f"batch size {settings.batch_size} is smaller than {settings.replicas} replicas: replica(s) "
            f"{', '.join(map(str, empty))} get empty shards (they still join every SyncBN call, with a count of 0)"
        )
    dropout = sum(isinstance(m, _DropoutNd) for m in model.modules())
    if dropout:
        warnings.append(
            f"{dropout} dropout layer(s) run in eval mode: their random masks would differ between the models"
        )
    return warnings


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside an ``nn.DataParallel`` or ``syncbn.DataParallel``, else the model."""
    return model.module if isinstance(model, (nn.DataParallel, DataParallel)) else model
