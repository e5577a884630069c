"""``convert_model`` / ``revert_model``: swap BatchNorm layers for SyncBN and back.

What a conversion keeps, and why:
- the very ``Parameter`` and buffer objects, so an optimizer built before conversion
  keeps stepping the live weights, and ``state_dict`` keys and dtypes do not change;
- ``requires_grad``, ``num_batches_tracked``, device, dtype, the train/eval flag, extra
  attributes (e.g. ``qconfig``) and hooks (the same hook dicts, so handles still work);
- the behaviour of BN subclasses whose ``forward`` adds work (an activation, say): they
  keep their class's forward and are synchronized through ``syncbn.subclass``.
"""

from __future__ import annotations

from typing import Any, TypeVar

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from syncbn.modules import SyncBatchNorm, SyncBatchNorm1d, SyncBatchNorm2d, SyncBatchNorm3d
from syncbn.parallel.data_parallel import DataParallel
from syncbn.subclass import is_synchronized_subclass, synchronized_class
from syncbn.synchronized import LAYER_KEY_ATTRIBUTE, assign_layer_key, is_synchronized, record_layer_names

M = TypeVar("M", bound=nn.Module)

# Exact classes that become a fresh SyncBN module; any other _BatchNorm subclass keeps
# its own class (and forward) through syncbn.subclass.
SYNC_CLASS_FOR: dict[type[nn.Module], type[SyncBatchNorm]] = {
    nn.BatchNorm1d: SyncBatchNorm1d,
    nn.BatchNorm2d: SyncBatchNorm2d,
    nn.BatchNorm3d: SyncBatchNorm3d,
    nn.SyncBatchNorm: SyncBatchNorm,
}
PLAIN_CLASS_FOR: dict[type[nn.Module], type[nn.Module]] = {
    SyncBatchNorm1d: nn.BatchNorm1d,
    SyncBatchNorm2d: nn.BatchNorm2d,
    SyncBatchNorm3d: nn.BatchNorm3d,
    # A dimension-agnostic SyncBN has no plain nn.BatchNormNd; torch's own
    # dimension-agnostic class is nn.SyncBatchNorm (plain BN outside a process group).
    SyncBatchNorm: nn.SyncBatchNorm,
}
# Hook dictionaries moved to the new module object (the same dicts: handles stay valid).
_HOOK_ATTRIBUTES = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
# Attributes the new module computes for itself or that converting must not carry.
_OWN_ATTRIBUTES = {"_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"}


def convert_model(module: M, *, process_group: Any = None) -> nn.Module:
    """Replace every BatchNorm layer in ``module`` by its synchronized counterpart.

    Converts ``nn.BatchNorm1d/2d/3d`` (to ``SyncBatchNorm1d/2d/3d``), ``nn.SyncBatchNorm``
    (to ``SyncBatchNorm``), and any other subclass of ``_BatchNorm`` (kept as its own
    class, synchronized). ``nn.DataParallel`` becomes ``syncbn.DataParallel`` on the same
    devices. Layers are changed in place in their parents; the (possibly new) root is
    returned. Each synchronized layer records its qualified name, which errors name it by.

    Args:
        module: a model, a single BN layer, or an ``nn.DataParallel``.
        process_group: the torch.distributed group the converted layers synchronize
            over (the processes way); default: the default group, once initialized.

    Returns:
        The converted module. Parameters and buffers are the same objects as before.

    Example:
        >>> import torch, syncbn
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> weight = net[1].weight
        >>> net = syncbn.convert_model(net)
        >>> type(net[1]).__name__, net[1].weight is weight
        ('SyncBatchNorm2d', True)
    """
    if isinstance(module, nn.DataParallel):
        converted = convert_model(module.module, process_group=process_group)
        return DataParallel(
            converted, module.device_ids or None, getattr(module, "output_device", None), getattr(module, "dim", 0)
        )
    converted = _replace_tree(module, _convert_layer, {})
    record_layer_names(converted)
    if process_group is not None:
        for layer in converted.modules():
            if is_synchronized(layer):
                layer.process_group = process_group
    return converted


