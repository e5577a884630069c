"""An inventory of a model's BatchNorm layers: what they are and what conversion makes of them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from syncbn.convert import conversion_target
from syncbn.synchronized import is_synchronized


@dataclass(frozen=True)
class BatchNormLayer:
    """One BatchNorm layer of a model.

    Attributes:
        name: qualified name in the model (``"layer1.0.bn1"``).
        kind: its class name.
        num_features, eps, momentum, affine, bias, track_running_stats: its configuration.
        synchronized: it already synchronizes (a SyncBN or a converted subclass).
        converts_to: the class ``convert_model`` makes of it (None when nothing changes).
        problem: why it cannot be converted, if it cannot.
        frozen: a BatchNorm-like layer with fixed statistics (torchvision's or detectron2's
            ``FrozenBatchNorm2d``): not a ``_BatchNorm``, so conversion leaves it alone, and
            it has nothing to synchronize.
        eval_mode: a ``_BatchNorm`` kept in eval mode in a model that is training (frozen by
            its owner): it normalizes with running statistics and makes no collective.
    """

    name: str
    kind: str
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    bias: bool
    track_running_stats: bool
    synchronized: bool
    converts_to: str | None
    problem: str | None = None
    frozen: bool = False
    eval_mode: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def batch_norm_layers(model: nn.Module, *, frozen: bool = False) -> list[BatchNormLayer]:
    """Every BatchNorm layer of ``model`` (subclasses and SyncBN included), in module order.

    With ``frozen``, BatchNorm-like layers with fixed statistics too (``FrozenBatchNorm2d``:
    running statistics held as buffers by a module that is no ``_BatchNorm``).

    Example:
        >>> layers = batch_norm_layers(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
        >>> [(layer.name, layer.kind, layer.converts_to) for layer in layers]
        [('1', 'BatchNorm2d', 'SyncBatchNorm2d')]
    """
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, _BatchNorm):
            fixed = _frozen_layer(name, module) if frozen else None
            if fixed is not None:
                layers.append(fixed)
            continue
        try:
            target, problem = conversion_target(module), None
        except ValueError as error:
            target, problem = None, str(error)
        layers.append(
            BatchNormLayer(
                name=name or "<root>",
                kind=type(module).__name__,
                num_features=module.num_features,
                eps=module.eps,
                momentum=module.momentum,
                affine=module.affine,
                bias=module.bias is not None,
                track_running_stats=module.track_running_stats,
                synchronized=is_synchronized(module),
                converts_to=target,
                problem=problem,
                eval_mode=model.training and not module.training,
            )
        )
    return layers


def _frozen_layer(name: str, module: nn.Module) -> BatchNormLayer | None:
    """``module`` as a frozen layer if it holds running statistics as buffers (not a ``_BatchNorm``), else None."""
    buffers = dict(module.named_buffers(recurse=False))
    mean, var = buffers.get("running_mean"), buffers.get("running_var")
    if mean is None or var is None or mean.dim() != 1 or mean.shape != var.shape:
        return None
    return BatchNormLayer(
        name=name or "<root>",
        kind=type(module).__name__,
        num_features=mean.numel(),
        eps=getattr(module, "eps", float("nan")),
        momentum=None,
        affine="weight" in buffers or isinstance(getattr(module, "weight", None), nn.Parameter),
        bias="bias" in buffers or isinstance(getattr(module, "bias", None), nn.Parameter),
        track_running_stats=True,
        synchronized=False,
        converts_to=None,
        frozen=True,
    )
