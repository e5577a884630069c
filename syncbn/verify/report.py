"""The outcome of ``verify_model``: SyncBN's comparisons, the unsynced baseline's, and what a failure means.

``VerificationReport.as_dict`` is the ``syncbn verify --json`` document; its keys follow the
contract of DESIGN.md (``passed``, ``replicas``, ``backend``, ``checks``, ``layers``,
``unsynced``), and only ever gain new ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from syncbn.verify.comparisons import Comparison, ComparisonSet, sort_key


@dataclass
class VerificationReport:
    """The outcome of ``verify_model``: SyncBN's errors and the unsynced baseline's.

    Attributes:
        replicas, backend, device, dtype, reference_dtype, batch_size, input_shape,
            steps, seed, lr, rtol, atol, max_ratio: how the run was made.
        judged_by: ``"truth"`` (the ratio to one device's error against the float64
            truth) or ``"reference"`` (float64 runs: the tolerance against the reference).
        synced: SyncBN's comparisons (``checks``, ``layers``, ``error``).
        unsynced: the same comparisons for plain per-replica BatchNorm.
        warnings: things the run did that a user should know (empty shards, dropout off).
    """

    replicas: int
    backend: str
    device: str
    dtype: str
    reference_dtype: str
    batch_size: int
    input_shape: tuple[int, ...]
    steps: int
    seed: int
    lr: float
    rtol: float
    atol: float
    max_ratio: float
    judged_by: str
    synced: ComparisonSet
    unsynced: ComparisonSet
    warnings: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.synced.passed

    @property
    def checks(self) -> list[Comparison]:
        return self.synced.checks

    @property
    def layers(self) -> list[Comparison]:
        return self.synced.layers

    @property
    def first_diverging_layer(self) -> Comparison | None:
        """SyncBN's first BatchNorm layer call that failed, in forward order."""
        return self.synced.first_diverging_layer

    @property
    def first_failure(self) -> Comparison | None:
        """What to blame for a failure: the first diverging layer, else the worst failing check."""
        failing = [c for c in self.synced.checks if not c.passed]
        return self.first_diverging_layer or max(failing, key=lambda c: sort_key(c.severity), default=None)

    @property
    def hint(self) -> str | None:
        """What a failure looks like, when its numbers say: no synchronization, or rounding.

        Unsynchronized statistics are off exactly as much as unsynced BN is. A SyncBN
        error a hundred times smaller than that is what rounding amplified through a deep
        or ill-conditioned model gives; a float64 run tells the two apart.
        """
        if self.passed or self.synced.error is not None or self.unsynced.error is not None:
            return None
        synced, unsynced = self.synced.max_rel_err, self.unsynced.max_rel_err
        # Unsynchronized SyncBN is plain per-replica BN: equal, but for the rounding of 16-bit dtypes.
        same = 5e-2 if "16" in self.dtype else 1e-3
        if math.isclose(synced, unsynced, rel_tol=same):
            return (
                "SyncBN's errors are those of unsynced BN: the replicas' statistics were not combined "
                "(a layer left unconverted, or statistics computed outside the synchronized path)"
            )
        if self.judged_by == "truth":
            synced, unsynced = self.synced.worst_ratio or 0.0, self.unsynced.worst_ratio or 0.0
            measure = "times one device's error against the float64 truth"
        elif self.reference_dtype == "float64":
            return None
        else:
            measure = "relative error"
        if not synced < 0.01 * unsynced:
            return None
        return (
            f"SyncBN is off by {synced:.2g} {measure}, unsynced BN by {unsynced:.2g}: "
            f"{self.dtype} rounding amplified through the model is more likely than a SyncBN bug; "
            "re-run in float64 to tell them apart"
        )

    def as_dict(self) -> dict[str, Any]:
        """One JSON-ready document: the DESIGN.md contract (``passed``, ``checks``, ``layers``, ...)."""
        synced = self.synced.as_dict()
        return {
            "passed": self.passed,
            "replicas": self.replicas,
            "backend": self.backend,
            "device": self.device,
            "dtype": self.dtype,
            "reference_dtype": self.reference_dtype,
            "batch_size": self.batch_size,
            "input_shape": list(self.input_shape),
            "steps": self.steps,
            "seed": self.seed,
            "lr": self.lr,
            "rtol": self.rtol,
            "atol": self.atol,
            "max_ratio": self.max_ratio,
            "judged_by": self.judged_by,
            "max_rel_err": synced["max_rel_err"],
            "worst_ratio": synced["worst_ratio"],
            "first_diverging_layer": synced["first_diverging_layer"],
            "error": synced["error"],
            "checks": synced["checks"],
            "layers": synced["layers"],
            "unsynced": self.unsynced.as_dict(),
            "hint": self.hint,
            "warnings": list(self.warnings),
        }
