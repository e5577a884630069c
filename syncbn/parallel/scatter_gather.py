"""Split inputs into per-replica shards and join per-replica outputs.

Like ``torch.nn.parallel.scatter_gather`` but device-agnostic (it also serves R
virtual replicas on one CPU) and with balanced shards: sizes differ by at most one,
and a batch smaller than R leaves some replicas with empty shards, which still take
part in every SyncBN rendezvous with a count of zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from syncbn.shards import join_batch, split_batch


def scatter(obj: Any, devices: Sequence[torch.device], dim: int = 0) -> list[Any]:
    """Split every tensor in ``obj`` (nested tuples, lists, dicts) into ``len(devices)`` shards.

    Tensors are split along ``dim`` into balanced shards, each a tensor of its own on its
    replica's device (in-place ops on one touch neither the others nor the caller's
    tensor); anything else is shared by reference.

    Example:
        >>> shards = scatter((torch.arange(5),), [torch.device("cpu")] * 2)
        >>> [s[0].tolist() for s in shards]
        [[0, 1, 2], [3, 4]]
    """
    if isinstance(obj, Tensor):
        sizes = shard_sizes(obj.size(dim), len(devices))
        if all(device == obj.device for device in devices):
            # One copy, then shards of their own over it: a replica may change its shard in
            # place, and the caller's tensor must not change under the replicas' saved tensors.
            return split_batch(obj.clone(memory_format=torch.preserve_format), sizes, dim)
        # Explicit sizes, not tensor_split: split's backward is one concatenation.
        shards = torch.split(obj, sizes, dim)
        return [shard.to(device, copy=True) for shard, device in zip(shards, devices, strict=True)]
    if isinstance(obj, (tuple, list)) and obj:
        per_replica = zip(*(scatter(x, devices, dim) for x in obj), strict=True)
        if hasattr(obj, "_fields"):  # namedtuple
            return [type(obj)(*parts) for parts in per_replica]
        return [type(obj)(parts) for parts in per_replica]
    if isinstance(obj, dict) and obj:
        return [type(obj)(items) for items in scatter(list(obj.items()), devices, dim)]
    return [obj for _ in devices]


def shard_sizes(total: int, parts: int) -> list[int]:
    """Balanced shard sizes: they differ by at most one, larger ones first (as tensor_split).

    Example:
        >>> shard_sizes(10, 4), shard_sizes(2, 4)
        ([3, 3, 2, 2], [1, 1, 0, 0])
    """
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def scatter_arguments(
    args: tuple[Any, ...], kwargs: dict[str, Any], devices: Sequence[torch.device], dim: int = 0
) -> tuple[list[tuple[Any, ...]], list[dict[str, Any]]]:
    """Shard positional and keyword arguments: one ``(args, kwargs)`` pair per replica.

    Example:
        >>> args, kwargs = scatter_arguments((torch.zeros(4, 2),), {}, [torch.device("cpu")] * 2)
        >>> [a[0].shape[0] for a in args], kwargs
        ([2, 2], [{}, {}])
    """
    shard_args = [tuple(a) for a in scatter(list(args), devices, dim)] if args else [() for _ in devices]
    shard_kwargs = scatter(kwargs, devices, dim) if kwargs else [{} for _ in devices]
    return shard_args, shard_kwargs


def gather(outputs: Sequence[Any], device: torch.device, dim: int = 0) -> Any:
    """Concatenate per-replica outputs (nested tuples, lists, dicts) on ``device`` along ``dim``.

    Zero-dimensional tensors (e.g. a per-replica loss) are stacked into a vector, as
    ``nn.DataParallel`` does. Non-tensor outputs are taken from the first replica.

    Example:
        >>> gather([torch.zeros(2), torch.ones(1)], torch.device("cpu")).tolist()
        [0.0, 0.0, 1.0]
    """
    first = outputs[0]
    if isinstance(first, Tensor):
        moved = [out.to(device) for out in outputs]
        if first.dim() == 0:
            return torch.stack(moved)
        return join_batch(moved, dim)
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(gather(parts, device, dim) for parts in zip(*outputs, strict=False)))
    if isinstance(first, (tuple, list)):
        return type(first)(gather(parts, device, dim) for parts in zip(*outputs, strict=False))
    if isinstance(first, dict):
        if any(set(out) != set(first) for out in outputs):
            raise ValueError("all replicas must return dicts with the same keys")
        return type(first)((key, gather([out[key] for out in outputs], device, dim)) for key in first)
    return first
