"""The processes way: one replica per process, statistics reduced with torch.distributed.

Any backend works (``gloo`` on CPU tensors — which ``torch.nn.SyncBatchNorm`` refuses —
``nccl`` on GPUs), on one machine or many (``torchrun``). A SyncBN layer call makes one
collective in forward (each rank's count, mean and M2, merged with Chan's formula) and
one in backward (two per-channel gradient sums); see ``syncbn._functions``.

Every collective is a **checked exchange**: one ``all_gather`` of a fixed-size frame
whose header says which layer, which call of it and which pass the rank is in. Every
rank compares all headers before using any data, so ranks that disagree (a rank skipped
a layer, called layers in another order, or called one more time) raise ``SyncBNError``
on every rank, naming both layers, the call and the ranks, instead of silently merging
two layers' statistics. The frame's size never depends on the layer, so a mismatch
between layers of different widths cannot make the backend abort on unequal buffers; a
layer wider than the frame sends the rest in a second collective, once the headers agree.

A rank that never arrives cannot hang the others forever: every collective is bounded
by the process group's timeout (``init_process_group(timeout=...)``), and a peer process
that dies closes its connections, which fails the waiting collectives at once.
"""

from __future__ import annotations

import hashlib
import os
import time
import weakref
from functools import lru_cache
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from syncbn.comm.replica_context import ReplicaContext
from syncbn.errors import SyncBNError
from syncbn.stats import BatchStatistics, merge_gathered
from syncbn.synchronized import layer_name

# Frame layout, in float64 slots. The header: a magic number, the pass, the layer's key,
# the call index, this rank's count, the data length, the name's byte length, and the
# name's first 48 bytes (6 per slot: integers below 2**48 are exact in float64).
HEADER_SLOTS = 16
# Data slots in the first, fixed-size collective: 2 * 2048 holds one call's statistics or
# gradient sums for up to 2048 channels (every layer of the common CNNs) in one round trip.
DATA_SLOTS = 4096
FRAME_SLOTS = HEADER_SLOTS + DATA_SLOTS
_MAGIC = 19_791_001.0  # marks a syncbn frame
# How long a rank polls for a CPU collective before it blocks (see wait_for).
_POLL_SECONDS = 0.005
_yield = getattr(os, "sched_yield", lambda: time.sleep(0))
# torch 2.13 renamed all_gather_into_tensor (one output tensor, no list of R tensors).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_NAME_SLOTS = 8
_NAME_BYTES = 6 * _NAME_SLOTS

# Passes (the header's second slot). The gradient of a pass's collective is the pass + 2,
# so every order of differentiation has a distinct, named pass.
FORWARD = 1  # the forward's statistics
BACKWARD = 2  # the backward's two gradient sums


def active_process_group(process_group: dist.ProcessGroup | None = None) -> dist.ProcessGroup | None:
    """The group to synchronize over: ``process_group`` or the default one, if it spans several ranks.

    Returns None when torch.distributed is unavailable or uninitialized, or the group has one rank.

    Example:
        >>> active_process_group() is None  # no process group initialized here
        True
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def process_group_of(module: nn.Module, replica: ReplicaContext | None) -> dist.ProcessGroup | None:
    """The process group ``module`` reduces over: its own or the default one, once initialized.

    A replica of ``syncbn.DataParallel`` reduces over it too (after its peers in this
    process), unless its DataParallel was made with ``across_processes=False``.

    Example:
        >>> import syncbn
        >>> process_group_of(syncbn.SyncBatchNorm2d(3), None) is None  # no torch.distributed job here
        True
    """
    if replica is not None and not replica.rendezvous.across_processes:
        return None
    return active_process_group(getattr(module, "process_group", None))


class CollectiveTag(NamedTuple):
    """Which SyncBN collective a rank is in; every rank of the group must agree on it.

    Attributes:
        layer: the layer's name for messages: its qualified name when ``convert_model``
            recorded one, else its class and width (``"SyncBatchNorm2d(64)"``).
        key: the layer's identity, a 48-bit hash of ``layer`` (the same on every rank).
        call: the index of the layer's forward call on this group (see ``layer_tag``).
    """

    layer: str
    key: int
    call: int


# Per layer (weakly) and per group: how many forward collectives completed. Kept out of
# the module so that pickling or copying a model carries no process-group state.
_forward_calls: weakref.WeakKeyDictionary[nn.Module, dict[dist.ProcessGroup, int]] = weakref.WeakKeyDictionary()
_functional_calls: dict[dist.ProcessGroup, int] = {}  # sync_batch_norm called without a layer


def layer_tag(layer: nn.Module | None, group: dist.ProcessGroup) -> CollectiveTag:
    """The tag of ``layer``'s next forward collective on ``group``.

    The call index counts the layer's forward collectives on ``group`` that completed:
    training-mode calls (with or without grad, and the recomputation of an activation
    checkpoint, which every rank makes) count; eval-mode calls, which use running
    statistics and make no collective, do not. A collective that fails (a mismatch) is
    not counted, so ranks that raised together stay in step. Backward collectives carry
    the index of the forward call they differentiate.

    Example:
        >>> import syncbn
        >>> tag = layer_tag(syncbn.SyncBatchNorm2d(8), dist.group.WORLD)  # unnamed: class and width
        >>> tag.layer, tag.call
        ('SyncBatchNorm2d(8)', 0)
    """
    name = _name_of(layer)
    calls = _functional_calls if layer is None else _forward_calls.get(layer)
    return CollectiveTag(name, _key(name), 0 if calls is None else calls.get(group, 0))


def count_call(layer: nn.Module | None, group: dist.ProcessGroup, tag: CollectiveTag) -> None:
    """Record that ``layer``'s forward collective ``tag`` completed on ``group``."""
    if layer is None:
        _functional_calls[group] = tag.call + 1
    else:
        _forward_calls.setdefault(layer, {})[group] = tag.call + 1


