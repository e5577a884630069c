"""What every synchronized module has in common: its marker, its name, and its guards.

A module is synchronized when its class derives from ``Synchronized``: ``SyncBatchNorm``
and the synchronized subclasses ``convert_model`` makes of other BatchNorm classes.
``convert_model`` records every such layer's qualified name (``"layer1.0.bn1"``), so
that errors raised far from the model (in another process, say) can name it. Every
layer has a key, an int unique in the process (a copy gets its own), by which the
custom ops that torch.compile traces find it (``syncbn.processes_op``). Besides,
``DataParallel`` binds each replica copy to its rendezvous
(``syncbn.comm.replica_context``), and converted layers remember the class they came
from, for ``revert_model``.
"""

from __future__ import annotations

import itertools
import sys
import types
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from syncbn.comm.replica_context import current_replica
from syncbn.errors import SyncBNError

_NAME = "_syncbn_name"
LAYER_KEY_ATTRIBUTE = "_syncbn_key"
# Key -> layer, for the custom ops (which take no modules). Key 0 is no layer.
_layers: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()
_next_key = itertools.count(1)


class Synchronized:
    """Mixin of every module whose batch statistics syncbn synchronizes.

    Example:
        >>> import syncbn
        >>> isinstance(syncbn.SyncBatchNorm2d(3), Synchronized)
        True
    """

    # True where only replica 0 ever writes the module's buffers: replicas on the master's
    # device may then read the master's buffers instead of copies (syncbn.parallel.replicate).
    replicas_read_buffers_only = False

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        # A copy (copy.deepcopy, pickle) is another layer: its own key, so its own call counts.
        assign_layer_key(self)  # type: ignore[arg-type]


def is_synchronized(module: nn.Module) -> bool:
    """Whether ``module`` synchronizes batch statistics (a SyncBN or a converted BN subclass).

    Example:
        >>> import syncbn
        >>> is_synchronized(syncbn.SyncBatchNorm2d(3)), is_synchronized(nn.BatchNorm2d(3))
        (True, False)
    """
    return isinstance(module, Synchronized)


def record_layer_names(model: nn.Module) -> None:
    """Record on every synchronized layer of ``model`` its qualified name in ``model``.

    Example:
        >>> import syncbn
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 1), syncbn.SyncBatchNorm2d(4))
        >>> record_layer_names(net); layer_name(net[1])
        '1'
    """
    for name, module in model.named_modules():
        if is_synchronized(module):
            module.__dict__[_NAME] = name or "<root>"


def layer_name(module: nn.Module) -> str | None:
    """The qualified name ``record_layer_names`` gave ``module``, or None if it has none.

    Example:
        >>> import syncbn
        >>> layer_name(syncbn.SyncBatchNorm2d(3)) is None
        True
    """
    return module.__dict__.get(_NAME)


def assign_layer_key(module: nn.Module) -> int:
    """Give ``module`` a new key (see ``layer_key``) and return it.

    Example:
        >>> import syncbn
        >>> bn = syncbn.SyncBatchNorm2d(3)
        >>> layer_with_key(assign_layer_key(bn)) is bn
        True
    """
    key = next(_next_key)
    _layers[key] = module
    module.__dict__[LAYER_KEY_ATTRIBUTE] = key
    return key


def layer_key(module: nn.Module | None) -> int:
    """``module``'s key: an int unique among the process's layers (0 for None), made on first use.

    Constant for the module's lifetime, so torch.compile bakes it into a graph (and guards
    on it). ``SyncBatchNorm``, ``convert_model`` and copies assign keys up front; a layer
    made some other way gets one here (under torch.compile, once, at a graph break).

    Example:
        >>> import syncbn
        >>> bn = syncbn.SyncBatchNorm2d(3)
        >>> layer_key(bn) == layer_key(bn) > 0, layer_key(None)
        (True, 0)
    """
    if module is None:
        return 0
    key = module.__dict__.get(LAYER_KEY_ATTRIBUTE)
    return key if key is not None else _assign_eagerly(module)


# Dynamo cannot trace a WeakValueDictionary's update; eager, then guarded on the key.
_assign_eagerly = torch.compiler.disable(assign_layer_key)


def layer_with_key(key: int) -> nn.Module | None:
    """The live layer whose key is ``key`` (None for 0, or a layer gone).

    Example:
        >>> layer_with_key(0) is None
        True
    """
    return _layers.get(key) if key else None


def describe(module: nn.Module) -> str:
    """How errors name a layer: its qualified name, else its class and width.

    Example:
        >>> import syncbn
        >>> describe(syncbn.SyncBatchNorm2d(3))
        'SyncBatchNorm2d(3)'
    """
    name = layer_name(module)
    if name is not None:
        return f"'{name}'"
    return f"{type(module).__name__}({getattr(module, 'num_features', '')})"


def check_bound(module: nn.Module, bound: bool) -> None:
    """Refuse to normalize with batch statistics inside a replica when ``module`` is not bound to one.

    Inside a ``syncbn.DataParallel`` forward every synchronized layer a replica reaches
    is that replica's copy, bound to the replicas' rendezvous. A layer that is not (the
    master's own, reached through a compiled forward, a closure or an unregistered
    attribute) would normalize one replica's shard alone: wrong numbers, so an error.
    """
    if not bound and current_replica() is not None:
        raise SyncBNError(
            f"SyncBN layer {describe(module)} ran in training mode inside a syncbn.DataParallel forward "
            "without being bound to its replica, so it would use one replica's statistics only; this happens "
            "when DataParallel's replicate() cannot reach it (a torch.compile'd module: compile the "
            "DataParallel instead, torch.compile(syncbn.DataParallel(model)); a layer held in a plain "
            "attribute, list or closure: register it as a submodule)"
        )


def traced_call(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Under FX symbolic tracing, ``module``'s call as one graph node, as ``nn.BatchNorm``'s is; else None.

    FX keeps torch's own layers as calls of the module (leaves) but traces into ours;
    traced into, a SyncBN would become a plain ``F.batch_norm`` in the graph and lose its
    synchronization. As a call of the module, the graph runs the module itself.
    """
    fx = sys.modules.get("torch.fx")
    if fx is None or not args or not isinstance(args[0], fx.Proxy):
        return None
    tracer = args[0].tracer
    try:
        path = tracer.path_of_module(module)
    except NameError:
        return None
    if not path:  # the traced root itself: traced through, as torch's own layers are
        return None
    return tracer.create_proxy("call_module", path, args, kwargs)


def scripted_as(forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward``, renamed ``_plain_forward``: what TorchScript compiles for a synchronized class.

    TorchScript names a compiled method after its function, and ``forward`` is taken by
    the synchronized forward; the copy has the same code, so the same source.

    Example:
        >>> scripted_as(nn.BatchNorm2d.forward).__name__
        '_plain_forward'
    """
    copy = types.FunctionType(
        forward.__code__, forward.__globals__, "_plain_forward", forward.__defaults__, forward.__closure__
    )
    copy.__kwdefaults__ = forward.__kwdefaults__
    copy.__annotations__ = dict(forward.__annotations__)
    return copy

