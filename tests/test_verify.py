"""syncbn.verify: the reference / SyncBN / unsynced comparison behind `syncbn verify`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import syncbn
from sample_models import SAMPLES
from sample_models.mixed import mixed_net
from sample_models.resnet import resnet_tiny
from syncbn.verify import Comparison, ModelRunError, Tolerance, default_tolerance, verify_model
from syncbn_cli.io import build_from_factory


def build(spec: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    model, shape = build_from_factory(spec)
    return model, shape


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_sample_passes_and_unsynced_is_worse(name: str, dtype: str) -> None:
    model, shape = build(SAMPLES[name])
    for replicas in (2, 3, 4):
        report = verify_model(model, shape, replicas=replicas, dtype=dtype, device="cpu")
        assert report.passed, (replicas, [c for c in (*report.checks, *report.layers) if not c.passed])
        assert report.unsynced.error is None
        assert report.unsynced.max_rel_err > 100 * report.synced.max_rel_err
        assert not report.unsynced.passed


def test_checks_cover_outputs_grads_buffers_and_every_layer_call() -> None:
    model = mixed_net()
    report = verify_model(model, (3, 16, 16), replicas=2, device="cpu")
    names = [c.name for c in report.checks]
    assert names[:2] == ["output", "input_grad"]
    assert {f"grad/{n}" for n, _ in model.named_parameters()} <= set(names)
    buffers = {f"buffer/{n}" for n, _ in model.named_buffers()}
    assert buffers == {n for n in names if n.startswith("buffer/")}
    assert len(names) == 2 + len(list(model.parameters())) + len(buffers)
    # Forward order, one entry per call: shared_bn runs twice.
    assert [c.name for c in report.layers] == [
        "stem_bn",
        "bn_act",
        "shared_bn (call 1)",
        "shared_bn (call 2)",
        "cumulative_bn",
        "plain_bn",
        "no_bias_bn",
        "head_bn",
    ]
    assert [(c.layer, c.call) for c in report.layers][2:4] == [("shared_bn", 0), ("shared_bn", 1)]
    assert [c.name for c in report.unsynced.checks] == names
    counts = [c for c in report.checks if c.name.endswith("num_batches_tracked")]
    assert all(c.tolerance == 0 and c.max_abs_err == 0 for c in counts)


def test_broken_sync_fails_at_the_first_batch_norm_layer(broken_sync: None) -> None:
    model, shape = build(SAMPLES["resnet_tiny"])
    report = verify_model(model, shape, replicas=4, device="cpu")
    assert not report.passed
    assert report.first_diverging_layer is not None and report.first_diverging_layer.name == "stem.1"
    assert report.first_failure is report.first_diverging_layer
    assert report.as_dict()["first_diverging_layer"] == "stem.1"
    # Unsynchronized SyncBN is exactly plain per-replica BN.
    assert report.synced.max_rel_err == pytest.approx(report.unsynced.max_rel_err, rel=1e-3)


def test_a_failing_sync_batch_norm_is_reported_not_raised(failing_sync: None) -> None:
    report = verify_model(mixed_net(), (3, 16, 16), replicas=2, steps=2, device="cpu")
    assert not report.passed
    assert report.synced.error == "RuntimeError: rendezvous lost"
    assert report.unsynced.error is None and report.unsynced.checks
    assert report.as_dict()["error"] == "RuntimeError: rendezvous lost"


def test_the_model_is_left_untouched() -> None:
    model = resnet_tiny().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    verify_model(model, (3, 32, 32), replicas=2, steps=2, device="cpu")
    assert not model.training
    assert all(isinstance(m, nn.BatchNorm2d) for m in model.modules() if "BatchNorm" in type(m).__name__)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_several_steps_and_a_float64_reference() -> None:
    report = verify_model(mixed_net(), (3, 16, 16), replicas=3, steps=3, reference_dtype="float64", device="cpu")
    assert report.passed
    assert (report.dtype, report.reference_dtype, report.steps) == ("float32", "float64", 3)
    assert (report.rtol, report.atol) == (1e-4, 1e-4)  # the less precise dtype decides


def test_float64_is_exact_to_rounding() -> None:
    report = verify_model(mixed_net(), (3, 16, 16), replicas=4, dtype="float64", device="cpu")
    assert report.passed and report.synced.max_rel_err < 1e-12


class DictOutput(nn.Module):
    """Returns nested containers: a dict holding a tensor and a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> dict[str, object]:
        features = self.body(x)
        pooled = features.mean((2, 3))
        return {"logits": self.head(pooled), "aux": (features, None)}


def test_tuple_and_dict_outputs_are_flattened() -> None:
    report = verify_model(DictOutput(), (3, 6, 6), replicas=2, device="cpu")
    assert report.passed
    assert [c.name for c in report.checks[:3]] == ["output[logits]", "output[aux][0]", "input_grad"]


def test_scalar_output_is_refused() -> None:
    class Loss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(x).pow(2).mean()

    with pytest.raises(ModelRunError, match="scalar"):
        verify_model(Loss(), (4,), replicas=2, device="cpu")


def test_empty_shards_warn_and_still_pass() -> None:
    report = verify_model(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), (4,), replicas=4, batch_size=3)
    assert report.passed
    assert any("replica(s) 3 get empty shards" in w for w in report.warnings)
    # Plain BN on a one-sample shard cannot train: the baseline says so instead of raising.
    assert "Expected more than 1 value per channel" in (report.unsynced.error or "")