def _name_of(layer: nn.Module | None) -> str:
    if layer is None:
        return "sync_batch_norm"
    name = layer_name(layer)
    if name is not None:
        return name
    # Built without convert_model: class and width still tell most layers apart.
    return f"{type(layer).__name__}({getattr(layer, 'num_features', '?')})"


@lru_cache(maxsize=64)
def _zeros(size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The padding of a frame (read only): made once per size and device."""
    return torch.zeros(size, dtype=dtype, device=device)


@lru_cache(maxsize=4096)
def _key(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=6).digest(), "big")


@lru_cache(maxsize=4096)
def _name_slots(name: str) -> tuple[int, list[float]]:
    raw = name.encode()
    padded = raw[:_NAME_BYTES].ljust(_NAME_BYTES, b"\0")
    return len(raw), [float(int.from_bytes(padded[i : i + 6], "big")) for i in range(0, _NAME_BYTES, 6)]


def frame_sizes(length: int) -> list[int]:
    """The float64 values each rank sends, per collective, to exchange ``length`` values.

    Example:
        >>> frame_sizes(128), frame_sizes(2 * 3000)
        ([4112], [4112, 1904])
    """
    return [FRAME_SLOTS] + ([length - DATA_SLOTS] if length > DATA_SLOTS else [])


def all_gather_checked(
    data: Tensor, tag: CollectiveTag, kind: int, group: dist.ProcessGroup, count: int = 0
) -> tuple[list[int], Tensor]:
    """Every rank's ``data`` (1-D float64, the same length on every rank), after checking the tags.

    One ``all_gather`` of a ``FRAME_SLOTS`` frame: the header (``tag``, ``kind``,
    ``count``, the data's length) and the first ``DATA_SLOTS`` values; a longer ``data``
    sends the rest in a second collective, made only once every header agreed.

    Args:
        data: this rank's values.
        tag: the layer and call this collective belongs to.
        kind: the pass (``FORWARD``, ``BACKWARD``, or a gradient of one: pass + 2).
        group: the process group; every rank of it must call.
        count: this rank's sample count per channel, handed to every rank.

    Returns:
        Every rank's count, and a ``(world_size, len(data))`` tensor of every rank's data.

    Raises:
        SyncBNError: on every rank, when the ranks are not all in the same layer, call
            and pass (or not all in a SyncBN collective).

    Example:
        >>> # every rank of an initialized group:
        >>> # counts, rows = all_gather_checked(values, layer_tag(bn, group), FORWARD, group, n)
    """
    return PendingGather(data, tag, kind, group, count).wait()


class PendingGather:
    """A checked all_gather in flight (``all_gather_checked`` in two halves): work can overlap it.

    Example:
        >>> # pending = PendingGather(values, tag, BACKWARD, group)  # sends at once
        >>> # ...  batch-sized work that needs no global value ...
        >>> # counts, rows = pending.wait()
    """

    def __init__(
        self, data: Tensor, tag: CollectiveTag, kind: int, group: dist.ProcessGroup, count: int = 0
    ) -> None:
        self.group, self.world = group, dist.get_world_size(group)
        self.data, self.length = data, data.numel()
        name_length, name_slots = _name_slots(tag.layer)
        header = [_MAGIC, float(kind), float(tag.key), float(tag.call), float(count), float(self.length)]
        header += [float(name_length), *name_slots, 0.0]
        self.first = first = min(self.length, DATA_SLOTS)
        self.frame = frame = torch.cat(
            [data.new_tensor(header), data[:first], _zeros(DATA_SLOTS - first, data.dtype, data.device)]
        )
        self.gathered = frame.new_empty(self.world * FRAME_SLOTS)
        self.work = _all_gather_single(self.gathered, frame, group=group, async_op=True)

    def wait(self) -> tuple[list[int], Tensor]:
        """Every rank's count and data, as ``all_gather_checked`` returns them (raises as it does)."""
        wait_for(self.work, self.frame.device)
        rows = self.gathered.view(self.world, FRAME_SLOTS)
        headers = rows[:, :HEADER_SLOTS].tolist()
        # Everything but the count must be equal on every rank; every rank sees every header,
        # so all of them raise the same error together.
        if any(h[:4] != headers[0][:4] or h[5:] != headers[0][5:] for h in headers):
            raise SyncBNError(_mismatch_message(headers, self.group))
        parts = rows[:, HEADER_SLOTS : HEADER_SLOTS + self.first]
        if self.length > self.first:  # agreed on above: every rank sends the same number of values
            rest = self.frame.new_empty(self.world * (self.length - self.first))
            _all_gather_single(rest, self.data[self.first :].contiguous(), group=self.group)
            parts = torch.cat([parts, rest.view(self.world, -1)], dim=1)
        return [int(h[4]) for h in headers], parts


def all_gather_statistics(
    local: BatchStatistics, group: dist.ProcessGroup, tag: CollectiveTag | None = None
) -> BatchStatistics:
    """Merge every rank's statistics: one checked ``all_gather`` of ``[mean, m2]`` in float64.

    Every rank must call it, an empty rank included (``count == 0``), or the others wait
    until the group's timeout. Without ``tag`` the collective is checked as a call of
    ``sync_batch_norm`` itself.
    """
    tag = tag if tag is not None else layer_tag(None, group)
    counts, rows = all_gather_checked(torch.cat([local.mean, local.m2]), tag, FORWARD, group, local.count)
    channels = local.mean.numel()
    return merge_gathered(counts, rows[:, :channels], rows[:, channels:])


def all_reduce_sum(
    tensor: Tensor, group: dist.ProcessGroup, tag: CollectiveTag | None = None, kind: int = BACKWARD
) -> Tensor:
    """Sum a 1-D float64 ``tensor`` over all ranks of ``group``: a checked ``all_gather``, then a sum.

    Why not ``all_reduce``: for the few hundred numbers SyncBN exchanges, gloo's ring of
    steps is slower than one all_gather (docs/design.md), which also carries every rank's
    header. Summing in rank order gives every rank the same bits.
    """
    tag = tag if tag is not None else layer_tag(None, group)
    _, rows = all_gather_checked(tensor, tag, kind, group)
    return rows.sum(0)


def wait_for(work: dist.Work, device: torch.device) -> None:
    """Wait for a collective: on the CPU, poll for a few milliseconds (yielding) before blocking.

    A thread blocked in ``wait`` is woken late on a busy machine (docs/design.md). On a
    GPU ``wait`` only orders streams, so it is called at once.

    Example:
        >>> # wait_for(dist.all_gather_single(out, frame, async_op=True), frame.device)
    """
    if device.type == "cpu":
        deadline = time.perf_counter() + _POLL_SECONDS
        while not work.is_completed() and time.perf_counter() < deadline:
            _yield()
    work.wait()


def describe_pass(kind: int) -> str:
    """The pass a header's ``kind`` names, for messages.

    Example:
        >>> describe_pass(FORWARD), describe_pass(BACKWARD + 2)
        ('forward', 'double backward of the backward')
    """
    base = "forward" if kind % 2 == 1 else "backward"
    order = (kind - 1) // 2
    if order == 0:
        return base
    return f"{'double' if order == 1 else f'order-{order + 1}'} backward of the {base}"


def _decode_name(header: list[float]) -> str:
    length = int(header[6])
    raw = b"".join(int(v).to_bytes(6, "big") for v in header[7 : 7 + _NAME_SLOTS])[: min(length, _NAME_BYTES)]
    name = raw.decode(errors="replace")
    return name + "..." if length > _NAME_BYTES else name


def _mismatch_message(headers: list[list[float]], group: dist.ProcessGroup) -> str:
    where: dict[str, list[str]] = {}
    for rank, header in enumerate(headers):
        if header[0] != _MAGIC:
            what = "a collective that is not a SyncBN exchange"
        else:
            what = f"layer '{_decode_name(header)}' ({describe_pass(int(header[1]))}, call {int(header[3])})"
            if int(header[5]) != int(headers[0][5]) and header[:4] == headers[0][:4]:
                what += f" with {int(header[5])} values"
        where.setdefault(what, []).append(_rank_label(group, rank))
    places = "; ".join(f"{_plural(ranks)} in {what}" for what, ranks in where.items())
    return (
        f"SyncBN ranks are out of step: {places}. Every rank must call the same SyncBN layers in the same "
        "order and the same number of times (a rank that skips a layer, calls layers in another order or "
        "calls a layer once more pairs its collective with another layer's); make the control flow "
        "around SyncBN layers the same on every rank"
    )


def _rank_label(group: dist.ProcessGroup, rank: int) -> str:
    if group is dist.group.WORLD or group is None:
        return str(rank)
    try:
        return f"{rank} (global rank {dist.get_global_rank(group, rank)})"
    except (RuntimeError, ValueError):  # a group this process cannot map: its own numbering will do
        return str(rank)


def _plural(ranks: list[str]) -> str:
    return f"rank {ranks[0]} is" if len(ranks) == 1 else f"ranks {', '.join(ranks)} are"
