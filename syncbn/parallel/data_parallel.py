"""``DataParallel``: one process, R replicas in threads, SyncBN statistics shared.

Per forward: scatter the batch, replicate the module, bind every synchronized layer of
every replica to a fresh ``Rendezvous``, run the replicas, gather. R
replicas may be CUDA devices or R *virtual* replicas on one device (the CPU of a
laptop), which share the master's parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from syncbn.comm.rendezvous import Rendezvous
from syncbn.comm.replica_context import ReplicaContext, bind_replica
from syncbn.parallel.parallel_apply import parallel_apply
from syncbn.parallel.replicate import check_on_device, check_replicable, replicate
from syncbn.parallel.scatter_gather import gather, scatter_arguments
from syncbn.synchronized import is_synchronized


def bind_replicas(master: nn.Module, replicas: Sequence[nn.Module], rendezvous: Rendezvous) -> None:
    """Give each synchronized layer of each replica its rendezvous, its rank and its layer name."""
    names = [name for name, m in master.named_modules() if is_synchronized(m)]
    for rank, replica in enumerate(replicas):
        layers = [m for m in replica.modules() if is_synchronized(m)]
        for name, layer in zip(names, layers, strict=True):
            bind_replica(layer, ReplicaContext(rendezvous, rank, name or "<root>"))


def run_synchronized(
    module: nn.Module,
    replicas: Sequence[nn.Module],
    args: Sequence[tuple[Any, ...]],
    kwargs: Sequence[dict[str, Any]],
    devices: Sequence[torch.device],
    timeout: float,
    across_processes: bool = True,
) -> list[Any]:
    """Bind ``replicas`` (copies of ``module``) to a new rendezvous and run them."""
    rendezvous = Rendezvous(
        len(replicas), timeout, one_device=len(set(devices)) == 1, across_processes=across_processes
    )
    bind_replicas(module, replicas, rendezvous)
    return parallel_apply(replicas, args, kwargs, devices, rendezvous)


class DataParallel(nn.Module):
    r"""Data parallelism in one process with synchronized BatchNorm.

    A drop-in for ``nn.DataParallel`` in which SyncBN layers (see
    ``syncbn.convert_model``) normalize with the statistics of the whole batch. It also
    runs without a GPU: ``replicas=R`` on a CPU-only machine gives R virtual replicas that
    share the master's parameters, so gradients land on them exactly as with
    ``nn.DataParallel``.

    Args:
        module: the module to replicate; its parameters and buffers must be on the first
            replica's device.
        device_ids: CUDA devices (ints or ``torch.device``). Default: all visible CUDA
            devices for a module on CUDA, else the module's own device (the CPU).
        output_device: where outputs are gathered. Default: the first replica's device.
        dim: the batch dimension inputs are split along. Default: 0.
        replicas: number of replicas, placed round-robin on ``device_ids`` (so several
            may share one device). Default: one per device.
        timeout: seconds a replica on its own device may stay blocked in its forward
            (not computing: on a lock, a queue, a sleep or I/O) before its peers raise
            ``SyncBNTimeoutError`` and the forward fails; computing never times out.
            Replicas sharing a device run on the caller's thread, where a blocked one
            blocks the forward as it would on one device. Default: 60.
        across_processes: in a torch.distributed job, reduce over every replica of every
            process (this process's replicas first, then one collective per layer call
            over each SyncBN layer's process group, the default group unless set); False
            keeps statistics within this process's replicas. Default: True.

    Shape:
        Inputs are split into ``replicas`` shards along ``dim`` (sizes differ by at most
        one; a batch smaller than ``replicas`` leaves some shards empty); outputs are
        concatenated along ``dim``.

    Example:
        >>> import torch, syncbn
        >>> net = syncbn.convert_model(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)))
        >>> dp = syncbn.DataParallel(net, replicas=4)
        >>> dp(torch.randn(8, 3, 16, 16)).shape
        torch.Size([8, 8, 14, 14])
    """

    def __init__(
        self,
        module: nn.Module,
        device_ids: Sequence[int | torch.device] | None = None,
        output_device: int | torch.device | None = None,
        dim: int = 0,
        *,
        replicas: int | None = None,
        timeout: float = 60.0,
        across_processes: bool = True,
    ) -> None:
        super().__init__()
        if replicas is not None and (isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1):
            raise ValueError(f"replicas must be a positive integer (got {replicas!r})")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds (got {timeout!r})")
        check_replicable(module)
        self.module = module
        self.dim = dim
        self.timeout = float(timeout)
        self.across_processes = across_processes
        self.device_ids = _resolve_devices(module, device_ids)
        count = replicas if replicas is not None else len(self.device_ids)
        self.replica_devices = [self.device_ids[i % len(self.device_ids)] for i in range(count)]
        self.output_device = _as_device(output_device) if output_device is not None else self.replica_devices[0]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        devices = self.replica_devices
        if len(devices) == 1:
            check_on_device(self.module, devices[0])
            return self.module(*args, **kwargs)
        shard_args, shard_kwargs = self.scatter(args, kwargs, devices)
        replicas = self.replicate(self.module, devices)
        outputs = self.parallel_apply(replicas, shard_args, shard_kwargs)
        return self.gather(outputs, self.output_device)

    # The four steps of a forward, as in nn.DataParallel: the seams a subclass can override.

    def scatter(
        self, inputs: tuple[Any, ...], kwargs: dict[str, Any], devices: Sequence[torch.device]
    ) -> tuple[list[tuple[Any, ...]], list[dict[str, Any]]]:
        """Split positional and keyword arguments into one shard per replica (see ``scatter_gather``)."""
        return scatter_arguments(inputs, kwargs, devices, self.dim)

    def replicate(self, module: nn.Module, devices: Sequence[torch.device]) -> list[nn.Module]:
        """One copy of ``module`` per replica; checks that it is on the first replica's device."""
        return replicate(module, devices)

    def parallel_apply(
        self, replicas: Sequence[nn.Module], inputs: Sequence[tuple[Any, ...]], kwargs: Sequence[dict[str, Any]]
    ) -> list[Any]:
        """Run the replicas, their SyncBN layers bound to one new rendezvous; their outputs in order."""
        devices = self.replica_devices[: len(replicas)]
        return run_synchronized(self.module, replicas, inputs, kwargs, devices, self.timeout, self.across_processes)

    def gather(self, outputs: Sequence[Any], output_device: torch.device) -> Any:
        """Join the replicas' outputs on ``output_device`` along ``dim``."""
        return gather(outputs, output_device, self.dim)

    def extra_repr(self) -> str:
        return f"replicas={len(self.replica_devices)}, devices={[str(d) for d in self.device_ids]}"