def revert_model(module: M) -> nn.Module:
    """Replace every SyncBN layer in ``module`` by a plain ``nn.BatchNormNd`` (the inverse).

    ``SyncBatchNorm1d/2d/3d`` become ``nn.BatchNorm1d/2d/3d``; a converted layer goes back
    to the class it was converted from; synchronized subclasses get their original class
    back; ``syncbn.DataParallel`` becomes ``nn.DataParallel``. Parameters and buffers are
    the same objects as before.

    Example:
        >>> import torch, syncbn
        >>> net = syncbn.revert_model(torch.nn.Sequential(syncbn.SyncBatchNorm2d(8)))
        >>> type(net[0]).__name__
        'BatchNorm2d'
    """
    if isinstance(module, DataParallel):
        reverted = revert_model(module.module)
        device_ids = [d for d in module.device_ids if d.type == "cuda"]
        return nn.DataParallel(reverted, device_ids or None, dim=module.dim)
    return _replace_tree(module, _revert_layer, {})


def _replace_tree(module: nn.Module, replace_layer, memo: dict[int, nn.Module]) -> nn.Module:
    # memo keeps a layer shared by two parents shared after conversion.
    if id(module) in memo:
        return memo[id(module)]
    replaced = replace_layer(module)
    memo[id(module)] = replaced
    # _modules, not named_children(): the latter yields a child registered twice only once.
    for name, child in list(replaced._modules.items()):
        if child is not None:
            replaced._modules[name] = _replace_tree(child, replace_layer, memo)
    return replaced


def conversion_target(module: nn.Module) -> str | None:
    """The class name ``convert_model`` turns ``module`` into; None if it stays as it is.

    Raises:
        ValueError: ``module`` is a BatchNorm that cannot be converted (uninitialized lazy).

    Example:
        >>> conversion_target(nn.BatchNorm2d(3)), conversion_target(nn.ReLU())
        ('SyncBatchNorm2d', None)
    """
    if not isinstance(module, _BatchNorm) or is_synchronized(module):
        return None
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        raise ValueError(
            f"cannot convert an uninitialized {type(module).__name__}: run one forward pass first "
            "so that its number of features is known"
        )
    target = SYNC_CLASS_FOR.get(type(module))
    return target.__name__ if target is not None else f"Synchronized{type(module).__name__}"


def _convert_layer(module: nn.Module) -> nn.Module:
    if conversion_target(module) is None:
        return module
    target = SYNC_CLASS_FOR.get(type(module))
    if target is None:
        module.__class__ = synchronized_class(type(module))
        converted = module
    else:
        converted = _move_state(module, target)
        converted.__dict__["_syncbn_converted_from"] = type(module)
    assign_layer_key(converted)
    return converted


def _revert_layer(module: nn.Module) -> nn.Module:
    if is_synchronized_subclass(module):
        module.__class__ = module._syncbn_original_class
        module.__dict__.pop(LAYER_KEY_ATTRIBUTE, None)
        return module
    if not isinstance(module, SyncBatchNorm):
        return module
    target = module.__dict__.get("_syncbn_converted_from") or PLAIN_CLASS_FOR[_base_sync_class(module)]
    reverted = _move_state(module, target)
    reverted.__dict__.pop("_syncbn_converted_from", None)
    reverted.__dict__.pop(LAYER_KEY_ATTRIBUTE, None)
    if isinstance(reverted, nn.SyncBatchNorm):
        reverted.__dict__.setdefault("process_group", None)  # its forward reads it
    return reverted


def _base_sync_class(module: SyncBatchNorm) -> type[nn.Module]:
    for cls in type(module).__mro__:
        if cls in PLAIN_CLASS_FOR:
            return cls
    raise TypeError(f"no plain BatchNorm class for {type(module).__name__}")


def _move_state(source: nn.Module, target_class: type[nn.Module]) -> nn.Module:
    """A ``target_class`` instance that takes over ``source``'s state, parameters and hooks."""
    target = target_class.__new__(target_class)
    nn.Module.__init__(target)
    for key, value in source.__dict__.items():
        if key not in _OWN_ATTRIBUTES:
            target.__dict__[key] = value  # config, training flag, hooks, extra attributes
    target._parameters = dict(source._parameters)
    target._buffers = dict(source._buffers)
    target._non_persistent_buffers_set = set(source._non_persistent_buffers_set)
    target._modules = dict(source._modules)
    for key in _HOOK_ATTRIBUTES:
        if key in source.__dict__:
            target.__dict__[key] = source.__dict__[key]
    return target
