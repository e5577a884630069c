"""Options shared by several commands, defined once."""

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
        metavar="[SRC]",
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
        min=1,
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
