"""Synchronize BatchNorm subclasses whose ``forward`` does more than BatchNorm.

Model zoos ship classes such as ``BatchNormAct2d``: a ``nn.BatchNorm2d`` subclass whose
``forward`` calls ``F.batch_norm`` and then an activation. Replacing such a layer by a
plain SyncBN would silently drop the activation. Instead the instance keeps its class's
``forward`` and gets a synchronized subclass of it (``Synchronized<Name>``): while that
forward runs in a synchronized context, its call to ``torch.nn.functional.batch_norm`` on
its own parameters and buffers is routed to ``syncbn.functional.sync_batch_norm``.

The router stands in ``torch.nn.functional.batch_norm`` only while such a forward runs
(anywhere in the process); every other call it passes straight to torch's function, and
otherwise torch's own function is in place, so code that does not use syncbn never sees
it. A forward that computes batch statistics some other way would stay unsynchronized,
so that raises instead of passing silently.
"""

from __future__ import annotations

import inspect
import threading
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cache
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from syncbn.comm.distributed import process_group_of
from syncbn.comm.replica_context import ReplicaContext, replica_context
from syncbn.errors import SyncBNError
from syncbn.functional import sync_batch_norm, torch_batch_norm
from syncbn.synchronized import Synchronized, check_bound, describe, scripted_as, traced_call


@dataclass
class _ActiveLayer:
    module: nn.Module
    replica: ReplicaContext | None
    process_group: dist.ProcessGroup | None
    routed_calls: int = 0


# Per thread and per greenlet (replicas sharing a device are greenlets of one thread):
# the synchronized layers whose forward is running, innermost last.
_active_layers: ContextVar[list[_ActiveLayer] | None] = ContextVar("syncbn_active_layers", default=None)


def _layer_stack() -> list[_ActiveLayer]:
    stack = _active_layers.get()
    if stack is None:
        stack = []
        _active_layers.set(stack)
    return stack


def _routing_batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],  # noqa: UP045 - TorchScript reads these annotations
    running_var: Optional[Tensor],  # noqa: UP045
    weight: Optional[Tensor] = None,  # noqa: UP045
    bias: Optional[Tensor] = None,  # noqa: UP045
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    # Scripted while it stands in for torch's function (another thread's synchronized
    # forward): TorchScript compiles this branch, and the routing stays Python.
    if torch.jit.is_scripting():
        return torch_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return _route(input, running_mean, running_var, weight, bias, training, momentum, eps)


@torch.jit.unused
def _route(
    input: Tensor,
    running_mean: Optional[Tensor],  # noqa: UP045
    running_var: Optional[Tensor],  # noqa: UP045
    weight: Optional[Tensor],  # noqa: UP045
    bias: Optional[Tensor],  # noqa: UP045
    training: bool,
    momentum: float,
    eps: float,
) -> Tensor:
    stack = _active_layers.get() or ()
    layer = stack[-1] if stack else None
    return _route_for(layer, input, running_mean, running_var, weight, bias, training, momentum, eps)