def test_dropout_is_switched_off_with_a_warning() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))
    report = verify_model(model, (4,), replicas=2, device="cpu")
    assert report.passed
    assert any("dropout" in w for w in report.warnings)
    assert model[2].training  # the caller's model is not changed


def test_progress_is_reported_per_model_and_step() -> None:
    calls = []
    verify_model(nn.Sequential(nn.BatchNorm1d(3)), (3,), replicas=2, steps=2, progress=lambda *a: calls.append(a))
    assert [(done, total) for done, total, _ in calls] == [(i, 6) for i in range(1, 7)]
    assert calls[0][2] == "step 1/2: reference" and calls[-1][2] == "step 2/2: unsynced BN"


def test_report_is_strict_json() -> None:
    report = verify_model(nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)), (2, 4, 4), replicas=2, device="cpu")
    document = json.loads(json.dumps(report.as_dict(), allow_nan=False))
    assert document["passed"] is True and document["replicas"] == 2 and document["backend"] == "threads"
    assert set(document["checks"][0]) == {"name", "max_abs_err", "max_rel_err", "tolerance", "passed"}
    assert document["layers"][0]["layer"] == "1" and document["layers"][0]["call"] == 0
    assert set(document["unsynced"]) >= {"checks", "layers", "max_rel_err", "error"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"replicas": 0}, "replicas must be a positive integer"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"steps": 0}, "steps must be a positive integer"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"reference_dtype": torch.int64}, "dtype must be one of"),
        ({"rtol": -1.0}, "rtol must be a finite number >= 0"),
        ({"atol": math.nan}, "atol must be a finite number >= 0"),
        ({"device": "meta"}, "device must be 'cpu' or 'cuda'"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        verify_model(nn.BatchNorm1d(2), (2,), **kwargs)


def test_bad_models_and_shapes() -> None:
    with pytest.raises(ValueError, match="no BatchNorm layers"):
        verify_model(nn.Linear(2, 2), (2,))
    with pytest.raises(ValueError, match="input_shape must be"):
        verify_model(nn.BatchNorm1d(2), ())
    with pytest.raises(
        ModelRunError,
        match=r"the model failed on one device with input of shape \(8, 5, 8, 8\) \(step 1\): RuntimeError",
    ):
        verify_model(mixed_net(), (5, 8, 8), device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda() -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        verify_model(nn.BatchNorm1d(2), (2,), device="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs CUDA")
def test_cuda_replicas_match() -> None:
    report = verify_model(resnet_tiny(), (3, 32, 32), replicas=2, device="cuda")
    assert report.passed and report.device.startswith("cuda")


def test_tolerance_and_comparison_semantics() -> None:
    assert default_tolerance("bfloat16", "float64") == Tolerance(rtol=0.1, atol=0.01)
    tolerance = Tolerance(rtol=1e-4, atol=1e-4)
    near_zero = Comparison("grad/bias")
    near_zero.add(5e-5, 1e-7, tolerance)  # judged by atol: rel err against atol/rtol = 1
    assert near_zero.passed and near_zero.max_rel_err == pytest.approx(5e-5)
    large = Comparison("grad/weight")
    large.add(5e-3, 100.0, tolerance)
    large.add(2e-2, 100.0, tolerance)  # worst of steps
    assert not large.passed and large.max_rel_err == pytest.approx(2e-4) and large.max_abs_err == 2e-2
    count = Comparison("buffer/bn.num_batches_tracked")
    count.add(1.0, 3.0, None)
    assert not count.passed and count.tolerance == 0
    nan = Comparison("output")
    nan.add(math.inf, 1.0, tolerance)
    assert not nan.passed and nan.as_dict()["max_abs_err"] is None


def test_sync_batch_norm_in_the_input_model_is_compared_with_plain_batch_norm() -> None:
    model = syncbn.convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    report = verify_model(model, (3, 6, 6), replicas=2, device="cpu")
    assert report.passed and not report.unsynced.passed


def deep_mlp(depth: int = 30) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU()]
    return nn.Sequential(*layers)


def test_float32_rounding_amplified_by_a_deep_model_gets_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    # 30 BatchNorm layers over 4 samples amplify float32 rounding past 1e-4 (plain BN on one
    # device does the same against float64); float64 shows SyncBN exact. Merged statistics
    # (the way of replicas on different devices) round differently from torch's kernel;
    # replicas sharing the CPU would normalize the joined batch, bit-identical to it.
    monkeypatch.setattr(syncbn.functional, "_joinable", lambda shards: False)
    torch.manual_seed(0)
    model = deep_mlp()
    report = verify_model(model, (8,), replicas=2, batch_size=4, device="cpu")
    assert not report.passed
    assert report.hint is not None and "re-run in float64" in report.hint
    assert report.as_dict()["hint"] == report.hint
    exact = verify_model(model, (8,), replicas=2, batch_size=4, dtype="float64", device="cpu")
    assert exact.passed and exact.hint is None


def test_unsynchronized_statistics_get_their_own_hint(broken_sync: None) -> None:
    report = verify_model(mixed_net(), (3, 16, 16), replicas=2, device="cpu")
    assert not report.passed
    assert report.hint is not None and report.hint.startswith("SyncBN's errors are those of unsynced BN")


def test_half_precision_warns_that_rounding_dominates() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    report = verify_model(model, (3, 6, 6), replicas=2, dtype="bfloat16", device="cpu")
    assert (report.rtol, report.atol) == (0.1, 0.01)
    assert any(w.startswith("bfloat16 keeps 8 significant bits") for w in report.warnings)
