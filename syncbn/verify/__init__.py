"""Prove, in numbers, that SyncBN on R replicas trains like one device on the whole batch.

``verify_model`` trains copies of one model for a few steps on the same seeded inputs: the
SyncBN-converted model on R replicas (the candidate), plain BatchNorm on R replicas (the
unsynced baseline, what SyncBN fixes), and plain BatchNorm on one device with the whole
batch: the reference, one device in the run's dtype, and the float64 truth. It compares
outputs, the input gradient, every parameter gradient, every BatchNorm buffer and every
BatchNorm layer's output per call, and names the first layer where replicas diverge.

The package, one concept per file: ``settings`` (arguments, checked), ``trainer`` (the
training harness), ``comparisons`` (errors and the verdict), ``report`` (the outcome),
``processes`` (ranks of a torch.distributed group), ``runner`` (``verify_model``).
"""

from syncbn.verify.comparisons import Comparison, ComparisonSet, Criterion
from syncbn.verify.report import VerificationReport
from syncbn.verify.runner import ProgressCallback, verify_model
from syncbn.verify.settings import BACKENDS, DEFAULT_LR, default_batch_size
from syncbn.verify.tolerance import DEFAULT_MAX_RATIO, DEFAULT_TOLERANCES, Tolerance, default_tolerance
from syncbn.verify.trainer import ModelRunError
from syncbn.workload import DTYPES, NotEnoughMemoryError, as_dtype, default_device, default_replicas, dtype_name

__all__ = [
    "BACKENDS",
    "DEFAULT_LR",
    "DEFAULT_MAX_RATIO",
    "DEFAULT_TOLERANCES",
    "DTYPES",
    "Comparison",
    "ComparisonSet",
    "Criterion",
    "ModelRunError",
    "NotEnoughMemoryError",
    "ProgressCallback",
    "Tolerance",
    "VerificationReport",
    "as_dtype",
    "default_batch_size",
    "default_device",
    "default_replicas",
    "default_tolerance",
    "dtype_name",
    "verify_model",
]
