"""Options shared by several commands, defined once.

Counts carry no ``min=``: click would answer a bad value with a multi-line usage box;
commands check them with ``errors.require_positive`` and say so in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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
    typer.Option(
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
Force = Annotated[bool, typer.Option("--force", help="Overwrite the output file if it exists.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables.")]
Replicas = Annotated[
    int | None,
    typer.Option(
        "--replicas",
        "-r",
        help="Number of replicas (default: the CUDA devices if at least 2, else 4 virtual CPU replicas).",
        show_default=False,
    ),
]
Devices = Annotated[
    str,
    typer.Option("--devices", help="Where replicas run: cpu or cuda."),
]
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
        help="How replicas talk: threads (one process; CUDA devices or virtual CPU replicas), or gloo / "
        "nccl (one local process per replica, torch.distributed on 127.0.0.1; nccl needs a GPU per replica).",
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
Dtype = Annotated[str, typer.Option("--dtype", help="dtype to run in: float32, float64 or bfloat16.")]
ReferenceDtype = Annotated[
    str | None,
    typer.Option(
        "--reference-dtype",
        help="dtype of the one-device reference (default: --dtype); float64 gives a near-exact reference.",
        show_default=False,
    ),
]
Rtol = Annotated[
    float | None,
    typer.Option(
        "--rtol", help="Relative tolerance (default by dtype: float64 1e-7, float32 1e-4).", show_default=False
    ),
]
Atol = Annotated[
    float | None,
    typer.Option(
        "--atol",
        help="Absolute tolerance, for tensors smaller than atol/rtol (default by dtype: float64 1e-7, float32 1e-4).",
        show_default=False,
    ),
]