def _route_for(
    layer: _ActiveLayer | None,
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    # Route only the layer's own call: a nested BN module has other buffers/parameters.
    if layer is not None and _is_own_call(layer.module, running_mean, weight):
        layer.routed_calls += 1
        return sync_batch_norm(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            training,
            momentum,
            eps,
            replica=layer.replica,
            process_group=layer.process_group,
            layer=layer.module,
        )
    return torch_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


class _RoutingMode(TorchFunctionMode):
    """Routes ``layer``'s own ``F.batch_norm`` call as ``_ROUTER`` does, in a way torch.compile traces.

    Dynamo cannot trace ``_ROUTER`` swapping a function of ``torch.nn.functional``, but it
    traces a torch function mode, so under torch.compile a synchronized subclass's forward
    stays in the graph (with the processes way's custom ops inside) instead of breaking it.
    """

    def __init__(self, layer: _ActiveLayer) -> None:
        super().__init__()
        self.layer = layer

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch_batch_norm:
            return _route_for(self.layer, *args, **kwargs)
        return func(*args, **kwargs)


def _is_own_call(module: nn.Module, running_mean: Tensor | None, weight: Tensor | None) -> bool:
    return (running_mean is None or running_mean is module.running_mean) and (weight is None or weight is module.weight)


class _Router:
    """Puts ``_routing_batch_norm`` in ``torch.nn.functional`` while at least one synchronized forward runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._replaced: Any = None

    def __enter__(self) -> None:
        with self._lock:
            if self._users == 0:
                self._replaced = F.batch_norm  # torch's, or whatever else stood there
                F.batch_norm = _routing_batch_norm
            self._users += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                F.batch_norm = self._replaced


_ROUTER = _Router()


class _SynchronizedSubclass(Synchronized):
    """Mixin placed before the original class: wraps its forward in batch-norm routing."""

    _syncbn_original_class: type[nn.Module]

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        # The class is made at run time, so pickle it by its original class, which
        # pickle can find by name; loading re-creates the synchronized subclass.
        return (_new_synchronized, (self._syncbn_original_class,), self.__dict__)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._synchronized_forward(*args, **kwargs)

    def _synchronized_forward(self, *args: Any, **kwargs: Any) -> Any:
        traced = traced_call(self, *args, **kwargs)  # type: ignore[arg-type]
        if traced is not None:
            return traced
        replica = replica_context(self)  # type: ignore[arg-type]
        needs_batch_statistics = self.training or self.running_mean is None  # type: ignore[attr-defined]
        if needs_batch_statistics:
            check_bound(self, replica is not None)  # type: ignore[arg-type]
        if replica is not None and replica.world_size == 1:
            replica = None
        group = process_group_of(self, replica)  # type: ignore[arg-type]
        if replica is None and group is None:
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        layer = _ActiveLayer(self, replica, group)  # type: ignore[arg-type]
        if torch.compiler.is_compiling():
            with _RoutingMode(layer):
                output = super().forward(*args, **kwargs)  # type: ignore[misc]
        else:
            output = self._routed_forward(layer, *args, **kwargs)
        if needs_batch_statistics and layer.routed_calls == 0:
            raise SyncBNError(
                f"layer {describe(self)} ({self._syncbn_original_class.__name__}) computed its output "  # type: ignore[arg-type]
                "without calling torch.nn.functional.batch_norm on its own buffers, so its statistics "
                "cannot be synchronized; revert it with syncbn.revert_model or call F.batch_norm in its forward"
            )
        return output

    def _routed_forward(self, layer: _ActiveLayer, *args: Any, **kwargs: Any) -> Any:
        stack = _layer_stack()
        stack.append(layer)
        try:
            with _ROUTER:
                return super().forward(*args, **kwargs)  # type: ignore[misc]
        finally:
            stack.pop()


class _ScriptableSynchronizedSubclass(_SynchronizedSubclass):
    """For a forward of one tensor (most BN subclasses): TorchScript compiles the original class's forward."""

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # nothing to synchronize with in TorchScript
            return self._plain_forward(input)
        return self._synchronized_one(input)

    @torch.jit.unused
    def _synchronized_one(self, input: Tensor) -> Tensor:
        return self._synchronized_forward(input)


def _new_synchronized(original_class: type[nn.Module]) -> nn.Module:
    """Unpickling helper: an empty instance of the synchronized subclass of ``original_class``."""
    cls = synchronized_class(original_class)
    return cls.__new__(cls)


@cache
def synchronized_class(cls: type[nn.Module]) -> type[nn.Module]:
    """The synchronized subclass of a BatchNorm subclass ``cls`` (made once, then cached).

    Example:
        >>> class BatchNormReLU(nn.BatchNorm2d):
        ...     def forward(self, x):
        ...         return super().forward(x).relu()
        >>> synchronized_class(BatchNormReLU).__name__
        'SynchronizedBatchNormReLU'
    """
    mixin = _ScriptableSynchronizedSubclass if _takes_one_tensor(cls.forward) else _SynchronizedSubclass
    return type(
        f"Synchronized{cls.__name__}",
        (mixin, cls),
        {
            "_syncbn_original_class": cls,
            "_plain_forward": scripted_as(cls.forward),
            "__module__": cls.__module__,
            "__doc__": cls.__doc__,
        },
    )


def _takes_one_tensor(forward: Any) -> bool:
    """Whether ``forward(self, x)`` takes exactly one argument (and no ``*args``/``**kwargs``)."""
    try:
        parameters = list(inspect.signature(forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return len(parameters) == 1 and parameters[0].kind in positional


def is_synchronized_subclass(module: nn.Module) -> bool:
    """Whether ``module``'s class was made by ``synchronized_class``."""
    return isinstance(module, _SynchronizedSubclass)
