"""A replica's statistics and Chan's merge against torch's own mean/var on the whole batch."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from syncbn.kernels import SMALL, batch_statistics
from syncbn.stats import BatchStatistics, _MergeFunction, merge_statistics


def reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [0, *range(2, x.dim())]
    return x.mean(dims), x.var(dims, correction=0) * (x.numel() // x.size(1))


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 6), min_size=1, max_size=8), offset=st.sampled_from([0.0, 1e4, -3e6]))
def test_merge_of_shards_equals_statistics_of_the_whole(sizes, offset):
    if sum(sizes) == 0:
        sizes = [*sizes, 1]
    torch.manual_seed(len(sizes))
    x = torch.randn(sum(sizes), 3, 2, dtype=torch.float64) * 2 + offset
    parts = [batch_statistics(shard) for shard in torch.split(x, sizes)]
    merged = merge_statistics(parts)
    mean, m2 = reference(x)
    assert merged.count == x.numel() // 3
    torch.testing.assert_close(merged.mean, mean, rtol=1e-12, atol=1e-12 * (1 + abs(offset)))
    torch.testing.assert_close(merged.m2, m2, rtol=1e-9, atol=1e-9)


def test_empty_input_gives_zero_count_and_zeros():
    stats = batch_statistics(torch.empty(0, 4, 3))
    assert stats.count == 0
    assert torch.equal(stats.mean, torch.zeros(4, dtype=torch.float64)) and torch.equal(stats.m2, stats.mean)


def test_all_empty_merge_has_zero_count():
    empty = batch_statistics(torch.empty(0, 2))
    assert merge_statistics([empty, empty]).count == 0


def test_merge_rejects_no_parts():
    with pytest.raises(ValueError, match="at least one part"):
        merge_statistics([])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_gives_full_precision_statistics(dtype):
    x = torch.randn(64, 5, 7).to(dtype)
    stats = batch_statistics(x)
    assert stats.mean.dtype == stats.m2.dtype == torch.float64
    mean, m2 = reference(x.double())
    torch.testing.assert_close(stats.mean, mean, rtol=1e-5, atol=1e-6)  # float32 passes
    torch.testing.assert_close(stats.m2, m2, rtol=1e-5, atol=1e-6)


def test_float32_offset_input_keeps_its_variance():
    # The reason for (count, mean, M2): E[x^2]-E[x]^2 in float32 loses everything here.
    torch.manual_seed(0)
    x = 1e4 + torch.randn(4096, 2)
    parts = [batch_statistics(shard) for shard in x.chunk(4)]
    var = merge_statistics(parts).m2 / x.size(0)
    expected = x.double().var(0, correction=0)
    assert (var.double() - expected).abs().max() < 1e-3
    naive = (x * x).mean(0) - x.mean(0) ** 2
    assert (naive.double() - expected).abs().max() > 1e-1


def test_merge_node_gradient_equals_autograd_through_the_formula():
    torch.manual_seed(0)
    counts = (3, 0, 5, 2)
    means = [torch.randn(4, dtype=torch.float64, requires_grad=True) for _ in counts]
    m2s = [torch.rand(4, dtype=torch.float64, requires_grad=True) for _ in counts]
    g_mean, g_m2 = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    mean, m2 = _MergeFunction.apply(counts, *means, *m2s)
    fast = torch.autograd.grad((mean * g_mean).sum() + (m2 * g_m2).sum(), [*means, *m2s])
    merged = merge_statistics([BatchStatistics(n, a, b) for n, a, b in zip(counts, means, m2s, strict=True)])
    exact = torch.autograd.grad(
        (merged.mean * g_mean).sum() + (merged.m2 * g_m2).sum(), [*means, *m2s], allow_unused=True
    )
    torch.testing.assert_close(mean, merged.mean, rtol=0, atol=0)
    for got, want, n in zip(fast, exact, counts + counts, strict=True):
        if n:  # an empty part does not enter the merge: no gradient to compare
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rows", [64, 4 * SMALL])
def test_small_and_large_paths_agree_with_float64(rows):
    torch.manual_seed(0)
    x = 1e4 + torch.randn(rows, 3)
    stats = batch_statistics(x)
    mean, m2 = reference(x.double())
    torch.testing.assert_close(stats.mean, mean, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(stats.m2, m2, rtol=1e-5, atol=1e-6)
