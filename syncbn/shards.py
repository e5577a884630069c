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

import torch
from torch import Tensor


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
    shards = list(_SplitFunction.apply(whole, tuple(sizes), dim % whole.dim()))
    for shard in shards:
        shard._syncbn_version = shard._version  # what join_batch compares with: never changed in place
    return shards


@torch.compiler.disable
def join_batch(shards: Sequence[Tensor], dim: int = 0, *, private: bool = False) -> Tensor:
    """``torch.cat(shards, dim)``, without the copy when the shards tile one tensor.

    Views that tile one tensor join to that tensor. Shards from ``split_batch`` that tile
    one storage join to a tensor over that memory when the caller only reads the result
    (``private=True``), or when nothing else can see them: no other op holds them (saved
    for its backward, or viewed) and none was changed in place, so that changing the
    join cannot change what another op saved. Their versions are saved, so changing one
    in place afterwards fails the backward, as changing a saved tensor does in torch.
    Differentiable.

    Example:
        >>> batch = torch.zeros(3, 2)
        >>> join_batch(list(batch.split([2, 1]))) is batch
        True
        >>> join_batch([torch.zeros(1, 2), torch.ones(1, 2)]).tolist()
        [[0.0, 0.0], [1.0, 1.0]]
    """
    dim = dim % shards[0].dim()
    base = shards[0]._base
    if base is not None and _views_tile(shards, base, dim):
        return base  # autograd follows views: the base's gradient is theirs, joined
    alias = _shards_tile(shards, dim) and (private or all(_unseen(shard) for shard in shards))
    return _JoinFunction.apply(dim, alias, *shards)


class _SplitFunction(torch.autograd.Function):
    """whole -> shards along ``dim``: new tensors over ``whole``'s memory, not views.

    backward: the join of the shards' gradients (zeros for a shard that got none).
    """

    @staticmethod
    def forward(ctx, whole: Tensor, sizes: tuple[int, ...], dim: int) -> tuple[Tensor, ...]:
        ctx.dim, ctx.sizes, ctx.whole = dim, sizes, (whole.shape, whole.dtype, whole.device)
        storage, stride = whole.untyped_storage(), whole.stride()
        shards, start = [], 0
        for size in sizes:
            shape = (*whole.shape[:dim], size, *whole.shape[dim + 1 :])
            offset = whole.storage_offset() + start * stride[dim]
            # set_ makes a tensor of its own (own version counter) over the same memory.
            shards.append(whole.new_empty(0).set_(storage, offset, shape, stride))
            start += size
        return tuple(shards)

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        shape, dtype, device = ctx.whole
        parts = [
            grad if grad is not None else torch.zeros(_resized(shape, ctx.dim, size), dtype=dtype, device=device)
            for grad, size in zip(grads, ctx.sizes, strict=True)
        ]
        return join_batch(parts, ctx.dim), None, None


class _JoinFunction(torch.autograd.Function):
    """shards -> their concatenation along ``dim``; over their memory when ``alias``.

    backward: the gradient split into the shards' sizes (views, no copy).
    """

    @staticmethod
    def forward(ctx, dim: int, alias: bool, *shards: Tensor) -> Tensor:
        ctx.dim, ctx.sizes, ctx.alias = dim, [shard.size(dim) for shard in shards], alias
        if alias:
            # Saved only so that autograd checks their versions in backward: the join
            # shares their memory, but not their version counters.
            ctx.save_for_backward(*shards)
            first = next(shard for shard in shards if shard.size(dim) > 0)
            shape = _resized(first.shape, dim, sum(ctx.sizes))
            return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), shape, first.stride())
        # torch.cat drops channels_last when one part is empty; empty parts add nothing.
        nonempty = [shard for shard in shards if shard.numel() > 0]
        return torch.cat(nonempty or list(shards), dim)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.alias:
            ctx.saved_tensors  # noqa: B018 - raises if a shard changed in place since the join
        return (None, None, *grad.split(ctx.sizes, ctx.dim))


def _unseen(shard: Tensor) -> bool:
    # One reference (its Python object): no op saved it as an input and no view holds it;
    # its version as made: no in-place op changed it, which is how an op saves it as output.
    return shard._version == getattr(shard, "_syncbn_version", None) and shard._use_count() == 1


def _resized(shape: torch.Size, dim: int, size: int) -> tuple[int, ...]:
    return (*shape[:dim], size, *shape[dim + 1 :])


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


def _shards_tile(shards: Sequence[Tensor], dim: int) -> bool:
    """Whether non-view ``shards`` lie back to back along ``dim`` in one storage, as ``split_batch`` made them."""
    nonempty = [shard for shard in shards if shard.size(dim) > 0]
    if not nonempty or any(shard._base is not None for shard in shards):
        return False
    first = nonempty[0]
    stride, storage = first.stride(), first.untyped_storage().data_ptr()
    if stride[dim] == 0:
        return False
    offset = first.storage_offset()
    for shard in nonempty:
        same_layout = shard.stride() == stride and shard.dtype == first.dtype and shard.device == first.device
        same_rest = shard.shape[:dim] == first.shape[:dim] and shard.shape[dim + 1 :] == first.shape[dim + 1 :]
        if not (same_layout and same_rest) or shard.untyped_storage().data_ptr() != storage:
            return False
        if shard.storage_offset() != offset:
            return False
        offset += shard.size(dim) * stride[dim]
    return True
