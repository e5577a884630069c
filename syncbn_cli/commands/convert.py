"""`syncbn convert`: rewrite a model's BatchNorm layers as SyncBN and save the weights as safetensors."""

from __future__ import annotations

import typer

import syncbn
from syncbn.inventory import BatchNormLayer, batch_norm_layers
from syncbn_cli import io
from syncbn_cli.errors import BadInput
from syncbn_cli.options import ConvertOutput, Factory, Force, Json, Key, Source, TrustPickle
from syncbn_cli.render import console, layer_count, make_table, print_json

COLUMNS = ("layer", "from", "to", "features", "eps", "momentum", "affine", "running\nstats")


def convert(
    source: Source,
    output: ConvertOutput = None,
    factory: Factory = None,
    trust_pickle: TrustPickle = False,
    key: Key = None,
    force: Force = False,
    json_output: Json = False,
) -> None:
    """Rewrite a model's BatchNorm layers as SyncBN and save the weights as safetensors.

    The model comes from --factory plus the weights in SRC, or from SRC alone (a pickled model, --trust-pickle).

    The file keeps the state-dict keys: it loads into the plain and the converted model alike.

    Its metadata records which layers were converted, from what, and by which syncbn version.

    Example: syncbn convert model.pt --factory sample_models.resnet:resnet_tiny
    """
    io.check_readable(source)
    target = output if output is not None else io.default_output_path(source)
    if target.suffix != ".safetensors" and not target.is_dir():
        raise BadInput(f"convert writes safetensors: name the output *.safetensors (got {target})")
    io.check_writable(target, force=force)
    loaded = io.load_model(source, factory, trust_pickle=trust_pickle, key=key)
    layers = batch_norm_layers(loaded.model)
    converting = _layers_to_convert(layers, source)
    model_class = io.qualified_class_name(loaded.model)

    converted = syncbn.convert_model(loaded.model)

    state_dict = converted.state_dict()
    metadata = {
        "syncbn_version": syncbn.__version__,
        "source": source.name,
        "factory": loaded.factory,
        "model_class": model_class,
        "converted_layers": [{"name": layer.name, "from": layer.kind, "to": layer.converts_to} for layer in converting],
    }
    io.save_weights(state_dict, target, metadata, force=force)

    if json_output:
        print_json(
            {
                "source": str(source),
                "factory": loaded.factory,
                "output": str(target),
                "tensors": len(state_dict),
                "layers": [_layer_document(layer) for layer in converting],
            }
        )
    else:
        title = f"{layer_count(len(converting), 'BatchNorm')} converted ({source})"
        table = make_table(title, COLUMNS, (_layer_row(layer) for layer in converting))
        for column in table.columns[3:]:
            column.no_wrap = True  # short values: let names fold on a narrow terminal instead
        console.print(table)
    left = len(layers) - len(converting)
    if left:
        typer.echo(f"{layer_count(left)} already synchronized, left as they are", err=True)
    typer.echo(f"wrote {len(state_dict)} tensors to {target}; {layer_count(len(converting))} converted", err=True)


def _layers_to_convert(layers: list[BatchNormLayer], source: object) -> list[BatchNormLayer]:
    """The layers convert_model changes; BadInput if there are none or one cannot be converted."""
    if not layers:
        raise BadInput(f"{source} has no BatchNorm layers: nothing to convert, no file written")
    stuck = [layer for layer in layers if layer.problem]
    if stuck:
        raise BadInput(f"cannot convert layer {stuck[0].name} of {source}: {stuck[0].problem}; no file written")
    converting = [layer for layer in layers if layer.converts_to is not None]
    if not converting:
        raise BadInput(
            f"all {layer_count(len(layers), 'BatchNorm')} of {source} already synchronize: "
            "nothing to convert, no file written"
        )
    return converting


def _layer_row(layer: BatchNormLayer) -> tuple[object, ...]:
    momentum = "None" if layer.momentum is None else layer.momentum  # None: a cumulative average
    return (
        layer.name,
        layer.kind,
        layer.converts_to,
        layer.num_features,
        layer.eps,
        momentum,
        layer.affine,
        layer.track_running_stats,
    )


def _layer_document(layer: BatchNormLayer) -> dict[str, object]:
    return {
        "name": layer.name,
        "from": layer.kind,
        "to": layer.converts_to,
        "num_features": layer.num_features,
        "eps": layer.eps,
        "momentum": layer.momentum,
        "affine": layer.affine,
        "track_running_stats": layer.track_running_stats,
    }
