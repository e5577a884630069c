"""Synchronize BatchNorm subclasses whose ``forward`` does more than BatchNorm.

Model zoos ship classes such as ``BatchNormAct2d``: a ``nn.BatchNorm2d`` subclass whose
``forward`` calls ``F.batch_norm`` and then an activation. Replacing such a layer by a
plain SyncBN would silently drop the activation. Instead the instance keeps its class's
``forward`` and gets a synchronized subclass of it (``Synchronized<Name>``): while that
forward runs inside a replica, its call to ``torch.nn.functional.batch_norm`` on its own
parameters and buffers is routed to ``syncbn.functional.sync_batch_norm``.

The routing hook is installed into ``torch.nn.functional`` the first time such a class
is made; outside a synchronized forward it forwards straight to torch's function. A
forward that computes batch statistics some other way would stay unsynchronized, so
that raises instead of passing silently.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from syncbn.comm.distributed import active_process_group
from syncbn.comm.threads import ReplicaContext, replica_context
from syncbn.errors import SyncBNError
from syncbn.functional import sync_batch_norm, torch_batch_norm
from syncbn.synchronized import Synchronized


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
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    stack = _active_layers.get() or ()
    layer = stack[-1] if stack else None
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


def _is_own_call(module: nn.Module, running_mean: Tensor | None, weight: Tensor | None) -> bool:
    return (running_mean is None or running_mean is module.running_mean) and (weight is None or weight is module.weight)


class _SynchronizedSubclass(Synchronized):
    """Mixin placed before the original class: wraps its forward in batch-norm routing."""

    _syncbn_original_class: type[nn.Module]

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        # The class is made at run time, so pickle it by its original class, which
        # pickle can find by name; loading re-creates the synchronized subclass.
        return (_new_synchronized, (self._syncbn_original_class,), self.__dict__)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        replica = replica_context(self)  # type: ignore[arg-type]
        if replica is not None and replica.world_size == 1:
            replica = None
        group = None if replica is not None else active_process_group(getattr(self, "process_group", None))
        if replica is None and group is None:
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        layer = _ActiveLayer(self, replica, group)  # type: ignore[arg-type]
        stack = _layer_stack()
        stack.append(layer)
        try:
            output = super().forward(*args, **kwargs)  # type: ignore[misc]
        finally:
            stack.pop()
        needs_batch_statistics = self.training or self.running_mean is None  # type: ignore[attr-defined]
        if needs_batch_statistics and layer.routed_calls == 0:
            name = replica.layer if replica is not None else type(self).__name__
            raise SyncBNError(
                f"layer '{name}' ({self._syncbn_original_class.__name__}) computed its output "
                "without calling torch.nn.functional.batch_norm on its own buffers, so its statistics "
                "cannot be synchronized; revert it with syncbn.revert_model or call F.batch_norm in its forward"
            )
        return output


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
    _install_routing()
    return type(
        f"Synchronized{cls.__name__}",
        (_SynchronizedSubclass, cls),
        {"_syncbn_original_class": cls, "__module__": cls.__module__, "__doc__": cls.__doc__},
    )


def is_synchronized_subclass(module: nn.Module) -> bool:
    """Whether ``module``'s class was made by ``synchronized_class``."""
    return isinstance(module, _SynchronizedSubclass)


def _install_routing() -> None:
    if F.batch_norm is not _routing_batch_norm:
        F.batch_norm = _routing_batch_norm
