"""`syncbn verify`: show that SyncBN on R replicas trains like one device on the whole batch.

Parses the options, makes one call to ``syncbn.verify.verify_model`` and renders its
report (``syncbn_cli.verify_render``): tables for people, one JSON document with ``--json``.
All the numbers come from the library; this module only chooses what to show.
"""

from __future__ import annotations

import math

import torch
import typer

from sample_models import DEFAULT_SAMPLE
from syncbn.verify import BACKENDS, ModelRunError, verify_model
from syncbn.workload import DEVICES, DTYPES, default_device, parse_shape
from syncbn_cli.errors import EXIT_MISMATCH, BadInput, library_errors, require_positive
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
    MaxRatio,
    OptionalSource,
    ReferenceDtype,
    Replicas,
    Rtol,
    Seed,
    Steps,
    TrustPickle,
)
from syncbn_cli.render import note, print_json, progress_bar
from syncbn_cli.verify_render import render_report


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
    max_ratio: MaxRatio = None,
    json_output: Json = False,
) -> None:
    """Prove that SyncBN on R replicas trains exactly like one device on the whole batch.

    Copies of the model train on the same seeded data: the SyncBN-converted model on R
    replicas, the batch split between them; plain BatchNorm on R replicas (unsynced: each
    replica normalizes with its own shard's statistics, which is what SyncBN fixes); and
    plain BatchNorm on one device with the whole batch, in --dtype and in float64 (the
    truth). Outputs, the input gradient, every parameter gradient, every BatchNorm buffer
    and every BatchNorm layer's output are compared, and the first layer that diverges is
    named. Every step starts every model from the truth's state.

    How a check passes: in float64, when max|err| against one device <= max(atol, rtol x
    max|one device|). In other dtypes, rounding makes even one device differ from the
    float64 truth, so SyncBN passes when its error against the truth is at most --max-ratio
    times one device's. One device's error counts as at least eps x max|truth| (the dtype's
    resolution) and --atol / --max-ratio: below these, errors are rounding noise, and a
    ratio of two noises means nothing. When a check fails that way, one device is run
    again, rounded in other ways that are just as right (the batch in reverse order;
    BatchNorm in float64), and its largest error counts. Unsynchronized statistics are
    orders of magnitude further off, in every dtype.

    Exit code 0: SyncBN matches; 1: it does not; 2: bad input.

    Examples:

        syncbn verify                   # the bundled sample model

        syncbn verify --replicas 3 --steps 3 --dtype float64

        syncbn verify --dtype bfloat16 --batch-size 3 --replicas 4

        syncbn verify model.pt --factory sample_models.resnet:resnet_tiny --json

        syncbn verify --backend gloo --replicas 2   # R processes, torch.distributed
    """
    require_positive(replicas=replicas, batch_size=batch_size, steps=steps)
    device = _check_options(backend, devices, dtype, reference_dtype, rtol, atol, max_ratio)
    shape = _parse_input_shape(input_shape) if input_shape is not None else None
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
    too_large = "use a smaller --input-shape or --batch-size"
    with progress_bar("verifying") as progress, library_errors(too_large=too_large):
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
                max_ratio=max_ratio,
                device=device,
                backend=backend,
                progress=progress,
            )
        except ModelRunError as error:
            raise BadInput(f"{error}; check --input-shape and --batch-size") from None
    for warning in report.warnings:
        note(f"warning: {warning}")
    if json_output:
        document = report.as_dict()
        print_json({"passed": document.pop("passed"), **_model_description(loaded), **document})
    else:
        render_report(report, _model_label(loaded, source is None and factory is None))
    if not report.passed:
        raise typer.Exit(EXIT_MISMATCH)


def _parse_input_shape(text: str) -> tuple[int, ...]:
    try:
        return parse_shape(text)
    except ValueError as error:
        raise BadInput(f"--input-shape: {error} (one sample, without the batch dimension)") from None


def _check_options(
    backend: str,
    devices: str | None,
    dtype: str,
    reference_dtype: str | None,
    rtol: float | None,
    atol: float | None,
    max_ratio: float | None,
) -> str:
    """Refuse what the library cannot do, with the option's name; return the device to use."""
    if backend not in BACKENDS:
        raise BadInput(f"--backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
    device = devices if devices is not None else default_device()
    if device not in DEVICES:
        raise BadInput(f"--devices must be {' or '.join(DEVICES)} (got {device!r})")
    if device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--devices cuda: CUDA is not available on this machine; use --devices cpu")
    for option, value in (("--dtype", dtype), ("--reference-dtype", reference_dtype)):
        if value is not None and value not in DTYPES:
            raise BadInput(f"{option} must be one of {', '.join(DTYPES)} (got {value!r})")
    for option, value in (("--rtol", rtol), ("--atol", atol)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise BadInput(f"{option} must be a number >= 0 (got {value})")
    if max_ratio is not None and not (math.isfinite(max_ratio) and max_ratio > 0):
        raise BadInput(f"--max-ratio must be a number > 0 (got {max_ratio})")
    return device


def _model_label(loaded: LoadedModel, bundled: bool) -> str:
    if loaded.source is not None:
        return f"{loaded.source} ({loaded.factory})" if loaded.factory else str(loaded.source)
    return f"{loaded.factory} (the bundled sample model)" if bundled else str(loaded.factory)


def _model_description(loaded: LoadedModel) -> dict[str, str | None]:
    return {"source": str(loaded.source) if loaded.source is not None else None, "factory": loaded.factory}
