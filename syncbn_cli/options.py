"""Options shared by several commands, defined once.

Counts carry no ``min=``: click would answer a bad value with a multi-line usage box;
commands check them with ``errors.require_positive`` and say so in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from syncbn.verify import BACKENDS, DEFAULT_MAX_RATIO, DEFAULT_TOLERANCES
from syncbn.workload import DEVICES, DTYPES, dtype_name


def flag(*names: str, help: str) -> typer.models.OptionInfo:
    """A boolean option shown as a flag (``--json``), not as an option taking a ``<bool>`` value."""
    return typer.Option(*names, help=help, metavar="")


Source = Annotated[
    Path,
    typer.Argument(
        metavar="SRC",
        help="Checkpoint: a .safetensors or .pt state dict (architecture from --factory), a training "
        "checkpoint holding one, or a pickled whole model (only with --trust-pickle).",
        show_default=False,
    ),
]
OptionalSource = Annotated[
    Path | None,
    typer.Argument(
        metavar="SRC",
        help="Checkpoint as for `syncbn convert`; omit it to use --factory alone (default: the bundled sample model).",
        show_default=False,
    ),
]
Factory = Annotated[
    str | None,
    typer.Option(
        "--factory",
        help="MOD:FN that builds the model: an import path (sample_models.resnet:resnet_tiny) or a file "
        "(path/to/models.py:build).",
        show_default=False,
    ),
]
TrustPickle = Annotated[
    bool,
    flag(
        "--trust-pickle",
        help="Allow loading a pickled whole model. Unpickling runs arbitrary code: only for files you trust.",
    ),
]
Key = Annotated[
    str | None,
    typer.Option(
        "--key",
        help="Key of the state dict inside a training checkpoint (default: found automatically).",
        show_default=False,
    ),
]
Force = Annotated[bool, flag("--force", help="Overwrite the output file if it exists.")]
Json = Annotated[bool, flag("--json", help="Print one JSON document on stdout instead of tables.")]
Replicas = Annotated[
    int | None,
    typer.Option(
        "--replicas",
        "-r",
        help="Number of replicas (default: the CUDA devices if at least 2, else 4 virtual CPU replicas).",
        show_default=False,
    ),
]
Devices = Annotated[str, typer.Option("--devices", help=f"Where replicas run: {' or '.join(DEVICES)}.")]
ConvertOutput = Annotated[
    Path | None,
    typer.Option(
        "--output",
        "-o",
        help="File to write (default: <stem>.syncbn.safetensors beside SRC).",
        show_default=False,
    ),
]
RequiredOutput = Annotated[
    Path,
    typer.Option(
        "--output",
        "-o",
        help="File to write: .safetensors, or a torch state dict for any other suffix (.pt).",
        show_default=False,
    ),
]

# ---------------------------------------------------------------- verify (and whoever else needs them)

Backend = Annotated[
    str,
    typer.Option(
        "--backend",
        help=f"How replicas talk ({', '.join(BACKENDS)}): threads (one process; CUDA devices or virtual CPU "
        "replicas), or gloo / nccl (one local process per replica, torch.distributed on 127.0.0.1; nccl needs a GPU "
        "per replica).",
    ),
]
BatchSize = Annotated[
    int | None,
    typer.Option(
        "--batch-size",
        "-b",
        help="The whole batch B, split over the replicas (default: 2 per replica, the small per-replica "
        "batches SyncBN is for).",
        show_default=False,
    ),
]
InputShape = Annotated[
    str | None,
    typer.Option(
        "--input-shape",
        help="One sample's shape without the batch dimension, sizes joined by x: 3x32x32 (default: the "
        "shape the factory declares).",
        show_default=False,
    ),
]
Steps = Annotated[int, typer.Option("--steps", help="Training steps: forward, backward, SGD.")]
Seed = Annotated[int, typer.Option("--seed", help="Seeds the model's initialization, the inputs and the gradients.")]
Dtype = Annotated[str, typer.Option("--dtype", help=f"dtype to run in: {', '.join(DTYPES)}.")]
ReferenceDtype = Annotated[
    str | None,
    typer.Option(
        "--reference-dtype",
        help="dtype of the one-device reference (default: --dtype); float64 gives a near-exact reference.",
        show_default=False,
    ),
]


def _defaults(attribute: str) -> str:
    """``float32 1e-4, ...``: a tolerance's default per dtype, for help texts."""
    return ", ".join(f"{dtype_name(d)} {getattr(t, attribute):g}" for d, t in DEFAULT_TOLERANCES.items())


Rtol = Annotated[
    float | None,
    typer.Option(
        "--rtol",
        help=f"Relative tolerance of float64 runs against the reference (default by dtype: {_defaults('rtol')}).",
        show_default=False,
    ),
]
Atol = Annotated[
    float | None,
    typer.Option(
        "--atol",
        help="Absolute tolerance: an error within it passes whatever the ratio (default by dtype: "
        f"{_defaults('atol')}).",
        show_default=False,
    ),
]
MaxRatio = Annotated[
    float | None,
    typer.Option(
        "--max-ratio",
        help="Runs in other dtypes than float64: how many times one device's error against the float64 truth "
        f"SyncBN's may be (default {DEFAULT_MAX_RATIO:g}).",
        show_default=False,
    ),
]
