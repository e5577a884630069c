"""The training harness of ``verify_model``: one model, one training step at a time.

A ``Trainer`` runs forward, backward with a given cotangent, and an SGD step, and returns
everything that is compared (``StepResult``): outputs, input gradient, parameter gradients,
BatchNorm buffers and every BatchNorm layer's output per call (forward hooks, per
replica). ``OneDevice`` holds the one-device models (the float64 truth, one device in the
run's dtype, the reference) and draws each step's input and cotangent.

Every step starts every model from the same state, the truth's after the previous step
rounded to the run's dtype (``OneDevice.state``), so that each step is judged on its own;
docs/design.md says why.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from syncbn.parallel.data_parallel import DataParallel
from syncbn.parallel.parallel_apply import current_replica

if TYPE_CHECKING:
    from syncbn.verify.settings import Settings

State = dict[str, Tensor]


class ModelRunError(ValueError):
    """The model could not run on one device with the verification input: nothing to compare."""


@dataclass
class StepResult:
    """What one model produced in one step (everything detached), and the cotangents it took.

    ``grad_scales``: for gradients summed over ranks, the sum over ranks of each partial
    gradient's largest magnitude (rounding the partials costs up to that; see ``Criterion``).
    """

    outputs: dict[str, Tensor]
    cotangents: dict[str, Tensor]
    input_grad: Tensor | None
    grads: dict[str, Tensor | None]
    buffers: dict[str, Tensor]
    layers: dict[tuple[str, int], Tensor]
    layer_order: list[tuple[str, int]]
    grad_scales: dict[str, float] = field(default_factory=dict)


@dataclass
class Expected:
    """What one device computed in one step: the reference, the float64 truth, one device in the run's dtype.

    The three may be one result (a float64 run has only one). ``reordered`` computes one
    device's step again, rounded another way that is just as right, on demand (see
    ``Comparer`` and ``OneDevice.step_otherwise``).
    """

    reference: StepResult
    truth: StepResult
    one_device: StepResult
    reordered: Callable[[], list[StepResult]] | None = None


Cotangents = Mapping[str, Tensor] | Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]]


class Trainer:
    """One model, its optimizer and its layer recorder; ``step`` runs one training step.

    Args:
        model: trained in place (callers pass a copy); dropout layers are put in eval mode.
        settings: the run's learning rate, devices, replicas and timeout.
        dtype: what the model and its inputs are cast to.
        parallel: run the model in ``syncbn.DataParallel`` over ``settings.replicas``.
        device: where the model runs (default: ``settings.device``).
        reduce_grads: called with the parameters after backward (ranks sum their gradients);
            returns each parameter's ``grad_scales`` entry.
    """

    def __init__(
        self,
        model: nn.Module,
        settings: Settings,
        dtype: torch.dtype,
        *,
        parallel: bool = False,
        device: torch.device | None = None,
        reduce_grads: Callable[[list[Tensor]], list[float]] | None = None,
    ) -> None:
        model.train()
        for module in model.modules():
            if isinstance(module, _DropoutNd):
                module.eval()
        self.device = device if device is not None else settings.device
        self.model = model.to(self.device, dtype)
        self.dtype = dtype
        self.reduce_grads = reduce_grads
        self.run: nn.Module = self.model
        if parallel:
            pool, replicas = settings.device_pool, settings.replicas
            self.run = DataParallel(self.model, pool, replicas=replicas, timeout=settings.timeout)
        self.parameters = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD([p for _, p in self.parameters], lr=settings.lr) if self.parameters else None
        self.recorder = LayerRecorder(self.model)

    def load_state(self, state: State) -> None:
        """Start the next step from ``state`` (values cast to this model's dtypes)."""
        self.model.load_state_dict(state)

    def step(self, x: Tensor, cotangents: Cotangents) -> StepResult:
        """Forward ``x``, backward, SGD step; return what to compare.

        ``cotangents`` are the output gradients by output name, or a function that makes
        them from the outputs.
        """
        for _, p in self.parameters:
            p.grad = None
        x = x.detach().to(self.device, self.dtype, copy=True).requires_grad_()
        outputs = flatten_outputs(self.run(x))
        layer_order, layers = self.recorder.take()
        if callable(cotangents):
            cotangents = cotangents(outputs)
        cotangents = {name: value for name, value in cotangents.items() if name in outputs}
        if cotangents:
            torch.autograd.backward(
                [outputs[name] for name in cotangents],
                [value.to(outputs[name].device, outputs[name].dtype) for name, value in cotangents.items()],
            )
        grad_scales = {}
        if self.reduce_grads is not None:
            scales = self.reduce_grads([p for _, p in self.parameters])
            grad_scales = {name: scale for (name, _), scale in zip(self.parameters, scales, strict=True)}
        grads = {name: (p.grad.detach().clone() if p.grad is not None else None) for name, p in self.parameters}
        if self.optimizer is not None:
            self.optimizer.step()
        return StepResult(
            outputs={name: out.detach() for name, out in outputs.items()},
            cotangents=cotangents,
            input_grad=x.grad.detach() if x.grad is not None else None,
            grads=grads,
            buffers={name: buffer.detach().clone() for name, buffer in batch_norm_buffers(self.model)},
            layers=layers,
            layer_order=layer_order,
            grad_scales=grad_scales,
        )


class OneDevice:
    """The one-device models of a run: the float64 truth, one device in the run's dtype, the reference.

    All three start from ``model`` rounded to the run's dtype, and every step takes an
    input and a cotangent that the run's dtype represents exactly, so the truth is the
    exact result of the computation the other models round. Models of equal dtype are one.

    Args:
        model: the unconverted model (plain BatchNorm), not changed.
        settings: the run's dtypes, batch, input shape and device.
    """

    def __init__(self, model: nn.Module, settings: Settings) -> None:
        self.settings = settings
        self.start = copy.deepcopy(model).to(settings.dtype)
        self.trainers: dict[torch.dtype, Trainer] = {}
        for dtype in (torch.float64, settings.dtype, settings.reference_dtype):
            if dtype not in self.trainers:
                self.trainers[dtype] = Trainer(copy.deepcopy(self.start), settings, dtype)
        self._state: State | None = None
        self._reversed: Trainer | None = None

    def draw_input(self, generator: torch.Generator) -> Tensor:
        """A standard normal batch in float64, rounded to the run's dtype."""
        shape = (self.settings.batch_size, *self.settings.input_shape)
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(self.settings.dtype).double()

    def step(self, x: Tensor, generator: torch.Generator, step: int) -> Expected:
        """Every one-device model's step on ``x``; the truth draws the cotangents all of them take.

        Cotangents are standard normal over the batch size, as a batch-mean loss gives,
        rounded to the run's dtype.

        Raises:
            ModelRunError: the model failed on one device, naming the input shape and step.
        """
        settings = self.settings

        def draw(outputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
            return {
                name: (torch.randn(out.shape, generator=generator, dtype=torch.float64) / max(len(x), 1))
                .to(settings.dtype)
                .double()
                for name, out in outputs.items()
                if out.requires_grad
            }

        results: dict[torch.dtype, StepResult] = {}
        try:
            truth = results[torch.float64] = self.trainers[torch.float64].step(x, draw)
            for dtype, trainer in self.trainers.items():
                if dtype != torch.float64:
                    results[dtype] = trainer.step(x, truth.cotangents)
        except Exception as error:  # noqa: BLE001 - the model's own failure, reported as bad input
            raise ModelRunError(
                f"the model failed on one device with input of shape {tuple(x.shape)} (step {step + 1}): "
                f"{describe(error)}"
            ) from error
        check_outputs(truth.outputs)
        reordered = functools.partial(self.step_otherwise, self._state, x, truth.cotangents)
        return Expected(results[settings.reference_dtype], truth, results[settings.dtype], reordered)

    def step_otherwise(self, state: State | None, x: Tensor, cotangents: Mapping[str, Tensor]) -> list[StepResult]:
        """One device's step in the run's dtype from ``state``, rounded in other ways that are just as right.

        Two: the batch taken in reverse order (sums and matrix products round differently),
        and BatchNorm computed in float64 with its output rounded once, as SyncBN's merged
        statistics do (in float16 a value that one way rounds just below zero and the other
        just above flips a ReLU, and the gradient there changes by a whole upstream value).
        """
        return [self._step_from(state, x, cotangents, reverse=True), self._step_from(state, x, cotangents)]

    def _step_from(
        self, state: State | None, x: Tensor, cotangents: Mapping[str, Tensor], *, reverse: bool = False
    ) -> StepResult:
        if self._reversed is None:
            self._reversed = Trainer(copy.deepcopy(self.start), self.settings, self.settings.dtype)
        if state is not None:
            self._reversed.load_state(state)
        if not reverse:
            with float64_batch_norm():
                return self._reversed.step(x, cotangents)
        result = self._reversed.step(x.flip(0), {name: value.flip(0) for name, value in cotangents.items()})
        return StepResult(
            outputs={name: value.flip(0) for name, value in result.outputs.items()},
            cotangents=dict(cotangents),
            input_grad=result.input_grad.flip(0) if result.input_grad is not None else None,
            grads=result.grads,
            buffers=result.buffers,
            layers={key: value.flip(0) for key, value in result.layers.items()},
            layer_order=result.layer_order,
        )

    def state(self) -> State:
        """The truth's state after its last step, rounded to the run's dtype: where the next step starts."""
        truth = self.trainers[torch.float64].model.state_dict()
        dtype = self.settings.dtype
        # Copies: the truth's own tensors change in its next step, before the candidates load them.
        return {
            name: value.to(dtype, copy=True) if value.is_floating_point() else value.clone()
            for name, value in truth.items()
        }

    def load_state(self, state: State) -> None:
        """Start the next step of every one-device model from ``state``."""
        self._state = state
        for trainer in self.trainers.values():
            trainer.load_state(state)


@contextlib.contextmanager
def float64_batch_norm() -> Iterator[None]:
    """Within the block, ``F.batch_norm`` of low-precision input computes in float64 and rounds once.

    Example:
        >>> x = torch.randn(4, 3).half()
        >>> with float64_batch_norm():
        ...     y = torch.nn.functional.batch_norm(x, None, None, training=True)
        >>> y.dtype
        torch.float16
    """
    torch_batch_norm = F.batch_norm

    def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
        if input.dtype == torch.float64:
            return torch_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        mean, var = (None if t is None else t.double() for t in (running_mean, running_var))
        w, b = (None if t is None else t.double() for t in (weight, bias))
        output = torch_batch_norm(input.double(), mean, var, w, b, training, momentum, eps)
        for buffer, updated in ((running_mean, mean), (running_var, var)):
            if buffer is not None and training:
                with torch.no_grad():
                    buffer.copy_(updated)
        return output.to(input.dtype)

    F.batch_norm = batch_norm
    try:
        yield
    finally:
        F.batch_norm = torch_batch_norm


class LayerRecorder:
    """Forward hooks on every BatchNorm layer that keep each call's output, per replica.

    The hooks are registered on the master model; replicas made by ``DataParallel``
    share its hook dicts, so they fire on every replica, and ``current_replica()`` says
    which shard an output belongs to.
    """

    def __init__(self, model: nn.Module) -> None:
        self._lock = threading.Lock()
        self._calls: dict[int, list[tuple[str, Tensor]]] = {}
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in batch_norm_modules(model)]

    def _hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            if not isinstance(output, Tensor):
                return
            rank = current_replica() or 0
            # A clone: an in-place op after the layer (ReLU(inplace=True)) would change it.
            value = output.detach().clone()
            with self._lock:
                self._calls.setdefault(rank, []).append((name, value))

        return record

    def take(self) -> tuple[list[tuple[str, int]], dict[tuple[str, int], Tensor]]:
        """The calls since the last ``take``: their order (replica 0's) and whole-batch outputs."""
        with self._lock:
            calls, self._calls = self._calls, {}
        shards: dict[tuple[str, int], list[Tensor]] = {}
        order: list[tuple[str, int]] = []
        for rank in sorted(calls):
            seen: dict[str, int] = {}
            for name, value in calls[rank]:
                key = (name, seen.get(name, 0))
                seen[name] = key[1] + 1
                if key not in shards:
                    shards[key] = []
                    order.append(key)
                shards[key].append(value)
        return order, {key: join_shards(parts) for key, parts in shards.items()}


def join_shards(parts: list[Tensor | None]) -> Tensor | None:
    """Replicas' shards of one tensor joined along the batch (empty shards skipped).

    Shards that cannot be joined (replicas disagree on shapes) give an empty NaN tensor,
    which every comparison reports as infinitely far.

    Example:
        >>> join_shards([torch.ones(2, 3), torch.zeros(0, 3), torch.ones(1, 3)]).shape
        torch.Size([3, 3])
    """
    present = [part for part in parts if part is not None]
    if not present:
        return None
    nonempty = [part for part in present if part.numel() > 0] or present
    try:
        return torch.cat([part.to(present[0].device) for part in nonempty])
    except RuntimeError:
        return torch.full((0,), float("nan"))


def check_outputs(outputs: Mapping[str, Tensor]) -> None:
    """Refuse outputs that replicas cannot split: none at all, or scalars."""
    if not outputs:
        raise ModelRunError("the model returned no tensors: verify compares tensor outputs (tuples and dicts work)")
    scalars = [name for name, out in outputs.items() if out.dim() == 0]
    if scalars:
        raise ModelRunError(
            f"the model returned a scalar ({scalars[0]}), which replicas cannot split: "
            "verify needs outputs with a batch dimension (return the logits, not the loss)"
        )


def flatten_outputs(output: Any, name: str = "output") -> dict[str, Tensor]:
    """Every tensor in a (nested) tuple, list, dict or namedtuple, by a path-like name.

    Example:
        >>> sorted(flatten_outputs({"logits": torch.zeros(1), "aux": (torch.ones(1), None)}))
        ['output[aux][0]', 'output[logits]']
    """
    if isinstance(output, Tensor):
        return {name: output}
    if isinstance(output, Mapping):
        items = output.items()
    elif isinstance(output, (tuple, list)):
        items = enumerate(output)
    else:
        return {}
    flat: dict[str, Tensor] = {}
    for key, value in items:
        flat.update(flatten_outputs(value, f"{name}[{key}]"))
    return flat


def batch_norm_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            yield name or "<root>", module


def batch_norm_buffers(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    for name, module in batch_norm_modules(model):
        for buffer_name, buffer in module._buffers.items():
            if buffer is not None:
                yield (f"{name}.{buffer_name}" if name != "<root>" else buffer_name), buffer


def describe(error: BaseException) -> str:
    """``"ValueError: message"`` on one line (torch's messages may span several)."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


@contextlib.contextmanager
def full_float32_precision() -> Iterator[None]:
    """float32 matmuls and convolutions in full float32 (no TF32) while verifying."""
    # TF32 (on by default for cuDNN convolutions) rounds float32 matmuls to 10 bits, and
    # differently for a full batch and for shards: float32 must mean float32 here.
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])
