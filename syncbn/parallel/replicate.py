"""Copy a module once per replica, for one forward, sharing what must be shared.

Parameters: a replica on the master's device uses the master's ``Parameter`` objects
themselves, so gradients accumulate on them directly (virtual CPU replicas); a replica
on another device gets a differentiable copy whose gradient flows back to the master,
as with ``nn.DataParallel``.

Buffers follow ``nn.DataParallel``: replica 0 shares the master's buffers, so its
in-place updates (running statistics, counters) are kept; every other replica gets a
private copy, so no two threads ever write the same tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn

M = TypeVar("M", bound=nn.Module)


def replicate(module: M, devices: Sequence[torch.device]) -> list[M]:
    """One shallow copy of ``module`` per entry of ``devices`` (replica 0 first).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> a, b = replicate(net, [torch.device("cpu")] * 2)
        >>> a[0].weight is net[0].weight, a[1].running_mean is net[1].running_mean
        (True, True)
        >>> b[1].running_mean is net[1].running_mean
        False
    """
    modules = list(module.modules())
    index = {m: i for i, m in enumerate(modules)}
    replicas: list[list[nn.Module]] = [[m._replicate_for_data_parallel() for m in modules] for _ in devices]
    copies: dict[tuple[int, torch.device], Tensor] = {}

    def parameter_on(param: Tensor, device: torch.device) -> Tensor:
        if param.device == device:
            return param
        key = (id(param), device)
        if key not in copies:  # one differentiable copy per device, shared by its replicas
            copies[key] = param.to(device)
        return copies[key]

    for rank, (device, replica_modules) in enumerate(zip(devices, replicas, strict=False)):
        for master, replica in zip(modules, replica_modules, strict=False):
            for name, child in master._modules.items():
                replica._modules[name] = None if child is None else replica_modules[index[child]]
            for name, param in master._parameters.items():
                if param is None:
                    replica._parameters[name] = None
                else:
                    setattr(replica, name, parameter_on(param, device))
            for name, buf in master._buffers.items():
                if buf is None or (rank == 0 and buf.device == device):
                    continue  # shared with the master (already in the copied dict)
                if buf.requires_grad and torch.is_grad_enabled():
                    setattr(replica, name, parameter_on(buf, device))
                else:
                    setattr(replica, name, buf.detach().to(device, copy=True))
    return [replica_modules[0] for replica_modules in replicas]  # type: ignore[misc]
