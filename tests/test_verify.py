"""syncbn.verify: the reference / truth / SyncBN / unsynced comparison behind `syncbn verify`."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from torch import nn

import syncbn
from sample_models import SAMPLES
from sample_models.mixed import mixed_net
from sample_models.resnet import resnet_tiny
from syncbn.verify import (
    Comparison,
    ComparisonSet,
    Criterion,
    ModelRunError,
    NotEnoughMemoryError,
    Tolerance,
    VerificationReport,
    default_tolerance,
    verify_model,
)
from syncbn.verify.comparisons import StepErrors
from syncbn_cli.factories import build_from_factory

LOW_PRECISION = ["float32", "bfloat16", "float16"]
# Batch/replica splits: even, uneven, fewer samples than replicas (empty shards).
SPLITS = [{"replicas": 2}, {"replicas": 3}, {"replicas": 4}, {"replicas": 3, "batch_size": 5}]


def build(spec: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    model, shape = build_from_factory(spec)
    return model, shape


def failures(report: VerificationReport) -> list[tuple[str, float, float, float | None]]:
    return [
        (c.name, c.truth_err, c.one_device_truth_err, c.ratio) for c in (*report.checks, *report.layers) if not c.passed
    ]


@pytest.mark.parametrize("dtype", ["float64", *LOW_PRECISION])
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_sample_passes_in_every_dtype_and_split_and_unsynced_fails(name: str, dtype: str) -> None:
    # Two splits per sample and dtype, rotating, so that the matrix covers every split.
    index = sorted(SAMPLES).index(name) + ["float64", *LOW_PRECISION].index(dtype)
    model, shape = build(SAMPLES[name])
    for split in (SPLITS[index % len(SPLITS)], SPLITS[(index + 1) % len(SPLITS)]):
        report = verify_model(model, shape, dtype=dtype, device="cpu", **split)
        assert report.passed, (split, failures(report))
        assert report.judged_by == ("reference" if dtype == "float64" else "truth")
        if report.unsynced.error is not None:  # a one-sample shard: BatchNorm1d cannot train on it
            assert "Expected more than 1 value per channel" in report.unsynced.error
        elif dtype == "float64":
            assert not report.unsynced.passed and report.unsynced.max_rel_err > 100 * report.synced.max_rel_err
        else:
            assert not report.unsynced.passed and report.unsynced.worst_ratio > report.max_ratio


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_fewer_samples_than_replicas_and_several_steps_pass(dtype: str) -> None:
    # `syncbn verify -b 3 -r 4`: one replica's shard is empty; unsynced BN cannot even run.
    for name in ("temporal_bn1d", "mixed_net"):
        model, shape = build(SAMPLES[name])
        report = verify_model(model, shape, replicas=4, batch_size=3, steps=3, dtype=dtype, device="cpu")
        assert report.passed, (name, failures(report))
    # mixed_net's BatchNorm1d head cannot train on a one-sample shard.
    assert "Expected more than 1 value per channel" in (report.unsynced.error or "")


@pytest.mark.parametrize("dtype", ["float64", *LOW_PRECISION])
def test_broken_sync_fails_at_the_first_batch_norm_layer_in_every_dtype(broken_sync: None, dtype: str) -> None:
    for name, first in (("resnet_tiny", "stem.1"), ("mixed_net", "stem_bn"), ("mlp_bn1d", "1")):
        model, shape = build(SAMPLES[name])
        report = verify_model(model, shape, replicas=4, dtype=dtype, device="cpu")
        assert not report.passed, (name, dtype)
        assert report.first_diverging_layer is not None and report.first_diverging_layer.name == first
        assert report.first_failure is report.first_diverging_layer
        assert report.as_dict()["first_diverging_layer"] == first
        # Unsynchronized SyncBN is plain per-replica BN (but for the rounding of 16-bit dtypes).
        assert report.synced.max_rel_err == pytest.approx(report.unsynced.max_rel_err, rel=0.05)
        assert report.hint is not None and report.hint.startswith("SyncBN's errors are those of unsynced BN")
        if dtype != "float64":
            assert report.first_diverging_layer.ratio > report.max_ratio


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
    assert all(c.tolerance == 0 and c.max_abs_err == 0 and c.ratio is None for c in counts)
    # Every floating check was measured against the truth, beside one device.
    for check in (*report.checks, *report.layers):
        if check not in counts:
            assert check.ratio is not None and check.one_device_truth_err > 0, check


def test_a_failing_sync_batch_norm_is_reported_not_raised(failing_sync: None) -> None:
    report = verify_model(mixed_net(), (3, 16, 16), replicas=2, steps=2, device="cpu")
    assert not report.passed
    assert report.synced.error == "RuntimeError: rendezvous lost"
    assert report.unsynced.error is None and report.unsynced.checks
    assert report.as_dict()["error"] == "RuntimeError: rendezvous lost"


def test_the_model_is_left_untouched() -> None:
    model = resnet_tiny().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    verify_model(model, (3, 32, 32), replicas=2, steps=2, device="cpu", dtype="bfloat16")
    assert not model.training
    assert all(isinstance(m, nn.BatchNorm2d) for m in model.modules() if "BatchNorm" in type(m).__name__)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_several_steps_and_a_float64_reference() -> None:
    report = verify_model(mixed_net(), (3, 16, 16), replicas=3, steps=3, reference_dtype="float64", device="cpu")
    assert report.passed
    assert (report.dtype, report.reference_dtype, report.steps, report.judged_by) == ("float32", "float64", 3, "truth")
    assert (report.rtol, report.atol) == (1e-4, 1e-4)  # the less precise dtype decides
    # The float64 reference is the truth: errors against both agree.
    output = report.checks[0]
    assert output.max_abs_err == pytest.approx(output.truth_err, rel=1e-9)


def test_float64_is_exact_to_rounding_and_judged_by_the_reference() -> None:
    report = verify_model(mixed_net(), (3, 16, 16), replicas=4, dtype="float64", device="cpu")
    assert report.passed and report.synced.max_rel_err < 1e-12
    assert report.judged_by == "reference" and report.synced.worst_ratio is None
    assert all(c.one_device_truth_err == 0 for c in report.checks)  # one device is the truth


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
    assert calls[0][2] == "step 1/2: one device" and calls[-1][2] == "step 2/2: unsynced BN"


def test_report_is_strict_json() -> None:
    report = verify_model(nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)), (2, 4, 4), replicas=2, device="cpu")
    document = json.loads(json.dumps(report.as_dict(), allow_nan=False))
    assert document["passed"] is True and document["replicas"] == 2 and document["backend"] == "threads"
    assert (document["judged_by"], document["max_ratio"]) == ("truth", 2.0)
    assert set(document["checks"][0]) == {
        "name",
        "max_abs_err",
        "max_rel_err",
        "tolerance",
        "truth_err",
        "one_device_truth_err",
        "ratio",
        "passed",
    }
    assert document["layers"][0]["layer"] == "1" and document["layers"][0]["call"] == 0
    assert set(document["unsynced"]) >= {"checks", "layers", "max_rel_err", "worst_ratio", "error"}


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
        ({"max_ratio": 0.0}, "max_ratio must be a finite number > 0"),
        ({"device": "meta"}, "device must be 'cpu' or 'cuda'"),
        ({"device": "nowhere"}, "device must be 'cpu' or 'cuda'"),
        ({"timeout": 0}, "timeout must be a positive number of seconds"),
        ({"backend": "mpi"}, "backend must be one of threads, gloo, nccl"),
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


def test_an_input_too_large_for_memory_is_refused_before_allocating() -> None:
    start = time.monotonic()
    with pytest.raises(NotEnoughMemoryError, match=r"input 3x1000000x1000000 with batch 8 needs at least .* of memory"):
        verify_model(mixed_net(), (3, 1_000_000, 1_000_000), device="cpu")
    assert time.monotonic() - start < 5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda() -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        verify_model(nn.BatchNorm1d(2), (2,), device="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs CUDA")
def test_cuda_replicas_match() -> None:
    report = verify_model(resnet_tiny(), (3, 32, 32), replicas=2, device="cuda")
    assert report.passed and report.device.startswith("cuda")


def test_tolerance_semantics_of_float64_runs() -> None:
    assert default_tolerance("bfloat16", "float64") == Tolerance(rtol=0.1, atol=0.01)
    by_reference = Criterion(Tolerance(rtol=1e-4, atol=1e-4))
    near_zero = Comparison("grad/bias")
    near_zero.add(StepErrors(5e-5, 1e-7, 5e-5, 1e-7, 0.0), by_reference)  # judged by atol: rel err = 1
    assert near_zero.passed and near_zero.max_rel_err == pytest.approx(5e-5) and near_zero.ratio is None
    large = Comparison("grad/weight")
    large.add(StepErrors(5e-3, 100.0, 5e-3, 100.0, 0.0), by_reference)
    large.add(StepErrors(2e-2, 100.0, 2e-2, 100.0, 0.0), by_reference)  # worst of steps
    assert not large.passed and large.max_rel_err == pytest.approx(2e-4) and large.max_abs_err == 2e-2
    count = Comparison("buffer/bn.num_batches_tracked")
    count.add(StepErrors(1.0, 3.0, 1.0, 3.0, 0.0, exact=True), by_reference)
    assert not count.passed and count.tolerance == 0
    nan = Comparison("output")
    nan.add(StepErrors(math.inf, 1.0, math.inf, 1.0, 0.0), by_reference)
    assert not nan.passed and nan.as_dict()["max_abs_err"] is None


def test_truth_judgement_ratio_resolution_and_atol() -> None:
    bfloat16 = Criterion(Tolerance(rtol=0.1, atol=0.01), max_ratio=2.0, eps=2**-7)

    def judged(truth_err: float, one_device_err: float, scale: float = 1.0) -> Comparison:
        check = Comparison("output")
        check.add(StepErrors(0.0, scale, truth_err, scale, one_device_err), bfloat16)
        return check

    assert judged(0.05, 0.03).passed and judged(0.05, 0.03).ratio == pytest.approx(5 / 3)
    assert not judged(0.07, 0.03).passed  # negative control: 2.33 times one device
    # One device exactly right cannot fail SyncBN for rounding: its error counts as eps * scale.
    assert judged(0.015, 0.0).passed and judged(0.015, 0.0).ratio == pytest.approx(0.015 * 2**7)
    assert not judged(0.05, 0.0, scale=1.0).passed
    # A ratio of two tiny numbers: within atol, whatever the ratio.
    tiny = judged(0.009, 1e-6, scale=1e-9)
    assert tiny.passed and tiny.ratio > 1000
    assert not judged(0.02, 1e-6, scale=1e-9).passed
    # One device diverged too (NaN): only the reference is left to judge by.
    diverged = Comparison("output")
    diverged.add(StepErrors(0.0, 1.0, math.inf, 1.0, math.inf), bfloat16)
    assert diverged.passed


def test_module_scale_lets_a_bias_before_batch_norm_round_like_its_weight() -> None:
    # grad/0.bias of a conv followed by BatchNorm is zero in exact arithmetic; replicas sum
    # partial gradients as large as the weight's, and round at that scale.
    from syncbn.verify.comparisons import Comparer
    from syncbn.verify.trainer import Expected, StepResult

    def step(weight: float, bias: float) -> StepResult:
        grads = {"0.weight": torch.tensor([weight]), "0.bias": torch.tensor([bias])}
        return StepResult({}, {}, None, grads, {}, {}, [])

    truth, one = step(12.0, 1e-15), step(12.0, 0.002)
    comparer = Comparer(Criterion(Tolerance(rtol=1e-2, atol=1e-3), max_ratio=2.0, eps=2**-10))
    comparer.compare(step(12.0, 0.004), Expected(one, truth, one))  # twice one device's noise and more
    checks = {c.name: c for c in comparer.finish().checks}
    assert checks["grad/0.bias"].passed and checks["grad/0.bias"].ratio == pytest.approx(0.004 / (12 * 2**-10))


def report_with(synced: float, unsynced: float, *, judged_by: str = "truth") -> VerificationReport:
    def comparisons(ratio: float) -> ComparisonSet:
        check = Comparison("output", max_rel_err=ratio * 1e-3, truth_err=ratio * 1e-3, ratio=ratio, passed=False)
        return ComparisonSet(checks=[check])

    return VerificationReport(
        replicas=2, backend="threads", device="cpu", dtype="float32", reference_dtype="float32", batch_size=4,
        input_shape=(3,), steps=1, seed=0, lr=0.01, rtol=1e-4, atol=1e-4, max_ratio=2.0, judged_by=judged_by,
        synced=comparisons(synced), unsynced=comparisons(unsynced),
    )  # fmt: skip


def test_hints_tell_unsynchronized_statistics_from_amplified_rounding() -> None:
    assert report_with(5e4, 5e4).hint.startswith("SyncBN's errors are those of unsynced BN")
    rounding = report_with(3.0, 1e4).hint
    assert "rounding amplified through the model" in rounding and "re-run in float64" in rounding
    assert report_with(3.0, 10.0).hint is None  # neither: no guess


def test_unsynchronized_statistics_get_their_own_hint(broken_sync: None) -> None:
    report = verify_model(mixed_net(), (3, 16, 16), replicas=2, device="cpu")
    assert not report.passed
    assert report.hint is not None and report.hint.startswith("SyncBN's errors are those of unsynced BN")


def deep_mlp(depth: int = 30) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU()]
    return nn.Sequential(*layers)


def test_float32_rounding_amplified_by_a_deep_model_passes_against_the_truth(monkeypatch: pytest.MonkeyPatch) -> None:
    # 30 BatchNorm layers over 4 samples amplify float32 rounding far past 1e-4: compared with
    # one float32 device SyncBN is off, but one device is as far from the float64 truth.
    # Merged statistics (the way of replicas on different devices) round differently from
    # torch's kernel; replicas sharing the CPU would normalize the joined batch, bit-identical.
    monkeypatch.setattr(syncbn.functional, "_joinable", lambda shards: False)
    torch.manual_seed(0)
    model = deep_mlp()
    report = verify_model(model, (8,), replicas=2, batch_size=4, device="cpu")
    assert report.passed, failures(report)
    assert report.synced.max_rel_err > 1e-4  # what the same-dtype reference alone would have failed
    exact = verify_model(model, (8,), replicas=2, batch_size=4, dtype="float64", device="cpu")
    assert exact.passed and exact.hint is None


class StallsOnOneSample(nn.Module):
    """conv -> bn1 -> (converted to SyncBN, the replica given exactly one sample sleeps 1.5 s) -> bn2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv(x))
        if x.shape[0] == 1 and isinstance(self.bn2, syncbn.SyncBatchNorm):
            time.sleep(1.5)
        return self.bn2(x)


