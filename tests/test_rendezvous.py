"""A replica that fails, skips a layer or stalls must never hang its peers; one that computes is never given up on."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
from torch import nn

import syncbn
from syncbn.comm.rendezvous import Rendezvous as ReplicaGroup
from syncbn.parallel.replica_threads import ReplicaThreads
from syncbn.parallel.thread_modes import ThreadModes


def run_ranks(group: ReplicaGroup, body) -> dict[int, object]:
    """Run body(rank) for every rank of group in threads; return each rank's result or error."""
    outcomes: dict[int, object] = {}

    def work(rank: int) -> None:
        try:
            outcomes[rank] = body(rank)
        except BaseException as error:  # noqa: BLE001 - recorded for the test
            outcomes[rank] = error
            group.fail(rank, error)
        else:
            group.finish(rank)

    runner = threading.Thread(
        target=ReplicaThreads().run_replicas, args=([lambda r=r: work(r) for r in range(group.world_size)], group)
    )
    runner.start()
    runner.join(timeout=30)
    assert not runner.is_alive(), "a replica thread hung"
    return outcomes


def busy(seconds: float) -> None:
    """Compute (use the CPU) for ``seconds``, as a slow healthy forward does."""
    end = time.monotonic() + seconds
    x = torch.randn(64, 64)
    while time.monotonic() < end:
        x = torch.tanh(x @ x / 64)


def test_exchange_combines_once_in_rank_order():
    group = ReplicaGroup(3, timeout=5)
    calls = []

    def combine(values):
        calls.append(list(values))
        return tuple(values)

    outcomes = run_ranks(group, lambda rank: group.exchange(rank, "bn", rank * 10, combine))
    assert calls == [[0, 10, 20]]
    assert outcomes == {0: (0, 10, 20), 1: (0, 10, 20), 2: (0, 10, 20)}


def test_calls_of_one_layer_are_matched_by_index():
    group = ReplicaGroup(2, timeout=5)
    outcomes = run_ranks(group, lambda rank: [group.exchange(rank, "bn", (rank, i), tuple) for i in range(3)])
    assert outcomes[0] == outcomes[1] == [((0, i), (1, i)) for i in range(3)]


def test_timeout_names_layer_call_and_arrivals():
    group = ReplicaGroup(2, timeout=0.5)

    def body(rank):
        if rank == 1:
            time.sleep(3)  # blocked, not computing: the peer gives up after the timeout
        return group.exchange(rank, "layer1.bn", rank, tuple)

    start = time.monotonic()
    outcomes = run_ranks(group, body)
    assert time.monotonic() - start < 2.5  # the caller returned without the blocked replica
    assert isinstance(outcomes[0], syncbn.SyncBNTimeoutError) and 1 not in outcomes
    message = str(outcomes[0])
    assert "layer 'layer1.bn' call 0" in message
    assert "replicas [0] of 2 arrived" in message
    assert "replica 1 has been blocked in its forward for over 0.5 s without using the CPU" in message


@pytest.mark.parametrize("where", ["before", "between", "after"])
def test_a_replica_computing_longer_than_the_timeout_is_waited_for(where):
    group = ReplicaGroup(3, timeout=0.3)

    def body(rank):
        slow = rank == 1
        if slow and where == "before":
            busy(1.0)
        first = group.exchange(rank, "bn1", rank, tuple)
        if slow and where == "between":
            busy(1.0)
        second = group.exchange(rank, "bn2", rank, tuple)
        if slow and where == "after":
            busy(1.0)
        return first, second

    outcomes = run_ranks(group, body)
    assert outcomes == {rank: ((0, 1, 2), (0, 1, 2)) for rank in range(3)}


def test_finished_peer_is_detected_without_waiting_for_timeout():
    group = ReplicaGroup(2, timeout=60)

    def body(rank):
        if rank == 0:
            return group.exchange(rank, "bn", rank, tuple)
        return "skipped"

    start = time.monotonic()
    outcomes = run_ranks(group, body)
    assert time.monotonic() - start < 5
    assert isinstance(outcomes[0], syncbn.SyncBNTimeoutError)
    assert "replica(s) [1] finished the forward without making this call" in str(outcomes[0])
    assert outcomes[1] == "skipped"


