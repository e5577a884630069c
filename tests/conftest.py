"""Shared test helpers: one training step, comparisons of module state, broken SyncBN.

Helpers are fixtures (``--import-mode=importlib`` keeps ``tests/`` off ``sys.path``, so
test files cannot import this file).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
from torch import Tensor, nn

import syncbn.functional
from syncbn.comm.rendezvous import Rendezvous
from syncbn.comm.replica_context import ReplicaContext


class StepResult(NamedTuple):
    """What one forward + backward produced: the output, the input grad, the parameter grads."""

    out: Tensor
    x_grad: Tensor | None
    grads: dict[str, Tensor]


def _unwrap(model: nn.Module) -> nn.Module:
    # syncbn.DataParallel and nn.DataParallel keep the model in .module; grads land there.
    return getattr(model, "module", model)


def _run_step(model: nn.Module, x: Tensor, cotangent: Tensor | None, *args: Any, **kwargs: Any) -> StepResult:
    """Zero the grads, run ``model(x, *args, **kwargs)`` and backpropagate ``cotangent``.

    ``x`` is cloned into a fresh leaf, so the same tensor can feed several models.
    With ``cotangent=None`` no backward is run.
    """
    inner = _unwrap(model)
    inner.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(cotangent is not None and x.is_floating_point())
    out = model(x, *args, **kwargs)
    if cotangent is not None:
        out.backward(cotangent)
    grads = {name: p.grad.clone() for name, p in inner.named_parameters() if p.grad is not None}
    return StepResult(out.detach(), x.grad, grads)


def _assert_state_equal(actual: nn.Module, expected: nn.Module, **tolerance: Any) -> None:
    """Every parameter and buffer of ``actual`` equals ``expected``'s (same keys, dtypes, values).

    Floating tensors compare with ``tolerance`` (``assert_close``'s rtol/atol; exact
    when empty); integer buffers such as ``num_batches_tracked`` always exactly.
    """
    got, want = _unwrap(actual).state_dict(), _unwrap(expected).state_dict()
    assert list(got) == list(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, f"{key}: {got[key].dtype} != {want[key].dtype}"
        if not tolerance or not want[key].is_floating_point():
            assert torch.equal(got[key], want[key]), f"{key}: {got[key]} != {want[key]}"
        else:
            torch.testing.assert_close(got[key], want[key], **tolerance, msg=lambda m, key=key: f"{key}: {m}")


@pytest.fixture
def run_step() -> Callable[..., StepResult]:
    """``run_step(model, x, cotangent, *args, **kwargs) -> StepResult(out, x_grad, grads)``."""
    return _run_step


@pytest.fixture
def assert_state_equal() -> Callable[..., None]:
    """``assert_state_equal(actual, expected, **tolerance)``: parameters and buffers match."""
    return _assert_state_equal


def _use_the_statistics_way(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make virtual CPU replicas do what replicas on separate devices do: threads, merged statistics."""
    from syncbn.parallel import data_parallel, parallel_apply

    def separate_devices(world_size: int, timeout: float, *, one_device: bool, **kwargs: object) -> Rendezvous:
        return Rendezvous(world_size, timeout, one_device=False, **kwargs)

    monkeypatch.setattr(data_parallel, "Rendezvous", separate_devices)
    monkeypatch.setattr(parallel_apply, "runs_in_threads", lambda devices: True)


@pytest.fixture
def statistics_way(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """``statistics_way()``: from now on, replicas run in threads and merge statistics, as on separate devices."""
    return lambda: _use_the_statistics_way(monkeypatch)


@pytest.fixture(params=["whole-batch", "statistics"])
def in_process_way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways replicas of one process meet, on the CPU.

    "whole-batch": what replicas sharing a device do (greenlets; the last to arrive
    normalizes the joined shards at once); "statistics": what replicas on different
    devices do (threads; each normalizes its shard with merged statistics), forced here
    on the CPU.
    """
    if request.param == "statistics":
        _use_the_statistics_way(monkeypatch)
    return request.param


@pytest.fixture
def broken_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """SyncBN with synchronization skipped: every replica keeps its own statistics (both ways)."""

    def each_shard_alone(shards: list) -> list[Tensor]:
        # torch's own kernel: F.batch_norm may be routed back through SyncBN (BN subclasses).
        # Only replica 0 updates running statistics: the others may hold the master's.
        return [
            syncbn.functional.torch_batch_norm(
                s.input,
                s.running_mean if rank == 0 else None,
                s.running_var if rank == 0 else None,
                s.weight,
                s.bias,
                True,
                s.momentum,
                s.eps,
            )
            for rank, s in enumerate(shards)
        ]

    def own_statistics(replica: ReplicaContext, post):
        return syncbn.functional._Merged(post.statistics, post.weight, post.bias)

    monkeypatch.setattr(syncbn.functional, "_normalize_together", each_shard_alone)
    monkeypatch.setattr(syncbn.functional, "_exchange_statistics", own_statistics)


@pytest.fixture
def failing_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every SyncBN rendezvous raises ``RuntimeError("rendezvous lost")``."""

    def fail(self: Rendezvous, *args: object) -> object:
        raise RuntimeError("rendezvous lost")

    monkeypatch.setattr(Rendezvous, "exchange", fail)
