"""Sharding of nested inputs and joining of nested outputs."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch

from syncbn.parallel.scatter_gather import gather, scatter, scatter_arguments
from syncbn.shards import join_batch as join

CPU = torch.device("cpu")
Pair = namedtuple("Pair", "a b")


def test_balanced_shards_and_empty_replicas():
    shards = scatter(torch.arange(10), [CPU] * 4)
    assert [s.tolist() for s in shards] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    shards = scatter(torch.arange(2), [CPU] * 4)
    assert [s.numel() for s in shards] == [1, 1, 0, 0]


def test_nested_containers_are_split_and_other_objects_shared():
    marker = object()
    inputs = {"x": torch.arange(4), "pair": Pair(torch.arange(4) * 2, [torch.arange(4), "tag"]), "obj": marker}
    a, b = scatter(inputs, [CPU, CPU])
    assert a["x"].tolist() == [0, 1] and b["x"].tolist() == [2, 3]
    assert isinstance(a["pair"], Pair) and b["pair"].a.tolist() == [4, 6]
    assert b["pair"].b[0].tolist() == [2, 3] and b["pair"].b[1] == "tag"
    assert a["obj"] is marker and b["obj"] is marker


def test_scatter_arguments_without_inputs():
    args, kwargs = scatter_arguments((), {}, [CPU] * 3)
    assert args == [(), (), ()] and kwargs == [{}, {}, {}]


def test_scatter_keeps_channels_last():
    x = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    for shard in scatter(x, [CPU] * 3):
        assert shard.is_contiguous(memory_format=torch.channels_last)


def test_gather_concatenates_nested_outputs_and_stacks_scalars():
    outs = [
        {"y": torch.zeros(2, 1), "loss": torch.tensor(1.0), "p": Pair(torch.ones(1), 7)},
        {"y": torch.ones(1, 1), "loss": torch.tensor(2.0), "p": Pair(torch.zeros(1), 7)},
    ]
    joined = gather(outs, CPU)
    assert joined["y"].flatten().tolist() == [0.0, 0.0, 1.0]
    assert joined["loss"].tolist() == [1.0, 2.0]
    assert joined["p"].a.tolist() == [1.0, 0.0] and joined["p"].b == 7


def test_gather_is_differentiable():
    x = torch.randn(5, 2, requires_grad=True)
    gather([s * 2 for s in scatter(x, [CPU] * 3)], CPU).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("sizes", [[3, 3, 2], [2, 0, 1], [0, 5]])
def test_join_of_the_shards_of_one_batch_is_that_batch_without_a_copy(sizes, memory_format):
    batch = torch.randn(sum(sizes), 3, 4, 2).contiguous(memory_format=memory_format)
    joined = join(list(batch.split(sizes)))
    assert joined is batch


def test_join_copies_when_the_parts_are_not_one_batch_in_order():
    batch = torch.randn(6, 3)
    first, second, third = batch.split([2, 2, 2])
    for parts in ([second, first, third], [first, third], [first, second], [first, second.clone(), third]):
        joined = join(parts)
        assert joined is not batch and torch.equal(joined, torch.cat(parts))
    narrow = torch.randn(6, 4)[:, :3]  # slices of a view tile its root's storage, not the view
    assert torch.equal(join(list(narrow.split([3, 3]))), narrow)


def test_join_along_another_dimension():
    batch = torch.randn(2, 6)
    assert join(list(batch.split([4, 2], dim=1)), dim=1) is batch
    assert join(list(batch.split([4, 2], dim=1)), dim=-1) is batch
    assert torch.equal(join([batch[:, :2], batch[:, 4:]], dim=1), torch.cat([batch[:, :2], batch[:, 4:]], dim=1))


def test_join_without_a_copy_is_differentiable_like_cat():
    leaf = torch.randn(5, 3, requires_grad=True)
    parts = list((leaf * 2).split([2, 3]))
    cotangent = torch.randn(5, 3)
    join(parts).backward(cotangent)
    assert torch.equal(leaf.grad, 2 * cotangent)