def test_replicas_waiting_at_different_layers_are_detected():
    group = ReplicaGroup(2, timeout=60)
    start = time.monotonic()
    outcomes = run_ranks(group, lambda rank: group.exchange(rank, f"bn{rank}", rank, tuple))
    assert time.monotonic() - start < 5
    for outcome in outcomes.values():
        assert isinstance(outcome, syncbn.SyncBNTimeoutError)
        assert "replica 0 at 'bn0' call 0, replica 1 at 'bn1' call 0" in str(outcome)


def test_peer_error_reaches_waiting_replicas():
    group = ReplicaGroup(3, timeout=60)

    def body(rank):
        if rank == 2:
            raise ValueError("boom")
        return group.exchange(rank, "bn", rank, tuple)

    outcomes = run_ranks(group, body)
    assert isinstance(outcomes[2], ValueError)
    for rank in (0, 1):
        assert isinstance(outcomes[rank], syncbn.SyncBNPeerError)
        assert outcomes[rank].peer_error is outcomes[2]
        assert "replica 2 raised ValueError: boom" in str(outcomes[rank])


def test_failing_combine_reaches_every_replica():
    group = ReplicaGroup(2, timeout=60)

    def combine(values):
        raise RuntimeError("merge failed")

    outcomes = run_ranks(group, lambda rank: group.exchange(rank, "bn", rank, combine))
    errors = list(outcomes.values())
    assert sum(isinstance(e, RuntimeError) and not isinstance(e, syncbn.SyncBNError) for e in errors) == 1
    assert sum(isinstance(e, syncbn.SyncBNPeerError) for e in errors) == 1


@pytest.mark.parametrize("bad", [0, -1])
def test_group_rejects_bad_arguments(bad):
    with pytest.raises(ValueError, match="world_size must be at least 1"):
        ReplicaGroup(bad)
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        ReplicaGroup(2, timeout=bad)


# --- the same failures through DataParallel ------------------------------------------------


