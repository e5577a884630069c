"""`syncbn inspect`: a model's BatchNorm layers, their configuration, and what conversion makes of each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from sample_models import DEFAULT_SAMPLE
from syncbn.inventory import BatchNormLayer, batch_norm_layers
from syncbn_cli import io
from syncbn_cli.options import Factory, Json, Key, OptionalSource, TrustPickle
from syncbn_cli.render import console, layer_count, make_table, print_json

COLUMNS = ("layer", "class", "features", "eps", "momentum", "affine", "running\nstats", "converts to")


def inspect(
    source: OptionalSource = None,
    factory: Factory = None,
    trust_pickle: TrustPickle = False,
    key: Key = None,
    json_output: Json = False,
) -> None:
    """List a model's BatchNorm layers, their configuration, and what `syncbn convert` makes of each.

    A file written by `syncbn convert` also shows what its metadata records; without --factory, only that.

    Example: syncbn inspect model.pt --factory sample_models.resnet:resnet_tiny
    """
    if source is None and factory is None:
        factory = DEFAULT_SAMPLE
        typer.echo(f"no SRC or --factory given: inspecting the bundled sample model {factory}", err=True)
    metadata = io.read_syncbn_metadata(source) if _is_safetensors(source) else None
    if metadata is not None and factory is None:
        _show(source, None, None, metadata, None, json_output)
        if not json_output:
            typer.echo("pass --factory MOD:FN to see each layer's configuration", err=True)
        return
    loaded = io.load_model(source, factory, trust_pickle=trust_pickle, key=key)
    layers = batch_norm_layers(loaded.model, frozen=True)
    _show(source, loaded.factory, io.qualified_class_name(loaded.model), metadata, layers, json_output)


def _is_safetensors(source: Path | None) -> bool:
    return source is not None and source.suffix == ".safetensors" and source.is_file()


def _show(
    source: Path | None,
    factory: str | None,
    model_class: str | None,
    metadata: dict[str, Any] | None,
    layers: list[BatchNormLayer] | None,
    json_output: bool,
) -> None:
    if json_output:
        print_json(
            {
                "source": None if source is None else str(source),
                "factory": factory,
                "model_class": model_class,
                "syncbn_metadata": metadata,
                "layers": None if layers is None else [layer.as_dict() for layer in layers],
            }
        )
        return
    if metadata is not None:
        done, recorded = _recordedlayer_count(metadata)
        console.print(_describe_metadata(source, metadata, done, recorded), markup=False, soft_wrap=True)
        if layers is None and recorded:
            rows = ((layer.get("name"), layer.get("from"), layer.get("to")) for layer in recorded)
            console.print(make_table(f"Layers {done}, as recorded in {source}", ("layer", "from", "to"), rows))
    if layers is None:
        return
    model = source if factory is None else f"{factory}" + ("" if source is None else f" with {source}")
    if not layers:
        console.print(f"{model} has no BatchNorm layers: nothing to convert", markup=False, soft_wrap=True)
        return
    table = make_table(f"BatchNorm layers of {model}", COLUMNS, (_layer_row(layer) for layer in layers))
    for column in table.columns[2:7]:
        column.no_wrap = True  # short values: let names fold on a narrow terminal instead
    console.print(table)
    console.print(_summary(layers), markup=False, soft_wrap=True)


def _recordedlayer_count(metadata: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """What ``convert`` or ``revert`` did to the file, and the layers it recorded doing it to."""
    done = "reverted" if "reverted_layers" in metadata else "converted"
    layers = metadata.get(f"{done}_layers")
    return done, [layer for layer in layers if isinstance(layer, dict)] if isinstance(layers, list) else []


def _describe_metadata(source: Path | None, metadata: dict[str, Any], done: str, layers: list[Any]) -> str:
    """One line on what syncbn recorded in ``source``."""
    version = metadata.get("syncbn_version", "?")
    origin = metadata.get("source") or "?"
    factory = metadata.get("factory")
    built = f" (model {factory})" if factory else ""
    return f"{source}: {done} by syncbn {version} from {origin}{built}; {layer_count(len(layers))} {done}"


def _layer_row(layer: BatchNormLayer) -> tuple[object, ...]:
    momentum = "None" if layer.momentum is None else layer.momentum  # None: a cumulative average
    if layer.frozen:
        momentum, outcome = "-", "stays (frozen: nothing to sync)"
    elif layer.problem:
        outcome = f"cannot: {layer.problem}"
    elif layer.converts_to is None:
        outcome = "already synchronized"
    else:
        outcome = layer.converts_to
    if layer.eval_mode:
        outcome += " (kept in eval mode: no sync)"
    return (
        layer.name,
        layer.kind,
        layer.num_features,
        layer.eps,
        momentum,
        layer.affine,
        layer.track_running_stats,
        outcome,
    )


def _summary(layers: list[BatchNormLayer]) -> str:
    frozen = sum(layer.frozen for layer in layers)
    converting = sum(layer.converts_to is not None for layer in layers)
    synchronized = sum(layer.synchronized for layer in layers)
    stuck = sum(layer.problem is not None for layer in layers)
    in_eval = sum(layer.eval_mode for layer in layers)
    parts = [layer_count(len(layers) - frozen, "BatchNorm"), f"{converting} convert"]
    if synchronized:
        parts.append(f"{synchronized} already synchronized")
    if stuck:
        parts.append(f"{stuck} cannot be converted")
    if in_eval:
        parts.append(f"{in_eval} kept in eval mode while the model trains (running statistics: no sync)")
    if frozen:
        parts.append(f"and {frozen} frozen (fixed statistics, left as they are)")
    return ", ".join(parts)
