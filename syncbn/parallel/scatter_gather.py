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


def scatter(obj: Any, devices: Sequence[torch.device], dim: int = 0) -> list[Any]:
    """Split every tensor in ``obj`` (nested tuples, lists, dicts) into ``len(devices)`` shards.

    Tensors are split along ``dim`` into balanced shards and moved to each
    replica's device (a view when the device is unchanged); anything else is shared by
    reference.

    Example:
        >>> shards = scatter((torch.arange(5),), [torch.device("cpu")] * 2)
        >>> [s[0].tolist() for s in shards]
        [[0, 1, 2], [3, 4]]
    """
    if isinstance(obj, Tensor):
        # torch.split with explicit sizes, not tensor_split: its backward is one
        # concatenation, where tensor_split's fills a full-size zero tensor per shard.
        shards = torch.split(obj, shard_sizes(obj.size(dim), len(devices)), dim)
        if all(device == obj.device for device in devices):  # virtual replicas: views as they are
            return list(shards)
        return [shard.to(device) for shard, device in zip(shards, devices, strict=True)]
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
        return join(moved, dim)
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(gather(parts, device, dim) for parts in zip(*outputs, strict=False)))
    if isinstance(first, (tuple, list)):
        return type(first)(gather(parts, device, dim) for parts in zip(*outputs, strict=False))
    if isinstance(first, dict):
        if any(set(out) != set(first) for out in outputs):
            raise ValueError("all replicas must return dicts with the same keys")
        return type(first)((key, gather([out[key] for out in outputs], device, dim)) for key in first)
    return first


def join(parts: Sequence[Tensor], dim: int = 0) -> Tensor:
    """``torch.cat(parts, dim)``, without the copy when ``parts`` are consecutive slices of one tensor.

    Shards that ``scatter`` split from one batch, and outputs a SyncBN layer split from
    its whole-batch result, are views that tile the tensor they came from: that tensor
    *is* their concatenation, in value and, since autograd follows views, in gradient.

    Example:
        >>> batch = torch.zeros(3, 2)
        >>> join(list(batch.split([2, 1]))) is batch
        True
        >>> join([torch.zeros(1, 2), torch.ones(1, 2)]).tolist()
        [[0.0, 0.0], [1.0, 1.0]]
    """
    base = parts[0]._base
    if base is not None and _tiles(parts, base, dim):
        return base
    # torch.cat drops channels_last when one part is empty; empty parts add nothing.
    nonempty = [part for part in parts if part.numel() > 0]
    return torch.cat(nonempty or list(parts), dim)


def _tiles(parts: Sequence[Tensor], base: Tensor, dim: int) -> bool:
    """Whether ``parts`` are ``base``'s consecutive slices along ``dim``, covering it all."""
    if base.dim() != parts[0].dim():
        return False
    dim = dim % base.dim()
    start = 0
    for part in parts:
        if part._base is not base or part.stride() != base.stride() or part.dtype != base.dtype:
            return False
        if part.shape[:dim] != base.shape[:dim] or part.shape[dim + 1 :] != base.shape[dim + 1 :]:
            return False
        if part.size(dim) and part.storage_offset() != base.storage_offset() + start * base.stride(dim):
            return False
        start += part.size(dim)
    return start == base.size(dim)