class Misbehaving(nn.Module):
    """conv -> bn1 -> (a replica given exactly one sample misbehaves) -> bn2 -> bn3."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)
        self.bn3 = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.bn1(self.conv(x))
        odd_one = x.shape[0] == 1
        if odd_one and self.mode == "raise":
            raise ValueError("replica refused its input")
        if odd_one and self.mode == "stall":
            time.sleep(3)
        if odd_one and self.mode == "skip":
            return self.bn3(x)
        if odd_one and self.mode == "twice":
            x = self.bn2(x)
        return self.bn3(self.bn2(x))


@pytest.mark.parametrize(
    ("mode", "root_error", "text"),
    [
        ("raise", ValueError, "replica refused its input"),
        ("skip", syncbn.SyncBNTimeoutError, "every replica must call each SyncBN layer the same number of times"),
        ("twice", syncbn.SyncBNTimeoutError, "every replica must call each SyncBN layer the same number of times"),
        # blocked (sleeping) for longer than the timeout in its own thread: its peers give up
        ("stall", syncbn.SyncBNTimeoutError, "replica 3 has been blocked in its forward for over 1 s"),
    ],
)
@pytest.mark.parametrize("replicas_run_as", ["greenlets", "threads"])
def test_misbehaving_replica_fails_every_replica_then_next_forward_works(
    mode, root_error, text, replicas_run_as, statistics_way
):
    if replicas_run_as == "threads":  # as replicas on separate devices do
        statistics_way()
    elif mode == "stall":
        pytest.skip("greenlets share the caller's thread: a stalled replica stalls the forward, as on one device")
    torch.manual_seed(0)
    model = Misbehaving(mode).double()
    reference = copy.deepcopy(model)
    dp = syncbn.DataParallel(syncbn.convert_model(model), replicas=4, timeout=1)

    start = time.monotonic()
    with pytest.raises(root_error, match=text) as caught:
        dp(torch.randn(7, 3, 5, 5, dtype=torch.float64))  # shards of 2, 2, 2 and 1
    assert time.monotonic() - start < 10
    notes = "\n".join(caught.value.__notes__)
    # every replica ended in an error, none hangs or silently succeeds
    for rank in range(4):
        assert f"replica {rank}: " in notes
    assert "finished" not in notes.replace("finished the forward", "")

    # the same DataParallel then runs a correct step (shards of 2 each)
    x = torch.randn(8, 3, 5, 5, dtype=torch.float64)
    reference.train()
    torch.testing.assert_close(dp(x), reference(x), rtol=1e-10, atol=1e-12)


def test_patch_replication_callback_synchronizes_nn_data_parallel():
    from syncbn.parallel.replicate import replicate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).double()
    reference = copy.deepcopy(model)
    dp = syncbn.patch_replication_callback(nn.DataParallel(syncbn.convert_model(model)))
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    # nn.DataParallel only replicates on CUDA; drive its (patched) parallel_apply directly.
    cpu = torch.device("cpu")
    outputs = dp.parallel_apply(replicate(dp.module, [cpu, cpu]), [(x[:4],), (x[4:],)], None)
    torch.testing.assert_close(torch.cat(outputs), reference(x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dp.module[1].running_var, reference[1].running_var, rtol=1e-10, atol=1e-12)


def test_patch_replication_callback_rejects_other_modules():
    with pytest.raises(TypeError, match="expected an nn.DataParallel"):
        syncbn.patch_replication_callback(nn.Linear(2, 2))


# --- modes carried to another thread ------------------------------------------------------


def test_thread_modes_are_entered_elsewhere_and_applied_for_good():
    with torch.no_grad():
        modes = ThreadModes.capture(["cpu"])
    with modes.entered("cpu"):
        inside = torch.is_grad_enabled()
    assert torch.is_grad_enabled() and inside is False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = ThreadModes.capture(["cpu"])
    try:
        autocast.apply()
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    finally:
        ThreadModes(True, {"cpu": (False, torch.bfloat16)}).apply()
    assert not torch.is_autocast_enabled("cpu")


def test_recomputation_in_backward_says_what_to_do():
    # torch.utils.checkpoint reruns the segment in backward, after every replica ended.
    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.utils.checkpoint.checkpoint(lambda t: self.bn(self.conv(t)), x, use_reentrant=False)

    dp = syncbn.DataParallel(syncbn.convert_model(Checkpointed()), replicas=2)
    out = dp(torch.randn(4, 3, 8, 8))
    with pytest.raises(syncbn.SyncBNError, match="called after its DataParallel forward ended.*checkpoint"):
        out.sum().backward()


class SlowReplica(nn.Module):
    """One replica (the one given a single sample) computes for 1.2 s before, between or after its BN layers."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where
        self.bn1, self.bn2 = nn.BatchNorm1d(3), nn.BatchNorm1d(3)

    def forward(self, x):
        slow = x.shape[0] == 1
        if slow and self.where == "before":
            busy(1.2)
        x = self.bn1(x)
        if slow and self.where == "between":
            busy(1.2)
        x = self.bn2(x)
        if slow and self.where == "after":
            busy(1.2)
        return x


@pytest.mark.slow
@pytest.mark.parametrize("where", ["before", "between", "after"])
@pytest.mark.parametrize("replicas_run_as", ["greenlets", "threads"])
def test_data_parallel_waits_for_a_replica_computing_longer_than_the_timeout(where, replicas_run_as, statistics_way):
    if replicas_run_as == "threads":
        statistics_way()
    model = SlowReplica(where).double()
    reference = copy.deepcopy(model)
    dp = syncbn.DataParallel(syncbn.convert_model(model), replicas=3, timeout=0.5)
    x = torch.randn(5, 3, dtype=torch.float64)  # shards of 2, 2 and 1
    torch.testing.assert_close(dp(x), reference(x), rtol=1e-10, atol=1e-12)


def test_a_replica_blocked_forever_fails_the_forward_after_the_timeout_and_is_abandoned(statistics_way):
    statistics_way()  # its own thread: replicas on separate devices
    release = threading.Event()

    class Blocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x):
            x = self.bn(x)
            if x.shape[0] == 1:
                release.wait()  # blocked in user code, with no end in sight
            return x

    dp = syncbn.DataParallel(syncbn.convert_model(Blocks()), replicas=3, timeout=0.5)
    start = time.monotonic()
    try:
        with pytest.raises(syncbn.SyncBNTimeoutError, match="replica 2 has been blocked") as caught:
            dp(torch.randn(5, 3))
        assert time.monotonic() - start < 5
        assert "replica 2: still blocked in its forward; its thread was abandoned" in caught.value.__notes__
    finally:
        release.set()  # let the abandoned thread end
    torch.testing.assert_close(dp(torch.ones(6, 3)), torch.zeros(6, 3))  # the next forward works
