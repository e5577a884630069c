"""`syncbn revert`: turn SyncBN layers back into plain ``nn.BatchNorm`` and save the weights."""

from __future__ import annotations

import typer

import syncbn
from syncbn.inventory import batch_norm_layers
from syncbn_cli import io
from syncbn_cli.errors import BadInput
from syncbn_cli.options import Factory, Force, Json, Key, RequiredOutput, Source, TrustPickle
from syncbn_cli.render import console, layer_count, make_table, print_json

COLUMNS = ("layer", "from", "to", "features")


def revert(
    source: Source,
    output: RequiredOutput,
    factory: Factory = None,
    trust_pickle: TrustPickle = False,
    key: Key = None,
    force: Force = False,
    json_output: Json = False,
) -> None:
    """Turn SyncBN layers back into plain nn.BatchNorm and save the weights.

    OUT ending in .safetensors is written as safetensors (with metadata), anything else as a torch state dict.

    With a file from `syncbn convert`, --factory names the plain model; a pickled SyncBN model needs --trust-pickle.

    Example: syncbn revert model.syncbn.safetensors --factory sample_models.resnet:resnet_tiny -o model.pt
    """
    io.check_readable(source)
    io.check_writable(output, force=force)
    metadata = io.read_syncbn_metadata(source) if source.suffix == ".safetensors" and source.is_file() else None
    loaded = io.load_model(source, factory, trust_pickle=trust_pickle, key=key)
    before = batch_norm_layers(loaded.model)
    if not before:
        raise BadInput(f"{source} has no BatchNorm layers: nothing to revert, no file written")
    reverted = syncbn.revert_model(loaded.model)

    # A converted file loaded into the plain model holds plain layers already: what the
    # file recorded they were is what this command undoes.
    recorded = {
        layer["name"]: layer["to"]
        for layer in (metadata or {}).get("converted_layers", [])
        if isinstance(layer, dict) and {"name", "to"} <= layer.keys()
    }
    after = {layer.name: layer for layer in batch_norm_layers(reverted)}
    rows = [
        {
            "name": layer.name,
            "from": layer.kind if layer.synchronized else recorded[layer.name],
            "to": after[layer.name].kind,
            "num_features": layer.num_features,
        }
        for layer in before
        if layer.synchronized or layer.name in recorded
    ]
    if not rows:
        raise BadInput(
            f"nothing to revert: no BatchNorm layer of {source} synchronizes, nor does the file record a "
            "conversion by `syncbn convert`; no file written"
        )
    state_dict = reverted.state_dict()
    written = {
        "syncbn_version": syncbn.__version__,
        "source": source.name,
        "factory": loaded.factory,
        "model_class": io.qualified_class_name(reverted),
        "reverted_layers": [{key: row[key] for key in ("name", "from", "to")} for row in rows],
    }
    io.save_weights(state_dict, output, written, force=force)

    if json_output:
        print_json(
            {
                "source": str(source),
                "factory": loaded.factory,
                "output": str(output),
                "tensors": len(state_dict),
                "layers": rows,
            }
        )
    else:
        title = f"{layer_count(len(rows), 'BatchNorm')} reverted ({source})"
        console.print(make_table(title, COLUMNS, (list(row.values()) for row in rows)))
    typer.echo(
        f"wrote {len(state_dict)} tensors to {output}; {layer_count(len(rows))} reverted to plain BatchNorm", err=True
    )
