"""In-place ops around SyncBN under DataParallel give the numbers of nn.BatchNorm on the full batch.

Real models change BatchNorm outputs in place (``ReLU(inplace=True)``, ``out += identity``,
in-place activations, squeeze-excitation's ``mul_``, hooks) and sometimes their input
(``x.sub_(mean)``). Each model here is trained three SGD steps as
``syncbn.DataParallel(convert_model(copy), replicas=R)`` beside the original on the full
batch, in float64, both ways replicas of one process meet.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import syncbn

EXACT = {"rtol": 1e-12, "atol": 1e-12}
REPLICAS = [1, 2, 3, 4, 8]


@pytest.fixture(autouse=True)
def _setup(in_process_way: str) -> None:
    torch.manual_seed(0)


def conv_bn(channels_in: int, channels_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False), nn.BatchNorm2d(channels_out))


class Activated(nn.Module):
    """conv-BN, an in-place op on the BN output, conv-BN again."""

    def __init__(self, inplace_op) -> None:
        super().__init__()
        self.first, self.second, self.inplace_op = conv_bn(3, 4), conv_bn(4, 4), inplace_op

    def forward(self, x):
        out = self.first(x)
        out = self.inplace_op(out)
        return self.second(out)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: ``out += identity`` on a BN output, then ``ReLU(inplace=True)``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.body, self.relu = conv_bn(3, 4), conv_bn(4, 4), nn.ReLU(inplace=True)

    def forward(self, x):
        identity = self.relu(self.stem(x))
        out = self.body(identity)
        out += identity
        return self.relu(out)


class SqueezeExcite(nn.Module):
    """MobileNetV3-style gating of a BN output with ``mul_``."""

    def __init__(self) -> None:
        super().__init__()
        self.features, self.gate = conv_bn(3, 4), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        out = F.hardswish(self.features(x), inplace=True)
        scale = F.hardsigmoid(self.gate(F.adaptive_avg_pool2d(out, 1)))
        return out.mul_(scale)


class InPlaceInput(nn.Module):
    """Normalizes its own input in place before the first layer."""

    def __init__(self) -> None:
        super().__init__()
        self.features = conv_bn(3, 4)

    def forward(self, x):
        x.sub_(0.5).mul_(2.0)
        return F.relu_(self.features(x))


class BatchNormAct2d(nn.BatchNorm2d):
    """timm-style BN subclass whose forward adds an in-place activation."""

    def forward(self, x):
        return F.silu(super().forward(x), inplace=True)


def fused() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), BatchNormAct2d(4), nn.Conv2d(4, 4, 1), BatchNormAct2d(4))


MODELS = {
    "ReLU(inplace=True)": lambda: Activated(nn.ReLU(inplace=True)),
    "F.relu_": lambda: Activated(F.relu_),
    "Hardswish(inplace=True)": lambda: Activated(nn.Hardswish(inplace=True)),
    "ReLU6(inplace=True)": lambda: Activated(nn.ReLU6(inplace=True)),
    "SiLU(inplace=True)": lambda: Activated(nn.SiLU(inplace=True)),
    "Dropout(p=0, inplace=True)": lambda: Activated(nn.Dropout(0.0, inplace=True)),
    "mul_": lambda: Activated(lambda out: out.mul_(0.5).add_(1.0)),
    "out += identity": BasicBlock,
    "squeeze-excitation": SqueezeExcite,
    "BN subclass, in-place SiLU": fused,
}


def train_side_by_side(reference: nn.Module, model: nn.Module, make_input, steps: int = 3) -> None:
    """SGD with momentum on both; outputs, leaf grads, parameter grads and buffers match at each step."""
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (reference, model)]
    for _ in range(steps):
        x, cotangent = make_input()
        results = []
        for net, optimizer in zip((reference, model), optimizers, strict=True):
            optimizer.zero_grad()
            leaf = x.clone().requires_grad_()
            out = net(leaf * 1.0)  # a non-leaf input, so the model may change it in place
            out.backward(cotangent)
            results.append((out.detach(), leaf.grad, [p.grad for p in net.parameters()]))
            optimizer.step()
        (want_out, want_x_grad, want_grads), (got_out, got_x_grad, got_grads) = results
        torch.testing.assert_close(got_out, want_out, **EXACT)
        torch.testing.assert_close(got_x_grad, want_x_grad, **EXACT)
        torch.testing.assert_close(got_grads, want_grads, **EXACT)
        unwrapped = getattr(model, "module", model)
        torch.testing.assert_close(unwrapped.state_dict(), reference.state_dict(), **EXACT)


def synchronized(reference: nn.Module, replicas: int) -> syncbn.DataParallel:
    return syncbn.DataParallel(syncbn.convert_model(copy.deepcopy(reference)), replicas=replicas)


def batches(batch: int = 8):
    return lambda: (torch.randn(batch, 3, 6, 6, dtype=torch.float64), torch.randn(batch, 4, 6, 6, dtype=torch.float64))


@pytest.mark.parametrize("replicas", REPLICAS)
@pytest.mark.parametrize("name", MODELS)
def test_inplace_op_after_syncbn(name, replicas):
    reference = MODELS[name]().double()
    make_input = batches()
    if name == "BN subclass, in-place SiLU":  # no padding: a smaller output
        make_input = lambda: (batches()()[0], torch.randn(8, 4, 4, 4, dtype=torch.float64))  # noqa: E731
    train_side_by_side(reference, synchronized(reference, replicas), make_input)


@pytest.mark.parametrize("replicas", REPLICAS)
def test_inplace_op_on_the_models_input(replicas):
    reference = InPlaceInput().double()
    train_side_by_side(reference, synchronized(reference, replicas), batches())


@pytest.mark.parametrize("replicas", [2, 3])
def test_inplace_op_on_an_input_without_grad_leaves_the_callers_tensor_alone(replicas):
    reference = InPlaceInput().double()
    model = synchronized(reference, replicas)
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64)
    before = x.clone()
    got = model(x)
    want = reference(x.clone())
    torch.testing.assert_close(got, want, **EXACT)
    got.sum().backward()  # the replicas' saved shards are theirs: no version conflict
    assert torch.equal(x, before)


@pytest.mark.parametrize("replicas", [2, 3, 4])
def test_forward_hooks_that_change_outputs_in_place(replicas):
    reference = Activated(nn.ReLU(inplace=True)).double()
    model = synchronized(reference, replicas)
    for net in (reference, model.module):
        net.first[1].register_forward_hook(lambda module, args, output: output.mul_(2.0))
        net.second.register_forward_hook(lambda module, args, output: output.add_(1.0))
    train_side_by_side(reference, model, batches())


@pytest.mark.parametrize("replicas", [2, 4])
def test_a_batch_smaller_than_replicas_with_inplace_ops(replicas):
    reference = BasicBlock().double()
    train_side_by_side(reference, synchronized(reference, replicas), batches(batch=3))


@pytest.mark.parametrize("replicas", [2, 3])
def test_channels_last_with_inplace_ops(replicas):
    reference = BasicBlock().double().to(memory_format=torch.channels_last)
    model = synchronized(reference, replicas)

    def make_input():
        x, cotangent = batches()()
        return x.contiguous(memory_format=torch.channels_last), cotangent

    train_side_by_side(reference, model, make_input)


def test_changing_a_saved_batchnorm_input_in_place_still_fails_the_backward():
    # What torch does on one device (BN saves its input), SyncBN must do on replicas too,
    # even where the replicas' inputs are joined without a copy.
    class ChangesSavedInput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            out = self.bn(x)
            x.add_(1.0)
            return out

    for net in (ChangesSavedInput().double(), synchronized(ChangesSavedInput().double(), 2)):
        out = net(torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True) * 1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


def test_unconverted_model_with_inplace_ops_does_not_match():
    # Negative control: the comparison above can fail.
    reference = BasicBlock().double()
    plain = syncbn.DataParallel(copy.deepcopy(reference), replicas=2)
    with pytest.raises(AssertionError):
        train_side_by_side(reference, plain, batches(), steps=1)


def test_gathered_output_of_a_final_batchnorm_is_not_copied_and_stays_correct():
    reference = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)).double()
    model = synchronized(reference, 3)
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64)
    out = model(x)
    out.relu_()  # the caller changes the output in place, as it could on one device
    want = reference(x).relu_()
    torch.testing.assert_close(out, want, **EXACT)
    out.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(model.module[0].weight.grad, reference[0].weight.grad, **EXACT)


class SavesItsOutput(nn.Module):
    """Returns a BN output and a product that saved it for the weight's gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(3)
        self.scale = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    def forward(self, x):
        out = self.bn(x)
        return out, out * self.scale


def test_changing_a_gathered_output_never_changes_what_an_op_saved():
    # The product saved the replicas' BN outputs; the gathered output must not share their
    # memory, or changing it would silently change the scale's gradient.
    model = synchronized(SavesItsOutput().double(), 2)
    x = torch.randn(6, 3, dtype=torch.float64)
    out, product = model(x)
    expected = out.detach().clone()
    out.add_(100.0)
    product.sum().backward()
    torch.testing.assert_close(model.module.scale.grad, expected.sum(), **EXACT)