def test_the_timeout_reaches_data_parallel(statistics_way) -> None:
    # Replicas in threads, as on separate devices: the stalled (sleeping) one keeps its peers waiting.
    statistics_way()
    start = time.monotonic()
    stalled = verify_model(StallsOnOneSample(), (3, 5, 5), replicas=3, batch_size=5, timeout=0.3, device="cpu")
    assert time.monotonic() - start < 30
    assert not stalled.passed and "SyncBNTimeoutError" in (stalled.synced.error or ""), stalled.synced.error
    patient = verify_model(StallsOnOneSample(), (3, 5, 5), replicas=3, batch_size=5, timeout=30, device="cpu")
    assert patient.passed, patient.synced.error


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_merged_statistics_pass_in_low_precision_and_broken_sync_still_fails(dtype, statistics_way, monkeypatch):
    # Replicas on separate devices merge statistics and round differently from one device's
    # kernel, just as right: on resnet_basic a ReLU mask flipped, 100x one device's error on
    # a bias gradient, before one device was also measured rounded other right ways.
    statistics_way()
    model, shape = build_from_factory("sample_models.zoo:resnet_basic")
    report = verify_model(model, shape, replicas=4, batch_size=8, dtype=dtype, steps=2, device="cpu")
    assert report.passed, report.as_dict()["synced"]
    import syncbn.functional

    monkeypatch.setattr(
        syncbn.functional, "_exchange_statistics", lambda replica, post: syncbn.functional._Merged(*post[:3])
    )
    broken = verify_model(model, shape, replicas=4, batch_size=8, dtype=dtype, steps=2, device="cpu")
    assert not broken.passed