def _as_device(device: int | str | torch.device) -> torch.device:
    if isinstance(device, int):
        return torch.device("cuda", device)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _resolve_devices(module: nn.Module, device_ids: Sequence[int | torch.device] | None) -> list[torch.device]:
    if device_ids is not None:
        devices = [_as_device(d) for d in device_ids]
        if not devices:
            raise ValueError("device_ids must name at least one device (got an empty list)")
        return devices
    # Follow the module: on CUDA, every visible GPU (as nn.DataParallel); elsewhere its
    # own device, so a CPU model gets virtual CPU replicas even on a machine with GPUs.
    device = _device_of(module)
    if device.type == "cuda":
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [device]


def _device_of(module: nn.Module) -> torch.device:
    # Replicas made by torch hold parameter copies as plain attributes, hence __dict__.
    for m in module.modules():
        for value in (*m._parameters.values(), *m._buffers.values(), *m.__dict__.values()):
            if isinstance(value, torch.Tensor):
                return value.device
    return torch.device("cpu")


def patch_replication_callback(data_parallel: nn.DataParallel) -> nn.DataParallel:
    """Make an existing ``nn.DataParallel`` synchronize the SyncBN layers of its module.

    It keeps torch's own scatter, replication and gather, and replaces only how the
    replicas run: bound to one ``Rendezvous`` (60 s timeout). Prefer
    ``syncbn.DataParallel``, which also runs on the CPU.

    Returns:
        ``data_parallel`` itself, patched.

    Example:
        >>> import torch, syncbn
        >>> net = syncbn.convert_model(torch.nn.Sequential(torch.nn.BatchNorm2d(3)))
        >>> dp = syncbn.patch_replication_callback(torch.nn.DataParallel(net))
        >>> dp(torch.randn(4, 3, 2, 2)).shape
        torch.Size([4, 3, 2, 2])
    """
    if not isinstance(data_parallel, nn.DataParallel):
        raise TypeError(f"expected an nn.DataParallel (got {type(data_parallel).__name__})")
    check_replicable(data_parallel.module)

    def synchronized_parallel_apply(replicas: Sequence[nn.Module], inputs: Sequence[Any], kwargs: Any) -> list[Any]:
        devices = [_device_of(replica) for replica in replicas]
        args = [x if isinstance(x, tuple) else (x,) for x in inputs]
        kwargs = list(kwargs) if kwargs is not None else [{} for _ in replicas]
        return run_synchronized(data_parallel.module, replicas, args, kwargs, devices, timeout=60.0)

    data_parallel.parallel_apply = synchronized_parallel_apply  # type: ignore[method-assign]
    return data_parallel
