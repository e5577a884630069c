"""Shards of one batch as independent tensors, and their join back into one batch.

Replicas run their forwards interleaved, so a shard must behave like a tensor of its
own: an in-place op on one replica's shard (``ReLU(inplace=True)``, ``out += identity``)
must neither be refused (``torch.split`` returns views that may not be modified in
place) nor bump a version counter that another replica's saved tensors share (views of
one batch share one counter, so autograd would reject the other replicas' backward).
``split_batch`` therefore gives each shard its own tensor object and version counter
over the memory of one private tensor, with no copy; ``join_batch`` joins shards back,
without a copy when they tile one storage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class _Whole:
    """Where ``split_batch`` cut its shards from: enough to join them back over that memory.

    A dataclass, not a tuple: autograd walks tuples among a Function's arguments.
    """

    storage: torch.UntypedStorage
    offset: int
    shape: torch.Size
    stride: tuple[int, ...]
    dim: int
    sizes: tuple[int, ...]
    shapes: tuple[torch.Size, ...]  # each shard's


# Under torch.compile these run as they are: their tensors over another's memory
# (``set_``) are nothing a compiled graph can hold.
@torch.compiler.disable
def split_batch(whole: Tensor, sizes: Sequence[int], dim: int = 0) -> list[Tensor]:
    """Split ``whole`` along ``dim`` into independent shards that share its memory.

    ``whole`` must be private to the caller (freshly computed, or a copy): the shards
    alias its memory, and nothing but them may read or write it afterwards.
    Differentiable: the gradient of ``whole`` is the join of the shards' gradients.

    Example:
        >>> shards = split_batch(torch.arange(5.0), [3, 2])
        >>> shards[1].add_(10)  # in place on a shard: legal, and only that shard changes
        tensor([13., 14.])
        >>> shards[0]._base is None, shards[0].tolist()
        (True, [0.0, 1.0, 2.0])
    """
    dim = dim % whole.dim()
    shapes = tuple(_resized(whole.shape, dim, size) for size in sizes)
    source = _Whole(
        whole.untyped_storage(), whole.storage_offset(), whole.shape, whole.stride(), dim, tuple(sizes), shapes
    )
    shards = _SplitFunction.apply(whole, source)
    for index, shard in enumerate(shards):
        # What join_batch checks: cut from ``source`` at ``index``, and its version as made.
        shard._syncbn_shard = (source, index, shard._version)
    return list(shards)


@torch.compiler.disable
def join_batch(shards: Sequence[Tensor], dim: int = 0, *, private: bool = False) -> Tensor:
    """``torch.cat(shards, dim)``, without the copy when the shards tile one tensor.

    Views that tile one tensor join to that tensor. All the shards of one ``split_batch``,
    in order, join to a tensor over their memory when the caller only reads the result
    (``private=True``), or when nothing else can see them: no other op holds them (saved
    for its backward, or viewed) and none was changed in place, so that changing the join
    cannot change what another op saved. Their versions are saved, so changing one in
    place afterwards fails the backward, as changing a saved tensor does in torch.
    Differentiable.

    Example:
        >>> batch = torch.zeros(3, 2)
        >>> join_batch(list(batch.split([2, 1]))) is batch
        True
        >>> join_batch([torch.zeros(1, 2), torch.ones(1, 2)]).tolist()
        [[0.0, 0.0], [1.0, 1.0]]
    """
    dim = dim % shards[0].dim()
    mark = getattr(shards[0], "_syncbn_shard", None)
    if mark is None:
        base = shards[0]._base
        if base is not None and _views_tile(shards, base, dim):
            return base  # autograd follows views: the base's gradient is theirs, joined
        return _cat(shards, dim)
    source = mark[0]
    if source.dim == dim and _all_shards_of(source, shards) and (private or all(map(_unseen, shards))):
        return _JoinFunction.apply(source, *shards)
    return _cat(shards, dim)


def _cat(shards: Sequence[Tensor], dim: int) -> Tensor:
    # torch.cat drops channels_last when one part is empty; empty parts add nothing.
    nonempty = [shard for shard in shards if shard.numel() > 0]
    return torch.cat(nonempty or list(shards), dim)


class _SplitFunction(torch.autograd.Function):
    """whole -> shards along ``source.dim``: new tensors over ``whole``'s memory, not views.

    backward: the join of the shards' gradients (zeros for a shard that got none).
    """

    @staticmethod
    def forward(ctx, whole: Tensor, source: _Whole) -> tuple[Tensor, ...]:
        ctx.source, ctx.dtype, ctx.device = source, whole.dtype, whole.device
        shards, start = [], source.offset
        step = source.stride[source.dim]
        for size, shape in zip(source.sizes, source.shapes, strict=True):
            # set_ makes a tensor of its own (own version counter) over the same memory.
            shards.append(whole.new_empty(0).set_(source.storage, start, shape, source.stride))
            start += size * step
        return tuple(shards)

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        source = ctx.source
        parts = [
            grad if grad is not None else torch.zeros(shape, dtype=ctx.dtype, device=ctx.device)
            for grad, shape in zip(grads, source.shapes, strict=True)
        ]
        return join_batch(parts, source.dim), None


class _JoinFunction(torch.autograd.Function):
    """All the shards of one ``split_batch``, in order -> a tensor over their memory.

    backward: the gradient split into the shards' sizes (views, no copy).
    """

    @staticmethod
    def forward(ctx, source: _Whole, *shards: Tensor) -> Tensor:
        ctx.source = source
        # Saved only so that autograd checks their versions in backward: the join shares
        # their memory, but not their version counters.
        ctx.save_for_backward(*shards)
        return shards[0].new_empty(0).set_(source.storage, source.offset, source.shape, source.stride)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        ctx.saved_tensors  # noqa: B018 - raises if a shard changed in place since the join
        return (None, *grad.split(ctx.source.sizes, ctx.source.dim))


def _all_shards_of(source: _Whole, shards: Sequence[Tensor]) -> bool:
    """Whether ``shards`` are ``source``'s shards in order, still where and as large as they were cut."""
    if len(shards) != len(source.sizes):
        return False
    for index, shard in enumerate(shards):
        mark = getattr(shard, "_syncbn_shard", None)
        if mark is None or mark[0] is not source or mark[1] != index:
            return False
        # resize_ or set_ on a shard would move it: then its memory is not the whole's slice.
        if shard.stride() != source.stride or shard.shape != source.shapes[index]:
            return False
    return True


def _unseen(shard: Tensor) -> bool:
    # One reference (its Python object): no op saved it as an input and no view holds it;
    # its version as made: no in-place op changed it, which is how an op saves it as output.
    return shard._version == shard._syncbn_shard[2] and shard._use_count() == 1


def _resized(shape: torch.Size, dim: int, size: int) -> torch.Size:
    return torch.Size((*shape[:dim], size, *shape[dim + 1 :]))


def _views_tile(parts: Sequence[Tensor], base: Tensor, dim: int) -> bool:
    """Whether ``parts`` are ``base``'s consecutive slices along ``dim``, covering it all."""
    if base.dim() != parts[0].dim():
        return False
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
