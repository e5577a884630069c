"""Copy a module once per replica, for one forward, sharing what must be shared.

Parameters: a replica on the master's device uses the master's ``Parameter`` objects
themselves, so gradients accumulate on them directly (virtual CPU replicas); a replica
on another device gets a differentiable copy whose gradient flows back to the master,
as with ``nn.DataParallel``.

Buffers follow ``nn.DataParallel``: replica 0 shares the master's buffers, so its
in-place updates (running statistics, counters) are kept; every other replica gets a
private copy, so no two replicas ever write the same tensor. The exception is a module
that declares ``replicas_read_buffers_only`` (``syncbn.SyncBatchNorm``, which
writes buffers in replica 0 only): on the master's device every replica reads the
master's buffers, which saves three copies per layer per replica.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn

from syncbn.synchronized import Synchronized

M = TypeVar("M", bound=nn.Module)


def replicate(module: M, devices: Sequence[torch.device]) -> list[M]:
    """One shallow copy of ``module`` per entry of ``devices`` (replica 0 first).

    Raises:
        RuntimeError: a parameter or buffer of ``module`` is not on ``devices[0]``.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> a, b = replicate(net, [torch.device("cpu")] * 2)
        >>> a[0].weight is net[0].weight, a[1].running_mean is net[1].running_mean
        (True, True)
        >>> b[1].running_mean is net[1].running_mean
        False
        >>> import syncbn
        >>> synced = syncbn.convert_model(net)  # SyncBN: replicas read the master's buffers
        >>> _, b = replicate(synced, [torch.device("cpu")] * 2)
        >>> b[1].running_mean is synced[1].running_mean
        True
    """
    modules = list(module.modules())
    for master in modules:  # here rather than in a walk of its own: every forward pays it
        _check_tensors_on(master, devices[0])
    index = {m: i for i, m in enumerate(modules)}
    replicas: list[list[nn.Module]] = [[_shallow_copy(m) for m in modules] for _ in devices]
    copies: dict[tuple[int, torch.device], Tensor] = {}

    def parameter_on(param: Tensor, device: torch.device) -> Tensor:
        if param.device == device:
            return param
        key = (id(param), device)
        if key not in copies:  # one differentiable copy per device, shared by its replicas
            copies[key] = param.to(device)
        return copies[key]

    # The dicts are written directly: nn.Module.__setattr__ costs ~5 µs a call, and a
    # forward of a big model makes thousands. Copies to another device are plain
    # tensors, not Parameters, which setattr keeps as attributes (as torch's replicate).
    for rank, (device, replica_modules) in enumerate(zip(devices, replicas, strict=False)):
        for master, replica in zip(modules, replica_modules, strict=False):
            for name, child in master._modules.items():
                replica._modules[name] = None if child is None else replica_modules[index[child]]
            for name, param in master._parameters.items():
                if param is None or param.device == device:
                    replica._parameters[name] = param
                else:
                    setattr(replica, name, parameter_on(param, device))
            # SyncBN layers of replicas 1.. never write their buffers: the master's serve.
            shared_buffers = rank == 0 or (isinstance(master, Synchronized) and master.replicas_read_buffers_only)
            for name, buf in master._buffers.items():
                if buf is None or (shared_buffers and buf.device == device):
                    continue  # shared with the master (already in the copied dict)
                if buf.requires_grad and torch.is_grad_enabled():
                    replica._buffers[name] = parameter_on(buf, device)
                else:
                    replica._buffers[name] = buf.detach().to(device, copy=True)
    return [replica_modules[0] for replica_modules in replicas]  # type: ignore[misc]


def check_replicable(module: nn.Module) -> None:
    """Refuse a module whose replicas would run the master's layers: a ``torch.compile``'d one.

    A compiled module's forward (``torch.compile(m)``, ``m.compile()``) is bound to the
    original module, so every replica would call the master's layers instead of its own.

    Raises:
        ValueError: ``module`` or one of its submodules is compiled.

    Example:
        >>> check_replicable(nn.Sequential(nn.Linear(2, 2)))
    """
    for name, sub in module.named_modules():
        if _is_compiled(sub):
            where = f"submodule '{name}'" if name else "the module"
            raise ValueError(
                f"syncbn.DataParallel cannot replicate a torch.compile'd module ({where}): its compiled "
                "forward stays bound to the original, so replicas would not synchronize; compile the "
                "DataParallel instead: torch.compile(syncbn.DataParallel(model))"
            )


def _is_compiled(module: nn.Module) -> bool:
    if module.__dict__.get("_compiled_call_impl") is not None:  # nn.Module.compile()
        return True
    # Without torch._dynamo imported, nothing can have been wrapped by torch.compile.
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    return dynamo is not None and isinstance(module, dynamo.OptimizedModule)


def _shallow_copy(module: nn.Module) -> nn.Module:
    """``module._replicate_for_data_parallel()``, without its four slow ``__setattr__`` calls
    when the module does not override it."""
    if type(module)._replicate_for_data_parallel is not nn.Module._replicate_for_data_parallel:
        return module._replicate_for_data_parallel()
    replica = module.__new__(type(module))
    state = module.__dict__.copy()
    # Parameters are filled in by replicate; buffers and children are copied dicts.
    state.update(_parameters={}, _buffers=module._buffers.copy(), _modules=module._modules.copy(), _is_replica=True)
    object.__setattr__(replica, "__dict__", state)  # nn.Module.__setattr__ would type-check it
    return replica


def check_on_device(module: nn.Module, device: torch.device) -> None:
    """Raise a clear error unless every parameter and buffer of ``module`` is on ``device``.

    Example:
        >>> check_on_device(nn.Linear(2, 2), torch.device("cpu"))
    """
    for m in module.modules():
        _check_tensors_on(m, device)


def _check_tensors_on(module: nn.Module, device: torch.device) -> None:
    for tensor in (*module._parameters.values(), *module._buffers.values()):
        if tensor is not None and tensor.device != device:
            raise RuntimeError(
                f"module must have its parameters and buffers on device {device} "
                f"(the first replica's) but found one on {tensor.device}; call module.to({str(device)!r})"
            )
